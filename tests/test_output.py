"""output.py without a model: token ids of the demo model's real tokenizer go in as the engine would feed them,
and the text, deltas and final records are checked against decoding the whole completion at once."""
import random
from pathlib import Path

import pytest
from tokenizers import Tokenizer

import mistralrs
from mistralrs.engine.output import Delta, Final, Output, StopStrings, Usage
from mistralrs.engine.sequence import Request, Sequence

TOKENIZER = Tokenizer.from_file(str(Path(mistralrs.__file__).parent / "data" / "demo-llama" / "tokenizer.json"))
EOS = 2
PROMPT = "The import statement"
PROMPT_LEN = len(TOKENIZER.encode(PROMPT).ids)
TEXT = " binds a name in the local namespace: café, 東京 and 🙂 are fine; import it as a module statement."


def tokens(text: str) -> list[int]:
    return TOKENIZER.encode(text, add_special_tokens=False).ids


def decode(ids: list[int]) -> str:
    return TOKENIZER.decode(ids, skip_special_tokens=True)


def make_request(n=1, n_return=None, stream=False, logprobs=False, stop=(), max_tokens=64) -> Request:
    prompt = TOKENIZER.encode(PROMPT).ids
    seqs = [Sequence(tokens=list(prompt), index=i, prompt_len=len(prompt), max_len=len(prompt) + max_tokens,
                     prefix_offset=len(prompt), read_offset=len(prompt),
                     stops=StopStrings(list(stop)) if stop else None) for i in range(n)]
    return Request(id="cmpl-test", seqs=seqs, n_return=n_return or n, stream=stream, logprobs=logprobs)


def advance(out: Output, seq: Sequence, token: int, logprob, top) -> str | None:
    """The token joins seq (the scheduler's postprocess, in the engine), then the output side takes it."""
    seq.tokens.append(token)
    return out.advance(seq, logprob, top)


def feed(out: Output, seq: Sequence, ids: list[int], logprob=-0.5, top=()):
    """Advance seq token by token as the engine does; the deltas a stream sends after each token (None: nothing)
    and the number of tokens taken before the sequence finished."""
    deltas = []
    for taken, t in enumerate(ids, 1):
        reason = advance(out, seq, t, logprob, list(top))
        seq.finish_reason = reason
        if seq.group.stream:
            deltas.append(out.delta(seq))
        if reason is not None:
            return deltas, taken
    return deltas, len(ids)


def streamed_text(deltas) -> str:
    return "".join(d.text for d in deltas if d is not None)


@pytest.fixture
def out():
    return Output(TOKENIZER, {EOS})


def test_eos_ends_with_stop_and_is_not_text_but_counts_as_a_token(out):
    req = make_request()
    ids = tokens(TEXT)[:6]
    _, taken = feed(out, req.seqs[0], ids + [EOS, *ids])
    assert taken == 7
    final = out.final(req)
    assert final == Final([Delta(0, decode(ids), ids + [EOS], None, "stop", None)], Usage(PROMPT_LEN, 7))


def test_length_limit(out):
    req = make_request(max_tokens=5)
    _, taken = feed(out, req.seqs[0], tokens(TEXT))
    final = out.final(req)
    assert taken == 5 and final.choices[0].finish_reason == "length" and final.usage.completion_tokens == 5
    assert final.choices[0].text == decode(tokens(TEXT)[:5])


def test_stop_string_spanning_tokens_is_cut_at_the_token_that_completes_it(out):
    ids = tokens(TEXT)
    boundary = len(decode(ids[:4]))  # the stop string takes the last 2 characters of token 4, 2 of token 5
    full = decode(ids)
    stop = full[boundary - 2: boundary + 2]
    req = make_request(stop=["never there", stop])
    _, taken = feed(out, req.seqs[0], ids)
    completes_at = next(i for i in range(1, len(ids) + 1) if stop in decode(ids[:i]))
    assert taken == completes_at == 5
    choice = out.final(req).choices[0]
    assert choice.text == full[: full.find(stop)] and choice.finish_reason == "stop"
    assert choice.token_ids == ids[:5]  # the tokens are all there, the text ends before the stop string


def test_stream_holds_back_a_possible_stop_string_until_it_is_ruled_out(out):
    ids = tokens(TEXT)
    at = next(i for i in range(len(ids)) if decode([ids[i]]) == " name")
    req = make_request(stream=True, stop=[" name is"])  # " name" could be its start: wait and see
    deltas, _ = feed(out, req.seqs[0], ids)
    sent_before = streamed_text(deltas[: at + 1])
    assert sent_before == decode(ids[:at]) and deltas[at] is None
    assert streamed_text(deltas[: at + 2]) == decode(ids[: at + 2])  # the next token rules it out: all goes out
    assert deltas[at + 1].token_ids == ids[at:at + 2]  # the held token goes with the one that released it
    assert streamed_text(deltas) == decode(ids)


