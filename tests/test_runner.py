"""The Runner end to end on tiny models: transformers for tokens and logprobs, the openai package for the JSON."""
import json
import threading
import time

import pytest
import torch
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from transformers import AutoModelForCausalLM, AutoTokenizer

import mistralrs
from mistralrs import ChatCompletionRequest, CompletionRequest

from helpers import ARCHS, PROMPT

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Where does the river go?"}]


def completion_chunk(text: str):
    """openai's Completion type has no null finish_reason, but OpenAI streams null until a choice ends:
    check that, then validate the rest of the chunk."""
    body = json.loads(text)
    choice = body["choices"][0]
    unfinished = choice["finish_reason"] is None
    choice["finish_reason"] = choice["finish_reason"] or "length"
    c = Completion.model_validate(body).choices[0]
    return c.model_copy(update={"finish_reason": None}) if unfinished else c


def load(path, arch="llama", **kw):
    return mistralrs.NormalLoader(ARCHS[arch], model_id=str(path)).load(token_source="none", **kw)


@pytest.fixture(scope="module")
def llama(tiny_models):
    with load(tiny_models["llama"]) as runner:
        yield runner


@pytest.fixture(scope="module")
def hf_llama(tiny_models):
    return AutoModelForCausalLM.from_pretrained(tiny_models["llama"], dtype=torch.float32).eval()


def hf_greedy_text(path, ids, n):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False)[0, len(ids):].tolist()
    return AutoTokenizer.from_pretrained(path).decode(out, skip_special_tokens=True), out


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_completion_and_chat_match_transformers(tiny_models, arch):
    path = tiny_models[arch]
    tok = AutoTokenizer.from_pretrained(path)
    with load(path, arch) as runner:
        c = Completion.model_validate_json(runner.send_completion_request(
            CompletionRequest(PROMPT, "tiny", max_tokens=24, temperature=0)))
        chat = ChatCompletion.model_validate_json(runner.send_chat_completion_request(
            ChatCompletionRequest(CHAT, "tiny", max_tokens=24, temperature=0)))
    text, out = hf_greedy_text(path, tok(PROMPT).input_ids, 24)
    assert c.choices[0].text == text
    assert c.usage.completion_tokens == len(out)
    chat_ids = tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert chat.choices[0].message.content == hf_greedy_text(path, chat_ids, 24)[0]
    assert chat.usage.prompt_tokens == len(chat_ids)


@pytest.mark.parametrize("prefix_caching", [False, True], ids=["no_prefix_cache", "prefix_cache"])
def test_concurrent_requests_with_preemption_equal_solo_runs(tiny_models, prefix_caching):
    prompts = [(PROMPT * 3)[: 15 + 7 * (i % 9)] for i in range(64)]
    requests = [CompletionRequest(p, "tiny", max_tokens=6 + 3 * (i % 7), temperature=0) for i, p in enumerate(prompts)]
    with load(tiny_models["llama"], max_seqs=1, prefix_caching=False) as solo:
        expected = [json.loads(solo.send_completion_request(r))["choices"][0]["text"] for r in requests]
    # 4 running sequences need up to 4 * 96 tokens; 160 tokens of cache forces preemption and recompute (the
    # prompts share prefixes: with prefix caching they share blocks, and 96 tokens of cache are needed to preempt).
    kv_tokens = 96 if prefix_caching else 160
    with load(tiny_models["llama"], max_seqs=4, kv_cache_tokens=kv_tokens, block_size=8,
              prefix_caching=prefix_caching) as runner:
        results = [None] * 64

        def worker(k):
            for i in range(k, 64, 8):
                results[i] = json.loads(runner.send_completion_request(requests[i]))

        start = time.time()
        threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.time() - start
        stats = runner.stats()
        assert stats["preemptions"] > 0
        assert (stats["prefix_cache_hit_tokens"] > 0) == prefix_caching
        assert stats["free_blocks"] == stats["num_blocks"]  # every reference released once idle
    tokens = sum(r["usage"]["completion_tokens"] for r in results)
    print(f"\n64 requests, 8 threads, max_seqs=4: {tokens} tokens in {elapsed:.2f} s = {tokens / elapsed:.1f} tok/s")
    assert [r["choices"][0]["text"] for r in results] == expected


