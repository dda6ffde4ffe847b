"""The request classes of the API and its two enums. Fields are checked here, in the caller's thread."""
import enum
import math
import numbers
from dataclasses import dataclass, fields

import torch

from .load.chat_template import MAX_TEMPLATE_CHARS, TEMPLATE_TIMEOUT_S


class ModelKind(enum.Enum):
    Normal = 1
    XLoraNormal = 2
    XLoraGGUF = 3
    XLoraGGML = 4
    QuantizedGGUF = 5
    QuantizedGGML = 6

    @property
    def is_xlora(self) -> bool:
        return self in (ModelKind.XLoraNormal, ModelKind.XLoraGGUF, ModelKind.XLoraGGML)

    @property
    def is_quantized(self) -> bool:
        """Weights from a GGUF or legacy GGML file (with or without X-LoRA adapters)."""
        return self not in (ModelKind.Normal, ModelKind.XLoraNormal)

    @property
    def is_gguf(self) -> bool:
        return self in (ModelKind.QuantizedGGUF, ModelKind.XLoraGGUF)


class DType(enum.Enum):
    U8 = "u8"
    U32 = "u32"
    I64 = "i64"
    BF16 = "bf16"
    F16 = "f16"
    F32 = "f32"
    F64 = "f64"


MODEL_DTYPES = {DType.BF16: torch.bfloat16, DType.F16: torch.float16, DType.F32: torch.float32}


def model_dtype(dtype, device: torch.device) -> torch.dtype:
    """The torch dtype to load weights in: None means bf16 on CUDA, f32 elsewhere."""
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype) and dtype in MODEL_DTYPES.values():
        return dtype
    if not isinstance(dtype, (DType, torch.dtype)):
        raise TypeError(f"dtype must be a mistralrs.DType or None, got {dtype!r}")
    if dtype not in MODEL_DTYPES:
        raise ValueError(f"dtype {dtype} cannot hold model weights; use DType.F32, DType.F16 or DType.BF16")
    return MODEL_DTYPES[dtype]


MAX_INT = 2**31 - 1  # token counts, top_k: far beyond any model, small enough for an int32 tensor


def _check_int(name: str, value, minimum: int, optional: bool = True, maximum: int = MAX_INT):
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int{' or None' if optional else ''}, got {value!r}")
    if not minimum <= value <= maximum:
        raise ValueError(f"{name} must be in [{minimum}, {maximum}], got {value}")


def _check_float(name: str, value, low: float, high: float, open_low: bool = False):
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number or None, got {value!r}")
    if not math.isfinite(value) or (value <= low if open_low else value < low) or value > high:
        raise ValueError(f"{name} must be a finite number in {'(' if open_low else '['}{low}, {high}], got {value}")


def _check_bool(name: str, value):
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r}")


def _plain(value):
    """A deep copy made of built-in types only (int/float for any numbers.Integral/Real, str, list, dict), so that a
    sent request shares nothing with the caller's objects and its checks see exactly what the engine will use."""
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    return value  # not a type any field takes: the constructor's checks reject it


MIN_TEMPERATURE = 1e-3  # below it, logits / T overflows float32 on some rows: use 0 (greedy) instead


