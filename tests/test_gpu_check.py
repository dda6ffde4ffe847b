"""tools/gpu_check.sh --dry-run: the script a lent GPU runs, end to end on CPU at tiny sizes."""
import json
import math
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tools" / "gpu_check.sh"


def test_dry_run_writes_every_result(tmp_path):
    p = subprocess.run(["bash", str(SCRIPT), "--dry-run", "--out", str(tmp_path)], cwd=ROOT, capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    (dest,) = tmp_path.iterdir()  # OUT/<device name>/
    steps = (dest / "steps.txt").read_text().splitlines()
    assert [s.split(":")[0] for s in steps] == ["gpu tests", "kernel benchmarks", "random model decode"]
    assert all(": ok," in s for s in steps), steps
    assert "commit:" in (dest / "env.txt").read_text()

    suite = ET.parse(dest / "gpu_tests.xml").getroot().find("testsuite")
    assert int(suite.get("tests")) > 0 and int(suite.get("failures")) == int(suite.get("errors")) == 0

    bench = json.loads((dest / "results.json").read_text())["benchmarks"]
    assert {b["fullname"].split("::")[0].split("/")[-1] for b in bench} == {"bench_paged_attention.py",
                                                                            "bench_gguf_matmul.py"}
    assert (dest / "README.md").read_text().startswith("# Benchmark results")

    e2e = json.loads((dest / "e2e_random_model.json").read_text())["results"]
    assert [(r["weights"], r["batch"]) for r in e2e] == [("bf16", 1), ("bf16", 2), ("q4_0", 1), ("q4_0", 2)]
    for r in e2e:
        assert r["decode_steps"] == 3 and all(math.isfinite(r[k]) and r[k] > 0
                                              for k in ("prefill_tok_s", "decode_tok_s", "weight_gbps"))
    assert e2e[2]["weight_bytes"] < e2e[0]["weight_bytes"] * 18 / 32 / 2 * 1.01  # Q4_0: 18 B per 32 weights


def test_unknown_argument_is_refused():
    p = subprocess.run(["bash", str(SCRIPT), "--fast"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "unknown argument --fast" in p.stderr
