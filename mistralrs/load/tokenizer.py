"""A model's tokenizer and its stop ids: tokenizer.json (from the repo or the tokenizer_json override) or, for a
GGUF/GGML file without one, the file's own tokenizer.ggml.* vocabulary; EOS ids from every config file together
(for GGUF/GGML files, llama.cpp's end-of-generation set in place of config.json's)."""
from pathlib import Path

from tokenizers import Tokenizer

from ..model_args import read_json
from . import hub
from .chat_template import model_templates
from .gguf_tokenizer import config_from_vocab, read_vocab, tokenizer_from_gguf


def load_tokenizer(files: hub.ModelFiles, model_id: str) -> tuple[Tokenizer, dict]:
    """The tokenizer and tokenizer_config.json, whose chat_template is the model's template from whichever file
    holds it (chat_template.model_templates)."""
    if files.tokenizer_json is None:
        raise FileNotFoundError(f"{model_id} has no tokenizer.json; pass tokenizer_json= to the loader")
    tok_cfg = read_json(files.tokenizer_config) if files.tokenizer_config else {}
    tok_cfg["chat_template"] = model_templates(tok_cfg, files.chat_template_jinja, files.chat_template_json)
    return tokenizer_from_file(files.tokenizer_json), tok_cfg


def quantized_tokenizer(qfile, model_id: str | None, tokenizer_json: str | None, revision,
                        token) -> tuple[Tokenizer, dict, dict, set[int]]:
    """Tokenizer, tokenizer_config, generation_config and end-of-generation ids of a GGUF/GGML model: the tokenizer
    is tokenizer_json, else model_id's tokenizer.json, else the file's own tokenizer.ggml.* metadata. model_id's
    tokenizer_config.json (chat template, special tokens) wins over the file's; no config.json is read. The
    end-of-generation ids are llama.cpp's, from the file's vocabulary whichever tokenizer is used."""
    kw = dict(revision=revision, token=token)
    path, tok_cfg, gen_cfg = None, {}, {}
    if tokenizer_json is not None:
        path = Path(tokenizer_json)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer_json {tokenizer_json!r} does not exist or is not a file")
    if model_id is not None:
        path = path or hub.optional_repo_file(model_id, "tokenizer.json", **kw)
        if p := hub.optional_repo_file(model_id, "tokenizer_config.json", **kw):
            tok_cfg = read_json(p)
        files = hub.chat_template_files(model_id, **kw)
        if template := model_templates(tok_cfg, files["chat_template_jinja"], files["chat_template_json"]):
            tok_cfg["chat_template"] = template
        if p := hub.optional_repo_file(model_id, "generation_config.json", **kw):
            gen_cfg = read_json(p)
    md = qfile.metadata
    has_vocab = bool(md.get("tokenizer.ggml.tokens"))
    if path is None and not has_vocab:
        raise FileNotFoundError(f"{qfile.path} carries no tokenizer (tokenizer.ggml.*) and none was given: pass "
                                f"model_id (a repo with tokenizer.json) or tokenizer_json")
    vocab = read_vocab(md, qfile.path) if has_vocab and md.get("tokenizer.ggml.model") in ("llama", "gpt2") else None
    if path is None:
        tokenizer, file_cfg = tokenizer_from_gguf(md, qfile.path, vocab)
    else:  # the file's vocabulary still names its special tokens, whatever its pre-tokenizer
        tokenizer, file_cfg = tokenizer_from_file(path), config_from_vocab(vocab, md) if vocab else {}
    return tokenizer, {**file_cfg, **tok_cfg}, gen_cfg, vocab.eog if vocab else set()


def tokenizer_from_file(path: Path) -> Tokenizer:
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception that does not name the file
        raise ValueError(f"{path} is not a valid tokenizer.json: {e}") from None


def _token_ids(value, source: str) -> list[int]:
    """eos_token_id as transformers takes it (generation builds a tensor of non-negative ints from it): absent, an
    int, or a list of ints."""
    if value is None:
        return []
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        raise ValueError(f"{source}: eos_token_id must be a token id (an int >= 0) or a list of them, got {value!r}")
    return values


def eos_ids(tokenizer: Tokenizer, special: dict, cfg: dict, gen_cfg: dict) -> set[int]:
    """EOS from generation_config.json (an id or a list), config.json and tokenizer_config.json together; for a
    GGUF/GGML file `cfg` holds llama.cpp's end-of-generation set of the file instead of config.json's."""
    ids = set()
    for value, source in ((gen_cfg.get("eos_token_id"), "generation_config.json"),
                          (cfg.get("eos_token_id"), "config.json")):
        ids.update(_token_ids(value, source))
    if special.get("eos_token") is not None and tokenizer.token_to_id(special["eos_token"]) is not None:
        ids.add(tokenizer.token_to_id(special["eos_token"]))
    return ids
