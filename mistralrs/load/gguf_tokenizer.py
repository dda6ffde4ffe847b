"""A tokenizers.Tokenizer built from the tokenizer.ggml.* metadata of a GGUF file (or a GGML file's vocab), giving
the ids llama.cpp gives (`llama_tokenize(..., parse_special=true)`).

"llama" (SentencePiece, as llama.cpp runs it): spaces become "▁", one is put in front of every stretch of text
(`tokenizer.ggml.add_space_prefix`, default true), then the adjacent pair whose concatenation is the highest-scoring
token is merged until none is left; characters not in the vocab become their <0xNN> byte tokens. That is BPE whose
merges rank by the score of their result. llama.cpp reads but does not apply `remove_extra_whitespaces` for this
model, and ignores `tokenizer.ggml.merges`; so do we.
"gpt2": byte-level BPE with the file's merges, the text first split by the regexes `tokenizer.ggml.pre` names.
Control, unknown and user-defined tokens (after llama.cpp's fixes by token text) are added tokens, matched first.

The split table is llama.cpp's (src/llama-vocab.cpp, llm_tokenizer_bpe) at commit LLAMA_CPP_COMMIT. llama.cpp runs
those regexes three ways (src/unicode.cpp), and where its engine reads a construct differently from Oniguruma
(what `tokenizers` runs) the regex here is rewritten to mean what llama.cpp does:
  - the GPT-2, Llama 3, Qwen2, Qwen3.5, Kimi-K2, AFMoE-digit (also Tiny Aya's digit regex) and newline regexes
    run as hand-written splitters. Most are exactly their regexes; KIMI_K2 and AFMOE_DIGITS below are regexes
    for what the two others do.
  - a regex with \\p{..} runs as std::regex over the text with every non-ASCII character collapsed to one byte
    per category: \\p{Lu}, \\p{Ll}, \\p{Lt}, \\p{Lm}, \\p{Lo} all become "any letter", so they are
    \\p{L} here.
  - any other regex runs as std::wregex in the C locale, with non-ASCII whitespace replaced by \\v: \\d and \\b are
    ASCII-only, `$` is the end of the piece (\\z), and a character class never holds non-ASCII whitespace
    (`&&\\S` below where a range spans some).
"""
import logging
from dataclasses import dataclass

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

log = logging.getLogger("mistralrs")

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
LLAMA_CPP_COMMIT = "00ad355e009e83abf98f96a6ded7193b95763681"

GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
LLAMA3 = CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
QWEN2 = CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
STARCODER = [r"\p{N}", GPT2]
ASCII_PUNCT_WORD = r"""[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+"""
DEEPSEEK3 = (ASCII_PUNCT_WORD + r"|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+[\r\n]*|"
             r"\s*[\r\n]+|\s+(?!\S)|\s+")
PORO = r" ?[^(\s|.,!?…。，、।۔،)]+"
# llama.cpp's unicode_cpt_is_han
HAN = (r"\x{4E00}-\x{9FFF}\x{3400}-\x{4DBF}\x{20000}-\x{2A6DF}\x{2A700}-\x{2B73F}\x{2B740}-\x{2B81F}"
       r"\x{2B820}-\x{2CEAF}\x{2CEB0}-\x{2EBEF}\x{F900}-\x{FAFF}\x{2F800}-\x{2FA1F}")
