"""responses.py's builders validate as the openai package's types, token bytes are the text's UTF-8, and the
engine's records (Delta, Final) become the bodies a stream and a whole answer send."""
import json
from pathlib import Path

import pytest
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from tokenizers import Tokenizer, decoders, models

import mistralrs
from mistralrs import responses
from mistralrs.engine.output import Delta, Final, Usage

DEMO = Tokenizer.from_file(str(Path(mistralrs.__file__).parent / "data" / "demo-llama" / "tokenizer.json"))


def byte_fallback_tokenizer() -> Tokenizer:
    """SentencePiece-style vocabulary with <0xNN> byte tokens and Llama's decoder."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)},
             "▁caf": 259, "▁and": 260}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    return tok


@pytest.mark.parametrize("tokenizer", [DEMO, byte_fallback_tokenizer()], ids=["byte_level", "byte_fallback"])
def test_token_bytes_join_into_the_texts_utf8(tokenizer):
    if tokenizer is DEMO:
        ids = DEMO.encode(" café, 東京 🙂", add_special_tokens=False).ids
    else:
        ids = [259, *(3 + b for b in "é".encode()), 260, *(3 + b for b in " 🙂".encode())]
    text = tokenizer.decode(ids)
    assert "\ufffd" not in text
    joined = b"".join(responses.token_bytes(tokenizer, t) for t in ids)
    # the byte-fallback decoder strips the first token's leading space; the bytes keep it
    assert joined.decode("utf-8") in (text, " " + text)
    assert any(len(responses.token_bytes(tokenizer, t)) == 1 and responses.token_bytes(tokenizer, t)[0] >= 0x80
               for t in ids)  # a partial character stays partial


def test_chat_completion_with_logprobs_is_a_chat_completion():
    ids = DEMO.encode(" import café", add_special_tokens=False).ids
    entries = [(t, -0.5 * i, [(t, -0.5 * i), (3, -4.0)]) for i, t in enumerate(ids)]
    lps = responses.chat_logprobs(DEMO, entries)
    body = responses.chat_completion("chatcmpl-1", "demo", 1700000000,
                                     [responses.chat_choice(0, DEMO.decode(ids), "stop", lps),
                                      responses.chat_choice(1, "", "length", None)],
                                     responses.usage(7, 5))
    r = ChatCompletion.model_validate(body)
    assert r.object == "chat.completion" and r.created == 1700000000 and r.model == "demo"
    assert [c.index for c in r.choices] == [0, 1] and r.choices[1].logprobs is None
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == DEMO.decode(ids)
    content = r.choices[0].logprobs.content
    assert [e.token for e in content] == [DEMO.decode([t]) for t in ids]
    assert [e.logprob for e in content] == [-0.5 * i for i in range(len(ids))]
    assert [[t.token for t in e.top_logprobs] for e in content] == [[DEMO.decode([t]), "!"] for t in ids]
    assert bytes(b for e in content for b in e.bytes).decode() == DEMO.decode(ids)
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (7, 5, 12)


def test_chat_chunks():
    first = ChatCompletionChunk.model_validate(
        responses.chat_chunk("chatcmpl-1", "demo", 5, 0, "Hel", None, None, True, None))
    last = ChatCompletionChunk.model_validate(
        responses.chat_chunk("chatcmpl-1", "demo", 5, 2, "lo", "stop", None, False, responses.usage(3, 2)))
    assert first.object == "chat.completion.chunk" and first.usage is None
    assert first.choices[0].delta.role == "assistant" and first.choices[0].finish_reason is None
    assert last.choices[0].delta.role is None and last.choices[0].delta.content == "lo"
    assert last.choices[0].index == 2 and last.choices[0].finish_reason == "stop"
    assert last.usage.total_tokens == 5


def test_completion_and_its_chunks():
    body = responses.completion("cmpl-1", "demo", 9, [responses.completion_choice(0, "a b", "length"),
                                                     responses.completion_choice(1, "c", "stop")],
                                responses.usage(4, 6))
    r = Completion.model_validate(body)
    assert r.object == "text_completion" and [c.text for c in r.choices] == ["a b", "c"]
    assert [c.finish_reason for c in r.choices] == ["length", "stop"] and r.usage.total_tokens == 10
    chunk = responses.completion("cmpl-1", "demo", 9, [responses.completion_choice(1, "x", None)], None)
    assert "usage" not in chunk and chunk["choices"][0]["finish_reason"] is None  # null until the choice ends
    assert json.loads(json.dumps(body)) == body  # plain JSON types only


CHAT = responses.Reply(chat=True, id="chatcmpl-1", model="demo", created=1700000000, tokenizer=DEMO)
COMPLETION = responses.Reply(chat=False, id="cmpl-1", model="demo", created=1700000000, tokenizer=DEMO,
                             echo="The prompt", suffix=" [end]")


def entries(ids, top=0):
    return [(t, -0.5 * i, [(t, -0.5 * i), (3, -4.0)][:top]) for i, t in enumerate(ids)]


def test_chat_deltas_become_chunks():
    """A choice's first chunk says the role; logprob tokens are spelled from their ids, top ones included; the
    choice's last chunk carries its finish_reason and usage."""
    ids = DEMO.encode(" import café", add_special_tokens=False).ids
    first = ChatCompletionChunk.model_validate(
        responses.chunk(CHAT, Delta(1, DEMO.decode(ids[:2]), ids[:2], entries(ids[:2], top=2), None, None), True))
    last = ChatCompletionChunk.model_validate(
        responses.chunk(CHAT, Delta(1, "", ids[2:], [], "length", Usage(7, len(ids))), False))
    assert (first.id, first.model, first.created, first.choices[0].index) == ("chatcmpl-1", "demo", 1700000000, 1)
    assert first.choices[0].delta.role == "assistant" and first.choices[0].delta.content == DEMO.decode(ids[:2])
    assert [e.token for e in first.choices[0].logprobs.content] == [DEMO.decode([t]) for t in ids[:2]]
    assert [t.token for t in first.choices[0].logprobs.content[0].top_logprobs] == [DEMO.decode(ids[:1]), "!"]
    assert first.usage is None and first.choices[0].finish_reason is None
    assert last.choices[0].delta.role is None and last.choices[0].logprobs.content == []
    assert last.choices[0].finish_reason == "length" and last.usage.total_tokens == 7 + len(ids)
    plain = responses.chunk(CHAT, Delta(0, "x", [5], None, None, None), False)
    assert plain["choices"][0]["logprobs"] is None  # the request asked for none


