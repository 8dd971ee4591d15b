"""Device choice and the per-device speed settings (bf16 autocast and TF32 on CUDA, none on the CPU)."""

from __future__ import annotations

import contextlib
import logging
from typing import ContextManager

import torch

from db.errors import FacefindError

log = logging.getLogger(__name__)


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` -> CUDA when present, else CPU (and say which); ``cuda`` without a GPU is an error."""
    name = (name or "auto").strip().lower()
    if name == "auto":
        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        log.info("device: %s (auto)", describe_device(device))
        return device
    try:
        device = torch.device(name)
    except RuntimeError:
        raise FacefindError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise FacefindError("--device cuda was asked for but no CUDA GPU is available: use --device cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise FacefindError(
                f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) present (cuda:0..)"
            )
    elif device.type != "cpu":
        raise FacefindError(f"unsupported device {name!r}: use auto, cpu, cuda or cuda:N")
    log.info("device: %s", describe_device(device))
    return device


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    threads = torch.get_num_threads()
    return f"cpu ({threads} thread{'s' if threads != 1 else ''})"


def autocast(device: torch.device) -> ContextManager:
    """bf16 autocast on CUDA (tensor cores, no loss scaling needed); plain fp32 on the CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def configure(device: torch.device) -> None:
    """Global speed switches for ``device``: cuDNN autotuning and TF32 matmuls on CUDA."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work (for honest timings); a no-op on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
