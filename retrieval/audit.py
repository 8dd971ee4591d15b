"""The audit: ground-truth labels beside predictions, label errors first, and subgroup gaps.

``run_audit(engine, where=..., by=["Male", "Young"])`` is what ``facefind audit`` and
``GET /api/audit`` call; it returns an ``Audit`` whose ``to_dict()`` is their JSON. numpy only: no
torch, no SQLAlchemy, no model (the predictions and labels are the snapshot's).

Per attribute, over the covered entries that carry labels: label rate against predicted rate;
accuracy, precision, recall, F1 and AP against the labels; the disagreements each way, with how
many are confident and the ids of the first ones. A false negative (label positive, predicted
negative) is a hit of ``label:A and not A``; a false positive of ``A and not label:A``. Both are
ranked exactly as the engine ranks those queries (the weakest-link log-odds margin; a label literal
adds none), so the ids listed are the first hits of the query printed beside them: the faces the
model is surest about are the likeliest label errors. "Confident" means a margin of at least
``CONFIDENT`` log-odds from the threshold (at a 0.5 threshold: p <= 0.12 or p >= 0.88).

Per group of each ``by`` attribute (``A`` and ``not A``, by label where the covered entries carry
labels, else by prediction): positive rates, accuracy, true- and false-positive rate per attribute,
and the gaps between the two groups: demographic-parity difference (predicted positive rates) and
equalized-odds difference (the larger of the TPR and FPR gaps; fairlearn's definitions). The
largest gaps come first in ``largest_gaps``.

Every number that stands for faces carries the expression that shows them (``query``), so the
page links each bar and cell to ``/?q=...``. Counts are matrix products over (K, M) 0/1 arrays and
AP is one sort per attribute, so a 40-attribute report over 202,599 entries takes well under 2 s.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from facefind.db.errors import FacefindError
from facefind.db.snapshot import SPLITS
from facefind.retrieval.engine import Engine, top_order
from facefind.retrieval.query import Attr, did_you_mean

CONFIDENT = 2.0        # log-odds from the threshold that make a disagreement "confident"
DEFAULT_BY = ("Male", "Young")
LARGEST = 10           # gaps listed in largest_gaps


@dataclass
class Audit:
    """One audit report; ``to_dict()`` is the JSON of ``facefind audit --json`` and ``/api/audit``."""

    coverage: dict[str, Any]
    thresholds: str
    confident: float
    checked: bool                    # False: no covered entry carries labels; nothing was checked
    attributes: list[dict[str, Any]]
    groups: list[dict[str, Any]]
    largest_gaps: list[dict[str, Any]]
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"coverage": self.coverage, "thresholds": self.thresholds, "confident_margin": self.confident,
                "checked_against_labels": self.checked, "warnings": self.warnings,
                "attributes": self.attributes, "groups": self.groups, "largest_gaps": self.largest_gaps}


def parse_by(by: str) -> list[str]:
    """``--by``'s text: ``Male,Young`` -> ["Male", "Young"]; "" or "none" -> no grouping."""
    names = [b.strip() for b in by.split(",") if b.strip()]
    return [] if [n.lower() for n in names] == ["none"] else names


# ------------------------------------------------------------------------------------ metrics


def _ratio(num: Any, den: Any) -> float | None:
    return float(num) / float(den) if den else None


def average_precision(scores: np.ndarray, positive: np.ndarray) -> float | None:
    """AP of ranking by ``scores`` (probabilities, >= 0; descending) against 0/1 ``positive``: the
    sum over distinct score thresholds of (recall step) x (precision there), as sklearn's
    ``average_precision_score``. None without positives.

    One sort of 32-bit keys, no argsort: a non-negative float32's bits order like the float, so
    ``bits << 1 | label`` sorts the scores and carries each label along (3x faster at 202,599).
    """
    n_pos = int(np.count_nonzero(positive))
    if n_pos == 0:
        return None
    key = (np.ascontiguousarray(scores, dtype=np.float32).view(np.uint32) << np.uint32(1)) | positive.astype(np.uint32)
    key.sort()
    key = key[::-1]                                                      # descending
    s, y = key >> np.uint32(1), key & np.uint32(1)
    tp = np.cumsum(y, dtype=np.int64)
    last = np.r_[np.flatnonzero(s[1:] != s[:-1]), s.shape[0] - 1]  # end of each block of tied scores
    tp = tp[last]
    precision = tp / (last + 1)
    recall_step = np.diff(np.r_[0, tp]) / n_pos
    return float(np.sum(recall_step * precision))


