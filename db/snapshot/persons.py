"""Persons beside the snapshots: ``<index>/persons.npz``, replaced atomically by `facefind people`.

Names and corrections change long after indexing; keeping who-is-who in a small file of its own
(a few MB at 200k faces) means renaming a person never rewrites a snapshot generation. The file
is keyed by catalog face id, not by snapshot row, so it fits every model's snapshot and survives
their rebuilds; ``attach`` maps it onto a snapshot's rows when the snapshot is opened (faces it
does not know get -1: not grouped yet).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np

from facefind.db.errors import CatalogError
from facefind.db.files import atomic_replace
from facefind.db.ids import find_sorted
from facefind.db.snapshot.format import PERSONS, Snapshot


def write_persons(index_dir: str | os.PathLike[str], face_ids: np.ndarray, person_ids: np.ndarray,
                  names: dict[int, str], catalog_id: str) -> Path:
    """Replace ``<index>/persons.npz``: int64 face ids (ascending), int32 their person ids, and
    the names of named persons, from the catalog ``catalog_id``."""
    face_ids = np.asarray(face_ids, np.int64)
    order = np.argsort(face_ids, kind="stable")
    head = json.dumps({"catalog_id": catalog_id, "names": {str(k): v for k, v in names.items()}})

    def fill(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            np.savez(fh, face_ids=face_ids[order], person_ids=np.asarray(person_ids, np.int32)[order],
                     head=np.array(head))
    return atomic_replace(Path(index_dir) / PERSONS, fill)


def read_persons(index_dir: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray, dict[int, str], str] | None:
    """(face ids, person ids, names, catalog id) from ``<index>/persons.npz``; None when there is none."""
    path = Path(index_dir) / PERSONS
    try:
        with np.load(path, allow_pickle=False) as npz:
            face_ids, person_ids = npz["face_ids"], npz["person_ids"]
            head = json.loads(str(npz["head"]))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError) as err:
        raise CatalogError(f"{path} is damaged ({err}): run `facefind people` to write it again") from None
    names = {int(k): str(v) for k, v in head.get("names", {}).items()}
    return face_ids, person_ids, names, str(head.get("catalog_id", ""))


def attach(snap: Snapshot, index_dir: str | os.PathLike[str], catalog_id: str | None = None) -> Snapshot:
    """``snap`` with ``persons`` (int32 per row, -1: none) and ``person_names`` from the persons
    file, when there is one (and, given ``catalog_id``, it comes from that catalog)."""
    found = read_persons(index_dir)
    if found is None:
        return snap
    face_ids, person_ids, names, from_catalog = found
    if catalog_id is not None and from_catalog != catalog_id:
        return snap
    persons = np.full(len(snap), -1, np.int32)
    at, hit = find_sorted(face_ids, snap.ids)
    persons[hit] = person_ids[at[hit]]
    return dataclasses.replace(snap, persons=persons, person_names=names)
