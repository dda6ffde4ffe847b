"""GGUF dequant-matmul: out[M, N] = x[M, K] @ W[N, K].T with W kept quantized, fp32 accumulation.

qweight is the GGUF tensor as stored: uint8 [N, row_bytes], row n = K / QK blocks end to end. d and dmin are fp16
at unaligned offsets: the byte paths read them byte by byte. l is a byte inside a field; the full table of every type is in
kernels/dequant.py (the reference). Layouts of the types with a kernel:
    Q4_0   18 B / 32 w   d, qs[16]                    w = d * (q - 8); qs[l]: low nibble w[l], high nibble w[16 + l]
    Q8_0   34 B / 32 w   d, qs[32] int8               w = d * q
    Q4_K  144 B / 256 w  d, dmin, scales[12], qs[128]
          sub-block s (32 w): w = d * sc[s] * q - dmin * m[s]; q = nibble s % 2 of qs[32 (s // 2) + l];
          sc, m are 6-bit, packed in scales (see _k_scale_min)
    Q5_K  176 B / 256 w  d, dmin, scales[12], qh[32], qs[128]
          as Q4_K, with bit s of qh[l] as bit 4 of q
    Q6_K  210 B / 256 w  ql[128], qh[64], scales[16] int8, d
          group j (32 w), in half h = j // 4: w = d * scales[2j + l // 16] * (q - 32);
          q = nibble (j % 4) // 2 of ql[64h + 32 (j % 2) + l] | bits 2 (j % 4) of qh[32h + l] << 4

A K-tile of BLOCK_K weights is BLOCK_K / UNIT units of the type (the weights whose quants share bytes: a Q4_0
block, a Q4_K pair of sub-blocks, half a Q6_K block). Q4_0 and Q4_K are read as 16/32-bit words (WORD) with every
unit in one thread, eight word loads per unit, nibbles turned into floats by the magic-number trick (_nibble) and
put in k order by joins and a permute that move no data; the other types load bytes.

One kernel for both regimes computes out.T = W x.T, so W's dequantized [BLOCK_N, BLOCK_K] tile is the tall A
operand of tl.dot (wgmma on sm_90a for BLOCK_N >= 64) and x's rows the narrow B operand. Decode (M <= 8): one tile
of 16 rows covers all of x, K is split until the programs fill the GPU (fp32 partials [S, M, N], summed in split
order by a second small kernel: deterministic, unlike atomics). Prefill: [BLOCK_M, BLOCK_N] output tiles, no split.
W is rounded to x's dtype before the dot (as for a bf16 checkpoint); accumulation is fp32.
"""
import torch
import triton
import triton.language as tl
from gguf import GGMLQuantizationType

from .dequant import row_bytes

Q = GGMLQuantizationType
SUPPORTED = frozenset({Q.Q4_0, Q.Q8_0, Q.Q4_K, Q.Q5_K, Q.Q6_K})
GEMV_MAX_M = 8


@triton.jit
def _f16(ptr, mask):
    """The little-endian fp16 at byte ptr, as fp32."""
    lo = tl.load(ptr, mask=mask, other=0).to(tl.uint16)
    hi = tl.load(ptr + 1, mask=mask, other=0).to(tl.uint16)
    return (lo | (hi << 8)).to(tl.float16, bitcast=True).to(tl.float32)


