"""X-LoRA through XLoraLoader against PEFT's XLoraModel on the same tiny llama, adapters and classifier."""
import json
import shutil
from pathlib import Path

import pytest
import torch
from openai.types import Completion

import mistralrs
from mistralrs import CompletionRequest
from mistralrs.engine.sequence import Sequence

import convert_to_gguf
import make_tiny_xlora
import write_ggml
from helpers import ARCHS, PROMPT, Driver, all_logits, greedy

VARIANTS = {"depth1": dict(depth=1), "depth2": dict(depth=2), "depth2_layerwise": dict(depth=2, layerwise=True)}




TOOL = make_tiny_xlora


@pytest.fixture(scope="module")
def repos(tiny_models, tmp_path_factory):
    """variant -> X-LoRA repo dir written with PEFT (ordering.json inside), built once per module."""
    root = tmp_path_factory.mktemp("xlora")
    return {name: TOOL.write_xlora(tiny_models["llama"], root / name, **kw) for name, kw in VARIANTS.items()}


def load(base, repo, order_file=None, arch="llama", **kw):
    loader = mistralrs.XLoraLoader(ARCHS[arch], model_id=str(base), no_kv_cache=kw.pop("no_kv_cache", False),
                                   order_file=str(order_file or Path(repo) / "ordering.json"),
                                   xlora_model_id=str(repo))
    return loader.load(token_source="none", **kw)


def prompt_ids(runner, text=PROMPT):
    return runner.pipeline.tokenizer.encode(text).ids


@pytest.mark.parametrize("variant", VARIANTS)
def test_prefill_logits_match_peft(tiny_models, repos, variant):
    base = tiny_models["llama"]
    runner = load(base, repos[variant])
    ids = prompt_ids(runner)
    ref_model = TOOL.peft_xlora(base, repos[variant])
    with torch.no_grad():
        ref = ref_model(input_ids=torch.tensor([ids])).logits[0]
        plain = TOOL._hf_model(base)(torch.tensor([ids])).logits[0]
    scalings = ref_model.get_latest_scalings()[0]  # [T, n_layers, A]
    ours = all_logits(runner, ids)
    diff = (ours - ref).abs().max().item()
    print(f"{variant}: max |logits - PEFT X-LoRA| = {diff:.2e}")  # shown with -s
    assert diff <= 2.5e-4, diff  # float32 in other summation orders than PEFT's (see the next test): up to 1.0e-4
    # The check could not pass by accident: the adapters move the logits, and the scalings vary by token.
    assert (ref - plain).abs().max().item() > 1.0
    assert scalings.amax(dim=0).min().item() > 0.5 and scalings.amin(dim=0).max().item() < 0.5


