"""Which sequences run in the next step, how many of their tokens, and the KV blocks they run with: admission by
max_seqs and free blocks, prefix caching, chunked prefill, preemption when blocks run out, release when a sequence
finishes.

A step computes at most max_batched_tokens tokens. Running sequences go first: each decode computes its one new
token; a prompt being prefilled in chunks computes its next chunk, as much of the rest as the budget allows. Waiting
sequences (new, or preempted and to be recomputed) are then admitted in arrival order while fewer than max_seqs run,
budget is left and their blocks fit: a new sequence starts with the longest prefix of its prompt that the cache
already holds (block_manager.py) and computes only the rest, chunked to the budget. A sequence whose next prompt
block is being computed in this very step by the one admitted before it (a choice of the same request, a chat with
the same system prompt) waits one step and then shares it. When a running sequence cannot get a block, the most
recently admitted one is preempted: its blocks are released and it waits to be recomputed from its tokens (its
prefix usually still cached). Every sequence of a step gets its blocks here, before the model runs; the model runner
only reads the block tables. After the step, postprocess advances each sequence (its cached tokens, its sampled
token): the scheduler is the one writer of a sequence's progress.

chunked=False (a model whose step must see a sequence's whole prompt at once: X-LoRA freezing its scalings at a
prompt position) admits whole prompts only, one over the budget alone in its step, and no prefix caching.
"""
from collections import deque
from dataclasses import dataclass, field

from .block_manager import BlockManager
from .sequence import Sequence


@dataclass
class Batch:
    seqs: list[Sequence] = field(default_factory=list)      # decodes first, then prefills
    num_tokens: list[int] = field(default_factory=list)     # tokens each computes in this step
    sampled: list[int] = field(default_factory=list)        # rows that compute their last token: they sample one
    too_long: list[Sequence] = field(default_factory=list)  # can never fit the cache: for the caller to finish

    def add(self, seq: Sequence, n: int) -> None:
        if seq.num_cached + n == len(seq.tokens):  # not a prompt's chunk before its last
            self.sampled.append(len(self.seqs))
        self.seqs.append(seq)
        self.num_tokens.append(n)


class Scheduler:
    def __init__(self, blocks: BlockManager, max_seqs: int, max_batched_tokens: int = 2048,
                 no_kv_cache: bool = False, chunked: bool = True):
        """no_kv_cache: release every sequence's blocks before each step, so that the model recomputes its whole
        context every step (the loader's option, for debugging the cache; no prefix caching then either)."""
        self.blocks, self.max_seqs, self.max_batched_tokens = blocks, max_seqs, max_batched_tokens
        self.no_kv_cache, self.chunked = no_kv_cache, chunked
        if no_kv_cache or not chunked:
            blocks.prefix_caching = False
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.preemptions = 0

    @property
    def capacity(self) -> int:
        """Tokens the KV cache can ever hold for one sequence."""
        return self.blocks.capacity

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def block_tables(self, seqs: list[Sequence]) -> list[list[int]]:
        return [self.blocks.table(s) for s in seqs]

    def remove(self, seq: Sequence) -> None:
        self._release(seq)
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)

    def stats(self) -> dict:
        return {**self.blocks.stats(), "preemptions": self.preemptions, "running": len(self.running),
                "waiting": len(self.waiting)}

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

    def postprocess(self, batch: Batch, tokens: list[int | None]) -> None:
        """After a step: each sequence of the batch has its computed tokens' K/V cached, and each sampled row
        (batch.sampled, in order) gains its token from tokens (None: that row's sampling failed). A sequence that
        finished during the step (its request failed) has been released: it is left as it is."""
        for seq, n in zip(batch.seqs, batch.num_tokens):
            if not seq.finished:
                seq.num_cached += n
        for row, token in zip(batch.sampled, tokens, strict=True):
            seq = batch.seqs[row]
            if token is not None and not seq.finished:
                seq.tokens.append(token)

    def _release(self, seq: Sequence) -> None:
        self.blocks.release(seq)
        seq.num_cached = 0

    def _preempt(self, seq: Sequence) -> None:
        self.preemptions += 1
        self.running.remove(seq)
        self._release(seq)
        self.waiting.appendleft(seq)

    def schedule(self) -> Batch:
        """The next step: its sequences, each holding the blocks for the tokens it computes, and those that can never
        fit the cache."""
        if self.no_kv_cache:
            for seq in self.running:
                self._release(seq)
        batch = Batch()
        budget = self._schedule_running(batch)
        self._admit(batch, budget)
        return batch

    def _schedule_running(self, batch: Batch) -> int:
        """Decodes and the next chunks of prompts being prefilled, in admission order (so that preemption victims,
        taken from the back, are never already in the batch); the budget left."""
        blocks = self.blocks
        for seq in self.running:
            blocks.commit(seq)  # name the blocks the last step filled
        # decodes always run, one token each: the chunks share what they leave
        budget = self.max_batched_tokens - sum(len(s.tokens) - s.num_cached == 1 for s in self.running)
        i = 0
        while i < len(self.running):  # not a for loop: preemption below shortens `running` from the back
            seq = self.running[i]
            i += 1
            n = len(seq.tokens) - seq.num_cached
            if n > 1 and self.chunked:
                n = min(n, budget)
                if n <= 0:
                    continue  # its next chunk waits for a step with budget left
            need = blocks.blocks_needed(seq, seq.num_cached + n)
            while need > blocks.num_free and self.running[-1] is not seq:
                self._preempt(self.running[-1])
            if need > blocks.num_free and batch.seqs:  # older sequences hold the rest of the cache: wait for them
                self._preempt(seq)
                i -= 1
                continue
            if need > blocks.num_free:  # alone in the cache and still out of room
                batch.too_long.append(seq)
                continue
            blocks.grow(seq, seq.num_cached + n)
            batch.add(seq, n)
            if n > 1 or not self.chunked:
                budget -= n
        return budget

    def _admit(self, batch: Batch, budget: int) -> None:
        blocks, pending = self.blocks, set()  # pending: names of the blocks this step fills
        admitted = False
        while self.waiting and len(self.running) < self.max_seqs and (budget > 0 or not self.chunked):
            seq = self.waiting[0]
            cached, names, next_name = blocks.prefix(seq.tokens)
            if next_name is not None and next_name in pending:
                break  # the sequence admitted before computes this block now: share it from the next step
            rest = len(seq.tokens) - len(cached) * blocks.block_size
            n = min(rest, budget) if self.chunked else rest
            if not self.chunked and admitted and rest > budget:
                break
            fresh = sum(1 for b in cached if blocks.refs[b] == 0)  # cached blocks that now leave the free list
            if blocks.blocks_for(len(cached) * blocks.block_size + n) - len(cached) > blocks.num_free - fresh:
                break
            self.waiting.popleft()
            self.running.append(seq)
            seq.num_cached = blocks.take_prefix(seq, cached, names)
            blocks.grow(seq, seq.num_cached + n)
            pending.update(blocks.names_through(seq, seq.num_cached + n))
            batch.add(seq, n)
            budget -= n
            admitted = True
