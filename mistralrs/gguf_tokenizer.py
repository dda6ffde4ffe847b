"""A tokenizers.Tokenizer built from the tokenizer.ggml.* metadata of a GGUF file (or a GGML file's vocab).

"llama" (SentencePiece, as llama.cpp runs it): spaces become "▁", one is put in front of the text, then the
adjacent pair whose concatenation is the highest-scoring token is merged until none is left; characters not in the
vocab become their <0xNN> byte tokens. That is BPE whose merges rank by the score of their result, which is also how
transformers converts SentencePiece models to tokenizer.json.
"gpt2": byte-level BPE with the file's merges, split first by the regex that `tokenizer.ggml.pre` names.
Control tokens (<s>, </s>, ...) are special added tokens, user-defined ones plain added tokens.
"""
import logging

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

log = logging.getLogger("mistralrs")

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
LLAMA3_PATTERN = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                  r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_PATTERN = LLAMA3_PATTERN.replace(r"\p{N}{1,3}", r"\p{N}")
# tokenizer.ggml.pre -> (split regex, ignore_merges) as llama.cpp's llama-vocab.cpp has them
PRE = {"gpt-2": (GPT2_PATTERN, False), "phi-2": (GPT2_PATTERN, False), "default": (GPT2_PATTERN, False),
       "llama-bpe": (LLAMA3_PATTERN, True), "qwen2": (QWEN2_PATTERN, False)}


def _get(md: dict, key: str, default=None):
    value = md.get(f"tokenizer.ggml.{key}")
    return default if value is None else value


def spm_merges(tokens: list[str], scores: list[float], types: list[int]) -> list[tuple[str, str]]:
    """Every split of a normal token into two normal tokens, best-scoring result first."""
    normal = {t for t, k in zip(tokens, types) if k == NORMAL}
    merges = []
    for token, score, kind in zip(tokens, scores, types):
        if kind != NORMAL:
            continue
        for i in range(1, len(token)):
            if token[:i] in normal and token[i:] in normal:
                merges.append((-score, token[:i], token[i:]))
    merges.sort(key=lambda m: m[0])  # stable: equal scores keep vocab order
    return [(a, b) for _, a, b in merges]


def _spm(md: dict, tokens: list[str], types: list[int]) -> Tokenizer:
    scores = _get(md, "scores") or [0.0] * len(tokens)
    if len(scores) != len(tokens):
        raise ValueError(f"tokenizer.ggml.scores has {len(scores)} entries for {len(tokens)} tokens")
    vocab = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    unk_id = _get(md, "unknown_token_id", 0)
    explicit = _get(md, "merges")  # llama.cpp ignores these for "llama"; our converter writes exact ones
    merges = ([tuple(m.split(" ", 1)) for m in explicit] if explicit else spm_merges(tokens, scores, types))
    tok = Tokenizer(models.BPE(vocab, merges, unk_token=tokens[unk_id] if 0 <= unk_id < len(tokens) else None,
                               byte_fallback=True, fuse_unk=True))
    prefix = bool(_get(md, "add_space_prefix", True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁")] * prefix + [normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
                                    + [decoders.Strip(" ", 1, 0)] * prefix)
    return tok


def _gpt2(md: dict, tokens: list[str]) -> Tokenizer:
    pre = _get(md, "pre", "default")
    if pre not in PRE:
        log.warning("tokenizer.ggml.pre %r is not known to mistralrs; splitting words with GPT-2's regex", pre)
    pattern, ignore_merges = PRE.get(pre, PRE["gpt-2"])
    vocab = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    merges = []
    for m in _get(md, "merges", []):
        cut = m.find(" ", 1)
        if cut < 0:
            raise ValueError(f"tokenizer.ggml.merges entry {m!r} is not two tokens separated by a space")
        merges.append((m[:cut], m[cut + 1:]))
    tok = Tokenizer(models.BPE(vocab, merges, ignore_merges=ignore_merges))
    if pattern == GPT2_PATTERN:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    return tok


def tokenizer_from_gguf(md: dict, source) -> tuple[Tokenizer, dict]:
    """The tokenizer, and what tokenizer_config.json would say: bos/eos/unk tokens, chat_template, add_bos_token."""
    kind = _get(md, "model")
    tokens = _get(md, "tokens")
    if not tokens:
        raise ValueError(f"{source}: GGUF metadata has no tokenizer.ggml.tokens")
    types = _get(md, "token_type") or [NORMAL] * len(tokens)
    if len(types) != len(tokens):
        raise ValueError(f"{source}: tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens")
    try:
        if kind == "llama":
            tok = _spm(md, tokens, types)
        elif kind == "gpt2":
            tok = _gpt2(md, tokens)
        else:
            raise ValueError(f"tokenizer model {kind!r} is not supported; supported: 'llama' (SentencePiece), "
                             f"'gpt2' (byte-level BPE)")
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None
    except Exception as e:  # tokenizers raises a bare Exception
        raise ValueError(f"{source}: cannot build a tokenizer from tokenizer.ggml.*: {e}") from None
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, k in zip(tokens, types) if k == CONTROL and t])
    tok.add_tokens([AddedToken(t, normalized=False) for t, k in zip(tokens, types) if k == USER_DEFINED and t])

    def token(key):
        i = _get(md, key)
        return tokens[i] if isinstance(i, int) and 0 <= i < len(tokens) else None

    bos, eos = token("bos_token_id"), token("eos_token_id")
    add_bos = bool(_get(md, "add_bos_token", kind == "llama")) and bos is not None
    add_eos = bool(_get(md, "add_eos_token", False)) and eos is not None
    single = [f"{bos}:0"] * add_bos + ["$A:0"] + [f"{eos}:0"] * add_eos
    specials = {(bos, _get(md, "bos_token_id"))} if add_bos else set()
    specials |= {(eos, _get(md, "eos_token_id"))} if add_eos else set()
    tok.post_processor = processors.TemplateProcessing(single=" ".join(single), special_tokens=sorted(specials))
    config = {"bos_token": bos, "eos_token": eos, "unk_token": token("unknown_token_id"), "add_bos_token": add_bos,
              "chat_template": md.get("tokenizer.chat_template")}
    return tok, config