# Each _<type> below reads one unit of its type per (row, u): the weights whose quants share UNIT_BYTES bytes (a
# byte's two nibbles, Q6_K's high bits) are unpacked from one load of those bytes. It takes row [BLOCK_N, 1, 1]
# pointers to the rows' first bytes, u [1, U, 1] the absolute unit index, l [1, 1, UNIT_BYTES] the byte, mask
# [BLOCK_N, U, 1], and returns the weights in fp32 [BLOCK_N, U, UNIT_BYTES, ...] and their k (index in the row),
# same shape but 1 in the first dimension. The weights come out in the bytes' order, not k's: the caller reads x at
# the returned k, so the dot product over the tile is the same sum.
UNIT = {"Q4_0": 32, "Q8_0": 32, "Q4_K": 64, "Q5_K": 64, "Q6_K": 128}  # weights per unit
# Decode tiles (BLOCK_N, BLOCK_K) per type, the largest without spills: more weights per thread amortize the
# dot's operand staging (tools/roofline.py; benchmarks/results/static-sm90).
DECODE_TILES = {"Q4_0": (256, 64), "Q8_0": (128, 64), "Q4_K": (256, 64), "Q5_K": (64, 128), "Q6_K": (64, 128)}
# Prefill tiles (BLOCK_N, BLOCK_K, warps) at BLOCK_M = 32 or 64, and at 128: a word-path unit per thread at least (a
# smaller W tile repeats work across threads), no spills on sm_80 (tools/aot.py --sweep).
PREFILL_TILES = {"Q4_0": ((64, 64, 4), (128, 64, 8)), "Q8_0": ((64, 32, 4), (128, 64, 8)),
                 "Q4_K": ((64, 128, 4), (64, 128, 4)), "Q5_K": ((64, 128, 4), (128, 64, 8)),
                 "Q6_K": ((64, 128, 4), (64, 128, 4))}
WORD = {"Q4_0": torch.int16, "Q4_K": torch.int32}  # what the kernel loads W as (else bytes): see _q4_0_words
UNIT_BYTES = {"Q4_0": 16, "Q8_0": 32, "Q4_K": 32, "Q5_K": 32, "Q6_K": 32}


@triton.jit
def _join4(a, b, c, d):
    """[..., 2, 2]: [..., i, j] = (a, b, c, d)[i + 2 j]."""
    return tl.join(tl.join(a, b), tl.join(c, d))


@triton.jit
def _stack8(a0, a1, a2, a3, a4, a5, a6, a7):
    """[..., 2, 2, 2]: [..., b0, b1, b2] = a_(b0 + 2 b1 + 4 b2), in the thread's registers like every join."""
    return tl.join(_join4(a0, a1, a2, a3), _join4(a4, a5, a6, a7))


@triton.jit
def _nibble(magic_word, J: tl.constexpr, offset: tl.constexpr):
    """(bits 4J .. 4J + 3 of a 16-bit word - offset) * 16^J in fp32, from magic_word = word | 0x4B000000: the masked
    bits in the mantissa of 2^23 make the float 2^23 + q 16^J exactly, so one LOP3 (one immediate: the exponent
    bits are in the mask) and one FADD replace shift, mask and int-to-float conversion."""
    bits = magic_word & (0x4B000000 | (15 << 4 * J))
    return bits.to(tl.float32, bitcast=True) - (8388608.0 + offset * 16 ** J)


@triton.jit
def _magic16(word, ASM: tl.constexpr):
    """int16 words -> int32 with 0x4B00 above them: the magic_word of _nibble. LLVM folds a plain OR into the nibble
    masks (two immediates per LOP3, a MOV for one of them, per nibble); the asm keeps it one op per word. The
    interpreter cannot run inline PTX: it takes the OR (bits 16 .. 31 are outside the nibble masks anyway)."""
    if ASM:
        return tl.inline_asm_elementwise("{ .reg .b16 m; mov.b16 m, 0x4B00; mov.b32 $0, {$1, m}; }", "=r,h", [word],
                                         dtype=tl.int32, is_pure=True, pack=1)
    return word.to(tl.int32) | 0x4B000000


@triton.jit
def _magic32(word, HALF: tl.constexpr, ASM: tl.constexpr):
    """Bits 16 HALF .. 16 HALF + 15 of int32 words with 0x4B00 above them (see _magic16); prmt picks the bytes."""
    if ASM:
        if HALF == 0:
            return tl.inline_asm_elementwise("{ .reg .b32 m; mov.b32 m, 0x4B000000; prmt.b32 $0, $1, m, 0x7610; }",
                                             "=r,r", [word], dtype=tl.int32, is_pure=True, pack=1)
        return tl.inline_asm_elementwise("{ .reg .b32 m; mov.b32 m, 0x4B000000; prmt.b32 $0, $1, m, 0x7632; }",
                                         "=r,r", [word], dtype=tl.int32, is_pure=True, pack=1)
    return (word >> (16 * HALF)) | 0x4B000000


