"""GGUF block decoders of the dequant-matmul (gguf.py): a type's words or bytes -> its weights in fp32, in registers.

A row of qweight is K / QK blocks of its type end to end. l is a byte inside a field; the full table of every type is
in kernels/dequant.py (the reference). Layouts of the types decoded here:
    Q4_0   18 B / 32 w   d, qs[16]                    w = d * (q - 8); qs[l]: low nibble w[l], high nibble w[16 + l]
    Q8_0   34 B / 32 w   d, qs[32] int8               w = d * q
    Q4_K  144 B / 256 w  d, dmin, scales[12], qs[128]
          sub-block s (32 w): w = d * sc[s] * q - dmin * m[s]; q = nibble s % 2 of qs[32 (s // 2) + l];
          sc, m are 6-bit, packed in scales (see _k_scale_min_words)
    Q5_K  176 B / 256 w  d, dmin, scales[12], qh[32], qs[128]
          as Q4_K, with bit s of qh[l] as bit 4 of q
    Q6_K  210 B / 256 w  ql[128], qh[64], scales[16] int8, d
          group j (32 w), in half h = j // 4: w = d * scales[2j + l // 16] * (q - 32);
          q = nibble (j % 4) // 2 of ql[64h + 32 (j % 2) + l] | bits 2 (j % 4) of qh[32h + l] << 4

A K-tile of BLOCK_K weights is BLOCK_K / UNIT units of the type (the weights whose quants share bytes: a Q4_0
block, a Q4_K/Q5_K pair of sub-blocks, half a Q6_K block); dequant_tile decodes a tile.

The word path (all but Q8_0): W is read as 16/32-bit words (WORD), every unit in one thread, eight words per field
per unit, and joins and a permute that move no data put the weights in k order. A quant becomes a float by the
magic-number trick: OR-ed into the mantissa of 2^23 (0x4B000000) it makes the float 2^23 + q exactly, so one LOP3
and one FADD replace shift, mask and int-to-float (_nibble; Q5_K and Q6_K first assemble each quant in a byte of an
int32, _byte). The OR is inline PTX (mov.b32 of two halves, prmt), which LLVM cannot fold into the masks, under the
constexpr ASM; the interpreter cannot run PTX and takes a plain OR. Q8_0 loads bytes: its d is an fp16 at an
unaligned offset (34-byte blocks), which _f16 reads byte by byte.
"""
import torch
import triton
import triton.language as tl

# Each _<type>_words / _q8_0 below decodes units of its type (the weights whose quants share UNIT_BYTES bytes: a
# byte's two nibbles, Q5_K's and Q6_K's high bits) and returns their weights in fp32 [BLOCK_N, U, ...] in k order,
# which dequant_tile reshapes to [BLOCK_N, BLOCK_K]. The word paths take row [BLOCK_N, 1] word pointers to the rows'
# first words and u [1, U] the absolute unit index; Q8_0's byte path takes both with a trailing 1, l [1, 1,
# UNIT_BYTES] the byte and mask [BLOCK_N, U, 1].
UNIT = {"Q4_0": 32, "Q8_0": 32, "Q4_K": 64, "Q5_K": 64, "Q6_K": 128}  # weights per unit
# What the kernel loads W as (else bytes): Q4_0 and Q6_K blocks are only 2-byte aligned.
WORD = {"Q4_0": torch.int16, "Q4_K": torch.int32, "Q5_K": torch.int32, "Q6_K": torch.int16}
UNIT_BYTES = {"Q4_0": 16, "Q8_0": 32, "Q4_K": 32, "Q5_K": 32, "Q6_K": 32}


