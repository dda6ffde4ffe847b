"""model_id -> local files: a local directory, or a Hugging Face hub repo through huggingface_hub and its cache.

Hub downloads go through `hf_hub_download`, so HF_HOME, HF_HUB_CACHE, HF_TOKEN and HF_HUB_OFFLINE=1 behave as in
every other HF library; offline, files come from the cache.
"""
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import huggingface_hub
from huggingface_hub.utils import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
    validate_repo_id,
)

log = logging.getLogger(__name__)

TOKEN_SOURCES = ("cache", "literal", "envvar", "path", "none")
_NEEDS_VALUE = ("literal", "envvar", "path")


class _AbsentFile(FileNotFoundError):
    """The repo is reachable (or its snapshot is cached) and simply has no such file at that revision."""


def resolve_token(token_source: str = "cache", token_source_value: str | None = None) -> str | bool:
    """Token for huggingface_hub's `token=` argument: a str, or False for anonymous access.

    "cache" uses huggingface_hub's own lookup (HF_TOKEN, then HF_HOME/token) and falls back to anonymous with a log
    line when nothing is stored; "literal" is the value, "envvar" the named variable, "path" the file's contents;
    "none" is anonymous. Tokens are stripped.
    """
    if token_source not in TOKEN_SOURCES:
        raise ValueError(f"token_source must be one of {', '.join(map(repr, TOKEN_SOURCES))}, got {token_source!r}")
    if token_source in _NEEDS_VALUE and token_source_value is None:
        raise ValueError(f"token_source={token_source!r} needs token_source_value (the token, a variable name or "
                         f"a file path)")
    if token_source not in _NEEDS_VALUE and token_source_value is not None:
        # Do not echo the value: it may well be a token.
        raise ValueError(f"token_source={token_source!r} takes no token_source_value; pass None, or use "
                         f"token_source='literal', 'envvar' or 'path'")
    if token_source == "none":
        return False
    if token_source == "cache":
        token = huggingface_hub.get_token()
        if not token:
            log.info("no Hugging Face token stored (HF_TOKEN, HF_HOME/token); using anonymous access")
            return False
        return token.strip()
    if token_source == "literal":
        token, origin = token_source_value, "token_source_value"
    elif token_source == "envvar":
        if token_source_value not in os.environ:
            raise ValueError(f"token_source='envvar': environment variable {token_source_value!r} is not set")
        token, origin = os.environ[token_source_value], f"environment variable {token_source_value!r}"
    else:
        token, origin = _read_token_file(Path(token_source_value)), f"token file {token_source_value!r}"
    if not token.strip():
        raise ValueError(f"token_source={token_source!r}: {origin} is empty")
    return token.strip()


def _read_token_file(path: Path) -> str:
    if not path.is_file():
        raise FileNotFoundError(f"token_source='path': token file {str(path)!r} is missing or not a file")
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"token_source='path': cannot read token file {str(path)!r}: {e}") from e


def repo_file(repo_id: str, filename: str, *, revision: str | None = None, token: str | bool = False) -> Path:
    """Local path of `filename` in `repo_id`: an existing local directory (checked first, as transformers does;
    revision ignored) or a hub repo id, downloaded into (or, offline, read from) the huggingface_hub cache.
    Missing files raise FileNotFoundError naming repo, file and revision."""
    where = _where(repo_id, revision)
    if Path(repo_id).is_dir():
        path = Path(repo_id) / filename
        if not path.is_file():
            raise _AbsentFile(f"{filename} not found in {where}")
        return path
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise ValueError(f"model id {repo_id!r} is neither an existing local directory nor a valid Hugging Face "
                         f"repo id ('name' or 'namespace/name'): {e}") from e
    revision = revision or "main"
    try:
        return Path(huggingface_hub.hf_hub_download(repo_id, filename, revision=revision, token=token))
    except GatedRepoError as e:
        raise PermissionError(f"{where} is gated: accept its terms on the Hub and pass a token with access "
                              f"(token_source and token_source_value)") from e
    except RepositoryNotFoundError as e:
        raise FileNotFoundError(f"{repo_id!r} is not a local directory, and the Hub has no repo {repo_id!r} that "
                                f"this token can read (private repos need a token)") from e
    except RevisionNotFoundError as e:
        raise FileNotFoundError(f"hub repo {repo_id!r} has no revision {revision!r}") from e
    except LocalEntryNotFoundError as e:  # Hub unreachable or HF_HUB_OFFLINE=1, and not in the cache
        raise _not_cached(repo_id, filename, revision, where) from e
    except EntryNotFoundError as e:  # the Hub answered: no such file
        raise _AbsentFile(f"{filename} not found in {where}") from e
    except HfHubHTTPError as e:  # a 401 not classed as RepositoryNotFoundError means the token itself was refused
        if e.response.status_code != 401:
            raise
        raise PermissionError(f"the Hub refused the token for {where} (401): check token_source and "
                              f"token_source_value") from e


