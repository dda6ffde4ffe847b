"""A model from a GGUF file (or a legacy GGML file read into the same form).

The model is built on the meta device from `Args.from_gguf(metadata)` as for safetensors. Then llama.cpp's tensor
names go through the architecture's literal GGUF_NAMES map (GGUF_BASE_NAMES below plus its MLP's), the layout
changes of llama.cpp's converter are undone, each nn.Linear / nn.Embedding whose weight the file stores quantized
is swapped for QuantLinear / QuantEmbedding holding the bytes as stored, and everything else (F32/F16/BF16
tensors) is loaded in the activation dtype.
"""
import re
from collections import ChainMap

import numpy as np
import torch
from torch import nn

from ..kernels.dequant import dequantize
from ..layers import CausalLM
from ..linears import QuantEmbedding, QuantLinear
from ..model_args import check_args
from ..tensor_parallel.shard import Shard, local_args
from .gguf import GGUFFile, RawTensor
from .safetensors import load_state

_LAYER = re.compile(r"^blk\.(\d+)\.")
_EXPERT = re.compile(r"\.(\d+)$")


def _template(stem: str) -> tuple[str, dict]:
    """The GGUF_NAMES key of a tensor name's stem: blk.3.ffn_gate.1 -> (blk.{i}.ffn_gate.{e}, {i: 3, e: 1})."""
    fmt = {}
    if m := _LAYER.match(stem):
        fmt["i"], stem = int(m.group(1)), "blk.{i}." + stem[m.end():]
        if m := _EXPERT.search(stem):
            fmt["e"], stem = int(m.group(1)), stem[:m.start()] + ".{e}"
    return stem, fmt


def _split_rows(raw: RawTensor, sizes: list[int]) -> list[RawTensor]:
    """Split a 1-D or 2-D tensor along dim 0 into whole rows (elements of a 1-D one): quantized rows split as stored."""
    n = raw.shape[0]
    if sum(sizes) != n or len(raw.shape) > 2 or raw.data.size % n:
        raise ValueError(f"tensor {raw.name!r} of shape {raw.shape} cannot be split into {sizes} rows")
    data = raw.data.reshape(n, -1)  # [N, bytes per row (per element when 1-D)]
    bounds = np.cumsum([0, *sizes])
    return [RawTensor(raw.name, raw.qtype, (b - a, *raw.shape[1:]), data[a:b].reshape(-1, raw.data.shape[1])
                      if len(raw.shape) == 2 else data[a:b].reshape(1, -1))
            for a, b in zip(bounds[:-1], bounds[1:])]


def _experts(raw: RawTensor) -> list[RawTensor]:
    """[E, ...] stacked experts -> E tensors of shape [...]; each is a run of whole rows of the stored bytes."""
    per_expert = raw.data.reshape(raw.shape[0], -1, raw.data.shape[1])
    return [RawTensor(raw.name, raw.qtype, raw.shape[1:], d) for d in per_expert]


def map_names(names: dict, gfile: GGUFFile, expected: dict[str, tuple]) -> dict[str, RawTensor]:
    """Our parameter name -> the file's tensor, through the literal `names` map."""
    out = {}
    for gname, raw in gfile.tensors.items():
        if gname == "rope_freqs.weight":
            continue  # not a parameter: it rescales the rotary frequencies
        stem, _, suffix = gname.rpartition(".")
        template, fmt = _template(stem)
        target = names.get(template)
        if target is None or suffix not in ("weight", "bias"):
            raise ValueError(f"{gfile.path}: tensor {gname!r} is not part of a {gfile.metadata['general.architecture']}"
                             f" model as mistralrs knows it")
        if isinstance(target, dict):  # a name whose meaning depends on the architecture (Gemma's ffn_norm)
            target = target[gfile.metadata["general.architecture"]]
        if isinstance(target, tuple):  # fused rows, e.g. q | k | v
            parts = [f"{t.format(**fmt)}.{suffix}" for t in target]
            out.update(zip(parts, _split_rows(raw, [expected.get(p, (0,))[0] for p in parts])))
        elif "{e}" in target and "e" not in fmt:  # experts stacked in one [E, ...] tensor
            for e, piece in enumerate(_experts(raw)):
                out[f"{target.format(e=e, **fmt)}.{suffix}"] = piece
        else:
            out[f"{target.format(**fmt)}.{suffix}"] = raw
    return out


