"""Owns the paged KV cache: the per-layer K/V tensors and the free list of their blocks."""
from collections import deque

import torch


class OutOfBlocks(RuntimeError):
    pass


class BlockManager:
    def __init__(self, n_layers: int, num_blocks: int, block_size: int, n_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"the KV cache needs at least one block of at least one token "
                             f"(got num_blocks={num_blocks}, block_size={block_size})")
        self.num_blocks, self.block_size = num_blocks, block_size
        shape = (num_blocks, block_size, n_kv_heads, head_dim)  # [NB, BS, KVH, D]
        self.kv_caches = [(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
                          for _ in range(n_layers)]
        self.free_blocks = deque(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self.free_blocks)

    def blocks_for(self, n_tokens: int) -> int:
        return -(-n_tokens // self.block_size)

    def extra_blocks(self, block_table: list[int], n_tokens: int) -> int:
        """How many more blocks a sequence holding `block_table` needs to cache `n_tokens` tokens."""
        return max(0, self.blocks_for(n_tokens) - len(block_table))

    def grow(self, block_table: list[int], n_tokens: int) -> None:
        need = self.extra_blocks(block_table, n_tokens)
        if need > self.num_free:
            raise OutOfBlocks(f"need {need} KV blocks, {self.num_free} free")
        block_table.extend(self.free_blocks.popleft() for _ in range(need))

    def release(self, block_table: list[int]) -> None:
        self.free_blocks.extend(block_table)
        block_table.clear()