def test_completion_deltas_get_the_echo_first_and_the_suffix_last():
    texts = [responses.chunk(COMPLETION, Delta(0, "a", [5], None, None, None), True),
             responses.chunk(COMPLETION, Delta(0, "b", [6], None, None, None), False),
             responses.chunk(COMPLETION, Delta(0, "c", [7, 2], None, "stop", Usage(3, 3)), False)]
    assert [c["choices"][0]["text"] for c in texts] == ["The prompta", "b", "c [end]"]
    assert [c["choices"][0]["finish_reason"] for c in texts] == [None, None, "stop"]  # null until the choice ends
    last = Completion.model_validate(texts[-1])  # (openai's type takes no null finish_reason)
    assert "usage" not in texts[0] and last.object == "text_completion" and last.usage.total_tokens == 6


def test_final_records_become_whole_answers():
    ids = DEMO.encode(" import café", add_special_tokens=False).ids
    final = Final([Delta(0, DEMO.decode(ids), ids, entries(ids), "stop", None), Delta(1, "", [2], [], "stop", None)],
                  Usage(7, len(ids) + 1))
    chat = ChatCompletion.model_validate(responses.response(CHAT, final))
    assert [c.message.content for c in chat.choices] == [DEMO.decode(ids), ""]
    assert [e.token for e in chat.choices[0].logprobs.content] == [DEMO.decode([t]) for t in ids]
    assert chat.usage.completion_tokens == len(ids) + 1
    without = Final([Delta(0, "a b", [5, 6], None, "length", None)], Usage(4, 2))
    assert ChatCompletion.model_validate(responses.response(CHAT, without)).choices[0].logprobs is None
    body = responses.response(COMPLETION, without)
    r = Completion.model_validate(body)
    assert r.choices[0].text == "The prompta b [end]" and r.usage.total_tokens == 6
    assert json.loads(json.dumps(body)) == body
