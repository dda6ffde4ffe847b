"""The shared layers against Hugging Face transformers' own modules: rotary (its table and the rotate-half), RMSNorm."""
import pytest
import torch
from transformers import LlamaConfig
from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm, LlamaRotaryEmbedding, apply_rotary_pos_emb

from mistralrs.kernels import reference
from mistralrs.kernels.reference import apply_rotary
from mistralrs.layers import RMSNorm, Rotary

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
IDS = ["f32", "bf16", "f16"]


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("scaling", [None, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}],
                         ids=["default", "llama3"])
def test_rotary_equals_transformers(dtype, scaling):
    """Positions out of order and past the first table, which then grows: the same bits as transformers."""
    H, KVH, D, theta = 9, 3, 64, 100000.0
    cfg = LlamaConfig(hidden_size=H * D, num_attention_heads=H, num_key_value_heads=KVH, rope_theta=theta,
                      rope_scaling=scaling, max_position_embeddings=8192)
    hf = LlamaRotaryEmbedding(cfg)
    ours = Rotary(D, theta, scaling)
    for positions in ([0, 1, 2], [5, 700, 3, 4097], [8000]):
        pos = torch.tensor(positions)
        q, k = torch.randn(len(positions), H, D).to(dtype), torch.randn(len(positions), KVH, D).to(dtype)
        cos, sin = hf(q, pos[None])  # [1, T, D]
        q_hf, k_hf = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin)
        cos, sin = ours.cos_sin(pos, dtype)
        assert torch.equal(apply_rotary(q, cos, sin), q_hf[0].transpose(0, 1))
        assert torch.equal(apply_rotary(k, cos, sin), k_hf[0].transpose(0, 1))
    assert ours._tables[torch.device("cpu"), dtype].shape[0] == 8192  # grown twice, to powers of two


def test_partial_rotary_leaves_the_other_dims():
    ours, full = Rotary(16, 10000.0), Rotary(16, 10000.0)
    x = torch.randn(4, 2, 40)
    cos, sin = ours.cos_sin(torch.arange(4), torch.float32)
    out = apply_rotary(x, cos, sin)
    assert torch.equal(out[..., 16:], x[..., 16:])
    assert torch.equal(out[..., :16], apply_rotary(x[..., :16].contiguous(), *full.cos_sin(torch.arange(4),
                                                                                             torch.float32)))


def test_rotary_table_follows_a_new_inv_freq():
    """GGUF's rope_freqs rescale inv_freq after the build: the table must not keep the old frequencies."""
    rot = Rotary(8, 10000.0)
    before = rot.cos_sin(torch.tensor([3]), torch.float32)[0]
    rot.inv_freq = rot.inv_freq / 4
    after = rot.cos_sin(torch.tensor([3]), torch.float32)[0]
    freqs = 3.0 * rot.inv_freq
    assert torch.equal(after[0, 0], torch.cat((freqs, freqs)).cos()) and not torch.equal(before, after)


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_rmsnorm_equals_transformers(dtype):
    x = (torch.randn(5, 576) * 3).to(dtype)
    w = torch.randn(576)
    hf, ours = LlamaRMSNorm(576, eps=1e-6), RMSNorm(576, 1e-6)
    hf_g, ours_g = GemmaRMSNorm(576, eps=1e-6), RMSNorm(576, 1e-6, unit_offset=True)
    with torch.no_grad():
        for m in (hf, ours, hf_g, ours_g):
            m.weight.copy_(w)
            m.to(dtype)
        # the reference to the bit; the module through the dispatch (C++ on CPU float32) to float rounding
        assert torch.equal(reference.rms_norm(x, ours.weight, 1e-6), hf(x))
        assert torch.equal(reference.rms_norm(x, ours_g.weight, 1e-6, unit_offset=True), hf_g(x))
        tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else {}
        torch.testing.assert_close(ours(x), hf(x), **tol)
        torch.testing.assert_close(ours_g(x), hf_g(x), **tol)
