"""Memory-mappable sidecar files: the query engine's read-only view of one model's predictions.

The catalog is the source of truth; a snapshot is derived from it and can always be rebuilt.
Layout under the index folder (one folder per model, one immutable generation per write):

    <index>/model-<id>/CURRENT              name of the live generation folder (replaced atomically)
    <index>/model-<id>/gen-<stamp>/
        manifest.json   model_id, stamp, count, attributes, thresholds, embedding_dim, arch, checkpoint
        ids.npy         int64 (N,)        catalog image ids, ascending
        probs.npy       float32 (K, N)    attribute probabilities, column-major for fast filtering
        emb.npy         float16 (N, D)    L2-normalised embeddings (cosine = inner product)
        paths.json      list[str] (N,)    absolute image paths, same order as ids
        vectors.faiss   FAISS index of emb with ids (see db/vectors.py)

Readers open CURRENT once and then only immutable files, so a reader never sees a half-written
generation while an indexer writes the next one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Snapshot:
    """One model's predictions, as arrays. ``probs[k, i]`` is attribute k of image ``ids[i]``."""

    model_id: int
    stamp: int                 # the catalog's prediction generation this snapshot was built from
    attributes: list[str]      # K names, in checkpoint order
    thresholds: np.ndarray     # float32 (K,), calibrated decision thresholds
    ids: np.ndarray            # int64 (N,)
    probs: np.ndarray          # float32 (K, N)
    emb: np.ndarray            # float16 (N, D), L2-normalised
    paths: list[str]           # N absolute paths
    folder: Path | None = None # the generation folder it was loaded from (None when built in memory)

    def __len__(self) -> int:
        return int(self.ids.shape[0])
