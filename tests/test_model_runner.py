"""The model runner without a model: block tables -> attention metadata on decode and mixed steps, and which hidden
rows step() turns into logits. A stub stands in for the model: its hidden state of a token is its input id."""
import torch

from mistralrs.engine.model_runner import ModelRunner
from mistralrs.engine.sequence import Sequence

BS = 4


class Stub:
    def __call__(self, ids, positions, meta, kv_caches):
        return ids.float()[:, None]  # [T, 1]

    def logits(self, hidden):
        return hidden


def runner() -> ModelRunner:
    cache = torch.zeros(16, BS, 1, 1)  # [NB, BS, KVH, D]
    return ModelRunner(Stub(), [(cache, cache)], torch.device("cpu"))


def seq(tokens, num_cached) -> Sequence:
    return Sequence(list(tokens), num_cached)


def slot(table, p):
    return table[p // BS] * BS + p % BS


def test_decode_metadata():
    tables = [[7], [3, 9, 2], [5, 1]]
    seqs = [seq(range(100, 103), 2), seq(range(200, 211), 10), seq(range(300, 305), 4)]
    ids, positions, meta = runner().metadata(seqs, tables, [len(s.tokens) for s in seqs])
    assert ids.tolist() == [102, 210, 304] and positions.tolist() == [2, 10, 4]
    assert meta.slot_mapping.tolist() == [slot(t, p) for t, p in zip(tables, [2, 10, 4])] == [30, 10, 4]
    assert meta.block_tables.tolist() == [[7, 0, 0], [3, 9, 2], [5, 1, 0]]
    assert meta.context_lens.tolist() == [3, 11, 5] and meta.cu_seqlens_q.tolist() == [0, 1, 2, 3]
    assert meta.is_decode
    assert (ids.dtype, positions.dtype, meta.slot_mapping.dtype) == (torch.int64,) * 3
    assert (meta.block_tables.dtype, meta.context_lens.dtype, meta.cu_seqlens_q.dtype) == (torch.int32,) * 3


def test_mixed_prefill_and_decode_metadata():
    tables = [[4, 6], [8]]
    seqs = [seq(range(10, 16), 0), seq(range(20, 23), 2)]  # a 6-token prefill across a block boundary, a decode
    ids, positions, meta = runner().metadata(seqs, tables, [len(s.tokens) for s in seqs])
    assert ids.tolist() == [10, 11, 12, 13, 14, 15, 22]
    assert positions.tolist() == [0, 1, 2, 3, 4, 5, 2]
    assert meta.slot_mapping.tolist() == [16, 17, 18, 19, 24, 25, 34]
    assert meta.cu_seqlens_q.tolist() == [0, 6, 7] and meta.max_seqlen_q == 6 and not meta.is_decode
    assert meta.block_tables.tolist() == [[4, 6], [8, 0]]


def test_step_returns_each_sequences_last_token_and_writes_no_sequence():
    mr, tables = runner(), [[4, 6], [8]]
    a, b = seq(range(10, 16), 0), seq(range(20, 23), 2)
    assert mr.step([a, b], tables).flatten().tolist() == [15, 22]
    assert (a.num_cached, b.num_cached, len(a.tokens), len(b.tokens)) == (0, 2, 6, 3)  # the scheduler's to advance
    a.tokens.append(16)
    b.tokens.append(23)
    a.num_cached, b.num_cached = 6, 3
    assert mr.step([a, b], tables).flatten().tolist() == [16, 23]  # decode
    c = seq(range(30, 33), 0)
    assert mr.step([c], [[1]], all_logits=True).flatten().tolist() == [30, 31, 32]
