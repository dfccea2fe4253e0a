"""Weights fingerprints: a fixed probe image, the first features a network gives it, and the rule
for "the same weights" (a leaf: backbones, frozen graphs, ONNX graphs, models and training use it).
torch is imported only to make probe tensors."""

from __future__ import annotations

import numpy as np

from .decode import Preprocess

PROBE_VALUES = 16  # how many feature values of the probe image a fingerprint keeps


def probe_image(pp: Preprocess):
    """A fixed synthetic image (smooth colour gradients), normalised as ``pp`` says: (1,3,H,W)."""
    import torch

    h, w = pp.input_size
    yy, xx = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
    img = np.stack([xx, yy, 0.5 + 0.5 * np.sin(6 * xx + 4 * yy)]).astype(np.float32)
    mean = np.asarray(pp.mean, dtype=np.float32)[:, None, None]
    std = np.asarray(pp.std, dtype=np.float32)[:, None, None]
    return torch.from_numpy((img - mean) / std)[None]


def probe_batch(pp: Preprocess, batch: int, channels_last: bool, device="cpu"):
    """The fingerprint's probe image and its mirror, repeated to exactly ``batch`` images."""
    import torch

    probe = probe_image(pp)
    x = torch.cat([probe, torch.flip(probe, dims=[3])]).repeat((batch + 1) // 2, 1, 1, 1)[:batch].to(device)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def fingerprints_match(expected: dict, actual: dict, rtol: float = 2e-3) -> bool:
    """Same weights up to harmless float rounding: equal hashes, or probe features within ``rtol``."""
    if expected.get("sha256") and expected.get("sha256") == actual.get("sha256"):
        return True
    try:
        e = np.asarray(expected["probe"] + [expected["probe_norm"]], dtype=np.float64)
        a = np.asarray(actual["probe"] + [actual["probe_norm"]], dtype=np.float64)
    except (KeyError, TypeError):
        return False
    if e.shape != a.shape or not (e.any() or a.any()):
        return False  # an all-zero probe (a detector view that found nothing) says nothing: hashes decide
    scale = max(float(np.abs(e).max()), 1e-6)
    return bool(np.abs(e - a).max() <= rtol * scale)
