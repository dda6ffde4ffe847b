"""Which sequences run in the next step: admission by max_seqs and free KV blocks, preemption when blocks run out.

Running sequences decode one token per step. Waiting ones (new, or preempted and to be recomputed) are admitted in
arrival order while fewer than max_seqs run, the step's prefill stays within its token budget, and their whole
context fits in the free blocks. When a running sequence cannot get a block for its next token, the most recently
admitted one is preempted: its blocks are freed and it waits to be recomputed from its tokens.
"""
from collections import deque

from .model_runner import ModelRunner
from .sequence import Sequence


class Scheduler:
    def __init__(self, model_runner: ModelRunner, max_seqs: int, max_prefill_tokens: int = 4096):
        self.model_runner, self.max_seqs, self.max_prefill_tokens = model_runner, max_seqs, max_prefill_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def remove(self, seq: Sequence) -> None:
        self.model_runner.release(seq)
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)

    def _preempt(self, seq: Sequence) -> None:
        self.preemptions += 1
        self.running.remove(seq)
        self.model_runner.release(seq)
        self.waiting.appendleft(seq)

    def schedule(self) -> tuple[list[Sequence], list[Sequence]]:
        """The sequences of the next step, and those that can never fit the cache (to be finished by the caller)."""
        free = self.model_runner.blocks.num_free
        decodes, too_long = [], []
        for seq in list(self.running):
            if seq not in self.running:
                continue  # preempted below to make room for an older sequence
            need = self.model_runner.blocks_needed(seq)
            # Victims come from the back of `running`, which this loop has not reached yet.
            while need > free and self.running[-1] is not seq:
                victim = self.running[-1]
                free += len(victim.block_table)
                self._preempt(victim)
            if need > free and decodes:  # older sequences hold the rest of the cache: wait for them
                free += len(seq.block_table)
                self._preempt(seq)
                continue
            if need > free:  # alone in the cache and still out of room
                too_long.append(seq)
                continue
            free -= need
            decodes.append(seq)

        prefills, budget = [], self.max_prefill_tokens
        while self.waiting and len(self.running) < self.max_seqs:
            seq = self.waiting[0]
            need = self.model_runner.blocks_needed(seq)
            new_tokens = len(seq.tokens) - seq.num_cached
            if need > free or (prefills and new_tokens > budget):
                break
            self.waiting.popleft()
            self.running.append(seq)
            prefills.append(seq)
            free -= need
            budget -= new_tokens
        return decodes + prefills, too_long
