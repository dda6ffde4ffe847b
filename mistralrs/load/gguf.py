"""Reading a GGUF file: metadata as plain Python values, tensors as raw (still quantized) bytes of the file.

A GGUF file (little-endian): b"GGUF", version u32 (2 or 3), tensor count u64, metadata count u64; metadata entries
(key string, value type u32, value); tensor infos (name string, n_dims u32, dims u64[n_dims] innermost first, type
u32, offset u64); padding to `general.alignment` (32); tensor data at those offsets. A string is a u64 length and
UTF-8 bytes; an array is an item type u32, a u64 count, the items.

The header is read here, in one bounds-checked pass over the memory-mapped file, so a corrupt count or length is a
ValueError naming the file, never a runaway loop. Metadata arrays are only located by that pass and decoded when
first looked up: the architecture and hyperparameters are checked before anyone decodes a 262k-token vocabulary
(gguf.GGUFReader spends most of a minute building its fields for one). Tensors are views of the mapping.
"""
import math
import mmap
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from ..kernels.dequant import SUPPORTED, row_bytes

V = GGUFValueType
SCALAR_SIZES = {V.UINT8: 1, V.INT8: 1, V.UINT16: 2, V.INT16: 2, V.UINT32: 4, V.INT32: 4, V.FLOAT32: 4, V.BOOL: 1,
                V.UINT64: 8, V.INT64: 8, V.FLOAT64: 8}
SCALAR_FORMATS = {V.UINT8: "<B", V.INT8: "<b", V.UINT16: "<H", V.INT16: "<h", V.UINT32: "<I", V.INT32: "<i",
                  V.FLOAT32: "<f", V.BOOL: "<?", V.UINT64: "<Q", V.INT64: "<q", V.FLOAT64: "<d"}  # struct = numpy
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
    metadata: Mapping  # a Metadata for GGUF files, a dict for legacy GGML ones
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
        elif itype == V.STRING:
            _skip_strings(c, n, key)
        else:
            for _ in range(n):
                _skip_value(c, itype, key, depth + 1)


def _skip_strings(c: Cursor, n: int, key: str) -> None:
    """n strings, walked with the bounds check inlined: a vocabulary has hundreds of thousands."""
    buf, pos, size = c.buf, c.pos, len(c.buf)
    for i in range(n):
        if pos + 8 > size:
            c.pos = pos
            c.take(8, f"length of item {i} of {key!r}")
        pos += 8 + struct.unpack_from("<Q", buf, pos)[0]
        if pos > size:
            raise ValueError(f"{c.path}: file is truncated or corrupt: item {i} of {key!r} runs past the end of the "
                             f"file ({size} bytes)")
    c.pos = pos


def _read_value(c: Cursor, vtype: GGUFValueType, key: str):
    """The value at the cursor, whose bounds the header pass has checked."""
    if vtype in SCALAR_SIZES:
        return struct.unpack(SCALAR_FORMATS[vtype], c.take(SCALAR_SIZES[vtype], key))[0]
    if vtype == V.STRING:
        try:
            return bytes(c.string(key)).decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{c.path}: metadata {key!r} is not valid UTF-8: {e}") from None
    itype, n = GGUFValueType(c.u32(key)), c.u64(key)
    if itype in SCALAR_SIZES:
        items = np.frombuffer(c.buf, SCALAR_FORMATS[itype], n, c.pos)
        c.pos += n * SCALAR_SIZES[itype]
        return items.tolist()
    if itype == V.STRING:
        return _read_strings(c, n, key)
    return [_read_value(c, itype, key) for _ in range(n)]


def _read_strings(c: Cursor, n: int, key: str) -> list[str]:
    buf, pos, out = c.buf, c.pos, []
    try:
        for _ in range(n):
            end = pos + 8 + struct.unpack_from("<Q", buf, pos)[0]
            out.append(buf[pos + 8:end].decode("utf-8"))
            pos = end
    except UnicodeDecodeError as e:
        raise ValueError(f"{c.path}: item {len(out)} of metadata {key!r} is not valid UTF-8: {e}") from None
    c.pos = pos
    return out


