"""Prefix caching and chunked prefill through the Runner: greedy outputs with them equal outputs without them, the
blocks are all free again once idle, and the counters say what was reused. The model is the built-in demo model (a
trained tiny Llama, so greedy decoding has clear winners), the tiny Mistral (sliding window 8) and a tiny X-LoRA."""
import json
import shutil
import threading

import pytest

import mistralrs
from mistralrs import ChatCompletionRequest, CompletionRequest
from mistralrs.cli import DEMO_MODEL

import make_tiny_xlora
from helpers import ARCHS

SYSTEM = ("You are a concise assistant who answers questions about Python's standard library. Keep every answer to "
          "one short paragraph, name the module you use, and show one line of code where it helps the reader. ") * 3
QUESTIONS = ["How do I read a file?", "What does itertools.chain do?", "How do I sort a dict by value?",
             "What is a dataclass?", "How do I parse JSON?", "What is pathlib for?", "How do threads work?",
             "What does functools.cache do?"]


def demo(**kw):
    return mistralrs.NormalLoader(mistralrs.LlamaLoader, model_id=str(DEMO_MODEL)).load(token_source="none", **kw)


def chat(runner, messages, n=1, max_tokens=12) -> list[str]:
    r = runner.send_chat_completion_request(ChatCompletionRequest(
        messages=messages, model="demo", max_tokens=max_tokens, temperature=0, n_choices=n))
    return [c["message"]["content"] for c in json.loads(r)["choices"]]


def concurrently(fn, items) -> list:
    out = [None] * len(items)

    def work(i):
        out[i] = fn(items[i])
    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(items))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def assert_idle_and_free(runner):
    stats = runner.stats()
    assert stats["running"] == stats["waiting"] == 0
    assert stats["free_blocks"] == stats["num_blocks"], stats  # every shared block's references released


@pytest.fixture(scope="module")
def runners():
    with demo(prefix_caching=False) as off, demo(max_seqs=32) as on:
        yield off, on


def test_shared_system_prompt_across_32_concurrent_chats(runners):
    off, on = runners
    convs = [[{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTIONS[i % 8] + f" ({i})"}]
             for i in range(32)]
    want = [chat(off, c) for c in convs]
    before = on.stats()["prefix_cache_hit_tokens"]
    assert concurrently(lambda c: chat(on, c), convs) == want
    stats = on.stats()
    assert stats["prefix_cache_hit_tokens"] - before >= 31 * 64  # the system prompt's blocks, reused 31 times
    assert_idle_and_free(on)


def test_conversation_replayed_turn_by_turn(runners):
    off, on = runners
    messages = [{"role": "system", "content": SYSTEM}]
    for q in QUESTIONS[:4]:
        messages.append({"role": "user", "content": q})
        before = on.stats()["prefix_cache_hit_tokens"]
        answer = chat(on, messages)
        assert answer == chat(off, messages)
        if len(messages) > 2:  # every turn after the first starts from the conversation so far
            assert on.stats()["prefix_cache_hit_tokens"] > before
        messages.append({"role": "assistant", "content": answer[0]})
    assert_idle_and_free(on)


def test_choices_and_best_of_share_their_prompt(runners):
    off, on = runners
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTIONS[2]}]
    before = on.stats()["prefix_cache_hit_tokens"]
    assert chat(on, messages, n=4) == chat(off, messages, n=4)
    assert on.stats()["prefix_cache_hit_tokens"] - before >= 3 * 64  # choices 2..4 reuse choice 1's prompt
    request = CompletionRequest(SYSTEM + QUESTIONS[3], "demo", max_tokens=10, temperature=0, best_of=3, n_choices=1)
    texts = [json.loads(r.send_completion_request(request))["choices"][0]["text"] for r in (off, on)]
    assert texts[0] == texts[1]
    assert_idle_and_free(on)


def test_switched_off_reuses_nothing(runners):
    off, _ = runners
    assert off.stats()["prefix_cache_hit_tokens"] == 0 and off.stats()["prefix_cached_blocks"] == 0