# unicode_regex_split_custom_kimi_k2: Han runs; a word of non-Han letters (not marks) with one optional leading
# character and an optional contraction; then Llama 3's digits, punctuation and whitespace
KIMI_K2 = (rf"[{HAN}]+|[^\r\n\p{{L}}\p{{N}}]?[\p{{L}}&&[^{HAN}]]+{CONTRACTIONS}?|\p{{N}}{{1,3}}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# unicode_regex_split_custom_afmoe: a run of n digits splits as its first n % 3 digits, then threes; the text
# before a run stays with the run's first piece (\G: each match starts where the last ended).
AFMOE_DIGITS = r"\G\P{N}*+(?:\p{N}{1,2}(?=(?:\p{N}{3})*+(?!\p{N}))|\p{N}{3})"

# llama.cpp pre-type -> its split regexes, applied in sequence (each splits the pieces of the one before)
SPLITS = {
    "default": [r"[\p{P}\$\+<=>\^~\|]+", GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"],
    "llama3": [LLAMA3],
    "jais2": [CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
              r"|\s{512}(?!\S)|\s{256}(?!\S)|\s{128}(?!\S)|\s{64}(?!\S)|\s{32}(?!\S)|\s{16}(?!\S)|\s{8}(?!\S)"
              r"|\s{4}(?!\S)|\s{1,2}(?!\S)|\s{1}"],
    "dbrx": [LLAMA3],
    "smaug": [LLAMA3],
    "deepseek-llm": [
        r"[\r\n]",
        r"\s?[A-Za-zµÀ-ÖØ-öø-ƺƼ-ƿǄ-ʓʕ-ʯͰ-ͳͶͷͻ-ͽͿΆΈ-ΊΌΎ-ΡΣ-ϵϷ-ҁҊ-ԯԱ-ՖႠ-Ⴥ"
        r"Ꭰ-Ᏽᏸ-ᏽᲐ-ᲺᲽ-Ჿᴀ-ᴫᵫ-ᵷᵹ-ᶚḀ-ἕἘ-Ἕἠ-ὅὈ-Ὅὐ-ὗὙὛὝὟ-ώᾀ-ᾴᾶ-ᾼιῂ-ῄῆ-ῌῐ-ΐῖ-Ί"
        r"ῠ-Ῥῲ-ῴῶ-ῼℂℇℊ-ℓℕℙ-ℝℤΩℨK-ℭℯ-ℴℹℼ-ℿⅅ-ⅉⅎↃↄⰀ-ⱻⱾ-ⳤⳫ-ⳮⳲⳳꙀ-ꙭꚀ-ꚛꜢ-ꝯꝱ-ꞇ"
        r"Ꞌ-ꞎꭰ-ꮿﬀ-ﬆﬓ-ﬗＡ-Ｚａ-ｚ𐐀-𐑏𐒰-𐓓𐓘-𐓻𐲀-𐲲𐳀-𐳲𑢠-𑣟𞤀-𞥃]+",
        r"\s?[!-/:-~！-／：-～‘-‟　-。&&\S]+",
        r"\s+\z",
        r"[一-龥ࠀ-一가-퟿&&\S]+",
        r"\p{N}+"],
    "deepseek-coder": [r"[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", r"[一-龥ࠀ-一가-퟿&&\S]+", r"\p{N}"],
    "deepseek3-llm": [r"\p{N}{1,3}", r"[一-龥぀-ゟ゠-ヿ]+", DEEPSEEK3],
    "hunyuan-dense": [r"\p{N}{1,3}", r"[一-龥぀-ゟ゠-ヿ]+", DEEPSEEK3],
    "joyai-llm": [r"\p{N}{1,3}", r"[一-龥぀-ゟ゠-ヿ]+", DEEPSEEK3],
    "hy-v4": [r"\p{N}{1,3}", r"[一-龥぀-ゟ゠-ヿ]+", DEEPSEEK3],
    "spark2-5": [r"\p{N}{1,3}", r"[一-龥぀-ゟ゠-ヿ]+",
                 ASCII_PUNCT_WORD + r"|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+|[\r\n]"
                 r"|\s+(?!\S)|\s+", r"\p{N}"],
    "youtu": [r"[가-힣ㄱ-ㆎ]+|[！…“”‘’—：；，、-〿︰-﹏]+|[ㄅ-ㄯ]+|[一-龥぀-ゟ゠-ヿ]+",
              r"[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]*[\p{L}\p{M}]+" + CONTRACTIONS + r"?|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+"
              r"[\p{L}\p{M}]*" + CONTRACTIONS + r"?|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"],
    "falcon": [r"[\p{P}\$\+<=>\^~\|`]+", GPT2, r"[0-9][0-9][0-9]"],
    "starcoder": STARCODER,
    "refact": STARCODER,
    "command-r": STARCODER,
    "smollm": STARCODER,
    "codeshell": STARCODER,
    "exaone": STARCODER,
    "minerva": STARCODER,
    "mellum2": STARCODER,
    "gpt2": [GPT2],
    "mpt": [GPT2],
    "olmo": [GPT2],
    "jais": [GPT2],
    "trillion": [GPT2],
    "granite-docling": [GPT2],
    "stablelm2": [QWEN2],
    "qwen2": [QWEN2],
    "hunyuan": [QWEN2],
    "solar-open": [QWEN2],
    "qwen35": [CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+"
               r"|\s+(?!\S)|\s+"],
    "poro": [PORO],
    "bloom": [PORO],
    "gpt3-finnish": [PORO],
    "chatglm4": [LLAMA3],
    "viking": [PORO, r"\p{N}"],
    "tekken": [r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+|[^\r\n\p{L}\p{N}]?((?=[\p{L}])"
               r"([^a-z]))+((?=[\p{L}])([^A-Z]))*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"],
    "chameleon": [r"<sentinel:[0-9]+>", r"(IMGIMG)((A|B|C|D|E|F|G|H|I){1,4})Z", r"([\t\n]|    |  )", r"\p{N}",
                  r"[\p{P}!-/:-@\[-`{-~]", GPT2],
    "gpt4o": [r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+" + CONTRACTIONS
              + r"?|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*" + CONTRACTIONS
              + r"?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"],
    "minimax-m2": [],  # filled below: same as gpt4o
    "granite-emb-multi": [r"[^\r\n\p{L}\p{N}]?((?=[\p{L}\p{M}])([^a-z]))*((?=[\p{L}\p{M}])([^A-Z]))+"
                          + CONTRACTIONS + r"?|[^\r\n\p{L}\p{N}]?((?=[\p{L}\p{M}])([^a-z]))+((?=[\p{L}\p{M}])"
                          r"([^A-Z]))*" + CONTRACTIONS + r"?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+"
                          r"|\s+(?!\S)|\s+"],
    "tiny-aya": [AFMOE_DIGITS,  # llama.cpp runs its \d{1,3}(?=(?:\d{3})*\b) as the AFMoE splitter
                 r"[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]*[\p{L}\p{M}]+" + CONTRACTIONS + r"?|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+"
                 r"[\p{L}\p{M}]*" + CONTRACTIONS + r"?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"],
    "kimi-k2": [KIMI_K2],
    "superbpe": [r"\p{N}+", r"(?=([0-9]{3})+(?![0-9]))"],
    "bailingmoe": [r"'(?:[sSdDmMtT]|[lL][lL]|[vV][eE]|[rR][eE])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+"
                   r"[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"],
    "seed-coder": [CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1}| ?[^\s\p{L}\p{N}\r\n]+|\s*[\r\n]+|\s+(?!\S)"
                   r"|\s+"],
    "ufakzeka": [r"[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"],
    "grok-2": [QWEN2],
    "afmoe": [AFMOE_DIGITS, r"[一-鿿㐀-䶿豈-﫿぀-ゟ゠-ヿ･-ﾟ⼀-⿟เ-๿຀-໿ក-៿က-႟ꩠ-ꩿꧠ-꧿가-힯ᄀ-ᇿ]+",
              ASCII_PUNCT_WORD + r"|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+"],
    "laguna": [r"[^\n]+|[\n]+", QWEN2],
    "exaone-moe": [CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?(?:\p{L}\p{M}*(?: \p{L}\p{M}*)*)+|\p{N}| ?[^\s\p{L}\p{N}]+"
                   r"[\r\n/]?|\s*[\r\n]|\s+(?!\S)|\s+"],
    "minicpm5": [r"\p{N}{1,3}", CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}+| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+"],
}
SPLITS["minimax-m2"] = SPLITS["gpt4o"]

# tokenizer.ggml.pre -> llama.cpp pre-type (llama_vocab::impl::load). Left out: the SentencePiece-style BPE ones
# (gemma4, granite-embed-multi-311m, sarvam-moe, whitespace), which are not byte-level.
PRE = {
    "default": "default",
    "minicpm5": "minicpm5",
    **dict.fromkeys(["llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
                     "jina-v5-nano"], "llama3"),
    "deepseek-llm": "deepseek-llm",
    "deepseek-coder": "deepseek-coder",
    "deepseek-v3": "deepseek3-llm",
    "spark2_5": "spark2-5",
    "youtu": "youtu",
    "falcon": "falcon",
    "mpt": "mpt",
    "starcoder": "starcoder",
    **dict.fromkeys(["gpt-2", "phi-2", "jina-es", "jina-de", "gigachat", "jina-v2-es", "jina-v2-de", "a.x-4.0",
                     "mellum", "modern-bert", "jina-v1-en", "jina-v2-code", "roberta-bpe", "exaone4"], "gpt2"),
    "jais-2": "jais2",
    "refact": "refact",
    "command-r": "command-r",
    **dict.fromkeys(["qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez"], "qwen2"),
    "qwen35": "qwen35",
    "stablelm2": "stablelm2",
    "olmo": "olmo",
    "dbrx": "dbrx",
    "smaug-bpe": "smaug",
    "poro-chat": "poro",
    "glm4": "chatglm4",
    "chatglm-bpe": "chatglm4",
    "viking": "viking",
    "jais": "jais",
    "tekken": "tekken",
    "smollm": "smollm",
    "codeshell": "codeshell",
    "bloom": "bloom",
    "gpt3-finnish": "gpt3-finnish",
    "exaone": "exaone",
    "exaone-moe": "exaone-moe",
    "chameleon": "chameleon",
    "minerva-7b": "minerva",
    **dict.fromkeys(["gpt-4o", "llama4", "kanana2", "talkie"], "gpt4o"),
    "granite-embed-multi-97m": "granite-emb-multi",
    "tiny_aya": "tiny-aya",
    "cohere2moe": "tiny-aya",
    "superbpe": "superbpe",
    "trillion": "trillion",
    "granite-docling": "granite-docling",
    **dict.fromkeys(["bailingmoe", "bailingmoe2", "llada-moe"], "bailingmoe"),
    "seed-coder": "seed-coder",
    "hunyuan": "hunyuan",
    "hunyuan-dense": "hunyuan-dense",
    "hy_v4": "hy-v4",
    "joyai-llm": "joyai-llm",
    "kimi-k2": "kimi-k2",
    "ufakzeka": "ufakzeka",
    "grok-2": "grok-2",
    "afmoe": "afmoe",
    "laguna": "laguna",
    "minimax-m2": "minimax-m2",
    "solar-open": "solar-open",
    "mellum2": "mellum2",
}
IGNORE_MERGES = {"llama3", "minicpm5", "youtu", "tekken", "granite-emb-multi"}  # a word in the vocab is one token
ADD_BOS = {"llama3", "tekken", "chameleon"}  # add_bos_token's default, else false for "gpt2"
NO_BOS = {"chatglm4"}  # no BOS token unless the file names one

# Token texts llama.cpp treats as control tokens whatever their type (llama_vocab::impl::load); the first of each
# FIM group fills its id when the file gives none, and end-of-generation tokens end generation.
EOT_TEXTS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>", "<EOT>",
             "_<EOT>", "[EOT]", "<｜end▁of▁sentence｜>", "<end_of_utterance>")
FIM_TEXTS = {
    "fim_pre": ("<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<｜fim▁begin｜>", "<PRE>", "▁<PRE>",
                "<|code_prefix|>", "<|prefix|>"),
    "fim_suf": ("<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<｜fim▁hole｜>", "<SUF>", "▁<SUF>",
                "<|code_suffix|>", "<|suffix|>"),
    "fim_mid": ("<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<｜fim▁end｜>", "<MID>", "▁<MID>",
                "<|code_middle|>", "<|middle|>"),
    "fim_pad": ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"),
    "fim_rep": ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"),
    "fim_sep": ("<|file_sep|>",),
}
EOG_TEXTS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>",
             "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]",
             "<|end_of_text|>", "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>",
             "<｜end▁of▁sentence｜>", "[e~[")
