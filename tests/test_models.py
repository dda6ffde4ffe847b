"""Each architecture, loaded through NormalLoader, against Hugging Face transformers on the same checkpoint."""
import pytest
import torch
from torch import nn

import mistralrs
from mistralrs.engine.sequence import Sequence
from mistralrs.layers import Attention, GatedMLP
from mistralrs.linears import CpuLinear

from helpers import (
    ARCHS,
    Driver,
    all_logits,
    greedy,
    hf_greedy,
    hf_model,
    load,
    prompt_ids,
)


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_match_transformers(tiny_models, arch):
    runner = load(tiny_models[arch], arch)
    ids = prompt_ids(runner)
    with torch.no_grad():
        ref = hf_model(tiny_models[arch])(torch.tensor([ids])).logits[0]
    ours = all_logits(runner, ids)
    d, seq = Driver(runner), Sequence(list(ids))
    last = d.step([seq])[0]
    diff = (ours - ref).abs().max().item()
    print(f"{arch}: max |logits - transformers| = {diff:.2e}")  # shown with -s
    assert diff <= 1e-4, diff
    assert (last - ref[-1]).abs().max().item() <= 1e-4


@pytest.mark.parametrize("arch", ARCHS)
def test_cpu_weight_layout(tiny_models, arch):
    """On CPU (test_logits_match_transformers checks the values): each attention's q, k, v weights are row blocks of
    one contiguous [Nq + 2 Nkv, K] tensor, multiplied as one (gate/up only when quantized); every float32 Linear is
    a CpuLinear (the kernels' thread team) with a contiguous [N, K] weight; a tied lm_head stays the embedding's
    tensor."""
    model = load(tiny_models[arch], arch).pipeline.model_runner.model
    attn = [m for m in model.modules() if isinstance(m, Attention)]
    mlps = [m for m in model.modules() if isinstance(m, GatedMLP)]
    assert all(m.gate_up is None for m in mlps)
    groups = [(a.qkv, (a.q_proj, a.k_proj, a.v_proj)) for a in attn]
    for fused, projs in groups:
        w = fused.proj.weight
        assert w.is_contiguous() and w.shape == (sum(p.out_features for p in projs), projs[0].in_features)
        assert fused.sizes == tuple(p.out_features for p in projs)
        for p in projs:
            assert p.weight.untyped_storage().data_ptr() == w.untyped_storage().data_ptr()
            assert p.weight.stride() == (projs[0].in_features, 1)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert linears and all(type(m) is CpuLinear and m.weight.is_contiguous() for m in linears)
    if model.tie_word_embeddings:
        assert model.lm_head.weight is model.model.embed_tokens.weight
    fp16 = load(tiny_models[arch], arch, dtype=mistralrs.DType.F16).pipeline.model_runner.model
    assert all(type(m) is nn.Linear for m in fp16.modules() if isinstance(m, nn.Linear))  # float32 only
    assert all(m.qkv is None for m in fp16.modules() if isinstance(m, Attention))
    assert all(m.gate_up is None for m in fp16.modules() if isinstance(m, GatedMLP))


@pytest.mark.parametrize("no_kv_cache", [False, True], ids=["kv_cache", "no_kv_cache"])
@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_matches_transformers(tiny_models, arch, no_kv_cache):
    runner = load(tiny_models[arch], arch, no_kv_cache=no_kv_cache)
    ids = prompt_ids(runner)
    ours = greedy(runner, ids, 32)
    assert ours == hf_greedy(hf_model(tiny_models[arch]), ids, 32)
    assert len(set(ours)) >= 8


@pytest.mark.parametrize("arch", ARCHS)
def test_float16(tiny_models, arch):
    """fp16 logits: close to transformers run in fp16, and no further from the fp32 truth than transformers is."""
    runner = load(tiny_models[arch], arch, dtype=mistralrs.DType.F16)
    assert runner.pipeline.model_runner.model.lm_head.weight.dtype == torch.float16
    ids = prompt_ids(runner)
    with torch.no_grad():
        ref32 = hf_model(tiny_models[arch])(torch.tensor([ids])).logits[0]
        ref16 = hf_model(tiny_models[arch], torch.float16)(torch.tensor([ids])).logits[0].float()
    ours = all_logits(runner, ids)
    torch.testing.assert_close(ours, ref16, atol=1e-1, rtol=2e-2)  # logits reach ~10: fp16 ulp there is 8e-3
    assert (ours - ref32).abs().max() <= 2 * (ref16 - ref32).abs().max() + 1e-2


def test_sharded_checkpoint_equals_single_file(tiny_models, tiny_sharded_llama):
    a = load(tiny_models["llama"], "llama").pipeline.model_runner
    b = load(tiny_sharded_llama, "llama").pipeline.model_runner
    for (name, x), (_, y) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert torch.equal(x, y), name


def test_paged_cache_in_small_blocks_matches_one_big_block(tiny_models):
    """Block boundaries inside the prompt and during decode change nothing."""
    ids = prompt_ids(load(tiny_models["mistral"], "mistral"))
    small = load(tiny_models["mistral"], "mistral", block_size=3, kv_cache_tokens=300)
    big = load(tiny_models["mistral"], "mistral", block_size=256, kv_cache_tokens=512)
    assert greedy(small, ids, 16) == greedy(big, ids, 16)

