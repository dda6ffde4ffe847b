"""What batch invariance costs on CPU: this checkout against a baseline commit whose CPU path is not invariant, on the
real models, interleaved.

    python3 benchmarks/bench_invariance.py                      # baseline 4de0bb0 (before the invariant kernels)
    python3 benchmarks/bench_invariance.py --baseline REV --repeats 5

The baseline is checked out into a git worktree (.bench-baseline/, its C++ kernels built into their own torch
extensions folder). Each measurement runs in a fresh interpreter, alternating this tree and the baseline, `--repeats`
times; medians are kept. Per model and thread count (1, and one per physical core): decode tok/s (128 greedy tokens,
EOS banned; bench_cpu_real.py's ours_run) and the time to the first token of a 512-token prompt (prefill).
Baseline 4de0bb0: float32 linears by MKL's sgemm from 32 rows (gemv below), prefill attention by torch's SDPA, RMSNorm
by torch above 16 rows; this tree: one arithmetic for every row count (README, "Batch invariance").

Writes benchmarks/results/<cpu-Ncores>/invariance.md and .json.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODELS = ("Q4_1", "F32", "gemma3-Q4_K_M")

# One measurement in a fresh interpreter of the tree argv[1]: model argv[2], threads argv[3]; prints JSON.
MEASURE = """
import json, sys
root, fmt, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
sys.path[:0] = [root, root + "/tools", root + "/benchmarks"]
import bench_cpu_real as b
files = b.model_files()
with b.load_ours(files, fmt) as runner:
    b.set_threads(threads, runner)
    ban = b.eos_ban(runner)
    b.ours_run(runner, 8, ban)  # warm: first-call allocations
    decode = b.ours_run(runner, 128, ban).decode_tok_s
    b.ours_run(runner, 1, ban, b.long_prompt(runner, 999))
    ttft = b.ours_run(runner, 1, ban, b.long_prompt(runner, 1000)).ttft_s
print(json.dumps(dict(decode_tok_s=decode, ttft_512_ms=ttft * 1e3)))
"""


def baseline_tree(rev: str) -> Path:
    path = ROOT / ".bench-baseline"
    if not path.exists():
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(path), rev], check=True)
    subprocess.run(["git", "-C", str(path), "checkout", "-q", "--detach", rev], check=True)
    return path


def measure(tree: Path, fmt: str, threads: int, extensions: str) -> dict:
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": extensions}
    out = subprocess.run([sys.executable, "-c", MEASURE, str(tree), fmt, str(threads)], env=env, check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv=None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--baseline", default="4de0bb0")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    a = p.parse_args(argv)
    sys.path[:0] = [str(ROOT / "tools"), str(ROOT / "benchmarks")]
    from bench_cpu_real import physical_cores
    default_extensions = os.environ.get("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "torch_extensions"))
    trees = {"invariant": (ROOT, default_extensions),
             "baseline": (baseline_tree(a.baseline), str(Path.home() / ".cache" / "torch_ext_bench_baseline"))}
    rows = []
    for fmt in a.models:
        for threads in dict.fromkeys((1, physical_cores())):
            runs = {name: [] for name in trees}
            for _ in range(a.repeats):
                for name, (tree, ext) in trees.items():
                    runs[name].append(measure(tree, fmt, threads, ext))
            row = dict(model=fmt, threads=threads)
            for name, rs in runs.items():
                row[f"{name}_decode_tok_s"] = statistics.median(r["decode_tok_s"] for r in rs)
                row[f"{name}_ttft_512_ms"] = statistics.median(r["ttft_512_ms"] for r in rs)
            print(row, flush=True)
            rows.append(row)
    out = ROOT / "benchmarks" / "results" / f"cpu-{os.cpu_count()}cores"
    out.mkdir(parents=True, exist_ok=True)
    (out / "invariance.json").write_text(json.dumps(dict(baseline=a.baseline, repeats=a.repeats, rows=rows), indent=1))
    lines = [f"# Batch invariance: cost on CPU (this tree vs {a.baseline}, medians of {a.repeats}, interleaved)", "",
             "| model | threads | decode tok/s baseline | decode tok/s invariant | ratio | 512-token TTFT baseline ms "
             "| invariant ms | ratio |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        d = r["invariant_decode_tok_s"] / r["baseline_decode_tok_s"]
        t = r["baseline_ttft_512_ms"] / r["invariant_ttft_512_ms"]
        lines.append(f"| {r['model']} | {r['threads']} | {r['baseline_decode_tok_s']:.1f} | "
                     f"{r['invariant_decode_tok_s']:.1f} | {d:.2f}x | {r['baseline_ttft_512_ms']:.0f} | "
                     f"{r['invariant_ttft_512_ms']:.0f} | {t:.2f}x |")
    lines += ["", "Ratios: above 1.00x the invariant tree is faster (decode tok/s; TTFT baseline / invariant)."]
    (out / "invariance.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return out / "invariance.md"


if __name__ == "__main__":
    main()