DEPRECATED_ID_KEYS = {"fim_pre": "prefix_token_id", "fim_suf": "suffix_token_id", "fim_mid": "middle_token_id"}
ALWAYS_RENDERED = ("<|channel|>", "<|message|>", "<|start|>", "<|constrain|>")  # gpt-oss: made user-defined


def spm_merges(tokens: list[str], scores: list[float], types: list[int]) -> list[tuple[str, str]]:
    """Every split of a token into two tokens, best-scoring result first: llama.cpp's SentencePiece merges any
    adjacent pair whose concatenation is in the vocab. Byte tokens are spelled <0xNN> and never form by merging."""
    known = {t for t, k in zip(tokens, types) if k != BYTE}
    merges = []
    for token, score, kind in zip(tokens, scores, types):
        if kind == BYTE:
            continue
        for i in range(1, len(token)):
            if token[:i] in known and token[i:] in known:
                merges.append((-score, token[:i], token[i:]))
    merges.sort(key=lambda m: m[0])  # stable: equal scores keep vocab order
    return [(a, b) for _, a, b in merges]


def _get(md, key: str, default=None):
    value = md.get(f"tokenizer.ggml.{key}")
    return default if value is None else value


@dataclass
class Vocab:
    """tokenizer.ggml.* as llama.cpp reads it: token types after its fixes by text, the special token ids
    (llama.cpp's defaults where the file names none), whether BOS/EOS are added."""
    kind: str
    tokens: list[str]
    types: list[int]
    ids: dict[str, int | None]  # bos, eos, unk, eot, eom and the fim_* ids
    add_bos: bool
    add_eos: bool
    pre_type: str | None  # llama.cpp's pre-type of a "gpt2" model; None if the file's `pre` is not in PRE
    pre: str | None
    eog: set[int]  # the ids that end generation


