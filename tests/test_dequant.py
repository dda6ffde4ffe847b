"""Our torch dequantizer against gguf's own (gguf.quants.dequantize), bit for bit, for every tensor type we load."""
import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, quants
from gguf import GGMLQuantizationType as Q

from mistralrs.kernels.dequant import SUPPORTED, dequantize, row_bytes

from helpers import gguf_quantized, random_blocks

# gguf.quants.quantize implements these (F32/F16 by a cast); the K-quants it can only dequantize.
GGUF_CAN_QUANTIZE = [Q.F32, Q.F16, Q.BF16, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0]
BLOCK_TYPES = [Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K]
# Byte offsets of the fp16 fields (d, dmin, m) in each block type.


def check_bit_identical(data: np.ndarray, qtype, shape):
    expected = torch.from_numpy(quants.dequantize(data, qtype).astype(np.float32, copy=False)).reshape(shape)
    ours = dequantize(torch.from_numpy(data), qtype, shape)
    assert ours.dtype == torch.float32 and ours.shape == shape
    assert torch.isfinite(expected).all()
    assert torch.equal(ours, expected), (ours - expected).abs().max()


SHAPES = [(1, 1), (7, 1), (1, 3), (7, 3)]  # (rows, blocks per row)


@pytest.mark.parametrize("rows,blocks", SHAPES, ids=[f"{r}x{b}blk" for r, b in SHAPES])
@pytest.mark.parametrize("qtype", GGUF_CAN_QUANTIZE, ids=lambda t: t.name)
def test_gguf_quantized_data(qtype, rows, blocks):
    K = blocks * GGML_QUANT_SIZES[qtype][0] * (1 if GGML_QUANT_SIZES[qtype][0] > 1 else 32)
    check_bit_identical(gguf_quantized(qtype, rows, K, np.random.default_rng(rows * 10 + blocks)), qtype, (rows, K))


@pytest.mark.parametrize("rows,blocks", SHAPES, ids=[f"{r}x{b}blk" for r, b in SHAPES])
@pytest.mark.parametrize("qtype", BLOCK_TYPES, ids=lambda t: t.name)
def test_random_bytes(qtype, rows, blocks):
    """Every bit pattern of the quants and packed scales, not just those a quantizer produces."""
    K = blocks * GGML_QUANT_SIZES[qtype][0]
    check_bit_identical(random_blocks(qtype, rows, K, np.random.default_rng(rows * 10 + blocks)), qtype, (rows, K))


def test_every_supported_type_is_tested():
    assert SUPPORTED == set(GGUF_CAN_QUANTIZE) | set(BLOCK_TYPES)


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q8_0, Q.F16], ids=lambda t: t.name)
def test_flat_data_logical_shape_and_dtype(qtype):
    K = 2 * GGML_QUANT_SIZES[qtype][0] * (32 if qtype == Q.F16 else 1)
    data = (random_blocks(qtype, 6, K, np.random.default_rng(1)) if qtype != Q.F16
            else gguf_quantized(qtype, 6, K, np.random.default_rng(1)))
    rows = dequantize(torch.from_numpy(data), qtype, (6, K))
    flat = dequantize(torch.from_numpy(data).reshape(-1), qtype, (2, 3, K), dtype=torch.float16)
    assert flat.shape == (2, 3, K) and flat.dtype == torch.float16
    torch.testing.assert_close(flat, rows.reshape(2, 3, K).half(), atol=0, rtol=0)


def test_row_bytes():
    assert row_bytes(Q.Q4_0, 4096) == 4096 // 32 * 18
    assert row_bytes(Q.Q6_K, 512) == 2 * 210
    assert row_bytes(Q.F32, 3) == 12


def test_wrong_byte_count_names_type_and_sizes():
    data = torch.zeros(2 * 18 + 1, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"Q4_0.*36 bytes.*37"):
        dequantize(data, Q.Q4_0, (1, 64))


def test_k_not_a_multiple_of_the_block():
    with pytest.raises(ValueError, match=r"Q4_K.*256.*K=100"):
        row_bytes(Q.Q4_K, 100)


@pytest.mark.parametrize("qtype", [Q.IQ2_XXS, Q.Q8_K, Q.TQ1_0], ids=lambda t: t.name)
def test_unsupported_type(qtype):
    with pytest.raises(ValueError, match=qtype.name):
        dequantize(torch.zeros(1024, dtype=torch.uint8), qtype, (1, 256))


def test_wrong_data_dtype():
    with pytest.raises(TypeError, match="uint8"):
        dequantize(torch.zeros(18, dtype=torch.int8), Q.Q4_0, (1, 32))
