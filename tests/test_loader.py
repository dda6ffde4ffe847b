"""Loaders end to end on tiny checkpoints: API.md call forms and signatures, the offline hub cache with revisions,
errors that name the parameter, tokenizer / chat template overrides, EOS ids from every config."""
import inspect
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, normalizers

import mistralrs
from mistralrs import (
    ChatCompletionRequest,
    CompletionRequest,
    DType,
    LlamaLoader,
    ModelKind,
    NormalLoader,
    QuantizedLoader,
    XLoraLoader,
    XLoraQuantizedLoader,
    kernels,
)
from mistralrs.kernels import cpu_ext
from mistralrs.load import chat_template as chat_template_module

from helpers import HF_ENV, checkpoint_files, commit_hash, make_fake_hub_repo

REPO_ROOT = Path(__file__).resolve().parent.parent
MSGS = [{"role": "user", "content": "Hello there"}]
KV = dict(kv_cache_tokens=256)  # small cache: loads stay fast


def load(path, loader=LlamaLoader, *, wrapper_kw=None, **kw):
    return NormalLoader(loader, model_id=str(path), **(wrapper_kw or {})).load(token_source="none", **KV, **kw)


def state(runner) -> dict[str, torch.Tensor]:
    return runner.pipeline.model_runner.model.state_dict()