def read_vocab(md, source) -> Vocab:
    kind, tokens = _get(md, "model"), _get(md, "tokens")
    if not tokens:
        raise ValueError(f"{source}: GGUF metadata has no tokenizer.ggml.tokens")
    if kind not in ("llama", "gpt2"):
        raise ValueError(f"{source}: tokenizer model {kind!r} is not supported; supported: 'llama' (SentencePiece), "
                         f"'gpt2' (byte-level BPE)")
    types = list(_get(md, "token_type") or [NORMAL] * len(tokens))
    if len(types) != len(tokens):
        raise ValueError(f"{source}: tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens")
    pre = _get(md, "pre", "default") if kind == "gpt2" else None
    pre_type = PRE.get(pre)
    defaults = {"bos": 1, "eos": 2, "unk": 0} if kind == "llama" else {"bos": None if pre_type in NO_BOS else 11,
                                                                         "eos": 11}
    ids = {}
    for name in ("bos", "eos", "unk", "eot", "eom", *FIM_TEXTS):
        default, given = defaults.get(name), _get(md, DEPRECATED_ID_KEYS.get(name), _get(md, f"{name}_token_id"))
        if default is not None and default >= len(tokens):
            default = None
        ids[name] = given if isinstance(given, int) and 0 <= given < len(tokens) else default
    _mark_by_text(tokens, types, ids)
    eog = _end_of_generation(tokens, types, ids)
    add_bos = bool(_get(md, "add_bos_token", kind == "llama" or pre_type in ADD_BOS))
    add_eos = bool(_get(md, "add_eos_token", False))
    for flag, name in ((add_bos, "bos"), (add_eos, "eos")):
        if flag and ids[name] is None:
            raise ValueError(f"{source}: tokenizer.ggml.add_{name}_token is true, but tokenizer.ggml.{name}_token_id "
                             f"is not set")
    return Vocab(kind, tokens, types, ids, add_bos, add_eos, pre_type, pre, eog)


