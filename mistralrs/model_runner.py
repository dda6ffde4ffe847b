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
    model_state: object = None  # the model's own per-sequence state (X-LoRA: frozen scalings); only it reads this


class ModelRunner:
    def __init__(self, model: CausalLM, kv_caches: list[tuple[torch.Tensor, torch.Tensor]], device: torch.device,
                 no_kv_cache: bool = False):
        """kv_caches: per layer, K and V [NB, BS, KVH, D]. no_kv_cache is the loader's option, handed on to the
        Runner's scheduler, which acts on it: the forward is the same either way."""
        self.model, self.kv_caches, self.device, self.no_kv_cache = model, kv_caches, device, no_kv_cache
        self.num_blocks, self.block_size = kv_caches[0][0].shape[:2]
        # A model that keeps state per sequence (X-LoRA, in seq.model_state) has a step() that takes the batch's
        # sequences too; a CausalLM is a function of its inputs. (CausalLM itself has no step(): layers.py is shared
        # by every architecture and has no reason to know about sequences.)
        self.forward = model.step if hasattr(model, "step") else (
            lambda ids, positions, meta, kv_caches, seqs: model(ids, positions, meta, kv_caches))

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
        hidden = self.forward(ids, positions, meta, self.kv_caches, seqs)
        if not all_logits:
            hidden = hidden[meta.cu_seqlens_q[1:].long() - 1]  # [B, hidden]: the last new token of each sequence
        for s in seqs:
            s.num_cached = len(s.tokens)
        return self.model.logits(hidden)