class Metadata(Mapping):
    """A GGUF file's metadata. Scalars and strings are read with the header; an array is decoded when first looked
    up, so `in`, iteration and the architecture keys cost nothing for a file with a large vocabulary."""

    def __init__(self, buf, path: Path):
        self._buf, self._path = buf, path
        self._values: dict[str, object] = {}
        self._arrays: dict[str, int] = {}  # key -> file offset of the array (its item type)
        self._keys: list[str] = []

    def _add(self, key: str, vtype: GGUFValueType, pos: int) -> None:
        if key in self._values or key in self._arrays:
            raise ValueError(f"{self._path}: metadata key {key!r} appears twice")
        self._keys.append(key)
        if vtype == V.ARRAY:
            self._arrays[key] = pos
        else:
            c = Cursor(self._buf, self._path)
            c.pos = pos
            self._values[key] = _read_value(c, vtype, key)

    def __getitem__(self, key: str):
        if key not in self._values:
            c = Cursor(self._buf, self._path)
            c.pos = self._arrays[key]
            self._values[key] = _read_value(c, V.ARRAY, key)
        return self._values[key]

    def __contains__(self, key) -> bool:
        return key in self._values or key in self._arrays

    def __iter__(self):
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def _parse(buf, path: Path) -> tuple[Metadata, dict[str, RawTensor]]:
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
    metadata = Metadata(buf, path)
    for i in range(n_kv):
        key = c.string(f"metadata key {i}").decode("utf-8", "replace")
        vtype = _value_type(c.u32(f"type of {key!r}"), f"metadata {key!r}", path)
        start = c.pos
        _skip_value(c, vtype, key)
        metadata._add(key, vtype, start)
    alignment = metadata.get("general.alignment", 32)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise ValueError(f"{path}: general.alignment is {alignment!r}, not a power of two")
    infos = []
    for i in range(n_tensors):
        name = c.string(f"name of tensor {i}").decode("utf-8", "replace")
        n_dims = c.u32(f"dimension count of tensor {name!r}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise ValueError(f"{path}: tensor {name!r} has {n_dims} dimensions; GGUF allows 1 to {MAX_DIMS}")
        dims = [c.u64(f"dimensions of tensor {name!r}") for _ in range(n_dims)]
        infos.append((name, dims, c.u32(f"type of tensor {name!r}"), c.u64(f"offset of tensor {name!r}")))
    data_start = -(-c.pos // alignment) * alignment
    tensors = {}
    for name, dims, raw_type, offset in infos:
        qtype = tensor_type(raw_type, name, path)
        block, size = GGML_QUANT_SIZES[qtype]
        if min(dims) < 1 or dims[0] % block:
            raise ValueError(f"{path}: tensor {name!r} has dimensions {dims}, impossible for type {qtype.name} "
                             f"(rows of a multiple of {block} weights)")
        nbytes = math.prod(dims) // block * size
        if offset % alignment:
            raise ValueError(f"{path}: tensor {name!r} starts at data offset {offset}, not a multiple of the file's "
                             f"alignment ({alignment})")
        if data_start + offset + nbytes > len(buf):
            raise ValueError(f"{path}: file is truncated or corrupt: tensor {name!r} ends at byte "
                             f"{data_start + offset + nbytes}, the file has {len(buf)}")
        if name in tensors:
            raise ValueError(f"{path}: tensor {name!r} appears twice")
        shape = tuple(reversed(dims))  # torch order: the contiguous row last
        data = np.frombuffer(buf, np.uint8, nbytes, data_start + offset)
        tensors[name] = RawTensor(name, qtype, shape, data.reshape(math.prod(shape[:-1]), row_bytes(qtype, dims[0])))
    _check_disjoint([(offset, t.data.nbytes, name) for (name, _, _, offset), t in zip(infos, tensors.values())], path)
    return metadata, tensors


def _check_disjoint(regions: list[tuple[int, int, str]], path: Path) -> None:
    """No two tensors may share bytes: a file whose regions overlap is corrupt (or crafted to look small)."""
    end, last = 0, None
    for offset, nbytes, name in sorted(regions):
        if offset < end:
            raise ValueError(f"{path}: tensor {name!r} (data offset {offset}) overlaps tensor {last!r}, which ends "
                             f"at {end}")
        end, last = offset + nbytes, name



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


def map_file(path: Path, kind: str) -> mmap.mmap:
    """The whole file, read-only mapped (the tensors and metadata stay views of it); `kind` names it in errors."""
    if not path.is_file():
        raise FileNotFoundError(f"{kind} file {str(path)!r} does not exist or is not a file")
    if path.stat().st_size == 0:
        raise ValueError(f"{path} is empty, not a {kind} file")
    with open(path, "rb") as f:
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)


def read_gguf(path) -> GGUFFile:
    path = Path(path)
    buf = map_file(path, "GGUF")
    metadata, tensors = _parse(buf, path)
    return GGUFFile(path, metadata, tensors)