class _SamplingFields:
    """Fields both request kinds share, checked the same way. frozen() is the copy a Runner serves."""

    _frozen = False

    def __setattr__(self, name, value):
        if self._frozen:
            raise AttributeError(f"this {type(self).__name__} is the immutable copy of a sent request")
        super().__setattr__(name, value)

    def frozen(self):
        """An immutable, checked copy: the Runner takes one when a request is sent, so changing this object later
        (a NaN written into logit_bias, say) cannot reach the engine."""
        fields = {k: _plain(v) for k, v in self._fields().items()}
        copy = type(self)(**fields)
        object.__setattr__(copy, "_frozen", True)
        return copy

    def _fields(self) -> dict:
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}

    def __repr__(self):
        return f"{type(self).__name__}({self._fields()!r})"

    def _check_sampling(self):
        if not isinstance(self.model, str):
            raise TypeError(f"model must be a str, got {self.model!r}")
        _check_int("max_tokens", self.max_tokens, 1)
        _check_int("n_choices", self.n_choices, 1, optional=False)
        _check_float("presence_penalty", self.presence_penalty, -2.0, 2.0)
        _check_float("frequency_penalty", self.frequency_penalty, -2.0, 2.0)
        _check_float("temperature", self.temperature, 0.0, 100.0)
        if self.temperature is not None and 0 < self.temperature < MIN_TEMPERATURE:
            raise ValueError(f"temperature must be 0 (greedy) or in [{MIN_TEMPERATURE}, 100], got {self.temperature}")
        _check_float("top_p", self.top_p, 0.0, 1.0, open_low=True)
        _check_int("top_k", self.top_k, 1)
        _check_int("seed", self.seed, 0, maximum=2**63 - 1)
        _check_float("timeout", self.timeout, 0.0, 1e9, open_low=True)
        if self.request_id is not None and (not isinstance(self.request_id, str) or not self.request_id):
            raise TypeError(f"request_id must be a non-empty str or None, got {self.request_id!r}")
        _check_bool("stream", self.stream)
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict):
                raise TypeError(f"logit_bias must be a dict[int, float] or None, got {self.logit_bias!r}")
            for k, v in self.logit_bias.items():
                _check_int("logit_bias key", k, 0, optional=False)
                _check_float(f"logit_bias[{k}]", v, -100.0, 100.0)

    GRAMMAR_TYPES = ("regex", "json_schema", "lark", "gbnf")

    def _check_stops_and_grammar(self):
        stop_seqs, grammar, grammar_type = self.stop_seqs, self.grammar, self.grammar_type
        if stop_seqs is not None and (not isinstance(stop_seqs, (list, tuple))
                                      or not all(isinstance(s, str) and s for s in stop_seqs)):
            raise TypeError(f"stop_seqs must be a list of non-empty str or None, got {stop_seqs!r}")
        if (grammar is None) != (grammar_type is None):
            raise ValueError("grammar and grammar_type must be given together")
        if grammar_type is not None and grammar_type not in self.GRAMMAR_TYPES:
            raise ValueError(f"grammar_type must be one of {', '.join(self.GRAMMAR_TYPES)}, got {grammar_type!r}")
        if grammar is not None and not isinstance(grammar, str):
            raise TypeError(f"grammar must be a str, got {grammar!r}")


