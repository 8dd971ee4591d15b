"""Attributes and embeddings for one-off images: the study's ``predict()``, and what ``similar`` embeds.

``Predictor(model_path, device)`` loads a checkpoint once; ``predict(paths)`` decodes each image,
crops it to its face when it does not look like an aligned CelebA crop (or when asked), resizes it
with the trainer's own resize and runs one forward pass per batch through ``facefind.trainer.model.preprocess``
(the single source of preprocessing), so a predicted image gets exactly the pixels and numbers it
would get from the indexer. Each ``Prediction`` holds the K probabilities, the attributes present
at the checkpoint's calibrated thresholds, the face box (None when the whole image was used) and
the L2-normalised embedding.

Images are decoded by ``facefind.trainer.decode.read_rgb`` (EXIF orientation, CMYK, alpha, 16-bit,
decompression bombs), the decoder of the training cache and the indexer, so a file gets the same
pixels everywhere. ``decode`` can replace it (a test double, an in-memory source).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal, Sequence, overload

import numpy as np

from facefind.db.errors import ImageError
from facefind.indexer.faces.detect import crop_shows_a_face, looks_aligned, require_face
from facefind.trainer.checkpoint import CheckpointMeta, load_model
from facefind.trainer.decode import read_rgb

# torch, and facefind.trainer.device / .model which import it, load in the functions that run the
# model, so importing this module stays torch-free (tests/test_faces.py checks it).
if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

Decode = Callable[[str], np.ndarray]  # path -> RGB uint8 (H, W, 3); raises ImageError
Box = tuple[int, int, int, int]


@dataclass(frozen=True)
class FailedPrediction:
    """A file of a batch that could not be predicted (unreadable, or no face found) and why;
    ``Predictor.predict(..., keep_going=True)`` lists it in place and goes on with the rest."""

    path: str
    error: str

    def to_dict(self) -> dict[str, Any]:
        """The JSON shape of a failed file in ``facefind predict --json``."""
        return {"path": self.path, "error": self.error}


@dataclass(frozen=True)
class Prediction:
    """One image's result. ``face_box`` = (x, y, w, h) in the decoded image, or None when the
    whole image went to the model; ``image_size`` = (width, height) of the decoded image."""

    path: str
    probabilities: dict[str, float]
    present: list[str]
    face_box: Box | None
    embedding: np.ndarray  # float32 (D,), unit length
    image_size: tuple[int, int]

    def to_dict(self) -> dict[str, Any]:
        """The JSON shape of ``facefind predict --json``."""
        return {"path": self.path, "attributes": self.probabilities, "present": self.present,
                "face_box": list(self.face_box) if self.face_box is not None else None}


def infer(model: Any, meta: CheckpointMeta, pixels: torch.Tensor | np.ndarray,
          device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (N, 3, H, W) -> (probabilities float32 (N, K), unit embeddings float32 (N, D)).

    The one forward pass of predict, similar and the indexer: ``facefind.trainer.model.preprocess``, then
    the model under the device's autocast (bf16 on CUDA). CPU batches bound for CUDA are pinned
    so the copy can overlap.
    """
    import torch  # torch-free module: see the imports
    import torch.nn.functional as F

    from facefind.trainer.device import autocast
    from facefind.trainer.model import preprocess

    if isinstance(pixels, np.ndarray):
        pixels = torch.from_numpy(pixels)
    if pixels.shape[0] == 0:
        return (np.zeros((0, len(meta.attributes)), np.float32),
                np.zeros((0, int(meta.embedding_dim)), np.float32))
    if pixels.device.type == "cpu" and device.type == "cuda":
        pixels = pixels.pin_memory()
    with torch.inference_mode(), autocast(device):
        logits, embedding = model(preprocess(pixels.to(device, non_blocking=True), meta))
        probs = torch.sigmoid(logits.float())
        embedding = F.normalize(embedding.float(), dim=1)
    return probs.cpu().numpy(), embedding.cpu().numpy()