def _expr(*parts: str | None) -> str:
    """``a and b and ...`` of the non-empty parts; a part with ``or`` is parenthesised."""
    kept = [p for p in parts if p]
    return " and ".join(f"({p})" if (" or " in f" {p.lower()} " and len(kept) > 1) else p for p in kept)


def _faces(count: Any, query: str) -> dict[str, Any]:
    return {"count": int(count), "query": query}


# -------------------------------------------------------------------------------------- audit


def run_audit(engine: Engine, *, where: str | None = None, by: Sequence[str] = DEFAULT_BY,
              thresholds: str | None = None, top: int = 10, confident: float = CONFIDENT) -> Audit:
    """Audit the entries of ``engine`` that satisfy ``where`` (None: all), grouped by each ``by``
    attribute, bare names judged at the threshold set ``thresholds`` (None: the index default).

    FacefindError (one line, what to do) for an unknown ``by`` name, a bad expression or a
    ``top`` below 0; a ``by`` or ``where`` that needs labels the index lacks is the engine's error.
    """
    if top < 0:
        raise FacefindError(f"--top must be 0 or more, not {top}")
    set_name = engine.threshold_set(thresholds)
    t = engine.threshold_sets[set_name]
    attrs = list(engine.attributes)
    lookup = {a.lower(): k for k, a in enumerate(attrs)}
    by_idx = []
    for name in by:
        k = lookup.get(name.strip().lower())
        if k is None:
            raise FacefindError(f"--by: unknown attribute {name.strip()!r}{did_you_mean(name.strip(), attrs, 'attributes')}")
        if k not in by_idx:
            by_idx.append(k)

    where = where.strip() if where else None
    where_node = engine.parse(where) if where else None
    where = str(where_node) if where_node is not None else None  # '|' and '||' written as 'or'
    covered = np.flatnonzero(engine.mask(where_node, set_name))
    if covered.shape[0] == 0:
        raise FacefindError(f"no entry matches {where!r}: nothing to audit; loosen --where "
                            "(`facefind query EXPR --limit 0` counts the matches)")
    ids = engine.ids[covered]
    m = covered.shape[0]
    probs = engine.probs[:, covered]
    pred = probs >= t[:, None]                                         # (K, M), as the engine's bare names

    # Ground truth, aligned with the model's attributes: -1 where an entry (or a row) has none.
    labels = np.full((len(attrs), m), -1, dtype=np.int8)
    label_names = engine.label_attributes or []
    engine_labels = engine.labels
    has_row = np.zeros(len(attrs), dtype=bool)
    if engine_labels is not None and m:
        rows = {n.lower(): r for r, n in enumerate(label_names)}
        for k, a in enumerate(attrs):
            r = rows.get(a.lower())
            if r is not None:
                labels[k] = np.asarray(engine_labels[r])[covered]
                has_row[k] = True
    known = labels >= 0
    pos, neg = labels == 1, labels == 0
    labelled = int(np.count_nonzero(known.any(axis=0))) if m else 0
    checked = labelled > 0

    coverage, warnings = _coverage(engine, covered, where, labelled)
    if not checked:
        warnings.append("no covered entry carries ground-truth labels: this reports predicted composition only; "
                        "nothing was checked against labels (index a folder with list_attr_celeba.txt beside it)")

    # Each attribute's log-odds margin from its threshold, as the engine measures it.
    margins = np.empty((len(attrs), m), dtype=np.float32)
    for k, a in enumerate(attrs):
        margins[k] = engine.confidence(Attr(a, k), covered, set_name)

    # Every count, per attribute and per column of `members` (everything, then each group), as one
    # matrix product of a (K, M) 0/1 array with (M, 1 + 2G): exact in float32 below 2**24 entries.
    by_label = [bool(has_row[g] and np.any(known[g])) for g in by_idx]
    members = [np.ones(m, dtype=bool)]
    for g, lab in zip(by_idx, by_label):
        members += [pos[g], neg[g]] if lab else [pred[g], ~pred[g]]
    gm = np.stack(members, axis=1).astype(np.float32)
    counts = {name: np.rint(x.astype(np.float32) @ gm).astype(np.int64) for name, x in (
        ("known", known), ("pos", pos), ("neg", neg), ("pred", pred), ("tp", pred & pos), ("fp", pred & neg),
        ("pred_known", pred & known))}
    size = gm.sum(axis=0).astype(np.int64)

    per_attr = []
    for k, a in enumerate(attrs):
        per_attr.append(_attribute(a, {c: int(v[k, 0]) for c, v in counts.items()}, float(t[k]), pred[k],
                                   probs[k], margins[k], known[k], pos[k], neg[k], ids, covered, where, top,
                                   confident, has_row[k], engine, set_name))

    groups, gaps = [], []
    for j, (g, lab) in enumerate(zip(by_idx, by_label)):
        cols = [1 + 2 * j, 2 + 2 * j]
        block = _grouping(attrs, g, {c: v[:, cols] for c, v in counts.items()}, size[cols], where, lab)
        groups.append(block)
        gaps.extend(block.pop("_gaps"))
    key = "equalized_odds" if checked else "demographic_parity"
    gaps.sort(key=lambda r: (-(r[key] if r[key] is not None else -1.0), r["attribute"], r["by"]))
    return Audit(coverage, set_name, confident, checked, per_attr, groups, gaps[:LARGEST], warnings)


