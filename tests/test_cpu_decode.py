"""cpu_decode: a block's decode step as one C++ call (kernels/decoder_cpu.cpp) gives the block's own modules'
logits bit for bit, for every architecture that gets one; the others keep their modules."""
import pytest
import torch
from test_cpu_threads import engine_logits

import mistralrs
from mistralrs.kernels import cpu_ext

from helpers import ARCHS, load

pytestmark = pytest.mark.skipif(cpu_ext.UNAVAILABLE is not None, reason=f"{cpu_ext.UNAVAILABLE}")
FUSED = ["llama", "mistral", "gemma", "gemma2", "gemma3"]


def load_gguf(arch, path, **kw):
    loader = mistralrs.QuantizedLoader(ARCHS[arch], model_id=None, is_gguf=True, quantized_model_id="",
                                       quantized_filename=str(path))
    return loader.load(token_source="none", **{"kv_cache_tokens": 256, **kw})


def fused_and_modules(runner, steps: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    model = runner.pipeline.model_runner.model
    layers = model.decode_layers
    assert layers is not None and all(layer is not None for layer in layers)
    fused = engine_logits(runner, steps)
    model.decode_layers = None
    try:
        return fused, engine_logits(runner, steps)
    finally:
        model.decode_layers = layers


@pytest.mark.parametrize("arch", FUSED)
def test_fused_decode_equals_the_modules_float32(tiny_models, arch):
    with load(tiny_models[arch], arch, kv_cache_tokens=256, threads=2) as runner:
        fused, modules = fused_and_modules(runner)
    assert torch.equal(fused, modules)


@pytest.mark.parametrize("qtype", ["q8_0", "q4_0"])
@pytest.mark.parametrize("arch", FUSED)
def test_fused_decode_equals_the_modules_gguf(gguf_file, arch, qtype):
    with load_gguf(arch, gguf_file(arch, qtype), threads=2) as runner:
        fused, modules = fused_and_modules(runner)
    assert torch.equal(fused, modules)


@pytest.mark.parametrize("arch", ["phi2", "mixtral"])
def test_blocks_without_a_fused_decode_keep_their_modules(tiny_models, arch):
    with load(tiny_models[arch], arch, kv_cache_tokens=256) as runner:
        assert runner.pipeline.model_runner.model.decode_layers is None
        assert engine_logits(runner, 2).isfinite().all()


def batch_logits(runner, B: int, steps: int = 3) -> torch.Tensor:
    """[steps, B, V]: B sequences of different lengths decoded together after their prefill."""
    from mistralrs.engine.sequence import Sequence

    from helpers import Driver
    out = []

    def run():
        d = Driver(runner, max_seqs=B)
        seqs = [Sequence([1 + (7 * b + j) % 50 for j in range(3 + b % 5)]) for b in range(B)]
        for s, row in zip(seqs, d.step(seqs)):  # one prefill step for all
            s.tokens.append(int(row.argmax()))
        for _ in range(steps):
            logits = d.step(seqs)
            out.append(logits)
            for s, row in zip(seqs, logits):
                s.tokens.append(int(row.argmax()))
        d.finish(*seqs)
    runner.engine.call(run)
    return torch.stack(out)


@pytest.mark.parametrize("B", [3, 20, 33], ids=["B3", "B20-torch-norms", "B33-modules"])
@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_fused_decode_of_a_batch_equals_the_modules(gguf_file, arch, B):
    with load_gguf(arch, gguf_file(arch, "q8_0"), threads=2, max_seqs=64, kv_cache_tokens=4096) as runner:
        model = runner.pipeline.model_runner.model
        fused = batch_logits(runner, B)
        layers, model.decode_layers = model.decode_layers, None
        modules = batch_logits(runner, B)
        model.decode_layers = layers
    assert torch.equal(fused, modules)