def test_streamed_chunks_concatenate_to_the_full_text(llama):
    req = dict(messages=CHAT, model="tiny", max_tokens=20, temperature=0)
    full = ChatCompletion.model_validate_json(llama.send_chat_completion_request(ChatCompletionRequest(**req)))
    chunks = [ChatCompletionChunk.model_validate_json(c)
              for c in llama.send_chat_completion_request(ChatCompletionRequest(**req, stream=True))]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == full.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1


def test_streamed_completion_with_n_choices(llama):
    chunks = [completion_chunk(c) for c in llama.send_completion_request(
        CompletionRequest(PROMPT, "tiny", max_tokens=10, n_choices=2, seed=3, stream=True))]
    texts = {0: "", 1: ""}
    for c in chunks:
        texts[c.index] += c.text
    whole = Completion.model_validate_json(llama.send_completion_request(
        CompletionRequest(PROMPT, "tiny", max_tokens=10, n_choices=2, seed=3)))
    assert [texts[0], texts[1]] == [c.text for c in whole.choices]
    assert sum(c.finish_reason is not None for c in chunks) == 2


def test_n_choices_and_seed(llama):
    make = lambda seed: ChatCompletion.model_validate_json(llama.send_chat_completion_request(
        ChatCompletionRequest(CHAT, "tiny", n_choices=3, max_tokens=12, temperature=1.0, seed=seed)))
    a, b, c = make(5), make(5), make(6)
    assert [ch.index for ch in a.choices] == [0, 1, 2]
    assert [ch.message.content for ch in a.choices] == [ch.message.content for ch in b.choices]
    assert [ch.message.content for ch in a.choices] != [ch.message.content for ch in c.choices]
    assert len({ch.message.content for ch in a.choices}) > 1


def cumulative_logprob(hf, prompt_ids, ids):
    with torch.no_grad():
        logp = torch.log_softmax(hf(torch.tensor([prompt_ids + ids])).logits[0].float(), -1)
    return sum(logp[len(prompt_ids) - 1 + i, t].item() for i, t in enumerate(ids))


def test_best_of_returns_the_highest_logprob_candidates(llama, hf_llama, tiny_models):
    tok = AutoTokenizer.from_pretrained(tiny_models["llama"])
    prompt_ids = tok(PROMPT).input_ids
    kw = dict(max_tokens=6, temperature=1.5, seed=11)
    all4 = Completion.model_validate_json(llama.send_completion_request(
        CompletionRequest(PROMPT, "tiny", best_of=4, n_choices=4, **kw)))
    best2 = Completion.model_validate_json(llama.send_completion_request(
        CompletionRequest(PROMPT, "tiny", best_of=4, n_choices=2, **kw)))
    scores = {c.text: cumulative_logprob(hf_llama, prompt_ids, tok(c.text, add_special_tokens=False).input_ids)
              for c in all4.choices}
    ranked = sorted(scores, key=scores.get, reverse=True)
    assert [c.text for c in best2.choices] == ranked[:2]
    assert [c.index for c in best2.choices] == [0, 1]


def test_logprobs_equal_transformers_log_softmax(llama, hf_llama, tiny_models):
    tok = AutoTokenizer.from_pretrained(tiny_models["llama"])
    r = ChatCompletion.model_validate_json(llama.send_chat_completion_request(
        ChatCompletionRequest(CHAT, "tiny", max_tokens=10, temperature=0, logprobs=True, top_logprobs=3)))
    prompt_ids = tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True, return_dict=False)
    _, ids = hf_greedy_text(tiny_models["llama"], prompt_ids, 10)  # greedy tokens agree (tested above)
    entries = r.choices[0].logprobs.content
    assert len(entries) == len(ids)
    with torch.no_grad():
        logp = torch.log_softmax(hf_llama(torch.tensor([prompt_ids + ids])).logits[0], -1)
    for i, e in enumerate(entries):
        row = logp[len(prompt_ids) - 1 + i]
        assert e.token == tok.decode([ids[i]])
        assert abs(e.logprob - row[ids[i]].item()) < 1e-4
        top = row.topk(3)
        assert [t.logprob for t in e.top_logprobs] == pytest.approx(top.values.tolist(), abs=1e-4)
        assert [t.token for t in e.top_logprobs] == [tok.decode([t]) for t in top.indices.tolist()]
    # the raw bytes of all tokens are the UTF-8 of the whole text, even where a token splits a character
    assert bytes(b for e in entries for b in e.bytes).decode("utf-8", "replace") == tok.decode(ids)


