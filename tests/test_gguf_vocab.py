"""The tokenizer built from GGUF metadata against llama.cpp (llama-cpp-python) on the same file: for every
`tokenizer.ggml.pre` of llama.cpp's table, a byte-level BPE vocabulary whose merges cross every word boundary (so
any split that differs from llama.cpp's changes the ids), and a SentencePiece vocabulary; also the real SmolLM2
file when tools/real_models.py has fetched it."""
import itertools
import json
import os
from pathlib import Path

import gguf
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from mistralrs.load.gguf import read_gguf
from mistralrs.load.gguf_tokenizer import ADD_BOS, IGNORE_MERGES, PRE, SPLITS, read_vocab, tokenizer_from_gguf

llama_cpp = pytest.importorskip("llama_cpp")

CONTROL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<s>", "</s>"]
LOOKS_CONTROL = "<|eot_id|>"  # a normal token in the file; llama.cpp makes it a control token by its text
USER_DEFINED = "<tool>"
SNIPPETS = [
    # digits, and runs of spaces before them
    "7", "42", "123", "1234", "12345", "1234567", "1234567890123", "3.14159", "1,000,000", "2024-01-31", "v1.2.3",
    "    42", "  7", " 12345", "\t42", "\n\n  3. item", "x=10;y=200", "0x1F", "1e-5", "100%", "$19.99", "#1",
    "١٢٣٤", "²³", "½ cup", "Ⅻ", "42nd", "a1b2c3", "12abc", "abc123", "ab  12", "x 1234567 y",
    # whitespace
    " ", "  ", "   x", "a  b", "a\tb", "a\n", "a\n\nb", "a\r\nb", "\n\n\n", " \n ", "trailing   ", "\u00a0nbsp\u00a0",
    "ideo\u3000space", "em\u2003space", "zero\u200bwidth", "a\x1cb", "\x0b\x0c",
    # code and indentation
    "def f(x):\n    return x + 1\n", "if (a && b) {\n\tprintf(\"%d\\n\", a);\n}", "    for i in range(10):",
    '{\n  "key": [1, 2, 3],\n  "nested": {"a": null}\n}', "SELECT * FROM t WHERE id = 5;", "a->b::c<T>()",
    "x += y ** 2 // 3", "<div class=\"x\">hi</div>", "```python\nprint('hi')\n```", "~/path/to/file.txt",
    "a~b ~~c~~", "1. first\n2. second\n\n3. third", "| col | 12 |\n|-----|----|", "-- comment", "#!/bin/sh",
    # contractions and case
    "don't", "I'M HERE", "we'LL see", "it's", "they've", "you'd", "o'clock", "HelloWorld", "camelCaseWord",
    "ÉCOLE Ça", "ǅungla ǈ", "ΑΒΓ αβγ", "İstanbul", "straße STRASSE",
    # accents (composed and combining)
    "café", "naïve résumé", "cafe\u0301", "n\u0303o", "Ångström", "Zürich Łódź", "tiếng Việt",
    # CJK and other scripts
    "日本語のテキスト", "中文字符串测试", "한국어 텍스트", "カタカナとひらがな", "漢字かな交じり文", "「引用」。",
    "全角ＡＢＣ１２３",
    "Привет, мир!", "مرحبا بالعالم", "שלום עולם", "नमस्ते दुनिया", "สวัสดีครับ", "ქართული", "Ελληνικά",
    # emoji
    "😀", "emoji 🎉 party", "👍🏽", "👨‍👩‍👧", "🇫🇷 flag", "❤️", "a😀b", "🙂🙂🙂",
    # URLs and symbols
    "https://example.com/path?q=1&r=2#frag", "user@example.org", "www.test.co.uk", "© 2024 €5 ∑∫ 30°C",
    "→ ← ↑", "a+b=c", "<=>", "!!!", "...", "?!", "—dash–", "…", "«quoted»", "“smart” ‘quotes’", "^_^", "`code`",
    "[link](http://x.y)", "@user #tag",
    # control tokens inside text
    "<|im_start|>user\nHello<|im_end|>\n", "text<|endoftext|>more", "<s>bos</s>", "<|im_end|><|im_start|>",
    " <|im_end|> spaced", "done<|eot_id|>", "call <tool>x</tool>",
]


