"""Persons: the index's faces grouped by who they are, kept in step with the catalog.

``list_people`` is what `facefind people` shows: it groups the faces the first time, afterwards
only places faces that are new since (``assign_new``, also run after every ``index --identity``),
and ``--regroup`` (``regroup``) rebuilds from scratch. Every regroup honours the corrections
stored in the catalog (facefind.db.people): merged persons stay merged, split faces stay apart,
and a person keeps its id and name when most of its faces stay together. After each change the
persons file beside the snapshots (facefind.db.snapshot.persons) is written again, so `person:`
in queries sees it.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from dataclasses import dataclass

import numpy as np

from facefind.db import people as store
from facefind.db.catalog import Catalog
from facefind.db.ids import find_sorted
from facefind.db.people import PeopleError, PeopleState
from facefind.db.snapshot.persons import write_persons
from facefind.indexer.faces import grouping

log = logging.getLogger(__name__)

NO_DESCRIPTORS = ("this index has no identity descriptors to group into persons: run "
                  "`facefind index DIR --identity` first")


@dataclass(frozen=True)
class Person:
    """One person: its ``faces`` (catalog face ids, ascending) and the ``representative`` face,
    the one nearest the person's mean descriptor."""

    id: int
    name: str | None
    faces: list[int]
    representative: int

    @property
    def count(self) -> int:
        return len(self.faces)

    def to_dict(self) -> dict[str, object]:
        return {"id": self.id, "name": self.name, "count": self.count, "faces": self.faces,
                "representative": self.representative}


@dataclass(frozen=True)
class Grouped:
    """What a grouping did: ``persons`` now, faces placed, and seconds taken."""

    persons: int
    faces: int
    placed: int        # faces given a person by this call
    seconds: float
    regrouped: bool


def _rows(st: PeopleState, face_ids: list[int] | tuple[int, ...]) -> np.ndarray:
    """Row numbers (in ``st.face_ids``) of the faces that still have a descriptor."""
    at, found = find_sorted(st.face_ids, face_ids)
    return at[found]


def regroup(catalog: Catalog, index_dir: str | os.PathLike[str] | None = None) -> Grouped:
    """Group every face with a descriptor from scratch, keeping the corrections, and the ids and
    names of persons most of whose faces stay together."""
    start = time.perf_counter()
    st = store.state(catalog)
    if not len(st.face_ids):
        raise PeopleError(NO_DESCRIPTORS)
    must = [_rows(st, c.faces) for c in st.constraints if c.kind == "same"]
    apart = [(_rows(st, c.faces), _rows(st, c.others)) for c in st.constraints if c.kind == "apart"]
    graph = grouping.knn(st.vectors)
    labels = grouping.group(st.vectors, must=must, apart=apart, graph=graph)
    # Named persons are the user's word too: two of them never end up as one person.
    named = _named_collisions(st, labels)
    if named:
        labels = grouping.group(st.vectors, must=must, apart=apart + named, graph=graph)
    groups, names = _keep_ids(st, labels)
    store.replace(catalog, groups, names, generation=st.generation)
    if index_dir is not None:
        publish(catalog, index_dir)
    return Grouped(len(groups), len(st.face_ids), len(st.face_ids), time.perf_counter() - start, True)


