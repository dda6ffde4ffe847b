"""Gemma 2 and Gemma 3 beyond what every architecture's tests check (test_models.py, test_gguf.py): float32 logits
within 5e-5 of transformers' in prefill and in decode past the sliding window, each config feature parsed as
transformers parses it and shown to matter, the Gemma 3 image-text checkpoint's text model in both weight layouts,
and configs the GGUF format cannot carry."""
import json
import shutil
import threading

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import mistralrs
from mistralrs import CompletionRequest
from mistralrs.engine.sequence import Sequence
from mistralrs.models import gemma

import convert_to_gguf
from helpers import PROMPT, Driver, all_logits, hf_greedy, hf_model, load, prompt_ids

# float32 logits (of scale ~4) against transformers' eager float32: our CPU linears, norms and attention sum in one
# fixed order for every batch (test_batch_invariance.py), transformers' in MKL's and torch's: measured up to 2.9e-5
# apart (gemma2, prefill).
TOL = 5e-5


def decode_logits(runner, ids, n):
    """Greedy decode of n tokens one step at a time: (tokens, [n, V] logits of each step)."""
    d, seq, steps = Driver(runner), Sequence(list(ids)), []
    for _ in range(n):
        steps.append(d.step([seq])[0])
        seq.tokens.append(int(steps[-1].argmax()))
    d.finish(seq)
    return seq.tokens[len(ids):], torch.stack(steps)


@pytest.mark.parametrize("arch", ["gemma2", "gemma3"])
def test_prefill_and_decode_logits_match_transformers(tiny_models, arch):
    """A 57-token prompt and 24 decode steps against a window of 8: every sliding layer drops keys all along."""
    runner = load(tiny_models[arch], arch, kv_cache_tokens=256, block_size=4)
    ids = prompt_ids(runner)
    tokens, steps = decode_logits(runner, ids, 24)
    with torch.no_grad():
        ref = hf_model(tiny_models[arch])(torch.tensor([ids + tokens[:-1]])).logits[0]
    prefill = (all_logits(runner, ids) - ref[:len(ids)]).abs().max().item()
    decode = (steps - ref[len(ids) - 1:]).abs().max().item()
    print(f"{arch}: max |logits - transformers| prefill {prefill:.1e}, decode {decode:.1e}")
    assert prefill <= TOL and decode <= TOL
    assert len(set(tokens)) >= 8


def test_batched_ragged_decode(tiny_models):
    """Two sequences of different lengths in one step give each one's own logits (sliding and global layers)."""
    runner = load(tiny_models["gemma3"], "gemma3", kv_cache_tokens=256, block_size=4)
    ids = prompt_ids(runner)
    a, b = Sequence(ids[:30]), Sequence(ids)
    d = Driver(runner)
    together = d.step([a, b])
    d.finish(a, b)
    for seq, row in ((ids[:30], together[0]), (ids, together[1])):
        assert (all_logits(runner, seq)[-1] - row).abs().max().item() <= TOL


def test_concurrent_requests_with_preemption_equal_solo_runs(tiny_models):
    """Batched prefill and decode, preemption and recompute over a cache too small for all: the same greedy texts
    as one request at a time (every prompt longer than the window)."""
    prompts = [(PROMPT * 2)[: 60 + 17 * i] for i in range(8)]
    requests = [CompletionRequest(p, "tiny", max_tokens=12, temperature=0) for p in prompts]
    with load(tiny_models["gemma3"], "gemma3", max_seqs=1) as solo:
        expected = [json.loads(solo.send_completion_request(r))["choices"][0]["text"] for r in requests]
    with load(tiny_models["gemma3"], "gemma3", max_seqs=4, kv_cache_tokens=128, block_size=8) as runner:
        results = [None] * len(requests)

        def worker(k):
            for i in range(k, len(requests), 4):
                results[i] = json.loads(runner.send_completion_request(requests[i]))["choices"][0]["text"]

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert runner.scheduler.preemptions > 0
    assert results == expected


def edited_copy(src, dst, **edits):
    """A copy of the checkpoint with config.json keys replaced (None is written as null)."""
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(edits)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


