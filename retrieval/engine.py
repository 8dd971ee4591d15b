"""The query engine: filter a snapshot by an attribute expression, then rank what is left.

``Engine(snapshot).query(expr, limit, offset, like=...)`` is the one library call behind
``facefind query``, ``facefind similar``, the HTML gallery and any later web page.

Ranking
  * with a reference (``like`` embedding or ``like_id``): cosine similarity over the filtered
    subset, searched in the snapshot's own vector store (``facefind.db.vectors``): the float16 flat file,
    memory-mapped by FAISS, so no process ever builds an index to answer. Exact by default (a
    selective filter goes through ``IDSelectorBitmap``; a wide one searches everything and drops
    non-matches, widening k until the top is provably exact). Where the snapshot also carries an
    approximate index (large collections), an unfiltered query or a filter that keeps more than
    ``EXACT_SUBSET`` images takes candidates from it (the filter applied inside the IVF scan) and
    re-scores them exactly from the flat store; ``exact=True`` forces the exact scan, and
    ``Result.search`` says which ran. Score = cosine in [-1, 1].
  * without: by how robustly the image satisfies the expression, in log-odds. A literal's margin
    is ``logit(p) - logit(threshold)`` (for ``<``/``<=`` the sign flips; bare names use the
    threshold set of the query), ``not`` negates, ``and``
    takes the minimum and ``or`` the maximum. So the score is the confidence of the weakest link
    that makes the image match; it is >= 0 for every match (up to the strict ``>`` boundary), and
    one very confident attribute cannot hide a borderline one. Probabilities are clipped to
    [1e-6, 1 - 1e-6], so margins are bounded by about +-27.6.
  * with an identity reference (``person``: a 128-D dlib descriptor, or ``person_id``): by exact
    Euclidean distance between descriptors, ascending, over the filtered images that have one
    (``index --identity``); score = distance, and ``same_person`` marks distances below 0.6.
  * with neither (no expression, no reference): every image, in id order, score 0.

Threshold sets
  A bare name means "probability at or above the attribute's calibrated threshold". A checkpoint
  carries one set per objective: ``accuracy`` (the CelebA metric; rare attributes then almost
  never pass) and ``f1`` (for search: finds most of the faces that have the attribute). The index
  records which set its queries use by default (``f1`` when the checkpoint has it);
  ``query(..., thresholds="accuracy")`` picks another. Comparisons (``Smiling > 0.9``) ignore them.

Ties are broken by image id, ascending, in every ranking, so pages are stable. The engine never
imports torch; FAISS is imported only when a reference is given.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from dataclasses import asdict, dataclass
from typing import Any, Iterator, Sequence

import numpy as np

from facefind.db import vectors
from facefind.db.errors import CatalogError, FacefindError, ModelError
from facefind.db.ids import find_sorted
from facefind.db.snapshot import APPROX, SPLITS, VECTORS, Snapshot
from facefind.retrieval.query import (Attr, Literal, Node, Resolver, Tag, did_you_mean, evaluate, fold,
                                      literal_mask, literal_text, literals, name_resolver, parse, reindex)

log = logging.getLogger(__name__)

EPS = 1e-6              # probability clip for log-odds margins
WEAK_F1 = 0.2           # a bare name whose val F1 (at the set in use) is below this gets a warning
PARSED_KEPT = 64        # parsed expressions an engine keeps
THRESHOLD_SETS = ("accuracy", "f1")  # the objectives training calibrates for (facefind.trainer.metrics)
BITMAP_FRACTION = 0.10  # filtered similarity search uses a FAISS bitmap below this match fraction
EXACT_SUBSET = 100_000  # a filter keeping at most this many images is scanned exactly (docs/SCALING.md)
SAME_PERSON = 0.6       # dlib's same-person distance (facefind.indexer.faces.identity.SAME_PERSON; no trainer import here)
IDENTITY_CHUNK = 65536  # rows converted to float32 at a time when ranking by person
NO_IDENTITY = ("this index has no identity descriptors: run `facefind index FOLDER --identity` "
               "to add them, then search with --by person")
NO_LABELS = ("this index has no ground-truth labels for label: literals: index an annotated folder "
             "(images with CelebA's list_attr_celeba.txt and list_eval_partition.txt beside them) to add them")
NO_SPLITS = ("this index records no splits for split: literals: index an annotated folder with its "
             "partition file (list_eval_partition.txt) beside the attribute file")
NO_PERSONS_IDENTITY = ("this index has no identity descriptors for person: literals: run "
                       "`facefind index FOLDER --identity`, then `facefind people`")
NO_PERSONS = "this index has no persons yet for person: literals: run `facefind people` to group its faces"
CERTAIN = 64.0  # the margin of a prefixed literal: beyond any log-odds margin (|margin| <= ~55.3)


@dataclass(frozen=True)
class Hit:
    """One ranked face: its entry id, file path, score, all K probabilities, and the expression's
    literals it satisfies (``"Eyeglasses"``, ``"not Male"``, ``"Smiling > 0.9"``). ``face`` is its
    number in the file and ``box`` (x, y, w, h) where it is; None: the entry is the whole file."""

    id: int
    path: str
    score: float
    attributes: dict[str, float]
    matched: list[str]
    distance: float | None = None  # ranking by person: Euclidean distance between identity descriptors
    face: int = 0
    box: tuple[int, int, int, int] | None = None

    def to_dict(self) -> dict[str, Any]:
        out = {"id": self.id, "path": self.path, "face": self.face,
               "box": None if self.box is None else list(self.box), "score": self.score,
               "attributes": self.attributes, "matched": self.matched}
        if self.distance is not None:
            out.update(distance=self.distance, same_person=self.distance < SAME_PERSON)
        return out


@dataclass(frozen=True)
class Result:
    """One page of a query: ``total`` images match out of ``n_indexed``; ``hits`` are ranks
    ``offset + 1`` .. ``offset + len(hits)``. ``ranking`` is 'similarity', 'person', 'confidence'
    or 'id'; ``search`` is 'exact' or 'approximate' for a similarity or person ranking, else None."""

    total: int
    n_indexed: int
    hits: list[Hit]
    expression: str | None
    ranking: str
    offset: int = 0
    node: Node | None = None
    thresholds: str | None = None   # the threshold set bare names used ("f1", "accuracy")
    warnings: tuple[str, ...] = ()  # one line each, e.g. an attribute the model barely learned
    search: str | None = None       # 'exact' or 'approximate' for a similarity ranking
    labelled: int | None = None     # with label: literals: how many entries carry those labels

    def to_dict(self) -> dict[str, Any]:
        """The JSON shape of ``facefind query --json``."""
        out = {"expression": self.expression, "total": self.total, "n_indexed": self.n_indexed,
               "ranking": self.ranking, "search": self.search, "offset": self.offset,
               "thresholds": self.thresholds, "warnings": list(self.warnings),
               "hits": [h.to_dict() for h in self.hits]}
        if self.labelled is not None:
            out["labelled"] = self.labelled
        return out

    def to_frame(self) -> Any:
        """The hits as a pandas DataFrame: rank, id, path, score, matched, then one column per attribute.

        For analysis beyond the CLI (group by attribute, join with other tables); pandas is imported
        here only, so queries that never ask for a frame do not pay for it.
        """
        import pandas as pd

        columns = ["rank", "id", "path", "face", "box", "score", "matched"]
        names = list(self.hits[0].attributes) if self.hits else []
        rows = [[self.offset + i + 1, h.id, h.path, h.face, "" if h.box is None else " ".join(map(str, h.box)),
                 h.score, "; ".join(h.matched)]
                + [h.attributes[a] for a in names] for i, h in enumerate(self.hits)]
        frame = pd.DataFrame(rows, columns=columns + names)
        if self.ranking == "person":  # score is the identity distance
            frame.insert(6, "same_person", [h.distance is not None and h.distance < SAME_PERSON for h in self.hits])
        return frame


@dataclass(frozen=True)
class Quality:
    """How far a query can be trusted, measured against ground-truth labels.

    ``precision_at_k``: share of the returned hits (those with labels) whose labels satisfy the
    expression; ``precision_all`` / ``recall``: the same over every predicted match / every truly
    matching image; ``base_rate``: share of labelled images that satisfy it (a random pick's
    precision). Values are None when their denominator is 0.
    """

    expression: str
    k: int
    relevant: int
    precision_at_k: float | None
    precision_all: float | None
    recall: float | None
    base_rate: float | None
    n_labelled: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float32), np.float32(EPS), np.float32(1 - EPS))
    return np.log(p) - np.log1p(-p)


@contextlib.contextmanager
def _faiss_threads(faiss: Any, n: int) -> Iterator[None]:
    """Run FAISS with ``n`` OpenMP threads, then restore the setting.

    One query has nothing to split across threads; with the default (all cores) a single
    search on a busy 2-core machine measured 10-16 ms instead of 0.5-7 ms.
    """
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(n)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def _ratio(num: int, den: int) -> float | None:
    return num / den if den else None


def top_order(scores: np.ndarray, ids: np.ndarray, n: int) -> np.ndarray:
    """Indices of the ``n`` best entries: score descending, then id ascending, exactly.

    ``argpartition`` finds the n-th best score; everything tied with it is kept as a candidate
    so the id tie-break is exact across the partition boundary.
    """
    m = scores.shape[0]
    if n <= 0 or m == 0:
        return np.empty(0, dtype=np.int64)
    if n < m:
        kth = scores[np.argpartition(-scores, n - 1)[n - 1]]
        cand = np.flatnonzero(scores >= kth)
    else:
        cand = np.arange(m)
    order = np.lexsort((ids[cand], -scores[cand]))
    return cand[order[:n]]


class Engine:
    """Answers queries over one in-memory (or memory-mapped) ``Snapshot``.

    Construction is cheap (validation only); log-odds rows are computed on first use and the
    snapshot's vector files are opened (memory-mapped, never rebuilt) on the first similarity query,
    and kept, so a long-lived engine answers later queries from memory.
    """

    def __init__(self, snapshot: Snapshot) -> None:
        s = snapshot
        k, n = len(s.attributes), len(s.ids)
        if n == 0:
            raise CatalogError("the index is empty: run `facefind index FOLDER` first")
        problems = []
        if np.shape(s.probs) != (k, n):
            problems.append(f"probs has shape {np.shape(s.probs)}, expected {(k, n)}")
        if np.shape(s.thresholds) != (k,):
            problems.append(f"thresholds has shape {np.shape(s.thresholds)}, expected {(k,)}")
        if np.ndim(s.emb) != 2 or np.shape(s.emb)[0] != n:
            problems.append(f"emb has shape {np.shape(s.emb)}, expected ({n}, D)")
        if len(s.paths) != n:
            problems.append(f"{len(s.paths)} paths for {n} ids")
        lowered = [a.lower() for a in s.attributes]
        if len(set(lowered)) != k:
            problems.append("attribute names repeat (names are case-insensitive)")
        ids = np.asarray(s.ids, dtype=np.int64)
        ascending = bool(np.all(ids[1:] > ids[:-1]))  # the snapshot contract; skips a sort
        if not ascending and np.unique(ids).shape[0] != n:
            problems.append("image ids repeat")
        if problems:
            raise CatalogError("the index snapshot is inconsistent (" + "; ".join(problems)
                               + "): rebuild it by running `facefind index` again")
        self.snapshot = s
        self.attributes: list[str] = list(s.attributes)
        self.ids = ids
        self.probs = np.ascontiguousarray(s.probs, dtype=np.float32)
        self.default_thresholds: str = s.threshold_set
        self.threshold_sets: dict[str, np.ndarray] = {
            name: np.asarray(t, dtype=np.float32) for name, t in s.threshold_sets.items()}
        self.threshold_sets.setdefault(self.default_thresholds, np.asarray(s.thresholds, dtype=np.float32))
        if any(np.shape(t) != (k,) for t in self.threshold_sets.values()):
            raise CatalogError("the index snapshot's threshold sets do not match its attributes: rebuild "
                               "it by running `facefind index` again")
        self.thresholds = self.threshold_sets[self.default_thresholds]  # the default set
        self.emb = s.emb
        self._threshold_logits = {name: _logit(t) for name, t in self.threshold_sets.items()}
        self._fell_back: set[str] = set()
        self._parsed: dict[str, Node] = {}
        self._logit_rows: list[np.ndarray | None] = [None] * k
        self._id_order = np.arange(n) if ascending else np.argsort(ids, kind="stable")
        self._sorted_ids = ids[self._id_order]
        self._vectors: Any = None  # the flat store as a FAISS index, opened on the first similarity query
        self._approx: Any = None   # the approximate index, when the snapshot has one (False: unusable)
        self.identity: np.ndarray | None = None      # float16 (N, 128) descriptors (index --identity)
        self.has_identity: np.ndarray | None = None  # bool (N,)
        if s.identity is not None and s.has_identity is not None:
            if np.shape(s.identity)[0] != n or np.shape(s.has_identity) != (n,):
                raise CatalogError("the index snapshot's identity arrays do not match its images: rebuild "
                                   "it by running `facefind index` again")
            self.identity, self.has_identity = s.identity, np.asarray(s.has_identity, dtype=bool)
        # Recorded facts for prefixed literals (label:, split:, person:); None when the index has none.
        self.label_attributes: list[str] | None = None
        self.labels: np.ndarray | None = None   # int8 (L, N), -1: no label
        self.splits: np.ndarray | None = None   # int8 (N,), -1: unknown
        if s.labels is not None and s.label_attributes is not None:
            if np.shape(s.labels) != (len(s.label_attributes), n) or np.shape(s.splits) != (n,):
                raise CatalogError("the index snapshot's label arrays do not match its images: rebuild "
                                   "it by running `facefind index` again")
            self.label_attributes, self.labels, self.splits = list(s.label_attributes), s.labels, s.splits
        self.persons: np.ndarray | None = None  # int32 (N,), -1: no person
        if s.persons is not None:
            if np.shape(s.persons) != (n,):
                raise CatalogError("the index snapshot's persons do not match its images: run `facefind people`")
            self.persons = np.asarray(s.persons, dtype=np.int32)
        self.person_names: dict[int, str] = dict(s.person_names or {})
        self._tags: dict[str, Resolver | str] | None = None

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    # -- building blocks -------------------------------------------------------------------

    def parse(self, expr: str) -> Node:
        """Parse ``expr`` against this index's attribute names (raises QuerySyntaxError).

        The tree is kept (the last ``PARSED_KEPT`` expressions), so a caller that checks an
        expression first (the CLI, before it loads a model) and then queries it parses it once.
        """
        node = self._parsed.pop(expr, None)
        if node is None:
            node = parse(expr, self.attributes, self.tags)
            if len(self._parsed) >= PARSED_KEPT:
                del self._parsed[next(iter(self._parsed))]
        self._parsed[expr] = node  # most recently used last
        return node

    # -- prefixed literals: label:, split:, person: ------------------------------------------

    @property
    def tags(self) -> dict[str, Resolver | str]:
        """What each prefix may name in this index (a resolver), or the one line saying why not."""
        if self._tags is None:
            self._tags = {"label": name_resolver(self.label_attributes, "label") if self.label_attributes else NO_LABELS,
                          "split": self._split_resolver(), "person": self._person_resolver()}
        return self._tags

    def _split_resolver(self) -> Resolver | str:
        if self.splits is None or not (self.splits >= 0).any():
            return NO_SPLITS
        return name_resolver(SPLITS, "split")

    def _person_resolver(self) -> Resolver | str:
        if self.persons is None:
            return NO_PERSONS_IDENTITY if self.identity is None else NO_PERSONS
        known = set(np.unique(self.persons[self.persons >= 0]).tolist())
        by_name = {name.lower(): pid for pid, name in self.person_names.items() if pid in known}
        names = [self.person_names[pid] for pid in sorted(by_name.values())]

        def resolve(text: str) -> tuple[str, int]:
            if text.isascii() and text.isdigit():  # an id ('²'.isdigit() is True, int('²') fails)
                if int(text) not in known:
                    raise LookupError(f"no person {text} in this index: `facefind people` lists them")
                return text, int(text)
            pid = by_name.get(text.lower())
            if pid is None:
                hint = did_you_mean(text, names, "names") if names else "; no person has a name yet"
                raise LookupError(f"no person named {text!r}{hint} (`facefind people name ID NAME` names one)")
            return self.person_names[pid], pid

        return resolve

    def tag_mask(self, tag: Tag) -> np.ndarray:
        """Boolean (N,) truth of a prefixed literal (entries without the fact: False)."""
        if tag.prefix == "label" and self.labels is not None:
            return np.asarray(self.labels[tag.key]) == 1
        if tag.prefix == "split" and self.splits is not None:
            return np.asarray(self.splits) == tag.key
        if tag.prefix == "person" and self.persons is not None:
            return self.persons == tag.key
        raise CatalogError(f"{tag} cannot be answered by this index")  # parse() refuses these first

    def _known(self, node: Node) -> np.ndarray | None:
        """The entries that carry every label and split the expression names (None: all of them):
        an entry without labels never satisfies an expression with a label: literal, negated or not."""
        known = None
        for lit, _ in literals(node):
            if isinstance(lit, Tag) and lit.prefix in ("label", "split"):
                has = (np.asarray(self.labels[lit.key]) >= 0 if lit.prefix == "label"
                       else np.asarray(self.splits) >= 0)
                known = has if known is None else known & has
        return known

    def threshold_set(self, thresholds: str | None = None) -> str:
        """The name of the set bare names use: ``thresholds`` (None: the index default).

        A set the index's model lacks (a checkpoint from before F1 thresholds were kept) falls
        back to the default, with one warning per engine; an unknown name is a FacefindError.
        """
        if thresholds is None:
            name = self.default_thresholds
            wanted = "f1"
        else:
            name = wanted = str(thresholds).lower()
        if name in self.threshold_sets and wanted in self.threshold_sets:
            return name
        known = sorted(set(THRESHOLD_SETS) | set(self.threshold_sets))
        if wanted not in known:
            raise FacefindError(f"unknown threshold set {thresholds!r}: use {' or '.join(known)}")
        if wanted not in self._fell_back:
            self._fell_back.add(wanted)
            log.warning("the index's model has no %s thresholds (only %s: a checkpoint from before both "
                        "were kept); bare names use %s. Retrain and re-index for retrieval thresholds",
                        wanted, ", ".join(self.threshold_sets), self.default_thresholds)
        return self.default_thresholds

    def mask(self, node: Node | None, thresholds: str | None = None) -> np.ndarray:
        """Boolean (N,) mask of the images that satisfy ``node`` (all of them for None), bare names
        judged at the threshold set ``thresholds`` (None: the index default)."""
        if node is None:
            return np.ones(len(self), dtype=bool)
        mask = evaluate(node, self.probs, self.threshold_sets[self.threshold_set(thresholds)], self.tag_mask)
        known = self._known(node)
        return mask if known is None else mask & known

    def weak_attributes(self, node: Node, thresholds: str | None = None) -> list[str]:
        """One line per bare name in ``node`` whose val F1 at the set in use is below ``WEAK_F1``:
        a query on it returns little better than guesses. Empty when the index has no val figures."""
        name = self.threshold_set(thresholds)
        stats = self.snapshot.threshold_stats.get(name) or {}
        f1, precision, recall = (stats.get(key) for key in ("f1", "precision", "recall"))
        if not f1 or len(f1) != len(self.attributes):
            return []
        weak = {lit.index: lit for lit, _ in literals(node) if isinstance(lit, Attr) and f1[lit.index] < WEAK_F1}
        out = []
        for i, lit in weak.items():  # once per attribute, also when it appears as A and as not A
            detail = f" (precision {precision[i]:.2f}, recall {recall[i]:.2f})" if precision and recall else ""
            out.append(f"{lit.name} has val F1 {f1[i]:.2f} at the {name} thresholds{detail}, below {WEAK_F1}: "
                       "the model barely learned it, so its matches are close to guesses")
        return out

    def positions(self, image_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Row positions of ``image_ids`` in the snapshot, and a mask of which ids were found."""
        at, found = find_sorted(self._sorted_ids, image_ids)
        return self._id_order[at], found

    def embedding_of(self, image_id: int) -> np.ndarray:
        """The stored float32 embedding of an indexed image (CatalogError when unknown)."""
        pos, found = self.positions(np.array([image_id]))
        if not found[0]:
            raise CatalogError(f"image id {image_id} is not in the index: list ids with "
                               "`facefind query EXPR --json`, or pass an image file instead")
        return np.asarray(self.emb[pos[0]], dtype=np.float32)

    def describe(self, image_id: int, node: Node | None = None, thresholds: str | None = None) -> Hit:
        """One indexed image as a Hit (score 0): its probabilities and the literals of ``node`` it
        satisfies at the threshold set ``thresholds``, exactly as for query hits. CatalogError when
        the id is not indexed."""
        pos, found = self.positions(np.array([image_id]))
        if not found[0]:
            raise CatalogError(f"image id {image_id} is not in the index")
        return self._hits(node, pos, np.zeros(1, dtype=np.float32), self.threshold_set(thresholds))[0]

    def same_file(self, face_id: int) -> list[tuple[int, int, tuple[int, int, int, int] | None]]:
        """``(id, face number, box)`` of every entry of the file that entry ``face_id`` is a face of,
        by face number (a whole-file entry: only itself). CatalogError when the id is not indexed."""
        pos, found = self.positions(np.array([face_id]))
        if not found[0]:
            raise CatalogError(f"image id {face_id} is not in the index")
        s = self.snapshot
        rows = [int(pos[0])] if s.image_ids is None else np.flatnonzero(
            np.asarray(s.image_ids) == s.image_ids[int(pos[0])]).tolist()
        return sorted(((int(self.ids[r]), *s.face(r)) for r in rows), key=lambda entry: entry[1])

    def _logit_row(self, k: int) -> np.ndarray:
        row = self._logit_rows[k]
        if row is None:
            row = self._logit_rows[k] = _logit(self.probs[k])
        return row

    def confidence(self, node: Node, idx: np.ndarray, thresholds: str | None = None) -> np.ndarray:
        """Robustness scores (see module docstring) of the images at positions ``idx``, bare names
        measured against the threshold set ``thresholds`` (None: the index default)."""
        cuts = self._threshold_logits[self.threshold_set(thresholds)]

        def margin(lit: Literal) -> np.ndarray:
            if isinstance(lit, Tag):  # certain: never the weakest link of a match
                return np.where(self.tag_mask(lit)[idx], np.float32(CERTAIN), np.float32(-CERTAIN))
            z = self._logit_row(lit.index)[idx]
            if isinstance(lit, Attr):
                return z - cuts[lit.index]
            cut = _logit(np.float32(lit.value))
            return z - cut if lit.op in (">", ">=") else cut - z

        score = fold(node, margin, np.negative, lambda parts: functools.reduce(np.minimum, parts),
                     lambda parts: functools.reduce(np.maximum, parts))
        # A match decided by prefixed literals alone has no margin to report.
        return np.where(np.abs(score) >= CERTAIN, np.float32(0), score).astype(np.float32, copy=False)

    # -- the query ---------------------------------------------------------------------------

    def query(self, expr: str | Node | None = None, *, limit: int = 20, offset: int = 0,
              like: np.ndarray | None = None, like_id: int | None = None,
              thresholds: str | None = None, exact: bool = False, nprobe: int | None = None,
              person: np.ndarray | None = None, person_id: int | None = None) -> Result:
        """Filter by ``expr`` (text, an already parsed ``Node``, or None: everything) and return
        one ranked page.

        ``like`` (an embedding from the index's model) or ``like_id`` (an indexed image) ranks by
        cosine similarity; otherwise by attribute confidence. ``limit=0`` only counts.
        ``thresholds`` names the set bare names use ("f1", "accuracy"; None: the index default).
        ``exact`` forces an exact similarity scan where an approximate index exists; ``nprobe``
        sets the IVF lists it visits (default ``facefind.db.vectors.DEFAULT_NPROBE``: more is slower and
        closer). ``person`` (a 128-D identity descriptor) or ``person_id`` ranks by identity
        distance, always exactly, over the matches that have a descriptor (``total`` counts only those).
        """
        if limit < 0 or offset < 0:
            raise FacefindError(f"--limit and --offset must be >= 0 (got {limit}, {offset})")
        if nprobe is not None and nprobe < 1:
            raise FacefindError(f"--nprobe must be >= 1 (got {nprobe})")
        if sum(x is not None for x in (like, like_id, person, person_id)) > 1:
            raise ValueError("give at most one of like, like_id, person, person_id")
        if (person is not None or person_id is not None) and self.identity is None:
            raise CatalogError(NO_IDENTITY)
        node = self.parse(expr) if isinstance(expr, str) else expr
        text = expr if isinstance(expr, str) or expr is None else str(expr)
        used = self.threshold_set(thresholds)
        mask = self.mask(node, used) if node is not None else None
        idx = np.flatnonzero(mask) if mask is not None else None
        if person is not None or person_id is not None:
            mask = self.has_identity if mask is None else mask & self.has_identity
            idx = np.flatnonzero(mask)
        total = len(self) if idx is None else int(idx.shape[0])
        need = min(offset + limit, total)
        distances = False
        if like_id is not None:
            like = self.embedding_of(like_id)
        search = None
        if person_id is not None:
            person = self.identity_of(person_id)
        if person is not None:
            ranking, distances, search = "person", True, "exact"
            top, scores = self._by_person(person, idx, need)
        elif like is not None:
            ranking = "similarity"
            top, scores, search = self._similar(self._reference(like), mask, total, need,
                                                exact=exact, nprobe=nprobe)
        elif node is not None:
            ranking = "confidence"
            conf = self.confidence(node, idx, used)
            order = top_order(conf, self.ids[idx], need)
            top, scores = idx[order], conf[order]
        else:
            ranking = "id"
            top = self._id_order[:need]
            scores = np.zeros(need, dtype=np.float32)
        top, scores = top[offset:], scores[offset:]
        warnings = tuple(self.weak_attributes(node, used)) if node is not None else ()
        labelled = None
        if node is not None and any(isinstance(lit, Tag) and lit.prefix == "label" for lit, _ in literals(node)):
            labelled = int(np.count_nonzero(self._known(node)))
        return Result(total=total, n_indexed=len(self), hits=self._hits(node, top, scores, used, distances),
                      expression=text, ranking=ranking, offset=offset, node=node, thresholds=used,
                      warnings=warnings, search=search, labelled=labelled)

    def _hits(self, node: Node | None, top: np.ndarray, scores: np.ndarray, thresholds: str,
              distances: bool = False) -> list[Hit]:
        sub = self.probs[:, top]  # (K, L)
        lits = literals(node) if node is not None else []
        cuts = self.threshold_sets[thresholds]
        truth = [(literal_text(lit, pos), (self.tag_mask(lit)[top] if isinstance(lit, Tag)
                                           else literal_mask(lit, sub, cuts)) == pos)
                 for lit, pos in lits]
        return [
            Hit(id=int(self.ids[p]), path=self.snapshot.paths[p], score=float(scores[j]),
                attributes=dict(zip(self.attributes, sub[:, j].tolist())),
                matched=[text for text, ok in truth if ok[j]],
                distance=float(scores[j]) if distances else None,
                face=face, box=box)
            for j, p in enumerate(top.tolist())
            for face, box in [self.snapshot.face(p)]
        ]

    # -- similarity ----------------------------------------------------------------------------

    def _reference(self, like: np.ndarray) -> np.ndarray:
        q = np.asarray(like, dtype=np.float32).reshape(-1)
        d = self.emb.shape[1]
        if q.shape[0] != d:
            raise ModelError(f"the reference embedding has {q.shape[0]} dimensions but the index "
                             f"has {d}: embed the image with the index's own model")
        norm = float(np.linalg.norm(q))
        if not np.isfinite(norm) or norm == 0.0:
            raise ModelError("the reference embedding is zero or not finite: the model produced "
                             "no usable embedding for this image")
        return q / norm

    def _vector_index(self) -> Any:
        """The snapshot's flat store as a FAISS index: memory-mapped from its file (nothing is
        built or copied), or wrapped around ``emb`` for a snapshot that lives only in memory."""
        if self._vectors is None:
            folder = self.snapshot.folder
            if folder is None:
                self._vectors = vectors.flat_index(self.emb)
            else:
                try:
                    self._vectors = vectors.open_flat(folder / VECTORS)
                except RuntimeError as err:
                    raise CatalogError(f"the vector file {folder / VECTORS} cannot be read "
                                       f"({str(err).strip().splitlines()[0] if str(err).strip() else err}): "
                                       "run `facefind check --repair`") from None
        return self._vectors

    def _approx_index(self) -> Any:
        """The snapshot's approximate index, or None when it has none (or it cannot be read:
        then every query is answered exactly, with a warning, until `check --repair`)."""
        if self._approx is None:
            self._approx = False
            folder = self.snapshot.folder
            if self.snapshot.approximate and folder is not None:
                try:
                    self._approx = vectors.open_approx(folder / APPROX)
                except (RuntimeError, OSError) as err:
                    log.warning("the approximate index %s cannot be read (%s): searching exactly; "
                                "`facefind check --repair` rebuilds it", folder / APPROX, err)
        return self._approx or None

    def _similar(self, q: np.ndarray, mask: np.ndarray | None, total: int, need: int, *,
                 exact: bool = False, nprobe: int | None = None) -> tuple[np.ndarray, np.ndarray, str]:
        """Top ``need`` positions by cosine among ``mask`` (ties by id), and 'exact' or
        'approximate': the approximate index serves wide searches unless ``exact``."""
        if need == 0:
            return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float32), "exact"
        approx = None if exact else self._approx_index()
        if approx is not None and (mask is None or total > EXACT_SUBSET):
            found = self._similar_approx(approx, q, mask, need, nprobe)
            if found is not None:
                return found[0], found[1], "approximate"
        top, sims = self._similar_exact(q, mask, total, need)
        return top, sims, "exact"

    def _similar_approx(self, index: Any, q: np.ndarray, mask: np.ndarray | None, need: int,
                        nprobe: int | None) -> tuple[np.ndarray, np.ndarray] | None:
        """Candidates from the approximate index (only rows passing ``mask``), re-scored exactly
        from the flat store; None when the visited lists held fewer than ``need`` matches."""
        with _faiss_threads(vectors.configure_faiss(), 1):
            cand = vectors.approx_candidates(index, q, max(vectors.RERANK, 2 * need), nprobe=nprobe,
                                             allowed=mask)
        if cand.shape[0] < need:
            return None
        cand = np.sort(cand)  # in file order: the gather below reads the memory map forwards
        sims = np.asarray(self.emb[cand], dtype=np.float32) @ q
        order = top_order(sims, self.ids[cand], need)
        return cand[order], sims[order]

    def _similar_exact(self, q: np.ndarray, mask: np.ndarray | None, total: int,
                       need: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact top ``need`` positions by cosine among ``mask`` (ties by id)."""
        import faiss  # not at the top: a query without similarity never loads FAISS

        index = self._vector_index()
        n = len(self)
        params, bitmap = None, None
        if mask is not None and total <= BITMAP_FRACTION * n:
            bitmap = np.packbits(mask, bitorder="little")
            params = faiss.SearchParameters(sel=faiss.IDSelectorBitmap(n, faiss.swig_ptr(bitmap)))
            pool, k = total, need + 1
        else:
            pool, k = n, need + 1 if mask is None else int(need * n / max(total, 1) * 1.5) + 8
        while True:
            k = min(k, pool)
            with _faiss_threads(faiss, 1):
                dist, lab = index.search(q[None, :], k, params=params)
            dist, lab = dist[0], lab[0]
            keep = lab >= 0
            if mask is not None and bitmap is None:
                keep &= mask[np.maximum(lab, 0)]
            cand, sims = lab[keep], dist[keep]
            # Exact once everything is seen, or once the need-th match beats the worst score
            # retrieved (nothing unseen can tie with it).
            if k >= pool or (cand.shape[0] >= need and sims[need - 1] > dist[-1]):
                break
            k *= 2
        order = top_order(sims, self.ids[cand], need)
        return cand[order], sims[order]

    # -- identity ------------------------------------------------------------------------------

    def identity_of(self, image_id: int) -> np.ndarray:
        """The stored identity descriptor of an indexed image (CatalogError when it has none)."""
        if self.identity is None:
            raise CatalogError(NO_IDENTITY)
        pos, found = self.positions(np.array([image_id]))
        if not found[0]:
            raise CatalogError(f"image id {image_id} is not in the index: list ids with "
                               "`facefind query EXPR --json`, or pass an image file instead")
        if not self.has_identity[pos[0]]:
            raise CatalogError(f"image {image_id} has no identity descriptor (no face was found in it): "
                               "pass another image")
        return np.asarray(self.identity[pos[0]], dtype=np.float32)

    def _by_person(self, q: np.ndarray, idx: np.ndarray, need: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact top ``need`` positions among ``idx`` by Euclidean distance to descriptor ``q``
        (ascending, ties by id), and their distances."""
        q = np.asarray(q, dtype=np.float32).reshape(-1)
        if q.shape[0] != self.identity.shape[1]:
            raise ModelError(f"the identity descriptor has {q.shape[0]} dimensions, the index {self.identity.shape[1]}")
        dist = np.empty(idx.shape[0], dtype=np.float32)
        for start in range(0, idx.shape[0], IDENTITY_CHUNK):
            rows = idx[start:start + IDENTITY_CHUNK]
            diff = np.asarray(self.identity[rows], dtype=np.float32) - q
            dist[start:start + rows.shape[0]] = np.sqrt(np.einsum("ij,ij->i", diff, diff))
        order = top_order(-dist, self.ids[idx], need)
        return idx[order], dist[order]

    # -- quality against ground truth ---------------------------------------------------------

    def evaluate_quality(self, result: Result, labels: np.ndarray, label_ids: np.ndarray,
                         label_attributes: Sequence[str]) -> Quality:
        """Precision@k of ``result``'s hits, precision/recall of all its matches, and the base
        rate, against ground-truth ``labels`` (K', M), 0/1 or -1/1, for images ``label_ids``.

        The expression is evaluated on the labels with bare names meaning label == 1 and
        comparisons reading the label as a probability of 0 or 1.
        """
        if result.node is None:
            raise FacefindError("retrieval quality needs an expression to check against labels")
        names = {a.lower() for a in label_attributes}
        predicted_lits = [lit for lit, _ in literals(result.node) if not isinstance(lit, Tag)]
        missing = sorted({lit.name for lit in predicted_lits if lit.name.lower() not in names})
        if missing:
            raise CatalogError(f"the ground-truth labels have no {', '.join(missing)}: "
                               "index an annotated dataset to measure this query")
        label_ids = np.asarray(label_ids, dtype=np.int64)
        if label_ids.shape == self.ids.shape and np.array_equal(label_ids, self.ids):
            pos, found = np.arange(len(self)), np.ones(len(self), dtype=bool)  # every image labelled
        else:
            pos, found = self.positions(label_ids)
        # Only the rows the expression names are read: a web page asks this for every query, and
        # converting all 40 x 202,599 labels (plus a dict of every id) took ~300 ms of each call.
        # Prefixed literals (label:, person:) are facts, the same under the labels as predicted.
        lookup = {a.lower(): i for i, a in enumerate(label_attributes)}
        used = list(dict.fromkeys(lit.name for lit in predicted_lits))
        rows = np.asarray(labels)[[lookup[n.lower()] for n in used]]
        truth_node = reindex(result.node, used)
        truth = evaluate(truth_node, (rows > 0).astype(np.uint8), np.full(len(used), 0.5, np.float32),
                         lambda tag: self.tag_mask(tag)[pos] & found)

        predicted = self.mask(result.node, result.thresholds)[pos[found]]
        truth_in = truth[found]
        order = np.argsort(label_ids, kind="stable")
        sorted_ids = label_ids[order]
        hit_ids = np.array([h.id for h in result.hits], dtype=np.int64)
        at, labelled = find_sorted(sorted_ids, hit_ids)
        hit_truth = truth[order[at[labelled]]].tolist()
        k, relevant = len(hit_truth), int(sum(hit_truth))
        return Quality(
            expression=str(result.node), k=k, relevant=relevant,
            precision_at_k=_ratio(relevant, k),
            precision_all=_ratio(int((predicted & truth_in).sum()), int(predicted.sum())),
            recall=_ratio(int((predicted & truth_in).sum()), int(truth_in.sum())),
            base_rate=_ratio(int(truth_in.sum()), int(found.sum())),
            n_labelled=int(found.sum()),
        )
