"""Which sequences run in the next step, and the KV blocks they run with: admission by max_seqs and free blocks,
allocation, preemption when blocks run out, release when a sequence finishes.

Running sequences decode one token per step. Waiting ones (new, or preempted and to be recomputed) are admitted in
arrival order while fewer than max_seqs run, the step's prefill stays within its token budget, and their whole
context fits in the free blocks. When a running sequence cannot get a block for its next token, the most recently
admitted one is preempted: its blocks are freed and it waits to be recomputed from its tokens. Every sequence of a
step gets its blocks here, before the model runs; the model runner only reads the block tables.
"""
from collections import deque

from .block_manager import BlockManager
from .model_runner import SeqState


class Scheduler:
    def __init__(self, blocks: BlockManager, max_seqs: int, max_prefill_tokens: int = 4096,
                 no_kv_cache: bool = False):
        """no_kv_cache: release every sequence's blocks before each step, so that the model recomputes its whole
        context every step (the loader's option, for debugging the cache)."""
        self.blocks, self.max_seqs, self.max_prefill_tokens = blocks, max_seqs, max_prefill_tokens
        self.no_kv_cache = no_kv_cache
        self.waiting: deque[SeqState] = deque()
        self.running: list[SeqState] = []
        self.preemptions = 0

    @property
    def capacity(self) -> int:
        """Tokens the KV cache can ever hold for one sequence."""
        return self.blocks.capacity

    def add(self, seq: SeqState) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def block_tables(self, seqs: list[SeqState]) -> list[list[int]]:
        return [self.blocks.table(s) for s in seqs]

    def remove(self, seq: SeqState) -> None:
        self._release(seq)
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)

    def remove_all(self, seqs) -> None:
        """Drop these sequences (an aborted request's) and free their blocks, in one pass over the queues."""
        gone = set(seqs)
        for seq in gone:
            self._release(seq)
        self.running = [s for s in self.running if s not in gone]
        self.waiting = deque(s for s in self.waiting if s not in gone)

    def clear(self) -> None:
        """Drop every sequence and free every block (the engine is failing everything)."""
        for seq in [*self.running, *self.waiting]:
            self._release(seq)
        self.running, self.waiting = [], deque()

    def _release(self, seq: SeqState) -> None:
        self.blocks.release(seq)
        seq.num_cached = 0

    def _preempt(self, seq: SeqState) -> None:
        self.preemptions += 1
        self.running.remove(seq)
        self._release(seq)
        self.waiting.appendleft(seq)

    def schedule(self) -> tuple[list[SeqState], list[SeqState]]:
        """The sequences of the next step, each holding the blocks for all its tokens, and those that can never fit
        the cache (to be finished by the caller)."""
        if self.no_kv_cache:
            for seq in self.running:
                self._release(seq)
        blocks, decodes, too_long, i = self.blocks, [], [], 0
        while i < len(self.running):  # not a for loop: preemption below shortens `running` from the back
            seq = self.running[i]
            i += 1
            need = blocks.blocks_needed(seq, len(seq.tokens))
            # Victims come from the back of `running`, which this loop has not reached yet.
            while need > blocks.num_free and self.running[-1] is not seq:
                self._preempt(self.running[-1])
            if need > blocks.num_free and decodes:  # older sequences hold the rest of the cache: wait for them
                self._preempt(seq)
                continue
            if need > blocks.num_free:  # alone in the cache and still out of room
                too_long.append(seq)
                continue
            if need:
                blocks.grow(seq, len(seq.tokens))
            decodes.append(seq)

        prefills, budget = [], self.max_prefill_tokens
        while self.waiting and len(self.running) < self.max_seqs:
            seq = self.waiting[0]
            new_tokens = len(seq.tokens) - seq.num_cached
            if blocks.blocks_needed(seq, len(seq.tokens)) > blocks.num_free or (prefills and new_tokens > budget):
                break
            self.waiting.popleft()
            self.running.append(seq)
            blocks.grow(seq, len(seq.tokens))
            prefills.append(seq)
            budget -= new_tokens
        return decodes + prefills, too_long