class Predictor:
    """A checkpoint loaded once, answering ``predict(paths)`` in batches."""

    def __init__(self, model_path: str | os.PathLike[str], device: Any = "cpu", *, batch_size: int = 32,
                 decode: Decode | None = None) -> None:
        from facefind.trainer.device import configure, resolve_device  # torch: see the imports

        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.device = resolve_device(device) if isinstance(device, str) else device
        configure(self.device)
        self.model_path = Path(model_path)
        self.model, self.meta = load_model(self.model_path, self.device)
        self.batch_size = batch_size
        self.decode: Decode = decode or read_rgb
        self.attributes: list[str] = list(self.meta.attributes)
        self.thresholds = np.asarray(self.meta.thresholds, dtype=np.float32)
        self.img_size: tuple[int, int] = (int(self.meta.img_size[0]), int(self.meta.img_size[1]))

    def prepare(self, rgb: np.ndarray, name: str, detect_face: bool | None) -> tuple[np.ndarray, Box | None]:
        """RGB (H, W, 3) -> (uint8 (3, h, w) at the model's size, face box or None).

        ``detect_face`` None means: detect only when the image does not look like an aligned crop.
        A detected face is aligned onto CelebA's template (``facefind.indexer.faces.detect``); no face found raises
        ImageError. An aligned-looking image goes whole, with a logged warning when the detector
        finds no face in it (its attributes would describe something that is not a face).
        """
        import torch  # torch-free module: see the imports

        from facefind.trainer.model import resize_images

        box = None
        if detect_face or (detect_face is None and not looks_aligned(rgb)):
            found = require_face(rgb, name)
            rgb, box = found.crop, found.box
        elif detect_face is None and crop_shows_a_face(rgb) is False:
            log.warning("warning: no face found in %s, which has an aligned crop's size, so the whole image "
                        "went to the model: if it shows no face, its attributes mean nothing "
                        "(--detect-face makes this an error)", name)
        chw = torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1)))
        return resize_images(chw[None], self.img_size)[0].numpy(), box

    @overload
    def predict(self, paths: Sequence[str | os.PathLike[str]], detect_face: bool | None = None, *,
                keep_going: Literal[False] = False) -> list[Prediction]: ...

    @overload
    def predict(self, paths: Sequence[str | os.PathLike[str]], detect_face: bool | None = None, *,
                keep_going: Literal[True]) -> list[Prediction | FailedPrediction]: ...

    def predict(self, paths: Sequence[str | os.PathLike[str]], detect_face: bool | None = None, *,
                keep_going: bool = False) -> list[Prediction] | list[Prediction | FailedPrediction]:
        """Predict each image file, in order. An unreadable file or a missing face raises ImageError,
        or with ``keep_going`` becomes a ``FailedPrediction`` in its place while the rest go on."""
        names = [os.fspath(p) for p in paths]
        return self._predict(names, lambda i: self._load(names[i]), detect_face, keep_going)

    def predict_images(self, images: Sequence[np.ndarray], names: Sequence[str],
                       detect_face: bool | None = None) -> list[Prediction]:
        """Predict already-decoded RGB uint8 (H, W, 3) arrays; ``names`` label them in results."""
        if len(images) != len(names):
            raise ValueError(f"{len(images)} images but {len(names)} names")
        return self._predict(list(names), lambda i: images[i], detect_face)

    def embed(self, path: str | os.PathLike[str], detect_face: bool | None = None) -> np.ndarray:
        """The unit embedding of one image file (what ``similar`` and ``query --like`` search with)."""
        return self.predict([path], detect_face)[0].embedding

    def _load(self, path: str) -> np.ndarray:
        if not os.path.exists(path):
            raise ImageError(f"no such image: {path}")
        if os.path.isdir(path):
            raise ImageError(f"{path} is a folder: give image files (use `facefind index` for folders)")
        return self.decode(path)

    def _predict(self, names: list[str], get_rgb: Callable[[int], np.ndarray],
                 detect_face: bool | None, keep_going: bool = False) -> list[Any]:
        import torch  # torch-free module: see the imports

        out: list[Prediction | FailedPrediction] = []
        for start in range(0, len(names), self.batch_size):
            stop = min(start + self.batch_size, len(names))
            done, pixels, boxes, sizes = [], [], [], []
            failed: dict[int, FailedPrediction] = {}
            for i in range(start, stop):  # decode one image at a time: photos can be large
                try:
                    rgb = get_rgb(i)
                    chw, box = self.prepare(rgb, names[i], detect_face)
                except ImageError as err:
                    if not keep_going:
                        raise
                    log.debug("predict: %s", err)  # the caller reports the FailedPrediction
                    failed[i] = FailedPrediction(names[i], str(err))
                    continue
                done.append(i)
                pixels.append(chw)
                boxes.append(box)
                sizes.append((int(rgb.shape[1]), int(rgb.shape[0])))
            if pixels:
                probs, emb = infer(self.model, self.meta, torch.from_numpy(np.stack(pixels)), self.device)
            results = dict(zip(done, range(len(done))))
            for i in range(start, stop):
                if i in failed:
                    out.append(failed[i])
                    continue
                j = results[i]
                p = probs[j]
                out.append(Prediction(
                    path=names[i],
                    probabilities=dict(zip(self.attributes, p.tolist())),
                    present=[a for a, v, t in zip(self.attributes, p, self.thresholds) if v >= t],
                    face_box=boxes[j],
                    embedding=emb[j],
                    image_size=sizes[j],
                ))
        return out

