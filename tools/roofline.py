"""Static cost report: how far each kernel's SASS is from its memory floor, with no GPU (a model, not a timing).

    python tools/roofline.py [-k SUBSTRING] [--out benchmarks/results/static-sm90]

For every benchmark shape it compiles the launches for sm_90a (tools/aot.py), counts the SASS each warp executes
and the bytes the launches move, and writes <out>/static.json and <out>/README.md. When <out>/before.json exists
(a static.json saved earlier) the table shows its issue floor beside the current one.

The model (H100 SXM; H200 has the same SMs and clocks, 4.8 TB/s instead of 3.35):
  bytes      every tensor argument of every launch crosses HBM once (weights, activations, partials both ways).
  HBM floor  bytes / 3.35 TB/s.
  issue      warp-instructions executed = warps per program x (programs x straight-line instructions + loop
             iterations of the whole grid x the main loop body); a loop nested in the main loop counts once per
             iteration of the outer one. Each of the 132 SMs issues at most 4 warp-instructions per cycle (one per
             sub-partition) at 1.98 GHz: issue floor = instructions / (4 x 132 x 1.98e9 /s). It assumes perfect
             occupancy and no stalls; real kernels are slower, never faster.
  tensor     dense bf16/fp16 FLOPs / 989 TFLOP/s, only for launches that use tensor cores.
"""
import argparse
import json
import sys
from collections import Counter
from pathlib import Path

import triton

sys.path.insert(0, str(Path(__file__).resolve().parent))
import aot  # noqa: E402

HBM_BYTES_S = 3.35e12
ISSUE_S = 4 * 132 * 1.98e9  # warp-instructions per second, whole GPU
TENSOR_FLOP_S = 989e12
# aot.py's opcode classes, grouped as the report shows them.
COLUMNS = {"int": ("int",), "fp32": ("fp32",), "f16": ("fp16x2",), "cvt": ("convert",),
           "mem": ("global_load", "global_store", "shared", "local"), "shfl": ("shuffle",), "tc": ("tensor",),
           "ctrl": ("control",), "other": ("move", "uniform", "other")}


def _arg(launch, name):
    return launch.args[launch.fn.arg_names.index(name)]


def loop_trips(launch, constexprs) -> int:
    """Iterations of the main loop summed over the whole grid."""
    name, grid = launch.name, launch.grid
    programs = grid[0] * (grid[1] if len(grid) > 1 else 1) * (grid[2] if len(grid) > 2 else 1)
    if name in ("_gguf_gemv_kernel", "_gguf_gemm_kernel", "_gguf_matmul_kernel"):  # the K splits cover K once
        return grid[0] * (grid[1] if len(grid) > 1 else 1) * triton.cdiv(_arg(launch, "K"), constexprs["BLOCK_K"])
    if name == "_split_k_reduce_kernel":
        return programs * _arg(launch, "splits")
    if name == "_decode_split_kernel":  # every key tile of every (sequence, KV head) once
        keys = _arg(launch, "block_tables_ptr").shape[1] * constexprs["BS"]
        return grid[0] * grid[1] * triton.cdiv(keys, constexprs["BLOCK_N"])
    if name == "_decode_reduce_kernel":
        return programs * triton.cdiv(_arg(launch, "n_split"), constexprs["S_BLOCK"])
    if name == "_paged_attention_kernel":  # causal: query tile t sees the key tiles up to its last query; all are
        BM, BN = constexprs["BLOCK_M"], constexprs["BLOCK_N"]  # counted at the masked loop's cost (an upper bound)
        return grid[0] * grid[1] * sum(triton.cdiv((t + 1) * BM, BN) for t in range(grid[2]))
    if name == "_xlora_shrink_kernel":
        return grid[0] * grid[1] * triton.cdiv(_arg(launch, "K"), constexprs["BLOCK_K"])
    if name == "_xlora_reduce_kernel":
        return programs * triton.cdiv(_arg(launch, "S"), constexprs["S_BLOCK"])
    if name == "_xlora_mix_kernel":
        return programs * triton.cdiv(_arg(launch, "AR"), constexprs["BLOCK_J"])
    raise KeyError(f"{name}: how many times its main loop runs is not modelled")