def _coverage(engine: Engine, covered: np.ndarray, where: str | None, labelled: int) -> tuple[dict[str, Any], list[str]]:
    """What the audit covered (entries, with labels, by split) and a warning when it includes the
    training split."""
    splits = engine.splits
    by_split: dict[str, int] | None = None
    warnings = []
    if splits is not None:
        s = np.asarray(splits)[covered]
        by_split = {name: int(np.count_nonzero(s == i)) for i, name in enumerate(SPLITS)}
        by_split["unknown"] = int(np.count_nonzero(s < 0))
        if by_split["train"]:
            warnings.append(f"{by_split['train']:,} covered entries are in the train split, which the model was "
                            "trained on: their metrics flatter it; audit with --where 'not split:train'")
    cov = {"entries": int(covered.shape[0]), "indexed": len(engine), "with_labels": labelled,
           "where": where, "splits": by_split}
    return cov, warnings


def _attribute(a: str, c: dict[str, int], threshold: float, pred: np.ndarray, prob: np.ndarray,
               margin: np.ndarray, known: np.ndarray, pos: np.ndarray, neg: np.ndarray, ids: np.ndarray,
               covered: np.ndarray, where: str | None, top: int, confident: float, has_row: bool,
               engine: Engine, set_name: str) -> dict[str, Any]:
    """One attribute's row of the report (see the module docstring); ``c`` holds its counts."""
    n_known = c["known"]
    out: dict[str, Any] = {
        "attribute": a, "threshold": threshold, "labelled": n_known,
        "predicted": _faces(c["pred"], _expr(where, a)),
        "predicted_rate": _ratio(c["pred_known"], n_known) if n_known else _ratio(c["pred"], pred.shape[0]),
    }
    if not n_known:
        out.update(label_rate=None, accuracy=None, precision=None, recall=None, f1=None, ap=None,
                   tp=None, fp=None, fn=None, tn=None, labels=has_row)
        return out
    tp, fp = c["tp"], c["fp"]
    fn, tn = c["pos"] - tp, c["neg"] - fp
    precision, recall = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
    f1 = _ratio(2 * tp, 2 * tp + fp + fn)
    out.update(label_rate=_ratio(tp + fn, n_known), accuracy=_ratio(tp + tn, n_known), precision=precision,
               recall=recall, f1=f1, ap=average_precision(prob[known], pos[known]), tp=tp, fp=fp, fn=fn, tn=tn,
               labels=True, label_positive=_faces(tp + fn, _expr(where, f"label:{a}")))
    # False negatives are the hits of `label:A and not A` (margin: that of `not A`), false positives
    # of `A and not label:A`. They are ranked by the engine's own confidence of that very query, so
    # the ids are its first hits also when `where` adds literals (the weakest link decides).
    for way, members, score in (("false_negatives", pos & ~pred, -margin), ("false_positives", neg & pred, margin)):
        idx = np.flatnonzero(members)
        query = _expr(where, f"label:{a} and not {a}") if way == "false_negatives" else _expr(where, f"{a} and not label:{a}")
        s = score[idx] if where is None else engine.confidence(engine.parse(query), covered[idx], set_name)
        first = idx[top_order(s, ids[idx], top)]
        out[way] = {"count": int(idx.shape[0]), "confident": int(np.count_nonzero(score[idx] >= confident)),
                    "query": query, "top": ids[first].tolist(),
                    "top_margin": [round(float(score[i]), 3) for i in first]}
    return out