FULL, SLIDING = "full_attention", "sliding_attention"
VARIANTS = [
    ("gemma2", {"query_pre_attn_scalar": 24}),
    ("gemma2", {"attn_logit_softcapping": None}),
    ("gemma2", {"final_logit_softcapping": None}),
    ("gemma2", {"sliding_window": 4}),
    ("gemma2", {"layer_types": [FULL, SLIDING, SLIDING]}),
    ("gemma3", {"rope_local_base_freq": 1e5}),
    ("gemma3", {"rope_theta": 1e4}),
    ("gemma3", {"rope_scaling": None}),
    ("gemma3", {"sliding_window_pattern": 3}),
]


@pytest.mark.parametrize("arch, edits", VARIANTS, ids=[f"{a}-{next(iter(e))}" for a, e in VARIANTS])
def test_config_feature_matches_transformers_and_matters(tiny_models, tmp_path, arch, edits):
    path = edited_copy(tiny_models[arch], tmp_path / arch, **edits)
    runner, base = load(path, arch, kv_cache_tokens=256), load(tiny_models[arch], arch, kv_cache_tokens=256)
    ids = prompt_ids(runner)
    with torch.no_grad():
        ref = hf_model(path)(torch.tensor([ids])).logits[0]
    ours = all_logits(runner, ids)
    assert (ours - ref).abs().max().item() <= TOL
    assert (ours - all_logits(base, ids)).abs().max().item() > 1e-3  # the feature is exercised


def test_transformers5_config_layout(tiny_models, tmp_path):
    """transformers 5 writes Gemma 3's rope as per-layer-type rope_parameters and spells out layer_types: the same
    model as the hub's rope_theta / rope_local_base_freq / rope_scaling / sliding_window_pattern keys."""
    cfg = transformers.AutoConfig.from_pretrained(tiny_models["gemma3"]).to_dict()
    assert set(cfg["rope_parameters"]) == {FULL, SLIDING} and "rope_theta" not in cfg
    dst = tmp_path / "t5"
    shutil.copytree(tiny_models["gemma3"], dst)
    (dst / "config.json").write_text(json.dumps(cfg))
    ids = prompt_ids(load(dst, "gemma3"))
    assert torch.equal(all_logits(load(dst, "gemma3"), ids), all_logits(load(tiny_models["gemma3"], "gemma3"), ids))


# ---- the image-text checkpoint (Gemma3ForConditionalGeneration): its text model ----

VISION = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28,
              patch_size=14)


@pytest.fixture(scope="module")
def image_text(tiny_models, tmp_path_factory):
    """{layout: checkpoint dir}: transformers' Gemma3ForConditionalGeneration with the tiny Gemma 3's text weights and
    a random tiny SigLIP tower, saved by save_pretrained (the hub's layout: language_model.model.*, vision_tower.*)
    and with transformers 5's module names (model.language_model.*, model.vision_tower.*)."""
    src = tiny_models["gemma3"]
    text = json.loads((src / "config.json").read_text())
    cfg = transformers.Gemma3Config(text_config=text, vision_config=VISION, mm_tokens_per_image=1,
                                    image_token_index=3, boi_token_index=4, eoi_token_index=5)
    torch.manual_seed(0)
    model = transformers.Gemma3ForConditionalGeneration(cfg)
    weights = {k.removeprefix("model."): v for k, v in load_file(src / "model.safetensors").items()}
    model.model.language_model.load_state_dict(weights, strict=True)
    root = tmp_path_factory.mktemp("gemma3-image-text")
    hub = root / "hub"
    model.save_pretrained(hub)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        shutil.copy(src / f, hub / f)
    names = load_file(hub / "model.safetensors")
    assert "language_model.model.layers.0.self_attn.q_norm.weight" in names
    assert any(k.startswith("vision_tower.") for k in names) and any(k.startswith("multi_modal_projector.")
                                                                     for k in names)
    t5 = root / "transformers5"
    shutil.copytree(hub, t5)
    moved = {("model." + k if k.startswith(("vision_tower.", "multi_modal_projector.")) else
              k.replace("language_model.model.", "model.language_model.")): v for k, v in names.items()}
    save_file(moved, str(t5 / "model.safetensors"), metadata={"format": "pt"})
    return {"hub": hub, "transformers5": t5}