@triton.jit
def _f16(ptr, mask):
    """The little-endian fp16 at byte ptr, as fp32."""
    lo = tl.load(ptr, mask=mask, other=0).to(tl.uint16)
    hi = tl.load(ptr + 1, mask=mask, other=0).to(tl.uint16)
    return (lo | (hi << 8)).to(tl.float16, bitcast=True).to(tl.float32)


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
def _k_scales_words(block, c):
    """Q4_K/Q5_K: d, dmin (word 0) and the scales (words 1 .. 3) of sub-blocks 2c, 2c + 1 as
    (d sc, d sc'), (dmin m, dmin m')."""
    dd = tl.load(block)
    d = (dd & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    dmin = (dd >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    sc = (tl.load(block + 1), tl.load(block + 2), tl.load(block + 3))
    sc0, m0 = _k_scale_min_words(sc, 2 * c)
    sc1, m1 = _k_scale_min_words(sc, 2 * c + 1)
    return (d * sc0, d * sc1), (dmin * m0, dmin * m1)


@triton.jit
def _k_scale_min_words(sc, s):
    """6-bit scale and min of sub-block s from the 12 scale bytes as 3 int32 words (byte b of w: (w >> 8 b) & 255):
    for the bytes a = [0:4], b = [4:8], c = [8:12], s < 4: a[s] & 63, b[s] & 63; else the low / high nibble of
    c[s - 4] with the top two bits of a[s - 4] / b[s - 4] above it."""
    shift = 8 * (s % 4)
    a = (sc[0] >> shift) & 255
    b = (sc[1] >> shift) & 255
    c = (sc[2] >> shift) & 255
    sc_ = tl.where(s < 4, a & 63, (c & 15) | ((a >> 6) << 4))
    m = tl.where(s < 4, b & 63, (c >> 4) | ((b >> 6) << 4))
    return sc_.to(tl.float32), m.to(tl.float32)


@triton.jit
def _q4_k_words(row, u, ASM: tl.constexpr):
    """Q4_K from int32 words: a block is 36 (d | dmin << 16, scales[12], qs), 16-byte aligned. row [BLOCK_N, 1],
    u [1, U] the pair of sub-blocks 2c, 2c + 1 of block u // 4 (c = u % 4): nibbles 0, 1 of qs[32c + l]."""
    block = row + (u // 4) * 36
    c = u % 4
    scales, lows = _k_scales_words(block, c)
    w = _stack8(_q4_k_word(block, c, 0, scales, lows, ASM), _q4_k_word(block, c, 1, scales, lows, ASM),
                _q4_k_word(block, c, 2, scales, lows, ASM), _q4_k_word(block, c, 3, scales, lows, ASM),
                _q4_k_word(block, c, 4, scales, lows, ASM), _q4_k_word(block, c, 5, scales, lows, ASM),
                _q4_k_word(block, c, 6, scales, lows, ASM), _q4_k_word(block, c, 7, scales, lows, ASM))
    # [BLOCK_N, U, a, b, h, b0, b1, b2] holds weight 32 h + 4 i + a + 2 b, i = b0 + 2 b1 + 4 b2
    return tl.permute(w, (0, 1, 4, 7, 6, 5, 3, 2))


# Q5_K and Q6_K quants are split over two fields (low nibbles, high bits). Their word paths put each quant together
# in a byte of an int32 (4 at a time: shift, mask, or) and turn a byte into a float with one prmt: 0x4B0000 above the
# byte makes the float 2^23 + q exactly, as _nibble does for a nibble.
@triton.jit
def _byte(q, B: tl.constexpr, ASM: tl.constexpr):
    """Byte B of int32 words q, as fp32 (exact)."""
    if ASM:
        if B == 0:
            magic = tl.inline_asm_elementwise("{ .reg .b32 m; mov.b32 m, 0x4B000000; prmt.b32 $0, $1, m, 0x7540; }",
                                              "=r,r", [q], dtype=tl.int32, is_pure=True, pack=1)
        elif B == 1:
            magic = tl.inline_asm_elementwise("{ .reg .b32 m; mov.b32 m, 0x4B000000; prmt.b32 $0, $1, m, 0x7541; }",
                                              "=r,r", [q], dtype=tl.int32, is_pure=True, pack=1)
        elif B == 2:
            magic = tl.inline_asm_elementwise("{ .reg .b32 m; mov.b32 m, 0x4B000000; prmt.b32 $0, $1, m, 0x7542; }",
                                              "=r,r", [q], dtype=tl.int32, is_pure=True, pack=1)
        else:
            magic = tl.inline_asm_elementwise("{ .reg .b32 m; mov.b32 m, 0x4B000000; prmt.b32 $0, $1, m, 0x7543; }",
                                              "=r,r", [q], dtype=tl.int32, is_pure=True, pack=1)
    else:
        magic = ((q >> 8 * B) & 255) | 0x4B000000
    return magic.to(tl.float32, bitcast=True) - 8388608.0


@triton.jit
def _bytes4(q, scale, low, ASM: tl.constexpr):
    """scale * byte - low for the 4 bytes of q, as [..., a, b] (byte a + 2b)."""
    return _join4(_byte(q, 0, ASM) * scale - low, _byte(q, 1, ASM) * scale - low,
                  _byte(q, 2, ASM) * scale - low, _byte(q, 3, ASM) * scale - low)


@triton.jit
def _q5_k_word(block, c, i: tl.constexpr, scales, lows, ASM: tl.constexpr):
    """Word i of pair c's qs and of qh (bytes 4i .. 4i + 3) as [..., a, b, h], weight 32 h + 4i + a + 2b of the
    pair: nibble h of qs[32c + l] | bit 2c + h of qh[l] << 4."""
    qs = tl.load(block + 12 + 8 * c + i)
    qh = tl.load(block + 4 + i) >> (2 * c)
    q0 = (qs & 0x0F0F0F0F) | ((qh << 4) & 0x10101010)
    q1 = ((qs >> 4) & 0x0F0F0F0F) | ((qh << 3) & 0x10101010)
    return tl.join(_bytes4(q0, scales[0], lows[0], ASM), _bytes4(q1, scales[1], lows[1], ASM))


@triton.jit
def _q5_k_words(row, u, ASM: tl.constexpr):
    """Q5_K from int32 words: a block is 44 (d | dmin << 16, scales[12], qh[32], qs), 16-byte aligned; u as Q4_K."""
    block = row + (u // 4) * 44
    c = u % 4
    scales, lows = _k_scales_words(block, c)
    w = _stack8(_q5_k_word(block, c, 0, scales, lows, ASM), _q5_k_word(block, c, 1, scales, lows, ASM),
                _q5_k_word(block, c, 2, scales, lows, ASM), _q5_k_word(block, c, 3, scales, lows, ASM),
                _q5_k_word(block, c, 4, scales, lows, ASM), _q5_k_word(block, c, 5, scales, lows, ASM),
                _q5_k_word(block, c, 6, scales, lows, ASM), _q5_k_word(block, c, 7, scales, lows, ASM))
    return tl.permute(w, (0, 1, 4, 7, 6, 5, 3, 2))  # as Q4_K


@triton.jit
def _word32(ptr):
    """The int32 at int16 pointer ptr (2-byte aligned only: two loads)."""
    return (tl.load(ptr).to(tl.int32) & 0xFFFF) | (tl.load(ptr + 1).to(tl.int32) << 16)


@triton.jit
def _q6_k_scales(ptr, d):
    """d * the two int8 scales in the int16 at ptr."""
    sc = tl.load(ptr).to(tl.int32)
    return d * ((sc << 24) >> 24).to(tl.float32), d * (sc >> 8).to(tl.float32)


@triton.jit
def _q6_k_word(ql, qh, i: tl.constexpr, scales, ASM: tl.constexpr):
    """Word i (bytes 4i .. 4i + 3) of the half's ql[0:32], ql[32:64] and qh as [..., a, b, g0, g1], weight
    32 g + 4i + a + 2b of the half: nibble g // 2 of ql[32 (g % 2) + l] | bits 2g of qh[l] << 4."""
    ql0 = _word32(ql + 2 * i)
    ql1 = _word32(ql + 16 + 2 * i)
    qh_ = _word32(qh + 2 * i)
    s = scales[i // 4]  # l = 4i + a < 16 iff i < 4: scale 2g of the half, else 2g + 1
    return _join4(_bytes4((ql0 & 0x0F0F0F0F) | ((qh_ << 4) & 0x30303030), s[0], 32 * s[0], ASM),
                  _bytes4((ql1 & 0x0F0F0F0F) | ((qh_ << 2) & 0x30303030), s[1], 32 * s[1], ASM),
                  _bytes4(((ql0 >> 4) & 0x0F0F0F0F) | (qh_ & 0x30303030), s[2], 32 * s[2], ASM),
                  _bytes4(((ql1 >> 4) & 0x0F0F0F0F) | ((qh_ >> 2) & 0x30303030), s[3], 32 * s[3], ASM))


@triton.jit
def _q6_k_words(row, u, ASM: tl.constexpr):
    """Q6_K from int16 words: a block is 105 (ql[64], qh[32], scales[8], d), only 2-byte aligned. row [BLOCK_N, 1],
    u [1, U] the half h = u % 2 of block u // 2: ql[32h:32h + 32], qh[64 + 16h:...], scales[96 + 4h:...]."""
    block = row + (u // 2) * 105
    h = u % 2
    d = tl.load(block + 104).to(tl.float16, bitcast=True).to(tl.float32)
    s0, t0 = _q6_k_scales(block + 96 + 4 * h, d)  # group g's scales for l < 16 and l >= 16 are in word g
    s1, t1 = _q6_k_scales(block + 97 + 4 * h, d)
    s2, t2 = _q6_k_scales(block + 98 + 4 * h, d)
    s3, t3 = _q6_k_scales(block + 99 + 4 * h, d)
    scales = ((s0, s1, s2, s3), (t0, t1, t2, t3))
    ql, qh = block + 32 * h, block + 64 + 16 * h
    w = _stack8(_q6_k_word(ql, qh, 0, scales, ASM), _q6_k_word(ql, qh, 1, scales, ASM),
                _q6_k_word(ql, qh, 2, scales, ASM), _q6_k_word(ql, qh, 3, scales, ASM),
                _q6_k_word(ql, qh, 4, scales, ASM), _q6_k_word(ql, qh, 5, scales, ASM),
                _q6_k_word(ql, qh, 6, scales, ASM), _q6_k_word(ql, qh, 7, scales, ASM))
    # [BLOCK_N, U, a, b, g0, g1, b0, b1, b2] holds weight 32 g + 4 i + a + 2 b, g = g0 + 2 g1, i = b0 + 2 b1 + 4 b2
    return tl.permute(w, (0, 1, 5, 4, 8, 7, 6, 3, 2))


@triton.jit
def _q8_0(row, u, l, mask):
    block = row + u * 34
    d = _f16(block, mask)
    q = tl.load(block + 2 + l, mask=mask, other=0).to(tl.int8, bitcast=True)
    return d * q.to(tl.float32)


@triton.jit
def dequant_tile(w_ptr, offs_n, n_mask, k0, N, K, row_stride, QTYPE: tl.constexpr, UNIT: tl.constexpr,
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
        w = _q5_k_words(row_in, u_in, ASM)
    else:
        tl.static_assert(QTYPE == "Q6_K")
        w = _q6_k_words(row_in, u_in, ASM)
    return tl.reshape(w, (BLOCK_N, BLOCK_K))

