"""Load-time bounds: absurd hyperparameters and KV options are refused before anything is built or allocated,
raw Python errors from bad files become ValueError naming the file and the key, GGUF tensor data must be aligned,
inside the file and disjoint, and `logfile` is a path created mode 0600. The cases that hung or allocated
terabytes before run in a subprocess under a timeout and a memory limit."""
import json
import os
import shutil
import stat
import sys

import pytest
import torch
from gguf import GGUFValueType

import mistralrs
from mistralrs.load.gguf import Cursor, _skip_value, read_gguf

from helpers import ARCHS, run_python


def variant(tiny_models, tmp_path, **changes):
    """A copy of the tiny llama whose config.json has `changes` (a value of None deletes the key)."""
    ckpt = tmp_path / "llama"
    shutil.copytree(tiny_models["llama"], ckpt)
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg.update(changes)
    (ckpt / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if v is not None}))
    return ckpt


LOAD = """
import sys, json, mistralrs
path, kw = sys.argv[1], json.loads(sys.argv[2])
try:
    mistralrs.NormalLoader(mistralrs.LlamaLoader, model_id=path).load(token_source="none", **kw)
    print(json.dumps(None))
except Exception as e:
    print(json.dumps([type(e).__name__, str(e)]))
"""

HUGE = {  # config changes or load options that used to hang or try to allocate terabytes
    "layers": ({"num_hidden_layers": 10**6}, {}, "num_hidden_layers"),
    "head_dim": ({"head_dim": 10**10}, {}, "head_dim"),
    "parameters": ({"num_hidden_layers": 1000, "intermediate_size": 2**20, "hidden_size": 2**16,
                    "num_attention_heads": 512, "num_key_value_heads": 512}, {}, "would need"),
    "kv_cache": ({}, {"kv_cache_tokens": 10**12}, "KV cache"),
}


@pytest.mark.parametrize("case", HUGE)
def test_absurd_sizes_fail_before_allocating(tiny_models, tmp_path, case):
    changes, kw, words = HUGE[case]
    p = run_python(LOAD, str(variant(tiny_models, tmp_path, **changes)), json.dumps(kw), timeout=60, memory_gb=6)
    assert p.returncode == 0, p.stderr[-3000:]
    error = json.loads(p.stdout.splitlines()[-1])
    assert error and error[0] == "ValueError" and words in error[1], error
    if changes:
        assert "config.json" in error[1], error


BAD_CONFIGS = [
    ({"hidden_size": "64"}, "hidden_size"),           # a string number
    ({"num_attention_heads": 0}, "num_attention_heads"),  # was ZeroDivisionError
    ({"num_key_value_heads": 3}, "num_key_value_heads"),
    ({"vocab_size": -1}, "vocab_size"),
    ({"max_position_embeddings": 1.5}, "max_position_embeddings"),
    ({"rms_norm_eps": float("nan")}, "norm_eps"),
    ({"rope_theta": "10000"}, "rope_theta"),
    ({"tie_word_embeddings": "yes"}, "tie_word_embeddings"),
    ({"rope_parameters": [1]}, "rope_parameters"),
    ({"intermediate_size": None}, "intermediate_size"),
    ({"rope_scaling": {"rope_type": "linear", "factor": float("inf")}}, "rope_scaling"),
]


@pytest.mark.parametrize("changes, key", BAD_CONFIGS, ids=[k for _, k in BAD_CONFIGS])
def test_bad_config_values_are_value_errors_naming_file_and_key(tiny_models, tmp_path, changes, key):
    ckpt = variant(tiny_models, tmp_path, **changes)
    with pytest.raises(ValueError, match=key) as e:
        mistralrs.NormalLoader(ARCHS["llama"], model_id=str(ckpt)).load(token_source="none")
    assert "config.json" in str(e.value)


@pytest.mark.parametrize("name, text", [("config.json", "[1, 2]"), ("config.json", '"llama"'),
                                         ("tokenizer_config.json", "3"), ("generation_config.json", "null"),
                                         ("config.json", "[" * 100_000)])