@pytest.mark.parametrize("seed", range(20))
def test_streamed_deltas_equal_the_whole_text_for_any_stop_string(out, seed):
    rng = random.Random(seed)
    ids = tokens(TEXT)
    full = decode(ids)
    a = rng.randrange(len(full) - 8)
    stop = full[a: a + rng.randrange(1, 8)]
    whole, stream = make_request(stop=[stop]), make_request(stream=True, stop=[stop])
    feed(out, whole.seqs[0], ids)
    deltas, taken = feed(out, stream.seqs[0], ids)
    expected = full[: full.find(stop)]
    assert out.final(whole).choices[0].text == expected
    assert streamed_text(deltas) == expected
    assert [t for d in deltas if d is not None for t in d.token_ids] == ids[:taken]  # each token sent once
    for d in deltas[:-1]:  # no delta before the last ends the choice, the last carries the reason and usage
        assert d is None or (d.finish_reason is None and d.usage is None)
    assert deltas[-1].finish_reason == "stop" and deltas[-1].usage == Usage(PROMPT_LEN, len(deltas))


def test_partial_utf8_is_held_until_its_character_is_whole(out):
    ids = tokens(" café 🙂")
    pieces = [TOKENIZER.id_to_token(t) for t in ids]
    assert len(ids) > len(" café 🙂".split()) + 2  # é and 🙂 take several byte tokens each
    req = make_request(stream=True)
    seq = req.seqs[0]
    texts = []
    for t in ids:
        advance(out, seq, t, -0.1, [])
        d = out.delta(seq)
        texts.append(seq.text)
        assert "\ufffd" not in seq.text, pieces
        assert d is None or "\ufffd" not in d.text
    assert texts[-1] == " café 🙂"
    # while a character's bytes arrive the text does not move; it grows by the whole character at its last byte
    for i in range(1, len(ids)):
        if texts[i] == texts[i - 1]:
            assert "\ufffd" in decode(ids[: i + 1])


def test_a_sequence_ending_inside_a_character_keeps_what_a_full_decode_gives(out):
    ids = tokens(" 🙂")[:-1]  # the emoji's last byte never comes
    req = make_request(max_tokens=len(ids))
    feed(out, req.seqs[0], ids)
    assert out.final(req).choices[0].text == decode(ids)


def test_best_of_returns_the_highest_cumulative_logprob_first(out):
    req = make_request(n=4, n_return=2, max_tokens=4)
    scores = [-3.0, -1.0, -5.0, -2.0]  # per token, 4 tokens each
    words = [" alpha", " beta", " gamma", " delta"]
    for seq, lp, w in zip(req.seqs, scores, words):
        feed(out, seq, tokens(w * 4)[:4], logprob=lp)
    final = out.final(req)
    assert [c.text for c in final.choices] == [decode(tokens(" beta" * 4)[:4]), decode(tokens(" delta" * 4)[:4])]
    assert [c.index for c in final.choices] == [0, 1]
    assert final.usage.completion_tokens == 16  # every candidate's tokens were generated


def test_n_choices_keep_their_order(out):
    req = make_request(n=3)
    for seq, w in zip(req.seqs, [" one", " two", " three"]):
        feed(out, seq, tokens(w) + [EOS], logprob=-1.0 * (3 - seq.index))
    assert [c.text for c in out.final(req).choices] == [" one", " two", " three"]


def test_logprobs_go_with_their_tokens(out):
    """Each delta carries the logprob entries of exactly its tokens, also of those whose text was held back; the
    final record carries all of them."""
    ids = tokens(TEXT)[:8]
    req = make_request(stream=True, logprobs=True, max_tokens=8, stop=[" name is"])
    seq, deltas = req.seqs[0], []
    for i, t in enumerate(ids):
        advance(out, seq, t, -0.25 * i, [(t, -0.25 * i)])
        seq.finish_reason = "length" if i == len(ids) - 1 else None
        deltas.append(out.delta(seq))
    sent = [d for d in deltas if d is not None]
    assert any(len(d.token_ids) > 1 for d in sent)  # " name" was held back
    for d in sent:
        assert [e[0] for e in d.logprobs] == d.token_ids
    assert [e for d in sent for e in d.logprobs] == [(t, -0.25 * i, [(t, -0.25 * i)]) for i, t in enumerate(ids)]
    whole = make_request(logprobs=True, max_tokens=8)
    feed(out, whole.seqs[0], ids, logprob=-0.25)
    assert [e[0] for e in out.final(whole).choices[0].logprobs] == ids
    assert out.final(make_request()).choices[0].logprobs is None  # not asked for


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
