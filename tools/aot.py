"""Ahead-of-time compile of our Triton kernels for NVIDIA GPUs, on a machine with no GPU and no driver.

    python tools/aot.py [--target sm90|sm80] [--sweep] [-k SUBSTRING] [--json OUT]
        compiles every kernel at the configs its launcher picks for the benchmark shapes (SCENARIOS; --sweep: all of
        SWEEP too) and prints registers, spills, shared memory, tensor-core and main-loop SASS counts per kernel,
        then the compiles a decode trace triggers (context 1 -> 8192 tokens at B = 1, 8, 64).

As a library:

    with aot.capture(sms=132, capability=90) as launches:   # the real launcher, on meta tensors: nothing runs
        kernels = aot.kernel_module("attention")
        kernels.paged_decode_attention(q, k_cache, ...)
    for launch in launches:
        key = aot.specialization_key(launch)          # what Triton's JIT cache keys the compile on
        info = aot.compile_launch(launch, aot.TARGETS["sm90"])   # registers, spills, smem, SASS by class

How: kernel_module() imports a private copy of mistralrs/kernels/<name>.py (and of the helper files it imports)
with TRITON_INTERPRET off, so its kernels are real JITFunctions even inside a test session that interprets.
capture() swaps JITFunction.run for a recorder and makes the launchers see the target's SM count (their split
heuristics read it) and compute capability (tile choices may depend on it). A recorded launch is bound and specialized
by Triton's own binder (pointer alignment, ints equal to 1 or divisible by 16, unless the kernel marks them
do_not_specialize), then triton.compile(ASTSource, GPUTarget("cuda", cap, 32)) runs
TTIR -> TTGIR -> LLVM -> PTX -> cubin with the ptxas the Triton wheel ships. The cubin is read back with the wheel's
cuobjdump: -res-usage for registers and local memory, -sass for the instructions.
Timings, numerics and anything data-dependent still need a GPU.

Run it in a process without TRITON_INTERPRET: when the interpreter is on at import, triton.language's own @jit helpers
(tl.cdiv, tl.sigmoid, ...) are interpreted functions and cannot be compiled. tests/test_kernels_compile.py runs this
file as a subprocess for that reason.
"""
import importlib.util
import os
import re
import subprocess
import sys
import tempfile
import types
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import triton

KERNELS_DIR = Path(__file__).resolve().parent.parent / "mistralrs" / "kernels"
KERNEL_MODULES = ("attention", "gguf", "xlora")  # the files under KERNELS_DIR with kernels and launchers
JIT_HELPER_MODULES = ("gguf_blocks",)  # files of @triton.jit helpers only, imported by those above


@dataclass(frozen=True)
class Target:
    name: str
    capability: int
    sms: int  # what the launchers' split heuristics are told
    max_smem: int  # bytes of shared memory one block may use (opt-in maximum)


TARGETS = {
    "sm90": Target("sm90", 90, 132, 227 * 1024),  # H100 / H200 SXM (sm_90a)
    "sm80": Target("sm80", 80, 108, 163 * 1024),  # A100
}


def missing_backend() -> str | None:
    """Why kernels cannot be compiled for NVIDIA here, or None when they can."""
    try:
        from triton.backends import backends
        from triton.backends.nvidia import compiler as nvc
    except ImportError as e:
        return f"this Triton wheel ({triton.__version__}) has no NVIDIA backend: {e}"
    if "nvidia" not in backends:
        return f"this Triton wheel ({triton.__version__}) has no NVIDIA backend (backends: {sorted(backends)})"
    for tool in ("ptxas", "cuobjdump"):
        if not (Path(nvc.__file__).parent / "bin" / tool).is_file():
            return f"this Triton wheel ({triton.__version__}) does not ship {tool}"
    return None


def tool(name: str) -> str:
    """Path of a CUDA binary the Triton wheel ships (ptxas, cuobjdump, nvdisasm)."""
    return getattr(triton.knobs.nvidia, name.replace("-", "_")).path


# ----------------------------------------------------------------------------------------------- capture launches
_MODULES: dict[str, types.ModuleType] = {}