class ChatCompletionRequest(_SamplingFields):
    """An OpenAI chat request. `messages` is a list of {"role", "content"} dicts, or a plain string used as the raw
    prompt without a chat template. Keyword-only extras: `seed` makes sampling reproducible, `timeout` (seconds)
    aborts the request when it expires, `request_id` names it for Runner.abort (default: a fresh id); `stop_seqs`,
    `grammar` and `grammar_type` are CompletionRequest's (the server's `stop` and `response_format`)."""

    ROLES = ("system", "user", "assistant", "tool")

    def __init__(self, messages, model, logprobs=False, n_choices=1, logit_bias=None, top_logprobs=None,
                 max_tokens=None, presence_penalty=None, frequency_penalty=None, stop_token_ids=None,
                 temperature=None, top_p=None, top_k=None, stream=False, *, seed=None, timeout=None, request_id=None,
                 stop_seqs=None, grammar=None, grammar_type=None):
        self.messages, self.model, self.logprobs, self.n_choices = messages, model, logprobs, n_choices
        self.stop_seqs, self.grammar, self.grammar_type = stop_seqs, grammar, grammar_type
        self.logit_bias, self.top_logprobs, self.max_tokens = logit_bias, top_logprobs, max_tokens
        self.presence_penalty, self.frequency_penalty = presence_penalty, frequency_penalty
        self.stop_token_ids, self.temperature, self.top_p, self.top_k = stop_token_ids, temperature, top_p, top_k
        self.stream, self.seed, self.timeout, self.request_id = stream, seed, timeout, request_id
        self._check_sampling()
        self._check_messages()
        self._check_stops_and_grammar()
        _check_bool("logprobs", logprobs)
        _check_int("top_logprobs", top_logprobs, 0, maximum=20)
        if top_logprobs is not None and not logprobs:
            raise ValueError("top_logprobs needs logprobs=True")
        if stop_token_ids is not None:
            if not isinstance(stop_token_ids, (list, tuple)):
                raise TypeError(f"stop_token_ids must be a list[int] or None, got {stop_token_ids!r}")
            for t in stop_token_ids:
                _check_int("stop_token_ids entry", t, 0, optional=False)

    def _check_messages(self):
        if isinstance(self.messages, str):
            return
        if not isinstance(self.messages, (list, tuple)) or not self.messages:
            raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts, or a str")
        for i, m in enumerate(self.messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise TypeError(f"messages[{i}] must be a dict with str 'role' and 'content', got {m!r}")
            if m["role"] not in self.ROLES:
                raise ValueError(f"messages[{i}] has role {m['role']!r}; allowed roles: {', '.join(self.ROLES)}")


class CompletionRequest(_SamplingFields):
    """An OpenAI completion request. API.md lists `best_of` both third and as `best_of = 1`: it is the third
    positional parameter with default 1. `seed`, `stream`, `timeout` and `request_id` are keyword-only extensions
    (see ChatCompletionRequest)."""

    def __init__(self, prompt, model, best_of=1, echo_prompt=False, logit_bias=None, max_tokens=None, n_choices=1,
                 presence_penalty=None, frequency_penalty=None, stop_seqs=None, temperature=None, top_p=None,
                 top_k=None, suffix=None, grammar=None, grammar_type=None, *, seed=None, stream=False, timeout=None,
                 request_id=None):
        self.prompt, self.model, self.best_of, self.echo_prompt = prompt, model, best_of, echo_prompt
        self.logit_bias, self.max_tokens, self.n_choices = logit_bias, max_tokens, n_choices
        self.presence_penalty, self.frequency_penalty, self.stop_seqs = presence_penalty, frequency_penalty, stop_seqs
        self.temperature, self.top_p, self.top_k, self.suffix = temperature, top_p, top_k, suffix
        self.grammar, self.grammar_type, self.seed, self.stream = grammar, grammar_type, seed, stream
        self.timeout, self.request_id = timeout, request_id
        self._check_sampling()
        if not isinstance(prompt, str) or not prompt:
            raise ValueError(f"prompt must be a non-empty str, got {prompt!r}")
        _check_int("best_of", best_of, 1, optional=False)
        _check_bool("echo_prompt", echo_prompt)
        if suffix is not None and not isinstance(suffix, str):
            raise TypeError(f"suffix must be a str or None, got {suffix!r}")
        self._check_stops_and_grammar()


@dataclass(frozen=True)
class Limits:
    """load()'s bounds on the work one request may ask for; each is checked in the caller's thread."""
    max_choices: int = 64            # n_choices, and best_of
    max_stop_strings: int = 16       # stop_seqs entries
    max_stop_length: int = 1000      # characters of each stop string
    max_prompt_chars: int = 1_000_000  # characters given to the tokenizer (prompt, or rendered chat template)
    max_template_chars: int = MAX_TEMPLATE_CHARS  # characters a chat template may render
    template_timeout: float = TEMPLATE_TIMEOUT_S  # seconds a chat template may run

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type is float:
                ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value <= 1e6
                kind = "number of seconds (at most 1e6)"
            else:
                ok = isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 2**31 - 1
                kind = "int"
            if not ok:
                raise ValueError(f"{f.name} must be a positive {kind}, got {value!r}")
