"""Triton paged attention (interpreted on CPU) and the CPU attention (attention_cpu.py) against the torch reference,
on random paged caches."""
import pytest
import torch

from mistralrs import kernels
from mistralrs.kernels import attention as triton_ops
from mistralrs.kernels import attention_cpu, cpu_ext, reference

TOL = {torch.float32: dict(atol=2e-5, rtol=1e-4), torch.float16: dict(atol=2e-3, rtol=2e-3),
       torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


def make_case(q_lens, ctx_lens, H, KVH, D, BS, dtype, seed=0, consecutive=False):
    """Random K/V for each sequence's context, written to shuffled pages (or, consecutive=True, each sequence's in
    consecutive pages, as a fresh block manager hands them out); queries are each context's last tokens."""
    g = torch.Generator().manual_seed(seed)
    pages_needed = [-(-n // BS) for n in ctx_lens]
    NB = sum(pages_needed) + 2
    order = torch.randperm(NB, generator=g).tolist()  # pages out of order, as after preemption and reuse
    if consecutive:
        order = list(range(NB))[::-1]  # popped from the end: 0, 1, 2, ...
    k_cache = torch.zeros(NB, BS, KVH, D, dtype=dtype)
    v_cache = torch.zeros(NB, BS, KVH, D, dtype=dtype)
    tables, slots = [], []
    for n, p in zip(ctx_lens, pages_needed):
        table = [order.pop() for _ in range(p)]
        tables.append(table + [0] * (max(pages_needed) - p))
        slots.append(torch.tensor([table[i // BS] * BS + i % BS for i in range(n)]))
    for n, s in zip(ctx_lens, slots):
        k = torch.randn(n, KVH, D, generator=g).to(dtype)
        v = torch.randn(n, KVH, D, generator=g).to(dtype)
        reference.store_kv(k, v, k_cache, v_cache, s)
    q = torch.randn(sum(q_lens), H, D, generator=g).to(dtype)
    cu = torch.tensor([0] + q_lens).cumsum(0).to(torch.int32)
    return (q, k_cache, v_cache, torch.tensor(tables, dtype=torch.int32), torch.tensor(ctx_lens, dtype=torch.int32),
            cu)


CASES = {
    # name: (q_lens, ctx_lens, H, KVH, D, BS)
    "prefill_mixed_lengths_gqa4": ([19, 5, 33], [19, 5, 33], 8, 2, 64, 16),
    "chunked_prefill_over_context": ([7, 12], [40, 12], 4, 4, 64, 16),
    "decode_batch_half_full_block_gqa8": ([1, 1, 1], [17, 40, 8], 8, 1, 128, 16),
    "decode_one_token": ([1], [1], 4, 2, 64, 32),
    "non_power_of_two_heads_d80": ([9, 1], [9, 30], 6, 3, 80, 16),
    "block_32_mha": ([20, 1], [20, 45], 4, 4, 64, 32),
    "odd_block_size": ([11, 1], [11, 23], 4, 2, 64, 5),
    "head_dim_96": ([6, 1], [6, 18], 4, 2, 96, 16),
    "gemma_mqa_d256": ([5, 1], [5, 20], 4, 1, 256, 16),
    "block_256": ([3, 1], [3, 300], 4, 2, 64, 256),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["f32", "f16"])
@pytest.mark.parametrize("window", [None, 6, 1000], ids=["no_window", "window_6", "window_1000"])
@pytest.mark.parametrize("case", CASES)
def test_paged_attention_matches_reference(case, window, dtype):
    q, k_cache, v_cache, tables, lens, cu = make_case(*CASES[case], dtype)
    scale = q.shape[-1] ** -0.5
    ours = triton_ops.paged_attention(q, k_cache, v_cache, tables, lens, cu, scale, window)
    ref = reference.paged_attention(q, k_cache, v_cache, tables, lens, cu, scale, window)
    torch.testing.assert_close(ours, ref, **TOL[dtype])


DECODE_CASES = {
    "batch_mixed_lengths_gqa4": ([17, 40, 8, 1], 8, 2, 64, 16),
    "gqa8_d128": ([33, 5], 8, 1, 128, 16),
    "mha_non_power_of_two_heads_d80": ([30, 9], 6, 6, 80, 32),
    "gqa_3_odd_block": ([23, 2], 6, 2, 64, 5),
    "gqa4_long_tiles": ([300, 129, 64], 8, 2, 64, 16),  # several key tiles per split, contexts off the tile grid
    "gqa8_reduce_group": ([77], 16, 2, 64, 8),
}


@pytest.mark.parametrize("splits", [None, 1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["f32", "f16"])
@pytest.mark.parametrize("window", [None, 6, 1000], ids=["no_window", "window_6", "window_1000"])
@pytest.mark.parametrize("case", DECODE_CASES)
def test_split_k_decode_matches_reference(case, window, dtype, splits):
    ctx, H, KVH, D, BS = DECODE_CASES[case]
    q, k_cache, v_cache, tables, lens, cu = make_case([1] * len(ctx), ctx, H, KVH, D, BS, dtype)
    scale = D ** -0.5
    ours = triton_ops.paged_decode_attention(q, k_cache, v_cache, tables, lens, cu, scale, window, num_splits=splits)
    ref = reference.paged_attention(q, k_cache, v_cache, tables, lens, cu, scale, window)
    torch.testing.assert_close(ours, ref, **TOL[dtype])


def test_softcap_matches_reference():
    q, k_cache, v_cache, tables, lens, cu = make_case([6, 1], [6, 20], 4, 2, 64, 16, torch.float32)
    q = q * 4  # large logits, so the cap bites
    ours = triton_ops.paged_attention(q, k_cache, v_cache, tables, lens, cu, 0.125, None, 5.0)
    q1, cu1 = q[[5, 6]], torch.tensor([0, 1, 2], dtype=torch.int32)  # the last query of each: decode
    decode = triton_ops.paged_decode_attention(q1, k_cache, v_cache, tables, lens, cu1, 0.125, None, 5.0)
    torch.testing.assert_close(decode, reference.paged_attention(q1, k_cache, v_cache, tables, lens, cu1, 0.125,
                                                                 None, 5.0), **TOL[torch.float32])
    ref = reference.paged_attention(q, k_cache, v_cache, tables, lens, cu, 0.125, None, 5.0)
    uncapped = reference.paged_attention(q, k_cache, v_cache, tables, lens, cu, 0.125)
    torch.testing.assert_close(ours, ref, **TOL[torch.float32])
    assert not torch.allclose(ref, uncapped, atol=1e-3)



TILE_CASES = {
    # name: (q_lens, ctx_lens, H, KVH, D, BS). Prefill key tiles span 32-64 keys (kernels/attention.py
    # prefill_tiles), several shuffled pages each; long sequences give query tiles whose earlier key tiles are seen
    # whole (the unmasked loop) beside the diagonal; lengths are not multiples of any tile.
    "prefill_long_gqa3_block8": ([150, 77], [150, 77], 6, 2, 64, 8),
    "chunked_over_context_gqa5_block16": ([70, 1], [201, 100], 10, 2, 64, 16),
    "mqa_gqa8_block5_d80": ([90], [133], 8, 1, 80, 5),
    "mha_d128_block16": ([65, 3], [65, 99], 3, 3, 128, 16),
}


@pytest.mark.parametrize("softcap", [None, 5.0], ids=["no_cap", "cap_5"])
@pytest.mark.parametrize("window", [None, 7, 40], ids=["no_window", "window_7", "window_40"])
@pytest.mark.parametrize("case", TILE_CASES)
def test_multi_page_tiles_match_reference(case, window, softcap):
    """Prefill over tiles of several pages (masked window edge, unmasked middle, causal diagonal), and decode of
    every sequence's last token with GQA groups of 1/3/5/8 real heads padded to the dot's 16 rows."""
    q_lens, ctx_lens, H, KVH, D, BS = TILE_CASES[case]
    q, k_cache, v_cache, tables, lens, cu = make_case(q_lens, ctx_lens, H, KVH, D, BS, torch.float32)
    q = q * 3  # logits of a few units, so that the cap bites
    scale = D ** -0.5
    ours = triton_ops.paged_attention(q, k_cache, v_cache, tables, lens, cu, scale, window, softcap)
    ref = reference.paged_attention(q, k_cache, v_cache, tables, lens, cu, scale, window, softcap)
    torch.testing.assert_close(ours, ref, **TOL[torch.float32])
    last = cu[1:] - 1
    q1, cu1 = q[last], torch.arange(len(q_lens) + 1, dtype=torch.int32)
    for splits in (None, 2):
        ours = triton_ops.paged_decode_attention(q1, k_cache, v_cache, tables, lens, cu1, scale, window, softcap,
                                                 num_splits=splits)
        torch.testing.assert_close(ours, ref[last], **TOL[torch.float32])



def test_sm90_prefill_tiles_match_reference(monkeypatch):
    """The 64-key tiles the launcher picks on sm_90 at head dim 128 (32 on sm_80 and here), run interpreted."""
    monkeypatch.setattr(triton_ops, "_capability", lambda device: (9, 0))
    assert triton_ops.prefill_tiles(100, 128, (9, 0))[1] == 64
    q, k_cache, v_cache, tables, lens, cu = make_case([80, 5], [80, 140], 2, 1, 128, 16, torch.float32)
    for window in (None, 40):
        ours = triton_ops.paged_attention(q, k_cache, v_cache, tables, lens, cu, 128 ** -0.5, window)
        ref = reference.paged_attention(q, k_cache, v_cache, tables, lens, cu, 128 ** -0.5, window)
        torch.testing.assert_close(ours, ref, **TOL[torch.float32])


CPU_CASES = {
    **{name: CASES[name] for name in ("prefill_mixed_lengths_gqa4", "chunked_prefill_over_context",
                                      "decode_batch_half_full_block_gqa8", "decode_one_token",
                                      "non_power_of_two_heads_d80", "odd_block_size", "gemma_mqa_d256")},
    "smollm_gqa3_prefill": ([16], [16], 9, 3, 64, 16),
    "smollm_gqa3_decode_batch": ([1, 1, 1], [16, 257, 31], 9, 3, 64, 16),
    "ragged_prefill_and_chunked": ([5, 12, 1], [5, 40, 17], 9, 3, 64, 16),
    "mqa_chunk_over_context": ([3], [50], 4, 1, 32, 16),
}
CPU_VARIANTS = {  # dtype, pages consecutive (read in place) or shuffled (gathered), softcap
    "f32": (torch.float32, False, None),
    "f32_consecutive": (torch.float32, True, None),
    "bf16": (torch.bfloat16, False, None),
    "f32_softcap": (torch.float32, False, 5.0),
    "bf16_consecutive_softcap": (torch.bfloat16, True, 5.0),
}


@pytest.mark.parametrize("variant", CPU_VARIANTS)
@pytest.mark.parametrize("window", [None, 6, 1000], ids=["no_window", "window_6", "window_1000"])
@pytest.mark.parametrize("case", CPU_CASES)
def test_cpu_attention_matches_reference(case, window, variant):
    q_lens, ctx_lens, H, KVH, D, BS = CPU_CASES[case]
    dtype, consecutive, softcap = CPU_VARIANTS[variant]
    q, k_cache, v_cache, tables, lens, cu = make_case(q_lens, ctx_lens, H, KVH, D, BS, dtype,
                                                      consecutive=consecutive)
    q = q * 3  # logits of a few units, so that softcap and masking both show
    scale = D ** -0.5
    ref = reference.paged_attention(q, k_cache, v_cache, tables, lens, cu, scale, window, softcap)
    ours = attention_cpu.paged_attention(q, k_cache, v_cache, tables, lens, cu, scale, window, softcap)
    torch.testing.assert_close(ours, ref, **TOL[dtype])
    if all(n == 1 for n in q_lens):
        ours = attention_cpu.paged_decode_attention(q, k_cache, v_cache, tables, lens, cu, scale, window, softcap)
        torch.testing.assert_close(ours, ref, **TOL[dtype])


@pytest.mark.skipif(cpu_ext.ext is None, reason=f"{cpu_ext.UNAVAILABLE}")
@pytest.mark.parametrize("window,softcap", [(None, None), (7, None), (None, 5.0)], ids=["plain", "window", "softcap"])
@pytest.mark.parametrize("H,KVH,D,BS", [(9, 3, 64, 16), (4, 1, 100, 5), (6, 6, 16, 32)])
def test_cpu_attention_of_a_query_does_not_depend_on_the_batch(H, KVH, D, BS, window, softcap):
    """A query's output is the same bits whether it is computed in its sequence's whole prefill, in a chunk after a
    cached prefix, decoded alone, or beside other sequences' queries, at 1, 2 and 3 threads."""
    n = 70
    (q, k_cache, v_cache, tables, lens, cu) = make_case([n, 9], [n, 30], H, KVH, D, BS, torch.float32)
    q = q * 3
    table, other = tables[:1], tables[1:]
    args = dict(scale=D ** -0.5, sliding_window=window, softcap=softcap)

    def attend(rows, table, lens, q_lens):
        cu = torch.tensor([0] + q_lens).cumsum(0).to(torch.int32)
        return attention_cpu.paged_attention(rows, k_cache, v_cache, table, torch.tensor(lens, dtype=torch.int32),
                                             cu, **args)
    full = attend(q[:n], table, [n], [n])
    before = kernels.cpu_threads()
    try:
        for threads in (1, 2, 3):
            kernels.set_cpu_threads(threads)
            for c in (1, 16, 33, n - 1):  # a chunk after c cached tokens
                assert torch.equal(attend(q[c:n], table, [n], [n - c]), full[c:])
            for p in (0, 15, 16, 69):  # decode of position p, alone and beside another sequence's 9 queries
                decoded = attention_cpu.paged_decode_attention(q[p:p + 1], k_cache, v_cache, table,
                                                               torch.tensor([p + 1], dtype=torch.int32), None, **args)
                assert torch.equal(decoded, full[p:p + 1])
                both = attend(torch.cat([q[n:], q[p:p + 1]]), torch.cat([other, table]), [30, p + 1], [9, 1])
                assert torch.equal(both[9:], full[p:p + 1])
    finally:
        kernels.set_cpu_threads(before)


def test_cpu_attention_reads_consecutive_pages_in_place(monkeypatch):
    """SDPA path (bf16: f32 decode runs the C++ kernel, which reads every page in place): a sequence on
    consecutive pages is attended as a view of the cache, no gather (index) of its pages."""
    q, k_cache, v_cache, tables, lens, cu = make_case([1], [40], 9, 3, 64, 16, torch.bfloat16, consecutive=True)
    gathered = []
    real = attention_cpu._context

    def spy(k_cache, v_cache, blocks, n):
        k, v = real(k_cache, v_cache, blocks, n)
        gathered.extend(t.untyped_storage().data_ptr() != c.untyped_storage().data_ptr()
                        for t, c in ((k, k_cache), (v, v_cache)))
        return k, v
    monkeypatch.setattr(attention_cpu, "_context", spy)
    attention_cpu.paged_decode_attention(q, k_cache, v_cache, tables, lens, cu, 0.125)
    assert gathered == [False, False]
    q, k_cache, v_cache, tables, lens, cu = make_case([1], [40], 9, 3, 64, 16, torch.bfloat16)
    gathered.clear()
    attention_cpu.paged_decode_attention(q, k_cache, v_cache, tables, lens, cu, 0.125)
    assert gathered == [True, True]


@pytest.mark.skipif(cpu_ext.UNAVAILABLE is not None, reason=f"{cpu_ext.UNAVAILABLE}")
def test_cpu_store_kv_and_decode_checks():
    """The C++ store_kv equals the reference on strided views (fused projection outputs); bad slots, blocks and
    lengths raise instead of writing or reading outside the cache."""
    T, KVH, D = 5, 3, 64
    kv = torch.randn(T, 2 * KVH * D + 8)  # k and v as column blocks of a wider row, like the fused qkv output
    k, v = kv[:, :KVH * D].view(T, KVH, D), kv[:, KVH * D:2 * KVH * D].view(T, KVH, D)
    slots = torch.tensor([3, 40, 0, 17, 63])
    ours, ref = [torch.zeros(4, 16, KVH, D) for _ in range(2)], [torch.zeros(4, 16, KVH, D) for _ in range(2)]
    attention_cpu.store_kv(k, v, *ours, slots)
    reference.store_kv(k, v, *ref, slots)
    assert torch.equal(ours[0], ref[0]) and torch.equal(ours[1], ref[1])
    with pytest.raises(RuntimeError, match="outside the cache"):
        attention_cpu.store_kv(k, v, *ours, torch.tensor([0, 1, 2, 3, 64]))
    q = torch.randn(1, 6, D)
    with pytest.raises(RuntimeError, match="outside the cache"):
        attention_cpu.paged_decode_attention(q, *ours, torch.tensor([[0, 9]], dtype=torch.int32),
                                             torch.tensor([20], dtype=torch.int32), None, 0.125)
    with pytest.raises(RuntimeError, match="context_lens"):
        attention_cpu.paged_decode_attention(q, *ours, torch.tensor([[0, 1]], dtype=torch.int32),
                                             torch.tensor([33], dtype=torch.int32), None, 0.125)
    with pytest.raises(RuntimeError, match="context_lens"):  # fewer cached tokens than the sequence's queries
        attention_cpu.paged_attention(torch.randn(3, 6, D), *ours, torch.tensor([[0, 1]], dtype=torch.int32),
                                      torch.tensor([2], dtype=torch.int32), torch.tensor([0, 3], dtype=torch.int32),
                                      0.125)


@pytest.mark.parametrize("backend,impl", [("auto", attention_cpu), ("reference", reference)])
def test_cpu_dispatch(monkeypatch, backend, impl):
    """The one dispatch point sends CPU tensors to attention_cpu, or to the reference when asked."""
    q, k_cache, v_cache, tables, lens, cu = make_case([1], [20], 4, 2, 64, 16, torch.float32)
    calls = []
    for op in ("paged_attention", "paged_decode_attention"):
        monkeypatch.setattr(impl, op, lambda *a, op=op: calls.append(op))
    monkeypatch.setattr(kernels, "BACKEND", backend)
    kernels.paged_attention(q, k_cache, v_cache, tables, lens, cu, 0.125)
    kernels.paged_decode_attention(q, k_cache, v_cache, tables, lens, cu, 0.125)
    assert calls == ["paged_attention", "paged_decode_attention"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["f32", "f16"])
def test_store_kv_matches_reference(dtype):
    g = torch.Generator().manual_seed(1)
    k, v = torch.randn(2, 9, 3, 80, generator=g).to(dtype)
    slots = torch.randperm(4 * 16, generator=g)[:9]
    caches = [torch.zeros(4, 16, 3, 80, dtype=dtype) for _ in range(4)]
    triton_ops.store_kv(k, v, caches[0], caches[1], slots)
    reference.store_kv(k, v, caches[2], caches[3], slots)
    assert torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])


@pytest.mark.parametrize("arch", ["mistral", "gemma"])
def test_greedy_generation_with_triton_ops_equals_reference(tiny_models, monkeypatch, arch):
    """Mistral: GQA and a sliding window shorter than the prompt; Gemma: MQA with head_dim 32."""
    import mistralrs
    from mistralrs import kernels

    from helpers import ARCHS, greedy, prompt_ids

    loader = mistralrs.NormalLoader(ARCHS[arch], model_id=str(tiny_models[arch]))
    with loader.load(token_source="none", block_size=16) as runner:
        ids = prompt_ids(runner)
        monkeypatch.setattr(kernels, "BACKEND", "reference")
        expected = greedy(runner, ids, 12)
        monkeypatch.setattr(kernels, "BACKEND", "triton")
        assert greedy(runner, ids, 12) == expected


GPU_CASES = {
    "prefill_ragged_mistral": ([1000, 37, 513], [1000, 37, 513], 32, 8, 128, 16),
    "chunked_prefill_phi2": ([256, 1], [2048, 700], 32, 32, 80, 32),
    "decode_long_context": ([1, 1, 1, 1], [32768, 4000, 17, 1], 32, 8, 128, 16),
    "decode_gemma_d256_block_128": ([1, 1], [5000, 300], 8, 1, 256, 128),
}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("window", [None, 4096], ids=["no_window", "window_4096"])
@pytest.mark.parametrize("case", GPU_CASES)
def test_gpu_real_sizes(case, window, dtype):
    q, k_cache, v_cache, tables, lens, cu = (t.cuda() for t in make_case(*GPU_CASES[case], dtype))
    scale = q.shape[-1] ** -0.5
    ref = reference.paged_attention(q.float(), k_cache.float(), v_cache.float(), tables, lens, cu, scale, window)
    ours = triton_ops.paged_attention(q, k_cache, v_cache, tables, lens, cu, scale, window)
    torch.testing.assert_close(ours.float(), ref, **TOL[dtype])
    if q.shape[0] == lens.shape[0]:  # all decode
        ours = triton_ops.paged_decode_attention(q, k_cache, v_cache, tables, lens, cu, scale, window)
        torch.testing.assert_close(ours.float(), ref, **TOL[dtype])