def test_json_files_that_are_not_objects(tiny_models, tmp_path, name, text):
    ckpt = variant(tiny_models, tmp_path)
    (ckpt / name).write_text(text)
    with pytest.raises(ValueError, match=name):
        mistralrs.NormalLoader(ARCHS["llama"], model_id=str(ckpt)).load(token_source="none", kv_cache_tokens=256)


@pytest.mark.parametrize("kw, words", [(dict(kv_cache_tokens=-5), "kv_cache_tokens"),
                                       (dict(kv_cache_tokens=0), "kv_cache_tokens"),
                                       (dict(kv_cache_tokens="256"), "kv_cache_tokens"),
                                       (dict(kv_cache_tokens=8, block_size=16), "kv_cache_tokens"),
                                       (dict(block_size=0), "block_size"), (dict(block_size=2.0), "block_size"),
                                       (dict(block_size=10**6), "block_size")])
def test_bad_kv_options(tiny_models, kw, words):
    with pytest.raises(ValueError, match=words):
        mistralrs.NormalLoader(ARCHS["llama"], model_id=str(tiny_models["llama"])).load(token_source="none", **kw)


def test_logfile_is_a_path_created_private(tiny_models, tmp_path):
    loader = mistralrs.NormalLoader(ARCHS["llama"], model_id=str(tiny_models["llama"]))
    for bad in (True, 1, 2, 1.5, b"log"):
        with pytest.raises(TypeError, match="logfile"):
            loader.load(token_source="none", logfile=bad, kv_cache_tokens=256)
    os.fstat(sys.stdout.fileno())  # still open: the bad logfiles were never opened as descriptors
    log = tmp_path / "log.jsonl"  # an os.PathLike
    with loader.load(token_source="none", logfile=log, kv_cache_tokens=256) as r:
        r.send_completion_request(mistralrs.CompletionRequest("The river", "m", max_tokens=2))
    assert stat.S_IMODE(os.stat(tmp_path / "log.jsonl").st_mode) == 0o600
    assert len((tmp_path / "log.jsonl").read_text().splitlines()) == 2


def tensor_offsets(path) -> list[tuple[str, int, int]]:
    """(name, byte position of its offset field, offset) of every tensor info in a GGUF file's header."""
    buf = path.read_bytes()
    c = Cursor(buf, path)
    c.take(4, "magic")
    c.u32("version")
    n_tensors, n_kv = c.u64("n"), c.u64("n")
    for _ in range(n_kv):
        c.string("key")
        _skip_value(c, GGUFValueType(c.u32("type")), "key")
    out = []
    for _ in range(n_tensors):
        name = bytes(c.string("name")).decode()
        for _ in range(c.u32("n_dims")):
            c.u64("dim")
        c.u32("type")
        out.append((name, c.pos, c.u64("offset")))
    return out


def patched(src, dst, index: int, offset: int):
    data = bytearray(src.read_bytes())
    pos = tensor_offsets(src)[index][1]
    data[pos:pos + 8] = offset.to_bytes(8, "little")
    dst.write_bytes(data)
    return dst


def test_gguf_tensor_data_must_be_aligned_inside_and_disjoint(gguf_file, tmp_path):
    src = gguf_file("llama", "f32")
    read_gguf(src)  # the original is fine
    offsets = sorted(o for _, _, o in tensor_offsets(src))
    second = [i for i, (_, _, o) in enumerate(tensor_offsets(src)) if o == offsets[1]][0]
    with pytest.raises(ValueError, match="alignment"):
        read_gguf(patched(src, tmp_path / "misaligned.gguf", second, offsets[1] + 4))
    with pytest.raises(ValueError, match="overlaps"):
        read_gguf(patched(src, tmp_path / "overlap.gguf", second, offsets[0]))
    with pytest.raises(ValueError, match="overlaps"):  # starts inside the first tensor, aligned
        read_gguf(patched(src, tmp_path / "inside.gguf", second, offsets[0] + 32))
    with pytest.raises(ValueError, match="truncated"):
        read_gguf(patched(src, tmp_path / "outside.gguf", second, 2**40))


