"""Numeric precision: what ``--precision`` means for the backbones (autocast, TF32) and for the head.

A run's *numerics* is what its features were actually computed in: ``fp32`` (true float32, TF32
off), ``tf32`` (float32 with TF32 tensor-core matmuls and convolutions, CUDA), ``bf16`` or ``fp16``
(autocast), or ``int8`` (on the CPU: torchvision's official quantized weights, else post-training
int8 for convolutional networks, else float32; see :mod:`imgsent.quantized`). Stores and model
recipes record it; heads are only fed features of their own numerics.
"""

from __future__ import annotations

import torch

from .options import PRECISIONS, check_choice, head_precision  # noqa: F401  (head_precision: imported from here too)

HEAD_PRECISIONS = ("fp32", "bf16")


def check_precision(precision: str) -> str:
    return check_choice("precision", precision, PRECISIONS)


def bf16_native(device: torch.device) -> bool:
    """Does the CUDA card ``device`` have bfloat16 tensor cores (compute capability 8.0, Ampere, or
    newer), not an emulation of them? Asked of that card, not of the current one."""
    return torch.cuda.get_device_capability(device)[0] >= 8


def resolve_numerics(device: torch.device, precision: str) -> str:
    """What ``precision`` means on ``device``: ``auto`` is fp32 off CUDA, and on CUDA bf16 where the
    card has bf16 tensor cores, else fp16; ``tf32`` is fp32 off CUDA (there is no TF32 there);
    ``int8`` backbones run on the CPU whatever the device."""
    check_precision(precision)
    if device.type != "cuda" or precision == "int8":
        return "fp32" if precision in ("auto", "tf32") else precision
    if precision == "auto":
        return "bf16" if bf16_native(device) else "fp16"
    return precision


AUTOCAST = {"fp32": None, "tf32": None, "bf16": torch.bfloat16, "fp16": torch.float16, "int8": None}


def autocast_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    """The autocast dtype of a run: None (float32) unless asked for, or ``auto`` on CUDA."""
    return AUTOCAST[resolve_numerics(device, precision)]
