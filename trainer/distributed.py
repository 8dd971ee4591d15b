"""torch.distributed plumbing for runs started by ``torchrun`` (DDP training, sharded indexing).

torchrun gives every process RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE (and the
rendezvous address) in the environment; without them facefind runs as one process and every
helper here is a no-op, so the single-process code path is the distributed one with world 1.

- Backend: nccl on CUDA (each process on its own GPU, ``cuda:LOCAL_RANK``), gloo on the CPU.
- Every collective has a timeout (``FACEFIND_DIST_TIMEOUT`` seconds; 30 minutes by default), so a
  lost peer ends a run with an error instead of a hang. torchrun itself stops the other workers
  (SIGTERM, then SIGKILL) when one exits with an error; SIGTERM becomes ``RankStopped`` here, so
  those workers unwind (``finally`` blocks commit what is queued) and print one line.
- ``shard_of`` is the stable file-to-shard assignment of sharded indexing: blake2b of the path
  relative to the indexed folder, never Python's salted ``hash()``.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import datetime
import hashlib
import logging
import os
import signal
from dataclasses import dataclass
from typing import Any, Iterator, TypeVar

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from facefind.db.errors import FacefindError

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 1800.0
T = TypeVar("T")


class RankStopped(FacefindError):
    """This process of a distributed run was stopped because another one failed or was killed."""


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in a torchrun job (rank 0 of 1 outside torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_local_main(self) -> bool:
        return self.local_rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def env_info() -> DistInfo:
    """Rank and world from torchrun's environment variables (rank 0 of 1 when absent)."""

    def read(name: str, default: int) -> int:
        value = os.environ.get(name)
        if value is None or value == "":
            return default
        try:
            return int(value)
        except ValueError:
            raise FacefindError(f"{name}={value!r} is not an integer: start the run with torchrun") from None

    world = read("WORLD_SIZE", 1)
    rank = read("RANK", 0)
    local_rank = read("LOCAL_RANK", rank if world > 1 else 0)
    local_world = read("LOCAL_WORLD_SIZE", world)
    if not (world >= 1 and 0 <= rank < world and 0 <= local_rank < max(local_world, 1)):
        raise FacefindError(f"inconsistent RANK={rank} / WORLD_SIZE={world} / LOCAL_RANK={local_rank}: "
                            "start the run with torchrun")
    return DistInfo(rank, world, local_rank, local_world)


def info() -> DistInfo:
    """This process's place: from the process group when it is up, else from the environment."""
    if dist.is_available() and dist.is_initialized():
        base = env_info()
        return DistInfo(dist.get_rank(), dist.get_world_size(), base.local_rank, base.local_world_size)
    return env_info()


def timeout_s(default: float = DEFAULT_TIMEOUT_S) -> float:
    """The collective timeout in seconds (``FACEFIND_DIST_TIMEOUT``, else ``default``)."""
    value = os.environ.get("FACEFIND_DIST_TIMEOUT", "")
    try:
        return float(value) if value else default
    except ValueError:
        raise FacefindError(f"FACEFIND_DIST_TIMEOUT={value!r} is not a number of seconds") from None


def local_device(name: str) -> str:
    """The device this rank should use: ``cuda:LOCAL_RANK`` for ``auto``/``cuda`` under torchrun."""
    here = env_info()
    if not here.distributed:
        return name
    wanted = (name or "auto").strip().lower()
    if wanted == "cuda" or (wanted == "auto" and torch.cuda.is_available()):
        count = torch.cuda.device_count()
        if count == 0:
            return wanted  # resolve_device says there is no GPU
        if here.local_rank >= count:
            raise FacefindError(f"LOCAL_RANK {here.local_rank} but only {count} GPU(s) on this node: "
                                f"use torchrun --nproc_per_node {count} (or fewer)")
        return f"cuda:{here.local_rank}"
    return wanted


