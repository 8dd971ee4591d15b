"""Finding ids in a sorted id array: the one lookup that snapshots, exports, persons and the
engine all need to align rows by id."""

from __future__ import annotations

import numpy as np


def find_sorted(sorted_ids: np.ndarray, wanted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(at, found)`` for each of ``wanted`` in ascending ``sorted_ids``: where it is (clipped to a
    valid index), and whether it is there. Empty ``sorted_ids`` finds nothing."""
    wanted = np.asarray(wanted, dtype=np.int64)
    if len(sorted_ids) == 0:
        return np.zeros(len(wanted), np.int64), np.zeros(len(wanted), bool)
    at = np.clip(np.searchsorted(sorted_ids, wanted), 0, len(sorted_ids) - 1)
    return at, sorted_ids[at] == wanted