@pytest.mark.parametrize("layout", ["hub", "transformers5"])
def test_image_text_checkpoint_runs_its_text_model(tiny_models, image_text, layout):
    path = image_text[layout]
    runner = load(path, "gemma3")
    ids = prompt_ids(runner)
    ref_model = transformers.Gemma3ForConditionalGeneration.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        ref = ref_model(input_ids=torch.tensor([ids])).logits[0]
    ours = all_logits(runner, ids)
    assert (ours - ref).abs().max().item() <= TOL
    assert torch.equal(ours, all_logits(load(tiny_models["gemma3"], "gemma3"), ids))
    tokens, _ = decode_logits(runner, ids, 16)
    assert tokens == hf_greedy(ref_model, ids, 16)


# ---- configs ----

# google/gemma-3-4b-it's text_config: everything else is Gemma3TextConfig's defaults.
HUB_4B = {"model_type": "gemma3", "text_config": {
    "hidden_size": 2560, "intermediate_size": 10240, "model_type": "gemma3_text", "num_hidden_layers": 34,
    "rope_scaling": {"factor": 8.0, "rope_type": "linear"}, "sliding_window": 1024}}


def test_sparse_hub_config_reads_as_transformers_reads_it():
    a = gemma.Args.from_hf(HUB_4B)
    t = transformers.Gemma3Config(**{k: v for k, v in HUB_4B.items() if k != "model_type"}).text_config
    assert (a.vocab_size, a.hidden_size, a.intermediate_size, a.num_hidden_layers, a.num_attention_heads,
            a.num_key_value_heads, a.head_dim, a.max_position_embeddings, a.norm_eps) == (
        t.vocab_size, t.hidden_size, t.intermediate_size, t.num_hidden_layers, t.num_attention_heads,
        t.num_key_value_heads, t.head_dim, t.max_position_embeddings, t.rms_norm_eps)
    assert (a.query_pre_attn_scalar, a.sliding_window, a.layer_types) == (
        t.query_pre_attn_scalar, t.sliding_window, t.layer_types)
    full, local = t.rope_parameters[FULL], t.rope_parameters[SLIDING]
    assert (a.rope_theta, a.rope_scaling["factor"], a.rope_local_theta) == (
        full["rope_theta"], full["factor"], local["rope_theta"])
    assert a.tie_word_embeddings and a.qk_norm and a.sandwich_norms
    assert a.attn_logit_softcapping is a.final_logit_softcapping is None


def test_embedding_gemma_is_refused():
    with pytest.raises(ValueError, match="use_bidirectional_attention"):
        gemma.Args.from_hf({**HUB_4B["text_config"], "use_bidirectional_attention": True})


@pytest.mark.parametrize("arch, edits, match", [
    ("gemma2", {"query_pre_attn_scalar": 24}, "scales this model's queries"),
    ("gemma2", {"layer_types": [FULL, SLIDING, SLIDING]}, "sliding window on 1 of 2"),
    ("gemma3", {"rope_local_base_freq": 1e5}, "local rope base"),
])
def test_gguf_converter_refuses_what_llama_cpp_fixes(tiny_models, tmp_path, arch, edits, match):
    path = edited_copy(tiny_models[arch], tmp_path / arch, **edits)
    with pytest.raises(ValueError, match=match):
        convert_to_gguf.convert(path, tmp_path / "out.gguf")


def test_gguf_metadata_as_llama_cpp_reads_it(gguf_file):
    """The layer pattern, query scale and soft caps llama.cpp derives from a gemma2 / gemma3 file."""
    loader = mistralrs.QuantizedLoader(mistralrs.GemmaLoader, model_id=None, is_gguf=True, quantized_model_id="",
                                       quantized_filename=str(gguf_file("gemma3")))
    with loader.load(token_source="none", kv_cache_tokens=64) as runner:
        attn = [layer.self_attn for layer in runner.pipeline.model_runner.model.model.layers]
        rotaries = runner.pipeline.model_runner.model.layer_rotaries
    assert [a.sliding_window for a in attn] == [8] * 5 + [None] + [8]
    assert [a.q_norm is not None for a in attn] == [True] * 7 and {a.scale for a in attn} == {32 ** -0.5}
    assert len({id(r) for r in rotaries}) == 2 and rotaries[5] is not rotaries[0]
