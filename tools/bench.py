"""Run the benchmark suite and render its results: one command per question.

    python tools/bench.py            # full sizes on a GPU, quick sizes elsewhere
    python tools/bench.py --quick    # tiny sizes (CI, CPU)
    python tools/bench.py -k decode  # a subset (pytest -k expression)

Writes benchmarks/results/<device>/results.json (pytest-benchmark's JSON, each case's figures in extra_info),
README.md (a table per benchmark module) and one PNG per module (the headline figure per case, ours vs peer).
"""
import argparse
import json
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The headline figure of a case, in order of preference, and how to label it.
HEADLINES = [("engine_overhead_ms", "ms/token"), ("gbps", "GB/s"), ("tflops", "TFLOP/s"), ("decode_tok_s", "tok/s"), ("prefill_tok_s", "tok/s"),
             ("throughput_tok_s", "tok/s"), ("rows_per_s", "rows/s")]
FRACTIONS = ("frac_of_copy_bw", "frac_of_matmul")


def device_slug() -> str:
    import torch
    if torch.cuda.is_available():
        return re.sub(r"[^A-Za-z0-9.-]+", "-", torch.cuda.get_device_name(0))
    import os
    return f"cpu-{os.cpu_count()}cores"


def run_suite(out: Path, quick: bool, select: str | None) -> int:
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pytest", str(ROOT / "benchmarks"), "-q", "-p", "no:cacheprovider",
           f"--benchmark-json={out / 'results.json'}"]
    if quick:
        cmd.append("--quick")
    if select:
        cmd += ["-k", select]
    return subprocess.run(cmd, cwd=ROOT).returncode


def headline(info: dict) -> tuple[str, float, str] | None:
    for key, unit in HEADLINES:
        if key in info:
            return key, info[key], unit
    return None


def peer_ratio(info: dict) -> tuple[str, float] | None:
    """The best peer's name and our speedup over it, else the first peer recorded."""
    if "speedup_vs_best_peer" in info:
        return info.get("best_peer", "best peer"), info["speedup_vs_best_peer"]
    for key, value in info.items():
        if key.startswith("speedup_vs_"):
            return key.removeprefix("speedup_vs_"), value
    return None


def median_ms(b: dict) -> float:
    """The case's median: do_bench's on CUDA (benchmarks/conftest.py measure), else pytest-benchmark's."""
    info = b["extra_info"]
    return info["median_us"] / 1e3 if "median_us" in info else b["stats"]["median"] * 1e3


def fmt(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def render(out: Path) -> None:
    data = json.loads((out / "results.json").read_text())
    by_module = defaultdict(list)
    for b in data["benchmarks"]:
        by_module[b["fullname"].split("::")[0].split("/")[-1].removesuffix(".py")].append(b)
    lines = [f"# Benchmark results: {out.name}", ""]
    first = data["benchmarks"][0]["extra_info"] if data["benchmarks"] else {}
    lines += [f"commit {first.get('commit')}, torch {first.get('torch')}, triton {first.get('triton')}; "
              f"measured limits: copy {first.get('copy_gbps')} GB/s, matmul {first.get('matmul_tflops')} TFLOP/s", ""]
    if str(first.get("device", "")).startswith("cpu"):
        lines += ["On a CPU the Triton kernels run in the interpreter at tiny sizes: their rows prove the suite runs "
                  "and say nothing of speed. The end-to-end rows (reference ops on CPU) are real measurements.", ""]
    if (out / "cpu_real.md").is_file():  # written by benchmarks/bench_cpu_real.py, not by this suite
        lines += ["Real models (SmolLM2-135M, ours vs llama.cpp vs transformers): [cpu_real.md](cpu_real.md).", ""]
    for module, rows in by_module.items():
        lines += [f"## {module}", "", "| case | headline | fraction of limit | vs peer | median time |",
                  "| --- | --- | --- | --- | --- |"]
        for b in rows:
            info, h, peer = b["extra_info"], headline(b["extra_info"]), peer_ratio(b["extra_info"])
            frac = next((f"{info[k]:.1%}" for k in FRACTIONS if k in info), "")
            lines.append(f"| {b['name']} | {fmt(h[1]) + ' ' + h[2] if h else ''} | {frac} | "
                         f"{f'{peer[1]:.2f}x {peer[0]}' if peer else ''} | {median_ms(b):.3f} ms |")
        lines += ["", f"![{module}]({module}.png)", ""]
        plot(out / f"{module}.png", module, rows)
    (out / "README.md").write_text("\n".join(lines))


def plot(path: Path, module: str, rows: list[dict]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = [(b["name"].split("[")[-1].rstrip("]"), headline(b["extra_info"]), peer_ratio(b["extra_info"]))
             for b in rows]
    cases = [c for c in cases if c[1] is not None]
    if not cases:
        return
    fig, ax = plt.subplots(figsize=(max(4, 1.2 * len(cases)), 3.5))
    names = [c[0] for c in cases]
    ours = [c[1][1] for c in cases]
    # The peer's figure in the same unit: ours divided by our speedup over it.
    peers = [c[1][1] / c[2][1] if c[2] and c[2][1] else 0 for c in cases]
    x = range(len(cases))
    ax.bar([i - 0.2 for i in x], ours, 0.4, label="mistralrs")
    if any(peers):
        ax.bar([i + 0.2 for i in x], peers, 0.4, label=f"peer ({cases[0][2][0]})" if cases[0][2] else "peer")
    ax.set_xticks(list(x), names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(cases[0][1][2])
    ax.set_title(module)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("-k", dest="select")
    ap.add_argument("--out", type=Path, help="default: benchmarks/results/<device>")
    ap.add_argument("--render-only", action="store_true", help="re-render an existing results.json")
    a = ap.parse_args()
    out = a.out or ROOT / "benchmarks" / "results" / device_slug()
    if not a.render_only and run_suite(out, a.quick, a.select) not in (0, 5):
        sys.exit("benchmark run failed")
    render(out)
    print((out / "README.md").read_text())  # achieved figures, fraction of the device limit, ratio to peers
    print(f"results: {out}")


if __name__ == "__main__":
    main()
