"""tools/bench.py renders pytest-benchmark JSON into a table with derived figures and one PNG per module."""
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def load_tool():
    import bench
    return bench


def test_render_writes_table_and_plots(tmp_path):
    info = dict(device="X", torch="t", triton="tr", commit="abc", copy_gbps=3000.0, matmul_tflops=700.0)
    rows = [
        {"name": "test_decode[B1-N512]", "fullname": "benchmarks/bench_paged_attention.py::test_decode[B1-N512]",
         "stats": {"median": 2e-5}, "extra_info": {**info, "gbps": 2500.0, "frac_of_copy_bw": 0.83,
                                                    "speedup_vs_sdpa": 1.25}},
        {"name": "test_sample[B1-V10]", "fullname": "benchmarks/bench_sampling.py::test_sample[B1-V10]",
         "stats": {"median": 1e-4}, "extra_info": {**info, "rows_per_s": 1e4}},
    ]
    (tmp_path / "results.json").write_text(json.dumps({"benchmarks": rows}))
    load_tool().render(tmp_path)
    table = (tmp_path / "README.md").read_text()
    assert "| test_decode[B1-N512] | 2.5e+03 GB/s | 83.0% | 1.25x sdpa | 0.020 ms |" in table
    assert "copy 3000.0 GB/s" in table
    for module in ("bench_paged_attention", "bench_sampling"):
        png = tmp_path / f"{module}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_profile_reports_engine_phases_and_ops(tmp_path):
    import re
    import subprocess
    import sys
    trace = tmp_path / "trace.json"
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "profile_engine.py"), "--requests", "2", "--max-tokens", "4",
                          "--trace", str(trace)], capture_output=True, text=True, timeout=300, cwd=tmp_path).stdout
    assert re.search(r"2 requests, 8 tokens in [\d.]+ s", out)
    assert re.search(r"mistralrs::linear\s+\d+\s+[\d.]+", out)  # the CPU kernels record their calls
    kinds = {k: float(v) for k, v in re.findall(r"^(matmul|attention|glue)\s+([\d.]+)", out, re.M)}
    assert kinds.keys() == {"matmul", "attention", "glue"} and kinds["matmul"] > 0 and kinds["attention"] > 0
    forward = re.search(r"mistralrs\.forward\s+([\d.]+)\s+([\d.]+)", out)
    assert forward and float(forward.group(1)) > 0
    assert json.loads(trace.read_text())["traceEvents"]
