"""End-to-end decode on a Mistral-7B-shaped model with random weights (nothing downloaded): a prefill, then greedy
decode steps through ModelRunner, the engine's own forward (paged KV cache; Triton kernels on CUDA, the torch
reference on CPU), in bf16 and with every linear as Q4_0 blocks (random nibbles, one fp16 scale per 32 weights).

    python tools/random_model_decode.py [--json OUT] [--tiny] [--batches 1 16] [--steps 64]

A decode step reads every weight once, so weight bytes / step time is the bandwidth the step achieves; the
first step of each batch size is reported apart (it includes Triton's compiles). --tiny: a 2-layer model of
hidden size 64, for a dry run on CPU. The tokens are meaningless; the logits must be finite.
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script: this checkout's package, not an installed copy

import torch  # noqa: E402
from gguf import GGMLQuantizationType  # noqa: E402
from torch import nn  # noqa: E402

from mistralrs.engine.block_manager import BlockManager  # noqa: E402
from mistralrs.engine.model_runner import ModelRunner  # noqa: E402
from mistralrs.engine.scheduler import Scheduler  # noqa: E402
from mistralrs.engine.sequence import Sequence  # noqa: E402
from mistralrs.linears import QuantLinear  # noqa: E402
from mistralrs.models import mistral  # noqa: E402

Q4_0 = GGMLQuantizationType.Q4_0
MISTRAL_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=32768,
                  norm_eps=1e-5, rope_theta=1e6)
TINY = dict(MISTRAL_7B, vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16)
BLOCK_SIZE = 16


def random_model(shape: dict, dtype: torch.dtype, quant: str | None, device: torch.device) -> nn.Module:
    """Normal(0, 0.02) weights, unit norms; quant="q4_0" swaps every Linear for QuantLinear with random blocks whose
    weights have about the same spread (d = 0.02 / 4.6, the std of q - 8 for uniform nibbles q)."""
    with torch.device("meta"):
        model = mistral.build(mistral.Args(**shape)).to(dtype)
    if quant == "q4_0":
        for name, mod in list(model.named_modules()):
            if isinstance(mod, nn.Linear):
                model.set_submodule(name, QuantLinear.like(mod, Q4_0))
    elif quant is not None:
        raise ValueError(f"quant={quant!r}; allowed: None, 'q4_0'")
    model = model.to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=g)
        for mod in model.modules():
            if isinstance(mod, QuantLinear):
                blocks = mod.qweight.view(mod.out_features, -1, 18)  # [N, K / 32, 18]: fp16 d, 16 bytes of nibbles
                blocks[..., 2:] = torch.randint(0, 256, blocks[..., 2:].shape, dtype=torch.uint8, device=device,
                                                generator=g)
                d = torch.full(blocks.shape[:2], 0.02 / 4.6, dtype=torch.float16, device=device)
                blocks[..., :2] = d.view(torch.uint8).view(*blocks.shape[:2], 2)
    return model.eval()


def weight_bytes(model: nn.Module) -> int:
    """Bytes a decode step reads: every linear's weight (the embedding is a gather of B rows, not counted)."""
    total = 0
    for mod in model.modules():
        if isinstance(mod, QuantLinear):
            total += mod.qweight.numel()
        elif isinstance(mod, nn.Linear):
            total += mod.weight.numel() * mod.weight.element_size()
    return total


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def decode(model, shape: dict, dtype, device, B: int, prompt: int, steps: int) -> dict:
    """Prefill B random prompts, then `steps` greedy decode steps of the whole batch; timings in seconds."""
    tokens_per_seq = prompt + steps + 1
    num_blocks = B * -(-tokens_per_seq // BLOCK_SIZE)
    kv_shape = (num_blocks, BLOCK_SIZE, shape["num_key_value_heads"], shape["head_dim"])  # [NB, BS, KVH, D]
    kv_caches = [(torch.zeros(kv_shape, dtype=dtype, device=device), torch.zeros(kv_shape, dtype=dtype, device=device))
                 for _ in range(shape["num_hidden_layers"])]
    runner = ModelRunner(model, kv_caches, device)
    # The engine's own scheduler allocates the blocks; its prefill budget admits the whole batch in one step.
    scheduler = Scheduler(BlockManager(num_blocks, BLOCK_SIZE, prefix_caching=False), max_seqs=B,
                          max_batched_tokens=B * prompt)
    g = torch.Generator().manual_seed(B)
    seqs = [Sequence(tokens=torch.randint(0, shape["vocab_size"], (prompt,), generator=g).tolist()) for _ in range(B)]
    for s in seqs:
        scheduler.add(s)

    def step():
        batch = scheduler.schedule()
        assert batch.seqs == seqs and not batch.too_long, "the batch must fit its KV cache"
        return runner.step(batch.seqs, scheduler.block_tables(batch.seqs), batch.num_tokens)
    sync(device)
    t = time.perf_counter()
    logits = step()
    sync(device)
    prefill_s = time.perf_counter() - t
    times = []
    for _ in range(steps):
        for s, tok in zip(seqs, logits.argmax(-1).tolist()):
            s.tokens.append(tok)
        sync(device)
        t = time.perf_counter()
        logits = step()
        sync(device)
        times.append(time.perf_counter() - t)
    if not torch.isfinite(logits).all():
        raise RuntimeError(f"non-finite logits at B={B} after {steps} decode steps")
    steady = times[1:] or times
    return dict(batch=B, prompt_tokens=prompt, decode_steps=steps, prefill_s=prefill_s,
                prefill_tok_s=B * prompt / prefill_s, first_step_s=times[0], step_ms_median=1e3 * statistics.median(steady),
                decode_tok_s=B / statistics.median(steady))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="a 2-layer model of hidden size 64 (dry run, CPU)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shape = TINY if a.tiny else MISTRAL_7B
    dtype = torch.bfloat16
    results = []
    for quant in (None, "q4_0"):
        t = time.perf_counter()
        model = random_model(shape, dtype, quant, device)
        sync(device)
        build_s = time.perf_counter() - t
        wb = weight_bytes(model)
        for B in a.batches:
            r = decode(model, shape, dtype, device, B, a.prompt, a.steps)
            r.update(weights="q4_0" if quant else "bf16", activations="bf16", weight_bytes=wb, build_s=build_s,
                     weight_gbps=wb / (r["step_ms_median"] / 1e3) / 1e9)
            results.append(r)
            print(f"{r['weights']:>5} B={B:<3} prefill {r['prefill_tok_s']:9.0f} tok/s   decode step "
                  f"{r['step_ms_median']:8.2f} ms = {r['decode_tok_s']:8.1f} tok/s, weights at {r['weight_gbps']:7.1f} "
                  f"GB/s   (first step {r['first_step_s']:.2f} s)", flush=True)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if a.json:
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(dict(device=name, torch=torch.__version__, model="mistral-7b-shaped random"
                                          if not a.tiny else "tiny random", shape=shape, block_size=BLOCK_SIZE,
                                          results=results), indent=1))


if __name__ == "__main__":
    main()