def cpus_per_process() -> int:
    """This node's CPU cores divided between its torchrun processes (all of them outside torchrun)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, cpus // max(1, env_info().local_world_size))


def setup(device: torch.device | None = None, *, timeout: float | None = None) -> DistInfo:
    """Join the torchrun job once per process (a no-op outside torchrun or when already joined).

    nccl when ``device`` is CUDA, else gloo (``device=None``: gloo, for jobs that only need
    barriers, such as sharded indexing). Installs the SIGTERM handler and an exit hook that
    leaves the process group cleanly.
    """
    here = env_info()
    if not here.distributed or dist.is_initialized():
        return info()
    if not dist.is_available():
        raise FacefindError("this torch build has no torch.distributed: run without torchrun")
    if "MASTER_ADDR" not in os.environ:
        raise FacefindError("WORLD_SIZE is set but MASTER_ADDR is not: start distributed runs with torchrun")
    cuda = device is not None and device.type == "cuda"
    if cuda:
        torch.cuda.set_device(device)
    seconds = timeout if timeout is not None else timeout_s()
    try:
        dist.init_process_group(
            backend="nccl" if cuda else "gloo",
            timeout=datetime.timedelta(seconds=seconds),
            device_id=device if cuda else None,
        )
    except (RuntimeError, ValueError) as err:
        raise FacefindError(f"rank {here.rank}: cannot join the torchrun job ({_first_line(err)}): check "
                            "--rdzv_endpoint / --master_addr and that every node runs the same command") from None
    _install_sigterm()
    atexit.register(cleanup)
    log.info("rank %d of %d (local rank %d) joined with %s, timeout %.0f s", here.rank, here.world_size,
             here.local_rank, dist.get_backend(), seconds)
    return info()


def cleanup() -> None:
    """Leave the process group (safe to call twice, or when never joined)."""
    if dist.is_available() and dist.is_initialized():
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


def _install_sigterm() -> None:
    """SIGTERM (torchrun stopping the job after a worker failed) raises RankStopped in the main thread."""

    def stop(signum: int, _frame: Any) -> None:
        signal.signal(signum, signal.SIG_DFL)  # a second SIGTERM kills at once
        raise RankStopped(f"rank {info().rank}: stopped by torchrun (another process of this run failed "
                          "or was interrupted): rerun the same command (add --resume to continue training)")

    with contextlib.suppress(ValueError):  # not the main thread: keep the default
        signal.signal(signal.SIGTERM, stop)


def is_main() -> bool:
    return info().is_main


def barrier() -> None:
    """Wait for every rank (no-op in one process); a lost peer is one RankStopped line."""
    if dist.is_available() and dist.is_initialized():
        with failures():
            dist.barrier()


def all_mean(value: float) -> float:
    """The mean of ``value`` over all ranks (itself in one process)."""
    return all_sum(value) / info().world_size


def all_sum(value: float) -> float:
    """The sum of ``value`` over all ranks (itself in one process)."""
    return _reduce(value, "sum")


def all_max(value: float) -> float:
    """The largest ``value`` of all ranks (itself in one process)."""
    return _reduce(value, "max")


def _reduce(value: float, op: str) -> float:
    if not (dist.is_available() and dist.is_initialized()):
        return float(value)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return float(t.item())


def broadcast(obj: T, src: int = 0) -> T:
    """``obj`` from rank ``src`` on every rank (picklable objects; itself in one process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def ddp(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``model`` wrapped in DistributedDataParallel under torchrun (``model`` itself otherwise).

    Keep the bare model for evaluation and checkpoints: only the wrapper's forward syncs gradients,
    and rank 0 evaluates alone.
    """
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return model
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def reduce_stats(stats: T) -> T:
    """An epoch's ``EpochStats`` over all ranks: mean loss, images summed, the slowest rank's seconds."""
    if not (dist.is_available() and dist.is_initialized()):
        return stats
    loss = all_mean(stats.loss)  # type: ignore[attr-defined]
    images = int(round(all_sum(stats.images)))  # type: ignore[attr-defined]
    seconds = all_max(stats.seconds)  # type: ignore[attr-defined]
    return dataclasses.replace(stats, loss=loss, images=images, seconds=seconds)  # type: ignore[type-var]


def shard_slice(n: int, rank: int, world: int) -> slice:
    """Rank ``rank``'s contiguous part of ``n`` items split ``world`` ways (sizes differ by at most 1)."""
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (1 if rank < extra else 0))


def shard_of(relative_path: str, shards: int) -> int:
    """The shard (0..shards-1) that indexes a file, from blake2b of its path relative to the folder.

    Stable across processes, machines and Python versions; separators are normalised to '/' so a
    folder indexed from Windows and Linux shards the same way.
    """
    key = relative_path.replace(os.sep, "/").encode("utf-8", "surrogateescape")
    digest = hashlib.blake2b(key, digest_size=8).digest()
    return int.from_bytes(digest, "big") % shards


def parse_shard(text: str) -> tuple[int, int]:
    """``"K/N"`` -> (K, N) with 0 <= K < N (FacefindError with the expected form otherwise)."""
    try:
        k, n = (int(p) for p in text.strip().split("/"))
    except ValueError:
        raise FacefindError(f"bad --shard {text!r}: use K/N, e.g. 0/4 for the first of 4 shards") from None
    if not (n >= 1 and 0 <= k < n):
        raise FacefindError(f"bad --shard {text!r}: K must be 0..N-1 (e.g. 0/4 .. 3/4)")
    return k, n


@contextlib.contextmanager
def failures() -> Iterator[None]:
    """Turn a lost peer (a collective failing because another rank died) into one FacefindError line."""
    try:
        yield
    except RankStopped:
        raise
    except (dist.DistError, RuntimeError) as err:
        if not info().distributed or not _is_peer_failure(err):
            raise
        raise RankStopped(f"rank {info().rank}: another process of this run stopped ({_first_line(err)})") from None


def _is_peer_failure(err: BaseException) -> bool:
    if isinstance(err, dist.DistError):
        return True
    text = str(err).lower()
    return any(s in text for s in ("connection closed by peer", "connection reset by peer", "gloo", "nccl",
                                   "timed out", "broken pipe"))


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:200] if text else type(err).__name__
