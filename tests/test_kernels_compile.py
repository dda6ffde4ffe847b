"""Every Triton kernel compiled ahead of time for H100/H200 (sm_90a) and A100 (sm_80) at the configs its launcher
picks for the benchmark shapes (tools/aot.py; no GPU, no driver): no spills, shared memory within the target's
limit, tensor cores where a tl.dot is meant to use them, and a bounded number of compiles while decoding.

tools/aot.py runs as a subprocess, one per target in parallel: it must not see TRITON_INTERPRET, which conftest.py
sets for the rest of the suite. Triton's disk cache (~/.triton/cache) makes reruns fast; a cold run compiles ~35
kernels per target (~1 min on 2 cores).
"""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("aot", ROOT / "tools" / "aot.py")
aot = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(aot)

MISSING = aot.missing_backend()
pytestmark = pytest.mark.skipif(MISSING is not None, reason=MISSING or "")

# The constexpr that is the M side of each kernel's tl.dot tile. sm_90a's wgmma needs M >= 64 per warpgroup of
# 4 warps; Triton emits it there (HGMMA) and mma.sync (HMMA) for smaller tiles and on sm_80.
DOT_TILE_M = {"_paged_attention_kernel": "BLOCK_M", "_decode_split_kernel": "G_PAD", "_gguf_matmul_kernel": "BLOCK_N",
              "_xlora_shrink_kernel": "BLOCK_T", "_xlora_mix_kernel": "BLOCK_T"}
# Compiles per kernel allowed over a trace. Decode from 1 to 8192 tokens: nothing in a decode launch depends on the
# context length (today: 1 each). A batch growing 1 -> 64: one per power-of-two bucket at most; the X-LoRA kernels
# take T at runtime, so one per tile config (decode T <= 16, prefill T <= 64).
DECODE_TRACE_MAX = 4
BATCH_TRACE_MAX = 7
XLORA_BATCH_TRACE_MAX = 2


