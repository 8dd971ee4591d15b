"""What the index holds: its attributes (thresholds, rates), the index and server (/api/info), and
the model's metrics and training history (/api/model)."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request

from facefind.db.errors import FacefindError
from facefind.retrieval.web.deps import LiveDep, SourceDep, ThumbsDep
from facefind.retrieval.web.errors import REFUSALS
from facefind.retrieval.web.guard import MAX_UPLOAD
from facefind.retrieval.web.models import AttributesOut
from facefind.trainer.checkpoint import load_checkpoint

log = logging.getLogger(__name__)

router = APIRouter(prefix="/api", responses=REFUSALS)


async def token_required(request: Request) -> bool:
    return request.app.state.token_required


async def model_reports(request: Request) -> dict[str, Any]:
    """/api/model's answers by checkpoint sha256 (a checkpoint's history is read once)."""
    return request.app.state.model_reports


# /api/attributes, /api/info and /api/images/{id} run on the event loop, as /api/query does (see
# routes/search.py): after their first call per snapshot (rates, labels and the model record are
# kept with it) they take well under a millisecond, and a plain def with a response model would
# wait for a worker thread twice (FastAPI validates a def route's answer on a worker thread too).
@router.get("/attributes", response_model=AttributesOut,
            summary="Attribute names, calibrated thresholds and positive rates")
async def attributes(live: LiveDep) -> dict[str, Any]:
    eng = live.engine
    rates = live.once("rates", lambda: (eng.probs >= eng.thresholds[:, None]).mean(axis=1))
    labels = live.labels
    label_rates = labels.matrix.mean(axis=0) if labels is not None else None
    return {
        "n_indexed": len(eng), "has_labels": labels is not None, "has_identity": eng.identity is not None,
        "default_thresholds": eng.default_thresholds, "threshold_sets": sorted(eng.threshold_sets),
        "attributes": [
            {"name": name, "threshold": float(eng.thresholds[k]),
             "thresholds": {s: float(t[k]) for s, t in eng.threshold_sets.items()},
             "positive_rate": float(rates[k]),
             "label_rate": float(label_rates[k]) if label_rates is not None else None}
            for k, name in enumerate(eng.attributes)],
    }


@router.get("/info", summary="The index, its snapshot and model, and this server")
async def info(live: LiveDep, source: SourceDep, thumbs: ThumbsDep,
               token: Annotated[bool, Depends(token_required)]) -> dict[str, Any]:
    eng = live.engine
    out = source.describe()
    out.update({"n_indexed": len(eng), "attributes": len(eng.attributes),
                "embedding_dim": int(eng.emb.shape[1]), "has_labels": live.labels is not None,
                "has_identity": eng.identity is not None,
                "identities": int(eng.has_identity.sum()) if eng.has_identity is not None else 0,
                "token_required": token, "thumbnails": str(thumbs.folder),
                "max_upload_bytes": MAX_UPLOAD})
    if live.opened is not None:
        model = live.once("model_record", lambda: live.opened.catalog.get_model(eng.snapshot.model_id))
        meta = model.meta or {}
        val = meta.get("val_metrics") or {}
        out["model"] = {"id": model.id, "arch": model.arch, "checkpoint": model.checkpoint,
                        "sha256": model.sha256, "img_size": meta.get("img_size"),
                        "epoch": meta.get("epoch"), "created": meta.get("created"),
                        "val_mean_accuracy": val.get("mean_accuracy"), "val_macro_f1": val.get("macro_f1")}
    return out


# On a worker thread: the first call per checkpoint reads the checkpoint file for its history.
@router.get("/model", summary="The checkpoint's per-attribute metrics and training history")
def model(live: LiveDep, reports: Annotated[dict[str, Any], Depends(model_reports)]) -> dict[str, Any]:
    if live.opened is None:
        return {"arch": None, "attributes": live.engine.attributes, "val_metrics": None,
                "test_metrics": None, "history": []}
    record = live.opened.catalog.get_model(live.engine.snapshot.model_id)
    if record.sha256 not in reports:
        reports[record.sha256] = _finite(model_report(record))
    return reports[record.sha256]


def model_report(record: Any) -> dict[str, Any]:
    """Per-attribute metrics (catalog) and the training history (the checkpoint, when it is there)."""
    meta = record.meta or {}
    history: list[dict[str, Any]] = []
    if record.checkpoint and Path(record.checkpoint).is_file():
        try:
            history = list(load_checkpoint(Path(record.checkpoint))["meta"].get("history") or [])
        except FacefindError as err:
            log.warning("no training history: %s", err)
    return {"id": record.id, "arch": record.arch, "checkpoint": record.checkpoint,
            "attributes": record.attributes, "thresholds": record.thresholds,
            "epoch": meta.get("epoch"), "best_epoch": meta.get("best_epoch"),
            "val_metrics": meta.get("val_metrics"), "test_metrics": meta.get("test_metrics"),
            "history": history}


def _finite(obj: Any) -> Any:
    """``obj`` with NaN/inf replaced by None (JSON has neither)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj
