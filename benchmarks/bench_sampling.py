"""Sampling: microseconds per step for a batch of rows with every transform on (penalties, bias, top-k, top-p),
and the rows per second; the peer is the same arithmetic run row by row (what a per-sequence sampler does)."""
import torch
from conftest import best_peer, is_quick, measure, timed

from mistralrs.engine.sampling import SamplingParams, sample

FULL = [(1, 32000), (64, 32000), (256, 128256)]
QUICK = [(1, 1024), (8, 1024)]


def pytest_generate_tests(metafunc):
    if "shape" in metafunc.fixturenames:
        shapes = QUICK if is_quick(metafunc.config) else FULL
        metafunc.parametrize("shape", shapes, ids=[f"B{b}-V{v}" for b, v in shapes])


def test_sample(benchmark, record, device, shape):
    B, V = shape
    logits = torch.randn(B, V, device=device)
    params = [SamplingParams(temperature=0.8, top_k=50, top_p=0.9, presence_penalty=0.5, frequency_penalty=0.2,
                             logit_bias={7: 2.0}, logprobs=True, top_logprobs=5)] * B
    recent = [list(range(64))] * B
    gens = [torch.Generator(device=device).manual_seed(i) for i in range(B)]

    ours = measure(benchmark, lambda: sample(logits, params, recent, gens), rounds=20)
    per_row = timed(lambda: [sample(logits[i:i + 1], params[:1], recent[:1], gens[:1]) for i in range(B)], reps=3)
    record(op="sample", batch=B, vocab=V, us_per_step=ours * 1e6, rows_per_s=B / ours,
           **best_peer(ours, row_by_row=per_row), speedup_vs_row_by_row=per_row / ours)