def launch_cost(launch, target) -> dict:
    c = aot.compile_launch(launch, target)
    constexprs = c.constexprs
    grid = launch.grid
    programs = grid[0] * (grid[1] if len(grid) > 1 else 1) * (grid[2] if len(grid) > 2 else 1)
    trips = loop_trips(launch, constexprs) if c.loop else 0
    straight = aot.by_class(c.sass) - aot.by_class(c.loop)
    loop = aot.by_class(c.loop)
    executed = {k: c.num_warps * (programs * straight[k] + trips * loop[k]) for k in straight.keys() | loop.keys()}
    nbytes = sum(a.numel() * a.element_size() for a in launch.args if hasattr(a, "element_size"))
    return dict(kernel=launch.name.strip("_"), grid=list(grid), warps=c.num_warps, regs=c.regs, trips=trips,
                loop=dict(loop), executed=executed, bytes=nbytes,
                tensor=bool(c.tensor_core), constexprs={k: str(v) for k, v in constexprs.items()})


# name -> (run on meta tensors, FLOPs, bytes of the op's own inputs and output: what any kernel must move, without
# the partials of a split; None: the launches' bytes). Mistral-7B / Llama-3-8B: 32/8 heads of 128, MLP 4096 <-> 14336.
def scenarios() -> dict:
    from gguf import GGMLQuantizationType

    from mistralrs.kernels.dequant import row_bytes
    out = {}
    for q in ("Q4_0", "Q8_0", "Q4_K", "Q5_K", "Q6_K"):
        for N, K in ((14336, 4096), (4096, 14336)):
            for M in (1, 8, 512):
                op_bytes = N * row_bytes(GGMLQuantizationType[q], K) + 2 * M * (K + N)
                out[f"gguf {q} M{M} N{N} K{K}"] = aot.gguf_matmul(q, M, N, K), 2 * M * N * K, op_bytes
    H, D, N, L = 32, 128, 4096, 512
    out["decode bf16 32/8 D128 BS16 B1 N4096"] = aot.attention(aot.BF16, H, 8, D, 16), 4 * H * N * D, None
    out["decode bf16 32/8 D128 BS16 B64 N4096"] = aot.attention(aot.BF16, H, 8, D, 16, B=64), 64 * 4 * H * N * D, None
    out["prefill bf16 32/8 D128 BS16 L512"] = aot.attention(aot.BF16, H, 8, D, 16, N=L, L=L), 2 * H * L * L * D, None
    for T in (1, 512):
        out[f"xlora A8 R16 T{T} K4096 N14336"] = aot.xlora(T, 4096, 14336), 2 * T * 128 * (4096 + 14336), None
    return out


def report(select: str) -> list[dict]:
    target = aot.TARGETS["sm90"]
    rows = []
    for name, (run, flops, op_bytes) in scenarios().items():
        if select not in name:
            continue
        with aot.capture(target.sms, target.capability) as launches:
            run()
        launches_ = [launch_cost(launch, target) for launch in launches]
        executed = sum((Counter(c["executed"]) for c in launches_), Counter())
        nbytes = sum(c["bytes"] for c in launches_)
        row = dict(scenario=name, launches=launches_, bytes=nbytes, flops=flops, executed=dict(executed),
                   hbm_us=nbytes / HBM_BYTES_S * 1e6, op_hbm_us=(op_bytes or nbytes) / HBM_BYTES_S * 1e6, issue_us=sum(executed.values()) / ISSUE_S * 1e6,
                   tensor_us=flops / TENSOR_FLOP_S * 1e6 if any(c["tensor"] for c in launches_) else None)
        rows.append(row)
        print(f"{name:<40} {row['hbm_us']:8.1f} {row['issue_us']:8.1f} {row['issue_us'] / row['hbm_us']:6.2f}",
              flush=True)
    return rows


