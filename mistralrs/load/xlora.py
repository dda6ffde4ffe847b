"""X-LoRA's files, every one of them read here: the ordering file, the X-LoRA config, the LoRA adapters and the
classifier; and the model they make of a base (load_xlora, one of load/model.py's passes).

An X-LoRA repo (xlora_model_id, a local directory or a hub repo) holds
    xlora_config.json               or PEFT's adapter_config.json with "peft_type": "XLORA"
    xlora_classifier.safetensors    or PEFT's adapter_model.safetensors; internal_xlora_classifier.layers.{i}.* (PEFT's
                                    nn.Sequential indices) or mistral.rs's inner.{k}.* / last.*
    <name>/adapter_config.json, <name>/adapter_model.safetensors   for each adapter name of the ordering's "order"
The ordering file gives the adapter order (the classifier's output index of each adapter) and the index of every
LoRA linear in the classifier's layer axis, keyed by its Hugging Face module name.

The classifier and the two-pass model are models/xlora.py's.
"""
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from ..layers import CausalLM
from ..linears import QuantLinear, XLoraContext, XLoraLinear
from ..model_args import read_json
from ..models.xlora import Classifier, XLoraCausalLM, XLoraConfig
from . import hub
from .safetensors import rename

CLASSIFIER_PREFIX = "internal_xlora_classifier."


@dataclass
class Ordering:
    order: list[str]          # adapter names, in classifier output order
    layers: dict[str, int]    # Hugging Face module name -> index in the scalings' layer axis
    base_model_id: str | None


def read_ordering(path) -> Ordering:
    if path is None:
        raise ValueError("order_file is required for X-LoRA: the ordering JSON file")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"order_file {str(path)!r} does not exist or is not a file")
    raw = read_json(path)
    order, layers = raw.get("order"), raw.get("layers")
    if not isinstance(order, list) or not order or not all(isinstance(n, str) for n in order):
        raise ValueError(f"order_file {path}: 'order' must be a non-empty list of adapter names, got {order!r}")
    if len(set(order)) != len(order):
        raise ValueError(f"order_file {path}: 'order' names an adapter twice: {order}")
    if not isinstance(layers, dict) or not layers or not all(
            isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) for k, v in layers.items()):
        raise ValueError(f"order_file {path}: 'layers' must be a non-empty object of module name -> int index")
    if sorted(layers.values()) != list(range(len(layers))):
        raise ValueError(f"order_file {path}: 'layers' indices must be 0..{len(layers) - 1}, each once")
    base = raw.get("base_model_id")
    if base is not None and not isinstance(base, str):
        raise ValueError(f"order_file {path}: 'base_model_id' must be a string, got {base!r}")
    return Ordering(order, layers, base)


def check_base_model(ordering: Ordering, model_id: str | None, order_file) -> None:
    """An ordering with base_model_id must name the base model: the same hub id, or the same local directory. A GGUF
    base loaded without model_id has no name to check."""
    want = ordering.base_model_id
    if want is None or model_id is None or want == model_id:
        return
    if Path(want).is_dir() and Path(model_id).is_dir() and Path(want).resolve() == Path(model_id).resolve():
        return
    raise ValueError(f"order_file {order_file}: base_model_id {want!r} does not match model_id {model_id!r}")


def read_xlora_config(xlora_model_id: str, **kw) -> tuple[XLoraConfig, str]:
    path = hub.optional_repo_file(xlora_model_id, "xlora_config.json", **kw)
    if path is None:
        path = hub.optional_repo_file(xlora_model_id, "adapter_config.json", **kw)
        if path is None or read_json(path).get("peft_type") != "XLORA":
            raise FileNotFoundError(f"xlora_model_id {xlora_model_id!r} has no xlora_config.json (nor a PEFT "
                                    f"adapter_config.json with peft_type XLORA)")
    raw = read_json(path)
    for key in ("hidden_size", "adapters"):
        if raw.get(key) is None:
            raise ValueError(f"{path}: missing required field {key!r}")
    fields = {k: raw[k] for k in XLoraConfig.__dataclass_fields__ if raw.get(k) is not None}
    fields["adapters"] = list(raw["adapters"])  # a list, or PEFT's name -> path map: only the names matter
    cfg = XLoraConfig(**fields)
    if not isinstance(cfg.xlora_depth, int) or cfg.xlora_depth < 1:
        raise ValueError(f"{path}: xlora_depth must be an int >= 1, got {cfg.xlora_depth!r}")
    if cfg.top_k_lora is not None and (not isinstance(cfg.top_k_lora, int) or cfg.top_k_lora < 1):
        raise ValueError(f"{path}: top_k_lora must be None or an int >= 1, got {cfg.top_k_lora!r}")
    return cfg, str(path)


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors' own error type does not name the file
        raise ValueError(f"{path} is not a readable safetensors file: {e}") from None


