"""OpenAI request bodies -> the API's ChatCompletionRequest / CompletionRequest (app.py).

OpenAI name -> ours: n -> n_choices; max_tokens or max_completion_tokens -> max_tokens; stop (a string or a list) ->
stop_seqs; echo -> echo_prompt; response_format {"type": "json_object"} or {"type": "json_schema", "json_schema":
{"schema": ...}} -> grammar_type "json_schema" and the schema; the rest keep their names (seed, logprobs,
top_logprobs, logit_bias, presence_penalty, frequency_penalty, temperature, top_p, best_of, suffix, stream). Our
extensions ride along as extra body fields: top_k, grammar, grammar_type. Fields OpenAI has but we do not act on
(user, tools, ...) and unknown ones are ignored and listed in the x-mistralrs-ignored-fields response header. Values
are checked by the request classes; their ValueError / TypeError become 400s naming the OpenAI field.
"""
import json
import re
import uuid

from ..requests import ChatCompletionRequest, CompletionRequest

SHARED = {"model", "n", "max_tokens", "stop", "seed", "logit_bias", "presence_penalty", "frequency_penalty",
          "temperature", "top_p", "stream", "stream_options", "top_k", "grammar", "grammar_type"}
CHAT = SHARED | {"messages", "max_completion_tokens", "logprobs", "top_logprobs", "response_format"}
COMPLETION = SHARED | {"prompt", "best_of", "echo", "suffix", "response_format"}
OURS_TO_OPENAI = {"n_choices": "n", "stop_seqs": "stop", "echo_prompt": "echo"}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_


def _bad(message: str, param: str) -> APIError:
    return APIError(400, message, param)


def _stops(body: dict) -> list[str] | None:
    stop = body.get("stop")
    if stop is None or isinstance(stop, list):
        return stop
    if isinstance(stop, str):
        return [stop]
    raise _bad(f"stop must be a string or a list of strings, got {stop!r}", "stop")


def _logit_bias(body: dict) -> dict[int, float] | None:
    bias = body.get("logit_bias")
    if bias is None:
        return None
    if not isinstance(bias, dict):
        raise _bad("logit_bias must be an object of token id -> bias", "logit_bias")
    try:  # JSON object keys are strings
        return {int(k): v for k, v in bias.items()}
    except ValueError:
        raise _bad(f"logit_bias keys must be token ids, got {list(bias)!r}", "logit_bias") from None


def _grammar(body: dict) -> dict:
    """response_format, or our grammar / grammar_type extras, as the requests' grammar fields."""
    fmt = body.get("response_format")
    if fmt is None or fmt == {"type": "text"}:
        return {"grammar": body.get("grammar"), "grammar_type": body.get("grammar_type")}
    if not isinstance(fmt, dict) or fmt.get("type") not in ("text", "json_object", "json_schema"):
        raise _bad("response_format must be {'type': 'text' | 'json_object' | 'json_schema', ...}", "response_format")
    if fmt["type"] == "json_object":
        return {"grammar": json.dumps({"type": "object"}), "grammar_type": "json_schema"}
    schema = (fmt.get("json_schema") or {}).get("schema") if isinstance(fmt.get("json_schema"), dict) else None
    if not isinstance(schema, dict):
        raise _bad("response_format json_schema needs {'json_schema': {'name': ..., 'schema': {...}}}",
                   "response_format")
    return {"grammar": json.dumps(schema), "grammar_type": "json_schema"}


def _messages(body: dict) -> list[dict]:
    """OpenAI messages; a content given as parts keeps its text parts, joined."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("messages must be a non-empty list", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise _bad(f"messages[{i}] must be an object with role and content", "messages")
        content = m.get("content")
        if isinstance(content, list):
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise _bad(f"messages[{i}].content: only text parts are supported", "messages")
            content = "".join(p["text"] for p in content)
        out.append({"role": m.get("role"), "content": content})
    return out


def param_of(message: str) -> str | None:
    """The OpenAI field an error message of ours names first ("top_logprobs must be ...": top_logprobs; "the prompt
    has 600 tokens ...": prompt)."""
    for word in re.findall(r"[a-z_]+", message):
        if word in OURS_TO_OPENAI or word in CHAT | COMPLETION:
            return OURS_TO_OPENAI.get(word, word)
    return None


def _build(cls, ignored: list[str], **fields):
    """The request, with an id of its own so that a client that disconnects can abort it (Runner.abort)."""
    fields["request_id"] = f"{'chatcmpl' if cls is ChatCompletionRequest else 'cmpl'}-{uuid.uuid4().hex}"
    try:
        return cls(**fields), ignored
    except (ValueError, TypeError) as e:
        raise _bad(str(e), param_of(str(e))) from None


def chat_request(body: dict, model: str) -> tuple[ChatCompletionRequest, list[str]]:
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    return _build(ChatCompletionRequest, sorted(set(body) - CHAT), messages=_messages(body), model=model,
                  logprobs=body.get("logprobs", False), n_choices=body.get("n", 1), logit_bias=_logit_bias(body),
                  top_logprobs=body.get("top_logprobs"), max_tokens=max_tokens,
                  presence_penalty=body.get("presence_penalty"), frequency_penalty=body.get("frequency_penalty"),
                  temperature=body.get("temperature"), top_p=body.get("top_p"), top_k=body.get("top_k"),
                  stream=body.get("stream", False), seed=body.get("seed"), stop_seqs=_stops(body), **_grammar(body))


def completion_request(body: dict, model: str) -> tuple[CompletionRequest, list[str]]:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]  # one prompt given as a list
    if not isinstance(prompt, str):
        raise _bad("prompt must be a string (or a list of one string)", "prompt")
    if body.get("logprobs"):
        raise _bad("logprobs is not supported on /v1/completions; use /v1/chat/completions", "logprobs")
    return _build(CompletionRequest, sorted(set(body) - COMPLETION - {"logprobs"}), prompt=prompt, model=model,
                  best_of=body.get("best_of", 1), echo_prompt=body.get("echo", False),
                  logit_bias=_logit_bias(body), max_tokens=body.get("max_tokens", 16), n_choices=body.get("n", 1),
                  presence_penalty=body.get("presence_penalty"), frequency_penalty=body.get("frequency_penalty"),
                  stop_seqs=_stops(body), temperature=body.get("temperature"), top_p=body.get("top_p"),
                  top_k=body.get("top_k"), suffix=body.get("suffix"), seed=body.get("seed"),
                  stream=body.get("stream", False), **_grammar(body))


def include_usage(body: dict) -> bool:
    options = body.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True