def _main_loop(row: dict) -> str:
    """The heaviest launch's loop body per warp, by class."""
    main = max(row["launches"], key=lambda c: sum(c["executed"].values()))
    by = {col: sum(main["loop"].get(k, 0) for k in ks) for col, ks in COLUMNS.items()}
    return f"{main['kernel']} {sum(by.values())}: " + " ".join(f"{k} {v}" for k, v in by.items() if v)


def markdown(rows: list[dict], before: dict) -> str:
    lines = [
        "# Static cost model, sm_90a (H100/H200 SXM) — a model, not a measurement",
        "",
        "Written by `python tools/roofline.py` (see its docstring for the model). HBM floor = bytes / 3.35 TB/s "
        "(H100 SXM; an H200's 4.8 TB/s gives 0.70x of it). Issue floor = SASS warp-instructions executed / "
        "(4 per cycle per SM x 132 SMs x 1.98 GHz). Ratio = issue / HBM floor: above 1 the kernel cannot reach "
        "HBM bandwidth however well it is scheduled. Main loop = the heaviest launch's loop body, instructions "
        "per warp per iteration by class. Tensor floor = FLOPs / 989 TFLOP/s (launches using tensor cores). "
        "Op ratio = issue floor / the HBM floor of the op's own bytes (weights, x, out; no split-K partials, "
        "which the launches' ratio counts as traffic).",
        "",
        "| scenario | MB | HBM µs | op HBM µs | issue µs before | issue µs | ratio before | ratio | op ratio before "
        "| op ratio | tensor µs | main loop per warp |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        b = before.get(r["scenario"])
        tc = f"{r['tensor_us']:.1f}" if r["tensor_us"] is not None else ""
        b_issue = f"{b['issue_us']:.1f}" if b else ""
        b_ratio = f"{b['issue_us'] / b['hbm_us']:.2f}" if b else ""
        b_op = f"{b['issue_us'] / r['op_hbm_us']:.2f}" if b else ""
        lines.append(f"| {r['scenario']} | {r['bytes'] / 1e6:.1f} | {r['hbm_us']:.1f} | {r['op_hbm_us']:.1f} | "
                     f"{b_issue} | {r['issue_us']:.1f} | {b_ratio} | {r['issue_us'] / r['hbm_us']:.2f} | {b_op} | "
                     f"{r['issue_us'] / r['op_hbm_us']:.2f} | {tc} | {_main_loop(r)} |")
    lines += ["", "Executed warp-instructions (millions) by class, whole scenario:", "",
              "| scenario | " + " | ".join(COLUMNS) + " |", "|---|" + "---:|" * len(COLUMNS)]
    for r in rows:
        by = [sum(r["executed"].get(k, 0) for k in ks) / 1e6 for ks in COLUMNS.values()]
        lines.append(f"| {r['scenario']} | " + " | ".join(f"{v:.2f}" for v in by) + " |")
    lines += ["", "Limits of the model: it counts the SASS of every path (a predicated-off branch costs as much as a taken "
              "one), models each loop's trip count from the launch (`loop_trips`), and assumes full occupancy, no "
              "stalls and HBM traffic of exactly the arguments' bytes (no L2 reuse or misses). A ratio below 1 says "
              "the instruction stream is not the limit, not that the kernel reaches HBM bandwidth; only a GPU says "
              "that. For prefill (M = 512) the floor that matters is the tensor floor, not the HBM one."]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-k", dest="select", default="")
    ap.add_argument("--out", type=Path, default=aot.KERNELS_DIR.parent.parent / "benchmarks/results/static-sm90")
    a = ap.parse_args()
    if reason := aot.missing_backend():
        raise SystemExit(reason)
    rows = report(a.select)
    a.out.mkdir(parents=True, exist_ok=True)
    before_path = a.out / "before.json"
    before = {r["scenario"]: r for r in json.loads(before_path.read_text())["rows"]} if before_path.exists() else {}
    (a.out / "static.json").write_text(json.dumps({"triton": triton.__version__, "rows": rows}, indent=1))
    (a.out / "README.md").write_text(markdown(rows, before))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
