"""output.py without a model: token ids of the demo model's real tokenizer go in as the engine would feed them,
and the text, chunks and responses are checked against decoding the whole completion at once."""
import random
from pathlib import Path

import pytest
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from tokenizers import Tokenizer

import mistralrs
from mistralrs.engine.output import Output, StopStrings
from mistralrs.engine.sequence import Request, Sequence

TOKENIZER = Tokenizer.from_file(str(Path(mistralrs.__file__).parent / "data" / "demo-llama" / "tokenizer.json"))
EOS = 2
PROMPT = "The import statement"
TEXT = " binds a name in the local namespace: café, 東京 and 🙂 are fine; import it as a module statement."


def tokens(text: str) -> list[int]:
    return TOKENIZER.encode(text, add_special_tokens=False).ids


def decode(ids: list[int]) -> str:
    return TOKENIZER.decode(ids, skip_special_tokens=True)


def make_request(n=1, n_return=None, stream=False, chat=False, logprobs=False, stop=(), max_tokens=64) -> Request:
    prompt = TOKENIZER.encode(PROMPT).ids
    seqs = [Sequence(tokens=list(prompt), index=i, prompt_len=len(prompt), max_len=len(prompt) + max_tokens,
                     prefix_offset=len(prompt), read_offset=len(prompt),
                     stops=StopStrings(list(stop)) if stop else None) for i in range(n)]
    return Request(chat=chat, id="cmpl-test", seqs=seqs, n_return=n_return or n, stream=stream, logprobs=logprobs,
                   created=1700000000)


def advance(out: Output, seq: Sequence, token: int, logprob, top) -> str | None:
    """The token joins seq (the scheduler's postprocess, in the engine), then the output side takes it."""
    seq.tokens.append(token)
    return out.advance(seq, logprob, top)


def feed(out: Output, seq: Sequence, ids: list[int], logprob=-0.5):
    """Advance seq token by token as the engine does; the chunks a stream sends after each token (None: nothing)
    and the number of tokens taken before the sequence finished."""
    chunks = []
    for taken, t in enumerate(ids, 1):
        reason = advance(out, seq, t, logprob, [])
        seq.finish_reason = reason
        if seq.group.stream:
            chunks.append(out.chunk(seq))
        if reason is not None:
            return chunks, taken
    return chunks, len(ids)


def streamed_text(chunks) -> str:
    return "".join(c["choices"][0]["text"] for c in chunks if c is not None)


@pytest.fixture
def out():
    return Output(TOKENIZER, "demo", {EOS})


def test_eos_ends_with_stop_and_is_not_text_but_counts_as_a_token(out):
    req = make_request()
    ids = tokens(TEXT)[:6]
    _, taken = feed(out, req.seqs[0], ids + [EOS, *ids])
    assert taken == 7
    r = Completion.model_validate(out.response(req))
    assert r.choices[0].text == decode(ids) and r.choices[0].finish_reason == "stop"
    prompt_len = len(TOKENIZER.encode(PROMPT).ids)
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (prompt_len, 7, prompt_len + 7)


def test_length_limit(out):
    req = make_request(max_tokens=5)
    _, taken = feed(out, req.seqs[0], tokens(TEXT))
    r = Completion.model_validate(out.response(req))
    assert taken == 5 and r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 5
    assert r.choices[0].text == decode(tokens(TEXT)[:5])


def test_stop_string_spanning_tokens_is_cut_at_the_token_that_completes_it(out):
    ids = tokens(TEXT)
    boundary = len(decode(ids[:4]))  # the stop string takes the last 2 characters of token 4, 2 of token 5
    full = decode(ids)
    stop = full[boundary - 2: boundary + 2]
    req = make_request(stop=["never there", stop])
    _, taken = feed(out, req.seqs[0], ids)
    completes_at = next(i for i in range(1, len(ids) + 1) if stop in decode(ids[:i]))
    assert taken == completes_at == 5
    r = Completion.model_validate(out.response(req))
    assert r.choices[0].text == full[: full.find(stop)] and r.choices[0].finish_reason == "stop"


def test_stream_holds_back_a_possible_stop_string_until_it_is_ruled_out(out):
    ids = tokens(TEXT)
    at = next(i for i in range(len(ids)) if decode([ids[i]]) == " name")
    req = make_request(stream=True, stop=[" name is"])  # " name" could be its start: wait and see
    chunks, _ = feed(out, req.seqs[0], ids)
    sent_before = streamed_text(chunks[: at + 1])
    assert sent_before == decode(ids[:at]) and chunks[at] is None
    assert streamed_text(chunks[: at + 2]) == decode(ids[: at + 2])  # the next token rules it out: all goes out
    assert streamed_text(chunks) == decode(ids)


