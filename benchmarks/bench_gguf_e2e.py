"""GGUF end to end: decode tok/s at batch 1 of the demo model converted to GGUF (tools/convert_to_gguf.py, llama.cpp's
layout), through QuantizedLoader, against llama-cpp-python running the same file in the same run."""
import json

import pytest
import torch
from conftest import timed
from gguf import GGMLQuantizationType as Q

import mistralrs
from mistralrs.cli import DEMO_MODEL

TOKENS = 64
PROMPT = "The import statement"


def converter():
    import convert_to_gguf
    return convert_to_gguf


@pytest.fixture(scope="module")
def gguf_files(tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf")
    convert = converter().convert
    return {q: convert(DEMO_MODEL, out / f"demo-{q.name.lower()}.gguf", q) for q in (Q.F32, Q.Q8_0, Q.Q4_0)}


@pytest.mark.parametrize("qtype", [Q.F32, Q.Q8_0, Q.Q4_0], ids=["f32", "q8_0", "q4_0"])
def test_gguf_decode(benchmark, record, gguf_files, qtype):
    path = gguf_files[qtype]
    loader = mistralrs.QuantizedLoader(mistralrs.LlamaLoader, model_id=None, is_gguf=True, quantized_model_id="",
                                       quantized_filename=str(path))
    with loader.load(token_source="none") as runner:
        def generate():
            r = json.loads(runner.send_completion_request(mistralrs.CompletionRequest(
                PROMPT, "bench", max_tokens=TOKENS, temperature=0)))
            return r["usage"]["completion_tokens"]
        n = generate()
        benchmark.pedantic(generate, rounds=3, warmup_rounds=1)
    ours = n / benchmark.stats.stats.median
    figures = dict(model=f"demo-llama {qtype.name}", file_mb=path.stat().st_size / 2**20, completion_tokens=n,
                   decode_tok_s=ours)
    try:
        import llama_cpp
    except ImportError:
        record(**figures, llama_cpp="not installed")
        return
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=512, n_threads=torch.get_num_threads(), verbose=False)
    peer = timed(lambda: llm.create_completion(PROMPT, max_tokens=TOKENS, temperature=0.0), reps=3)
    peer_n = llm.create_completion(PROMPT, max_tokens=TOKENS, temperature=0.0)["usage"]["completion_tokens"]
    record(**figures, llama_cpp_tok_s=peer_n / peer, speedup_vs_llama_cpp=ours / (peer_n / peer))