def _exec_private(name: str) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(f"mistralrs.kernels._aot_{name}", KERNELS_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def kernel_module(name: str) -> types.ModuleType:
    """A private copy of mistralrs.kernels.<name> whose @triton.jit kernels are JITFunctions, interpreter or not.
    Its relative imports of JIT_HELPER_MODULES get private copies too: the session's own may be interpreted
    functions (which do not compile), and the session must not get JITFunctions (which do not interpret)."""
    if name not in _MODULES:
        real = {h: sys.modules.get(f"mistralrs.kernels.{h}") for h in JIT_HELPER_MODULES}
        with triton.knobs.runtime.scope():
            triton.knobs.runtime.interpret = False
            try:
                for h in JIT_HELPER_MODULES:
                    sys.modules[f"mistralrs.kernels.{h}"] = _exec_private(h)
                _MODULES[name] = _exec_private(name)
            finally:
                for h, module in real.items():
                    sys.modules.pop(f"mistralrs.kernels.{h}", None)
                    if module is not None:
                        sys.modules[f"mistralrs.kernels.{h}"] = module
    return _MODULES[name]


@dataclass
class Launch:
    fn: triton.runtime.JITFunction
    args: tuple
    kwargs: dict
    grid: tuple

    @property
    def name(self) -> str:
        return self.fn.__name__


@contextmanager
def capture(sms: int, capability: int = 90):
    """Record every kernel launch instead of running it; the launchers see a GPU with `sms` SMs and compute
    capability `capability` (90: sm_90a)."""
    launches: list[Launch] = []

    def record(self, *args, grid, warmup, **kwargs):
        launches.append(Launch(self, args, kwargs, tuple(grid)))

    for name in KERNEL_MODULES:  # loaded first, so that every launcher below sees `sms`
        kernel_module(name)
    fake_cuda = types.SimpleNamespace(type="cuda")
    saved = [(triton.runtime.JITFunction, "run", triton.runtime.JITFunction.run),
             (torch.cuda, "get_device_properties", torch.cuda.get_device_properties)]
    triton.runtime.JITFunction.run = record
    torch.cuda.get_device_properties = lambda device=None: types.SimpleNamespace(multi_processor_count=sms)
    for module in _MODULES.values():
        if hasattr(module, "_sm_count"):
            saved.append((module, "_sm_count", module._sm_count))
            module._sm_count = lambda device: sms
        if hasattr(module, "_capability"):
            saved.append((module, "_capability", module._capability))
            module._capability = lambda device: divmod(capability, 10)
        elif hasattr(module, "_num_splits"):  # _num_splits(..., device) reads the SM count of a CUDA device
            orig = module._num_splits
            saved.append((module, "_num_splits", orig))
            module._num_splits = lambda *a, _orig=orig: _orig(*a[:-1], fake_cuda)
    try:
        yield launches
    finally:
        for owner, attr, value in reversed(saved):
            setattr(owner, attr, value)


_BINDERS: dict = {}


def _bind(launch: Launch, target: Target):
    """Triton's own argument binder: (backend, bound args, specialization, options) as JITFunction.run sees them."""
    if (launch.fn, target) not in _BINDERS:
        from triton.backends.compiler import GPUTarget
        from triton.backends.nvidia.compiler import CUDABackend
        backend = CUDABackend(GPUTarget("cuda", target.capability, 32))
        binder = triton.runtime.jit.create_function_from_signature(launch.fn.signature, launch.fn.params, backend)
        _BINDERS[launch.fn, target] = backend, binder
    backend, binder = _BINDERS[launch.fn, target]
    bound, spec, options = binder(*launch.args, **dict(launch.kwargs, debug=False))
    return backend, bound, spec, options


def specialization_key(launch: Launch, target: Target = TARGETS["sm90"]) -> tuple:
    """What the JIT's kernel cache is keyed on (JITFunction.run: specialization + options): two launches with the same
    key share one compile, a new key is a new compile."""
    _, _, spec, options = _bind(launch, target)
    return launch.name, repr(spec), repr(sorted(options.items()))


# ------------------------------------------------------------------------------------------------ compile, inspect
@dataclass
class Compiled:
    kernel: str
    target: str
    constexprs: dict
    num_warps: int
    num_stages: int
    regs: int
    local_bytes: int  # per-thread local memory (spills, stack arrays)
    spill_stores: int  # STL instructions in the SASS
    spill_loads: int  # LDL instructions
    shared: int  # bytes of shared memory the launch requests
    wgmma_ptx: int  # wgmma.mma_async in the PTX
    sass: Counter = field(repr=False)  # opcode class -> count, whole kernel
    loop: Counter = field(repr=False)  # opcode class -> count, the largest loop's body (one iteration, per warp)
    ptx: str = field(repr=False, default="")

    @property
    def tensor_core(self) -> dict:
        return {op: n for op, n in self.sass.items() if op in ("HMMA", "HGMMA")}


_COMPILED: dict[tuple, Compiled] = {}


def compile_launch(launch: Launch, target: Target) -> Compiled:
    """Compile a recorded launch exactly as JITFunction.run would before launching it; cached per session."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    backend, bound, spec, options = _bind(launch, target)
    options, signature, constexprs, attrs = launch.fn._pack_args(backend, dict(launch.kwargs, debug=False), bound,
                                                                  spec, options)
    key = (launch.name, target.name, repr(spec), options.hash())
    if key not in _COMPILED:
        compiled = triton.compile(ASTSource(launch.fn, signature, constexprs, attrs),
                                  target=GPUTarget("cuda", target.capability, 32), options=options.__dict__)
        shown = {launch.fn.arg_names[path[0]]: value for path, value in constexprs.items() if value is not None}
        _COMPILED[key] = inspect_compiled(compiled, launch.name, target, shown)
    return _COMPILED[key]


def inspect_compiled(compiled, name: str, target: Target, constexprs: dict) -> Compiled:
    with tempfile.TemporaryDirectory() as d:
        cubin = os.path.join(d, "kernel.cubin")
        Path(cubin).write_bytes(compiled.asm["cubin"])
        usage = subprocess.run([tool("cuobjdump"), "-res-usage", cubin], capture_output=True, text=True,
                               check=True).stdout
        sass = subprocess.run([tool("cuobjdump"), "-sass", cubin], capture_output=True, text=True, check=True).stdout
    regs = int(re.search(r"REG:(\d+)", usage).group(1))
    local = int(re.search(r"LOCAL:(\d+)", usage).group(1))
    ops = sass_opcodes(sass)
    md = compiled.metadata
    return Compiled(kernel=name, target=target.name, constexprs=constexprs, num_warps=md.num_warps,
                    num_stages=md.num_stages, regs=regs, local_bytes=local,
                    spill_stores=sum(op == "STL" for _, op, _ in ops), spill_loads=sum(op == "LDL" for _, op, _ in ops),
                    shared=md.shared, wgmma_ptx=len(re.findall(r"\bwgmma\.mma_async", compiled.asm["ptx"])),
                    sass=Counter(op for _, op, _ in ops), loop=Counter(op for _, op, _ in largest_loop(ops)),
                    ptx=compiled.asm["ptx"])


# ----------------------------------------------------------------------------------------------------------- SASS
def sass_opcodes(sass: str) -> list[tuple[int, str, str]]:
    """(address, opcode without modifiers, full instruction) for each SASS instruction, predicates dropped."""
    out = []
    for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass):
        text = re.sub(r"^@!?U?P\w+\s+", "", m.group(2).strip())
        out.append((int(m.group(1), 16), text.split()[0].split(".")[0], text))
    return out


def largest_loop(ops: list[tuple[int, str, str]]) -> list[tuple[int, str, str]]:
    """The instructions of the longest span a backward branch closes: the kernel's main loop body (an inner loop
    counts once). Empty for a kernel without a loop."""
    best: list = []
    for addr, op, text in ops:
        m = re.search(r"0x([0-9a-f]+)", text) if op == "BRA" else None
        if m and int(m.group(1), 16) < addr:
            body = [o for o in ops if int(m.group(1), 16) <= o[0] <= addr]
            best = body if len(body) > len(best) else best
    return best


# Opcode -> class, for issue-slot accounting. Uniform-datapath ops (U*) issue like the others but do per-warp work.
SASS_CLASSES = {
    "tensor": {"HMMA", "HGMMA", "IMMA", "IGMMA", "BMMA", "QGMMA", "WARPGROUP"},
    "fp32": {"FADD", "FMUL", "FFMA", "FMNMX", "FSETP", "FSET", "FSEL", "FCHK", "FRND", "MUFU", "FSWZADD"},
    "fp16x2": {"HADD2", "HMUL2", "HFMA2", "HMNMX2", "HSETP2", "HSET2"},
    "int": {"IMAD", "IADD3", "IADD", "LOP3", "LOP", "SHF", "SHL", "SHR", "ISETP", "LEA", "IMNMX", "VIMNMX", "IABS",
            "SEL", "PRMT", "POPC", "FLO", "BMSK", "SGXT", "BREV", "IDP", "IMUL", "VIADD", "IADD32I", "LOP32I"},
    "convert": {"F2F", "F2I", "I2F", "I2FP", "F2FP", "I2I", "F2IP"},
    "shuffle": {"SHFL"},
    "global_load": {"LDG", "LDGSTS", "LDGDEPBAR", "UTMALDG", "LD"},
    "global_store": {"STG", "RED", "ATOM", "ATOMG", "UTMASTG", "ST"},
    "shared": {"LDS", "STS", "LDSM", "STSM", "ATOMS"},
    "local": {"LDL", "STL"},
    "move": {"MOV", "MOV32I", "S2R", "CS2R", "S2UR", "R2UR", "LDC", "R2P", "P2R", "PLOP3", "VOTE", "VOTEU"},
    "control": {"BRA", "EXIT", "BAR", "BSSY", "BSYNC", "WARPSYNC", "NOP", "DEPBAR", "YIELD", "CALL", "RET", "ELECT",
                "SYNCS", "MEMBAR", "FENCE", "CCTL", "ERRBAR", "ARRIVES", "BPT", "KILL"},
}
_CLASS_OF = {op: cls for cls, ops in SASS_CLASSES.items() for op in ops}


def sass_class(op: str) -> str:
    if op in _CLASS_OF:
        return _CLASS_OF[op]
    return "uniform" if op.startswith("U") else "other"


def by_class(opcodes: Counter) -> Counter:
    out = Counter()
    for op, n in opcodes.items():
        out[sass_class(op)] += n
    return out


# ------------------------------------------------------------------------------------ benchmark shapes, traces
META = torch.device("meta")
BF16, FP16 = torch.bfloat16, torch.float16


def _t(*shape, dtype=torch.int32):
    return torch.empty(*shape, dtype=dtype, device=META)


def attention(dtype, H, KVH, D, BS, *, B=1, N=4096, L=None, window=None, softcap=None):
    """paged_decode_attention (L None) or paged_attention (prefill of L tokens) on meta tensors."""
    def run():
        pa = kernel_module("attention")
        pages = triton.cdiv(N, BS)
        k_cache = _t(B * pages, BS, KVH, D, dtype=dtype)
        tables, lens, cu = _t(B, pages), _t(B), _t(B + 1)
        if L is None:
            pa.paged_decode_attention(_t(B, H, D, dtype=dtype), k_cache, k_cache, tables, lens, cu, D ** -0.5,
                                      window, softcap)
        else:
            pa.paged_attention(_t(L, H, D, dtype=dtype), k_cache, k_cache, tables, lens, cu, D ** -0.5, window,
                               softcap, max_seqlen_q=L)
    return run


def store_kv(dtype, KVH, D, BS, T):
    def run():
        pa = kernel_module("attention")
        k, k_cache = _t(T, KVH, D, dtype=dtype), _t(4096, BS, KVH, D, dtype=dtype)
        pa.store_kv(k, k, k_cache, k_cache, _t(T, dtype=torch.int64))
    return run


def gguf_matmul(qtype: str, M, N, K, dtype=BF16):
    def run():
        from gguf import GGMLQuantizationType
        qm = kernel_module("gguf")
        q = GGMLQuantizationType[qtype]
        qm.gguf_matmul(_t(M, K, dtype=dtype), _t(N, qm.row_bytes(q, K), dtype=torch.uint8), q, N, K)
    return run


def xlora(T, K, N, A=8, R=16, dtype=BF16):
    def run():
        xm = kernel_module("xlora")
        xm.xlora_mix(_t(T, K, dtype=dtype), _t(A, R, K, dtype=dtype), _t(A, N, R, dtype=dtype), _t(T, A, dtype=dtype),
                     _t(A, dtype=dtype))
    return run


def _attention_set(dtypes, heads, dims, block_sizes) -> dict:
    out = {}
    for dt in dtypes:
        for H, KVH in heads:
            for D in dims:
                for BS in block_sizes:
                    tag = f"{str(dt)[6:]} {H}/{KVH} D{D} BS{BS}"
                    cap = dict(window=4096, softcap=50.0) if D == 256 else {}  # Gemma-2's head dim, cap and window
                    out[f"decode {tag} B1 N4096"] = attention(dt, H, KVH, D, BS, **cap)
                    out[f"prefill {tag} L512"] = attention(dt, H, KVH, D, BS, N=512, L=512, **cap)
    return out


# Mistral-7B and Llama-3-8B share 32 query / 8 KV heads of 128 and 4096 -> 14336 MLPs.
SCENARIOS = {
    **_attention_set([BF16], [(32, 8)], [128], [16]),
    "decode bfloat16 32/8 D128 BS16 B64 N4096": attention(BF16, 32, 8, 128, 16, B=64),
    "prefill bfloat16 32/8 D128 BS16 L16": attention(BF16, 32, 8, 128, 16, N=16, L=16),
    **_attention_set([BF16], [(32, 8)], [64, 256], [16]),
    **_attention_set([BF16], [(32, 8)], [128], [32]),
    **_attention_set([FP16], [(32, 8)], [128], [16]),
    "store_kv bfloat16 KVH8 D128 T64": store_kv(BF16, 8, 128, 16, 64),
    **{f"gguf {q} M{M} N14336 K4096": gguf_matmul(q, M, 14336, 4096)
       for q in ("Q4_0", "Q8_0", "Q4_K", "Q5_K", "Q6_K") for M in (1, 512)},
    "gguf Q4_0 M8 N14336 K4096": gguf_matmul("Q4_0", 8, 14336, 4096),
    "gguf Q4_0 M1 N4096 K4096": gguf_matmul("Q4_0", 1, 4096, 4096),  # split-K: partials + reduce
    "gguf Q4_0 M64 N14336 K4096": gguf_matmul("Q4_0", 64, 14336, 4096),
    "gguf Q4_K float16 M512 N14336 K4096": gguf_matmul("Q4_K", 512, 14336, 4096, FP16),
    "xlora A8 R16 T1 K4096 N14336": xlora(1, 4096, 14336),
    "xlora A8 R16 T512 K4096 N14336": xlora(512, 4096, 14336),
}
# The exhaustive sweep (slow): every dtype x head layout x head dim x block size, every GGUF type and M bucket.
SWEEP = {
    **_attention_set([BF16, FP16], [(32, 8), (32, 32)], [64, 128, 256], [16, 32]),
    **{f"gguf {q} {str(dt)[6:]} M{M} N{N} K{K}": gguf_matmul(q, M, N, K, dt)
       for q in ("Q4_0", "Q8_0", "Q4_K", "Q5_K", "Q6_K") for dt in (BF16, FP16)
       for M in (1, 2, 4, 8, 16, 64, 256, 512) for N, K in ((14336, 4096), (4096, 14336))},
    **{f"xlora A{A} R16 {str(dt)[6:]} T{T} K4096 N{N}": xlora(T, 4096, N, A=A, dtype=dt)
       for A in (8, 9) for dt in (BF16, FP16) for T in (1, 8, 64, 512) for N in (4096, 14336)},
}


def decode_trace(B: int, sms: int, capability: int = 90, *, H=32, KVH=8, D=128, BS=16, max_context=8192,
                 dtype=BF16) -> dict[str, int]:
    """Distinct compiles (specialization keys per kernel) of B sequences decoding together from 1 to max_context
    tokens: every step stores B new tokens and attends over block tables one page wider every BS tokens (the only
    launch argument the context changes; the cache pool is allocated once)."""
    pa = kernel_module("attention")
    k_cache = _t(B * triton.cdiv(max_context, BS), BS, KVH, D, dtype=dtype)
    keys: dict[str, set] = {}
    for width in range(1, triton.cdiv(max_context, BS) + 1):
        with capture(sms, capability) as launches:
            k = _t(B, KVH, D, dtype=dtype)
            pa.store_kv(k, k, k_cache, k_cache, _t(B, dtype=torch.int64))
            pa.paged_decode_attention(_t(B, H, D, dtype=dtype), k_cache, k_cache, _t(B, width), _t(B), _t(B + 1),
                                      D ** -0.5)
        for launch in launches:
            keys.setdefault(launch.name, set()).add(specialization_key(launch))
    return {name: len(k) for name, k in keys.items()}


def batch_trace(sms: int, capability: int = 90, max_batch: int = 64) -> dict[str, int]:
    """Distinct compiles as the decode batch changes size (continuous batching): 1..max_batch sequences of 1000
    tokens through attention, the GGUF matmul (M = batch) and the X-LoRA mix (T = batch)."""
    keys: dict[str, set] = {}
    for B in range(1, max_batch + 1):
        with capture(sms, capability) as launches:
            attention(BF16, 32, 8, 128, 16, B=B, N=1000)()
            gguf_matmul("Q4_0", B, 14336, 4096)()
            xlora(B, 4096, 14336)()
        for launch in launches:
            keys.setdefault(launch.name, set()).add(specialization_key(launch))
    return {name: len(k) for name, k in keys.items()}


def compile_scenarios(scenarios: dict, target: Target) -> list[dict]:
    """One row per launch: the scenario, kernel, grid, and what the compile gave (or the error)."""
    rows = []
    for name, run in scenarios.items():
        with capture(target.sms, target.capability) as launches:
            run()
        for launch in launches:
            row = dict(scenario=name, kernel=launch.name, target=target.name, grid=list(launch.grid))
            try:
                c = compile_launch(launch, target)
            except Exception as e:  # a kernel that does not compile is a result to report, not a crash
                row["error"] = f"{type(e).__name__}: {str(e).strip()[-600:]}"
            else:
                row.update(constexprs={k: str(v) for k, v in c.constexprs.items()}, num_warps=c.num_warps,
                           num_stages=c.num_stages, regs=c.regs, local_bytes=c.local_bytes,
                           spill_stores=c.spill_stores, spill_loads=c.spill_loads, shared=c.shared,
                           max_smem=target.max_smem, wgmma_ptx=c.wgmma_ptx, hmma=c.sass["HMMA"],
                           hgmma=c.sass["HGMMA"], sass=dict(by_class(c.sass)), loop=dict(by_class(c.loop)),
                           loop_opcodes=dict(c.loop))
            rows.append(row)
    return rows


def _table(rows: list[dict]) -> str:
    head = (f"{'scenario':<42} {'kernel':<24} {'tgt':<4} {'w':>2} {'st':>2} {'regs':>4} {'spill':>5} {'smem':>6} "
            f"{'HMMA':>4} {'HGMMA':>5} {'loop':>5}  loop by class")
    lines = [head, "-" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['scenario']:<42} {r['kernel'].strip('_'):<24} {r['target']:<4} ERROR {r['error'][-200:]}")
            continue
        loop = sum(r["loop"].values())
        by = " ".join(f"{k}={v}" for k, v in sorted(r["loop"].items(), key=lambda kv: -kv[1]))
        lines.append(f"{r['scenario']:<42} {r['kernel'].strip('_'):<24} {r['target']:<4} {r['num_warps']:>2} "
                     f"{r['num_stages']:>2} {r['regs']:>4} {r['spill_stores'] + r['spill_loads']:>5} "
                     f"{r['shared']:>6} {r['hmma']:>4} {r['hgmma']:>5} {loop:>5}  {by}")
    return "\n".join(lines)


def main() -> int:
    import argparse
    import json
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", choices=sorted(TARGETS), action="append", help="default: all")
    ap.add_argument("--sweep", action="store_true", help="also the exhaustive SWEEP")
    ap.add_argument("-k", dest="select", default="", help="only scenarios whose name contains this")
    ap.add_argument("--no-trace", action="store_true", help="skip the decode and batch traces")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("run tools/aot.py without TRITON_INTERPRET (see its docstring)")
    if reason := missing_backend():
        raise SystemExit(reason)
    scenarios = {**SCENARIOS, **(SWEEP if a.sweep else {})}
    scenarios = {n: s for n, s in scenarios.items() if a.select in n}
    out = {"triton": triton.__version__, "rows": [], "decode_trace": {}, "batch_trace": {}}
    for name in a.target or sorted(TARGETS):
        target = TARGETS[name]
        rows = compile_scenarios(scenarios, target)
        out["rows"] += rows
        print(_table(rows), flush=True)
        if not a.no_trace:
            out["decode_trace"][name] = {B: decode_trace(B, target.sms, target.capability) for B in (1, 8, 64)}
            out["batch_trace"][name] = batch_trace(target.sms, target.capability)
            for B, per in out["decode_trace"][name].items():
                print(f"{name} decode trace, context 1 -> 8192, B={B}: {sum(per.values())} compiles {per}")
            print(f"{name} batch trace, B 1 -> 64: {out['batch_trace'][name]}", flush=True)
    if a.json:
        a.json.write_text(json.dumps(out, indent=1))
    return 1 if any("error" in r for r in out["rows"]) else 0


if __name__ == "__main__":
    raise SystemExit(main())
