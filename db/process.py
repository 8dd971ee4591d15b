"""Whether a process still runs: index runs left 'running' by a killed indexer, decoder workers
whose indexer died."""

from __future__ import annotations

import os


def pid_alive(pid: int, *, ours: bool = False) -> bool:
    """True while process ``pid`` runs on this host (a zombie, dead but not yet reaped, is gone).

    A pid held by another user's process counts as alive, unless ``ours`` says the process we
    mean runs as this user: then the pid was reused and ours is gone.
    """
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return not ours
    except OSError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return True  # no /proc (not Linux): the signal check is all we have
