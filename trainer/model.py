"""The attribute CNN: a torchvision backbone, an embedding head and a K-way multi-label classifier.

    backbone features -> Linear -> BatchNorm = embedding (D)
                         embedding -> ReLU -> Dropout -> Linear = logits (K)

One forward pass returns both ``(logits, embedding)``, so indexing gets attribute probabilities
and the similarity vector together. ``preprocess`` is the single place where uint8 images become
model input (resize to the checkpoint's size, scale, normalise): training-time evaluation, the
indexer and ``predict`` all call it, so they cannot disagree about preprocessing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from facefind.db.errors import ModelError


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ArchSpec:
    """How to get a backbone: strip a torchvision classifier, or build one of our own.

    ``head`` is the dotted path of the torchvision module that becomes Identity; ``build``, when
    set, instead returns ``(backbone, feature width)`` for an architecture torchvision lacks (no
    ImageNet weights exist for those).
    """

    head: str = ""
    min_input_size: int = 32
    build: Callable[[], tuple[nn.Module, int]] | None = None


def _conv_bn_relu(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


def small_cnn(widths: Sequence[int] = (32, 64, 128, 256)) -> tuple[nn.Module, int]:
    """A compact VGG-style backbone for small inputs (64-96 px) trained from scratch on a CPU.

    ImageNet backbones halve the image 4-5 times in their first few layers; at 64 px that leaves
    glasses frames, a smile's curve or a nose outline a fraction of a pixel wide before any
    feature sees them. Here the first convolution runs at full resolution and each stage is
    conv-BN-ReLU then a 2x2 max pool (the last stage: global average pooling), so features are
    at 64, 32, 16 and 8 px. ~0.4 M parameters, ~60 MMAC per 64 px image.
    """
    layers: list[nn.Module] = []
    c_in = 3
    for i, width in enumerate(widths):
        layers += _conv_bn_relu(c_in, width)
        layers.append(nn.MaxPool2d(2) if i < len(widths) - 1 else nn.AdaptiveAvgPool2d(1))
        c_in = width
    body = nn.Sequential(*layers)
    for module in body.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
    return body, c_in


# The study's two architectures, the one it wanted (inception_v3), and faster/better modern ones.
ARCHS: dict[str, ArchSpec] = {
    "resnet18": ArchSpec("fc"),
    "resnet34": ArchSpec("fc"),
    "resnet50": ArchSpec("fc"),
    "resnet101": ArchSpec("fc"),
    "densenet121": ArchSpec("classifier"),
    "inception_v3": ArchSpec("fc", min_input_size=75),
    "efficientnet_b0": ArchSpec("classifier"),
    "efficientnet_b2": ArchSpec("classifier"),
    "mobilenet_v3_small": ArchSpec("classifier"),
    "mobilenet_v3_large": ArchSpec("classifier"),
    "convnext_tiny": ArchSpec("classifier.2"),
    # Ours: no ImageNet weights; the demo's model (learns small cues at 64 px in ~a minute of CPU).
    "small_cnn": ArchSpec(min_input_size=16, build=small_cnn),
}


def _spec(arch: str) -> ArchSpec:
    try:
        return ARCHS[arch]
    except KeyError:
        raise ModelError(f"unknown architecture {arch!r}: choose one of {', '.join(ARCHS)}") from None


def min_input_size(arch: str) -> int:
    """The smallest height/width the architecture accepts (inception_v3 needs 75 px)."""
    return _spec(arch).min_input_size


def check_input_size(arch: str, img_size: tuple[int, int]) -> None:
    """Raise ModelError when ``img_size`` (h, w) is too small for ``arch``."""
    smallest = min_input_size(arch)
    if min(img_size) < smallest:
        raise ModelError(
            f"{arch} needs images of at least {smallest}x{smallest} px, got {img_size[0]}x{img_size[1]}: "
            f"use --img-size {smallest} or larger"
        )


class AttributeNet(nn.Module):
    """Backbone + embedding head + classifier; ``forward(x) -> (logits, embedding)``."""

    def __init__(
        self,
        arch: str,
        backbone: nn.Module,
        feature_dim: int,
        num_attributes: int,
        embedding_dim: int = 512,
        dropout: float = 0.3,
    ) -> None:
        super().__init__()
        self.arch = arch
        self.num_attributes = num_attributes
        self.embedding_dim = embedding_dim
        self.min_input_size = min_input_size(arch)
        self.backbone = backbone
        # The embedding is the batch-normalised projection, taken *before* the ReLU: centred
        # per dimension, so cosine similarity between faces spreads over [-1, 1]. After a ReLU
        # every vector lies in the positive orthant and all faces look ~0.99 alike.
        self.embed = nn.Sequential(
            nn.Linear(feature_dim, embedding_dim),
            nn.BatchNorm1d(embedding_dim),
        )
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(embedding_dim, num_attributes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x.shape[-1] < self.min_input_size or x.shape[-2] < self.min_input_size:
            raise ModelError(
                f"{self.arch} needs images of at least {self.min_input_size}x{self.min_input_size} px, "
                f"got {x.shape[-2]}x{x.shape[-1]}"
            )
        embedding = self.embed(torch.flatten(self.backbone(x), 1))
        logits = self.classifier(self.dropout(torch.relu(embedding)))
        return logits, embedding


def _build_backbone(arch: str, pretrained: bool, download: bool) -> tuple[nn.Module, int]:
    """A torchvision model with its classifier replaced by Identity, and its feature width.

    ``pretrained`` shapes the architecture exactly as torchvision's ImageNet weights expect (for
    inception_v3 it turns on ``transform_input``); ``download`` actually fetches those weights.
    A checkpoint rebuild passes ``pretrained=meta.pretrained, download=False``.
    """
    spec = _spec(arch)
    if spec.build is not None:
        if pretrained:
            raise ModelError(f"{arch} is facefind's own architecture and has no ImageNet weights: "
                             "train it with --no-pretrained")
        return spec.build()

    import torchvision  # ~1 s to import: small_cnn, and predict/similar with it, never need it

    weights = None
    if pretrained and download:
        weights = torchvision.models.get_model_weights(arch).DEFAULT
    kwargs: dict = {}
    if arch == "inception_v3" and weights is None:
        # torchvision forces these itself when it loads its weights. A rebuild from a checkpoint
        # (download=False) skips the slow random init that the loaded weights would overwrite.
        kwargs = {"aux_logits": False, "transform_input": pretrained, "init_weights": download}
    try:
        model = torchvision.models.get_model(arch, weights=weights, **kwargs)
    except (OSError, RuntimeError) as err:  # URLError is an OSError
        if weights is None:
            raise
        raise ModelError(
            f"could not load torchvision's ImageNet weights for {arch} ({type(err).__name__}: {err}); "
            "they are downloaded once into $TORCH_HOME: connect to the internet, copy the file there, "
            "or train with --no-pretrained"
        ) from None
    if arch == "inception_v3":
        model.aux_logits = False  # one output; the auxiliary head is for ImageNet training only
        model.AuxLogits = None
    parent: nn.Module = model
    *parents, last = spec.head.split(".")
    for name in parents:
        parent = parent[int(name)] if name.isdigit() else getattr(parent, name)  # type: ignore[index]
    old = parent[int(last)] if last.isdigit() else getattr(parent, last)  # type: ignore[index]
    feature_dim = _in_features(old)
    if last.isdigit():
        parent[int(last)] = nn.Identity()  # type: ignore[index]
    else:
        setattr(parent, last, nn.Identity())
    return model, feature_dim


def _in_features(module: nn.Module) -> int:
    """The input width of a Linear, or of the first Linear inside a Sequential head."""
    if isinstance(module, nn.Linear):
        return module.in_features
    for sub in module.modules():
        if isinstance(sub, nn.Linear):
            return sub.in_features
    raise ModelError(f"cannot find the classifier's input width in {type(module).__name__}")


def create_model(
    arch: str,
    num_attributes: int,
    embedding_dim: int = 512,
    dropout: float = 0.3,
    pretrained: bool = False,
    *,
    download: bool = True,
) -> AttributeNet:
    """Build an AttributeNet; ``pretrained`` loads torchvision's ImageNet weights into the backbone.

    Unknown ``arch`` or weights that cannot be fetched raise ModelError.
    """
    if num_attributes < 1:
        raise ModelError(f"a model needs at least one attribute, got {num_attributes}")
    if not 0.0 <= dropout < 1.0:
        raise ModelError(f"dropout must be in [0, 1), got {dropout}")
    if embedding_dim < 1:
        raise ModelError(f"embedding dim must be positive, got {embedding_dim}")
    backbone, feature_dim = _build_backbone(arch, pretrained, download)
    for module in backbone.modules():
        # mobilenet_v3 ships BatchNorm momentum 0.01: its running statistics need thousands of
        # steps to settle, so a short run evaluates with near-initial statistics and looks untrained.
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and (module.momentum or 0.1) < 0.1:
            module.momentum = 0.1
    return AttributeNet(arch, backbone, feature_dim, num_attributes, embedding_dim, dropout)


class Preprocessing(Protocol):
    """What ``preprocess`` needs to know; a ``CheckpointMeta`` provides it."""

    img_size: Sequence[int]
    mean: Sequence[float]
    std: Sequence[float]


@dataclass(frozen=True)
class InputSpec:
    """Model input geometry and normalisation, for code that has no checkpoint yet (training)."""

    img_size: tuple[int, int]
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


def resize_images(batch: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Resize an (N, C, H, W) batch to ``size`` = (h, w) with antialiased bilinear; dtype kept.

    The image cache and ``preprocess`` both use this one function, so a model sees the same
    pixels at training and at index time. uint8 input stays uint8 (rounded).
    """
    h, w = int(size[0]), int(size[1])
    if tuple(batch.shape[-2:]) == (h, w):
        return batch
    if batch.dtype == torch.uint8 and batch.device.type == "cpu":
        # torch has a fast uint8 antialiased path on the CPU.
        return F.interpolate(batch, size=(h, w), mode="bilinear", antialias=True, align_corners=False)
    out = F.interpolate(batch.float(), size=(h, w), mode="bilinear", antialias=True, align_corners=False)
    if batch.dtype == torch.uint8:
        return out.round_().clamp_(0, 255).to(torch.uint8)
    return out.to(batch.dtype)


def normalize(batch: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Float images in [0, 1] -> (x - mean) / std, per channel."""
    m = torch.tensor(mean, dtype=batch.dtype, device=batch.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=batch.dtype, device=batch.device).view(1, -1, 1, 1)
    return (batch - m) / s


def preprocess(batch: torch.Tensor, meta: Preprocessing) -> torch.Tensor:
    """uint8 (N, 3, H, W) images -> normalised float32 model input at ``meta.img_size``.

    Runs on whatever device ``batch`` is on; the result is channels_last (fastest for convnets on
    both CPU and GPU).
    """
    if batch.dtype != torch.uint8 or batch.ndim != 4 or batch.shape[1] != 3:
        raise ValueError(f"preprocess expects uint8 (N, 3, H, W), got {batch.dtype} {tuple(batch.shape)}")
    x = resize_images(batch, meta.img_size).float().div_(255.0)
    return normalize(x, meta.mean, meta.std).contiguous(memory_format=torch.channels_last)
