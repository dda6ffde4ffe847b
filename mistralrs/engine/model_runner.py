"""One forward step over a batch of sequences: new tokens and their block tables in, logits out, the paged KV cache
updated. The scheduler has already given every sequence the blocks its tokens need (block_manager.py), and advances
num_cached after the step (Scheduler.postprocess): the model runner reads sequences and writes none of their fields.

Tensor parallel, rank 0's model runner broadcasts each step's ints (metadata_lists) before its forward, and the
other ranks run the same forward on them (tensor_parallel/group.py has the wire format, workers.py their loop)."""
from array import array
from itertools import accumulate

import torch

from ..layers import AttentionMetadata, CausalLM
from .sequence import Sequence

INT_TYPES = {"q": torch.int64, "i": torch.int32}  # array typecodes: C long long, C int


class ModelRunner:
    def __init__(self, model: CausalLM, kv_caches: list[tuple[torch.Tensor, torch.Tensor]], device: torch.device,
                 no_kv_cache: bool = False, tp=None, per_sequence_state: bool = False):
        """kv_caches: per layer, K and V [NB, BS, KVH, D]. no_kv_cache is the loader's option, handed on to the
        Runner's scheduler, which acts on it: the forward is the same either way. tp: this process's rank of a
        tensor-parallel model (tensor_parallel.group.TensorParallel), None for a model on one device.
        per_sequence_state: the model keeps state per sequence (X-LoRA, in seq.model_state), so its step() takes
        the batch's sequences too; any other model is a function of its inputs."""
        self.model, self.kv_caches, self.device, self.no_kv_cache, self.tp = model, kv_caches, device, no_kv_cache, tp
        self.num_blocks, self.block_size = kv_caches[0][0].shape[:2]
        self.weight_bytes: list[int] | None = None  # resident weight bytes of each rank, set by the loader
        # (CausalLM has no step(): layers.py is shared by every architecture and has no reason to know sequences.)
        self.forward = model.step if per_sequence_state else (
            lambda ids, positions, meta, kv_caches, seqs: model(ids, positions, meta, kv_caches))

    def metadata_lists(self, seqs: list[Sequence], block_tables: list[list[int]], lens: list[int]
                       ) -> tuple[list[int], ...]:
        """The ints of a step, in tensor_parallel.group.STEP_LISTS' order, for tokens num_cached .. lens[i] - 1 of
        each sequence (all its uncached tokens, or a chunk of a prompt): ids, positions, cache slots, the block
        tables [B, width] row-major (each padded with block 0, never read: past context_lens), the context lengths
        and the offsets of each sequence's tokens. On the decode hot path (one new token per sequence) each list is
        one pass over the sequences."""
        BS = self.block_size
        new = [n - s.num_cached for s, n in zip(seqs, lens)]
        if new.count(1) == len(new):  # decode (or chunks of one token)
            ids = [s.tokens[n - 1] for s, n in zip(seqs, lens)]
            positions = [n - 1 for n in lens]
            slots = [table[p // BS] * BS + p % BS for table, p in zip(block_tables, positions)]
            cu = list(range(len(seqs) + 1))
        else:
            ids = [t for s, n in zip(seqs, lens) for t in s.tokens[s.num_cached:n]]
            positions = [p for s, n in zip(seqs, lens) for p in range(s.num_cached, n)]
            slots = [table[p // BS] * BS + p % BS
                     for s, n, table in zip(seqs, lens, block_tables) for p in range(s.num_cached, n)]
            cu = list(accumulate(new, initial=0))
        width = max(map(len, block_tables))
        tables = []
        for table in block_tables:
            tables += table
            tables += [0] * (width - len(table))
        return ids, positions, slots, tables, lens, cu

    def metadata(self, seqs: list[Sequence], block_tables: list[list[int]], lens: list[int]
                 ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """Input ids, positions and attention metadata of the step metadata_lists describes."""
        ids, positions, slots, tables, lens, cu = self.metadata_lists(seqs, block_tables, lens)
        longest = 1 if len(ids) == len(lens) else max(b - a for a, b in zip(cu, cu[1:]))  # T == B: one token each
        meta = AttentionMetadata(slot_mapping=self._ints(slots, "q"),
                                 block_tables=self._ints(tables, "i").view(len(lens), -1),
                                 context_lens=self._ints(lens, "i"), cu_seqlens_q=self._ints(cu, "i"),
                                 max_seqlen_q=longest)
        return self._ints(ids, "q"), self._ints(positions, "q"), meta

    def _ints(self, values: list[int], typecode: str) -> torch.Tensor:
        """A 1-D int64 ("q") or int32 ("i") tensor of a non-empty list. torch.frombuffer over an array.array costs
        about a third of torch.tensor(list), which parses the list element by element; six of these run per step."""
        x = torch.frombuffer(array(typecode, values), dtype=INT_TYPES[typecode])
        return x if self.device.type == "cpu" else x.to(self.device)

    @torch.inference_mode()
    def step(self, seqs: list[Sequence], block_tables: list[list[int]], num_tokens: list[int] | None = None,
             all_logits: bool = False) -> torch.Tensor:
        """Run the next num_tokens[i] uncached tokens of each sequence (default: all); logits [B, V] at each one's
        last computed token, or [T, V] for all of them. block_tables[i]: the blocks of seqs[i], enough for them."""
        lens = ([len(s.tokens) for s in seqs] if num_tokens is None
                else [s.num_cached + n for s, n in zip(seqs, num_tokens)])
        if self.tp is None:
            ids, positions, meta = self.metadata(seqs, block_tables, lens)
        else:
            self.tp.check()
            ids, positions, meta = self.tp.send_step(self.metadata_lists(seqs, block_tables, lens), all_logits)
        return self.run(ids, positions, meta, all_logits, seqs)

    def run(self, ids, positions, meta: AttentionMetadata, all_logits: bool, seqs=None) -> torch.Tensor | None:
        """The forward of a step's inputs: logits of each sequence's last token, or of every token (None on a
        tensor-parallel rank > 0, whose logits rank 0 gathers)."""
        hidden = self.forward(ids, positions, meta, self.kv_caches, seqs)
        if not all_logits and not meta.is_decode:  # in a decode step every token is its sequence's last already
            hidden = hidden[meta.cu_seqlens_q[1:].long() - 1]  # [B, hidden]: the last new token of each sequence
        return self.model.logits(hidden)

    def close(self) -> None:
        """Rank 0 of a tensor-parallel model: end the other ranks and the process group. Idempotent."""
        if self.tp is not None:
            self.tp.close()
