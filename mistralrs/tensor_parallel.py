"""Tensor parallelism, Megatron-style, on torch.distributed (NCCL on GPUs, gloo on the CPU).

Each of N ranks holds 1/N of every large weight, cut where no communication is needed until a sum:
  column-parallel  q/k/v, gate/up, fc1, the experts' w1/w3: output rows split (whole heads, intermediate features)
  row-parallel     o, down, fc2, the experts' w2: input columns split, so each rank's product is a partial sum; one
                   all-reduce after attention and one after the MLP (layers.py's blocks) adds them up. Their biases
                   are rank 0's alone (zeros elsewhere), so the sum counts them once.
  vocab-parallel   embed_tokens, lm_head: rows of the vocabulary split, ceil(V / N) a rank (the last padded with
                   zero rows); a lookup is masked to the rank's rows and all-reduced, the logits gathered on rank 0
  replicated       norms, the router of a mixture of experts, everything else.
KV heads go with the query heads that read them; with fewer KV heads than ranks, each rank holds the one KV head its
query heads read. A rank builds its model from local_args (its shard's shapes) and loads only its slices of the
files (Shard); rank 0 runs the Runner and tells the other ranks (engine/workers.py) what each step computes.
"""
import contextlib
import dataclasses
import datetime
import time
from array import array

import numpy as np
import torch
import torch.distributed as dist
from gguf import GGML_QUANT_SIZES

# The idle limit of a collective: ranks > 0 wait in one for rank 0's next step, however long the Runner is idle. A
# rank that exits is seen at once (its connection closes); only a rank that hangs would be waited for this long.
TIMEOUT = datetime.timedelta(days=7)
COLUMN = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "fc1", "w1", "w3")
ROW = ("o_proj", "down_proj", "fc2", "w2")
VOCAB = ("embed_tokens", "lm_head")
STEP, STOP = 1, 0


class TensorParallelError(RuntimeError):
    """A rank of a tensor-parallel model failed: the model can no longer run; close the Runner and load again."""


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
    def of(cls, build, args, tp: "TensorParallel | None", full_shapes: dict | None = None) -> "Shard | None":
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


def attach(model, tp: "TensorParallel", vocab_size: int):
    """Make `model`, a rank's shard (built from local_args and loaded), one rank of tp: its blocks add up their
    partial sums over the ranks, its embedding and logits span the vocabulary of all of them."""
    for m in model.modules():
        if hasattr(type(m), "tp"):  # layers.py's blocks and CausalLM
            m.tp = tp
    model.vocab_size = vocab_size
    return model


