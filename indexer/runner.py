"""Runner stage: decoded uint8 batches -> attribute probabilities and embeddings, one forward pass.

The model and its preprocessing come from the checkpoint, and the forward pass is
``facefind.indexer.predict.infer``, the same one ``predict`` and ``similar`` use, so indexing cannot
disagree with them or with training about image size or normalisation. On CUDA the pass runs
under bf16 autocast; outputs are float32 numpy arrays: probabilities ``(n, K)`` and L2-normalised
embeddings ``(n, D)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from facefind.indexer.predict import infer
from facefind.trainer.checkpoint import CheckpointMeta, build_model, load_checkpoint
from facefind.trainer.device import configure


class Runner:
    """Callable: uint8 ``(n, 3, H, W)`` tensor or array (any device) -> ``(probs, embeddings)``."""

    def __init__(self, model: Any, meta: CheckpointMeta, device: torch.device) -> None:
        self.model = model
        self.meta = meta
        self.device = device
        configure(device)

    @property
    def img_size(self) -> tuple[int, int]:
        """The (height, width) the checkpoint was trained at."""
        return (int(self.meta.img_size[0]), int(self.meta.img_size[1]))

    def __call__(self, pixels: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return infer(self.model, self.meta, pixels, self.device)


def load_runner(model_path: str | Path, device: torch.device, checkpoint: dict[str, Any] | None = None) -> Runner:
    """A Runner for the checkpoint at ``model_path`` on ``device`` (ModelError when unreadable).

    ``checkpoint`` is the file's dict when the caller has already read it (``read_checkpoint``):
    the file is then not read again.
    """
    path = Path(model_path)
    model, meta = build_model(checkpoint if checkpoint is not None else load_checkpoint(path), path, device)
    return Runner(model, meta, device)