def test_sliding_window_model(tiny_models):
    """Mistral's window (8 tokens in the tiny model) only narrows what a query sees; cached K/V are the same."""
    prompt = "The quick brown fox jumps over the lazy dog, again and again, " * 3
    requests = [CompletionRequest(prompt + tail, "m", max_tokens=16, temperature=0) for tail in ("a", "b", "c")]

    def texts(runner):
        return [json.loads(runner.send_completion_request(r))["choices"][0]["text"] for r in requests]
    load = mistralrs.NormalLoader(ARCHS["mistral"], model_id=str(tiny_models["mistral"])).load
    with load(token_source="none", prefix_caching=False) as off, load(token_source="none", block_size=4) as on:
        assert texts(on) == texts(off)
        assert on.stats()["prefix_cache_hit_tokens"] > 0
        assert_idle_and_free(on)


def test_xlora(tiny_models, tmp_path):
    repo = make_tiny_xlora.write_xlora(tiny_models["llama"], tmp_path / "x", depth=2)
    load = mistralrs.XLoraLoader(ARCHS["llama"], model_id=str(tiny_models["llama"]),
                                 order_file=str(repo / "ordering.json"), xlora_model_id=str(repo)).load
    prompt = "Once upon a time there was a little model that cached its prefixes. " * 2
    requests = [CompletionRequest(prompt + tail, "x", max_tokens=8, temperature=0) for tail in ("yes", "no")]
    with load(token_source="none", prefix_caching=False) as off, load(token_source="none", block_size=4) as on:
        for r in requests:
            assert (json.loads(on.send_completion_request(r))["choices"][0]["text"]
                    == json.loads(off.send_completion_request(r))["choices"][0]["text"])
        assert on.stats()["prefix_cache_hit_tokens"] > 0  # per-token scalings: the prefix is shareable
        assert_idle_and_free(on)


@pytest.fixture(scope="module")
def long_demo(tmp_path_factory):
    """The demo model allowed 4,096 positions (it was trained on 512; rotary runs at any position, and here only
    equality between two schedules matters)."""
    path = tmp_path_factory.mktemp("demo4k")
    for f in DEMO_MODEL.iterdir():
        shutil.copy(f, path / f.name)
    cfg = json.loads((path / "config.json").read_text())
    cfg["max_position_embeddings"] = 4096
    (path / "config.json").write_text(json.dumps(cfg))
    return path


def test_chunked_prefill_beside_running_decodes(long_demo):
    """A 2,000-token prompt arrives while 8 sequences decode: it is prefilled over several steps of at most
    max_batched_tokens tokens, the 8 decode in every one of those steps, and every output equals the unchunked
    run's."""
    budget = 256
    short = [CompletionRequest(f"Question {i}: what does the os module do?", "demo", max_tokens=40, temperature=0)
             for i in range(8)]
    long = CompletionRequest(" ".join(f"line {i} of a long listing;" for i in range(300)), "demo", max_tokens=4,
                             temperature=0)

    def load(**kw):
        return mistralrs.NormalLoader(mistralrs.LlamaLoader, model_id=str(long_demo)).load(
            token_source="none", kv_cache_tokens=8192, prefix_caching=False, **kw)

    def run(runner, record):
        steps = []
        if record:
            mr = runner.pipeline.model_runner
            real = mr.step

            def step(seqs, tables, num_tokens=None, all_logits=False):
                steps.append(list(num_tokens))
                return real(seqs, tables, num_tokens, all_logits)
            mr.step = step
        started = threading.Event()
        out = [None] * 9

        def decode(i):
            started.set()
            out[i] = json.loads(runner.send_completion_request(short[i]))["choices"][0]["text"]
        threads = [threading.Thread(target=decode, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        started.wait()
        body = json.loads(runner.send_completion_request(long))
        out[8] = body["choices"][0]["text"]
        for t in threads:
            t.join()
        return out, steps, body["usage"]["prompt_tokens"]

    with load(max_batched_tokens=1 << 20) as whole:
        want, _, n_long = run(whole, False)
    assert n_long >= 2000, n_long
    with load(max_batched_tokens=budget) as chunked:
        got, steps, _ = run(chunked, True)
    assert got == want
    assert max(sum(s) for s in steps) <= budget
    long_steps = [s for s in steps if max(s) > 100]  # the steps that computed a chunk of the long prompt
    assert len(long_steps) >= n_long // budget
    assert sum(s.count(1) >= 4 for s in long_steps) >= len(long_steps) // 2  # decodes ran beside its chunks
