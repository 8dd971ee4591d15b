"""Response models: what /openapi.json promises, and what FastAPI serialises in one pass.

The routes return the dicts the CLI prints (``Result.to_dict``, ``Hit.to_dict``) and declare
these models with ``response_model_exclude_unset=True``, so a key the dict leaves out (``quality``
without labels, ``distance`` outside a person search) stays out. ``extra="allow"``: a field the
engine's ``to_dict`` gains later is passed on, not dropped.

FastAPI serialises a declared model straight to JSON bytes with pydantic-core: the documented
replacement for ``ORJSONResponse``, which the FastAPI this project runs (0.165) deprecates. No
hand-written encoder, no custom response class.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from facefind.retrieval.engine import Quality


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class HitOut(_Open):
    """One ranked entry, as `facefind query --json` lists it."""

    id: int
    path: str
    face: int                      # its number in the file (0: a whole-file entry)
    box: list[int] | None          # x, y, w, h in the file; None: the entry is the whole file
    score: float
    attributes: dict[str, float]   # all K probabilities
    matched: list[str]             # the expression's literals it satisfies
    distance: float | None = None  # by=person only: identity distance ...
    same_person: bool | None = None  # ... and whether it is below 0.6


class QueryOut(_Open):
    """One page of matches: the shape of `facefind query --json` (``quality``: with --eval)."""

    expression: str | None
    total: int
    n_indexed: int
    ranking: str                   # similarity | person | confidence | id
    search: str | None             # exact | approximate for a similarity or person ranking
    offset: int
    thresholds: str | None
    warnings: list[str]
    hits: list[HitOut]
    quality: Quality | None = None
    labelled: int | None = None    # with label: literals: the entries that carry those labels


class ReferenceOut(_Open):
    """The uploaded photo, to page the same search through /api/query (``like=id``, with ``by``)."""

    id: str = Field(pattern="^[0-9a-f]{24}$")  # the upload's content hash; kept a day (refs.py)
    by: str                                     # look | person: what the reference holds
    name: str
    face_box: list[int] | None = None           # by=look: where the face was found (None: whole photo)


class SimilarOut(QueryOut):
    reference: ReferenceOut


class FaceOut(_Open):
    id: int
    face: int
    box: list[int] | None


class ImageOut(_Open):
    """One entry: a hit (without score) and every face of its file, thresholds and labels."""

    id: int
    path: str
    face: int
    box: list[int] | None
    attributes: dict[str, float]
    matched: list[str]
    faces: list[FaceOut]
    threshold_set: str
    thresholds: dict[str, float]
    present: list[str]
    labels: dict[str, bool] | None


class AttributeOut(_Open):
    name: str
    threshold: float
    thresholds: dict[str, float]   # per threshold set
    positive_rate: float           # share of indexed images predicted to have it
    label_rate: float | None       # share labelled with it (None: no labels)


class AttributesOut(_Open):
    n_indexed: int
    has_labels: bool
    has_identity: bool
    default_thresholds: str
    threshold_sets: list[str]
    attributes: list[AttributeOut]
