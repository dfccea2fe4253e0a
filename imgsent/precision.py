"""Numeric precision: what ``--precision`` means for the backbones (autocast) and for the head."""

from __future__ import annotations

import torch

from .options import PRECISIONS, check_choice

HEAD_PRECISIONS = ("fp32", "bf16")


def check_precision(precision: str) -> str:
    return check_choice("precision", precision, PRECISIONS)


def bf16_native(device: torch.device) -> bool:
    """Does ``device`` (a CUDA card) have bfloat16 tensor cores, not an emulation of them?"""
    try:
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    except TypeError:  # torch without the keyword: compute capability 8.0 (Ampere) or newer
        return torch.cuda.get_device_capability(device)[0] >= 8


def autocast_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    """The autocast dtype of a run: None (float32) unless asked for, or ``auto`` on CUDA."""
    check_precision(precision)
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return None
    if precision == "auto":
        return torch.bfloat16 if bf16_native(device) else torch.float16
    return torch.bfloat16 if precision == "bf16" else torch.float16


def head_precision(precision: str) -> str:
    """The head's precision for a run's ``precision``: bf16 when asked for, float32 otherwise
    (the head is tiny next to the backbones; fp16 autocast has no fast CPU kernels)."""
    return "bf16" if check_precision(precision) == "bf16" else "fp32"
