"""Legacy GGML (GGJT v3) files of the tiny llama, written by tools/write_ggml.py: the same model as their GGUF twins
(converted from the same checkpoint by tools/convert_to_gguf.py), gqa, the SentencePiece vocab, damaged files."""
import json
import shutil
import struct

import pytest
import torch

import mistralrs
from mistralrs import QuantizedLoader
from mistralrs.load.ggml import read_ggml
from mistralrs.load.gguf_model import resident_bytes
from mistralrs.load.gguf_tokenizer import tokenizer_from_gguf

import convert_to_gguf as convert
import write_ggml
from helpers import KV, PROMPT, TEXTS, greedy
from helpers import all_logits as logits


def without_rope_scaling(src, dst):
    """GGJT cannot express the tiny llama's Llama 3 rope scaling: the same weights without it."""
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["rope_scaling"] = None
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.fixture(scope="module")
def llama(tiny_models, tmp_path_factory):
    return without_rope_scaling(tiny_models["llama"], tmp_path_factory.mktemp("ggml") / "llama")


def load(path, *, is_gguf=False, model_id=None, gqa=2):
    loader = QuantizedLoader(mistralrs.LlamaLoader, model_id=model_id, is_gguf=is_gguf, quantized_model_id="",
                             quantized_filename=str(path), gqa=gqa)
    return loader.load(token_source="none", **KV)


@pytest.mark.parametrize("qtype", ["f32", "q8_0", "q4_0"])
def test_ggml_matches_its_gguf_twin(llama, tmp_path, qtype):
    """n_kv_head = n_head / gqa (the file has 4 heads and 2 KV heads), the rest read off the file; the tiny llama's
    byte-level tokenizer comes from model_id, as GGML vocabs are SentencePiece's."""
    ggml = write_ggml.write_ggml(llama, tmp_path / f"llama-{qtype}.bin", qtype)
    twin = convert.convert(llama, tmp_path / f"llama-{qtype}.gguf", qtype)
    with load(ggml, model_id=str(llama)) as a, load(twin, is_gguf=True, model_id=str(llama)) as b:
        ids = a.pipeline.tokenizer.encode(PROMPT).ids
        assert torch.equal(logits(a, ids), logits(b, ids))
        tokens = greedy(a, ids)
        assert tokens == greedy(b, ids) and len(set(tokens)) >= 8
        assert a.pipeline.max_model_len == 4096
        model = a.pipeline.model_runner.model
        ratio = resident_bytes(model) / ggml.stat().st_size
        print(f"{ggml.name}: resident weight bytes / file size = {ratio:.3f}")
        assert ratio <= 1.15
        if qtype != "f32":
            assert model.model.layers[0].self_attn.k_proj.qweight.dtype == torch.uint8


def test_ggml_f32_matches_safetensors(llama, tmp_path):
    ggml = write_ggml.write_ggml(llama, tmp_path / "llama.bin")
    with load(ggml, model_id=str(llama)) as a, \
            mistralrs.NormalLoader(mistralrs.LlamaLoader, model_id=str(llama)).load(token_source="none", **KV) as b:
        ids = b.pipeline.tokenizer.encode(PROMPT).ids
        assert (logits(a, ids) - logits(b, ids)).abs().max() <= 1e-4
        assert greedy(a, ids) == greedy(b, ids)


def test_gqa(llama, tmp_path):
    ggml = write_ggml.write_ggml(llama, tmp_path / "llama.bin", "q8_0")
    with pytest.raises(ValueError, match=r"layers.0.attention.wk has 32 rows, .* 4 / 1 KV heads .*; pass gqa=2"):
        load(ggml, model_id=str(llama), gqa=None)
    with pytest.raises(ValueError, match=r"gqa=3 does not divide n_head=4"):
        load(ggml, model_id=str(llama), gqa=3)


def test_ggml_sentencepiece_vocab(sentencepiece_llama, tmp_path):  # noqa: F811
    """The vocab as convert.py wrote it (spaces for "▁", raw bytes, empty control tokens) tokenizes as
    sentencepiece does; no model_id needed."""
    ckpt, sp = sentencepiece_llama
    ggml = write_ggml.write_ggml(without_rope_scaling(ckpt, tmp_path / "spm-llama"), tmp_path / "spm.bin", "q4_0")
    tok, cfg = tokenizer_from_gguf(read_ggml(ggml, gqa=2).metadata, ggml)
    for text in TEXTS[:-2]:
        ids = [1] + sp.encode(text)
        assert tok.encode(text).ids == ids, text
        assert tok.decode(ids) == sp.decode(ids[1:])
    assert (cfg["bos_token"], cfg["eos_token"]) == ("<s>", "</s>")
    with load(ggml) as r:
        assert r.pipeline.eos_token_ids == {2}
        assert r.pipeline.tokenizer.encode(PROMPT).ids == [1] + sp.encode(PROMPT)


def test_bad_ggml_files(llama, tmp_path):
    good = write_ggml.write_ggml(llama, tmp_path / "good.bin", "q4_0").read_bytes()
    n_vocab_end = 8 + 7 * 4
    cases = {
        "gguf.bin": (b"GGUF" + good[4:], r"is not a GGML \(GGJT\) file: it starts with b'GGUF'; it is a GGUF file: "
                                         r"pass is_gguf=True"),
        "ggmf.bin": (struct.pack("<I", 0x67676D66) + good[4:], "is an 'ggmf' GGML file; only GGJT version 3"),
        "v1.bin": (good[:4] + struct.pack("<I", 1) + good[8:], "GGJT version 1 is not supported"),
        "truncated.bin": (good[:-100], "truncated or corrupt: data of tensor"),
        "vocab.bin": (good[:n_vocab_end] + b"\xff" * 4 + good[n_vocab_end + 4:], "truncated or corrupt"),
        "empty.bin": (b"", "is empty"),
    }
    for name, (content, message) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ValueError, match=message) as e:
            load(tmp_path / name, model_id=str(llama))
        assert str(tmp_path / name) in str(e.value)
    first_tensor = good.index(b"tok_embeddings.weight") - 5 * 4  # n_dims, name length, type, 2 dims, then the name
    bad_type = good[:first_tensor + 8] + struct.pack("<I", 77) + good[first_tensor + 12:]
    (tmp_path / "type.bin").write_bytes(bad_type)
    with pytest.raises(ValueError, match="tensor 'tok_embeddings.weight' has unknown tensor type id 77"):
        load(tmp_path / "type.bin", model_id=str(llama))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load(tmp_path / "absent.bin", model_id=str(llama))
