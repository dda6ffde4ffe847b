"""Greedy output is the same every time: the same token ids and the same logprobs, bit for bit, whether a request runs
alone, beside 3 or 7 others, streamed, after its prompt was put in the prefix cache, prefilled in chunks of 16
tokens, or on 1 thread instead of the default. On CPU every op computes a token's row the same way whatever the step holds (README, "Batch invariance").

The default run covers tiny checkpoints (float32 safetensors; GGUF Q8_0, Q4_0, Q4_K) of llama, gemma 3 and mixtral;
the real SmolLM2 and Gemma 3 files run under `slow`."""
import json
import threading
import time

import pytest
from tokenizers import Tokenizer

import mistralrs
from mistralrs import ChatCompletionRequest

import convert_to_gguf
import real_models
from helpers import ARCHS

# 8 raw prompts of different lengths; the last four share a long prefix (so a prefix-cache hit covers most of them)
SHARED = "In a small village by the sea there lived an old fisherman who told stories every evening. "
PROMPTS = ["Hello", "The capital of France is", "Once upon a time, in a land far away, a dragon",
           "1, 2, 3, 4, 5,", SHARED + "One", SHARED + "One night a storm came and", SHARED * 2 + "The end.",
           SHARED + "He said:"]
MAX_TOKENS = 16
T = 60  # seconds any wait here may take before the test fails instead of hanging


def request(prompt: str, stream: bool = False) -> ChatCompletionRequest:
    return ChatCompletionRequest(prompt, "m", logprobs=True, top_logprobs=2, max_tokens=MAX_TOKENS, temperature=0,
                                 stream=stream)


def result(runner, prompt: str, stream: bool = False) -> list[tuple]:
    """(token bytes, logprob, top logprobs) of each generated token: the ids' bytes and the exact floats."""
    if stream:
        entries = []
        for chunk in runner.send_chat_completion_request(request(prompt, stream=True)):
            logprobs = (json.loads(chunk) if isinstance(chunk, str) else chunk)["choices"][0]["logprobs"]
            entries += logprobs["content"] if logprobs else []
    else:
        entries = json.loads(runner.send_chat_completion_request(request(prompt)))["choices"][0]["logprobs"]["content"]
    return [(tuple(e["bytes"]), e["logprob"], tuple((tuple(t["bytes"]), t["logprob"]) for t in e["top_logprobs"]))
            for e in entries]


def concurrently(runner, prompts: list[str]) -> list:
    """Every prompt from its own thread, the engine held until all are in its inbox, so that they start in the same
    step and decode together (a test about batches must not depend on thread timing)."""
    out = [None] * len(prompts)
    started = threading.Event()

    def hold():
        started.set()
        deadline = time.monotonic() + T
        while runner.engine.inbox.qsize() < len(prompts) and time.monotonic() < deadline:
            time.sleep(0.001)
    holder = threading.Thread(target=runner.engine.call, args=(hold,))
    holder.start()
    started.wait(T)

    def work(i):
        out[i] = result(runner, prompts[i])
    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads + [holder]:
        t.join(T)
    return out


def assert_invariant(load, prompts=PROMPTS):
    """load(**options) -> Runner. Every way of running `prompts` gives the results of running them one by one."""
    with load(prefix_caching=False, max_seqs=8) as runner:
        alone = [result(runner, p) for p in prompts]
        assert all(len(r) > 0 for r in alone)
        assert concurrently(runner, prompts[:4]) == alone[:4], "4 concurrent"
        assert concurrently(runner, prompts) == alone, "8 concurrent"
        assert [result(runner, p, stream=True) for p in prompts] == alone, "streamed"
    with load(prefix_caching=True, block_size=4, max_seqs=8) as runner:
        assert [result(runner, p) for p in prompts] == alone, "prefix caching, first pass"
        hits = runner.stats()["prefix_cache_hit_tokens"]
        assert [result(runner, p) for p in prompts] == alone, "prefix caching, repeated"
        assert runner.stats()["prefix_cache_hit_tokens"] - hits >= sum(len(p) // 8 for p in prompts)
        assert concurrently(runner, prompts) == alone, "prefix caching, 8 concurrent"
    with load(prefix_caching=False, max_batched_tokens=16, max_seqs=8) as runner:
        assert concurrently(runner, prompts) == alone, "chunked prefill, 8 concurrent"
    with load(prefix_caching=False, threads=1) as runner:
        assert [result(runner, p) for p in prompts[:4]] == alone[:4], "1 thread"


def safetensors(path, arch):
    return lambda **kw: mistralrs.NormalLoader(ARCHS[arch], model_id=str(path)).load(token_source="none", **kw)


def gguf(path, arch):
    loader = mistralrs.QuantizedLoader(ARCHS[arch], model_id=None, is_gguf=True, quantized_model_id="",
                                       quantized_filename=str(path))
    return lambda **kw: loader.load(token_source="none", **kw)


@pytest.mark.parametrize("arch", ["llama", "gemma3", "mixtral"])
def test_float32_safetensors(tiny_models, arch):
    assert_invariant(safetensors(tiny_models[arch], arch))


@pytest.mark.parametrize("arch,qtype", [("llama", "q8_0"), ("llama", "q4_0"), ("gemma3", "q8_0"),
                                        ("mixtral", "q4_0")])
def test_gguf(gguf_file, arch, qtype):
    assert_invariant(gguf(gguf_file(arch, qtype), arch))


def test_gguf_q4_k(tiny_models, tmp_path):
    """K-quants need rows of 256: a llama as wide as that, Q4_K throughout."""
    make = tiny_models.tool
    ckpt = tmp_path / "wide-llama"
    make.build_tokenizer(ckpt)
    cfg = make.make_config("llama", Tokenizer.from_file(str(ckpt / "tokenizer.json")).get_vocab_size())
    cfg.update(hidden_size=256, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=64)
    (ckpt / "config.json").write_text(json.dumps(cfg))
    make._save_weights(make.make_weights("llama", cfg), ckpt, sharded=False)
    assert_invariant(gguf(convert_to_gguf.convert(ckpt, tmp_path / "wide-q4_k.gguf", "q4_k"), "llama"))


REAL = {  # name: (architecture, tools/real_models.py's function and its arguments)
    "smollm2-Q4_1": ("llama", "smollm2_q4_1"), "smollm2-Q4_K_M": ("llama", "smollm2_quantized", "Q4_K_M"),
    "smollm2-F32": ("llama", "smollm2_hf_f32"), "gemma3-Q4_K_M": ("gemma3", "gemma3_q4_k_m")}


@pytest.mark.slow
@pytest.mark.parametrize("name", REAL)
def test_real_models(name):
    arch, what, *args = REAL[name]
    try:
        path = getattr(real_models, what)(*args)
    except (RuntimeError, ImportError) as e:
        pytest.skip(f"real model files cannot be fetched or derived ({name}): {e}")
    load = safetensors(path, arch) if path.is_dir() else gguf(path, arch)
    turn = ("<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n" if arch == "llama" else
            "<start_of_turn>user\n{}<end_of_turn>\n<start_of_turn>model\n")
    assert_invariant(load, [turn.format(p) for p in PROMPTS])