def run_aot(tmp: Path, *extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    procs = {t: subprocess.Popen([sys.executable, str(ROOT / "tools" / "aot.py"), "--target", t,
                                  "--json", str(tmp / f"{t}.json"), *extra],
                                 env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for t in aot.TARGETS}
    out = {"rows": [], "decode_trace": {}, "batch_trace": {}}
    for t, p in procs.items():
        stdout, stderr = p.communicate()
        if not (tmp / f"{t}.json").exists():  # a row that fails to compile is reported; a crash is not
            pytest.fail(f"tools/aot.py --target {t} crashed (exit {p.returncode}):\n{stdout[-3000:]}\n{stderr[-3000:]}")
        result = json.loads((tmp / f"{t}.json").read_text())
        out["rows"] += result["rows"]
        out["decode_trace"].update(result["decode_trace"])
        out["batch_trace"].update(result["batch_trace"])
    return out


@pytest.fixture(scope="session")
def compiled(tmp_path_factory) -> dict:
    return run_aot(tmp_path_factory.mktemp("aot"))


def problems(row: dict) -> list[str]:
    """What is wrong with one compiled launch, in words; empty when nothing is."""
    where = f"{row['scenario']}: {row['kernel']} on {row['target']}"
    if "error" in row:
        return [f"{where} does not compile: {row['error']}"]
    out = []
    if row["spill_stores"] or row["spill_loads"] or row["local_bytes"]:
        out.append(f"{where} spills: {row['spill_stores']} STL, {row['spill_loads']} LDL, {row['local_bytes']} B "
                   f"local memory at {row['regs']} registers, {row['num_warps']} warps")
    if row["shared"] > row["max_smem"]:
        out.append(f"{where} needs {row['shared']} B of shared memory; the target allows {row['max_smem']}")
    tile = DOT_TILE_M.get(row["kernel"])
    if tile and row["constexprs"].get("PRECISION") != "ieee":
        m = int(row["constexprs"][tile])
        if row["target"] == "sm90" and m >= 64 and row["num_warps"] % 4 == 0:
            if not (row["hgmma"] and row["wgmma_ptx"]):
                out.append(f"{where}: {tile}={m} should use wgmma (HGMMA) but has {row['hgmma']} HGMMA, "
                           f"{row['hmma']} HMMA")
        elif not row["hmma"]:
            out.append(f"{where}: {tile}={m} should use mma.sync (HMMA) but has none")
    return out


@pytest.mark.parametrize("target", sorted(aot.TARGETS))
@pytest.mark.parametrize("scenario", list(aot.SCENARIOS))
def test_kernel_compiles_without_spills_within_smem_on_tensor_cores(compiled, scenario, target):
    rows = [r for r in compiled["rows"] if r["scenario"] == scenario and r["target"] == target]
    assert rows, f"{scenario} launched no kernel on {target}"
    found = [p for r in rows for p in problems(r)]
    assert not found, "\n".join(found)


def test_tensor_core_check_can_fail():
    """problems() flags a prefill tile that fell back to FMA, and a 64-row tile on sm_90a without wgmma."""
    row = dict(scenario="s", kernel="_paged_attention_kernel", target="sm80", spill_stores=0, spill_loads=0,
               local_bytes=0, regs=128, num_warps=4, shared=1024, max_smem=166912, hmma=0, hgmma=0, wgmma_ptx=0,
               constexprs={"BLOCK_M": "64", "PRECISION": "tf32"})
    assert problems(row) and not problems(dict(row, hmma=12))
    assert problems(dict(row, target="sm90", hmma=12)) and not problems(dict(row, target="sm90", hgmma=9, wgmma_ptx=9))
    assert problems(dict(row, hmma=12, spill_stores=2)) and problems(dict(row, hmma=12, shared=200000))


@pytest.mark.parametrize("target", sorted(aot.TARGETS))
@pytest.mark.parametrize("B", ["1", "8", "64"])
def test_decode_trace_compiles_each_kernel_a_bounded_number_of_times(compiled, target, B):
    per_kernel = compiled["decode_trace"][target][B]
    assert {"_store_kv_kernel", "_decode_split_kernel", "_decode_reduce_kernel"} <= set(per_kernel)
    over = {k: n for k, n in per_kernel.items() if n > DECODE_TRACE_MAX}
    assert not over, f"decoding context 1 -> 8192 at B={B} on {target} recompiles {over} (at most {DECODE_TRACE_MAX})"


@pytest.mark.parametrize("target", sorted(aot.TARGETS))
def test_batch_trace_compiles_at_most_one_variant_per_power_of_two(compiled, target):
    per_kernel = compiled["batch_trace"][target]
    over = {k: n for k, n in per_kernel.items() if n > BATCH_TRACE_MAX}
    assert not over, f"a decode batch growing 1 -> 64 on {target} compiles {over} (at most {BATCH_TRACE_MAX} each)"
    xlora = {k: n for k, n in per_kernel.items() if k.startswith("_xlora")}
    assert {"_xlora_shrink_kernel", "_xlora_mix_kernel"} <= set(xlora)
    over = {k: n for k, n in xlora.items() if n > XLORA_BATCH_TRACE_MAX}
    assert not over, f"X-LoRA over a batch 1 -> 64 on {target} compiles {over} (at most {XLORA_BATCH_TRACE_MAX} each)"


@pytest.mark.slow
def test_sweep_compiles_without_spills_within_smem_on_tensor_cores(tmp_path):
    """Every dtype x head layout x head dim x block size of attention, every GGUF type at every M bucket, X-LoRA."""
    found = [p for r in run_aot(tmp_path, "--sweep", "--no-trace")["rows"] for p in problems(r)]
    assert not found, f"{len(found)} problems:\n" + "\n".join(found)


@pytest.mark.parametrize("target", sorted(aot.TARGETS))
def test_launchers_see_the_target_sm_count(compiled, target):
    """The split heuristics ran for the target's SMs (132 / 108), not the meta device's fallback."""
    (row,) = [r for r in compiled["rows"] if r["target"] == target and r["kernel"] == "_decode_split_kernel"
              and r["scenario"] == "decode bfloat16 32/8 D128 BS16 B1 N4096"]
    pa = aot.kernel_module("attention")
    splits, _ = pa.decode_splits(1, 8, 4096 // pa.decode_block_n(128), aot.TARGETS[target].sms)
    assert row["grid"] == [1, 8, splits] and splits > 8
