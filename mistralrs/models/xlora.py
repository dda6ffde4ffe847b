"""X-LoRA's config, classifier and the two-pass model over a base CausalLM (load/xlora.py reads the files and builds
them).

Forward of one step (as PEFT's XLoraModel): a scaling pass (the base model; with scaling_pass_value c != 0, every
adapter weighted by c) gives hidden states after the final norm; the classifier turns them into scalings
[T, n_layers, A]; the real pass adds, at each LoRA linear L, sum_a scalings[:, L, a] * scale_a * B_a A_a x.

KV cache: the two passes see different K/V, so each needs its own cache. The block manager holds 2 * n_layers K/V
pairs, the first n_layers for the scaling pass and the rest for the real pass, under the same block tables and slots:
the scheduler's block accounting is unchanged, a block just costs twice the memory. Caching is exact: both passes are
causal, so the scalings of position t depend only on tokens <= t, the same as PEFT, which recomputes every step.
"""
from dataclasses import dataclass

import torch
from torch import nn

from ..layers import CausalLM
from ..linears import XLoraContext


@dataclass
class XLoraConfig:
    """xlora_config.json (or PEFT's adapter_config.json of an XLORA model)."""
    hidden_size: int
    adapters: list[str]
    xlora_depth: int = 1
    xlora_size: int = 2048
    layerwise_scalings: bool = False
    enable_relu_and_dropout: bool = True  # PEFT always puts a ReLU between classifier layers
    enable_softmax: bool = True
    softmax_temperature: float = 1.0
    scaling_pass_value: float = 0.0
    global_scaling_weight: float = 1.0
    top_k_lora: int | None = None
    enable_softmax_topk: bool = False
    base_model_id: str | None = None


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