def corpus(n: int = 320) -> list[str]:
    """The snippets, and pairs of them joined by a space or a newline: n strings."""
    pairs = [a + sep + b for (a, b), sep in zip(itertools.combinations(SNIPPETS, 2), itertools.cycle(" \n"))]
    return SNIPPETS + pairs[::len(pairs) // (n - len(SNIPPETS))][:n - len(SNIPPETS)]


CORPUS = corpus()


def same_split(pre: str) -> str:
    """The first pre value (in sorted order) that llama.cpp splits and merges exactly as `pre`: one of each such
    group gets the whole corpus, the others (the same case of llama.cpp's switch) a tenth of it."""
    key = lambda p: (SPLITS[PRE[p]], PRE[p] in IGNORE_MERGES, PRE[p] in ADD_BOS)  # noqa: E731
    return next(p for p in sorted(PRE) if key(p) == key(pre))


@pytest.fixture(scope="module")
def bpe_vocab():
    """(tokens, merges, types) of a byte-level BPE trained on the corpus with no pre-tokenizer: its merges join
    digits to spaces, letters to punctuation, words to words."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    trainer = trainers.BpeTrainer(vocab_size=3000, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=CONTROL_TOKENS + [LOOKS_CONTROL, USER_DEFINED],
                                  show_progress=False)
    tok.train_from_iterator(CORPUS * 3, trainer)
    model = json.loads(tok.to_str())["model"]
    tokens = [t for t, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    types = [3 if t in CONTROL_TOKENS else 4 if t == USER_DEFINED else 1 for t in tokens]
    return tokens, merges, types


def write_vocab(path: Path, model: str, tokens, types, *, pre=None, merges=None, scores=None, name=None,
                **ids) -> Path:
    """A vocab-only GGUF of the llama architecture (llama.cpp reads its hyperparameters even for vocab_only)."""
    w = gguf.GGUFWriter(path, "llama")
    if name is not None:
        w.add_name(name)
    for key, value in (("context_length", 64), ("embedding_length", 32), ("block_count", 1),
                       ("feed_forward_length", 64), ("attention.head_count", 2), ("attention.head_count_kv", 1)):
        w.add_uint32(f"llama.{key}", value)
    w.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    w.add_tokenizer_model(model)
    if pre is not None:
        w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    if merges is not None:
        w.add_token_merges(merges)
    if scores is not None:
        w.add_token_scores(scores)
    for key, value in ids.items():
        if isinstance(value, bool):
            w.add_bool(f"tokenizer.ggml.{key}", value)
        else:
            w.add_uint32(f"tokenizer.ggml.{key}", value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def compare(path: Path, texts, add_special=False) -> list[tuple[str, list[int], list[int]]]:
    """The texts whose ids differ between llama.cpp and us: (text, llama.cpp's, ours)."""
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    ours, _ = tokenizer_from_gguf(read_gguf(path).metadata, path)
    bad = []
    for text in texts:
        theirs = llm.tokenize(text.encode(), add_bos=add_special, special=True)
        mine = ours.encode(text, add_special_tokens=add_special).ids
        if theirs != mine:
            bad.append((text, theirs, mine))
    return bad


@pytest.mark.parametrize("pre", sorted(PRE))
def test_every_pre_tokenizer_matches_llama_cpp(pre, bpe_vocab, tmp_path):
    tokens, merges, types = bpe_vocab
    path = write_vocab(tmp_path / "vocab.gguf", "gpt2", tokens, types, pre=pre, merges=merges, bos_token_id=3,
                       eos_token_id=0)
    texts = CORPUS if same_split(pre) == pre else CORPUS[::10]
    bad = compare(path, texts)
    print(f"pre {pre!r}: {len(texts) - len(bad)}/{len(texts)} identical")
    assert not bad, f"{len(bad)} of {len(texts)} differ, e.g. {bad[:3]}"


@pytest.fixture(scope="module")
def spm_vocab(tmp_path_factory):
    """(tokens, scores, types) of a SentencePiece BPE model with byte fallback trained on the corpus, as
    llama.cpp's converter writes them."""
    spm = pytest.importorskip("sentencepiece")
    prefix = tmp_path_factory.mktemp("spm") / "m"
    lines = [line for text in CORPUS for line in text.splitlines() if line.strip()]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines * 2), model_prefix=str(prefix), vocab_size=1200, model_type="bpe",
        byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        split_digits=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=2, minloglevel=2,
        user_defined_symbols=["<tool>"], control_symbols=["<|im_start|>", "<|im_end|>", "<|endoftext|>"],
        character_coverage=0.9995)
    sp = spm.SentencePieceProcessor(model_file=f"{prefix}.model")
    tokens, scores, types = [], [], []
    for i in range(sp.vocab_size()):
        tokens.append(sp.id_to_piece(i))
        scores.append(sp.get_score(i))
        types.append(2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i)
                     else 5 if sp.is_unused(i) else 4 if tokens[-1] == "<tool>" else 1)
    return tokens, scores, types


@pytest.mark.parametrize("options", [{}, {"add_space_prefix": False}, {"add_bos_token": False, "add_eos_token": True},
                                     {"name": "Phi-3 mini"}])
