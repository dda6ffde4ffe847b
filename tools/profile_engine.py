"""Profile the engine serving N concurrent requests: a Chrome trace, a per-kernel table and a per-phase breakdown.

    python tools/profile_engine.py                                   # the built-in demo model
    python tools/profile_engine.py --model-id mistralai/Mistral-7B-Instruct-v0.2 --arch mistral --requests 16
    python tools/profile_engine.py --gguf SmolLM2-135M-Instruct.Q4_1.gguf --requests 1 --threads 2
    python tools/profile_engine.py --trace /tmp/trace.json           # open in chrome://tracing or ui.perfetto.dev

Phases are the engine's record_function ranges: mistralrs.schedule, .forward, .sample, .detokenize. The ops are
also summed by kind: matmul (matrix products), attention (the attention ops and kernels) and glue (everything
else: norms, rotary, KV-cache writes, activations, copies).
"""
import argparse
import re
import threading
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity

import mistralrs
from mistralrs.cli import ARCHS, DEMO_MODEL

PHASES = ("mistralrs.schedule", "mistralrs.forward", "mistralrs.sample", "mistralrs.detokenize")
MATMUL_OPS = {"aten::mm", "aten::addmm", "aten::mv", "aten::addmv", "aten::dot"}
# Batched products and softmax occur only in attention here: SDPA's math path on CPU (GQA, masks) runs as them, and
# self time lands on these leaves, not on the scaled_dot_product_attention op.
ATTENTION_OPS = {"aten::bmm", "aten::baddbmm", "aten::_softmax", "aten::einsum"}


def kind(op: str) -> str:
    name = op.lower()
    if op in MATMUL_OPS or re.search(r"gemm|gemv|matmul|quant_matmul|::linear", name):
        return "matmul"
    return "attention" if op in ATTENTION_OPS or "attention" in name or "flash" in name else "glue"


def serve(runner, n: int, max_tokens: int) -> int:
    done = [0] * n

    def one(i):
        import json
        r = runner.send_completion_request(mistralrs.CompletionRequest(
            f"Request {i}: the import statement", "profile", max_tokens=max_tokens, temperature=0))
        done[i] = json.loads(r)["usage"]["completion_tokens"]
    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(done)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-id", default=str(DEMO_MODEL))
    ap.add_argument("--arch", choices=ARCHS, default="llama")
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-seqs", type=int, default=16)
    ap.add_argument("--gguf", type=Path, help="a GGUF file to profile instead of --model-id (QuantizedLoader)")
    ap.add_argument("--threads", type=int, help="the engine's CPU threads (default: one per physical core)")
    ap.add_argument("--trace", type=Path, default=Path("mistralrs-trace.json"))
    ap.add_argument("--rows", type=int, default=15)
    a = ap.parse_args()

    loader = (mistralrs.QuantizedLoader(ARCHS[a.arch], model_id=None, is_gguf=True, quantized_model_id="",
                                        quantized_filename=str(a.gguf)) if a.gguf
              else mistralrs.NormalLoader(ARCHS[a.arch], model_id=a.model_id))
    runner = loader.load(max_seqs=a.max_seqs, threads=a.threads)
    serve(runner, 1, 4)  # warm up: first-call allocations and, on GPU, Triton compilation
    cuda = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    start = time.perf_counter()
    with runner.profiler(activities=activities) as prof:
        tokens = serve(runner, a.requests, a.max_tokens)
    elapsed = time.perf_counter() - start
    runner.close()
    prof.export_chrome_trace(str(a.trace))

    events = prof.key_averages()
    time_of = (lambda e: e.self_device_time_total) if cuda else (lambda e: e.self_cpu_time_total)
    kernels = sorted((e for e in events if not e.key.startswith("mistralrs.")), key=time_of, reverse=True)
    total = sum(time_of(e) for e in kernels) or 1
    print(f"{a.requests} requests, {tokens} tokens in {elapsed:.2f} s ({tokens / elapsed:.1f} tok/s); "
          f"trace: {a.trace}\n")
    print(f"{'op / kernel (self ' + ('GPU' if cuda else 'CPU') + ' time)':60} {'calls':>7} {'ms':>9} {'%':>6}")
    for e in kernels[: a.rows]:
        print(f"{e.key[:60]:60} {e.count:7d} {time_of(e) / 1e3:9.2f} {100 * time_of(e) / total:6.1f}")
    kinds = {"matmul": 0.0, "attention": 0.0, "glue": 0.0}
    for e in kernels:
        kinds[kind(e.key)] += time_of(e)
    print(f"\n{'kind':36} {'ms':>9} {'%':>6} {'ms/token':>9}")
    for name, t in kinds.items():
        print(f"{name:36} {t / 1e3:9.2f} {100 * t / total:6.1f} {t / 1e3 / max(tokens, 1):9.3f}")
    phases = {e.key: e.cpu_time_total for e in events if e.key in PHASES}
    step_total = sum(phases.values()) or 1
    print("\nphase (engine thread, wall time)        ms       %")
    for name in PHASES:
        t = phases.get(name, 0)
        print(f"{name:36} {t / 1e3:9.2f} {100 * t / step_total:6.1f}")


if __name__ == "__main__":
    main()