def _mark_by_text(tokens: list[str], types: list[int], ids: dict) -> None:
    """llama.cpp's fixes by token text: end-of-turn, end-of-message and FIM tokens fill the ids the file leaves
    unset, and they and every end-of-generation text become control tokens; gpt-oss's channel tokens are
    user-defined."""
    index = {}
    for i, t in enumerate(tokens):
        index.setdefault(t, i)
    groups = {"eot": EOT_TEXTS, "eom": ("<|eom_id|>",), **FIM_TEXTS}
    for name, texts in groups.items():
        found = [index[t] for t in texts if t in index]
        if ids[name] is None and found:
            ids[name] = found[0]
            types[found[0]] = CONTROL
    for t in EOG_TEXTS:
        if t in index:
            types[index[t]] = CONTROL
    for t in ALWAYS_RENDERED:
        if t in index:
            types[index[t]] = USER_DEFINED


def _end_of_generation(tokens: list[str], types: list[int], ids: dict) -> set[int]:
    """llama.cpp's special_eog_ids: the FIM pad/repo/separator tokens, every token with an end-of-generation text,
    and the eos, eot and eom ids. gpt-oss and Solar Open end a message with <|end|> and the generation with
    <|return|> or <|call|>, so there <|end|> does not end it (and becomes user-defined); beside Gemma 4's
    <|tool_response>, </s> is an ordinary token."""
    index = _vocab_ids(tokens)
    eog = {ids[k] for k in ("fim_pad", "fim_rep", "fim_sep", "eos", "eot", "eom") if ids[k] is not None}
    eog |= {index[t] for t in EOG_TEXTS if t in index}
    texts = {tokens[i] for i in eog}
    call = bool(texts & {"<|call|>", "<|calls|>"})
    if "<|end|>" in texts and call and ("<|return|>" in texts or "<|flush|>" in texts):
        eog.discard(index["<|end|>"])
        types[index["<|end|>"]] = USER_DEFINED
    if "<|tool_response>" in texts and "</s>" in texts:
        eog.discard(index["</s>"])
        types[index["</s>"]] = NORMAL
    return eog


