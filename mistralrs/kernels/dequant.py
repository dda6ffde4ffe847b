"""Plain-torch dequantization of every GGUF tensor type we load: the oracle of the quantized matmul kernels and the
path for types that have no kernel. Matches gguf.quants.dequantize bit for bit (same float32 operations, same order).

A row of K weights is K / QK blocks laid end to end (QK = 32, or 256 for the K-quants); multi-byte fields are
little-endian, d/dmin/m are fp16. q is the stored integer, w the weight, l the byte index inside a field.

  F32, F16, BF16  plain floats
  Q4_0  d, qs[16]                          18 B / 32 w    w = d * (q - 8); qs[l]: low nibble w[l], high w[16 + l]
  Q4_1  d, m, qs[16]                       20 B / 32 w    w = d * q + m; nibbles as Q4_0
  Q5_0  d, qh[4], qs[16]                   22 B / 32 w    w = d * (q - 16); q = nibble (as Q4_0) | bit i of qh << 4
                                                           for w[i] (qh read as one little-endian uint32)
  Q5_1  d, m, qh[4], qs[16]                24 B / 32 w    w = d * q + m; q as Q5_0
  Q8_0  d, qs[32] int8                     34 B / 32 w    w = d * q
  Q2_K  scales[16], qs[64], d, dmin        84 B / 256 w   16 sub-blocks of 16 with 4-bit scale and min:
                                                           w = d * (sc & 15) * q - dmin * (sc >> 4);
                                                           q = 2 bits j of qs[32h + l] for w[128h + 32j + l]
  Q3_K  hmask[32], qs[64], scales[12], d  110 B / 256 w   16 sub-blocks of 16 with 6-bit signed scales (s - 32):
                                                           w = d * (s - 32) * (q - 4 * (1 - hbit)); q as Q2_K,
                                                           hbit = bit j of hmask[l] for w[32j + l];
                                                           s[i] = nibble i % 8 of scales[0:8] (low nibbles first)
                                                           | 2 bits i // 4 of scales[8 + i % 4] << 4
  Q4_K  d, dmin, scales[12], qs[128]      144 B / 256 w   8 sub-blocks of 32 with 6-bit scale sc and min m:
                                                           w = d * sc * q - dmin * m; qs[32c + l]: low nibble
                                                           w[64c + l], high nibble w[64c + 32 + l]; for the scale
                                                           bytes a = [0:4], b = [4:8], c = [8:12], sub-block i < 4:
                                                           sc = a[i] & 63, m = b[i] & 63; i >= 4 (j = i - 4):
                                                           sc = c[j] & 15 | a[j] >> 6 << 4,
                                                           m = c[j] >> 4 | b[j] >> 6 << 4
  Q5_K  d, dmin, scales[12], qh[32],      176 B / 256 w   as Q4_K, with q |= bit i of qh[l] << 4 for w[32i + l]
        qs[128]
  Q6_K  ql[128], qh[64], scales[16] int8, 210 B / 256 w   16 sub-blocks of 16: w = d * sc * (q - 32),
        d                                                  q = nibble of ql | 2 bits of qh << 4: in half h (128 w),
                                                           ql[64h + l]: low nibble w[128h + l], high w[128h + 64 + l];
                                                           qh[32h + l], bits 2j: w[128h + 32j + l]
"""
import math

import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

Q = GGMLQuantizationType
FLOATS = {Q.F32: torch.float32, Q.F16: torch.float16, Q.BF16: torch.bfloat16}


def _f16(blocks: torch.Tensor, offset: int) -> torch.Tensor:
    """The fp16 field at byte `offset` of each block, as float32 [B, 1]."""
    return blocks[:, offset:offset + 2].contiguous().view(torch.float16).float()


def _fields(b: torch.Tensor, bits: int) -> torch.Tensor:
    """Split bytes [..., L] into their 8 // bits fields of `bits` bits: [..., 8 // bits, L], lowest bits first."""
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=b.device)
    return (b.unsqueeze(-2) >> shifts[:, None]) & ((1 << bits) - 1)


def _bits32(qh: torch.Tensor) -> torch.Tensor:
    """The 32 bits of a little-endian uint32 stored in bytes [B, 4]: [B, 32], bit i at i."""
    return _fields(qh, 1).transpose(1, 2).reshape(-1, 32)


def _q4_0(blocks):
    d = _f16(blocks, 0)
    q = _fields(blocks[:, 2:], 4).reshape(-1, 32)
    return d * (q.to(torch.int8) - 8).float()


def _q4_1(blocks):
    d, m = _f16(blocks, 0), _f16(blocks, 2)
    q = _fields(blocks[:, 4:], 4).reshape(-1, 32)
    return d * q.float() + m


def _q5_0(blocks):
    d = _f16(blocks, 0)
    q = _fields(blocks[:, 6:], 4).reshape(-1, 32) | (_bits32(blocks[:, 2:6]) << 4)
    return d * (q.to(torch.int8) - 16).float()


def _q5_1(blocks):
    d, m = _f16(blocks, 0), _f16(blocks, 2)
    q = _fields(blocks[:, 8:], 4).reshape(-1, 32) | (_bits32(blocks[:, 4:8]) << 4)
    return d * q.float() + m


def _q8_0(blocks):
    return blocks[:, 2:].contiguous().view(torch.int8).float() * _f16(blocks, 0)