@pytest.mark.parametrize("arch", [a for a in ARCHS if a != "llama"])
def test_every_architecture_matches_peft(tiny_models, tmp_path, arch):
    """Prefill logits and greedy tokens; Phi-2's adapters sit on dense/fc2, whose names we rename."""
    base = tiny_models[arch]
    repo = TOOL.write_xlora(base, tmp_path / arch, depth=2)
    runner = load(base, repo, arch=arch)
    ids = prompt_ids(runner)
    ref_model = TOOL.peft_xlora(base, repo)
    with torch.no_grad():
        ref = ref_model(input_ids=torch.tensor([ids])).logits[0]
    ours = all_logits(runner, ids)
    diff = (ours - ref).abs().max().item()
    print(f"{arch}: max |logits - PEFT X-LoRA| = {diff:.2e}")
    # float32 rounding in other summation orders than PEFT's (our CPU attention and norms use one order for every
    # batch), amplified by the scalings pass and Mixtral's routing: measured 1e-5 .. 1.4e-4 on logits up to ~9
    assert diff <= 2.5e-4, diff
    ref_model.generation_config.eos_token_id = None
    with torch.no_grad():
        out = ref_model.generate(input_ids=torch.tensor([ids]), max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert greedy(runner, ids, 8) == out[0, len(ids):].tolist()


@pytest.mark.parametrize("no_kv_cache", [False, True], ids=["kv_cache", "no_kv_cache"])
@pytest.mark.parametrize("variant", ["depth1", "depth2"])
def test_greedy_matches_peft_generate(tiny_models, repos, variant, no_kv_cache):
    base = tiny_models["llama"]
    runner = load(base, repos[variant], no_kv_cache=no_kv_cache)
    ids = prompt_ids(runner)
    ours = greedy(runner, ids, 16)
    ref_model = TOOL.peft_xlora(base, repos[variant])
    ref_model.generation_config.eos_token_id = None
    with torch.no_grad():  # PEFT's X-LoRA generate recomputes the whole sequence every step (use_cache=False)
        out = ref_model.generate(input_ids=torch.tensor([ids]), max_new_tokens=16, min_new_tokens=16, do_sample=False)
    assert ours == out[0, len(ids):].tolist()
    assert len(set(ours)) >= 4


def test_ragged_batch_equals_single_runs(tiny_models, repos):
    """Two sequences of different lengths share prefill and decode steps; each matches its solo run."""
    runner = load(tiny_models["llama"], repos["depth2"])
    prompts = [prompt_ids(runner), prompt_ids(runner, "Where does the river go?")]
    solo = [greedy(runner, ids, 8) for ids in prompts]
    d, seqs = Driver(runner), [Sequence(list(ids)) for ids in prompts]
    for _ in range(8):
        nxt = d.step(seqs).argmax(-1).tolist()
        for s, t in zip(seqs, nxt):
            s.tokens.append(t)
    assert [s.tokens[len(p):] for s, p in zip(seqs, prompts)] == solo


def test_runner_completion_matches_peft(tiny_models, repos):
    base = tiny_models["llama"]
    with load(base, repos["depth1"]) as runner:
        c = Completion.model_validate_json(runner.send_completion_request(
            CompletionRequest(PROMPT, "tiny", max_tokens=12, temperature=0)))
        ids = prompt_ids(runner)
        ref_model = TOOL.peft_xlora(base, repos["depth1"])
        ref_model.generation_config.eos_token_id = None
        with torch.no_grad():
            out = ref_model.generate(input_ids=torch.tensor([ids]), max_new_tokens=12, do_sample=False)
        assert c.choices[0].text == runner.pipeline.tokenizer.decode(out[0, len(ids):].tolist())


@pytest.mark.parametrize("layout", ["peft_names", "mistralrs_names"])
def test_other_file_layouts(tiny_models, repos, tmp_path, layout):
    """PEFT's file names (adapter_config.json with peft_type XLORA, adapter_model.safetensors, base_model. prefix) and
    mistral.rs's classifier names (inner.<k>, last) load the same model."""
    from safetensors.torch import load_file, save_file

    repo = tmp_path / "repo"
    shutil.copytree(repos["depth2"], repo)
    tensors = load_file(repo / "xlora_classifier.safetensors")
    if layout == "peft_names":
        (repo / "xlora_config.json").rename(repo / "adapter_config.json")
        (repo / "xlora_classifier.safetensors").unlink()
        save_file({f"base_model.{k}": v for k, v in tensors.items()}, repo / "adapter_model.safetensors")
    else:
        names = {"layers.0": "inner.0", "layers.3": "last"}  # PEFT's Sequential: Linear, ReLU, Dropout, Linear
        save_file({names[k.split(".", 1)[1].rsplit(".", 1)[0]] + "." + k.rsplit(".", 1)[1]: v
                   for k, v in tensors.items()}, repo / "xlora_classifier.safetensors")
    diff = _prefill_vs_peft(load(tiny_models["llama"], repo), tiny_models["llama"], repos["depth2"])
    assert diff <= 3e-5, diff


def test_ordering_without_base_model_id(tiny_models, repos, tmp_path):
    order = json.loads((repos["depth1"] / "ordering.json").read_text())
    del order["base_model_id"]
    (tmp_path / "o.json").write_text(json.dumps(order))
    runner = load(tiny_models["llama"], repos["depth1"], order_file=tmp_path / "o.json")
    assert len(greedy(runner, prompt_ids(runner), 2)) == 2


def _bad_ordering(repos, tmp_path, change):
    order = json.loads((repos["depth1"] / "ordering.json").read_text())
    change(order)
    (tmp_path / "o.json").write_text(json.dumps(order))
    return tmp_path / "o.json"


def test_missing_order_file(tiny_models, repos, tmp_path):
    base, repo = str(tiny_models["llama"]), str(repos["depth1"])
    with pytest.raises(ValueError, match="order_file"):
        mistralrs.XLoraLoader(mistralrs.LlamaLoader, model_id=base, xlora_model_id=repo)
    with pytest.raises(FileNotFoundError, match="order_file"):
        load(base, repo, order_file=tmp_path / "nope.json")


def test_ordering_adapters_must_match_the_repo(tiny_models, repos, tmp_path):
    base = tiny_models["llama"]
    bad = _bad_ordering(repos, tmp_path, lambda o: o["order"].__setitem__(2, "adapter_9"))
    with pytest.raises(ValueError, match="'order'.*adapter_9"):
        load(base, repos["depth1"], order_file=bad)
    bad = _bad_ordering(repos, tmp_path, lambda o: o["order"].pop())
    with pytest.raises(ValueError, match="'order'"):
        load(base, repos["depth1"], order_file=bad)


def test_adapter_directories_match_by_exact_name(tiny_models, repos, tmp_path):
    """adapter_1's folder renamed adapter_10: adapter_1 must not be found by a substring match."""
    repo = tmp_path / "repo"
    shutil.copytree(repos["depth1"], repo)
    (repo / "adapter_1").rename(repo / "adapter_10")
    with pytest.raises(FileNotFoundError, match="adapter 'adapter_1'"):
        load(tiny_models["llama"], repo)


@pytest.mark.parametrize("edit, error, match", [
    (lambda c: c.__setitem__("xlora_size", 16), ValueError, "classifier weight shapes"),
    (lambda c: c.pop("hidden_size"), ValueError, "hidden_size"),
    (lambda c: c.__setitem__("hidden_size", 32), ValueError, "hidden_size 32"),
    (lambda c: c.__setitem__("xlora_depth", 0), ValueError, "xlora_depth"),
], ids=["xlora_size", "no_hidden_size", "hidden_size", "depth"])
def test_bad_xlora_config(tiny_models, repos, tmp_path, edit, error, match):
    repo = tmp_path / "repo"
    shutil.copytree(repos["depth2"], repo)
    cfg = json.loads((repo / "xlora_config.json").read_text())
    edit(cfg)
    (repo / "xlora_config.json").write_text(json.dumps(cfg))
    with pytest.raises(error, match=match):
        load(tiny_models["llama"], repo)


def test_missing_xlora_files(tiny_models, repos, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(repos["depth1"], repo)
    (repo / "xlora_classifier.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="xlora_classifier.safetensors"):
        load(tiny_models["llama"], repo, order_file=repos["depth1"] / "ordering.json")
    (repo / "xlora_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="xlora_config.json"):
        load(tiny_models["llama"], repo, order_file=repos["depth1"] / "ordering.json")


def test_base_model_id_mismatch(tiny_models, repos, tmp_path):
    bad = _bad_ordering(repos, tmp_path, lambda o: o.__setitem__("base_model_id", "HuggingFaceH4/zephyr-7b-beta"))
    with pytest.raises(ValueError, match="base_model_id"):
        load(tiny_models["llama"], repos["depth1"], order_file=bad)


def test_ordering_layer_not_in_model(tiny_models, repos, tmp_path):
    def rename(o):
        o["layers"]["model.layers.7.self_attn.q_proj"] = o["layers"].pop("model.layers.0.self_attn.q_proj")
    bad = _bad_ordering(repos, tmp_path, rename)
    with pytest.raises(ValueError, match="does not list|not a module"):
        load(tiny_models["llama"], repos["depth1"], order_file=bad)


def peft_non_granular_greedy(ref_model, ids, n, tgt):
    """PEFT's X-LoRA, full recompute each step, with the scalings of every position after prompt_len - 1 + tgt
    replaced by that position's: what tgt_non_granular_index means per sequence."""
    clf = ref_model.base_model.internal_xlora_classifier
    at, plain = len(ids) - 1 + tgt, clf.forward

    def frozen(*args, **kwargs):
        s = plain(*args, **kwargs).clone()  # [1, T, n_layers, A]
        s[:, at + 1:] = s[:, at:at + 1]
        return s
    clf.forward = frozen
    try:
        seq = list(ids)
        with torch.no_grad():
            for _ in range(n):
                seq.append(int(ref_model(input_ids=torch.tensor([seq])).logits[0, -1].argmax()))
    finally:
        clf.forward = plain
    return seq[len(ids):]


@pytest.mark.parametrize("no_kv_cache", [False, True], ids=["kv_cache", "no_kv_cache"])
@pytest.mark.parametrize("tgt", [0, 3])
def test_tgt_non_granular_index(tiny_models, repos, tgt, no_kv_cache):
    """Per sequence, so two prompts of different lengths share every step (max_seqs is not forced to 1)."""
    base, repo = tiny_models["llama"], repos["depth2"]
    loader = mistralrs.XLoraLoader(mistralrs.LlamaLoader, model_id=str(base), order_file=str(repo / "ordering.json"),
                                   xlora_model_id=str(repo), tgt_non_granular_index=tgt, no_kv_cache=no_kv_cache)
    runner = loader.load(token_source="none")
    d, ref_model = Driver(runner), TOOL.peft_xlora(base, repo)
    prompts = [prompt_ids(runner), prompt_ids(runner, "Where does the river go?")]
    seqs = [Sequence(list(ids)) for ids in prompts]
    for _ in range(10):
        for s, t in zip(seqs, d.step(seqs).argmax(-1).tolist()):
            s.tokens.append(t)
    for s, ids in zip(seqs, prompts):
        assert s.tokens[len(ids):] == peft_non_granular_greedy(ref_model, ids, 10, tgt)
        assert s.model_state.scalings is not None and s.model_state.at == len(ids) - 1 + tgt
    # the check can fail: frozen scalings change the logits of the later tokens
    ids = seqs[0].tokens
    with torch.no_grad():
        free = ref_model(input_ids=torch.tensor([ids])).logits[0, -1]
    d.finish(*seqs)
    s = Sequence(list(ids[:len(prompts[0])]))
    d.step([s])
    s.tokens = list(ids)
    assert (d.step([s])[0] - free).abs().max().item() > 1e-2


def test_tgt_non_granular_index_survives_preemption(tiny_models, repos):
    """A preempted sequence recomputes its whole context in one step: tokens up to the freeze point get their own
    scalings again, later ones the frozen ones."""
    base, repo = tiny_models["llama"], repos["depth2"]
    loader = mistralrs.XLoraLoader(mistralrs.LlamaLoader, model_id=str(base), order_file=str(repo / "ordering.json"),
                                   xlora_model_id=str(repo), tgt_non_granular_index=2)
    runner = loader.load(token_source="none")
    d, ids = Driver(runner), prompt_ids(runner)
    seq = Sequence(list(ids))
    for step in range(10):
        if step == 6:
            d.scheduler._preempt(seq)  # as when an older sequence needs its blocks
        seq.tokens.append(int(d.step([seq]).argmax(-1)))
    assert seq.tokens[len(ids):] == peft_non_granular_greedy(TOOL.peft_xlora(base, repo), ids, 10, 2)


def test_tgt_non_granular_index_skips_the_scaling_pass_and_runs_in_the_runner(tiny_models, repos):
    base, repo = tiny_models["llama"], repos["depth1"]
    loader = mistralrs.XLoraLoader(mistralrs.LlamaLoader, model_id=str(base), order_file=str(repo / "ordering.json"),
                                   xlora_model_id=str(repo), tgt_non_granular_index=1)
    with loader.load(token_source="none") as runner:
        model, calls = runner.pipeline.model_runner.model, []
        plain = model.classifier.forward
        model.classifier.forward = lambda h: calls.append(h.shape[0]) or plain(h)
        prompts = [PROMPT, "Where does the river go?"]
        texts = [Completion.model_validate_json(runner.send_completion_request(
            CompletionRequest(p, "tiny", max_tokens=8, temperature=0))).choices[0].text for p in prompts]
        # per sequence: the prompt and completion token 1 run the scaling pass, the 6 later steps do not
        assert len(calls) == 2 * 2
        ref_model = TOOL.peft_xlora(base, repo)
        for p, text in zip(prompts, texts):
            ids = prompt_ids(runner, p)
            assert text == runner.pipeline.tokenizer.decode(peft_non_granular_greedy(ref_model, ids, 8, 1))


def test_tgt_non_granular_index_must_be_an_int(tiny_models, repos):
    loader = mistralrs.XLoraLoader(mistralrs.LlamaLoader, model_id=str(tiny_models["llama"]),
                                   order_file=str(repos["depth1"] / "ordering.json"),
                                   xlora_model_id=str(repos["depth1"]), tgt_non_granular_index=-1)
    with pytest.raises(ValueError, match="tgt_non_granular_index"):
        loader.load(token_source="none")


def _prefill_vs_peft(runner, base, repo):
    """max |ours - PEFT| over the prompt's logits, relative to max |PEFT logits| (float32 rounding scales with it).
    The tiny random models amplify rounding: 1e-6 to 1.3e-5 here, where the only differences are the order of
    float32 sums (our C++ norm, rotary and attention, fused projections)."""
    ids = prompt_ids(runner)
    with torch.no_grad():
        ref = TOOL.peft_xlora(base, repo)(input_ids=torch.tensor([ids])).logits[0]
    return ((all_logits(runner, ids) - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.parametrize("arch", ARCHS)
def test_f32_gguf_base_matches_peft(tiny_models, tmp_path, arch):
    """XLoraQuantizedLoader on an F32 GGUF of the checkpoint: the same model, so the same logits as PEFT."""
    base = tiny_models[arch]
    repo = TOOL.write_xlora(base, tmp_path / "x", depth=2)
    gguf = convert_to_gguf.convert(base, tmp_path / f"{arch}.gguf", "f32")
    loader = mistralrs.XLoraQuantizedLoader(ARCHS[arch], model_id=str(base), is_gguf=True, quantized_model_id="",
                                            quantized_filename=str(gguf), order_file=str(repo / "ordering.json"),
                                            xlora_model_id=str(repo))
    diff = _prefill_vs_peft(loader.load(token_source="none"), base, repo)
    print(f"{arch} GGUF f32: max |logits - PEFT X-LoRA| / max |logits| = {diff:.2e}")
    assert diff <= 3e-5, diff


@pytest.mark.parametrize("qtype", ["f32", "q8_0"])
def test_ggml_base(tiny_models, tmp_path, qtype):
    """Legacy GGML: F32 is the same model as PEFT's. Q8_0 keeps its blocks under the adapters; its logits are not
    compared, as the tiny random model turns Q8_0's rounding into O(1) logit changes already without X-LoRA."""
    src = tiny_models["llama"]
    base = tmp_path / "llama"  # GGJT cannot express the tiny llama's Llama 3 rope scaling
    shutil.copytree(src, base)
    cfg = json.loads((base / "config.json").read_text())
    cfg["rope_scaling"] = None
    (base / "config.json").write_text(json.dumps(cfg))
    repo = TOOL.write_xlora(base, tmp_path / "x", depth=1)
    ggml = write_ggml.write_ggml(base, tmp_path / "llama.bin", qtype)
    loader = mistralrs.XLoraQuantizedLoader(mistralrs.LlamaLoader, model_id=str(base), is_gguf=False, gqa=2,
                                            quantized_model_id="", quantized_filename=str(ggml),
                                            order_file=str(repo / "ordering.json"), xlora_model_id=str(repo))
    runner = loader.load(token_source="none")
    if qtype == "f32":
        diff = _prefill_vs_peft(runner, base, repo)
        print(f"llama GGML f32: max |logits - PEFT X-LoRA| / max |logits| = {diff:.2e}")
        assert diff <= 3e-5, diff
    else:
        q_proj = runner.pipeline.model_runner.model.base.model.layers[0].self_attn.q_proj
        assert q_proj.base.qweight.dtype == torch.uint8 and q_proj.lora_a.dtype == torch.float32
        assert len(greedy(runner, prompt_ids(runner), 4)) == 4