@triton.jit
def _q4_0_word(block, i: tl.constexpr, d, ASM: tl.constexpr):
    """Word i of qs (bytes 2i, 2i + 1) as [..., t, h]: nibble h of byte 2i + t, weight 16 h + 2i + t."""
    word = _magic16(tl.load(block + 1 + i), ASM)
    return _join4(_nibble(word, 0, 8) * d, _nibble(word, 2, 8) * (d * (1 / 256)),
                  _nibble(word, 1, 8) * (d * (1 / 16)), _nibble(word, 3, 8) * (d * (1 / 4096)))


@triton.jit
def _q4_0_words(row, u, ASM: tl.constexpr):
    """Q4_0 from int16 words: a block is 9 (d, then qs), only 2-byte aligned. row [BLOCK_N, 1], u [1, U] the block
    (both in bounds: no masks, no zero-filling moves).
    Eight loads of a word per block (not one [.., 8] load) keep a block in one thread, so the permutes are free."""
    block = row + u * 9
    d = tl.load(block).to(tl.float16, bitcast=True).to(tl.float32)
    w = _stack8(_q4_0_word(block, 0, d, ASM), _q4_0_word(block, 1, d, ASM), _q4_0_word(block, 2, d, ASM),
                _q4_0_word(block, 3, d, ASM), _q4_0_word(block, 4, d, ASM), _q4_0_word(block, 5, d, ASM),
                _q4_0_word(block, 6, d, ASM), _q4_0_word(block, 7, d, ASM))
    # [BLOCK_N, U, t, h, b0, b1, b2] holds weight 16 h + 2 i + t, i = b0 + 2 b1 + 4 b2
    return tl.permute(w, (0, 1, 3, 6, 5, 4, 2))


@triton.jit
def _q4_k_half(word, h: tl.constexpr, scale, low, ASM: tl.constexpr):
    """Nibble h of the 4 bytes of word as [..., a, b] (byte a + 2b): scale * q - low."""
    lo = _magic32(word, 0, ASM)
    hi = _magic32(word, 1, ASM)
    return _join4(_nibble(lo, h, 0) * (scale / 16 ** h) - low, _nibble(lo, 2 + h, 0) * (scale / 16 ** (2 + h)) - low,
                  _nibble(hi, h, 0) * (scale / 16 ** h) - low, _nibble(hi, 2 + h, 0) * (scale / 16 ** (2 + h)) - low)


@triton.jit
def _q4_k_word(block, c, i: tl.constexpr, scales, lows, ASM: tl.constexpr):
    """Word i of sub-block pair c's qs (bytes 4i .. 4i + 3) as [..., a, b, h]: nibble h of byte 4i + a + 2b,
    weight 32 h + 4i + a + 2b of the pair."""
    word = tl.load(block + 4 + 8 * c + i)
    return tl.join(_q4_k_half(word, 0, scales[0], lows[0], ASM), _q4_k_half(word, 1, scales[1], lows[1], ASM))


