"""One forward step over a batch of sequences: new tokens and their block tables in, logits out, the paged KV cache
updated. The scheduler has already given every sequence the blocks its tokens need (block_manager.py)."""
from dataclasses import dataclass

import torch

from .layers import AttentionMetadata, CausalLM


@dataclass(eq=False)  # compared and hashed by identity: the block manager keys block tables by sequence
class SeqState:
    """What the model runner needs of a sequence: its tokens and how many of them the KV cache holds. num_cached is
    advanced by the model runner after the forward that wrote those tokens' K/V, and reset by the scheduler when it
    releases the sequence's blocks."""
    tokens: list[int]
    num_cached: int = 0
    # X-LoRA with tgt_non_granular_index: the position whose scalings every later token reuses, and those scalings
    xlora_freeze_at: int | None = None
    xlora_frozen: torch.Tensor | None = None  # [n_layers, A]


class ModelRunner:
    def __init__(self, model: CausalLM, kv_caches: list[tuple[torch.Tensor, torch.Tensor]], device: torch.device,
                 no_kv_cache: bool = False):
        """kv_caches: per layer, K and V [NB, BS, KVH, D]. no_kv_cache is the loader's option, handed on to the
        Runner's scheduler, which acts on it: the forward is the same either way."""
        self.model, self.kv_caches, self.device, self.no_kv_cache = model, kv_caches, device, no_kv_cache
        self.num_blocks, self.block_size = kv_caches[0][0].shape[:2]

    def metadata(self, seqs: list[SeqState], block_tables: list[list[int]]
                 ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """Input ids, positions and attention metadata for every sequence's uncached tokens."""
        BS = self.block_size
        ids, positions, slots, lens, cu = [], [], [], [], [0]
        for s, table in zip(seqs, block_tables):
            new = range(s.num_cached, len(s.tokens))
            ids.extend(s.tokens[s.num_cached:])
            positions.extend(new)
            slots.extend(table[p // BS] * BS + p % BS for p in new)
            lens.append(len(s.tokens))
            cu.append(cu[-1] + len(new))
        width = max(len(t) for t in block_tables)
        tables = [t + [0] * (width - len(t)) for t in block_tables]

        def t(x, dtype):
            return torch.tensor(x, dtype=dtype, device=self.device)
        meta = AttentionMetadata(slot_mapping=t(slots, torch.int64), block_tables=t(tables, torch.int32),
                                 context_lens=t(lens, torch.int32), cu_seqlens_q=t(cu, torch.int32),
                                 max_seqlen_q=max(b - a for a, b in zip(cu, cu[1:])))
        return t(ids, torch.int64), t(positions, torch.int64), meta

    @torch.inference_mode()
    def step(self, seqs: list[SeqState], block_tables: list[list[int]], all_logits: bool = False) -> torch.Tensor:
        """Run every sequence's uncached tokens; logits [B, V] at each last token, or [T, V] for all new tokens.
        block_tables[i]: the blocks of seqs[i], enough for all its tokens."""
        ids, positions, meta = self.metadata(seqs, block_tables)
        if getattr(self.model, "tgt_non_granular_index", None) is None:
            hidden = self.model(ids, positions, meta, self.kv_caches)
        else:
            hidden = self._xlora_non_granular(seqs, ids, positions, meta)
        if not all_logits:
            hidden = hidden[meta.cu_seqlens_q[1:].long() - 1]  # [B, hidden]: the last new token of each sequence
        for s in seqs:
            s.num_cached = len(s.tokens)
        return self.model.logits(hidden)

    def _xlora_non_granular(self, seqs: list[SeqState], ids, positions, meta) -> torch.Tensor:
        """X-LoRA whose scalings stop at completion token tgt_non_granular_index, per sequence: the token at
        position p = prompt_len - 1 + tgt keeps its own scalings and every later token reuses them (tgt=0: the last
        prompt token's). Earlier tokens, also when recomputed after a preemption, get their own."""
        tgt, cu = self.model.tgt_non_granular_index, meta.cu_seqlens_q.tolist()
        src, extra = list(range(ids.shape[0])), []  # token t takes row src[t] of [this step's scalings; extra]
        for s, a, b in zip(seqs, cu, cu[1:]):
            if s.xlora_freeze_at is None:  # the first step of a sequence holds exactly its prompt
                s.xlora_freeze_at = len(s.tokens) - 1 + tgt
            p = s.xlora_freeze_at
            if s.xlora_frozen is not None:
                row = ids.shape[0] + len(extra)
                extra.append(s.xlora_frozen)
            elif s.num_cached <= p < len(s.tokens):
                row = a + p - s.num_cached
            else:
                continue
            for t in range(max(a, a + p + 1 - s.num_cached), b):
                src[t] = row
        frozen = (torch.tensor(src, device=self.device), torch.stack(extra) if extra else None)
        hidden, scalings = self.model(ids, positions, meta, self.kv_caches, frozen=frozen,
                                      return_scalings=True)
        for s, a in zip(seqs, cu):
            at = s.xlora_freeze_at - s.num_cached  # its index among this step's tokens
            if s.xlora_frozen is None and 0 <= at < len(s.tokens) - s.num_cached:
                s.xlora_frozen = scalings[a + at].clone()
        return hidden