def unpermute_rows(raw: RawTensor, n_head: int) -> RawTensor:
    """Undo llama.cpp's LlamaModel.permute, which reorders whole rows: quantized rows move as they are."""
    n = raw.shape[0]
    data = raw.data.reshape(n, -1)  # [N, bytes per row], also for a 1-D bias
    if n % (2 * n_head) or (len(raw.shape) == 1 and raw.quantized):
        raise ValueError(f"tensor {raw.name!r} with {n} rows cannot hold {n_head} rotary heads")
    data = data.reshape(n_head, n // n_head // 2, 2, -1).swapaxes(1, 2).reshape(raw.data.shape)
    return RawTensor(raw.name, raw.qtype, raw.shape, np.ascontiguousarray(data))


def resident_bytes(model: nn.Module) -> int:
    """Bytes held by the model's parameters and buffers, each storage counted once."""
    storages = {}
    for t in [*model.parameters(), *model.buffers()]:
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
    return sum(storages.values())


def load_gguf_model(module, gfile: GGUFFile, dtype: torch.dtype, device: torch.device, tp=None
                    ) -> tuple[CausalLM, object]:
    """(model, args) of the architecture of model file `module` from `gfile`, with quantized weights kept as stored.
    The caller has checked that general.architecture is one of module.GGUF_ARCHITECTURES. The model file declares
    its GGUF_NAMES map (a value may be {architecture: our name} where the files' architectures differ, as Gemma's
    do) and llama.cpp's layout changes to undo (GGUF_PERMUTED_QK, GGUF_NORM_PLUS_ONE). tp: the model is this
    rank's shard (tensor_parallel/shard.py), and only its slices of the file are copied."""
    path, tensors = gfile.path, gfile.tensors
    arch = gfile.metadata["general.architecture"]
    if "token_embd.weight" not in tensors:
        raise ValueError(f"{path}: tensor 'token_embd.weight' is missing")
    # ChainMap, not a merged dict: copying the metadata would decode its vocabulary arrays
    md = ChainMap(gfile.metadata, {f"{arch}.vocab_size": tensors["token_embd.weight"].shape[0]})
    try:
        args = module.Args.from_gguf(md, set(tensors))
        check_args(args, "GGUF metadata")
        _check_args(args, tensors)
    except (ValueError, TypeError, KeyError, ZeroDivisionError, AttributeError) as e:  # values of the wrong type
        raise ValueError(f"{path}: {e}") from None
    args.tie_word_embeddings = False  # lm_head always gets a tensor here: token_embd's when the file has no output
    with torch.device("meta"):
        model = module.build(args)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    try:
        shard = Shard.of(module.build, args, tp, expected)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    try:
        raw = map_names(module.GGUF_NAMES, gfile, expected)
        raw.setdefault("lm_head.weight", raw.get("model.embed_tokens.weight"))
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    _check_names(raw, expected, path)
    local = args
    try:
        if shard is not None:  # cut before the unpermute below, which then copies only this rank's heads
            raw, local = _shard(raw, shard), local_args(args, tp.world)
            with torch.device("meta"):
                model = module.build(local)
        if module.GGUF_PERMUTED_QK:
            for proj, heads in (("q_proj", local.num_attention_heads), ("k_proj", local.num_key_value_heads)):
                for name in [n for n in raw if f".self_attn.{proj}." in n]:
                    raw[name] = unpermute_rows(raw[name], heads)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    state = _materialize(model, raw, dtype, device, norm_plus_one=module.GGUF_NORM_PLUS_ONE)
    load_state(model, state, str(path))
    if "rope_freqs.weight" in tensors:
        _rope_factors(model, tensors["rope_freqs.weight"], path)
    return model, args


def _shard(raw: dict[str, RawTensor], shard) -> dict[str, RawTensor]:
    """Each tensor's slice of this rank; a tensor used twice (tied embeddings) is cut once."""
    parts: dict[int, RawTensor] = {}
    for name, r in raw.items():
        if id(r) not in parts:
            parts[id(r)] = shard.raw(name, r)
    return {name: parts[id(r)] for name, r in raw.items()}


def _check_args(args, tensors: dict[str, RawTensor]) -> None:
    """The metadata against the tensors, before building anything: a corrupt count must not make us build a
    million layers or allocate a huge rotary table."""
    ints = {k: v for k, v in vars(args).items() if isinstance(v, int) and not isinstance(v, bool)}
    if bad := {k: v for k, v in ints.items() if v < 1}:
        raise ValueError(f"metadata gives {bad}; these must be >= 1")
    vocab, hidden = tensors["token_embd.weight"].shape[0], tensors["token_embd.weight"].shape[-1]
    if (args.vocab_size, args.hidden_size) != (vocab, hidden):
        raise ValueError(f"metadata gives vocab {args.vocab_size} x hidden {args.hidden_size}, token_embd.weight "
                         f"is {vocab} x {hidden}")
    blocks = {int(m.group(1)) for name in tensors if (m := _LAYER.match(name))}
    if blocks != set(range(args.num_hidden_layers)):
        raise ValueError(f"metadata gives {args.num_hidden_layers} blocks, the tensors are of blocks "
                         f"{sorted(blocks)[:8]}{'...' if len(blocks) > 8 else ''}")
    q = tensors.get("blk.0.attn_q.weight") or tensors.get("blk.0.attn_qkv.weight")
    kv_rows = 0 if "blk.0.attn_q.weight" in tensors else 2 * args.num_key_value_heads * args.head_dim
    if q is None or q.shape[0] != args.num_attention_heads * args.head_dim + kv_rows:
        raise ValueError(f"metadata gives {args.num_attention_heads} heads of {args.head_dim}, which does not fit "
                         f"{q.name if q else 'blk.0.attn_q.weight'} {q.shape if q else '(missing)'}")
    if getattr(args, "partial_rotary_factor", 1.0) > 1.0:
        raise ValueError(f"metadata gives a rotary dimension above the head dimension {args.head_dim}")
    experts = tensors.get("blk.0.ffn_gate_inp.weight")
    if hasattr(args, "num_local_experts") and (experts is None or experts.shape[0] != args.num_local_experts):
        raise ValueError(f"metadata gives {args.num_local_experts} experts, blk.0.ffn_gate_inp.weight is "
                         f"{experts.shape if experts else 'missing'}")
    if getattr(args, "num_experts_per_tok", 0) > getattr(args, "num_local_experts", 1 << 62):
        raise ValueError(f"metadata routes each token to {args.num_experts_per_tok} of {args.num_local_experts} "
                         f"experts")


def _check_names(raw: dict[str, RawTensor], expected: dict[str, tuple], path) -> None:
    missing = sorted(n for n in expected if raw.get(n) is None)
    if missing:
        raise ValueError(f"{path}: missing tensors for {', '.join(missing[:5])}{'...' if len(missing) > 5 else ''}")
    for name, r in raw.items():
        if name not in expected:
            raise ValueError(f"{path}: tensor {r.name!r} (our {name}) does not fit this model's configuration")
        if r.shape != expected[name]:
            raise ValueError(f"{path}: tensor {r.name!r} has shape {r.shape} (as our {name}); the metadata implies "
                             f"{expected[name]}")


def _materialize(model: nn.Module, raw: dict[str, RawTensor], dtype: torch.dtype, device: torch.device, *,
                 norm_plus_one: bool) -> dict[str, torch.Tensor]:
    """The state dict to load: quantized Linear/Embedding weights as qweight bytes (their modules swapped), every
    other tensor dequantized to `dtype`. A tensor used twice (tied embeddings) is copied once."""
    copies: dict[int, torch.Tensor] = {}

    def as_bytes(r: RawTensor) -> torch.Tensor:
        if id(r) not in copies:
            copies[id(r)] = torch.from_numpy(np.array(r.data)).to(device)
        return copies[id(r)]

    state = {}
    for name, r in raw.items():
        module_name, _, pname = name.rpartition(".")
        mod = model.get_submodule(module_name)
        if pname == "weight" and r.quantized and isinstance(mod, (nn.Linear, nn.Embedding)):
            quant = (QuantLinear.like(mod, r.qtype) if isinstance(mod, nn.Linear)
                     else QuantEmbedding.like(mod, r.qtype, dtype))
            model.set_submodule(module_name, quant)
            state[f"{module_name}.qweight"] = as_bytes(r)
        elif norm_plus_one and name.endswith("norm.weight"):
            state[name] = (dequantize(as_bytes(r), r.qtype, r.shape, torch.float32) - 1.0).to(dtype)
        else:
            state[name] = dequantize(as_bytes(r), r.qtype, r.shape, dtype)
    return state


def _rope_factors(model: CausalLM, raw: RawTensor, path) -> None:
    """Llama 3 rope scaling as llama.cpp stores it: one divisor per rotary frequency."""
    factors = dequantize(torch.from_numpy(np.array(raw.data)), raw.qtype, raw.shape, torch.float32)
    inv_freq = model.rotary.inv_freq
    if factors.shape != inv_freq.shape:
        raise ValueError(f"{path}: tensor 'rope_freqs.weight' has shape {tuple(factors.shape)}, the rotary has "
                         f"{inv_freq.numel()} frequencies")
    model.rotary.inv_freq = inv_freq / factors.to(inv_freq.device)