def _grouping(attrs: list[str], g: int, c: dict[str, np.ndarray], size: np.ndarray, where: str | None,
              by_label: bool) -> dict[str, Any]:
    """The two groups of attribute ``g`` (by label when ``by_label``, else by prediction), each
    attribute's rates in both, and the gaps between them (under the private key ``_gaps``).
    ``c`` holds the (K, 2) counts per attribute and group, ``size`` the groups' sizes."""
    name = attrs[g]
    exprs = [f"label:{name}", f"not label:{name}"] if by_label else [name, f"not {name}"]
    n_known, n_pos, n_neg, tp, fp = c["known"], c["pos"], c["neg"], c["tp"], c["fp"]
    n_pred, n_pred_known = c["pred"], c["pred_known"]
    checked = bool(n_known.any())

    out_groups = []
    for j in range(2):
        per = {}
        for k, a in enumerate(attrs):
            if k == g:
                continue
            row: dict[str, Any] = {"predicted_rate": _ratio(n_pred_known[k, j], n_known[k, j]) if checked
                                   else _ratio(n_pred[k, j], size[j])}
            if n_known[k, j]:
                tn = n_neg[k, j] - fp[k, j]
                row.update(positives=int(n_pos[k, j]), negatives=int(n_neg[k, j]),
                           label_rate=_ratio(n_pos[k, j], n_known[k, j]),
                           accuracy=_ratio(tp[k, j] + tn, n_known[k, j]),
                           tpr=_ratio(tp[k, j], n_pos[k, j]), fpr=_ratio(fp[k, j], n_neg[k, j]),
                           fn=_faces(n_pos[k, j] - tp[k, j], _expr(where, f"label:{a} and not {a}", exprs[j])),
                           fp=_faces(fp[k, j], _expr(where, f"{a} and not label:{a}", exprs[j])))
            else:
                row.update(label_rate=None, accuracy=None, tpr=None, fpr=None)
            row["predicted"] = _faces(n_pred[k, j], _expr(where, a, exprs[j]))
            per[a] = row
        out_groups.append({"name": exprs[j].replace("label:", ""), "query": _expr(where, exprs[j]),
                           "entries": int(size[j]), "attributes": per})

    gaps = []
    for k, a in enumerate(attrs):
        if k == g:
            continue
        r0, r1 = out_groups[0]["attributes"][a], out_groups[1]["attributes"][a]
        dp = _diff(r0["predicted_rate"], r1["predicted_rate"])
        tpr_gap, fpr_gap = _diff(r0.get("tpr"), r1.get("tpr")), _diff(r0.get("fpr"), r1.get("fpr"))
        eo = None if tpr_gap is None and fpr_gap is None else max(x for x in (tpr_gap, fpr_gap) if x is not None)
        # The faces behind the gap: the worse group's misses when the TPR gap is the larger,
        # else its false alarms; without labels, the group that is predicted positive more often.
        # ``support``: how many labelled faces the larger rate gap rests on in the smaller group (a gap
        # over 9 faces is weaker evidence than one over 900).
        if eo is None:
            j = 0 if (r0["predicted_rate"] or 0) >= (r1["predicted_rate"] or 0) else 1
            query, support = out_groups[j]["attributes"][a]["predicted"]["query"], None
        elif tpr_gap is not None and (fpr_gap is None or tpr_gap >= fpr_gap):
            j = 0 if (r0["tpr"] or 0) <= (r1["tpr"] or 0) else 1
            query, support = out_groups[j]["attributes"][a]["fn"]["query"], min(r0["positives"], r1["positives"])
        else:
            j = 0 if (r0["fpr"] or 0) >= (r1["fpr"] or 0) else 1
            query, support = out_groups[j]["attributes"][a]["fp"]["query"], min(r0["negatives"], r1["negatives"])
        gaps.append({"attribute": a, "by": name, "demographic_parity": dp, "equalized_odds": eo,
                     "tpr_gap": tpr_gap, "fpr_gap": fpr_gap, "support": support,
                     "worse": out_groups[j]["name"], "query": query})
    return {"by": name, "source": "label" if by_label else "prediction", "groups": out_groups,
            "gaps": {r["attribute"]: {key: r[key] for key in r if key not in ("attribute", "by")} for r in gaps},
            "_gaps": gaps}


def _diff(x: float | None, y: float | None) -> float | None:
    return None if x is None or y is None else abs(x - y)
