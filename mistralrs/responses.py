"""OpenAI-compatible response and chunk bodies: chat.completion, chat.completion.chunk, text_completion, as dicts
(the caller's thread turns them into JSON text)."""
import functools
import re
import time

from tokenizers import decoders


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


def now() -> int:
    return int(time.time())
