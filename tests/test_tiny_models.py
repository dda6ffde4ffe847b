"""The tiny checkpoints from tools/make_tiny_models.py, checked by loading them with transformers."""

import json

import pytest
import torch
import transformers
from safetensors import safe_open
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

ARCHS = ["llama", "mistral", "gemma", "gemma2", "gemma3", "mixtral", "phi2"]
CONFIG_CLASSES = {
    "llama": transformers.LlamaConfig,
    "mistral": transformers.MistralConfig,
    "gemma": transformers.GemmaConfig,
    "gemma2": transformers.Gemma2Config,
    "gemma3": transformers.Gemma3TextConfig,
    "mixtral": transformers.MixtralConfig,
    "phi2": transformers.PhiConfig,
}
TEXT = (
    "The quick brown fox jumps over the lazy dog, and then the dog chases the fox "
    "around the garden until both of them are tired and fall asleep in the sun."
)


def _load(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, output_loading_info=True)


def _prompt(path, n_tokens: int) -> torch.Tensor:
    ids = Tokenizer.from_file(str(path / "tokenizer.json")).encode(TEXT).ids
    assert len(ids) >= n_tokens
    return torch.tensor([ids[:n_tokens]])


def _tensor_names(path) -> set[str]:
    names = set()
    for f in path.glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            names |= set(st.keys())
    return names


@pytest.mark.parametrize("arch", ARCHS)
def test_loads_with_every_key_matched(tiny_models, arch):
    model, info = _load(tiny_models[arch])
    assert type(model.config) is CONFIG_CLASSES[arch]
    assert not info["missing_keys"]
    assert not info["unexpected_keys"]
    assert not info["mismatched_keys"]
    assert model.dtype == torch.float32


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_decoding_wanders(tiny_models, arch):
    model, _ = _load(tiny_models[arch])
    prompt = _prompt(tiny_models[arch], 20)
    out = model.generate(prompt, max_new_tokens=32, min_new_tokens=32, do_sample=False)
    new = out[0, prompt.shape[1] :].tolist()
    assert len(new) == 32
    assert len(set(new)) >= 8, new


def test_hub_layout_quirks(tiny_models):
    gemma = json.loads((tiny_models["gemma"] / "config.json").read_text())
    assert gemma["head_dim"] * gemma["num_attention_heads"] != gemma["hidden_size"]
    assert "lm_head.weight" not in _tensor_names(tiny_models["gemma"])
    mixtral = _tensor_names(tiny_models["mixtral"])
    assert "model.layers.1.block_sparse_moe.experts.3.w2.weight" in mixtral
    phi = _tensor_names(tiny_models["phi2"])
    assert {"lm_head.bias", "model.final_layernorm.bias", "model.layers.0.self_attn.dense.bias"} <= phi
    llama = json.loads((tiny_models["llama"] / "config.json").read_text())
    assert llama["rope_scaling"]["rope_type"] == "llama3"
    assert not llama["tie_word_embeddings"] and "lm_head.weight" in _tensor_names(tiny_models["llama"])


def test_llama3_rope_scaling_is_applied(tiny_models):
    model, _ = _load(tiny_models["llama"])
    inv_freq = model.model.rotary_emb.inv_freq
    D = model.config.head_dim
    plain = 1.0 / model.config.rope_parameters["rope_theta"] ** (torch.arange(0, D, 2).float() / D)
    # The highest frequency is kept, the lowest divided by the factor, and something in between is smoothed.
    assert torch.isclose(inv_freq[0], plain[0])
    assert torch.isclose(inv_freq[-1], plain[-1] / 8.0)
    assert ((inv_freq < plain * 0.99) & (inv_freq > plain / 8.0 * 1.01)).any()


def test_mistral_sliding_window_matters(tiny_models):
    path = tiny_models["mistral"]
    windowed, _ = _load(path)
    assert windowed.config.sliding_window == 8
    config = transformers.AutoConfig.from_pretrained(path)
    config.sliding_window = None
    full = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=torch.float32)
    prompt = _prompt(path, 30)
    with torch.no_grad():
        a, b = windowed(prompt).logits[0], full(prompt).logits[0]
    # Positions that see no more than the window agree; later ones must not.
    torch.testing.assert_close(a[:8], b[:8])
    assert (a[8:] - b[8:]).abs().amax(dim=-1).min() > 1e-3


def test_sharded_llama_equals_unsharded(tiny_models, tiny_sharded_llama):
    index = json.loads((tiny_sharded_llama / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert shards == {"model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"}
    assert not (tiny_sharded_llama / "model.safetensors").exists()
    assert set(index["weight_map"]) == _tensor_names(tiny_models["llama"])
    sharded, info = _load(tiny_sharded_llama)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    plain, _ = _load(tiny_models["llama"])
    prompt = _prompt(tiny_sharded_llama, 20)
    with torch.no_grad():
        torch.testing.assert_close(sharded(prompt).logits, plain(prompt).logits, rtol=0, atol=0)


def test_checkpoint_is_deterministic(tiny_models, tmp_path):
    fresh = tiny_models.tool.write_checkpoint("mixtral", tmp_path / "mixtral")
    cached = tiny_models["mixtral"]
    names = sorted(p.name for p in cached.iterdir())
    assert names == sorted(p.name for p in fresh.iterdir())
    for name in names:
        assert (fresh / name).read_bytes() == (cached / name).read_bytes(), name


def test_tokenizer(tiny_models):
    path = tiny_models["llama"]
    raw = Tokenizer.from_file(str(path / "tokenizer.json"))
    tok = AutoTokenizer.from_pretrained(path)
    assert 512 <= raw.get_vocab_size() <= 1024
    assert (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (1, 2, 0)
    assert (tok.bos_token, tok.eos_token) == ("<s>", "</s>")

    ids = tok(TEXT).input_ids
    assert ids[0] == tok.bos_token_id and ids[1] != tok.bos_token_id
    assert ids == raw.encode(TEXT).ids
    assert tok.decode(ids, skip_special_tokens=True) == TEXT
    assert raw.decode(raw.encode(TEXT, add_special_tokens=False).ids) == TEXT
    assert tok(TEXT, add_special_tokens=False).input_ids == ids[1:]


def test_chat_template(tiny_models):
    tok = AutoTokenizer.from_pretrained(tiny_models["llama"])
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "<s><|system|>\nBe brief.</s>\n<|user|>\nHi there</s>\n<|assistant|>\n"
    assert not tok.apply_chat_template(messages, tokenize=False).endswith("<|assistant|>\n")
    with pytest.raises(Exception, match="roles must be"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)
