"""X-LoRA's classifier and the two-pass model over a base CausalLM (files are read by xlora.py).

Forward of one step (as PEFT's XLoraModel): a scaling pass (the base model; with scaling_pass_value c != 0, every
adapter weighted by c) gives hidden states after the final norm; the classifier turns them into scalings
[T, n_layers, A]; the real pass adds, at each LoRA linear L, sum_a scalings[:, L, a] * scale_a * B_a A_a x.

KV cache: the two passes see different K/V, so each needs its own cache. The block manager holds 2 * n_layers K/V
pairs, the first n_layers for the scaling pass and the rest for the real pass, under the same block tables and slots:
the scheduler's block accounting is unchanged, a block just costs twice the memory. Caching is exact: both passes are
causal, so the scalings of position t depend only on tokens <= t, the same as PEFT, which recomputes every step.
"""

import math
import re
from dataclasses import dataclass

import torch
from torch import nn

from ..layers import CausalLM
from ..linears import QuantLinear, XLoraContext, XLoraLinear
from ..load import hub
from ..load.safetensors import rename
from ..load.xlora import (
    CLASSIFIER_PREFIX,
    Adapter,
    Ordering,
    XLoraConfig,
    check_base_model,
    read_adapter,
    read_ordering,
    read_tensors,
    read_xlora_config,
    stack,
)


class Classifier(nn.Module):
    """hidden [T, hidden] -> scalings [T, n_layers, A]: Linear (ReLU Linear)* as PEFT's XLoraClassifier; dropout is
    off at inference. The last layer takes xlora_size inputs when depth >= 2."""

    def __init__(self, cfg: XLoraConfig, linears: list[nn.Linear], n_layers: int, n_adapters: int):
        super().__init__()
        self.cfg, self.n_layers, self.n_adapters = cfg, n_layers, n_adapters
        self.linears = nn.ModuleList(linears)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        x = hidden
        for i, linear in enumerate(self.linears):
            if i and self.cfg.enable_relu_and_dropout:
                x = torch.relu(x)
            x = linear(x)
        T = hidden.shape[0]
        if not self.cfg.layerwise_scalings:
            x = x[:, None, :].expand(T, self.n_layers, self.n_adapters)
        s = x.reshape(T, self.n_layers, self.n_adapters)
        if self.cfg.enable_softmax:
            s = torch.softmax(s / self.cfg.softmax_temperature, dim=-1)
        if self.cfg.top_k_lora is not None:  # PEFT applies top-k per layer, after the softmax
            keep = torch.zeros_like(s, dtype=torch.bool)
            keep.scatter_(-1, torch.topk(s, self.cfg.top_k_lora, dim=-1).indices, True)
            s = s * keep.to(s.dtype)
        if self.cfg.enable_softmax_topk:
            s = torch.softmax(s.masked_fill(s == 0, float("-inf")), dim=-1).masked_fill(s == 0, 0.0)
        return s


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


@dataclass
class FrozenScalings:
    """A sequence's X-LoRA state under tgt_non_granular_index, kept in its model_state (only XLoraCausalLM.step
    reads or writes it). It outlives a preemption: the recomputed tokens after `at` reuse the same scalings."""
    at: int  # the position whose scalings every later token reuses: prompt_len - 1 + tgt_non_granular_index
    scalings: torch.Tensor | None = None  # [n_layers, A], once position `at` has run


