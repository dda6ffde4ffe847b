"""Which slice of each full tensor a rank of a tensor-parallel model holds (the cuts are listed in __init__.py), and
the hyperparameters of its shard (local_args), from which it builds its model."""
import dataclasses

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES

COLUMN = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "fc1", "w1", "w3")
ROW = ("o_proj", "down_proj", "fc2", "w2")
VOCAB = ("embed_tokens", "lm_head")


def check_divisible(args, n: int) -> None:
    """ValueError unless n ranks can share the model's heads, KV heads and intermediate features."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"tensor_parallel_size must be an int >= 1, got {n!r}")
    H, KVH, inter = args.num_attention_heads, args.num_key_value_heads, args.intermediate_size
    if H % n:
        raise ValueError(f"tensor_parallel_size {n} must divide num_attention_heads ({H})")
    if inter % n:
        raise ValueError(f"tensor_parallel_size {n} must divide intermediate_size ({inter})")
    if KVH % n and n % KVH:
        raise ValueError(f"tensor_parallel_size {n} must divide num_key_value_heads ({KVH}) or be a multiple of it "
                         f"(each rank then holds a copy of one KV head)")


def local_args(args, n: int):
    """The hyperparameters of one rank's shard: its heads, KV heads, intermediate features and vocabulary rows."""
    return dataclasses.replace(args, num_attention_heads=args.num_attention_heads // n,
                               num_key_value_heads=max(1, args.num_key_value_heads // n),
                               intermediate_size=args.intermediate_size // n, vocab_size=-(-args.vocab_size // n))


@dataclasses.dataclass(frozen=True)
class Shard:
    """Which slice of each full tensor rank `rank` of `world` holds. full_shapes: every parameter of the whole model
    (a meta-device build of it), against which the files' tensors are checked before they are cut."""
    rank: int
    world: int
    args: object
    full_shapes: dict[str, tuple[int, ...]]

    @classmethod
    def of(cls, build, args, tp, full_shapes: dict | None = None) -> "Shard | None":
        """The shard of rank tp.rank of the model build(args) makes (a model file's build), whose parameter shapes
        are full_shapes when the caller has them (else a meta-device build tells); None without tp."""
        if tp is None:
            return None
        check_divisible(args, tp.world)
        if full_shapes is None:
            with torch.device("meta"):
                full_shapes = {k: tuple(v.shape) for k, v in build(args).state_dict().items()}
        return cls(tp.rank, tp.world, args, full_shapes)

    def part(self, name: str, shape: tuple[int, ...]) -> tuple[int, int, int, int] | None:
        """(dim, start, stop, size) of the rank's slice of tensor `name` (of the full `shape`), size being the
        slice's length once padded; None: the rank holds it whole. Ranks > 0 get an empty slice (start == stop) of a
        row-parallel bias: zeros."""
        if name in self.full_shapes and tuple(shape) != tuple(self.full_shapes[name]):
            raise ValueError(f"tensor {name} has shape {tuple(shape)}, the config implies {self.full_shapes[name]}")
        module, param = name.split(".")[-2:]
        r, n = self.rank, self.world
        if module in VOCAB:
            size = -(-shape[0] // n)
            return 0, min(r * size, shape[0]), min((r + 1) * size, shape[0]), size
        if module in ("k_proj", "v_proj"):
            a = self.args
            first = r * a.num_attention_heads // n // (a.num_attention_heads // a.num_key_value_heads)
            heads = max(1, a.num_key_value_heads // n)
            return 0, first * a.head_dim, (first + heads) * a.head_dim, heads * a.head_dim
        if module in COLUMN:
            size = shape[0] // n
            return 0, r * size, (r + 1) * size, size
        if module in ROW and param == "bias":
            return 0, 0, shape[0] if r == 0 else 0, shape[0]
        if module in ROW:
            size = shape[1] // n
            return 1, r * size, (r + 1) * size, size
        return None

    def tensor(self, name: str, full) -> torch.Tensor:
        """The rank's slice of a safetensors tensor, given as its get_slice() (read only where sliced)."""
        p = self.part(name, tuple(full.get_shape()))
        if p is None:
            return full[...]
        dim, start, stop, size = p
        index = (slice(start, stop),) if dim == 0 else (slice(None), slice(start, stop))
        t = full[index]
        if t.untyped_storage().nbytes() > t.nbytes:  # a view of the whole tensor (safetensors slices are)
            t = t.clone()
        if stop - start < size:  # padding: vocabulary rows past the end, a row-parallel bias off rank 0
            pad = list(t.shape)
            pad[dim] = size - (stop - start)
            t = torch.cat([t, t.new_zeros(pad)], dim=dim)
        return t

    def raw(self, name: str, raw):
        """The rank's slice of a GGUF tensor (load.gguf.RawTensor: uint8 [rows, row bytes]), cut along whole rows or,
        across the columns of a row-parallel weight, along whole quantization blocks."""
        p = self.part(name, raw.shape)
        if p is None:
            return raw
        dim, start, stop, size = p
        data = raw.data.reshape(raw.shape[0], -1) if dim == 0 else raw.data  # [rows (elements if 1-D), bytes each]
        if dim == 1:
            block, block_bytes = GGML_QUANT_SIZES[raw.qtype]
            if start % block or stop % block:
                raise ValueError(f"tensor {raw.name!r} ({raw.qtype.name}, blocks of {block}) cannot be split into "
                                 f"{self.world} parts of {stop - start} columns along whole blocks")
            part = data[:, start // block * block_bytes:stop // block * block_bytes]
            shape = (raw.shape[0], size)
        else:
            part = data[start:stop]
            if stop - start < size:
                part = np.concatenate([part, np.zeros((size - (stop - start), data.shape[1]), data.dtype)])
            shape = (size, *raw.shape[1:])
        part = np.ascontiguousarray(part)
        return type(raw)(raw.name, raw.qtype, shape, part.reshape(1, -1) if len(raw.shape) == 1 else part)
