"""mistralrs.kernels, the one dispatch point: which implementation each op runs for each backend and device, and the
MISTRALRS_KERNELS environment variable. The implementations are replaced by recorders: no kernel runs here."""
import importlib.util
from pathlib import Path

import pytest
import torch
from gguf import GGMLQuantizationType as Q

from mistralrs import kernels
from mistralrs.kernels import attention, attention_cpu, gguf, gguf_cpu, reference, rowwise_cpu, xlora


class CudaTensor:  # all the dispatch reads of a tensor is its device
    is_cuda, is_cpu = True, False
    device = torch.device("cuda")


CPU = torch.zeros(1)
ATTENTION_ARGS = lambda x: (x, x, x, x, x, x, 1.0)  # noqa: E731
# op -> (its arguments given the first tensor, {implementation: module}); an op without a CPU kernel uses the
# reference for CPU tensors under "auto"
OPS = {
    "store_kv": (lambda x: (x, x, x, x, x),
                 {"reference": reference, "cpu": attention_cpu, "triton": attention}),
    "paged_attention": (ATTENTION_ARGS, {"reference": reference, "cpu": attention_cpu, "triton": attention}),
    "paged_decode_attention": (ATTENTION_ARGS, {"reference": reference, "cpu": attention_cpu, "triton": attention}),
    "gguf_matmul": (lambda x: (x, x, Q.Q4_0, 8, 32), {"reference": reference, "cpu": gguf_cpu, "triton": gguf}),
    "xlora_mix": (lambda x: (x, x, x, x, x), {"reference": reference, "triton": xlora}),
    "rms_norm": (lambda x: (x, x, 1e-6), {"reference": reference, "cpu": rowwise_cpu}),
    "rotary_embedding": (lambda x: (x, x, x, x), {"reference": reference, "cpu": rowwise_cpu}),
}
# (BACKEND, device) -> which implementation runs
EXPECTED = {("auto", "cpu"): "cpu", ("auto", "cuda"): "triton", ("triton", "cpu"): "triton",
            ("triton", "cuda"): "triton", ("reference", "cpu"): "reference", ("reference", "cuda"): "reference"}


@pytest.fixture
def calls(monkeypatch):
    """Every implementation of every op replaced by one that records (implementation, op name)."""
    made = []
    for op, (_, impls) in OPS.items():
        for kind, module in impls.items():
            monkeypatch.setattr(module, op, lambda *a, _k=kind, _n=op, **kw: made.append((_k, _n)))
    return made


@pytest.mark.parametrize("backend, device", list(EXPECTED))
@pytest.mark.parametrize("op", OPS)
def test_backend_and_device_pick_the_implementation(monkeypatch, calls, op, backend, device):
    args, impls = OPS[op]
    monkeypatch.setattr(kernels, "BACKEND", backend)
    getattr(kernels, op)(*args(CudaTensor() if device == "cuda" else CPU))
    kind = EXPECTED[backend, device]
    assert calls == [(kind if kind in impls else "reference", op)]


@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_gguf_types_without_a_kernel_use_the_reference(monkeypatch, calls, backend):
    monkeypatch.setattr(kernels, "BACKEND", backend)
    assert Q.Q2_K not in gguf.SUPPORTED and Q.Q2_K not in gguf_cpu.SUPPORTED
    kernels.gguf_matmul(CudaTensor(), None, Q.Q2_K, 8, 256)
    kernels.gguf_matmul(CPU, None, Q.Q2_K, 8, 256)
    assert calls == [("reference", "gguf_matmul")] * 2


def import_kernels_with(monkeypatch, value: str | None):
    """A fresh execution of mistralrs/kernels/__init__.py under MISTRALRS_KERNELS=value (None: unset), outside
    sys.modules, so the package the rest of the tests use keeps its backend."""
    if value is None:
        monkeypatch.delenv("MISTRALRS_KERNELS", raising=False)
    else:
        monkeypatch.setenv("MISTRALRS_KERNELS", value)
    path = Path(kernels.__file__)
    spec = importlib.util.spec_from_file_location("mistralrs.kernels", path,
                                                  submodule_search_locations=[str(path.parent)])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("value, backend", [(None, "auto"), ("auto", "auto"), ("triton", "triton"),
                                            ("reference", "reference")])
def test_environment_variable_sets_the_backend(monkeypatch, value, backend):
    assert import_kernels_with(monkeypatch, value).BACKEND == backend


@pytest.mark.parametrize("value", ["cuda", "Triton", "", "torch"])
def test_bad_environment_value_raises_naming_the_allowed_ones(monkeypatch, value):
    with pytest.raises(ValueError, match=rf"MISTRALRS_KERNELS='{value}'; allowed: auto, triton, reference"):
        import_kernels_with(monkeypatch, value)
