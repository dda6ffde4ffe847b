"""The scheduler alone, with sequences that are only token lists and no model: admission, the prefill budget, block
growth, preemption, too-long sequences and no_kv_cache."""
from mistralrs.engine.block_manager import BlockManager
from mistralrs.engine.model_runner import SeqState
from mistralrs.engine.scheduler import Scheduler


def seq(n_tokens: int) -> SeqState:
    return SeqState(list(range(1, n_tokens + 1)))


def scheduler(num_blocks: int, block_size: int, **kw) -> Scheduler:
    return Scheduler(BlockManager(num_blocks, block_size), **{"max_seqs": 8, **kw})


def run(sched: Scheduler) -> list[SeqState]:
    """One engine step without a model: schedule, then each scheduled sequence has its tokens cached and one more."""
    batch, too_long = sched.schedule()
    assert not too_long
    for s in batch:
        assert len(sched.blocks.table(s)) == sched.blocks.blocks_for(len(s.tokens))  # room for every token
        s.num_cached = len(s.tokens)
        s.tokens.append(0)
    return batch


def test_admission_by_max_seqs():
    sched = scheduler(64, 4, max_seqs=2)
    a, b, c = seq(3), seq(3), seq(3)
    for s in (a, b, c):
        sched.add(s)
    assert run(sched) == [a, b] and list(sched.waiting) == [c]
    assert run(sched) == [a, b]  # still full
    sched.remove(a)
    assert run(sched) == [b, c]  # decodes first, then the admitted prefill


def test_admission_by_free_blocks_in_arrival_order():
    sched = scheduler(4, 4)
    a, b, c = seq(10), seq(8), seq(1)  # 3, 2 and 1 blocks
    for s in (a, b, c):
        sched.add(s)
    assert run(sched) == [a]
    assert list(sched.waiting) == [b, c]  # c would fit, but does not overtake b
    assert sched.blocks.num_free == 1
    sched.remove(a)
    assert run(sched) == [b, c]


def test_prefill_token_budget():
    sched = scheduler(64, 4, max_prefill_tokens=10)
    a, b, c = seq(6), seq(6), seq(30)
    for s in (a, b):
        sched.add(s)
    assert run(sched) == [a]  # 6 + 6 > 10
    assert run(sched) == [a, b]  # a decodes one token, b prefills its 6
    sched.add(c)
    assert run(sched) == [a, b, c]  # over budget, but a step's first prefill is always admitted


def test_decode_grows_the_block_table_across_a_block_boundary():
    sched = scheduler(8, 4)
    a = seq(4)
    sched.add(a)
    run(sched)  # the prompt fills block 1 exactly
    assert len(sched.blocks.table(a)) == 1
    first = sched.blocks.table(a)[0]
    run(sched)  # token 5 starts block 2
    assert len(sched.blocks.table(a)) == 2 and sched.blocks.table(a)[0] == first
    for _ in range(3):  # tokens 6..8 stay in block 2
        run(sched)
        assert len(sched.blocks.table(a)) == 2
    run(sched)
    assert len(sched.blocks.table(a)) == 3
    assert sched.block_tables([a]) == [sched.blocks.table(a)]


def test_preemption_takes_the_most_recently_admitted_first():
    sched = scheduler(6, 2)
    a, b, c = seq(2), seq(2), seq(2)
    for s in (a, b, c):
        sched.add(s)
    assert run(sched) == [a, b, c]  # 3 blocks held, 3 free
    assert run(sched) == [a, b, c]  # 3 tokens each: a second block each, 0 free
    assert run(sched) == [a, b, c]  # 4 tokens each: no new block
    # 5 tokens each: a needs a block, c (admitted last) gives up its 2
    assert run(sched) == [a, b]
    assert list(sched.waiting) == [c] and sched.preemptions == 1
    assert sched.blocks.table(c) == [] and c.num_cached == 0
    assert sched.blocks.num_free == 0
    sched.remove(a)
    assert run(sched) == [b, c]  # back in, recomputing its whole context
    assert c.num_cached == 5


def test_a_sequence_that_cannot_grow_behind_older_ones_waits():
    sched = scheduler(3, 2)
    a, b = seq(2), seq(2)
    for s in (a, b):
        sched.add(s)
    run(sched)
    # 3 tokens each: a takes the last free block; b is the most recent itself, so it is preempted, not a
    assert run(sched) == [a]
    assert list(sched.waiting) == [b] and sched.preemptions == 1


def test_an_over_long_sequence_alone_is_reported_too_long():
    sched = scheduler(2, 2)
    a = seq(4)
    sched.add(a)
    run(sched)  # holds the whole cache
    batch, too_long = sched.schedule()  # its 5th token can never fit
    assert batch == [] and too_long == [a]
    assert sched.preemptions == 0 and sched.running == [a] and len(sched.blocks.table(a)) == 2
    sched.remove(a)  # the engine finishes it ("length")
    assert sched.blocks.num_free == 2 and not sched.has_work()


def test_remove_releases_running_and_waiting_sequences():
    sched = scheduler(4, 4, max_seqs=1)
    a, b = seq(5), seq(2)
    sched.add(a)
    sched.add(b)
    run(sched)
    sched.remove(b)  # still waiting
    sched.remove(a)
    assert not sched.has_work() and sched.blocks.num_free == 4 and a.num_cached == 0


def test_no_kv_cache_recomputes_the_whole_context_every_step():
    sched = scheduler(8, 4, no_kv_cache=True)
    a, b = seq(3), seq(6)
    for s in (a, b):
        sched.add(s)
    run(sched)
    for _ in range(4):
        batch, _ = sched.schedule()
        assert batch == [a, b]
        assert [s.num_cached for s in batch] == [0, 0]  # the model runs every token again
        held = [len(sched.blocks.table(s)) for s in batch]
        assert held == [sched.blocks.blocks_for(len(s.tokens)) for s in batch]
        assert sched.blocks.num_free == 8 - sum(held)
        for s in batch:
            s.num_cached = len(s.tokens)
            s.tokens.append(0)
