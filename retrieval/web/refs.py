"""Uploaded photos' references, kept server-side so that a photo search's URL stays short.

/api/similar computes the photo's embedding (by look) or identity descriptor (by person) and keeps
it here under a content hash of the upload and how it was searched; the page's URL and /api/query
carry only that hash (``like=``, 24 hex digits) instead of ~1.5 KB of encoded vector. References
live in memory for ``TTL`` seconds after their last use (at most ``CAPACITY`` of them, the least
recently used going first) and are forgotten on restart: an expired one is a 404 that says to
search by the photo again. The photo itself is never kept.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

TTL = 24 * 3600       # seconds a reference is kept after its last use
CAPACITY = 1000       # references kept at most (a look embedding is ~1 KB, a descriptor 512 B)
REF_PATTERN = "^[0-9a-f]{24}$"
EXPIRED = ("this photo search has expired (the server keeps a photo's reference for a day, and "
           "forgets it on restart): search by the photo again")


@dataclass(frozen=True)
class Reference:
    by: str                 # look | person: what ``vector`` is
    vector: np.ndarray      # a unit embedding, or a dlib identity descriptor
    model: str              # the snapshot's model (sha256) a look embedding was made by


def reference_key(data: bytes, by: str, detect_face: bool | None) -> str:
    """The content hash that names an upload's reference: the same photo searched the same way
    gets the same short link."""
    h = hashlib.sha256(data)
    h.update(f"\0{by}\0{detect_face}".encode())
    return h.hexdigest()[:24]


class References:
    """``put(key, ref)`` and ``get(key)`` (None once expired), thread-safe, bounded."""

    def __init__(self, ttl: float = TTL, capacity: int = CAPACITY) -> None:
        self.ttl, self.capacity = ttl, capacity
        self._items: OrderedDict[str, tuple[float, Reference]] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, key: str, ref: Reference) -> None:
        with self._lock:
            self._items[key] = (time.monotonic(), ref)
            self._items.move_to_end(key)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)

    def get(self, key: str) -> Reference | None:
        now = time.monotonic()
        with self._lock:
            item = self._items.get(key)
            if item is None:
                return None
            if now - item[0] > self.ttl:
                del self._items[key]
                return None
            self._items[key] = (now, item[1])
            self._items.move_to_end(key)
            return item[1]
