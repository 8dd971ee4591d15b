"""Runner stage: decoded uint8 batches -> attribute probabilities and embeddings, one forward pass.

The model and its preprocessing come from the checkpoint (``trainer.checkpoint.load_model`` and
``trainer.model.preprocess``), so indexing cannot disagree with training about image size or
normalisation. On CUDA the pass runs under bf16 autocast with channels_last inputs; outputs are
returned as float32 numpy arrays: probabilities ``(n, K)`` and L2-normalised embeddings ``(n, D)``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

    from trainer.checkpoint import CheckpointMeta

log = logging.getLogger(__name__)


class Runner:
    """Callable: uint8 ``(n, 3, H, W)`` tensor or array (any device) -> ``(probs, embeddings)``."""

    def __init__(self, model: Any, meta: CheckpointMeta, device: torch.device) -> None:
        from trainer.device import configure

        self.model = model
        self.meta = meta
        self.device = device
        configure(device)

    @property
    def img_size(self) -> tuple[int, int]:
        """The (height, width) the checkpoint was trained at."""
        return (int(self.meta.img_size[0]), int(self.meta.img_size[1]))

    def __call__(self, pixels: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        import torch
        import torch.nn.functional as F

        from trainer.device import autocast
        from trainer.model import preprocess

        if isinstance(pixels, np.ndarray):
            pixels = torch.from_numpy(pixels)
        k, d = len(self.meta.attributes), int(self.meta.embedding_dim)
        if pixels.shape[0] == 0:
            return np.zeros((0, k), np.float32), np.zeros((0, d), np.float32)
        if pixels.device.type == "cpu" and self.device.type == "cuda":
            pixels = pixels.pin_memory()
        pixels = pixels.to(self.device, non_blocking=True)  # a no-op when already there
        with torch.inference_mode(), autocast(self.device):
            logits, embedding = self.model(preprocess(pixels, self.meta))
            probs = torch.sigmoid(logits.float())
            embedding = F.normalize(embedding.float(), dim=1)
        return probs.cpu().numpy(), embedding.cpu().numpy()


def load_runner(model_path: str | Path, device: torch.device) -> Runner:
    """A Runner for the checkpoint at ``model_path`` on ``device`` (ModelError when unreadable)."""
    from trainer.checkpoint import load_model

    model, meta = load_model(Path(model_path), device)
    return Runner(model, meta, device)
