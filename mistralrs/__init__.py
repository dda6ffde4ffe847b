"""mistralrs: LLM inference with Triton kernels behind the mistralrs Loader/Runner API."""
from .loader import (
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
