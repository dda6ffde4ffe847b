"""The block manager alone: which blocks each sequence holds, the free list, the counts. No model, no tensors."""
import pytest

from mistralrs.engine.block_manager import BlockManager, OutOfBlocks


class Seq:  # the block manager keys tables by object identity; it reads nothing of the sequence
    pass


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