def _named_collisions(st: PeopleState, labels: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """'apart' pairs for named persons whose faces a grouping put into one group."""
    members = store.by_person({f: p for f, p in st.person_of.items() if p in st.names})
    rows = {pid: _rows(st, faces) for pid, faces in members.items()}
    by_group: dict[int, list[int]] = {}
    for pid, r in rows.items():
        if len(r):
            by_group.setdefault(int(np.bincount(labels[r]).argmax()), []).append(pid)
    pairs = []
    for pids in by_group.values():
        for i, a in enumerate(pids):
            for b in pids[i + 1:]:
                pairs.append((rows[a], rows[b]))
    return pairs


def _keep_ids(st: PeopleState, labels: np.ndarray) -> tuple[list[tuple[int | None, list[int]]], dict[int, str | None]]:
    """The new groups as (person id or None, face ids): a group keeps the id of an old person
    when it holds most of that person's faces (the largest such share wins), and its name."""
    old_size = Counter(st.person_of[int(f)] for f in st.face_ids if int(f) in st.person_of)
    overlap: Counter[tuple[int, int]] = Counter()
    for row, face in enumerate(st.face_ids.tolist()):
        pid = st.person_of.get(face)
        if pid is not None:
            overlap[(int(labels[row]), pid)] += 1
    claim: dict[int, tuple[int, int]] = {}  # group -> (share, old person)
    for (g, pid), share in sorted(overlap.items(), key=lambda kv: -kv[1]):
        if 2 * share > old_size[pid] and g not in claim and pid not in {p for _, p in claim.values()}:
            claim[g] = (share, pid)
    groups: list[tuple[int | None, list[int]]] = []
    names: dict[int, str | None] = {}
    order = np.argsort(labels, kind="stable")
    bounds = np.searchsorted(labels[order], np.arange(int(labels.max()) + 2))
    for g in range(int(labels.max()) + 1):
        faces = st.face_ids[order[bounds[g]:bounds[g + 1]]].tolist()
        pid = claim[g][1] if g in claim else None
        groups.append((pid, faces))
        if pid is not None:
            names[pid] = st.names.get(pid)
    return groups, names


def assign_new(catalog: Catalog, index_dir: str | os.PathLike[str] | None = None) -> Grouped:
    """Place the faces that have no person yet: each joins the person it clearly belongs to (RMS
    distance to the person's faces under ``grouping.JOIN``, the next person ``ATTACH_MARGIN``
    farther), the rest are grouped among themselves into new persons. Nothing when the index was
    never grouped."""
    start = time.perf_counter()
    if not store.is_grouped(catalog):  # an index run before any `facefind people`: nothing to read
        return Grouped(0, 0, 0, time.perf_counter() - start, False)
    st = store.state(catalog)
    known = np.fromiter((f in st.person_of for f in st.face_ids.tolist()), bool, len(st.face_ids))
    new_rows = np.flatnonzero(~known)
    if not len(new_rows):
        return Grouped(len(set(st.person_of.values())), len(st.face_ids), 0, time.perf_counter() - start, False)
    old_rows = np.flatnonzero(known)
    owner = np.array([st.person_of[int(f)] for f in st.face_ids[old_rows]], np.int64)
    joins: dict[int, list[int]] = {}
    rest: list[int] = []
    if len(old_rows):
        graph = grouping.knn(st.vectors[old_rows], queries=st.vectors[new_rows])
        persons, compact = np.unique(owner, return_inverse=True)
        stats = grouping.group_stats(st.vectors[old_rows], compact, len(persons))
        for i, row in enumerate(new_rows.tolist()):
            ok = (graph.index[i] >= 0) & (graph.distance[i] < grouping.REACH)
            best = grouping.clear_choice(st.vectors[row], np.unique(compact[graph.index[i][ok]]), stats,
                                         grouping.JOIN)
            if best is None:
                rest.append(row)
            else:
                joins.setdefault(int(persons[best]), []).append(int(st.face_ids[row]))
    else:
        rest = new_rows.tolist()
    new_groups: list[list[int]] = []
    if rest:
        labels = grouping.group(st.vectors[rest])
        for g in range(int(labels.max()) + 1):
            new_groups.append(st.face_ids[np.asarray(rest)[labels == g]].tolist())
    store.add_faces(catalog, joins, new_groups, generation=st.generation)
    if index_dir is not None:
        publish(catalog, index_dir)
    persons = len(set(st.person_of.values()) | set(joins)) + len(new_groups)
    return Grouped(persons, len(st.face_ids), len(new_rows), time.perf_counter() - start, False)


def ensure_grouped(catalog: Catalog, index_dir: str | os.PathLike[str], *, fresh: bool = False) -> Grouped:
    """Group from scratch when asked (``fresh``) or never done; else place only new faces."""
    st = store.state(catalog)
    if not len(st.face_ids):
        raise PeopleError(NO_DESCRIPTORS)
    if fresh or not st.grouped:
        return regroup(catalog, index_dir)
    return assign_new(catalog, index_dir)


def list_people(catalog: Catalog, *, min_faces: int = 1) -> list[Person]:
    """The persons, largest first (then by id), with at least ``min_faces`` faces."""
    st = store.state(catalog)
    out = []
    for pid, faces in store.by_person(st.person_of).items():
        if len(faces) < min_faces:
            continue
        rows = _rows(st, faces)
        rep = faces[0]
        if len(rows):
            v = st.vectors[rows]
            rep = int(st.face_ids[rows[int(((v - v.mean(0)) ** 2).sum(1).argmin())]])
        out.append(Person(pid, st.names.get(pid), faces, rep))
    out.sort(key=lambda p: (-p.count, p.id))
    return out


def publish(catalog: Catalog, index_dir: str | os.PathLike[str]) -> None:
    """Write the persons file beside the snapshots from the catalog, so `person:` sees the change."""
    st = store.state(catalog)
    faces = np.fromiter(st.person_of.keys(), np.int64, len(st.person_of))
    persons = np.fromiter(st.person_of.values(), np.int64, len(st.person_of))
    write_persons(index_dir, faces, persons, st.names, catalog.catalog_id)


def name(catalog: Catalog, index_dir: str | os.PathLike[str], person_id: int, new_name: str) -> None:
    store.name(catalog, person_id, new_name)
    publish(catalog, index_dir)


def merge(catalog: Catalog, index_dir: str | os.PathLike[str], keep: int, other: int) -> int:
    kept = store.merge(catalog, keep, other)
    publish(catalog, index_dir)
    return kept


def split(catalog: Catalog, index_dir: str | os.PathLike[str], person_id: int, faces: list[int]) -> int:
    new = store.split(catalog, person_id, faces)
    publish(catalog, index_dir)
    return new
