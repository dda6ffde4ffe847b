"""The ranks of a tensor-parallel model and their processes.

load(tensor_parallel_size=N) in a plain process makes it rank 0 and spawns ranks 1 .. N-1 (torch.multiprocessing,
spawn: a fork would copy the caller's threads and CUDA state). Each loads its own shard of the files, then runs in
serve() the steps rank 0 broadcasts (group.py) through its model runner's forward, until rank 0 closes the model.
Launched by torchrun, every process runs the caller's script: load() joins the process group torchrun describes (or
the one the script made), and on ranks > 0 it serves rank 0 and returns None once rank 0 closes its Runner.

A worker that exits, whatever the cause, is seen by rank 0 at its next collective (gloo and NCCL raise when a peer's
connection closes) or before its next step (Workers.dead): the model then fails every step with TensorParallelError.
"""
import datetime
import logging
import os
import signal
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from .. import kernels
from .group import TIMEOUT, TensorParallel

log = logging.getLogger("mistralrs")
JOIN_S = 30  # how long close() waits for a worker to exit before it is killed
STARTED = "started"


class Workers:
    """Rank 0's handles on the processes of ranks 1 .. N-1, each with the pipe on which it reports a load failure."""

    def __init__(self, procs: list, conns: list):
        self.procs, self.conns = procs, conns
        self.errors: dict[int, str] = {}

    def _read(self) -> None:
        for rank, conn in enumerate(self.conns, start=1):
            while rank not in self.errors and conn.poll():
                try:
                    message = conn.recv()
                except (EOFError, OSError):
                    break
                if message != STARTED:
                    self.errors[rank] = message

    def dead(self, wait: float = 0.0) -> str | None:
        """'rank R exited with code C: <its error>' for the first worker that has exited, else None. wait: seconds
        to give a worker whose connection just closed to finish exiting."""
        deadline = time.monotonic() + wait
        while True:
            for rank, p in enumerate(self.procs, start=1):
                if not p.is_alive():
                    self._read()
                    why = f": {self.errors[rank]}" if rank in self.errors else ""
                    return f"rank {rank} exited with code {p.exitcode}{why}"
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.05)

    def wait_started(self) -> None:
        """Until every worker has imported and is about to join the process group (which would otherwise wait for a
        dead one forever)."""
        for rank, (p, conn) in enumerate(zip(self.procs, self.conns), start=1):
            while not conn.poll(0.1):
                if not p.is_alive():
                    raise RuntimeError(f"tensor-parallel {self.dead()} before joining the process group")
            if (message := conn.recv()) != STARTED:
                raise RuntimeError(f"tensor-parallel rank {rank} failed: {message}")

    def join(self) -> None:
        for p in self.procs:
            p.join(JOIN_S)
            if p.is_alive():
                log.warning("tensor-parallel worker %d did not exit within %d s: killed", p.pid, JOIN_S)
                p.kill()
                p.join()


def devices(device: torch.device, world: int) -> list[torch.device]:
    """The device of each rank: consecutive GPUs from `device`'s index, or the CPU for all."""
    if device.type != "cuda":
        return [device] * world
    first, count = device.index or 0, torch.cuda.device_count()
    if first + world > count:
        raise ValueError(f"tensor_parallel_size {world} from {device} needs GPUs {first}..{first + world - 1}; this "
                         f"machine has {count}")
    return [torch.device("cuda", first + r) for r in range(world)]


def _groups(device: torch.device):
    """(group of the model's collectives, gloo group of the step metadata): on the CPU both are the default group."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
        return None, dist.new_group(backend="gloo", timeout=TIMEOUT)
    return None, None


def start(load_shard, world: int, device: torch.device, threads: int, shard_kwargs: dict) -> TensorParallel:
    """This process's rank: joined to torchrun's (or the script's) process group when there is one, else rank 0 of
    `world` ranks whose other N - 1 it spawns, each calling load_shard(device=, tp=, **shard_kwargs) on its own
    device (load_shard: load/model.py's, given the loader; picklable)."""
    if dist.is_initialized() or "TORCHELASTIC_RUN_ID" in os.environ or "RANK" in os.environ:
        return _join_launched(world, device)
    ranks = devices(device, world)
    store = dist.TCPStore("127.0.0.1", 0, world, is_master=True, wait_for_workers=False)
    ctx = mp.get_context("spawn")
    procs, conns = [], []
    for rank in range(1, world):
        ours, theirs = ctx.Pipe(duplex=False)
        p = ctx.Process(target=_worker, args=(rank, world, store.port, ranks[rank], threads, load_shard,
                                              shard_kwargs, theirs), name=f"mistralrs-tp{rank}", daemon=True)
        p.start()
        theirs.close()
        procs.append(p)
        conns.append(ours)
    workers = Workers(procs, conns)
    try:
        workers.wait_started()
        tp = _connect(0, world, store, ranks[0], workers)
    except BaseException:
        for p in procs:
            p.kill()
        workers.join()
        raise
    return tp


def _join_launched(world: int, device: torch.device) -> TensorParallel:
    owns = not dist.is_initialized()
    local = int(os.environ.get("LOCAL_RANK", 0))
    if device.type == "cuda":
        device = devices(torch.device("cuda", local), 1)[0]
    if owns:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=TIMEOUT)
    if dist.get_world_size() != world:
        raise ValueError(f"tensor_parallel_size is {world}, the process group has {dist.get_world_size()} ranks")
    return TensorParallel(dist.get_rank(), world, device, *_groups(device), owns_group=owns)


def _connect(rank: int, world: int, store, device: torch.device, workers: Workers | None = None) -> TensorParallel:
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=store, rank=rank, world_size=world,
                            timeout=TIMEOUT)
    return TensorParallel(rank, world, device, *_groups(device), owns_group=True, workers=workers)


def _worker(rank: int, world: int, port: int, device: torch.device, threads: int, load_shard, shard_kwargs: dict,
            conn) -> None:
    """A spawned rank: join the group, load the shard, serve rank 0's steps. A failure before serving goes to rank 0
    through conn; rank 0 leaving (its close, or its death) ends the loop. Ctrl-C is rank 0's to handle: a terminal
    sends it to the whole process group, and a worker that died of it would fail the steps rank 0 still finishes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if device.type == "cpu":
        kernels.set_cpu_threads(threads)
    else:
        torch.set_num_threads(threads)
    try:
        conn.send(STARTED)
        store = dist.TCPStore("127.0.0.1", port, world, is_master=False, timeout=datetime.timedelta(seconds=60))
        tp = _connect(rank, world, store, device)
        _, model_runner = load_shard(device=device, tp=tp, **shard_kwargs)
    except BaseException as e:
        conn.send(f"{type(e).__name__}: {e}")
        raise SystemExit(1) from None
    serve(model_runner)


@torch.inference_mode()
def serve(model_runner) -> None:
    """Ranks > 0: run the steps rank 0 sends, until it closes the model; then leave the process group."""
    tp = model_runner.tp
    try:
        while (step := tp.receive_step()) is not None:
            ids, positions, meta, all_logits = step
            model_runner.run(ids, positions, meta, all_logits)
    except RuntimeError as e:  # rank 0 or another rank is gone: nothing left to serve
        log.error("tensor-parallel rank %d: %s; leaving", tp.rank, e)
    if tp.owns_group:
        dist.destroy_process_group()