def _q2_k(blocks):
    scales, qs = blocks[:, :16], blocks[:, 16:80]
    d, dmin = _f16(blocks, 80), _f16(blocks, 82)
    dl = (d * (scales & 15).float()).unsqueeze(-1)  # [B, 16, 1]
    ml = (dmin * (scales >> 4).float()).unsqueeze(-1)
    q = _fields(qs.reshape(-1, 2, 32), 2).reshape(-1, 16, 16).float()
    return (dl * q - ml).reshape(-1, 256)


def _q3_k(blocks):
    hmask, qs, scales = blocks[:, :32], blocks[:, 32:96], blocks[:, 96:108]
    d = _f16(blocks, 108)
    low = _fields(scales[:, :8], 4).reshape(-1, 16)
    high = _fields(scales[:, 8:], 2).reshape(-1, 16)
    s = (low | (high << 4)).to(torch.int8) - 32
    dl = (d * s.float()).unsqueeze(-1)  # [B, 16, 1]
    q = _fields(qs.reshape(-1, 2, 32), 2).reshape(-1, 16, 16).to(torch.int8)
    hbit = _fields(hmask, 1).reshape(-1, 16, 16).to(torch.int8)
    return (dl * (q - 4 * (1 - hbit)).float()).reshape(-1, 256)


def _k_scales(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K: the 8 six-bit scales and mins packed in 12 bytes -> two [B, 8] uint8 tensors."""
    a, b, c = scales[:, 0:4], scales[:, 4:8], scales[:, 8:12]
    sc = torch.cat([a & 63, (c & 15) | ((a >> 6) << 4)], dim=1)
    m = torch.cat([b & 63, (c >> 4) | ((b >> 6) << 4)], dim=1)
    return sc, m


def _q4_k(blocks):
    d, dmin = _f16(blocks, 0), _f16(blocks, 2)
    sc, m = _k_scales(blocks[:, 4:16])
    q = _fields(blocks[:, 16:].reshape(-1, 4, 32), 4).reshape(-1, 8, 32).float()
    return ((d * sc.float()).unsqueeze(-1) * q - (dmin * m.float()).unsqueeze(-1)).reshape(-1, 256)


def _q5_k(blocks):
    d, dmin = _f16(blocks, 0), _f16(blocks, 2)
    sc, m = _k_scales(blocks[:, 4:16])
    low = _fields(blocks[:, 48:].reshape(-1, 4, 32), 4).reshape(-1, 8, 32)
    q = (low | (_fields(blocks[:, 16:48], 1) << 4)).float()
    return ((d * sc.float()).unsqueeze(-1) * q - (dmin * m.float()).unsqueeze(-1)).reshape(-1, 256)


def _q6_k(blocks):
    ql, qh = blocks[:, :128], blocks[:, 128:192]
    sc = blocks[:, 192:208].contiguous().view(torch.int8).float()
    d = _f16(blocks, 208)
    low = _fields(ql.reshape(-1, 2, 64), 4).reshape(-1, 256)
    high = _fields(qh.reshape(-1, 2, 32), 2).reshape(-1, 256)
    q = (low | (high << 4)).to(torch.int8) - 32
    return ((d * sc).unsqueeze(-1) * q.reshape(-1, 16, 16).float()).reshape(-1, 256)


BLOCK_DEQUANT = {Q.Q4_0: _q4_0, Q.Q4_1: _q4_1, Q.Q5_0: _q5_0, Q.Q5_1: _q5_1, Q.Q8_0: _q8_0, Q.Q2_K: _q2_k,
                 Q.Q3_K: _q3_k, Q.Q4_K: _q4_k, Q.Q5_K: _q5_k, Q.Q6_K: _q6_k}
SUPPORTED = frozenset(FLOATS) | frozenset(BLOCK_DEQUANT)


def row_bytes(qtype: GGMLQuantizationType, K: int) -> int:
    """Bytes of one row of K weights of type qtype."""
    qtype = GGMLQuantizationType(qtype)
    if qtype not in SUPPORTED:
        allowed = ", ".join(t.name for t in sorted(SUPPORTED))
        raise ValueError(f"GGUF tensor type {qtype.name} is not supported; supported: {allowed}")
    block, size = GGML_QUANT_SIZES[qtype]
    if K % block:
        raise ValueError(f"{qtype.name} rows need a multiple of {block} weights, got K={K}")
    return K // block * size


def dequantize(data: torch.Tensor, qtype: GGMLQuantizationType, shape: tuple[int, ...],
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """GGUF bytes (uint8, [rows, row_bytes] or flat) -> weights of `shape` (last dim K contiguous) in `dtype`.

    For F32 data and a float32 result the output shares data's storage."""
    qtype = GGMLQuantizationType(qtype)
    shape = tuple(shape)
    expected = math.prod(shape[:-1]) * row_bytes(qtype, shape[-1])
    if data.dtype != torch.uint8:
        raise TypeError(f"data must be a uint8 tensor of raw GGUF bytes, got {data.dtype}")
    if data.numel() != expected:
        raise ValueError(f"{qtype.name} tensor of shape {shape} needs {expected} bytes, data has {data.numel()}")
    data = data.contiguous().view(-1)
    if qtype in FLOATS:
        w = data.view(FLOATS[qtype]).float()
    else:
        w = BLOCK_DEQUANT[qtype](data.view(-1, GGML_QUANT_SIZES[qtype][1]))
    return w.reshape(shape).to(dtype)