def test_gguf_metadata_of_the_wrong_type_names_its_key(gguf_file, tmp_path):
    """llama.block_count stored as a float32 (same size as its uint32, so the file stays well formed)."""
    data = bytearray(gguf_file("llama", "f32").read_bytes())
    key = b"llama.block_count"
    at = data.index(len(key).to_bytes(8, "little") + key) + 8 + len(key)
    assert int.from_bytes(data[at:at + 4], "little") == GGUFValueType.UINT32
    data[at:at + 4] = int(GGUFValueType.FLOAT32).to_bytes(4, "little")
    bad = tmp_path / "float-blocks.gguf"
    bad.write_bytes(data)
    loader = mistralrs.QuantizedLoader(ARCHS["llama"], model_id=None, is_gguf=True, quantized_model_id="",
                                       quantized_filename=str(bad))
    with pytest.raises(ValueError, match="llama.block_count") as e:
        loader.load(token_source="none", kv_cache_tokens=256)
    assert str(bad) in str(e.value)


def test_weights_that_cannot_fit_are_refused_before_loading(gguf_file, tiny_models, monkeypatch):
    """The estimate is compared with what memory is left: with 100 kB left, both a safetensors and a GGUF load
    stop at their estimate (F32 GGUF tensors count at the load dtype, quantized ones at their bytes)."""
    import mistralrs.load.model as load_model
    monkeypatch.setattr(load_model, "available_memory", lambda device: 100_000)
    with pytest.raises(ValueError, match="config.json: the weights would need"):
        mistralrs.NormalLoader(ARCHS["llama"], model_id=str(tiny_models["llama"])).load(token_source="none")
    path = gguf_file("llama", "q8_0")
    q = read_gguf(path)
    quantized = [t for t in q.tensors.values() if t.quantized]
    floats = [t for t in q.tensors.values() if not t.quantized]  # norms: F32 in the file, bf16 at load
    assert quantized and floats
    assert load_model.quantized_weight_bytes(q, torch.bfloat16) == (
        sum(t.data.nbytes for t in quantized) + sum(2 * t.data.nbytes // 4 for t in floats))
    gguf = mistralrs.QuantizedLoader(ARCHS["llama"], model_id=None, is_gguf=True, quantized_model_id="",
                                     quantized_filename=str(path))
    with pytest.raises(ValueError, match="the weights would need") as e:
        gguf.load(token_source="none", kv_cache_tokens=256)
    assert str(path) in str(e.value)


@pytest.mark.parametrize("name", ["generation_config.json", "config.json"])
@pytest.mark.parametrize("value", ["2", ["2"], [2, "3"], 2.0, True, -1, {"id": 2}])
def test_an_eos_token_id_transformers_would_not_take_names_file_and_key(tiny_models, tmp_path, name, value):
    ckpt = variant(tiny_models, tmp_path)
    cfg = json.loads((ckpt / name).read_text()) if (ckpt / name).exists() else {}
    (ckpt / name).write_text(json.dumps({**cfg, "eos_token_id": value}))
    with pytest.raises(ValueError, match=f"{name}: eos_token_id must be a token id") as e:
        mistralrs.NormalLoader(ARCHS["llama"], model_id=str(ckpt)).load(token_source="none", kv_cache_tokens=256)
    assert repr(value) in str(e.value)


@pytest.mark.parametrize("value, ids", [(2, {2}), ([2, 3], {2, 3}), ([], set())])
def test_eos_token_ids_transformers_takes_load(tiny_models, tmp_path, value, ids):
    ckpt = variant(tiny_models, tmp_path, eos_token_id=value)
    (ckpt / "generation_config.json").unlink(missing_ok=True)
    tok_cfg = json.loads((ckpt / "tokenizer_config.json").read_text())
    (ckpt / "tokenizer_config.json").write_text(json.dumps({k: v for k, v in tok_cfg.items() if k != "eos_token"}))
    with mistralrs.NormalLoader(ARCHS["llama"], model_id=str(ckpt)).load(token_source="none",
                                                                         kv_cache_tokens=256) as r:
        assert r.pipeline.eos_token_ids == ids
