"""Bounded work per request: load()'s limits on choices, stop strings, prompt characters and chat template
rendering, each a clear ValueError (or TimeoutError) in the caller, and the stop-string hold-back linear in the
stop strings' length. The cases that hung, aborted or allocated without end before run in a subprocess under a
timeout and a memory limit; after each, the runner must still serve a request and close() promptly."""
import json
import time

import pytest

import mistralrs
from mistralrs import ChatCompletionRequest, CompletionRequest
from mistralrs.engine.output import StopStrings

from helpers import ARCHS, PROMPT, run_python

CASE = """
import json, sys, time
import mistralrs
from mistralrs import ChatCompletionRequest as Chat, CompletionRequest as Comp
path, template, body = sys.argv[1], sys.argv[2] or None, sys.argv[3]
loader = mistralrs.NormalLoader(mistralrs.LlamaLoader, model_id=path, chat_template=template)
runner = loader.load(token_source="none", template_timeout=1.0)
user = lambda text: [{"role": "user", "content": text}]
start = time.monotonic()
try:
    exec(body)
    error = None
except Exception as e:
    error = [type(e).__name__, str(e)[:300]]
took = time.monotonic() - start
ok = json.loads(runner.send_completion_request(Comp("The river", "m", max_tokens=3, timeout=30)))
start = time.monotonic()
runner.close()
print(json.dumps({"error": error, "took": took, "served": ok["usage"]["completion_tokens"],
                  "close": time.monotonic() - start}))
"""

LOOP = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}{{ messages[0].content }}"
BIG = "{% for i in range(100000) %}{{ messages[0].content }}{% endfor %}"
CASES = {  # name: (chat template or "", request code, expected error type, words its message must contain)
    "n_choices": ("", "runner.send_completion_request(Comp('x', 'm', n_choices=10**5))", "ValueError", "n_choices"),
    "best_of": ("", "runner.send_completion_request(Comp('x', 'm', best_of=10**4))", "ValueError", "best_of"),
    "stop_length": ("", "runner.send_completion_request(Comp('x', 'm', stop_seqs=['ab' * 200_000]))",
                    "ValueError", "stop string"),
    "prompt_chars": ("", "runner.send_completion_request(Comp('word ' * 2 * 10**7, 'm'))", "ValueError", "prompt"),
    "template_loop": (LOOP, "runner.send_chat_completion_request(Chat(user('x'), 'm'))", "TimeoutError",
                      "chat template"),
    "template_size": (BIG, "runner.send_chat_completion_request(Chat(user('y' * 20_000), 'm'))", "ValueError",
                      "max_template_chars"),
}


@pytest.mark.parametrize("case", CASES)
def test_a_request_over_a_limit_fails_alone_and_fast(tiny_models, case):
    template, body, error, words = CASES[case]
    p = run_python(CASE, str(tiny_models["llama"]), template, body, timeout=120, memory_gb=6)
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout.splitlines()[-1])
    assert out["error"] is not None and out["error"][0] == error and words in out["error"][1], out
    assert out["took"] < 5, out  # the template's own limit is 1 s
    assert out["served"] == 3 and out["close"] < 5, out


def test_limits_are_load_options(tiny_models):
    loader = mistralrs.NormalLoader(ARCHS["llama"], model_id=str(tiny_models["llama"]))
    for bad in (dict(max_choices=0), dict(max_stop_strings=-1), dict(template_timeout=float("nan")),
                dict(max_prompt_chars="10")):
        with pytest.raises(ValueError, match=next(iter(bad))):
            loader.load(token_source="none", **bad)
    with loader.load(token_source="none", max_choices=2, max_stop_strings=1, max_stop_length=3,
                     max_prompt_chars=500, kv_cache_tokens=256) as r:
        assert len(json.loads(r.send_completion_request(CompletionRequest(PROMPT, "m", n_choices=2, max_tokens=2)))
                   ["choices"]) == 2
        for req, match in ((CompletionRequest(PROMPT, "m", n_choices=3), "n_choices"),
                           (CompletionRequest(PROMPT, "m", best_of=3), "best_of"),
                           (CompletionRequest(PROMPT, "m", stop_seqs=["a", "b"]), "stop_seqs"),
                           (CompletionRequest(PROMPT, "m", stop_seqs=["abcd"]), "stop string"),
                           (CompletionRequest("x" * 501, "m"), "500")):
            with pytest.raises(ValueError, match=match):
                r.send_completion_request(req)
        user = [{"role": "user", "content": "x" * 501}]
        for req, match in ((ChatCompletionRequest([{"role": "user", "content": "x"}], "m",
                                                  n_choices=10**6), "n_choices"),
                           (ChatCompletionRequest(user, "m"), "messages"),
                           (ChatCompletionRequest("x" * 501, "m"), "prompt")):
            with pytest.raises(ValueError, match=match):
                r.send_chat_completion_request(req)