def test_stop_string_spanning_tokens_is_cut(llama, tiny_models):
    tok = AutoTokenizer.from_pretrained(tiny_models["llama"])
    base = json.loads(llama.send_completion_request(CompletionRequest(PROMPT, "tiny", max_tokens=16, temperature=0)))
    text = base["choices"][0]["text"]
    ids = tok(text, add_special_tokens=False).input_ids
    boundary = len(tok.decode(ids[:4]))
    stop = text[boundary - 2: boundary + 2]  # two characters of token 4 and two of token 5
    assert len(stop) == 4
    for stream in (False, True):
        r = llama.send_completion_request(CompletionRequest(PROMPT, "tiny", max_tokens=16, temperature=0,
                                                            stop_seqs=[stop], stream=stream))
        if stream:
            chunks = [completion_chunk(c) for c in r]
            got, reason = "".join(c.text for c in chunks), chunks[-1].finish_reason
        else:
            got, reason = json.loads(r)["choices"][0]["text"], json.loads(r)["choices"][0]["finish_reason"]
        assert got == text[: text.find(stop)]
        assert reason == "stop"


def test_echo_and_suffix(llama):
    r = Completion.model_validate_json(llama.send_completion_request(
        CompletionRequest(PROMPT, "tiny", max_tokens=5, temperature=0, echo_prompt=True, suffix=" [END]")))
    plain = Completion.model_validate_json(llama.send_completion_request(
        CompletionRequest(PROMPT, "tiny", max_tokens=5, temperature=0)))
    assert r.choices[0].text == PROMPT + plain.choices[0].text + " [END]"


def test_stop_token_ids_and_max_tokens(llama, tiny_models):
    tok = AutoTokenizer.from_pretrained(tiny_models["llama"])
    base = ChatCompletion.model_validate_json(llama.send_chat_completion_request(
        ChatCompletionRequest(CHAT, "tiny", max_tokens=8, temperature=0)))
    assert base.choices[0].finish_reason == "length" and base.usage.completion_tokens == 8
    prompt_ids = tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True, return_dict=False)
    _, ids = hf_greedy_text(tiny_models["llama"], prompt_ids, 8)
    r = ChatCompletion.model_validate_json(llama.send_chat_completion_request(
        ChatCompletionRequest(CHAT, "tiny", max_tokens=8, temperature=0, stop_token_ids=[ids[2]])))
    first = ids.index(ids[2])
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.content == tok.decode(ids[:first])
    assert r.usage.completion_tokens == first + 1


BAD_REQUESTS = [
    lambda: ChatCompletionRequest([], "m"),
    lambda: ChatCompletionRequest([{"role": "wizard", "content": "hi"}], "m"),
    lambda: ChatCompletionRequest([{"role": "user"}], "m"),
    lambda: ChatCompletionRequest(CHAT, "m", n_choices=0),
    lambda: ChatCompletionRequest(CHAT, "m", max_tokens=0),
    lambda: ChatCompletionRequest(CHAT, "m", max_tokens=-3),
    lambda: ChatCompletionRequest(CHAT, "m", temperature=-0.1),
    lambda: ChatCompletionRequest(CHAT, "m", top_p=0.0),
    lambda: ChatCompletionRequest(CHAT, "m", top_p=1.5),
    lambda: ChatCompletionRequest(CHAT, "m", top_k=0),
    lambda: ChatCompletionRequest(CHAT, "m", logprobs=True, top_logprobs=21),
    lambda: ChatCompletionRequest(CHAT, "m", top_logprobs=2),
    lambda: ChatCompletionRequest(CHAT, "m", presence_penalty=3.0),
    lambda: ChatCompletionRequest(CHAT, "m", logit_bias={"a": 1.0}),
    lambda: ChatCompletionRequest(CHAT, "m", temperature="hot"),
    lambda: ChatCompletionRequest(CHAT, "m", stream="yes"),
    lambda: ChatCompletionRequest(CHAT, 3),
    lambda: CompletionRequest("", "m"),
    lambda: CompletionRequest("hi", "m", best_of=0),
    lambda: CompletionRequest("hi", "m", stop_seqs="x"),
    lambda: CompletionRequest("hi", "m", grammar="a+"),
    lambda: CompletionRequest("hi", "m", grammar="a+", grammar_type="yacc"),
    lambda: CompletionRequest("hi", "m", frequency_penalty=float("nan")),
]


