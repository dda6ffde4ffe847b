"""Reading a GGUF file: metadata as plain Python values, tensors as raw (still quantized) bytes of the file.

A GGUF file (little-endian): b"GGUF", version u32 (2 or 3), tensor count u64, metadata count u64; metadata entries
(key string, value type u32, value); tensor infos (name string, n_dims u32, dims u64[n_dims] innermost first, type
u32, offset u64); padding to `general.alignment` (32); tensor data at those offsets. A string is a u64 length and
UTF-8 bytes; an array is an item type u32, a u64 count, the items.

gguf.GGUFReader does the parsing. It trusts the counts it reads, so a corrupt array length makes it loop (nearly)
forever past the end of the file; a bounds-checked scan of the header runs first and turns every such problem
into a ValueError naming the file.
"""
import math
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, GGUFValueType

from ..kernels.dequant import SUPPORTED, row_bytes

V = GGUFValueType
SCALAR_SIZES = {V.UINT8: 1, V.INT8: 1, V.UINT16: 2, V.INT16: 2, V.UINT32: 4, V.INT32: 4, V.FLOAT32: 4, V.BOOL: 1,
                V.UINT64: 8, V.INT64: 8, V.FLOAT64: 8}
MIN_ITEM_SIZE = {**SCALAR_SIZES, V.STRING: 8, V.ARRAY: 12}
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_NESTING = 8


@dataclass
class RawTensor:
    """One tensor as the file stores it. `shape` is in torch order (the contiguous row of K weights last); `data`
    is uint8 [rows, row_bytes], a view of the file until someone copies it."""
    name: str
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]
    data: np.ndarray

    @property
    def quantized(self) -> bool:
        return self.qtype not in (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16)


@dataclass
class GGUFFile:
    path: Path
    metadata: dict
    tensors: dict[str, RawTensor]


class Cursor:
    """Reads little-endian fields of `buf`, refusing to go past its end."""

    def __init__(self, buf, path: Path):
        self.buf, self.path, self.pos = buf, path, 0

    def take(self, n: int, what: str) -> bytes:
        if n > len(self.buf) - self.pos:
            raise ValueError(f"{self.path}: file is truncated or corrupt: {what} at byte {self.pos} needs {n} bytes, "
                             f"only {len(self.buf) - self.pos} remain")
        self.pos += n
        return self.buf[self.pos - n:self.pos]

    def u32(self, what: str) -> int:
        return struct.unpack("<I", self.take(4, what))[0]

    def u64(self, what: str) -> int:
        return struct.unpack("<Q", self.take(8, what))[0]

    def string(self, what: str) -> bytes:
        return self.take(self.u64(f"length of {what}"), what)

    def string_u32(self, what: str) -> bytes:
        return self.take(self.u32(f"length of {what}"), what)

    def count(self, n: int, item_size: int, what: str) -> int:
        """A count of items that must fit in what is left of the file."""
        if n * item_size > len(self.buf) - self.pos:
            raise ValueError(f"{self.path}: file is truncated or corrupt: {what} claims {n} items at byte {self.pos}, "
                             f"more than the {len(self.buf) - self.pos} bytes left can hold")
        return n


def _value_type(raw: int, where: str, path: Path) -> GGUFValueType:
    try:
        return GGUFValueType(raw)
    except ValueError:
        raise ValueError(f"{path}: {where} has unknown value type {raw}") from None


def _skip_value(c: Cursor, vtype: GGUFValueType, key: str, depth: int = 0) -> None:
    if vtype in SCALAR_SIZES:
        c.take(SCALAR_SIZES[vtype], f"value of {key!r}")
    elif vtype == V.STRING:
        c.string(f"value of {key!r}")
    else:  # ARRAY
        if depth >= MAX_NESTING:
            raise ValueError(f"{c.path}: metadata {key!r} nests arrays more than {MAX_NESTING} deep")
        itype = _value_type(c.u32(f"item type of {key!r}"), f"metadata {key!r}", c.path)
        n = c.count(c.u64(f"length of {key!r}"), MIN_ITEM_SIZE[itype], f"array {key!r}")
        if itype in SCALAR_SIZES:
            c.take(n * SCALAR_SIZES[itype], f"items of {key!r}")
        else:
            for _ in range(n):
                _skip_value(c, itype, key, depth + 1)


