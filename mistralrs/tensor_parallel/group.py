"""A tensor-parallel model's process group: the collectives its layers and model runner use, and a step's wire format.

Before each forward, rank 0 broadcasts the step's ints, and every rank makes the forward's inputs from them (unpack),
so that all run the same forward (workers.py runs the loop of ranks > 0). On a gloo group (ranks > 0 wait there for
rank 0's next step, however long, without a GPU timeout), a step is two int64 tensors:
    header   [STEP, all_logits, len(l) for each list l of STEP_LISTS]; [STOP, 0, ...] ends the ranks' loop
    payload  the lists back to back: ModelRunner.metadata_lists' ids, positions, KV cache slots, block tables
             ([B, width] row-major), context lengths, and each sequence's offset among the step's tokens
"""
import contextlib
import datetime
import time
from array import array

import torch
import torch.distributed as dist

from ..layers import AttentionMetadata

# The idle limit of a collective: ranks > 0 wait in one for rank 0's next step, however long the Runner is idle. A
# rank that exits is seen at once (its connection closes); only a rank that hangs would be waited for this long.
TIMEOUT = datetime.timedelta(days=7)
STEP, STOP = 1, 0
# A step's lists, in ModelRunner.metadata_lists' order, and the dtype of each one's tensor.
STEP_LISTS = (("ids", torch.int64), ("positions", torch.int64), ("slots", torch.int64), ("tables", torch.int32),
              ("context_lens", torch.int32), ("cu", torch.int32))


class TensorParallelError(RuntimeError):
    """A rank of a tensor-parallel model failed: the model can no longer run; close the Runner and load again."""


def join_ranks(model, tp: "TensorParallel", vocab_size: int):
    """Make `model`, a rank's shard (built from shard.local_args and loaded), one rank of tp: its blocks add up their
    partial sums over the ranks, its embedding and logits span the vocabulary of all of them."""
    for m in model.modules():
        if hasattr(type(m), "tp"):  # layers.py's blocks and CausalLM
            m.tp = tp
    model.vocab_size = vocab_size
    return model


def unpack(header: torch.Tensor, payload: torch.Tensor, device: torch.device
           ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
    """A step's input ids, positions and attention metadata from its wire form."""
    sizes = header[2:].tolist()
    parts = {name: x.to(device, dtype) for (name, dtype), x in zip(STEP_LISTS, payload.split(sizes))}
    cu, B = payload[sum(sizes[:-1]):], sizes[4]  # the offsets, on the CPU; B: one context length a sequence
    meta = AttentionMetadata(slot_mapping=parts["slots"], block_tables=parts["tables"].view(B, -1),
                             context_lens=parts["context_lens"], cu_seqlens_q=parts["cu"],
                             max_seqlen_q=int((cu[1:] - cu[:-1]).max()))
    return parts["ids"], parts["positions"], meta


class TensorParallel:
    """This process's rank of a tensor-parallel model: the collectives its model and model runner use, and the steps.

    Collectives run on `group` (NCCL on GPUs, gloo on the CPU); the step's metadata always crosses on a gloo group
    (`cpu_group`: the same one on the CPU), so that ranks > 0 can wait for the next step without a GPU timeout.
    comm_seconds: time rank 0 spent in collectives (benchmarks/bench_tp.py)."""

    def __init__(self, rank: int, world: int, device: torch.device, group, cpu_group, *, owns_group: bool,
                 workers=None):
        """owns_group: this model made the default process group (and destroys it on close); False when the
        caller's script made it (torchrun). workers: rank 0's workers.Workers when it spawned the others."""
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

    def send_step(self, lists: tuple[list[int], ...], all_logits: bool
                  ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """Rank 0: broadcast a step's ints (ModelRunner.metadata_lists, in STEP_LISTS' order); its inputs, made from
        the ints as every other rank makes them."""
        header = torch.tensor([STEP, all_logits, *map(len, lists)], dtype=torch.int64)
        payload = torch.frombuffer(array("q", [v for values in lists for v in values]), dtype=torch.int64)
        with self._collective():
            dist.broadcast(header, 0, group=self.cpu_group)
            dist.broadcast(payload, 0, group=self.cpu_group)
        return unpack(header, payload, self.device)

    def receive_step(self) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, bool] | None:
        """Ranks > 0: the next step's inputs and all_logits, from rank 0; None when rank 0 closes the model."""
        header = torch.empty(2 + len(STEP_LISTS), dtype=torch.int64)
        dist.broadcast(header, 0, group=self.cpu_group)
        if header[0] == STOP:
            return None
        payload = torch.empty(int(header[2:].sum()), dtype=torch.int64)
        dist.broadcast(payload, 0, group=self.cpu_group)
        return *unpack(header, payload, self.device), bool(header[1])

    def stop(self) -> None:
        """Rank 0: tell the other ranks to leave their step loop (they then close their process groups)."""
        if self.failed is None:
            with self._collective():
                header = torch.tensor([STOP] + [0] * (1 + len(STEP_LISTS)), dtype=torch.int64)
                dist.broadcast(header, 0, group=self.cpu_group)

    def close(self) -> None:
        """End the model's use of the group: rank 0 tells the others to stop and waits for the processes it spawned.
        After a failure the group is torn down first, so that ranks blocked in a collective see it and exit."""
        if self.closed:
            return
        self.closed = True
        if self.rank == 0 and self.failed is None:
            with contextlib.suppress(TensorParallelError):
                self.stop()
        if self.failed is not None and self.owns_group:
            dist.destroy_process_group()
        if self.workers is not None:
            self.workers.join()
        if self.failed is None and self.owns_group:
            dist.destroy_process_group()

    def abort(self, why: str) -> None:
        """Rank 0 failed (to load, say): tear the group down, so that the other ranks leave what they wait in."""
        self.failed = self.failed or TensorParallelError(why)
        self.close()

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