@pytest.mark.parametrize("make", BAD_REQUESTS, ids=range(len(BAD_REQUESTS)))
def test_invalid_request_fields_raise(make):
    with pytest.raises((ValueError, TypeError)):
        make()


def test_bad_requests_at_the_runner_leave_it_serving(llama):
    vocab = llama.pipeline.vocab_size
    with pytest.raises(ValueError, match="logit_bias"):
        llama.send_chat_completion_request(ChatCompletionRequest(CHAT, "m", logit_bias={vocab: 1.0}))
    with pytest.raises(ValueError, match="stop_token_ids"):
        llama.send_chat_completion_request(ChatCompletionRequest(CHAT, "m", stop_token_ids=[vocab + 5]))
    with pytest.raises(ValueError, match="truncate_sequence"):
        llama.send_completion_request(CompletionRequest("word " * 600, "m"))
    with pytest.raises(TypeError):
        llama.send_completion_request(ChatCompletionRequest(CHAT, "m"))
    ok = ChatCompletion.model_validate_json(llama.send_chat_completion_request(
        ChatCompletionRequest(CHAT, "m", max_tokens=3)))
    assert ok.choices[0].message.content is not None


def test_engine_failure_fails_only_its_request(llama):
    step = llama.pipeline.model_runner.step
    calls = []

    def broken(*args, **kw):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("injected failure")
        return step(*args, **kw)

    llama.pipeline.model_runner.step = broken
    try:
        with pytest.raises(RuntimeError, match="injected"):
            llama.send_completion_request(CompletionRequest(PROMPT, "m", max_tokens=3, temperature=0))
        # greedy: at temperature 1 the tiny model samples EOS ~0.1% of the time, ending the completion early
        ok = json.loads(llama.send_completion_request(CompletionRequest(PROMPT, "m", max_tokens=3, temperature=0)))
        assert ok["usage"]["completion_tokens"] == 3
    finally:
        del llama.pipeline.model_runner.step


def test_truncate_sequence_keeps_room_for_max_tokens(tiny_models):
    with load(tiny_models["llama"], truncate_sequence=True) as runner:
        r = Completion.model_validate_json(runner.send_completion_request(
            CompletionRequest("word " * 600, "m", max_tokens=7, temperature=0)))
        assert r.usage.prompt_tokens == runner.pipeline.max_model_len - 7
        assert r.usage.completion_tokens == 7
        r = Completion.model_validate_json(runner.send_completion_request(
            CompletionRequest("word " * 600, "m", temperature=0)))
        assert r.usage.prompt_tokens == runner.pipeline.max_model_len - 10


def test_logfile_has_requests_and_responses(tiny_models, tmp_path):
    log = tmp_path / "log.jsonl"
    with load(tiny_models["llama"], logfile=str(log)) as runner:
        runner.send_completion_request(CompletionRequest(PROMPT, "m", max_tokens=3))
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert "request" in lines[0] and lines[1]["response"]["object"] == "text_completion"


def test_failure_while_building_the_response_fails_the_request(llama, monkeypatch):
    def broken(req):
        raise RuntimeError("injected response failure")

    monkeypatch.setattr(llama.engine.output, "final", broken)
    with pytest.raises(RuntimeError, match="injected response"):
        llama.send_completion_request(CompletionRequest(PROMPT, "m", max_tokens=2))
    monkeypatch.undo()
    assert json.loads(llama.send_completion_request(CompletionRequest(PROMPT, "m", max_tokens=2)))["choices"]


def test_engine_bug_outside_a_step_fails_requests_and_the_engine_lives_on(llama, monkeypatch):
    schedule = llama.scheduler.schedule
    calls = []

    def broken():
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("injected scheduler bug")
        return schedule()

    monkeypatch.setattr(llama.scheduler, "schedule", broken)
    with pytest.raises(RuntimeError, match="injected scheduler"):
        llama.send_completion_request(CompletionRequest(PROMPT, "m", max_tokens=2))
    assert json.loads(llama.send_completion_request(CompletionRequest(PROMPT, "m", max_tokens=2)))["choices"]
    with pytest.raises(ZeroDivisionError):
        llama.engine.call(lambda: 1 / 0)
    assert llama.engine.thread.is_alive()


def test_a_dropped_runner_stops_its_engine(tiny_models):
    import gc
    runner = load(tiny_models["llama"])
    thread = runner.engine.thread
    del runner
    gc.collect()
    thread.join(timeout=10)
    assert not thread.is_alive()
