"""OpenAI-compatible response and chunk bodies (chat.completion, chat.completion.chunk, text_completion) as dicts,
made in the caller's thread from the engine's neutral records (engine/output.py's Delta and Final): chunk() and
response(), with the Reply that says what kind of body and for which request. The Runner turns them into JSON text;
the server serialises them itself."""
import functools
import re
from dataclasses import dataclass

from tokenizers import decoders

from .engine.output import Delta, Final


@dataclass(frozen=True)
class Reply:
    """What a request's bodies need besides its records: chat or completion, its id, the model, when it was made, a
    completion's echo (the prompt, before each choice's text) and suffix (after it), and the tokenizer that spells
    logprob tokens."""
    chat: bool
    id: str
    model: str
    created: int
    tokenizer: object
    echo: str = ""
    suffix: str = ""


def chunk(r: Reply, d: Delta, first: bool) -> dict:
    """A stream chunk of one choice's delta. first: the choice's first chunk (the assistant role; a completion's
    echo). Its last carries its finish_reason, usage and a completion's suffix."""
    use = usage(*d.usage) if d.usage is not None else None
    if r.chat:
        lps = None if d.logprobs is None else chat_logprobs(r.tokenizer, d.logprobs)
        return chat_chunk(r.id, r.model, r.created, d.index, d.text, d.finish_reason, lps, first, use)
    text = (r.echo if first else "") + d.text + (r.suffix if d.finish_reason else "")
    return completion(r.id, r.model, r.created, [completion_choice(d.index, text, d.finish_reason)], use)


def response(r: Reply, final: Final) -> dict:
    """The whole answer of a request that does not stream."""
    use = usage(*final.usage)
    if r.chat:
        choices = [chat_choice(c.index, c.text, c.finish_reason,
                               None if c.logprobs is None else chat_logprobs(r.tokenizer, c.logprobs))
                   for c in final.choices]
        return chat_completion(r.id, r.model, r.created, choices, use)
    choices = [completion_choice(c.index, r.echo + c.text + r.suffix, c.finish_reason) for c in final.choices]
    return completion(r.id, r.model, r.created, choices, use)


@functools.cache
def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's printable stand-in character for each byte, inverted."""
    visible = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    stand_ins = visible + [256 + i for i in range(256 - len(visible))]
    hidden = [b for b in range(256) if b not in visible]
    return {chr(c): b for c, b in zip(stand_ins, visible + hidden)}


def token_bytes(tokenizer, token: int) -> bytes:
    """The raw bytes a token stands for: a partial UTF-8 character stays partial, as OpenAI's `bytes` field wants."""
    piece = tokenizer.id_to_token(token) or ""
    if re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", piece):  # SentencePiece byte fallback
        return bytes([int(piece[3:5], 16)])
    if isinstance(tokenizer.decoder, decoders.ByteLevel) and all(c in _byte_level_alphabet() for c in piece):
        return bytes(_byte_level_alphabet()[c] for c in piece)
    if "\u2581" in piece:  # SentencePiece's word mark: a space, which decoding a lone token would strip
        return piece.replace("\u2581", " ").encode("utf-8")
    return tokenizer.decode([token], skip_special_tokens=False).encode("utf-8")


def token_logprob(tokenizer, token: int, logprob: float) -> dict:
    text = tokenizer.decode([token], skip_special_tokens=False)
    return {"token": text, "logprob": logprob, "bytes": list(token_bytes(tokenizer, token))}


def chat_logprobs(tokenizer, entries) -> dict:
    """entries: (token, logprob, [(top token, top logprob), ...]) per generated token."""
    return {"content": [
        {**token_logprob(tokenizer, tok, lp), "top_logprobs": [token_logprob(tokenizer, t, v) for t, v in top]}
        for tok, lp, top in entries
    ]}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chat_completion(rid: str, model: str, created: int, choices: list[dict], use: dict) -> dict:
    return {"id": rid, "object": "chat.completion", "created": created, "model": model,
            "system_fingerprint": "local", "choices": choices, "usage": use}


def chat_choice(index: int, text: str, finish_reason: str, logprobs: dict | None) -> dict:
    return {"index": index, "message": {"role": "assistant", "content": text},
            "finish_reason": finish_reason, "logprobs": logprobs}


def chat_chunk(rid: str, model: str, created: int, index: int, delta: str, finish_reason: str | None,
               logprobs: dict | None, first: bool, use: dict | None) -> dict:
    """One choice's delta; a choice's last chunk carries its finish_reason and its usage."""
    d = {"role": "assistant", "content": delta} if first else {"content": delta}
    body = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
            "system_fingerprint": "local",
            "choices": [{"index": index, "delta": d, "finish_reason": finish_reason, "logprobs": logprobs}]}
    if use is not None:
        body["usage"] = use
    return body


def completion(rid: str, model: str, created: int, choices: list[dict], use: dict | None) -> dict:
    body = {"id": rid, "object": "text_completion", "created": created, "model": model,
            "system_fingerprint": "local", "choices": choices}
    if use is not None:
        body["usage"] = use
    return body


def completion_choice(index: int, text: str, finish_reason: str | None) -> dict:
    return {"index": index, "text": text, "finish_reason": finish_reason, "logprobs": None}

