"""Device choice and the per-device speed settings (bf16 autocast and TF32 on CUDA; on the CPU, threads).

CPU threads: torch's OpenMP threads wait for each other at every parallel region, so on a small
machine where another process keeps a core busy, one thread per core runs 10-100x slower than
fewer threads would. Unless the user chose (``--threads``, or ``OMP_NUM_THREADS`` in the
environment), ``resolve_device`` gives torch one thread per CPU that other processes leave idle.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from typing import ContextManager

import torch

from facefind.db.errors import FacefindError

log = logging.getLogger(__name__)

_chosen_threads: int | None = None  # what set_threads chose; kept for the rest of the process
_threads_why: str = ""  # and why, for the device line


def available_cpus() -> int:
    """CPU cores this process may use (respects affinity / container limits where visible)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def threads_for(cpus: int, busy: float) -> int:
    """One thread per CPU that other processes leave idle (``busy`` of ``cpus`` in use), at least 1."""
    return max(1, min(cpus, cpus - int(busy + 0.5)))


def busy_cpus(seconds: float = 0.15) -> float | None:
    """How many of this process's CPUs other processes keep busy, measured now; None when unknown.

    Linux: the non-idle share of each allowed CPU in ``/proc/stat`` over ``seconds`` while this
    process sleeps (so it counts only others). Elsewhere: the 1-minute load average.
    """
    try:
        allowed = os.sched_getaffinity(0)
        first = _cpu_times(allowed)
        if not first:  # a virtualised /proc/stat that numbers CPUs differently
            raise ValueError("no allowed CPU in /proc/stat")
        time.sleep(seconds)
        second = _cpu_times(allowed)
    except (AttributeError, OSError, ValueError):
        try:
            return float(os.getloadavg()[0])
        except (AttributeError, OSError):
            return None
    busy = 0.0
    for cpu, (total, idle) in second.items():
        total0, idle0 = first.get(cpu, (total, idle))
        if total > total0:
            busy += 1.0 - (idle - idle0) / (total - total0)
    return busy


def _cpu_times(allowed: set[int]) -> dict[int, tuple[int, int]]:
    """(total, idle) jiffies of each allowed CPU from /proc/stat (idle includes iowait)."""
    out = {}
    with open("/proc/stat") as fh:
        for line in fh:
            if line.startswith("cpu") and line[3].isdigit():
                name, *fields = line.split()
                cpu = int(name[3:])
                if cpu in allowed:
                    values = [int(v) for v in fields[:8]]  # user nice system idle iowait irq softirq steal
                    out[cpu] = (sum(values), values[3] + values[4])
    return out


def set_threads(threads: int | None = None) -> int:
    """Set torch's CPU thread count and return it: ``threads`` when given, else ``OMP_NUM_THREADS``
    when the environment sets it, else ``threads_for`` what other processes leave idle now.

    The first choice holds for the rest of the process (a later call without ``threads`` keeps it),
    so a run's own workers are never mistaken for competing load.
    """
    global _chosen_threads, _threads_why
    if threads is not None and threads < 1:
        raise FacefindError(f"--threads must be at least 1, got {threads}")
    if threads is None and _chosen_threads is not None:
        return _chosen_threads
    if threads is not None:
        chosen, why = int(threads), "as asked"
    elif os.environ.get("OMP_NUM_THREADS", "").strip():
        chosen, why = torch.get_num_threads(), "from OMP_NUM_THREADS"
    else:
        cpus, busy = available_cpus(), busy_cpus()
        if busy is None:
            chosen, why = torch.get_num_threads(), "torch's default: CPU load unknown"
        else:
            chosen, why = threads_for(cpus, busy), f"{cpus} CPUs, {busy:.1f} busy with other work"
    if torch.get_num_threads() != chosen:
        torch.set_num_threads(chosen)
    _chosen_threads, _threads_why = chosen, why
    log.debug("cpu threads: %d (%s)", chosen, why)
    return chosen


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` -> CUDA when present, else CPU (and say which); ``cuda`` without a GPU is an error.

    On the CPU this also picks torch's thread count (``set_threads``).
    """
    name = (name or "auto").strip().lower()
    if name == "auto":
        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        if device.type == "cpu":
            set_threads()
        log.info("%s", device_line(device, auto=True))
        return device
    try:
        device = torch.device(name)
    except RuntimeError:
        raise FacefindError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise FacefindError("--device cuda was asked for but no CUDA GPU is available: use --device cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise FacefindError(
                f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) present (cuda:0..)"
            )
    elif device.type != "cpu":
        raise FacefindError(f"unsupported device {name!r}: use auto, cpu, cuda or cuda:N")
    if device.type == "cpu":
        set_threads()
    log.info("%s", device_line(device, auto=False))
    return device


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    threads = torch.get_num_threads()
    return f"cpu ({threads} thread{'s' if threads != 1 else ''})"


def device_line(device: torch.device, auto: bool) -> str:
    """One line for a person: the device, how it was chosen, and on the CPU the threads and why.

    ``resolve_device`` logs it at INFO on this module's logger; the CLI shows it for the commands a
    person waits on (train, index) and keeps it for ``-v`` elsewhere.
    """
    if device.type == "cuda":
        return f"device: {describe_device(device)}{' (auto)' if auto else ''}"
    threads = torch.get_num_threads()
    why = f" ({_threads_why})" if _threads_why else ""
    return f"device: cpu{' (auto: no CUDA GPU)' if auto else ''}, {threads} thread{'s' if threads != 1 else ''}{why}"


def autocast(device: torch.device) -> ContextManager:
    """bf16 autocast on CUDA (tensor cores, no loss scaling needed); plain fp32 on the CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def configure(device: torch.device) -> None:
    """Global speed switches for ``device``: cuDNN autotuning and TF32 matmuls on CUDA."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work (for honest timings); a no-op on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
