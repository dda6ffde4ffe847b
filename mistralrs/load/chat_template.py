"""Chat templates: where the template comes from, and rendering it with jinja2 in a sandbox, as transformers'
apply_chat_template does."""
import json
import re
import sys
import time
from datetime import datetime
from pathlib import Path

import jinja2.ext
from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

# The named special tokens transformers hands to templates (SPECIAL_TOKENS_ATTRIBUTES), when the model has them.
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def token_text(value) -> str | None:
    """tokenizer_config.json writes special tokens as a str or as an AddedToken dict with `content`."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def model_templates(tokenizer_config: dict, jinja: Path | None = None, json_file: Path | None = None):
    """The model's template(s), as transformers finds them: chat_template.jinja (what save_pretrained writes now),
    else chat_template.json's `chat_template`, else tokenizer_config.json's. A str, a dict of named templates
    (tokenizer_config.json may list them as [{"name": ..., "template": ...}]), or None."""
    if jinja is not None:
        return jinja.read_text(encoding="utf-8")
    if json_file is not None:
        data = _read_json(json_file)
        if "chat_template" not in data:
            raise ValueError(f"{json_file} has no 'chat_template' key")
        return _named(data["chat_template"], json_file)
    return _named(tokenizer_config.get("chat_template"), "tokenizer_config.json")


def _named(template, where):
    if not isinstance(template, list):
        return template
    try:
        return {t["name"]: t["template"] for t in template}
    except (TypeError, KeyError):
        raise ValueError(f"{where}: a list of chat templates must hold {{'name': ..., 'template': ...}} objects, "
                         f"got {template!r:.200}") from None


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:  # bare, it would not name the file
        raise ValueError(f"chat_template file {path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"chat_template file {path} must hold a JSON object, got {type(data).__name__}")
    return data


def resolve(override: str | None, tokenizer_config: dict) -> tuple[str | None, dict]:
    """The template to use and the special tokens it sees.

    tokenizer_config["chat_template"] is the model's template (see model_templates): a str, or named templates, of
    which `override` picks one by name, else "default" is used. Otherwise a user `override` wins: a path to a
    template file, a path to a JSON file with `chat_template` (and optionally bos_token/eos_token/unk_token), or a
    literal Jinja template.
    """
    tokens = {k: token_text(tokenizer_config.get(k)) for k in SPECIAL_TOKENS}
    template = _named(tokenizer_config.get("chat_template"), "tokenizer_config.json")
    if isinstance(template, dict):
        if override in template:
            return template[override], tokens
        if override is None and "default" not in template:
            raise ValueError(f"this model has several chat templates ({', '.join(sorted(template))}) and none named "
                             f"'default': pass chat_template= one of these names (or a template)")
        template = template.get("default")
    if override is not None:
        template = _override(override, tokens)
    return template, tokens


def _override(override, tokens: dict) -> str:
    if not isinstance(override, str):
        raise TypeError(f"chat_template must be a str (template, path or template name), got {override!r}")
    path = Path(override)
    if len(override) < 4096 and "{" not in override and path.is_file():
        if path.suffix != ".json":
            return path.read_text(encoding="utf-8")
        data = _read_json(path)
        if "chat_template" not in data:
            raise ValueError(f"chat_template file {override} has no 'chat_template' key")
        tokens.update({k: token_text(data[k]) for k in tokens if k in data})
        return data["chat_template"]
    if "{" in override:
        return override
    raise FileNotFoundError(f"chat_template {override!r} is neither a Jinja template, an existing file nor the name "
                            f"of one of the model's templates")


def _raise(message):
    raise TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # transformers' tojson: jinja2's own escapes HTML characters, which chat prompts must not get
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format):
    return datetime.now().strftime(format)


class TemplateLimits(ImmutableSandboxedEnvironment):
    """transformers' sandboxed environment with bounds on the work a template may do: its output (max_chars), every
    size a template can ask for in one operation (repetition, powers, padding widths, int arguments to methods and
    filters: at most max_chars), and its time (timeout seconds, checked at every line of the compiled template, so
    that nested loops that print nothing are stopped too)."""

    intercepted_binops = frozenset(["*", "**", "%"])

    def __init__(self, max_chars: int, timeout: float):
        super().__init__(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
        self.max_chars, self.timeout = max_chars, timeout
        self._last: tuple[str, jinja2.Template] | None = None  # a Runner renders one template: compile it once
        self.filters = {name: self._bounded(f) for name, f in {**self.filters, "tojson": _tojson}.items()}
        self.globals.update(raise_exception=_raise, strftime_now=_strftime_now)

    def _check_ints(self, args) -> None:
        for a in args:
            if isinstance(a, int) and abs(a) > self.max_chars:
                raise TemplateError(f"the template asks for a size of {a}, over the limit of {self.max_chars}")

    def _bounded(self, f):
        def bounded(*args, **kwargs):
            self._check_ints([*args, *kwargs.values()])
            return f(*args, **kwargs)
        if hasattr(f, "jinja_pass_arg"):  # jinja's pass_context/pass_environment mark must survive the wrapper
            bounded.jinja_pass_arg = f.jinja_pass_arg
        return bounded

    def call(__self, __context, __obj, *args, **kwargs):  # jinja's own signature
        __self._check_ints([*args, *kwargs.values()])
        return super().call(__context, __obj, *args, **kwargs)

    def call_binop(self, context, operator, left, right):
        if operator == "*" and (isinstance(left, (str, list, tuple)) or isinstance(right, (str, list, tuple))):
            n, seq = (right, left) if isinstance(left, (str, list, tuple)) else (left, right)
            if isinstance(n, int) and len(seq) * n > self.max_chars:
                raise TemplateError(f"the template repeats a value to more than {self.max_chars} items")
        if operator == "**" and isinstance(left, int) and isinstance(right, int) \
                and abs(left) > 1 and right * abs(left).bit_length() > 64 * 1024:
            raise TemplateError(f"the template computes {left} ** {right}, too large a number")
        if operator == "%" and isinstance(left, str):  # printf widths, written or taken from the arguments (*)
            self._check_ints(int(w) for w in re.findall(r"%[-+ #0]*(\d+)", left))
            if "*" in left:
                self._check_ints(right if isinstance(right, tuple) else [right])
        return super().call_binop(context, operator, left, right)

    def render(self, template: str | None, messages: list[dict], tokens: dict,
               add_generation_prompt: bool = True) -> str:
        """The prompt text, with the variables transformers passes: messages, tools and documents (None: requests
        carry neither), add_generation_prompt, and the model's named special tokens."""
        if template is None:
            raise ValueError("this model has no chat template: pass chat_template= to the loader, "
                             "or send `messages` as a plain string prompt")
        deadline = time.monotonic() + self.timeout

        def tracer(frame, event, arg):  # only the compiled template's own frames are traced line by line
            return on_line if frame.f_code.co_filename == "<template>" else None

        def on_line(frame, event, arg):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the chat template ran for more than {self.timeout} s")
            return on_line

        pieces, size, previous = [], 0, sys.gettrace()
        sys.settrace(tracer)
        try:
            for piece in self._compiled(template).generate(
                    messages=messages, tools=None, documents=None, add_generation_prompt=add_generation_prompt,
                    **{k: v for k, v in tokens.items() if v is not None}):
                size += len(piece)
                if size > self.max_chars:
                    raise ValueError(f"the rendered chat template passes {self.max_chars} characters "
                                     f"(load(max_template_chars=...))")
                pieces.append(piece)
        except TemplateError as e:
            raise ValueError(f"chat template failed: {e}") from None
        except (RecursionError, MemoryError, OverflowError) as e:
            raise ValueError(f"chat template failed: {type(e).__name__}: {e}") from None
        finally:
            sys.settrace(previous)
        return "".join(pieces)

    def _compiled(self, template: str) -> jinja2.Template:
        last = self._last  # one read: callers' threads render at once (a lost update only costs a compile)
        if last is None or last[0] != template:
            try:
                last = self._last = template, self.from_string(template)
            except TemplateError as e:
                raise ValueError(f"chat template failed: {e}") from None
        return last[1]


def render(template: str | None, messages: list[dict], tokens: dict, add_generation_prompt: bool = True) -> str:
    """Rendering with the default limits of load()."""
    return _default.render(template, messages, tokens, add_generation_prompt)


MAX_TEMPLATE_CHARS, TEMPLATE_TIMEOUT_S = 1_000_000, 5.0  # load()'s defaults
_default = TemplateLimits(MAX_TEMPLATE_CHARS, TEMPLATE_TIMEOUT_S)
