"""Batched sampling: penalties, logit bias, temperature, top-k, top-p, and the model's own logprobs.

Order of operations on each row of logits (float32):
    logprobs reported  = log_softmax(raw logits)                      (the model's own distribution)
    l = raw - frequency_penalty * count(t) - presence_penalty * [count(t) > 0]   over the last repeat_last_n tokens
    l = l + logit_bias;  l[t] = -inf where the request's grammar forbids t
    temperature 0: argmax(l); otherwise sample from softmax(l / T) restricted to the top-k, then the top-p nucleus.
"""
from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    logprobs: bool = False  # compute the sampled token's logprob: reported, or ranked by best_of
    top_logprobs: int = 0

    def __post_init__(self):
        # logit_bias as tensors, made once in the caller's thread: a step's bias costs no Python loop over entries
        self.bias_ids = torch.tensor(list(self.logit_bias), dtype=torch.int64)
        self.bias_values = torch.tensor(list(self.logit_bias.values()), dtype=torch.float32)


@dataclass
class Sampled:
    tokens: list[int]
    logprobs: list[float | None]  # None for every row when no row asked for logprobs
    top: list[list[tuple[int, float]]]  # per row: the top_logprobs (token, logprob) pairs, best first


def apply_penalties(logits: torch.Tensor, recent: list[list[int]], presence: torch.Tensor,
                    frequency: torch.Tensor) -> torch.Tensor:
    """logits [B, V]; recent[b] the tokens penalised for row b; presence/frequency [B]."""
    B, V = logits.shape
    rows = [b for b, toks in enumerate(recent) for _ in toks]
    cols = [t for toks in recent for t in toks]
    counts = torch.zeros(B, V, device=logits.device)
    counts.index_put_((torch.tensor(rows, dtype=torch.int64, device=logits.device),
                       torch.tensor(cols, dtype=torch.int64, device=logits.device)),
                      torch.ones(len(cols), device=logits.device), accumulate=True)
    return logits - frequency[:, None] * counts - presence[:, None] * (counts > 0)


def top_k_top_p_mask(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """-inf outside each row's k largest and outside its nucleus: the smallest prefix (by probability) whose mass
    reaches p, so the token that crosses p is kept. top_k [B] (V = off), top_p [B] (1.0 = off)."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    rank = torch.arange(logits.shape[-1], device=logits.device)[None, :]
    drop = rank >= top_k[:, None]
    probs = torch.softmax(sorted_logits.masked_fill(drop, float("-inf")), dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    drop |= mass_before >= top_p[:, None]
    drop[:, 0] = False
    return logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))


def sample(logits: torch.Tensor, params: list[SamplingParams], recent: list[list[int]],
           generators: list[torch.Generator], allowed: torch.Tensor | None = None) -> Sampled:
    """One token per row of logits [B, V]; `allowed` [B, V] bool is the grammar mask, if any row has one.
    Each step only does the work some row asks for: a greedy batch with no penalty, bias or logprobs is one argmax."""
    B, V = logits.shape
    dev = logits.device
    if logits.dtype != torch.float32:  # .float() on float32 logits is a no-op that still costs a dispatch
        logits = logits.float()
    k = max(p.top_logprobs for p in params)
    logprobs = torch.log_softmax(logits, dim=-1) if k or any(p.logprobs for p in params) else None

    def col(values):
        return torch.tensor(values, dtype=torch.float32, device=dev)

    if any(p.presence_penalty or p.frequency_penalty for p in params):
        logits = apply_penalties(logits, recent, col([p.presence_penalty for p in params]),
                                 col([p.frequency_penalty for p in params]))
    biased = [(b, p) for b, p in enumerate(params) if p.logit_bias]
    if len(biased) == 1:  # the common case (one request with a bias): one indexed add, not a [B, V] bias matrix
        b, p = biased[0]
        logits = logits.clone()
        logits[b].index_add_(0, p.bias_ids.to(dev), p.bias_values.to(dev))
    elif biased:
        rows = torch.cat([torch.full((len(p.bias_ids),), b, dtype=torch.int64) for b, p in biased])
        cols = torch.cat([p.bias_ids for _, p in biased])
        bias = torch.zeros(B, V, device=dev)
        bias[rows.to(dev), cols.to(dev)] = torch.cat([p.bias_values for _, p in biased]).to(dev)
        logits = logits + bias
    if allowed is not None:
        logits = logits.masked_fill(~allowed, float("-inf"))

    tokens = logits.argmax(dim=-1)  # [B]; greedy rows are done here
    rows = [b for b, p in enumerate(params) if p.temperature > 0]
    if rows:
        picked = [params[b] for b in rows]
        scaled = logits[rows] / col([p.temperature for p in picked])[:, None]
        if any(p.top_k or p.top_p for p in picked):  # the sort over the vocabulary only when a filter is on
            scaled = top_k_top_p_mask(scaled, torch.tensor([min(p.top_k or V, V) for p in picked], device=dev),
                                      col([p.top_p or 1.0 for p in picked]))
        probs = torch.softmax(scaled, dim=-1)
        # Every row is checked before any draws: a bad row raises here, with no generator advanced, and the
        # engine resamples the others alone (engine.Engine._sample). multinomial would refuse it anyway on CPU.
        if not bool(torch.isfinite(probs).all()):
            raise ValueError("sampling met non-finite probabilities (NaN or infinite logits)")
        drawn = [torch.multinomial(probs[i], 1, generator=generators[b]) for i, b in enumerate(rows)]
        tokens[torch.tensor(rows, device=dev)] = torch.cat(drawn)

    top = [[] for _ in params]
    if logprobs is None:
        return Sampled(tokens.tolist(), [None] * B, top)
    chosen = logprobs.gather(1, tokens[:, None])[:, 0].tolist()
    if k:
        values, ids = logprobs.topk(k, dim=-1)
        for b, p in enumerate(params):
            top[b] = list(zip(ids[b, : p.top_logprobs].tolist(), values[b, : p.top_logprobs].tolist()))
    return Sampled(tokens.tolist(), chosen, top)