@dataclass
class Adapter:
    name: str
    scale: float                             # alpha / r (alpha / sqrt(r) with use_rslora)
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]  # module name -> (A [r, K], B [N, r])


def read_adapter(xlora_model_id: str, name: str, **kw) -> Adapter:
    try:
        cfg_path = hub.repo_file(xlora_model_id, f"{name}/adapter_config.json", **kw)
        weights_path = hub.repo_file(xlora_model_id, f"{name}/adapter_model.safetensors", **kw)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"adapter {name!r} of the ordering file: {e} (adapters are subfolders of "
                                f"xlora_model_id named exactly as in 'order')") from e
    cfg = read_json(cfg_path)
    r, alpha = cfg.get("r"), cfg.get("lora_alpha")
    if not isinstance(r, int) or r < 1 or not isinstance(alpha, (int, float)):
        raise ValueError(f"{cfg_path}: needs an int 'r' >= 1 and a number 'lora_alpha', got r={r!r}, "
                         f"lora_alpha={alpha!r}")
    for unsupported in ("rank_pattern", "alpha_pattern"):
        if cfg.get(unsupported):
            raise ValueError(f"{cfg_path}: {unsupported} is not supported for X-LoRA adapters")
    if cfg.get("use_dora"):
        raise ValueError(f"{cfg_path}: DoRA adapters are not supported by X-LoRA")
    scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in read_tensors(weights_path).items():
        m = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.[^.]+)?\.weight", key)
        if m is None:
            raise ValueError(f"{weights_path}: unexpected tensor {key!r} (expected <module>.lora_A.weight and "
                             f"<module>.lora_B.weight)")
        pairs.setdefault(m.group(1), {})[m.group(2)] = t
    weights = {}
    for module, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise ValueError(f"{weights_path}: module {module!r} has lora_{next(iter(ab))} but not its pair")
        weights[module] = (ab["A"], ab["B"])
    return Adapter(name, scale, weights)