@pytest.mark.parametrize("seed", range(20))
def test_streamed_chunks_equal_the_whole_text_for_any_stop_string(out, seed):
    rng = random.Random(seed)
    ids = tokens(TEXT)
    full = decode(ids)
    a = rng.randrange(len(full) - 8)
    stop = full[a: a + rng.randrange(1, 8)]
    whole, stream = make_request(stop=[stop]), make_request(stream=True, stop=[stop])
    feed(out, whole.seqs[0], ids)
    chunks, _ = feed(out, stream.seqs[0], ids)
    expected = full[: full.find(stop)]
    assert (out.response(whole))["choices"][0]["text"] == expected
    assert streamed_text(chunks) == expected
    for c in chunks[:-1]:  # no chunk before the last ends the stream, the last carries the reason and usage
        assert c is None or c["choices"][0]["finish_reason"] is None
    last = chunks[-1]
    assert last["choices"][0]["finish_reason"] == "stop" and last["usage"]["completion_tokens"] == len(chunks)


def test_partial_utf8_is_held_until_its_character_is_whole(out):
    ids = tokens(" café 🙂")
    pieces = [TOKENIZER.id_to_token(t) for t in ids]
    assert len(ids) > len(" café 🙂".split()) + 2  # é and 🙂 take several byte tokens each
    req = make_request(stream=True)
    seq = req.seqs[0]
    texts = []
    for t in ids:
        advance(out, seq, t, -0.1, [])
        c = out.chunk(seq)
        texts.append(seq.text)
        assert "\ufffd" not in seq.text, pieces
        assert c is None or "\ufffd" not in c["choices"][0]["text"]
    assert texts[-1] == " café 🙂"
    # while a character's bytes arrive the text does not move; it grows by the whole character at its last byte
    for i in range(1, len(ids)):
        if texts[i] == texts[i - 1]:
            assert "\ufffd" in decode(ids[: i + 1])


def test_a_sequence_ending_inside_a_character_keeps_what_a_full_decode_gives(out):
    ids = tokens(" 🙂")[:-1]  # the emoji's last byte never comes
    req = make_request(max_tokens=len(ids))
    feed(out, req.seqs[0], ids)
    assert (out.response(req))["choices"][0]["text"] == decode(ids)


def test_best_of_returns_the_highest_cumulative_logprob_first(out):
    req = make_request(n=4, n_return=2, max_tokens=4)
    scores = [-3.0, -1.0, -5.0, -2.0]  # per token, 4 tokens each
    words = [" alpha", " beta", " gamma", " delta"]
    for seq, lp, w in zip(req.seqs, scores, words):
        feed(out, seq, tokens(w * 4)[:4], logprob=lp)
    r = Completion.model_validate(out.response(req))
    assert [c.text for c in r.choices] == [decode(tokens(" beta" * 4)[:4]), decode(tokens(" delta" * 4)[:4])]
    assert [c.index for c in r.choices] == [0, 1]
    assert r.usage.completion_tokens == 16  # every candidate's tokens were generated


def test_n_choices_keep_their_order(out):
    req = make_request(n=3)
    for seq, w in zip(req.seqs, [" one", " two", " three"]):
        feed(out, seq, tokens(w) + [EOS], logprob=-1.0 * (3 - seq.index))
    assert [c.text for c in Completion.model_validate(out.response(req)).choices] == [" one", " two", " three"]


def test_chat_stream_chunks_and_logprobs(out):
    ids = tokens(TEXT)[:8]
    req = make_request(chat=True, stream=True, logprobs=True, max_tokens=8)
    seq = req.seqs[0]
    chunks = []
    for t in ids:
        seq.finish_reason = advance(out, seq, t, -0.25, [(t, -0.25)])
        c = out.chunk(seq)
        if c is not None:
            chunks.append(ChatCompletionChunk.model_validate(c))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content for c in chunks) == decode(ids)
    entries = [e for c in chunks for e in c.choices[0].logprobs.content]
    assert [e.token for e in entries] == [TOKENIZER.decode([t]) for t in ids]
    assert chunks[-1].choices[0].finish_reason == "length" and chunks[-1].usage.completion_tokens == 8
    whole = make_request(chat=True, logprobs=True, max_tokens=8)
    feed(out, whole.seqs[0], ids, logprob=-0.25)
    r = ChatCompletion.model_validate(out.response(whole))
    assert r.choices[0].message.content == decode(ids) and len(r.choices[0].logprobs.content) == 8


def brute_force(text: str, stops: list[str]) -> tuple[int | None, int]:
    """Where the earliest stop string starts in text (None: nowhere), and the longest start of a stop string that
    text ends with, straight from the definitions."""
    starts = [text.find(s) for s in stops if s in text]
    held = max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
    return min(starts, default=None), held


def test_stop_strings_fed_piece_by_piece_agree_with_the_definitions():
    rng = random.Random(0)
    for trial in range(500):
        alphabet = "ab" if trial % 2 else "abc"  # few letters: many overlapping partial matches
        stops = ["".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 7)))
                 for _ in range(rng.randrange(1, 4))]
        text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 30)))
        stop_strings, fed = StopStrings(stops), ""
        while True:
            piece = text[len(fed): len(fed) + rng.randrange(1, 5)]
            if not piece:
                break
            at = stop_strings.feed(piece)
            first, held = brute_force(fed + piece, stops)
            if at is not None:
                assert len(fed) + at == first, (stops, fed, piece)
                break
            assert first is None and stop_strings.held() == held, (stops, fed, piece)
            fed += piece