@pytest.mark.parametrize("template, words", [("{{ 9 ** 1000000000 }}", "too large"), ("{{ 'ab' * 10**10 }}", "repeats"),
                                             ("{{ 'x'|center(10**9) }}", "size"), ("{{ 'x'.ljust(10**9) }}", "size"),
                                             ("{{ '%999999999d' % 3 }}", "size")])
def test_a_template_cannot_ask_for_a_huge_value(template, words):
    from mistralrs.load.chat_template import TemplateLimits
    with pytest.raises(ValueError, match=words):
        TemplateLimits(10**6, 5.0).render(template, [{"role": "user", "content": "x"}], {})


class Panic(BaseException):
    """Like tokenizers' pyo3 PanicException: a BaseException, not an Exception."""


def test_a_tokenizer_panic_is_a_value_error(tiny_models, monkeypatch):
    loader = mistralrs.NormalLoader(ARCHS["llama"], model_id=str(tiny_models["llama"]))
    with loader.load(token_source="none", kv_cache_tokens=256) as r:
        real = r.pipeline.tokenizer

        class Panicking:
            def encode_batch(self, texts, add_special_tokens):
                if "panic" in texts[0]:
                    raise Panic("capacity overflow")
                return real.encode_batch(texts, add_special_tokens=add_special_tokens)

        monkeypatch.setattr(r.pipeline, "tokenizer", Panicking())
        with pytest.raises(ValueError, match="capacity overflow"):
            r.send_completion_request(CompletionRequest("panic now", "m"))
        with pytest.raises(ValueError, match="tokenizer"):
            r.send_chat_completion_request(ChatCompletionRequest("panic", "m"))
        assert json.loads(r.send_completion_request(CompletionRequest(PROMPT, "m", max_tokens=2)))["choices"]


def test_the_hold_back_is_linear_in_the_stop_strings_length():
    """A 400,000-character stop string that the text keeps almost matching: KMP does O(1) amortized work per
    character (a naive re-scan would do 400,000 per character, hours for this text)."""
    stop = "a" * 399_999 + "b"
    t0 = time.perf_counter()
    s = StopStrings([stop, "ab" * 1000, "xyz"])
    build = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(2000):
        assert s.feed("a" * 25) is None  # 50,000 characters, one piece a step
    feed = time.perf_counter() - t0
    assert s.held() == 50_000  # the whole text is a start of the long stop string: a stream holds it all back
    assert s.feed("a" * 349_999 + "b") == -50_000  # the match began 50,000 characters before this piece
    assert build < 2 and feed < 2, (build, feed)


def test_stop_string_matches_equal_a_plain_search():
    import random
    rng = random.Random(0)
    for _ in range(500):
        stops = ["".join(rng.choice("ab") for _ in range(rng.randint(1, 6))) for _ in range(rng.randint(1, 3))]
        text = "".join(rng.choice("ab") for _ in range(rng.randint(0, 40)))
        s, found = StopStrings(stops), None
        for i, c in enumerate(text):  # one character a piece: the first match is the one that ends first
            if (at := s.feed(c)) is not None:
                found = i + at
                break
        ends = [text.find(x) + len(x) for x in stops if x in text]
        if not ends:
            assert found is None
            continue
        e = min(ends)
        assert found == min(e - len(x) for x in stops if text[:e].endswith(x))
        assert s.held() <= max(map(len, stops))


def test_tokenizing_a_long_prompt_does_not_stall_other_requests(tiny_models):
    """The tokenizer runs in the caller's thread without the GIL: a stream keeps flowing while another caller's
    prompt of max_prompt_chars characters is tokenized (and then refused as too long for the model)."""
    import threading
    loader = mistralrs.NormalLoader(ARCHS["llama"], model_id=str(tiny_models["llama"]))
    with loader.load(token_source="none", kv_cache_tokens=1024) as r:
        text = "The quick brown fox jumps over the lazy dog. " * 22_000  # 990,000 characters
        t0 = time.perf_counter()
        r.pipeline.tokenizer.encode(text)
        alone = time.perf_counter() - t0
        stream = r.send_completion_request(CompletionRequest(PROMPT, "m", max_tokens=400, stream=True))
        next(stream)
        errors = []
        t = threading.Thread(target=lambda: errors.append(pytest.raises(
            ValueError, r.send_completion_request, CompletionRequest(text, "m"))))
        last, gaps = time.perf_counter(), []
        t.start()
        for _ in stream:
            now = time.perf_counter()
            gaps.append(now - last)
            last = now
            if not t.is_alive():
                break
        t.join()
        assert errors and "tokens" in str(errors[0].value)
        assert max(gaps) < alone / 2, f"a chunk waited {max(gaps):.2f} s; tokenizing alone takes {alone:.2f} s"