def _where(repo_id: str, revision: str | None) -> str:
    if Path(repo_id).is_dir():
        return f"local model directory {repo_id!r}"
    return f"hub repo {repo_id!r} at revision {revision or 'main'!r}"


def _not_cached(repo_id: str, filename: str, revision: str, where: str) -> FileNotFoundError:
    # Offline the cache is all we know: when it holds this revision's snapshot (complete, as far as its cached file
    # listing tells) the file is absent there; anything else (revision never downloaded, network down) is unknown.
    offline = huggingface_hub.constants.is_offline_mode()
    if offline:
        try:
            huggingface_hub.snapshot_download(repo_id, revision=revision, allow_patterns=[filename],
                                              local_files_only=True)
            return _AbsentFile(f"{filename} not found in {where} (HF_HUB_OFFLINE=1: read from the cached snapshot)")
        except LocalEntryNotFoundError:
            pass
    reason = "HF_HUB_OFFLINE=1 is set" if offline else "the Hub cannot be reached"
    return FileNotFoundError(f"cannot get {filename} of {where}: it is not in the local cache "
                             f"({huggingface_hub.constants.HF_HUB_CACHE}) and {reason}; check the repo id and "
                             f"revision, or download it once online")


def optional_repo_file(repo_id: str, filename: str, *, revision: str | None = None,
                       token: str | bool = False) -> Path | None:
    """repo_file, or None when the file does not exist at that revision; other errors (repo or revision unknown,
    auth, network) still raise."""
    try:
        return repo_file(repo_id, filename, revision=revision, token=token)
    except _AbsentFile:
        return None


@dataclass(frozen=True)
class ModelFiles:
    config: Path
    tokenizer_json: Path | None
    tokenizer_config: Path | None
    generation_config: Path | None
    weights: list[Path]  # safetensors files, in shard order
    chat_template_jinja: Path | None = None  # where transformers now saves the template
    chat_template_json: Path | None = None  # {"chat_template": ...}, as processors saved it


def model_files(model_id: str, *, revision: str | None = None, token: str | bool = False,
                tokenizer_json: str | None = None, weights: bool = True) -> ModelFiles:
    """The files a safetensors model needs. config.json is required; tokenizer.json (unless `tokenizer_json`, a local
    path, overrides it), tokenizer_config.json, generation_config.json, chat_template.jinja and chat_template.json
    are optional."""
    kw = dict(revision=revision, token=token)
    config = repo_file(model_id, "config.json", **kw)
    if tokenizer_json is not None:
        tok = Path(tokenizer_json)
        if not tok.is_file():
            raise FileNotFoundError(f"tokenizer_json {tokenizer_json!r} does not exist or is not a file")
    else:
        tok = optional_repo_file(model_id, "tokenizer.json", **kw)
    return ModelFiles(config=config, tokenizer_json=tok,
                      tokenizer_config=optional_repo_file(model_id, "tokenizer_config.json", **kw),
                      generation_config=optional_repo_file(model_id, "generation_config.json", **kw),
                      weights=_weights(model_id, revision, token) if weights else [],
                      **chat_template_files(model_id, **kw))


def chat_template_files(model_id: str, **kw) -> dict[str, Path | None]:
    """chat_template.jinja and chat_template.json of model_id, each None when absent."""
    return {"chat_template_jinja": optional_repo_file(model_id, "chat_template.jinja", **kw),
            "chat_template_json": optional_repo_file(model_id, "chat_template.json", **kw)}


def _weights(model_id: str, revision: str | None, token: str | bool) -> list[Path]:
    # Only the index's shards or model.safetensors: Mistral repos also ship consolidated.safetensors, the same
    # weights again, so globbing *.safetensors would double the download.
    index = optional_repo_file(model_id, "model.safetensors.index.json", revision=revision, token=token)
    if index is not None:
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:  # bare, these would not name the file
            raise ValueError(f"{index} is not a safetensors index (JSON with a 'weight_map' object): {e!r}") from None
        return [repo_file(model_id, shard, revision=revision, token=token) for shard in shards]
    single = optional_repo_file(model_id, "model.safetensors", revision=revision, token=token)
    if single is None:
        raise FileNotFoundError(f"no safetensors weights found in {_where(model_id, revision)}: expected "
                                f"model.safetensors.index.json or model.safetensors")
    return [single]


def quantized_path(repo_id: str, filename: str, revision: str | None, token) -> Path:
    """quantized_model_id "" means quantized_filename is a local path; otherwise a file of that repo (or local dir)."""
    if not isinstance(filename, str) or not filename:
        raise ValueError(f"quantized_filename must be a non-empty str, got {filename!r}")
    if repo_id == "":
        path = Path(filename)
        if not path.is_file():
            raise FileNotFoundError(f"quantized_filename {filename!r} does not exist or is not a file "
                                    f"(quantized_model_id=\"\" means a local path)")
        return path
    if not isinstance(repo_id, str):
        raise TypeError(f"quantized_model_id must be a str (hub repo id, local directory, or \"\"), got {repo_id!r}")
    return repo_file(repo_id, filename, revision=revision or "main", token=token)