def assert_same_weights(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def copy_checkpoint(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_json(path: Path, **changes):
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def chat(runner, messages=MSGS) -> dict:
    return json.loads(runner.send_chat_completion_request(
        ChatCompletionRequest(messages, "tiny", max_tokens=1, temperature=0)))


def n_tokens(runner, text: str) -> int:
    return len(runner.pipeline.tokenizer.encode(text, add_special_tokens=False).ids)


@pytest.fixture(scope="module")
def llama(tiny_models) -> Path:
    return tiny_models["llama"]


# ---- 1. call forms and signatures ----

API_NAMES = ("NormalLoader", "XLoraLoader", "QuantizedLoader", "XLoraQuantizedLoader", "MistralLoader", "GemmaLoader",
             "LlamaLoader", "MixtralLoader", "Phi2Loader", "Runner", "ChatCompletionStreamer", "ChatCompletionRequest",
             "CompletionRequest", "ModelKind", "DType")
REQUIRED, ANY = inspect.Parameter.empty, object()
# API.md, in its order; the first parameter ("class") is positional-only since `class` is a Python keyword.
WRAPPER_PARAMS = {
    NormalLoader: [("model_id", REQUIRED), ("no_kv_cache", False), ("use_flash_attn", None), ("repeat_last_n", 64),
                   ("gqa", None), ("chat_template", None), ("tokenizer_json", None)],
    XLoraLoader: [("model_id", REQUIRED), ("no_kv_cache", False), ("use_flash_attn", None), ("repeat_last_n", 64),
                  ("gqa", None), ("order_file", None), ("xlora_model_id", None), ("chat_template", None),
                  ("tokenizer_json", None), ("tgt_non_granular_index", None)],
    QuantizedLoader: [("model_id", REQUIRED), ("is_gguf", REQUIRED), ("no_kv_cache", False), ("use_flash_attn", None),
                      ("repeat_last_n", 64), ("gqa", None), ("quantized_model_id", None),
                      ("quantized_filename", None), ("chat_template", None), ("tokenizer_json", None)],
    # use_flash_attn=<feature>: whatever the build decides
    XLoraQuantizedLoader: [("model_id", REQUIRED), ("is_gguf", REQUIRED), ("no_kv_cache", False),
                           ("use_flash_attn", ANY), ("repeat_last_n", 64), ("gqa", 1), ("order_file", None),
                           ("quantized_model_id", None), ("quantized_filename", None), ("xlora_model_id", None),
                           ("chat_template", None), ("tokenizer_json", None), ("tgt_non_granular_index", None)],
}
LOAD_PARAMS = [("token_source", "cache"), ("max_seqs", 16), ("truncate_sequence", False), ("logfile", None),
               ("revision", None), ("token_source_value", None), ("dtype", None)]


def test_every_api_name_is_exported():
    for name in API_NAMES:
        assert hasattr(mistralrs, name) and name in mistralrs.__all__, name
    assert [k.name for k in ModelKind] == ["Normal", "XLoraNormal", "XLoraGGUF", "XLoraGGML", "QuantizedGGUF",
                                           "QuantizedGGML"]
    assert [d.name for d in DType] == ["U8", "U32", "I64", "BF16", "F16", "F32", "F64"]


@pytest.mark.parametrize("wrapper", WRAPPER_PARAMS, ids=lambda w: w.__name__)
def test_wrapper_signatures_match_api(wrapper):
    params = list(inspect.signature(wrapper).parameters.values())
    assert params[0].kind is inspect.Parameter.POSITIONAL_ONLY and params[0].default is REQUIRED
    got = [(p.name, p.default) for p in params[1:]]
    want = WRAPPER_PARAMS[wrapper]
    assert [n for n, _ in got] == [n for n, _ in want]
    for (name, default), (_, expected) in zip(got, want):
        if expected is not ANY:
            assert default == expected and type(default) is type(expected), name
    load_params = list(inspect.signature(wrapper.load).parameters.values())[1:len(LOAD_PARAMS) + 1]
    assert [(p.name, p.default) for p in load_params] == LOAD_PARAMS


def test_arch_load_signature_matches_api():
    for cls in (mistralrs.MistralLoader, mistralrs.GemmaLoader, LlamaLoader, mistralrs.MixtralLoader,
                mistralrs.Phi2Loader):
        params = list(inspect.signature(cls.load).parameters.values())[1:]
        assert [(p.name, p.default) for p in params[:len(LOAD_PARAMS)]] == LOAD_PARAMS
        assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params[len(LOAD_PARAMS):])


def test_call_forms_load_the_same_model(llama):
    with load(llama) as by_class:
        expected = state(by_class)
        assert isinstance(by_class, mistralrs.Runner)
    with NormalLoader(LlamaLoader(), model_id=str(llama)).load(token_source="none", **KV) as by_instance:
        assert_same_weights(state(by_instance), expected)
    with NormalLoader(LlamaLoader, str(llama)).load("none", **KV) as positional_model_id:
        assert_same_weights(state(positional_model_id), expected)
    with LlamaLoader(str(llama), ModelKind.Normal).load(token_source="none", **KV) as direct:
        assert_same_weights(state(direct), expected)
    with LlamaLoader(str(llama)).load(token_source="none", **KV) as direct_default_kind:
        assert_same_weights(state(direct_default_kind), expected)


def test_load_positional_and_keyword(llama, tmp_path):
    with NormalLoader(LlamaLoader, model_id=str(llama)).load("none", 4, False, None, None, None, DType.F32) as r:
        assert r.scheduler.max_seqs == 4 and r.truncate_sequence is False
        assert r.pipeline.dtype == torch.float32
        assert {p.dtype for p in r.pipeline.model_runner.model.parameters()} == {torch.float32}
    logfile = tmp_path / "log.jsonl"
    with NormalLoader(LlamaLoader, model_id=str(llama)).load(
            token_source="none", max_seqs=3, truncate_sequence=True, logfile=str(logfile), revision=None,
            token_source_value=None, dtype=DType.F32, **KV) as r:
        assert r.scheduler.max_seqs == 3 and r.truncate_sequence is True
        chat(r)
    entries = [json.loads(line) for line in logfile.read_text().splitlines()]
    assert [next(k for k in e if k != "time") for e in entries] == ["request", "response"]
    assert "Hello there" in entries[0]["request"]
    assert entries[1]["response"]["object"] == "chat.completion"


def test_literal_token_is_accepted_for_a_local_dir(llama, monkeypatch, tmp_path):
    monkeypatch.setenv("MISTRALRS_TEST_TOKEN", "hf_env")
    (tmp_path / "token").write_text("hf_file\n")
    for source, value in (("literal", "hf_x"), ("envvar", "MISTRALRS_TEST_TOKEN"), ("path", str(tmp_path / "token"))):
        with NormalLoader(LlamaLoader, model_id=str(llama)).load(source, token_source_value=value, **KV) as r:
            assert r.pipeline.vocab_size > 0


# ---- 2. the Hugging Face cache, offline, with two revisions ----

MAIN, V1, EMPTY = commit_hash("loader-main"), commit_hash("loader-v1"), commit_hash("loader-empty")

# Run in a fresh interpreter: huggingface_hub reads HF_HOME and HF_HUB_OFFLINE into its constants at import.
_HUB_SCRIPT = """
import json, sys
from pathlib import Path
import torch
import mistralrs

out = Path(sys.argv[2])
results = {}
for name, model_id, kw in json.loads(sys.argv[1]):
    try:
        loader = mistralrs.NormalLoader(mistralrs.LlamaLoader, model_id=model_id)
        with loader.load(token_source="none", kv_cache_tokens=256, **kw) as r:
            torch.save(r.pipeline.model_runner.model.state_dict(), out / f"{name}.pt")
            reply = json.loads(r.send_completion_request(mistralrs.CompletionRequest(
                "The river", "tiny", max_tokens=5, temperature=0)))
            results[name] = {"text": reply["choices"][0]["text"]}
    except Exception as e:
        results[name] = {"error": type(e).__name__, "message": str(e)}
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def hub_home(tmp_path_factory, tiny_models, llama) -> Path:
    """HF_HOME with tiny/llama: main = the seed-0 checkpoint (one file), v1 = a seed-1 checkpoint (sharded),
    plus a revision without weights."""
    v1 = tiny_models.tool.write_checkpoint("llama", tmp_path_factory.mktemp("v1"), sharded=True, seed=1)
    hf_home = tmp_path_factory.mktemp("hf_home")
    no_weights = {k: p for k, p in checkpoint_files(llama).items() if not k.endswith(".safetensors")}
    make_fake_hub_repo(hf_home, "tiny/llama", [(V1, checkpoint_files(v1)), (MAIN, checkpoint_files(llama)),
                                                (EMPTY, no_weights)], {"main": MAIN, "v1": V1, "empty": EMPTY})
    return hf_home


def run_hub_loads(hf_home: Path, out: Path, loads: list) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in HF_ENV}
    env.update(HF_HOME=str(hf_home), HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")])))
    # cwd=hf_home: a directory named like the repo id under the cwd would be taken for a local model directory
    proc = subprocess.run([sys.executable, "-c", _HUB_SCRIPT, json.dumps(loads), str(out)], env=env, cwd=hf_home,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def local_reference(path: Path) -> tuple[dict, str]:
    with load(path) as r:
        reply = json.loads(r.send_completion_request(CompletionRequest("The river", "tiny", max_tokens=5,
                                                                       temperature=0)))
        return state(r), reply["choices"][0]["text"]


def test_hub_revisions_offline(hub_home, llama, tmp_path):
    results = run_hub_loads(hub_home, tmp_path, [
        ["default", "tiny/llama", {}], ["main", "tiny/llama", {"revision": "main"}],
        ["v1", "tiny/llama", {"revision": "v1"}], ["v1_hash", "tiny/llama", {"revision": V1}],
        ["no_revision", "tiny/llama", {"revision": "nope"}], ["no_repo", "tiny/absent", {}],
        ["no_weights", "tiny/llama", {"revision": "empty"}]])
    for name in ("default", "main", "v1", "v1_hash"):
        assert "error" not in results[name], results[name]
    main_state, main_text = local_reference(llama)
    v1_src = hub_home / "hub" / "models--tiny--llama" / "snapshots" / V1
    assert (v1_src / "model.safetensors.index.json").is_file()  # v1 really is sharded
    v1_state, v1_text = local_reference(v1_src)
    assert not torch.equal(main_state["lm_head.weight"], v1_state["lm_head.weight"])  # the two seeds differ

    for name, (want_state, want_text) in {"default": (main_state, main_text), "main": (main_state, main_text),
                                          "v1": (v1_state, v1_text), "v1_hash": (v1_state, v1_text)}.items():
        assert_same_weights(torch.load(tmp_path / f"{name}.pt"), want_state)
        assert results[name]["text"] == want_text, name

    for name, needle in (("no_revision", "'nope'"), ("no_repo", "tiny/absent"), ("no_weights", "no safetensors")):
        assert results[name]["error"] == "FileNotFoundError", results[name]
        assert needle in results[name]["message"], results[name]


# ---- 3. errors ----

@pytest.mark.parametrize("source, value, error, match", [
    ("bogus", None, ValueError, "token_source must be one of 'cache', 'literal', 'envvar', 'path', 'none'"),
    ("literal", None, ValueError, "token_source='literal' needs token_source_value"),
    ("envvar", None, ValueError, "token_source='envvar' needs token_source_value"),
    ("path", None, ValueError, "token_source='path' needs token_source_value"),
    ("cache", "hf_x", ValueError, "token_source='cache' takes no token_source_value"),
    ("none", "hf_x", ValueError, "token_source='none' takes no token_source_value"),
    ("envvar", "MISTRALRS_TEST_UNSET_VAR", ValueError, "environment variable 'MISTRALRS_TEST_UNSET_VAR' is not set"),
    ("path", "{tmp}/missing", FileNotFoundError, "token file .*missing"),
    ("path", "{tmp}", FileNotFoundError, "token file .*not a file"),
    ("path", "{tmp}/binary", ValueError, "cannot read token file"),
])
def test_token_source_errors(llama, tmp_path, monkeypatch, source, value, error, match):
    monkeypatch.delenv("MISTRALRS_TEST_UNSET_VAR", raising=False)
    (tmp_path / "binary").write_bytes(b"\xff\xfe\x00token")
    value = value.format(tmp=tmp_path) if value else value
    with pytest.raises(error, match=match) as info:
        NormalLoader(LlamaLoader, model_id=str(llama)).load(source, token_source_value=value, **KV)
    assert "hf_x" not in str(info.value)  # a misplaced token is never echoed


def test_missing_files(llama, tmp_path):
    no_config = copy_checkpoint(llama, tmp_path / "no_config")
    (no_config / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load(no_config)
    no_weights = copy_checkpoint(llama, tmp_path / "no_weights")
    (no_weights / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no safetensors weights.*model.safetensors"):
        load(no_weights)
    no_tokenizer = copy_checkpoint(llama, tmp_path / "no_tokenizer")
    (no_tokenizer / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match="tokenizer_json"):
        load(no_tokenizer)
    with pytest.raises(ValueError, match="neither an existing local directory nor a valid"):
        load(tmp_path / "does" / "not" / "exist")


def test_corrupt_tokenizer_and_index(llama, tiny_sharded_llama, tmp_path):
    bad_tokenizer = copy_checkpoint(llama, tmp_path / "bad_tokenizer")
    (bad_tokenizer / "tokenizer.json").write_text("{bad")
    with pytest.raises(ValueError, match="tokenizer.json is not a valid tokenizer.json") as info:
        load(bad_tokenizer)
    assert str(bad_tokenizer) in str(info.value)
    with load(tiny_sharded_llama) as r:
        assert r.pipeline.vocab_size > 0
    for i, text in enumerate(("{bad", "{}", "[]")):
        bad_index = copy_checkpoint(tiny_sharded_llama, tmp_path / f"bad_index{i}")
        (bad_index / "model.safetensors.index.json").write_text(text)
        with pytest.raises(ValueError, match="model.safetensors.index.json is not a safetensors index"):
            load(bad_index)


def test_model_id_types(llama):
    with NormalLoader(LlamaLoader, model_id=llama).load(token_source="none", **KV) as r:  # a Path works like a str
        assert r.pipeline.model_id == str(llama)
        assert chat(r)["model"] == str(llama)
    for bad in (3, b"tiny/llama"):
        with pytest.raises(TypeError, match="model_id must be a str"):
            NormalLoader(LlamaLoader, model_id=bad)


def test_model_type_mismatch(tiny_models):
    with pytest.raises(ValueError, match="model_type 'mistral'.*LlamaLoader loads model_type 'llama'"):
        load(tiny_models["mistral"], LlamaLoader)
    with pytest.raises(ValueError, match="model_type 'llama'.*Phi2Loader"):
        load(tiny_models["llama"], mistralrs.Phi2Loader)


def test_bad_config(llama, tmp_path):
    corrupt = copy_checkpoint(llama, tmp_path / "corrupt")
    (corrupt / "config.json").write_text('{"model_type": "llama", ')
    with pytest.raises(ValueError, match=r"config\.json is not valid JSON") as info:
        load(corrupt)
    assert str(corrupt) in str(info.value)
    incomplete = copy_checkpoint(llama, tmp_path / "incomplete")
    edit_json(incomplete / "config.json", hidden_size=None)
    with pytest.raises(ValueError, match="'hidden_size'"):
        load(incomplete)


@pytest.mark.parametrize("dtype", [DType.U8, DType.U32, DType.I64, DType.F64, torch.float64])
def test_non_float_dtypes_are_refused(llama, dtype):
    with pytest.raises(ValueError, match="dtype .*DType.F32, DType.F16 or DType.BF16"):
        load(llama, dtype=dtype)


@pytest.mark.parametrize("dtype", ["bf16", "float16", 16])
def test_dtype_of_wrong_type(llama, dtype):
    with pytest.raises(TypeError, match="dtype must be a mistralrs.DType"):
        load(llama, dtype=dtype)


@pytest.mark.parametrize("dtype, torch_dtype", [(DType.F16, torch.float16), (DType.BF16, torch.bfloat16),
                                                (DType.F32, torch.float32), (torch.float16, torch.float16)])
def test_dtype_loads_in_that_dtype(llama, dtype, torch_dtype):
    with load(llama, dtype=dtype) as r:
        assert r.pipeline.dtype == torch_dtype
        assert {t.dtype for t in state(r).values()} == {torch_dtype}
        assert {c.dtype for c in r.pipeline.model_runner.kv_caches[0]} == {torch_dtype}
        assert chat(r)["usage"]["completion_tokens"] == 1  # and it runs


def test_kind_and_argument_validation(llama):
    path = str(llama)
    with pytest.raises(ValueError, match="order_file is required for model kind XLoraNormal"):
        XLoraLoader(LlamaLoader, model_id=path, xlora_model_id="x")
    with pytest.raises(ValueError, match="xlora_model_id is required"):
        XLoraLoader(LlamaLoader, model_id=path, order_file="order.json")
    with pytest.raises(ValueError, match="quantized_model_id is required for model kind QuantizedGGUF"):
        QuantizedLoader(LlamaLoader, model_id=path, is_gguf=True, quantized_filename="m.gguf")
    with pytest.raises(ValueError, match="quantized_filename is required for model kind QuantizedGGML"):
        QuantizedLoader(LlamaLoader, model_id=path, is_gguf=False, quantized_model_id="q")
    with pytest.raises(TypeError, match="is_gguf must be a bool"):
        QuantizedLoader(LlamaLoader, model_id=path, is_gguf="yes", quantized_model_id="q", quantized_filename="f")
    with pytest.raises(ValueError, match="order_file is not allowed for model kind Normal"):
        LlamaLoader(path, ModelKind.Normal, order_file="order.json")
    with pytest.raises(TypeError, match="kind must be a mistralrs.ModelKind"):
        LlamaLoader(path, "normal")
    with pytest.raises(TypeError, match="MistralLoader, GemmaLoader, LlamaLoader, MixtralLoader, Phi2Loader"):
        NormalLoader("llama", model_id=path)
    with pytest.raises(TypeError, match="the first argument must be"):
        NormalLoader(mistralrs.loader.ArchLoader, model_id=path)
    with pytest.raises(ValueError, match="repeat_last_n must be an int >= 0"):
        NormalLoader(LlamaLoader, model_id=path, repeat_last_n=-1)
    for gqa in (0, "2", 1.5):
        with pytest.raises(ValueError, match="gqa must be an int >= 1 or None"):
            NormalLoader(LlamaLoader, model_id=path, gqa=gqa)
    with pytest.raises(ValueError, match="needs a model_id"):
        LlamaLoader().load(token_source="none")


@pytest.mark.parametrize("max_seqs", [0, -1, True, 2.0, "4"])
def test_max_seqs(llama, max_seqs):
    with pytest.raises(ValueError, match="max_seqs must be an int >= 1"):
        load(llama, max_seqs=max_seqs)


@pytest.mark.parametrize("threads", [0, -2, True, 1.5, "2"])
def test_threads_must_be_a_positive_int(llama, threads):
    with pytest.raises(ValueError, match="threads must be an int >= 1 or None"):
        load(llama, threads=threads)


def engine_threads(runner) -> int:
    """The CPU kernels' threads as the engine thread sees them (its own torch ops run on it alone)."""
    seen = []
    runner.engine.call(lambda: seen.append((kernels.cpu_threads(), torch.get_num_threads())))
    kernel_threads, torch_threads = seen[0]
    assert torch_threads == (1 if cpu_ext.ext is not None else kernel_threads)
    return kernel_threads


def test_threads_apply_to_the_engine_thread(llama):
    with load(llama, threads=1) as runner:
        assert engine_threads(runner) == 1
        reply = json.loads(runner.send_completion_request(CompletionRequest("def", "m", max_tokens=3, temperature=0)))
        assert reply["usage"]["completion_tokens"] == 3


def test_default_threads_are_the_callers_at_most_one_per_physical_core(llama, monkeypatch):
    from mistralrs import runner as runner_module
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        with load(llama) as runner:
            assert engine_threads(runner) == 1  # the caller's torch.set_num_threads is kept
        torch.set_num_threads(before)
        monkeypatch.setattr(runner_module, "physical_cores", lambda: 1)  # e.g. 1 core with 2 hyperthreads
        with load(llama) as runner:
            assert engine_threads(runner) == 1
    finally:
        torch.set_num_threads(before)


def test_physical_cores():
    from mistralrs.runner import physical_cores
    n = physical_cores()
    assert 1 <= n <= os.cpu_count()
    psutil = pytest.importorskip("psutil")
    if len(os.sched_getaffinity(0)) == os.cpu_count():  # the whole machine is ours: psutil counts the same cores
        assert n == psutil.cpu_count(logical=False)


def test_truncate_sequence_must_be_bool(llama):
    with pytest.raises(TypeError, match="truncate_sequence must be a bool"):
        load(llama, truncate_sequence="yes")


def _rewrite_weights(directory: Path, edit):
    tensors = load_file(str(directory / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(directory / "model.safetensors"))


def test_bad_tensors(llama, tmp_path):
    name = "model.layers.1.mlp.up_proj.weight"
    missing = copy_checkpoint(llama, tmp_path / "missing")
    _rewrite_weights(missing, lambda t: t.pop(name))
    with pytest.raises(ValueError, match=rf"missing tensors \[.*{name}"):
        load(missing)
    reshaped = copy_checkpoint(llama, tmp_path / "reshaped")
    _rewrite_weights(reshaped, lambda t: t.update({name: t[name][:-1].clone()}))
    with pytest.raises(ValueError, match=rf"tensor {name} has shape \(127, 64\), the config implies \(128, 64\)"):
        load(reshaped)
    extra = copy_checkpoint(llama, tmp_path / "extra")
    _rewrite_weights(extra, lambda t: t.update({"model.layers.9.bogus.weight": torch.zeros(2)}))
    with pytest.raises(ValueError, match=r"unexpected tensors \['model.layers.9.bogus.weight'\]"):
        load(extra)


# ---- 4. overrides ----

def test_tokenizer_json_override(llama, tmp_path):
    original = Tokenizer.from_file(str(llama / "tokenizer.json"))
    lower = Tokenizer.from_file(str(llama / "tokenizer.json"))
    lower.normalizer = normalizers.Lowercase()
    lower.save(str(tmp_path / "lower.json"))
    text = "THE RIVER GOES WHERE"
    assert lower.encode(text).ids != original.encode(text).ids  # the override is observable
    with load(llama, wrapper_kw={"tokenizer_json": str(tmp_path / "lower.json")}) as r:
        assert r.pipeline.tokenizer.encode(text).ids == lower.encode(text).ids
        reply = json.loads(r.send_completion_request(CompletionRequest(text, "tiny", max_tokens=1, temperature=0)))
        assert reply["usage"]["prompt_tokens"] == len(lower.encode(text).ids)
    with pytest.raises(FileNotFoundError, match="tokenizer_json .*nope.json"):
        load(llama, wrapper_kw={"tokenizer_json": str(tmp_path / "nope.json")})


def test_default_chat_template_comes_from_tokenizer_config(llama):
    with load(llama) as r:
        expected = "<s><|user|>\nHello there</s>\n<|assistant|>\n"
        assert chat_template_module.render(r.pipeline.chat_template, MSGS, r.pipeline.special_tokens) == expected
        assert chat(r)["usage"]["prompt_tokens"] == n_tokens(r, expected)


def _template_overrides(tmp_path: Path) -> list[tuple[str, str]]:
    """(chat_template= value, expected rendering of MSGS)."""
    literal = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    jinja = tmp_path / "upper.jinja"
    jinja.write_text("{{ bos_token }}{% for m in messages %}{{ m['content'] | upper }}{% endfor %}")
    as_json = tmp_path / "template.json"
    as_json.write_text(json.dumps({
        "chat_template": "{{ bos_token }}{% for m in messages %}[{{ m['content'] }}]{{ eos_token }}{% endfor %}",
        "bos_token": "</s>", "eos_token": {"content": "<unk>", "special": True}}))
    return [(literal, "<user>Hello there"), (str(jinja), "<s>HELLO THERE"), (str(as_json), "</s>[Hello there]<unk>")]


@pytest.mark.parametrize("which", ["literal", "jinja file", "json file"])
def test_chat_template_override(llama, tmp_path, which):
    override, expected = _template_overrides(tmp_path)[["literal", "jinja file", "json file"].index(which)]
    with load(llama, wrapper_kw={"chat_template": override}) as r:
        assert chat_template_module.render(r.pipeline.chat_template, MSGS, r.pipeline.special_tokens) == expected
        assert chat(r)["usage"]["prompt_tokens"] == n_tokens(r, expected)
        assert n_tokens(r, expected) != n_tokens(r, "<s><|user|>\nHello there</s>\n<|assistant|>\n")


def test_chat_template_override_errors(llama, tmp_path):
    (tmp_path / "no_key.json").write_text(json.dumps({"bos_token": "<s>"}))
    with pytest.raises(ValueError, match="no 'chat_template' key"):
        load(llama, wrapper_kw={"chat_template": str(tmp_path / "no_key.json")})
    (tmp_path / "broken.json").write_text("{bad")
    with pytest.raises(ValueError, match="chat_template file .*broken.json is not valid JSON"):
        load(llama, wrapper_kw={"chat_template": str(tmp_path / "broken.json")})
    with pytest.raises(FileNotFoundError,
                       match="chat_template .*neither a Jinja template, an existing file nor the name"):
        load(llama, wrapper_kw={"chat_template": str(tmp_path / "missing.jinja")})
    with pytest.raises(TypeError, match="chat_template must be a str"):
        load(llama, wrapper_kw={"chat_template": 3})


def test_raise_exception_in_template_is_a_request_error(llama):
    template = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system turns here') }}"
                "{% endif %}{{ m['content'] }}{% endfor %}")
    with load(llama, wrapper_kw={"chat_template": template}) as r:
        with pytest.raises(ValueError, match="chat template failed: no system turns here"):
            chat(r, [{"role": "system", "content": "x"}] + MSGS)
        assert chat(r)["usage"]["prompt_tokens"] == n_tokens(r, "Hello there")  # still serving
    with load(llama) as r:  # the tokenizer_config template refuses the "tool" role
        with pytest.raises(ValueError, match="Conversation roles must be user, assistant or system, got tool"):
            chat(r, [{"role": "tool", "content": "x"}])
        assert chat(r)["choices"][0]["finish_reason"] in ("length", "stop")


def test_gqa_none_and_one_load(llama):
    with load(llama, wrapper_kw={"gqa": None}) as none, load(llama, wrapper_kw={"gqa": 1}) as one:
        assert_same_weights(state(none), state(one))


# ---- 5. EOS ids ----

def test_eos_ids_from_every_config(llama, tmp_path):
    ckpt = copy_checkpoint(llama, tmp_path / "eos")
    edit_json(ckpt / "generation_config.json", eos_token_id=[2, 5])
    with load(ckpt) as r:
        assert r.pipeline.eos_token_ids == {2, 5}
    edit_json(ckpt / "config.json", eos_token_id=7)
    edit_json(ckpt / "tokenizer_config.json", eos_token={"content": "<unk>", "special": True})
    with load(ckpt) as r:
        assert r.pipeline.eos_token_ids == {0, 2, 5, 7}
    (ckpt / "generation_config.json").unlink()
    edit_json(ckpt / "config.json", eos_token_id=[3, 4])
    with load(ckpt) as r:
        assert r.pipeline.eos_token_ids == {0, 3, 4}
