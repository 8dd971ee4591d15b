"""Persons in the catalog: who each grouped face is, the names given, and the user's corrections.

The tables are in facefind.db.schema (v5): ``persons``, ``person_faces`` and the constraints a
merge or split leaves (``person_constraints`` + ``person_constraint_faces``). Every change is one
write transaction, so a process killed mid-way leaves the persons as they were before or after,
never half. The grouping itself (facefind.indexer.people) reads with ``state`` and writes with
``replace``; ``name``, ``merge`` and ``split`` are the corrections.

Corrections are kept consistent when written, so every regroup can honour all of them at once:

- a merge records a 'same' constraint over the faces of both persons, and drops any earlier
  'apart' constraint whose two sides both fall inside the merged person (the newer word wins);
- a split removes the faces that leave from every 'same' constraint, then records an 'apart'
  constraint (side 0: the faces that leave, side 1: those that stay) and a 'same' over the
  faces that leave.

A ``generation`` in the meta table counts people writes: ``replace`` refuses to overwrite
corrections made while a regroup was computing.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from facefind.db.catalog import Catalog
from facefind.db.errors import FacefindError
from facefind.db.schema import (
    faces,
    identities,
    meta_table,
    person_constraint_faces,
    person_constraints,
    person_faces,
    persons,
)

GENERATION_KEY = "persons_generation"


class PeopleError(FacefindError):
    """A person, face or name given to ``facefind people`` does not fit the index."""


@dataclass(frozen=True)
class Constraint:
    """A correction: 'same' (``faces`` stay in one person) or 'apart' (``faces`` never share a
    person with ``others``)."""

    kind: str
    faces: tuple[int, ...]
    others: tuple[int, ...] = ()


@dataclass
class PeopleState:
    """Everything grouping needs, read in one transaction."""

    face_ids: np.ndarray                 # int64 (M,) faces with a descriptor, ascending
    vectors: np.ndarray                  # float32 (M, 128)
    person_of: dict[int, int]            # face id -> person id (grouped faces only)
    names: dict[int, str]                # person id -> name (named persons only)
    constraints: list[Constraint] = field(default_factory=list)
    generation: int = 0

    @property
    def grouped(self) -> bool:
        """Whether the faces were ever grouped (some face has a person)."""
        return bool(self.person_of)


def state(catalog: Catalog) -> PeopleState:
    """Descriptors, current persons, names and corrections, as one consistent read."""
    with catalog._read() as conn:
        rows = conn.execute(sa.select(identities.c.face_id, identities.c.descriptor)
                            .where(identities.c.descriptor.is_not(None)).order_by(identities.c.face_id)).all()
        face_ids = np.fromiter((r[0] for r in rows), np.int64, len(rows))
        vectors = (np.frombuffer(b"".join(r[1] for r in rows), np.float32).reshape(len(rows), -1)
                   if rows else np.zeros((0, 128), np.float32))
        person_of = dict(conn.execute(sa.select(person_faces.c.face_id, person_faces.c.person_id)).all())
        names = {int(i): n for i, n in conn.execute(sa.select(persons.c.id, persons.c.name)
                                                     .where(persons.c.name.is_not(None))).all()}
        return PeopleState(face_ids, vectors, person_of, names, _constraints(conn), _generation(conn))


def is_grouped(catalog: Catalog) -> bool:
    """Whether `facefind people` ever grouped this catalog (one cheap read, before any descriptor)."""
    with catalog._read() as conn:
        return conn.execute(sa.select(person_faces.c.face_id).limit(1)).first() is not None


def _generation(conn: Connection) -> int:
    value = conn.execute(sa.select(meta_table.c.value).where(meta_table.c.key == GENERATION_KEY)).scalar()
    return int(value) if value is not None else 0


def _bump(conn: Connection) -> int:
    now = _generation(conn) + 1
    updated = conn.execute(sa.update(meta_table).where(meta_table.c.key == GENERATION_KEY).values(value=str(now)))
    if not updated.rowcount:
        conn.execute(sa.insert(meta_table).values(key=GENERATION_KEY, value=str(now)))
    return now


def _constraints(conn: Connection) -> list[Constraint]:
    rows = conn.execute(sa.select(person_constraints.c.id, person_constraints.c.kind,
                                  person_constraint_faces.c.face_id, person_constraint_faces.c.side)
                        .join(person_constraint_faces, person_constraint_faces.c.constraint_id == person_constraints.c.id)
                        .order_by(person_constraints.c.id, person_constraint_faces.c.face_id)).all()
    sides: dict[int, tuple[str, list[int], list[int]]] = {}
    for cid, kind, face, side in rows:
        entry = sides.setdefault(cid, (kind, [], []))
        entry[2 if side else 1].append(int(face))
    return [Constraint(kind, tuple(a), tuple(b)) for kind, a, b in sides.values()]


def _faces_of(conn: Connection, person_id: int) -> list[int]:
    found = [int(f) for f in conn.execute(sa.select(person_faces.c.face_id)
                                          .where(person_faces.c.person_id == person_id)
                                          .order_by(person_faces.c.face_id)).scalars()]
    if not found:
        raise PeopleError(f"no person {person_id} in this index: `facefind people` lists them")
    return found


def _add_constraint(conn: Connection, kind: str, side0: Iterable[int], side1: Iterable[int] = ()) -> None:
    cid = conn.execute(sa.insert(person_constraints).values(kind=kind, created=time.time())
                       .returning(person_constraints.c.id)).scalar_one()
    rows = [{"constraint_id": cid, "face_id": f, "side": 0} for f in side0]
    rows += [{"constraint_id": cid, "face_id": f, "side": 1} for f in side1]
    if rows:
        conn.execute(sa.insert(person_constraint_faces), rows)


def _drop_empty(conn: Connection) -> None:
    """Persons left without faces (merged away, or their faces deleted) and empty constraints."""
    conn.execute(sa.delete(persons).where(~sa.exists().where(person_faces.c.person_id == persons.c.id)))
    conn.execute(sa.delete(person_constraints).where(
        ~sa.exists().where(person_constraint_faces.c.constraint_id == person_constraints.c.id)))


def replace(catalog: Catalog, groups: Sequence[tuple[int | None, Sequence[int]]],
            names: dict[int, str | None] | None = None, *, generation: int | None = None) -> list[int]:
    """Write a whole grouping in one transaction: each ``(person id, face ids)`` of ``groups``
    (person id None: a new person) replaces every face's person; persons left without faces go.
    ``names`` renames persons by id (None: unnamed). With ``generation``, refuse when another
    people command wrote since that generation was read. Returns the person id of each group."""
    with catalog._write() as conn:
        if generation is not None and _generation(conn) != generation:
            raise PeopleError("the persons changed while they were being grouped (another `facefind "
                              "people` command): run it again")
        existing = set(conn.execute(sa.select(persons.c.id)).scalars())
        conn.execute(sa.delete(person_faces))
        ids: list[int] = []
        rows = []
        now = time.time()
        for pid, members in groups:
            if pid is None or pid not in existing:
                pid = conn.execute(sa.insert(persons).values(created=now).returning(persons.c.id)).scalar_one()
            ids.append(int(pid))
            rows.extend({"face_id": int(f), "person_id": int(pid)} for f in members)
        for start in range(0, len(rows), 20_000):
            conn.execute(sa.insert(person_faces), rows[start:start + 20_000])
        for pid, name in (names or {}).items():
            conn.execute(sa.update(persons).where(persons.c.id == pid).values(name=name))
        _drop_empty(conn)
        _bump(conn)
    return ids


def add_faces(catalog: Catalog, joins: dict[int, Sequence[int]], new: Sequence[Sequence[int]],
              *, generation: int | None = None) -> list[int]:
    """Incremental grouping in one transaction: faces that join existing persons (``joins``:
    person id -> face ids) and new persons (``new``: lists of face ids). Returns the new ids."""
    with catalog._write() as conn:
        if generation is not None and _generation(conn) != generation:
            raise PeopleError("the persons changed while new faces were being grouped: run `facefind people` again")
        rows = [{"face_id": int(f), "person_id": int(p)} for p, fs in joins.items() for f in fs]
        created = []
        for members in new:
            pid = conn.execute(sa.insert(persons).values(created=time.time()).returning(persons.c.id)).scalar_one()
            created.append(int(pid))
            rows.extend({"face_id": int(f), "person_id": int(pid)} for f in members)
        if rows:
            conn.execute(sa.delete(person_faces).where(person_faces.c.face_id.in_([r["face_id"] for r in rows])))
            for start in range(0, len(rows), 20_000):
                conn.execute(sa.insert(person_faces), rows[start:start + 20_000])
        _bump(conn)
    return created


def name(catalog: Catalog, person_id: int, new_name: str | None) -> None:
    """Name a person (None or "": remove its name). Names are unique, ignoring case, so that
    ``person:Ada`` means one person."""
    text = (new_name or "").strip() or None
    if text is not None and ("\n" in text or len(text) > 200):
        raise PeopleError("a person's name is one line of at most 200 characters")
    if text is not None and text.isascii() and text.isdigit():
        raise PeopleError(f"a name cannot be only digits: person:{text} means the person with id {text}")
    if text is not None and '"' in text and "'" in text:
        raise PeopleError("a name cannot hold both ' and \": person:NAME could not quote it")
    with catalog._write() as conn:
        _faces_of(conn, person_id)
        if text is not None:
            clash = conn.execute(sa.select(persons.c.id).where(sa.func.lower(persons.c.name) == text.lower(),
                                                                persons.c.id != person_id)).scalar()
            if clash is not None:
                raise PeopleError(f"person {clash} is already named {text!r}: choose another name, or "
                                  f"`facefind people merge {clash} {person_id}` if they are one person")
        conn.execute(sa.update(persons).where(persons.c.id == person_id).values(name=text))
        _bump(conn)


def merge(catalog: Catalog, keep: int, other: int) -> int:
    """Merge person ``other`` into ``keep`` (one person from now on, through every regroup).
    ``keep`` keeps its name, or takes ``other``'s when it has none. Returns ``keep``."""
    if keep == other:
        raise PeopleError(f"merge needs two different persons (got {keep} twice)")
    with catalog._write() as conn:
        a, b = _faces_of(conn, keep), _faces_of(conn, other)
        both = set(a) | set(b)
        for cid, kind, side0, side1 in _constraint_rows(conn):
            if kind == "apart" and both & side0 and both & side1:
                conn.execute(sa.delete(person_constraints).where(person_constraints.c.id == cid))
        conn.execute(sa.update(person_faces).where(person_faces.c.person_id == other).values(person_id=keep))
        names = dict(conn.execute(sa.select(persons.c.id, persons.c.name).where(persons.c.id.in_([keep, other]))).all())
        if names.get(keep) is None and names.get(other) is not None:
            conn.execute(sa.update(persons).where(persons.c.id == other).values(name=None))
            conn.execute(sa.update(persons).where(persons.c.id == keep).values(name=names[other]))
        _add_constraint(conn, "same", sorted(both))
        _drop_empty(conn)
        _bump(conn)
    return keep


