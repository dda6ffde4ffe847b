"""Chat templates: where the template comes from, and rendering it with jinja2 in a sandbox."""
import json
from pathlib import Path

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment


def token_text(value) -> str | None:
    """tokenizer_config.json writes special tokens as a str or as an AddedToken dict with `content`."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def resolve(override: str | None, tokenizer_config: dict) -> tuple[str | None, dict]:
    """The template to use and the special tokens it sees.

    A user `override` wins over tokenizer_config.json. It is a path to a template file, a path to a JSON file
    with `chat_template` (and optionally bos_token/eos_token/unk_token), or a literal Jinja template.
    """
    tokens = {k: token_text(tokenizer_config.get(k)) for k in ("bos_token", "eos_token", "unk_token")}
    template = tokenizer_config.get("chat_template")
    if override is not None:
        if not isinstance(override, str):
            raise TypeError(f"chat_template must be a str (template or path), got {override!r}")
        path = Path(override)
        if len(override) < 4096 and "{" not in override and path.is_file():
            text = path.read_text()
            if path.suffix == ".json":
                try:
                    data = json.loads(text)
                except json.JSONDecodeError as e:  # bare, it would not name the file
                    raise ValueError(f"chat_template file {override} is not valid JSON: {e}") from None
                if "chat_template" not in data:
                    raise ValueError(f"chat_template file {override} has no 'chat_template' key")
                text = data["chat_template"]
                tokens.update({k: token_text(data[k]) for k in tokens if k in data})
            template = text
        elif "{" in override:
            template = override
        else:
            raise FileNotFoundError(f"chat_template {override!r} is neither a Jinja template nor an existing file")
    if isinstance(template, list):  # several named templates: use the default one
        named = {t["name"]: t["template"] for t in template}
        template = named.get("default", next(iter(named.values())))
    return template, tokens


def _raise(message):
    raise TemplateError(message)


_env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
_env.globals["raise_exception"] = _raise


def render(template: str | None, messages: list[dict], tokens: dict, add_generation_prompt: bool = True) -> str:
    if template is None:
        raise ValueError("this model has no chat template: pass chat_template= to the loader, "
                         "or send `messages` as a plain string prompt")
    try:
        return _env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                 **tokens)
    except TemplateError as e:
        raise ValueError(f"chat template failed: {e}") from None