class XLoraCausalLM(nn.Module):
    """The base CausalLM with its LoRA linears swapped for XLoraLinear, run twice per step (see the module doc).
    kv_caches holds 2 * n_layers K/V pairs: the scaling pass's, then the real pass's."""

    def __init__(self, base: CausalLM, classifier: Classifier, ctx: XLoraContext, cfg: XLoraConfig,
                 tgt_non_granular_index: int | None = None):
        super().__init__()
        self.base, self.classifier, self.ctx, self.cfg = base, classifier, ctx, cfg
        self.tgt_non_granular_index = tgt_non_granular_index

    @property
    def whole_prompt_steps(self) -> bool:
        """Whether step() must see a sequence's whole prompt in its first step: it freezes the scalings at a prompt
        position (tgt_non_granular_index), found from the first step's tokens. The scheduler then neither chunks
        prompts nor starts sequences from a cached prefix (engine/scheduler.py). Per-token scalings need neither:
        a token's K/V depend only on the tokens up to it, as in the base model."""
        return self.tgt_non_granular_index is not None

    def step(self, input_ids, positions, meta, kv_caches, seqs) -> torch.Tensor:
        """The model runner's call, with the batch's sequences (their tokens, num_cached and model_state).
        tgt_non_granular_index freezes the scalings per sequence: the token at position p = prompt_len - 1 + tgt
        keeps its own and every later token reuses them (tgt=0: the last prompt token's). Earlier tokens, also when
        recomputed after a preemption, get their own."""
        if self.tgt_non_granular_index is None:
            return self(input_ids, positions, meta, kv_caches)
        hidden, scalings = self(input_ids, positions, meta, kv_caches, frozen=self._frozen_rows(seqs),
                                return_scalings=True)
        a = 0
        for s in seqs:
            state, new = s.model_state, len(s.tokens) - s.num_cached
            at = state.at - s.num_cached  # its index among this sequence's new tokens
            if state.scalings is None and 0 <= at < new:
                state.scalings = scalings[a + at].clone()
            a += new
        return hidden

    def _frozen_rows(self, seqs) -> tuple[list[int], torch.Tensor | None]:
        """(src [T], extra [F, n_layers, A] or None): token t takes row src[t] of [this step's scalings; extra]."""
        T = sum(len(s.tokens) - s.num_cached for s in seqs)
        src, extra, a = list(range(T)), [], 0
        for s in seqs:
            start, n = s.num_cached, len(s.tokens)
            if s.model_state is None:  # the first step of a sequence holds exactly its prompt
                s.model_state = FrozenScalings(at=n - 1 + self.tgt_non_granular_index)
            state, b = s.model_state, a + n - start  # this sequence's tokens are a..b-1 of the step
            row = None  # the freeze point is still ahead
            if state.scalings is not None:
                row = T + len(extra)
                extra.append(state.scalings)
            elif start <= state.at < n:
                row = a + state.at - start
            if row is not None:
                first = max(a, a + state.at + 1 - start)  # the first token after the freeze point
                src[first:b] = [row] * (b - first)
            a = b
        return src, torch.stack(extra) if extra else None

    def forward(self, input_ids, positions, meta, kv_caches, frozen=None, return_scalings=False):
        """frozen: (src [T] list of int, extra [F, n_layers, A] or None): token t takes row src[t] of this step's
        scalings followed by extra (tgt_non_granular_index). When no token takes its own step's scalings, the scaling
        pass is skipped; its cache is then not written there, and no later scaling pass reads those positions."""
        n = len(self.base.model.layers)
        if len(kv_caches) != 2 * n:
            raise ValueError(f"X-LoRA needs 2 * {n} KV cache layers (scaling pass + real pass), got {len(kv_caches)}")
        T, c = input_ids.shape[0], self.cfg.scaling_pass_value
        dtype = self.classifier.linears[0].weight.dtype
        src = None if frozen is None else torch.tensor(frozen[0], device=input_ids.device)
        if frozen is not None and min(frozen[0]) >= T:
            scalings = frozen[1][src - T]
        else:
            # scaling pass value 0 means every adapter term is 0: skip them (same result as PEFT).
            fill = None if c == 0 else torch.full((T, self.classifier.n_layers, self.classifier.n_adapters), c,
                                                  dtype=dtype, device=input_ids.device)
            with self.ctx.run(fill):
                hidden = self.base(input_ids, positions, meta, kv_caches[:n])
            scalings = self.classifier(hidden.to(dtype))
            if frozen is not None:
                rows = scalings if frozen[1] is None else torch.cat([scalings, frozen[1].to(dtype)])
                scalings = rows[src]
        with self.ctx.run(scalings):
            out = self.base(input_ids, positions, meta, kv_caches[n:])
        return (out, scalings) if return_scalings else out

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.base.logits(hidden)


def attach(model: CausalLM, renames, ordering: Ordering, cfg: XLoraConfig, adapters: list[Adapter],
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
    xlora = attach(model, renames, ordering, cfg, adapters, classifier, order_file)
    xlora.tgt_non_granular_index = tgt_non_granular_index
    return xlora