def _vocab_ids(tokens: list[str]) -> dict[str, int]:
    vocab = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    return vocab


def _spm(md, v: Vocab) -> Tokenizer:
    scores = _get(md, "scores") or [0.0] * len(v.tokens)
    if len(scores) < len(v.tokens):
        raise ValueError(f"tokenizer.ggml.scores has {len(scores)} entries for {len(v.tokens)} tokens")
    unk = v.ids["unk"]
    tok = Tokenizer(models.BPE(_vocab_ids(v.tokens), spm_merges(v.tokens, scores, v.types),
                               unk_token=v.tokens[unk] if unk is not None else None, byte_fallback=True,
                               fuse_unk=True))
    prefix = bool(_get(md, "add_space_prefix", True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁")] * prefix + [normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
                                    + [decoders.Strip(" ", 1, 0)] * prefix)
    return tok


def _bpe(md, v: Vocab) -> Tokenizer:
    if v.pre_type is None:
        raise ValueError(f"tokenizer.ggml.pre {v.pre!r} is not a byte-level BPE pre-tokenizer mistralrs knows "
                         f"(llama.cpp's table at {LLAMA_CPP_COMMIT[:10]}); supported: {', '.join(sorted(PRE))}; "
                         f"or pass tokenizer_json")
    if _get(md, "pre") is None:  # llama.cpp's choice too, with a louder warning
        log.warning("GGUF has no tokenizer.ggml.pre; splitting words as llama.cpp's 'default' does")
    merges = []
    for m in _get(md, "merges", []):
        cut = m.find(" ", 1)
        if cut < 0:
            raise ValueError(f"tokenizer.ggml.merges entry {m!r} is not two tokens separated by a space")
        merges.append((m[:cut], m[cut + 1:]))
    tok = Tokenizer(models.BPE(_vocab_ids(v.tokens), merges, ignore_merges=v.pre_type in IGNORE_MERGES))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in SPLITS[v.pre_type]]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    return tok


def tokenizer_from_gguf(md, source, v: Vocab | None = None) -> tuple[Tokenizer, dict]:
    """The tokenizer, and what tokenizer_config.json would say: bos/eos/unk tokens, chat_template, add_bos_token.
    `v` is read_vocab(md, source) when the caller has it."""
    v = v or read_vocab(md, source)
    try:
        tok = _spm(md, v) if v.kind == "llama" else _bpe(md, v)
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None
    except Exception as e:  # tokenizers raises a bare Exception
        raise ValueError(f"{source}: cannot build a tokenizer from tokenizer.ggml.*: {e}") from None
    # Phi-3's files: llama.cpp strips the whitespace after its special tokens, except after these three
    rstrip = "phi-3" in str(md.get("general.name", "")).lower() or "phi3" in str(md.get("general.name", "")).lower()
    keep = ("<unk>", "<s>", "<|endoftext|>")
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False, rstrip=rstrip and t not in keep)
                            for t, k in zip(v.tokens, v.types) if k in (CONTROL, UNKNOWN) and t])
    tok.add_tokens([AddedToken(t, normalized=False, rstrip=rstrip) for t, k in zip(v.tokens, v.types)
                    if k == USER_DEFINED and t])
    bos = [(v.tokens[v.ids["bos"]], v.ids["bos"])] if v.add_bos else []
    eos = [(v.tokens[v.ids["eos"]], v.ids["eos"])] if v.add_eos else []
    template = [f"{t}:0" for t, _ in bos] + ["$A:0"] + [f"{t}:0" for t, _ in eos]
    tok.post_processor = processors.TemplateProcessing(single=template, special_tokens=sorted({*bos, *eos}))
    return tok, config_from_vocab(v, md)


def config_from_vocab(v: Vocab, md) -> dict:
    """What tokenizer_config.json would say: bos/eos/unk tokens, add_bos_token, chat_template."""
    def text(name):
        return v.tokens[v.ids[name]] if v.ids[name] is not None else None

    # gguf-py writes named templates as tokenizer.chat_template.<name>, the default one without a name
    named = {k.removeprefix("tokenizer.chat_template."): md[k] for k in md if k.startswith("tokenizer.chat_template.")}
    template = md.get("tokenizer.chat_template")
    if named:
        template = {**named, **({"default": template} if template is not None else {})}
    return {"bos_token": text("bos"), "eos_token": text("eos"), "unk_token": text("unk"), "add_bos_token": v.add_bos,
            "chat_template": template}
