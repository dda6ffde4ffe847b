"""mistralrs: LLM inference with Triton kernels behind the mistralrs Loader/Runner API."""
import os

# torch's CPU threads are OpenMP's (libgomp), which by default spin between parallel regions. A CPU decode step runs
# ~150 short regions, so the threads never sleep: any other process or thread on those cores (an HTTP server's event
# loop, its clients, a laptop's other work) waits for them. Measured on 2 cores shared with other work: SmolLM2 Q4_1
# decode 2.9 tok/s spinning against 37-48 passive, and the server 0.06-0.18x the in-process Runner against 0.5-0.86x.
# libgomp reads this once, when torch loads it: so only when mistralrs is imported before torch, or set by the user.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .loader import (  # noqa: E402
    GemmaLoader,
    LlamaLoader,
    MistralLoader,
    MixtralLoader,
    NormalLoader,
    Phi2Loader,
    QuantizedLoader,
    XLoraLoader,
    XLoraQuantizedLoader,
)
from .requests import ChatCompletionRequest, CompletionRequest, DType, ModelKind  # noqa: E402
from .runner import ChatCompletionStreamer, RequestAborted, Runner  # noqa: E402

__all__ = [
    "NormalLoader", "XLoraLoader", "QuantizedLoader", "XLoraQuantizedLoader",
    "MistralLoader", "GemmaLoader", "LlamaLoader", "MixtralLoader", "Phi2Loader",
    "Runner", "ChatCompletionStreamer", "ChatCompletionRequest", "CompletionRequest", "ModelKind", "DType",
    "RequestAborted",
]
