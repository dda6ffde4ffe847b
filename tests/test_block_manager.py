"""The block manager alone: which blocks each sequence holds, the free list, the counts, and prefix caching's names,
reference counts and eviction order. No model, no tensors."""
import pytest

from mistralrs.engine.block_manager import BlockManager, OutOfBlocks, block_hash
from mistralrs.engine.sequence import Sequence


def Seq(tokens=(), num_cached=0) -> Sequence:  # keyed by identity; prefix caching reads tokens and num_cached
    return Sequence(list(tokens), num_cached)


def test_counts():
    bm = BlockManager(num_blocks=5, block_size=4)
    assert (bm.num_free, bm.capacity) == (5, 20)
    assert [bm.blocks_for(n) for n in (0, 1, 4, 5, 8, 9)] == [0, 1, 1, 2, 2, 3]
    a = Seq()
    assert bm.table(a) == [] and bm.blocks_needed(a, 9) == 3


def test_grow_gives_each_sequence_its_own_blocks_in_order():
    bm = BlockManager(num_blocks=6, block_size=4)
    a, b = Seq(), Seq()
    bm.grow(a, 5)  # 2 blocks
    bm.grow(b, 1)
    bm.grow(a, 9)  # one more block for tokens 8..
    assert len(bm.table(a)) == 3 and len(bm.table(b)) == 1
    assert not set(bm.table(a)) & set(bm.table(b))
    assert bm.num_free == 2
    assert bm.blocks_needed(a, 12) == 0 and bm.blocks_needed(a, 13) == 1


def test_grow_to_fewer_tokens_changes_nothing():
    bm = BlockManager(num_blocks=4, block_size=4)
    a = Seq()
    bm.grow(a, 8)
    table = list(bm.table(a))
    bm.grow(a, 3)
    bm.grow(a, 0)
    assert bm.table(a) == table and bm.num_free == 2


def test_out_of_blocks_takes_nothing():
    bm = BlockManager(num_blocks=3, block_size=2)
    a, b = Seq(), Seq()
    bm.grow(a, 4)
    with pytest.raises(OutOfBlocks, match="need 2 KV blocks, 1 free"):
        bm.grow(b, 3)
    assert bm.table(b) == [] and bm.num_free == 1
    bm.grow(b, 2)  # the last block still fits
    assert bm.num_free == 0


def test_release_returns_the_blocks_for_reuse():
    bm = BlockManager(num_blocks=3, block_size=2)
    a, b = Seq(), Seq()
    bm.grow(a, 6)
    held = set(bm.table(a))
    bm.release(a)
    assert bm.table(a) == [] and bm.num_free == 3
    bm.grow(b, 6)
    assert set(bm.table(b)) == held == {0, 1, 2}
    bm.release(a)  # releasing a sequence that holds nothing is harmless
    assert bm.num_free == 0


@pytest.mark.parametrize("num_blocks, block_size", [(0, 16), (4, 0), (-1, 4)])
def test_bad_sizes(num_blocks, block_size):
    with pytest.raises(ValueError, match="at least one block"):
        BlockManager(num_blocks, block_size)


def computed(bm: BlockManager, tokens: list[int]) -> Sequence:
    """A sequence admitted with its cached prefix, then given blocks for all its tokens, all computed."""
    seq = Seq(tokens)
    blocks, names, _ = bm.prefix(tokens)
    seq.num_cached = bm.take_prefix(seq, blocks, names)
    bm.grow(seq, len(tokens))
    seq.num_cached = len(tokens)
    return seq


def test_block_names_chain_their_predecessors():
    first = block_hash(0, [1, 2, 3, 4])
    assert block_hash(first, [5, 6, 7, 8]) != block_hash(0, [5, 6, 7, 8])  # same tokens, other prefix
    assert block_hash(first, [5, 6, 7, 8]) == block_hash(block_hash(0, [1, 2, 3, 4]), [5, 6, 7, 8])


def test_prefix_is_shared_and_reference_counted():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = computed(bm, list(range(10)))  # 2 full blocks + 2 tokens
    bm.commit(a)
    assert len(bm.cached) == 2
    b = computed(bm, list(range(8)) + [50, 51, 52, 53, 54])
    assert bm.table(b)[:2] == bm.table(a)[:2] and bm.table(b)[2] != bm.table(a)[2]
    assert [bm.refs[x] for x in bm.table(a)] == [2, 2, 1]
    assert bm.hit_tokens == 8 and bm.query_tokens == 10 + 13
    bm.release(a)
    assert [bm.refs[x] for x in bm.table(b)] == [1, 1, 1, 1]
    bm.release(b)
    assert bm.num_free == 8 and all(r == 0 for r in bm.refs)  # no leaks
    assert len(bm.cached) == 3  # b's third block (tokens 8..11) is named too, once computed


def test_a_whole_cached_prompt_still_computes_its_last_token():
    bm = BlockManager(num_blocks=8, block_size=4)
    bm.release(computed(bm, list(range(8))))
    blocks, _, _ = bm.prefix(list(range(8)))
    assert len(blocks) == 1  # the second block holds the last token, whose logits are needed


def test_eviction_takes_nameless_blocks_first_then_the_least_recently_released():
    bm = BlockManager(num_blocks=4, block_size=2)
    a = computed(bm, [1, 2, 3, 4])  # 2 named blocks once released
    bm.release(a)
    assert bm.num_free == 4 and len(bm.cached) == 2
    c = Seq()
    bm.grow(c, 4)  # 2 blocks: the 2 never used, not a's
    assert len(bm.cached) == 2 and bm.evictions == 0
    bm.grow(c, 6)  # a's tail block goes first (released first: a sequence's blocks are released last to first)
    assert bm.evictions == 1 and len(bm.prefix([1, 2, 3, 4, 9])[0]) == 1
    bm.grow(c, 8)
    assert bm.evictions == 2 and bm.cached == {}


def test_prefix_caching_off_names_nothing():
    bm = BlockManager(num_blocks=4, block_size=2, prefix_caching=False)
    bm.release(computed(bm, [1, 2, 3, 4, 5]))
    assert bm.cached == {} and bm.prefix([1, 2, 3, 4, 5]) == ([], [], None)
