"""db's shared helpers: atomic JSON files and process liveness."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from facefind.db.files import atomic_write_json
from facefind.db.process import pid_alive


def test_json_files_hold_numpy_values_and_paths(tmp_path: Path) -> None:
    target = tmp_path / "out" / "history.json"  # the folder is created
    atomic_write_json(target, {"loss": np.float32(0.5), "rows": np.arange(3), "model": tmp_path / "m.pt"})
    assert json.loads(target.read_text()) == {"loss": 0.5, "rows": [0, 1, 2], "model": str(tmp_path / "m.pt")}
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask  # as open() would, not mkstemp's 0600
    assert [p.name for p in target.parent.iterdir()] == ["history.json"]


def test_an_unserialisable_value_keeps_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "state.json"
    atomic_write_json(target, {"epoch": 1})
    with pytest.raises(TypeError, match="not JSON serialisable: object"):
        atomic_write_json(target, {"epoch": 2, "oops": object()})
    assert json.loads(target.read_text()) == {"epoch": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]  # no temp file left behind


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="zombies are told apart through /proc")
def test_a_dead_child_is_gone_before_and_after_it_is_reaped() -> None:
    assert pid_alive(os.getpid()) and pid_alive(os.getpid(), ours=True)
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 30
    while Path(f"/proc/{child.pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[0] != b"Z":
        assert time.monotonic() < deadline, "the child did not exit"
        time.sleep(0.05)
    assert not pid_alive(child.pid)  # a zombie: dead, not yet reaped
    child.wait()
    assert not pid_alive(child.pid)


def test_a_pid_held_by_another_user(monkeypatch: pytest.MonkeyPatch) -> None:
    """Another user's process: alive for a run row (a shared catalog), gone for a process of ours
    (its pid was reused)."""
    def refused(pid: int, sig: int) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "kill", refused)
    assert pid_alive(4242) is True
    assert pid_alive(4242, ours=True) is False
