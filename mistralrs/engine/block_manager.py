"""Which blocks of the paged KV cache each sequence holds, and the free list. The scheduler is its only writer (it
admits, grows, preempts and finishes sequences); the model runner reads a sequence's block table to build the
attention metadata. The K/V tensors the block ids index are the model runner's."""
from collections import deque


class OutOfBlocks(RuntimeError):
    pass


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"the KV cache needs at least one block of at least one token "
                             f"(got num_blocks={num_blocks}, block_size={block_size})")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.free_blocks = deque(range(num_blocks))
        self.tables: dict[object, list[int]] = {}  # sequence -> its blocks, in token order

    @property
    def num_free(self) -> int:
        return len(self.free_blocks)

    @property
    def capacity(self) -> int:
        """Tokens the whole cache holds: the most one sequence can ever have cached."""
        return self.num_blocks * self.block_size

    def blocks_for(self, n_tokens: int) -> int:
        return -(-n_tokens // self.block_size)

    def table(self, seq) -> list[int]:
        """seq's blocks (read only; empty when it holds none)."""
        return self.tables.get(seq, [])

    def blocks_needed(self, seq, n_tokens: int) -> int:
        """How many more blocks seq needs to cache n_tokens tokens."""
        return max(0, self.blocks_for(n_tokens) - len(self.table(seq)))

    def grow(self, seq, n_tokens: int) -> None:
        """Give seq the blocks it needs for n_tokens tokens; all of them, or none and OutOfBlocks."""
        need = self.blocks_needed(seq, n_tokens)
        if need > self.num_free:
            raise OutOfBlocks(f"need {need} KV blocks, {self.num_free} free")
        if need:
            self.tables.setdefault(seq, []).extend(self.free_blocks.popleft() for _ in range(need))

    def release(self, seq) -> None:
        self.free_blocks.extend(self.tables.pop(seq, ()))
