"""Plain helpers shared by several test files (fixtures live in conftest.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np


def tiny_checkpoint(path: Path, attributes: Sequence[str], *, calibrate: Sequence[Path] | None = None,
                    size: int = 64, dim: int = 32, seed: int = 0) -> Path:
    """Save a freshly initialised mobilenet_v3_small checkpoint (``size`` px, ``dim``-d embedding).

    Indexing does not care what a model learned, but similarity and attribute tests do: with
    ``calibrate``, BatchNorm statistics and median thresholds come from those images, so that
    embeddings differ between faces and each attribute splits them.
    """
    import torch
    from torch import nn

    from trainer.checkpoint import CheckpointMeta, save_checkpoint
    from trainer.decode import decode_paths
    from trainer.model import IMAGENET_MEAN, IMAGENET_STD, create_model, preprocess

    torch.manual_seed(seed)
    model = create_model("mobilenet_v3_small", len(attributes), embedding_dim=dim)
    meta = CheckpointMeta(arch="mobilenet_v3_small", attributes=list(attributes), img_size=(size, size),
                          mean=IMAGENET_MEAN, std=IMAGENET_STD, embedding_dim=dim, dropout=0.3,
                          thresholds=[0.5] * len(attributes))
    if calibrate:
        x = preprocess(torch.from_numpy(decode_paths(list(calibrate), (size, size))), meta)
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.reset_running_stats()
                m.momentum = None  # running stats = this batch's
        with torch.no_grad():
            model.train()
            model(x)
            model.eval()
            probs = torch.sigmoid(model(x)[0]).numpy()
        meta.thresholds = [float(t) for t in np.median(probs, axis=0)]
    return save_checkpoint(path, model, meta)
