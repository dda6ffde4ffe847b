"""Which blocks of the paged KV cache each sequence holds, which hold a known prefix (prefix caching), and the free
list. The scheduler is its only writer (it admits, grows, preempts and finishes sequences); the model runner reads a
sequence's block table to build the attention metadata. The K/V tensors the block ids index are the model runner's.

Prefix caching (vLLM's automatic prefix caching, block by block): a full block whose K/V are computed is named by
the hash of its tokens chained with its predecessor's hash, so equal names mean equal token prefixes and equal K/V.
Blocks are reference-counted: sequences with a common prefix share its blocks. A released block keeps its name and
stays in the free list, reusable by the next sequence with that prefix, until its memory is needed: free blocks are
taken nameless first, then least recently released first (a sequence's blocks are released last block first, so its
prefix outlives its tail).
"""
from array import array
from collections import OrderedDict

import xxhash


class OutOfBlocks(RuntimeError):
    pass


def block_hash(parent: int, tokens: list[int]) -> int:
    """The name of a full block: xxh3-64 of its predecessor's name and its token ids."""
    return xxhash.xxh3_64_intdigest(array("Q", [parent, *tokens]).tobytes())  # token ids are >= 0


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"the KV cache needs at least one block of at least one token "
                             f"(got num_blocks={num_blocks}, block_size={block_size})")
        self.num_blocks, self.block_size, self.prefix_caching = num_blocks, block_size, prefix_caching
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # refcount 0, taken front first
        self.refs = [0] * num_blocks
        self.names: list[int | None] = [None] * num_blocks  # each block's prefix name, once it is full and computed
        self.cached: dict[int, int] = {}  # prefix name -> the block holding its K/V
        self.tables: dict[object, list[int]] = {}  # sequence -> its blocks, in token order
        self.chains: dict[object, list[int]] = {}  # sequence -> the names of its first blocks (computed, full)
        self.hit_tokens = self.query_tokens = self.evictions = 0

    @property
    def num_free(self) -> int:
        return len(self.free)

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
            self.tables.setdefault(seq, []).extend(self._take() for _ in range(need))

    def _take(self) -> int:
        block, _ = self.free.popitem(last=False)
        name = self.names[block]
        if name is not None:  # the least recently used cached prefix block: its K/V are about to be overwritten
            self.names[block] = None
            del self.cached[name]
            self.evictions += 1
        self.refs[block] = 1
        return block

    def release(self, seq) -> None:
        """Drop seq's blocks (named ones stay cached until their memory is needed). seq.num_cached still counts the
        tokens whose K/V its blocks hold: their full blocks are named first."""
        self.commit(seq)
        self.chains.pop(seq, None)
        for block in reversed(self.tables.pop(seq, ())):
            self.refs[block] -= 1
            if self.refs[block] == 0:
                self.free[block] = None  # the back: reused last
                if self.names[block] is None:
                    self.free.move_to_end(block, last=False)  # nameless: nothing to keep, reused first

    # ---- prefix caching ----

    def prefix(self, tokens: list[int]) -> tuple[list[int], list[int], int | None]:
        """(blocks, names) of the longest cached prefix of tokens in whole blocks, leaving at least the last token to
        compute (its logits are needed), and the name of the next full block (None: no other full block)."""
        if not self.prefix_caching:
            return [], [], None
        BS, blocks, names, name = self.block_size, [], [], 0
        for i in range((len(tokens) - 1) // BS):
            name = block_hash(name, tokens[i * BS:(i + 1) * BS])
            block = self.cached.get(name)
            if block is None:
                return blocks, names, name
            blocks.append(block)
            names.append(name)
        return blocks, names, None

    def names_through(self, seq, n_tokens: int) -> list[int]:
        """The names seq's full blocks past its committed ones will have once its first n_tokens are computed."""
        if not self.prefix_caching:
            return []
        chain, BS, out = self.chains.get(seq, []), self.block_size, []
        name = chain[-1] if chain else 0
        for i in range(len(chain), n_tokens // BS):
            name = block_hash(name, seq.tokens[i * BS:(i + 1) * BS])
            out.append(name)
        return out

    def take_prefix(self, seq, blocks: list[int], names: list[int]) -> int:
        """Start seq's table with the cached blocks of prefix(); the number of tokens whose K/V they hold."""
        for block in blocks:
            if self.refs[block] == 0:
                del self.free[block]
            self.refs[block] += 1
        self.tables[seq] = list(blocks)
        self.chains[seq] = list(names)
        self.hit_tokens += len(blocks) * self.block_size
        self.query_tokens += len(seq.tokens)
        return len(blocks) * self.block_size

    def commit(self, seq) -> None:
        """Name seq's full blocks whose K/V are computed (its first seq.num_cached tokens), so that later sequences
        can share them. A block whose name another block already has stays nameless (a duplicate)."""
        if not self.prefix_caching:
            return
        chain, table, BS = self.chains.setdefault(seq, []), self.tables.get(seq, []), self.block_size
        for i in range(len(chain), min(seq.num_cached // BS, len(table))):
            name = block_hash(chain[-1] if chain else 0, seq.tokens[i * BS:(i + 1) * BS])
            chain.append(name)
            if name not in self.cached:
                self.cached[name] = table[i]
                self.names[table[i]] = name

    def stats(self) -> dict:
        return {"prefix_cache_hit_tokens": self.hit_tokens, "prefix_cache_query_tokens": self.query_tokens,
                "prefix_cache_hit_rate": self.hit_tokens / self.query_tokens if self.query_tokens else 0.0,
                "prefix_cache_evictions": self.evictions, "prefix_cached_blocks": len(self.cached),
                "free_blocks": self.num_free, "num_blocks": self.num_blocks}