def _check_layout(buf, path: Path) -> None:
    """Walk the header with bounds checks: every length fits in the file, every tensor type is one we can load,
    every tensor's bytes lie inside the file."""
    c = Cursor(buf, path)
    magic = bytes(c.take(4, "the magic number"))
    if magic != b"GGUF":
        raise ValueError(f"{path} is not a GGUF file: it starts with {magic!r}, not b'GGUF'")
    version = c.u32("version")
    if version not in (2, 3):
        hint = " (a big-endian file?)" if version & 0xFFFF == 0 else ""
        raise ValueError(f"{path}: GGUF version {version} is not supported{hint}; supported: 2, 3")
    n_tensors, n_kv = c.u64("tensor count"), c.u64("metadata count")
    c.count(n_kv, 8 + 4 + 1, "metadata count")
    c.count(n_tensors, 8 + 4 + 4 + 8, "tensor count")
    alignment = 32
    for i in range(n_kv):
        key = c.string(f"metadata key {i}").decode("utf-8", "replace")
        vtype = _value_type(c.u32(f"type of {key!r}"), f"metadata {key!r}", path)
        start = c.pos
        _skip_value(c, vtype, key)
        if key == "general.alignment" and vtype == V.UINT32:
            alignment = struct.unpack_from("<I", buf, start)[0]
    if alignment == 0 or alignment & (alignment - 1):
        raise ValueError(f"{path}: general.alignment is {alignment}, not a power of two")
    infos = []
    for i in range(n_tensors):
        name = c.string(f"name of tensor {i}").decode("utf-8", "replace")
        n_dims = c.u32(f"dimension count of tensor {name!r}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise ValueError(f"{path}: tensor {name!r} has {n_dims} dimensions; GGUF allows 1 to {MAX_DIMS}")
        dims = [c.u64(f"dimensions of tensor {name!r}") for _ in range(n_dims)]
        raw_type = c.u32(f"type of tensor {name!r}")
        offset = c.u64(f"offset of tensor {name!r}")
        infos.append((name, dims, raw_type, offset))
    data_start = -(-c.pos // alignment) * alignment
    for name, dims, raw_type, offset in infos:
        qtype = tensor_type(raw_type, name, path)
        block, size = GGML_QUANT_SIZES[qtype]
        if min(dims) < 1 or dims[0] % block:
            raise ValueError(f"{path}: tensor {name!r} has dimensions {dims}, impossible for type {qtype.name} "
                             f"(rows of a multiple of {block} weights)")
        end = data_start + offset + math.prod(dims) // block * size
        if end > len(buf):
            raise ValueError(f"{path}: file is truncated or corrupt: tensor {name!r} ends at byte {end}, "
                             f"the file has {len(buf)}")


def tensor_type(raw: int, name: str, path: Path) -> GGMLQuantizationType:
    try:
        qtype = GGMLQuantizationType(raw)
    except ValueError:
        raise ValueError(f"{path}: tensor {name!r} has unknown tensor type id {raw}") from None
    if qtype not in SUPPORTED:
        allowed = ", ".join(t.name for t in sorted(SUPPORTED))
        raise ValueError(f"{path}: tensor {name!r} has type {qtype.name}, which mistralrs cannot load; "
                         f"supported: {allowed}")
    return qtype


def _metadata_value(field, path: Path):
    try:
        return field.contents()
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: metadata {field.name!r} is not valid UTF-8: {e}") from None


def read_gguf(path) -> GGUFFile:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {str(path)!r} does not exist or is not a file")
    if path.stat().st_size == 0:
        raise ValueError(f"{path} is empty, not a GGUF file")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        _check_layout(buf, path)
    try:
        reader = GGUFReader(path)
    except OSError:
        raise
    except Exception as e:  # the layout is checked, so this is a corrupt value the scan does not interpret
        raise ValueError(f"{path} is not a readable GGUF file: {type(e).__name__}: {e}") from None
    metadata = {name: _metadata_value(field, path) for name, field in reader.fields.items()
                if not name.startswith("GGUF.")}
    tensors = {}
    for t in reader.tensors:
        qtype = GGMLQuantizationType(int(t.tensor_type))
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        rows = math.prod(shape[:-1])
        data = np.asarray(t.data).reshape(-1).view(np.uint8).reshape(rows, row_bytes(qtype, shape[-1]))
        tensors[t.name] = RawTensor(t.name, qtype, shape, data)
    return GGUFFile(path, metadata, tensors)