def test_sentencepiece_matches_llama_cpp(spm_vocab, tmp_path, options):
    tokens, scores, types = spm_vocab
    path = write_vocab(tmp_path / "spm.gguf", "llama", tokens, types, scores=scores, bos_token_id=1,
                       eos_token_id=2, unknown_token_id=0, **options)
    texts = CORPUS + ["<tool> user-defined <tool>", "<|im_start|>system\nhi<|im_end|>", "</s>  \n x <s>  y",
                      "<|im_end|>   \n\tz <tool>  w"]
    for add_special in (False, True):
        bad = compare(path, texts, add_special=add_special)
        print(f"sentencepiece {options} add_special={add_special}: {len(texts) - len(bad)}/{len(texts)} identical")
        assert not bad, f"{len(bad)} of {len(texts)} differ, e.g. {bad[:3]}"


REAL_MODELS = Path(os.environ.get("MISTRALRS_REAL_MODELS") or Path.home() / ".cache" / "mistralrs-real-models")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "gemma3/gemma-3-270m-q4_k_m.gguf"])
def test_real_model_files_match_llama_cpp(name):
    """The files tools/real_models.py fetches (SmolLM2: pre "smollm"; Gemma 3: SentencePiece, 262k tokens)."""
    path = REAL_MODELS / name
    if not path.is_file():
        pytest.skip(f"{path} is not there; tools/real_models.py fetches it")
    for add_special in (False, True):
        bad = compare(path, CORPUS, add_special=add_special)
        print(f"{path.name} add_special={add_special}: {len(CORPUS) - len(bad)}/{len(CORPUS)} identical")
        assert not bad, f"{len(bad)} of {len(CORPUS)} differ, e.g. {bad[:3]}"
    assert read_vocab(read_gguf(path).metadata, path).eog == llama_cpp_eog(path)


def llama_cpp_eog(path: Path) -> set[int]:
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    vocab = llm._model.vocab
    return {i for i in range(llm.n_vocab()) if llama_cpp.llama_vocab_is_eog(vocab, i)}


EOG_CASES = {
    "chatml": (["<|im_start|>", "<|im_end|>", "<|endoftext|>"], {"eos_token_id": 2}),
    "llama3 with eot id": (["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|eom_id|>"],
                           {"bos_token_id": 0, "eos_token_id": 1, "eot_token_id": 2}),
    "eos default 11": (["<|endoftext|>", "<end_of_turn>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>"], {}),
    "gpt-oss": (["<|return|>", "<|call|>", "<|end|>", "<|start|>", "<|channel|>"], {"eos_token_id": 0}),
    "solar-open": (["<|calls|>", "<|flush|>", "<|end|>"], {"eos_token_id": 1}),
    "gemma4 </s>": (["<eos>", "</s>", "<|tool_response>", "<turn|>"], {"eos_token_id": 0}),
    "deepseek": (["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜fim▁begin｜>"], {"eos_token_id": 1}),
    "normal-typed markers": (["[EOT]", "[EOS]", "<EOT>", "<end_of_utterance>", "[e~["], {"eos_token_id": 1}),
}


@pytest.mark.parametrize("case", sorted(EOG_CASES))
@pytest.mark.parametrize("model", ["gpt2", "llama"])
def test_end_of_generation_ids_match_llama_cpp(case, model, tmp_path):
    """The ids llama.cpp stops on (llama_vocab_is_eog), from the token texts, the id keys and its defaults."""
    specials, ids = EOG_CASES[case]
    filler = [chr(c) for c in range(0x21, 0x7F)] + [f"w{i}" for i in range(20)]
    tokens = specials + filler
    # the markers of the last case are written as normal tokens: llama.cpp goes by their text
    types = [1 if case.startswith("normal") else 3] * len(specials) + [1] * len(filler)
    extra = ({"pre": "gpt-2", "merges": ["w 0"]} if model == "gpt2"
             else {"scores": [-float(i) for i in range(len(tokens))]})
    path = write_vocab(tmp_path / "eog.gguf", model, tokens, types, **extra, **ids)
    expected = llama_cpp_eog(path)
    assert read_vocab(read_gguf(path).metadata, path).eog == expected, [tokens[i] for i in expected]


def test_named_chat_templates_in_gguf(bpe_vocab, tmp_path):
    """gguf-py writes a tokenizer_config.json list of templates as tokenizer.chat_template (default) and
    tokenizer.chat_template.<name>."""
    tokens, merges, types = bpe_vocab
    w = gguf.GGUFWriter(tmp_path / "t.gguf", "llama")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_chat_template([{"name": "default", "template": "D"}, {"name": "tool_use", "template": "T"}])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    _, config = tokenizer_from_gguf(read_gguf(tmp_path / "t.gguf").metadata, "t")
    assert config["chat_template"] == {"default": "D", "tool_use": "T"}