def split(catalog: Catalog, person_id: int, face_ids: Sequence[int]) -> int:
    """Move ``face_ids`` out of ``person_id`` into a new person; they never join it again.
    Returns the new person's id."""
    with catalog._write() as conn:
        members = _faces_of(conn, person_id)
        leaving = sorted(set(int(f) for f in face_ids))
        strangers = sorted(set(leaving) - set(members))
        if not leaving:
            raise PeopleError("split needs at least one --face ENTRY of the person")
        if strangers:
            raise PeopleError(f"face {strangers[0]} is not one of person {person_id}'s faces: "
                              f"`facefind people --json` lists each person's faces")
        staying = sorted(set(members) - set(leaving))
        if not staying:
            raise PeopleError(f"those are all of person {person_id}'s faces: leave at least one, "
                              "or name the person instead")
        conn.execute(sa.delete(person_constraint_faces).where(
            person_constraint_faces.c.face_id.in_(leaving),
            person_constraint_faces.c.constraint_id.in_(
                sa.select(person_constraints.c.id).where(person_constraints.c.kind == "same"))))
        new = conn.execute(sa.insert(persons).values(created=time.time()).returning(persons.c.id)).scalar_one()
        conn.execute(sa.update(person_faces).where(person_faces.c.face_id.in_(leaving)).values(person_id=new))
        _add_constraint(conn, "apart", leaving, staying)
        if len(leaving) > 1:
            _add_constraint(conn, "same", leaving)
        _drop_empty(conn)
        _bump(conn)
    return int(new)


def _constraint_rows(conn: Connection) -> list[tuple[int, str, set[int], set[int]]]:
    rows = conn.execute(sa.select(person_constraints.c.id, person_constraints.c.kind,
                                  person_constraint_faces.c.face_id, person_constraint_faces.c.side)
                        .join(person_constraint_faces,
                              person_constraint_faces.c.constraint_id == person_constraints.c.id)).all()
    out: dict[int, tuple[int, str, set[int], set[int]]] = {}
    for cid, kind, face, side in rows:
        out.setdefault(cid, (cid, kind, set(), set()))[3 if side else 2].add(int(face))
    return list(out.values())


def existing_faces(catalog: Catalog, face_ids: Iterable[int]) -> set[int]:
    """Which of these face ids exist in the catalog."""
    wanted = sorted(set(int(f) for f in face_ids))
    with catalog._read() as conn:
        return set(conn.execute(sa.select(faces.c.id).where(faces.c.id.in_(wanted))).scalars())


def by_person(person_of: dict[int, int]) -> dict[int, list[int]]:
    """face -> person turned into person -> its faces (ascending)."""
    out: dict[int, list[int]] = defaultdict(list)
    for face, pid in sorted(person_of.items()):
        out[pid].append(face)
    return dict(out)