def stack(module: str, adapters: list[Adapter], dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """lora_a [A, R, K], lora_b [A, N, R] of one module; smaller ranks and adapters without it are zeros."""
    present = [a.weights[module] for a in adapters if module in a.weights]
    R = max(A.shape[0] for A, _ in present)
    K, N = present[0][0].shape[1], present[0][1].shape[0]
    lora_a = torch.zeros(len(adapters), R, K, dtype=dtype, device=device)
    lora_b = torch.zeros(len(adapters), N, R, dtype=dtype, device=device)
    for i, a in enumerate(adapters):
        if module in a.weights:
            A, B = a.weights[module]
            if A.shape[1] != K or B.shape[0] != N or A.shape[0] != B.shape[1]:
                raise ValueError(f"adapter {a.name!r}: {module} has lora_A {tuple(A.shape)}, lora_B "
                                 f"{tuple(B.shape)}, which do not fit [r, {K}] and [{N}, r]")
            lora_a[i, :A.shape[0]] = A
            lora_b[i, :, :B.shape[1]] = B
    return lora_a, lora_b


def read_classifier(xlora_model_id: str, cfg: XLoraConfig, n_layers: int, dtype, device, **kw) -> Classifier:
    path = hub.optional_repo_file(xlora_model_id, "xlora_classifier.safetensors", **kw)
    path = path or hub.optional_repo_file(xlora_model_id, "adapter_model.safetensors", **kw)
    if path is None:
        raise FileNotFoundError(f"xlora_model_id {xlora_model_id!r} has no xlora_classifier.safetensors (nor PEFT's "
                                f"adapter_model.safetensors)")
    params: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in read_tensors(path).items():
        key = key[key.index(CLASSIFIER_PREFIX) + len(CLASSIFIER_PREFIX):] if CLASSIFIER_PREFIX in key else key
        layer, _, kind = key.rpartition(".")
        params.setdefault(layer, {})[kind] = t

    def order(layer):  # layers.{i} (PEFT's nn.Sequential), or inner.{k} then last (mistral.rs)
        m = re.fullmatch(r"(?:layers|inner)\.(\d+)", layer)
        return int(m.group(1)) if m else math.inf if layer == "last" else None
    if any(order(k) is None for k in params) or any("weight" not in p for p in params.values()):
        raise ValueError(f"{path}: classifier tensors must be [internal_xlora_classifier.]layers.<i>.weight/bias "
                         f"or inner.<k>/last.weight/bias, got {sorted(params)}")
    layers = [params[k] for k in sorted(params, key=order)]
    A = len(cfg.adapters)
    out_last = A * n_layers if cfg.layerwise_scalings else A
    shapes = [(cfg.xlora_size, cfg.hidden_size)] + [(cfg.xlora_size, cfg.xlora_size)] * (cfg.xlora_depth - 2)
    shapes.append((out_last, cfg.xlora_size if cfg.xlora_depth >= 2 else cfg.hidden_size))
    shapes = shapes[-cfg.xlora_depth:]
    got = [tuple(p["weight"].shape) for p in layers]
    if got != shapes:
        raise ValueError(f"{path}: classifier weight shapes {got} do not match xlora_depth={cfg.xlora_depth}, "
                         f"xlora_size={cfg.xlora_size}, hidden_size={cfg.hidden_size}, {A} adapters, {n_layers} "
                         f"LoRA layers, layerwise_scalings={cfg.layerwise_scalings}: expected {shapes}")
    linears = []
    for p in layers:
        linear = nn.Linear(p["weight"].shape[1], p["weight"].shape[0], bias="bias" in p, dtype=dtype, device=device)
        with torch.no_grad():
            linear.weight.copy_(p["weight"])
            if "bias" in p:
                linear.bias.copy_(p["bias"])
        linears.append(linear)
    return Classifier(cfg, linears, n_layers, A).requires_grad_(False)


def wrap(model: CausalLM, renames, ordering: Ordering, cfg: XLoraConfig, adapters: list[Adapter],
         classifier: Classifier, order_file) -> XLoraCausalLM:
    """Swap every linear named in the ordering for an XLoraLinear over the adapters (in ordering order)."""
    covered = set(ordering.layers)
    for a in adapters:
        extra = sorted(set(a.weights) - covered)
        if extra:
            raise ValueError(f"adapter {a.name!r} has LoRA weights for {extra[:3]}, which order_file {order_file} "
                             f"does not list in 'layers'")
    ctx = XLoraContext()
    # The final norm's dtype is the activation dtype, also when the linears hold GGUF blocks.
    dtype, device = model.model.norm.weight.dtype, model.model.norm.weight.device
    scale = torch.tensor([a.scale * cfg.global_scaling_weight for a in adapters], dtype=torch.float32,
                         device=device)
    for hf_name, index in ordering.layers.items():
        if not any(hf_name in a.weights for a in adapters):
            raise ValueError(f"order_file {order_file}: layer {hf_name!r} has LoRA weights in none of the adapters")
        name = rename(hf_name + ".", renames)[:-1]  # the renames match whole name components, dots included
        # lm_head runs after the real pass, outside its scalings; an expert sees only its routed tokens.
        if name == "lm_head" or ".experts." in name:
            raise ValueError(f"order_file {order_file}: X-LoRA on {hf_name!r} (lm_head or a MoE expert) is not "
                             f"supported")
        try:
            linear = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"order_file {order_file}: layer {hf_name!r} is not a module of the base model") from None
        if not isinstance(linear, (nn.Linear, QuantLinear)):
            raise ValueError(f"order_file {order_file}: layer {hf_name!r} is a {type(linear).__name__}, not a "
                             f"linear layer")
        lora_a, lora_b = stack(hf_name, adapters, dtype, device)
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, XLoraLinear(linear, lora_a, lora_b, scale, index, ctx))
    return XLoraCausalLM(model, classifier.to(device), ctx, cfg)


def load_xlora(model: CausalLM, renames, model_id: str, order_file, xlora_model_id: str, hidden_size: int,
               dtype, device, tgt_non_granular_index=None, **kw) -> XLoraCausalLM:
    """Read the ordering, config, adapters and classifier, check them against each other, and wrap `model`."""
    ordering = read_ordering(order_file)
    check_base_model(ordering, model_id, order_file)
    cfg, cfg_path = read_xlora_config(xlora_model_id, **kw)
    if cfg.hidden_size != hidden_size:
        raise ValueError(f"{cfg_path}: hidden_size {cfg.hidden_size} does not match the base model's {hidden_size}")
    if set(cfg.adapters) != set(ordering.order):
        raise ValueError(f"order_file {order_file}: 'order' {ordering.order} does not name the same adapters as "
                         f"{cfg_path} 'adapters' {cfg.adapters}")
    cfg.adapters = list(ordering.order)
    adapters = [read_adapter(xlora_model_id, name, **kw) for name in ordering.order]
    classifier = read_classifier(xlora_model_id, cfg, len(ordering.layers), dtype, device, **kw)
    if tgt_non_granular_index is not None and (not isinstance(tgt_non_granular_index, int) or isinstance(
            tgt_non_granular_index, bool) or tgt_non_granular_index < 0):
        raise ValueError(f"tgt_non_granular_index must be None or an int >= 0, got {tgt_non_granular_index!r}")
    xlora = wrap(model, renames, ordering, cfg, adapters, classifier, order_file)
    xlora.tgt_non_granular_index = tgt_non_granular_index
    return xlora
