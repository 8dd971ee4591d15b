"""The People view's data: the persons of the live snapshot (``facefind people`` groups them), and
the person of one entry. Read-only: corrections are made on the CLI (`facefind people name|merge|split`).

A person's faces are not listed here: the page asks /api/query for ``person:ID and ...``, so the
chips, the expression box and the export work inside a person as everywhere else.
"""

from __future__ import annotations

from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Query
from pydantic import BaseModel

from facefind.retrieval.engine import Engine
from facefind.retrieval.web.deps import LiveDep, parse_id
from facefind.retrieval.web.errors import REFUSALS, ApiError

router = APIRouter(prefix="/api/people", responses=REFUSALS)

NO_PERSONS = "this index has no persons yet: run `facefind people` to group its faces (needs `index --identity`)"


class PersonOut(BaseModel):
    id: int
    name: str | None
    count: int
    representative: int  # the entry id of the face nearest the person's mean descriptor


class PeopleOut(BaseModel):
    persons: list[PersonOut]
    total: int  # persons with at least min_faces faces (``persons`` holds up to ``limit`` of them)


class PersonOfOut(BaseModel):
    id: int | None  # None: the entry has no person (no descriptor, or not grouped yet)
    name: str | None = None


def _people(eng: Engine) -> list[dict[str, Any]]:
    """Every person of the snapshot, largest first: id, name, count, representative."""
    persons = eng.snapshot.persons
    if persons is None:
        raise ApiError(404, NO_PERSONS)
    persons = np.asarray(persons)
    rows = np.flatnonzero(persons >= 0)
    ids, inverse, counts = np.unique(persons[rows], return_inverse=True, return_counts=True)
    rep = rows[np.unique(inverse, return_index=True)[1]]  # without descriptors: each person's first entry
    if eng.snapshot.identity is not None and len(ids):
        vec = np.asarray(eng.snapshot.identity[rows], np.float32)
        sums = np.zeros((len(ids), vec.shape[1]), np.float32)
        np.add.at(sums, inverse, vec)
        gap = ((vec - (sums / counts[:, None])[inverse]) ** 2).sum(1)
        order = np.lexsort((gap, inverse))  # by person, nearest its mean first
        rep = rows[order[np.searchsorted(inverse[order], np.arange(len(ids)))]]
    names = eng.snapshot.person_names
    out = [{"id": int(p), "name": names.get(int(p)), "count": int(c), "representative": int(eng.snapshot.ids[r])}
           for p, c, r in zip(ids.tolist(), counts.tolist(), rep.tolist())]
    out.sort(key=lambda p: (-p["count"], p["id"]))
    return out


@router.get("", response_model=PeopleOut, summary="The persons of the index, largest first")
async def people(live: LiveDep, min_faces: Annotated[int, Query(ge=1)] = 1,
                 limit: Annotated[int, Query(ge=1, le=10_000)] = 500) -> dict[str, Any]:
    found = [p for p in live.once("people", lambda: _people(live.engine)) if p["count"] >= min_faces]
    return {"persons": found[:limit], "total": len(found)}


@router.get("/of/{image_id}", response_model=PersonOfOut, summary="The person an entry belongs to")
async def person_of(live: LiveDep, image_id: str) -> dict[str, Any]:
    eng = live.engine
    pos, found = eng.positions(np.array([parse_id(image_id)]))
    if not found[0]:
        raise ApiError(404, f"no image with id {image_id} in the index")
    persons = eng.snapshot.persons
    pid = int(persons[int(pos[0])]) if persons is not None else -1
    return {"id": pid, "name": eng.snapshot.person_names.get(pid)} if pid >= 0 else {"id": None}