class TensorParallel:
    """This process's rank of a tensor-parallel model, and the collectives its model and model runner use.

    Collectives run on `group` (NCCL on GPUs, gloo on the CPU); the step's metadata always crosses on a gloo group
    (`cpu_group`: the same one on the CPU), so that ranks > 0 can wait for the next step without a GPU timeout.
    comm_seconds: time rank 0 spent in collectives (benchmarks/bench_tp.py)."""

    def __init__(self, rank: int, world: int, device: torch.device, group, cpu_group, *, owns_group: bool,
                 workers=None):
        """owns_group: this model made the default process group (and destroys it on close); False when the
        caller's script made it (torchrun). workers: rank 0's engine.workers.Workers when it spawned the others."""
        self.rank, self.world, self.device, self.group, self.cpu_group = rank, world, device, group, cpu_group
        self.owns_group, self.workers = owns_group, workers
        self.failed: TensorParallelError | None = None
        self.closed = False
        self.comm_seconds, self.comm_calls = 0.0, 0

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum x over the ranks, in place."""
        with self._collective():
            dist.all_reduce(x, group=self.group)
        return x

    def gather_vocab(self, logits: torch.Tensor, vocab: int) -> torch.Tensor | None:
        """[B, V / N] on each rank -> [B, V] on rank 0 (None elsewhere): the rank's vocabulary slices side by side."""
        with self._collective():
            parts = [torch.empty_like(logits) for _ in range(self.world)] if self.rank == 0 else None
            dist.gather(logits.contiguous(), parts, dst=0, group=self.group)
        return torch.cat(parts, dim=-1)[:, :vocab] if self.rank == 0 else None

    def min_int(self, value: int) -> int:
        """The least of the ranks' values (the KV cache's block count, which every rank must share)."""
        t = torch.tensor([value], dtype=torch.int64)
        with self._collective():
            dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.cpu_group)
        return int(t)

    def gather_ints(self, value: int) -> list[int]:
        """Every rank's value, on every rank (the ranks' resident weight bytes)."""
        t = torch.tensor([value], dtype=torch.int64)
        parts = [torch.empty_like(t) for _ in range(self.world)]
        with self._collective():
            dist.all_gather(parts, t, group=self.cpu_group)
        return [int(p) for p in parts]

    def send_step(self, lists: tuple[list[int], ...], all_logits: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Rank 0: broadcast a step's ints (model_runner.STEP_LISTS) as (header [STEP, all_logits, each list's
        length], payload: the lists back to back, int64); returns them as the other ranks receive them."""
        header = torch.tensor([STEP, all_logits, *map(len, lists)], dtype=torch.int64)
        payload = torch.frombuffer(array("q", [v for values in lists for v in values]), dtype=torch.int64)
        with self._collective():
            dist.broadcast(header, 0, group=self.cpu_group)
            dist.broadcast(payload, 0, group=self.cpu_group)
        return header, payload

    def receive_step(self, n_lists: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Ranks > 0: the next step's (header, payload) from rank 0, or None when rank 0 closes the model."""
        header = torch.empty(2 + n_lists, dtype=torch.int64)
        dist.broadcast(header, 0, group=self.cpu_group)
        if header[0] == STOP:
            return None
        payload = torch.empty(int(header[2:].sum()), dtype=torch.int64)
        dist.broadcast(payload, 0, group=self.cpu_group)
        return header, payload

    def stop(self, n_lists: int) -> None:
        """Rank 0: tell the other ranks to leave their step loop (they then close their process groups)."""
        if self.failed is None:
            with self._collective():
                dist.broadcast(torch.tensor([STOP] + [0] * (1 + n_lists), dtype=torch.int64), 0, group=self.cpu_group)

    def close(self, n_lists: int) -> None:
        """End the model's use of the group: rank 0 tells the others to stop and waits for the processes it spawned.
        After a failure the group is torn down first, so that ranks blocked in a collective see it and exit."""
        if self.closed:
            return
        self.closed = True
        if self.rank == 0 and self.failed is None:
            with contextlib.suppress(TensorParallelError):
                self.stop(n_lists)
        if self.failed is not None and self.owns_group:
            dist.destroy_process_group()
        if self.workers is not None:
            self.workers.join()
        if self.failed is None and self.owns_group:
            dist.destroy_process_group()

    def abort(self, why: str) -> None:
        """Rank 0 failed (to load, say): tear the group down, so that the other ranks leave what they wait in."""
        self.failed = self.failed or TensorParallelError(why)
        self.close(0)  # no STOP to size: a failed group sends none

    def check(self) -> None:
        """Rank 0, before a step: raise the failure seen earlier, or that of a worker that has exited."""
        if self.failed is None and self.workers is not None and (dead := self.workers.dead()):
            self.failed = TensorParallelError(f"tensor-parallel {dead}; the model cannot run: close the Runner and "
                                              f"load it again")
        if self.failed is not None:
            raise self.failed

    @contextlib.contextmanager
    def _collective(self):
        """Time a collective, and turn a failed one into TensorParallelError (kept: every later step raises it)."""
        start = time.perf_counter()
        try:
            yield
        except RuntimeError as e:  # gloo: "Connection closed by peer"; NCCL: DistBackendError
            if isinstance(e, TensorParallelError):
                raise
            dead = self.workers.dead(wait=1.0) if self.workers is not None else None
            self.failed = TensorParallelError(f"tensor-parallel {dead or 'collective failed'} ({e}); the model "
                                              f"cannot run: close the Runner and load it again")
            raise self.failed from e
        finally:
            self.comm_seconds += time.perf_counter() - start
            self.comm_calls += 1
