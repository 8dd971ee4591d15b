"""CPU thread choice (facefind.trainer.device): what other processes keep busy decides how many threads torch gets.

One OpenMP thread per core is 10-100x slower than fewer threads when another process holds a
core, so the count is chosen from the cores left idle, unless the user chose (--threads or
OMP_NUM_THREADS). Load is faked here: the real machine's load is not a test input.
"""

from __future__ import annotations

import logging
from typing import Iterator

import pytest
import torch

from facefind.db.errors import FacefindError
from facefind.trainer import device


@pytest.fixture
def fresh(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No earlier choice in this process; torch's thread count restored afterwards."""
    before = torch.get_num_threads()
    monkeypatch.setattr(device, "_chosen_threads", None)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("cpus, busy, expected", [
    (2, 0.0, 2), (2, 0.4, 2), (2, 0.6, 1), (2, 1.0, 1), (2, 9.0, 1), (16, 3.2, 13), (1, 0.0, 1),
])
def test_one_thread_per_idle_cpu(cpus: int, busy: float, expected: int) -> None:
    assert device.threads_for(cpus, busy) == expected


def test_busy_cpus_counts_the_non_idle_share_of_each_allowed_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    samples = iter([{0: (100, 50), 1: (100, 90)},    # (total, idle) jiffies
                    {0: (200, 60), 1: (200, 190)}])  # cpu0 90% busy, cpu1 idle
    monkeypatch.setattr(device, "_cpu_times", lambda allowed: next(samples))
    monkeypatch.setattr(device.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(device.time, "sleep", lambda s: None)
    assert device.busy_cpus() == pytest.approx(0.9)


def test_cpu_times_reads_this_machine() -> None:
    import os

    if not os.path.exists("/proc/stat"):
        pytest.skip("no /proc/stat here")
    allowed = os.sched_getaffinity(0)
    times = device._cpu_times(allowed)
    assert set(times) <= allowed  # a virtualised /proc/stat may number CPUs differently
    assert all(total >= idle >= 0 for total, idle in times.values())
    busy = device.busy_cpus(0.05)
    assert busy is not None and 0.0 <= busy <= len(allowed) + 1e-9


def test_automatic_choice_leaves_busy_cores_alone_and_holds(fresh: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(device, "available_cpus", lambda: 2)
    monkeypatch.setattr(device, "busy_cpus", lambda: 1.0)  # a competitor holds one of two cores
    assert device.resolve_device("cpu").type == "cpu"
    assert torch.get_num_threads() == 1
    monkeypatch.setattr(device, "busy_cpus", lambda: 0.0)  # later calls keep the run's first choice
    assert device.set_threads() == 1 and torch.get_num_threads() == 1


def test_asked_threads_and_the_environment_win(fresh: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(device, "busy_cpus", lambda: pytest.fail("measured load although the user chose"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    assert device.set_threads() == 1
    monkeypatch.setattr(device, "_chosen_threads", None)
    assert device.set_threads(2) == 2 and torch.get_num_threads() == 2  # --threads beats the environment
    device.resolve_device("cpu")
    assert torch.get_num_threads() == 2
    with pytest.raises(FacefindError, match="at least 1"):
        device.set_threads(0)


def test_resolving_a_device_says_one_line_with_the_threads_and_why(fresh: None, monkeypatch: pytest.MonkeyPatch,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(device, "available_cpus", lambda: 2)
    monkeypatch.setattr(device, "busy_cpus", lambda: 1.0)
    caplog.set_level(logging.DEBUG, logger="facefind.trainer.device")
    device.resolve_device("cpu")
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
    assert said == ["device: cpu, 1 thread (2 CPUs, 1.0 busy with other work)"]
    assert [r.levelno for r in caplog.records if "cpu threads" in r.getMessage()] == [logging.DEBUG]