@triton.jit
def _q4_k_words(row, u, ASM: tl.constexpr):
    """Q4_K from int32 words: a block is 36 (d | dmin << 16, scales[12], qs), 16-byte aligned. row [BLOCK_N, 1],
    u [1, U] the pair of sub-blocks 2c, 2c + 1 of block u // 4 (c = u % 4): nibbles 0, 1 of qs[32c + l]."""
    block = row + (u // 4) * 36
    c = u % 4
    dd = tl.load(block)
    d = (dd & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    dmin = (dd >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    sc = (tl.load(block + 1), tl.load(block + 2),
          tl.load(block + 3))
    sc0, m0 = _k_scale_min_words(sc, 2 * c)
    sc1, m1 = _k_scale_min_words(sc, 2 * c + 1)
    scales, lows = (d * sc0, d * sc1), (dmin * m0, dmin * m1)
    w = _stack8(_q4_k_word(block, c, 0, scales, lows, ASM), _q4_k_word(block, c, 1, scales, lows, ASM),
                _q4_k_word(block, c, 2, scales, lows, ASM), _q4_k_word(block, c, 3, scales, lows, ASM),
                _q4_k_word(block, c, 4, scales, lows, ASM), _q4_k_word(block, c, 5, scales, lows, ASM),
                _q4_k_word(block, c, 6, scales, lows, ASM), _q4_k_word(block, c, 7, scales, lows, ASM))
    # [BLOCK_N, U, a, b, h, b0, b1, b2] holds weight 32 h + 4 i + a + 2 b, i = b0 + 2 b1 + 4 b2
    return tl.permute(w, (0, 1, 4, 7, 6, 5, 3, 2))


@triton.jit
def _k_scale_min_words(sc, s):
    """_k_scale_min from the 12 scale bytes as 3 int32 words: byte b of word w is (w >> 8 b) & 255."""
    shift = 8 * (s % 4)
    a = (sc[0] >> shift) & 255
    b = (sc[1] >> shift) & 255
    c = (sc[2] >> shift) & 255
    sc_ = tl.where(s < 4, a & 63, (c & 15) | ((a >> 6) << 4))
    m = tl.where(s < 4, b & 63, (c >> 4) | ((b >> 6) << 4))
    return sc_.to(tl.float32), m.to(tl.float32)


@triton.jit
def _q8_0(row, u, l, mask):
    block = row + u * 34
    d = _f16(block, mask)
    q = tl.load(block + 2 + l, mask=mask, other=0).to(tl.int8, bitcast=True)
    return d * q.to(tl.float32)


@triton.jit
def _k_scale_min(scales, s, mask):
    """Q4_K/Q5_K: 6-bit scale and min of sub-block s from the 12 packed bytes at `scales`."""
    a = tl.load(scales + s % 4, mask=mask, other=0).to(tl.int32)
    b = tl.load(scales + 4 + s % 4, mask=mask, other=0).to(tl.int32)
    c = tl.load(scales + 8 + s % 4, mask=mask, other=0).to(tl.int32)
    sc = tl.where(s < 4, a & 63, (c & 15) | ((a >> 6) << 4))
    m = tl.where(s < 4, b & 63, (c >> 4) | ((b >> 6) << 4))
    return sc.to(tl.float32), m.to(tl.float32)


@triton.jit
def _k_pair(block, s, q_lo, q_hi, mask):
    """Q4_K/Q5_K weights of sub-blocks s (quants q_lo) and s + 1 (q_hi), joined: [..., 2]."""
    d = _f16(block, mask)
    dmin = _f16(block + 2, mask)
    sc0, m0 = _k_scale_min(block + 4, s, mask)
    sc1, m1 = _k_scale_min(block + 4, s + 1, mask)
    return tl.join((d * sc0) * q_lo.to(tl.float32) - dmin * m0, (d * sc1) * q_hi.to(tl.float32) - dmin * m1)


@triton.jit
def _q5_k(row, u, l, mask):
    block = row + (u // 4) * 176
    s = 2 * (u % 4)
    q = tl.load(block + 48 + (u % 4) * 32 + l, mask=mask, other=0).to(tl.int32)
    qh = tl.load(block + 16 + l, mask=mask, other=0).to(tl.int32)  # bit s of qh[l]: bit 4 of sub-block s's q
    q_lo = (q & 15) | (((qh >> s) & 1) << 4)
    q_hi = (q >> 4) | (((qh >> (s + 1)) & 1) << 4)
    return tl.permute(_k_pair(block, s, q_lo, q_hi, mask), (0, 1, 3, 2))  # [BLOCK_N, U, 2, 32]: in order


@triton.jit
def _q6_k_group(block, j, l, q, mask):
    """Q6_K weights of group j (its 32 quants q): scale 2j + l // 16."""
    sc = tl.where(l < 16, tl.load(block + 192 + 2 * j, mask=mask, other=0),
                  tl.load(block + 193 + 2 * j, mask=mask, other=0)).to(tl.int8, bitcast=True)
    return sc.to(tl.float32) * (q - 32).to(tl.float32)


@triton.jit
def _q6_k(row, u, l, mask):
    block = row + (u // 2) * 210  # u: half h = u % 2 of a super-block, groups j = 4h .. 4h + 3
    h = u % 2
    ql0 = tl.load(block + h * 64 + l, mask=mask, other=0).to(tl.int32)  # nibbles 0, 1: groups 4h, 4h + 2
    ql1 = tl.load(block + h * 64 + 32 + l, mask=mask, other=0).to(tl.int32)  # groups 4h + 1, 4h + 3
    qh = tl.load(block + 128 + h * 32 + l, mask=mask, other=0).to(tl.int32)  # bits 2i: group 4h + i
    j = 4 * h
    w0 = _q6_k_group(block, j, l, (ql0 & 15) | ((qh & 3) << 4), mask)
    w1 = _q6_k_group(block, j + 1, l, (ql1 & 15) | (((qh >> 2) & 3) << 4), mask)
    w2 = _q6_k_group(block, j + 2, l, (ql0 >> 4) | (((qh >> 4) & 3) << 4), mask)
    w3 = _q6_k_group(block, j + 3, l, (ql1 >> 4) | ((qh >> 6) << 4), mask)
    d = tl.expand_dims(tl.expand_dims(_f16(block + 208, mask), 3), 4)
    return tl.permute(d * _join4(w0, w1, w2, w3), (0, 1, 4, 3, 2))  # [BLOCK_N, U, 2, 2, 32]: group 2b + a


@triton.jit
def _dequant_tile(w_ptr, offs_n, n_mask, k0, N, K, row_stride, QTYPE: tl.constexpr, UNIT: tl.constexpr,
                  UNIT_BYTES: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ASM: tl.constexpr):
    """W[offs_n, k0 : k0 + BLOCK_K] in fp32, [BLOCK_N, BLOCK_K]; zeros past N and K (K is a multiple of UNIT)."""
    u2 = (k0 // UNIT + tl.arange(0, BLOCK_K // UNIT))[None, :]  # [1, U]
    row2 = (w_ptr + offs_n.to(tl.int64) * row_stride)[:, None]  # [BLOCK_N, 1]
    mask2 = n_mask[:, None] & (u2 * UNIT < K)
    u, row, mask = u2[:, :, None], row2[:, :, None], mask2[:, :, None]
    # The word paths read unmasked: rows past N re-read row N - 1, units past K the last unit; x is 0 there and those
    # outputs are not stored.
    u_in = tl.minimum(u2, K // UNIT - 1)
    row_in = (w_ptr + tl.minimum(offs_n, N - 1).to(tl.int64) * row_stride)[:, None]
    l = tl.arange(0, UNIT_BYTES)[None, None, :]
    if QTYPE == "Q4_0":
        w = _q4_0_words(row_in, u_in, ASM)
    elif QTYPE == "Q8_0":
        w = _q8_0(row, u, l, mask)
    elif QTYPE == "Q4_K":
        w = _q4_k_words(row_in, u_in, ASM)
    elif QTYPE == "Q5_K":
        w = _q5_k(row, u, l, mask)
    else:
        tl.static_assert(QTYPE == "Q6_K")
        w = _q6_k(row, u, l, mask)
    return tl.reshape(w, (BLOCK_N, BLOCK_K))


@triton.jit
def _split_k_reduce_kernel(part_ptr, out_ptr, MN, splits, BLOCK: tl.constexpr):
    """out.flat[i] = sum_s part[s].flat[i] for the fp32 partials [splits, M, N], in split order."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < MN
    acc = tl.zeros((BLOCK,), tl.float32)
    for s in range(splits):
        acc += tl.load(part_ptr + s * MN + offs, mask=mask, other=0.0)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gguf_matmul_kernel(x_ptr, w_ptr, out_ptr, M, N, K, row_stride, tiles_per_split,
                        stride_x_m, stride_o_split, stride_o_m,
                        QTYPE: tl.constexpr, UNIT: tl.constexpr, UNIT_BYTES: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr, ASM: tl.constexpr):
    pid_m = tl.program_id(0)  # fastest: the programs that share a W tile run together, its bytes stay in L2
    pid_n = tl.program_id(1)
    split = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    acc = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)  # out.T: W is the dot's A operand, its tall side
    first = split * tiles_per_split
    last = tl.minimum(first + tiles_per_split, tl.cdiv(K, BLOCK_K))
    for tile in range(first, last):
        k0 = tile * BLOCK_K
        w = _dequant_tile(w_ptr, offs_n, n_mask, k0, N, K, row_stride, QTYPE, UNIT, UNIT_BYTES, BLOCK_N, BLOCK_K,
                          ASM)
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_m[:, None] * stride_x_m + offs_k[None, :],
                    mask=m_mask[:, None] & (offs_k < K)[None, :], other=0.0)  # [BLOCK_M, BLOCK_K]
        acc = tl.dot(w.to(x.dtype), tl.trans(x), acc, input_precision=PRECISION)
    out = out_ptr + split * stride_o_split + offs_m[None, :] * stride_o_m + offs_n[:, None]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_mask[None, :] & n_mask[:, None])


def _num_splits(n_programs: int, k_tiles: int, device: torch.device) -> int:
    """Split K until there are ~4 programs per SM (enough loads in flight to saturate memory), >= 1 tile each."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    return max(1, min(k_tiles, triton.cdiv(4 * sms, n_programs)))


def gguf_matmul(x: torch.Tensor, qweight: torch.Tensor, qtype: GGMLQuantizationType, N: int, K: int, *,
                block_k: int | None = None, split_k: int | None = None) -> torch.Tensor:
    """x [M, K] (fp16/bf16/fp32) @ dequant(qweight [N, row_bytes]).T -> [M, N] in x's dtype.

    block_k (a multiple of UNIT[qtype]: 32, 64 for Q4_K/Q5_K, 128 for Q6_K) and split_k override the tiles."""
    qtype = GGMLQuantizationType(qtype)
    assert qtype in SUPPORTED, f"no Triton gguf_matmul kernel for {qtype.name}"
    assert x.ndim == 2 and x.shape[1] == K and x.stride(1) == 1, (x.shape, x.stride(), K)
    assert x.dtype in (torch.float16, torch.bfloat16, torch.float32), x.dtype
    assert qweight.dtype == torch.uint8 and qweight.is_contiguous() and qweight.device == x.device
    assert qweight.shape == (N, row_bytes(qtype, K)), (tuple(qweight.shape), N, row_bytes(qtype, K))
    M = x.shape[0]
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if out.numel() == 0 or K == 0:
        return out.zero_()
    num_warps = 4
    if M <= GEMV_MAX_M:  # decode: one M tile (the dot's smallest), K split until the programs fill the GPU
        BLOCK_M = 16
        BLOCK_N, BLOCK_K = DECODE_TILES[qtype.name]
        BLOCK_K = block_k or BLOCK_K
    else:  # a W tile is dequantized once per M tile: tall M tiles amortize that work over more rows of x
        BLOCK_M = 32 if M <= 64 else 64 if M <= 256 else 128
        BLOCK_N, BLOCK_K, num_warps = PREFILL_TILES[qtype.name][BLOCK_M == 128]
        BLOCK_K = block_k or BLOCK_K
    unit = UNIT[qtype.name]
    BLOCK_K = max(BLOCK_K, unit)
    assert BLOCK_K % unit == 0, f"block_k must be a multiple of {unit} for {qtype.name}"
    grid_m, grid_n, k_tiles = triton.cdiv(M, BLOCK_M), triton.cdiv(N, BLOCK_N), triton.cdiv(K, BLOCK_K)
    S = split_k or (_num_splits(grid_m * grid_n, k_tiles, x.device) if M <= GEMV_MAX_M else 1)
    tiles_per_split = triton.cdiv(k_tiles, S)
    S = triton.cdiv(k_tiles, tiles_per_split)  # no empty split
    part = out if S == 1 else torch.empty(S, M, N, dtype=torch.float32, device=x.device)
    words = qweight.view(WORD.get(qtype.name, torch.uint8))  # [N, row_bytes / word size]
    _gguf_matmul_kernel[(grid_m, grid_n, S)](
        x, words, part, M, N, K, words.shape[1], tiles_per_split, x.stride(0), 0 if S == 1 else part.stride(0), N,
        QTYPE=qtype.name, UNIT=unit, UNIT_BYTES=UNIT_BYTES[qtype.name], BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
        BLOCK_K=BLOCK_K, PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        ASM=not triton.knobs.runtime.interpret,
        num_warps=num_warps)
    if S > 1:
        BLOCK = 1024
        _split_k_reduce_kernel[(triton.cdiv(M * N, BLOCK),)](part, out, M * N, S, BLOCK=BLOCK)
    return out
