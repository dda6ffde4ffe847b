"""The scheduler alone, with sequences that are only token lists and no model: admission, the step's token budget and
chunked prefill, block growth, preemption, too-long sequences, no_kv_cache, prefix caching's admission, and
postprocess, the one writer of a sequence's progress after a step."""
import pytest

from mistralrs.engine.block_manager import BlockManager
from mistralrs.engine.scheduler import Scheduler
from mistralrs.engine.sequence import Sequence


def seq(n_tokens: int) -> Sequence:
    return Sequence(list(range(1, n_tokens + 1)))


def scheduler(num_blocks: int, block_size: int, prefix_caching: bool = False, **kw) -> Scheduler:
    return Scheduler(BlockManager(num_blocks, block_size, prefix_caching), **{"max_seqs": 8, **kw})


def run(sched: Scheduler) -> list[Sequence]:
    """One engine step without a model: schedule, then each scheduled sequence has its step's tokens cached, and
    one more token once its whole prompt is."""
    step = sched.schedule()
    assert not step.too_long
    for s, n in zip(step.seqs, step.num_tokens):
        assert len(sched.blocks.table(s)) == sched.blocks.blocks_for(s.num_cached + n)  # room for its tokens
    sched.postprocess(step, [0] * len(step.sampled))
    return step.seqs


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


def test_whole_prompt_token_budget():
    """chunked=False (X-LoRA freezing its scalings): prompts are prefilled whole, one over the budget alone."""
    sched = scheduler(64, 4, max_batched_tokens=10, chunked=False)
    a, b, c = seq(6), seq(6), seq(30)
    for s in (a, b):
        sched.add(s)
    assert run(sched) == [a]  # 6 + 6 > 10
    assert run(sched) == [a, b]  # a decodes one token, b prefills its 6
    sched.add(c)
    assert run(sched) == [a, b, c] and c.num_cached == 30  # over budget, but a step's first prefill is admitted


def test_chunked_prefill_keeps_decodes_running():
    """A long prompt is prefilled budget-sized chunk by chunk; the decodes run in every step; a step never computes
    more than max_batched_tokens tokens."""
    sched = scheduler(64, 4, max_batched_tokens=10)
    a, b, long = seq(3), seq(3), seq(40)
    for s in (a, b):
        sched.add(s)
    run(sched)
    sched.add(long)
    chunks = []
    while len(long.tokens) == 40:
        step = sched.schedule()
        assert step.seqs[:2] == [a, b] and sum(step.num_tokens) <= 10
        chunks.append(dict(zip(step.seqs, step.num_tokens)).get(long, 0))
        sched.postprocess(step, [0] * len(step.sampled))
    assert chunks == [8, 8, 8, 8, 8] and long.num_cached == 40


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
    step = sched.schedule()  # its 5th token can never fit
    assert step.seqs == [] and step.too_long == [a]
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
        step = sched.schedule()
        batch = step.seqs
        assert batch == [a, b] and step.sampled == [0, 1]
        assert [s.num_cached for s in batch] == [0, 0]  # the model runs every token again
        held = [len(sched.blocks.table(s)) for s in batch]
        assert held == [sched.blocks.blocks_for(len(s.tokens)) for s in batch]
        assert sched.blocks.num_free == 8 - sum(held)
        sched.postprocess(step, [0, 0])


def test_prefix_caching_admits_the_cached_prefix():
    """A second sequence with the same first 8 tokens starts with their 2 blocks and computes the rest; one with the
    same prompt waits a step if the first computes those blocks in the same step, then shares them."""
    sched = scheduler(16, 4, prefix_caching=True)
    a = Sequence(list(range(1, 11)))  # 10 tokens: 2 full blocks + 2
    sched.add(a)
    run(sched)
    b = Sequence(list(range(1, 9)) + [99, 98, 97])  # shares a's 2 full blocks
    sched.add(b)
    step = sched.schedule()
    assert step.seqs == [a, b] and step.num_tokens == [1, 3] and b.num_cached == 8
    assert sched.blocks.table(b)[:2] == sched.blocks.table(a)[:2]
    assert sched.blocks.refs[sched.blocks.table(a)[0]] == 2


def test_prefix_sharing_waits_for_the_block_being_computed():
    sched = scheduler(16, 4, prefix_caching=True)
    a, b = Sequence(list(range(1, 11))), Sequence(list(range(1, 11)))  # choices of one request
    sched.add(a)
    sched.add(b)
    assert run(sched) == [a]  # b's first block is being computed by a: b waits
    step = sched.schedule()
    assert step.seqs == [a, b] and step.num_tokens == [1, 2] and b.num_cached == 8


def test_postprocess_advances_what_the_step_computed_and_appends_the_sampled_tokens():
    """A prompt's chunk before its last caches its tokens and samples nothing; its last chunk and a decode each
    gain their sampled token."""
    sched = scheduler(64, 4, max_batched_tokens=10)
    a, long = seq(3), seq(12)
    sched.add(a)
    run(sched)  # a: 3 cached, 4 tokens
    sched.add(long)
    step = sched.schedule()
    assert step.seqs == [a, long] and step.num_tokens == [1, 9] and step.sampled == [0]  # a decodes, long's 1st chunk
    sched.postprocess(step, [7])
    assert (a.num_cached, a.tokens[-1], len(a.tokens)) == (4, 7, 5)
    assert (long.num_cached, len(long.tokens)) == (9, 12)  # no token: its prompt is not done
    step = sched.schedule()
    assert step.num_tokens == [1, 3] and step.sampled == [0, 1]
    sched.postprocess(step, [8, 9])
    assert (a.num_cached, a.tokens[-2:]) == (5, [7, 8]) and (long.num_cached, long.tokens[-1]) == (12, 9)


def test_postprocess_leaves_failed_rows_and_finished_sequences_alone():
    """A row whose sampling failed (None) gets no token but its K/V are cached; a sequence its request's failure
    finished and released during the step keeps what the release left."""
    sched = scheduler(64, 4)
    a, b, c = seq(3), seq(3), seq(3)
    for s in (a, b, c):
        sched.add(s)
    step = sched.schedule()
    c.finish_reason = "error"
    sched.remove(c)
    sched.postprocess(step, [5, None, 6])
    assert (a.num_cached, a.tokens) == (3, [1, 2, 3, 5])
    assert (b.num_cached, b.tokens) == (3, [1, 2, 3])
    assert (c.num_cached, c.tokens) == (0, [1, 2, 3])
    b.finish_reason = "error"  # its request fails, as the engine does with a row whose sampling failed
    sched.remove(b)
    step = sched.schedule()
    assert step.seqs == [a] and step.sampled == [0]
    with pytest.raises(ValueError):  # one token (or None) per sampled row
        sched.postprocess(step, [])

