"""Weights fingerprints: a fixed probe image, the first features a network gives it, and the one
rule for "the same weights" with the tolerance each kind of comparison allows (:data:`TOLERANCES`:
weights built elsewhere, an ONNX graph, a TorchScript on another device, a frozen graph against
eager). A leaf: backbones, runners, ONNX graphs, models, Ray workers and training use it. torch is
imported only to make probe tensors."""

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


TOLERANCES = {  # how far probe features may be from those recorded, of the largest value, by what is compared
    "weights": 2e-3,  # the same weights built elsewhere (another machine, torch or timm version), a frozen graph
    "export": 1e-3,  # an ONNX graph, run on ONNX Runtime, against the recipe's probe
    "device": 1e-2,  # a TorchScript file run on another device (GPU kernels, reduced precision)
    "frozen": 1e-4,  # a traced and frozen graph against its eager network, on the same probe batch
}


def fingerprint_of(features) -> dict:
    """The probe part of a fingerprint: the first :data:`PROBE_VALUES` of the probe image's
    features (a 1-d tensor or array) and their norm."""
    values = np.asarray(features, dtype=np.float64).reshape(-1)
    return {"probe": [float(v) for v in values[:PROBE_VALUES]], "probe_norm": float(np.linalg.norm(values))}


def fingerprints_match(expected: dict, actual: dict, kind: str = "weights") -> bool:
    """The one rule for "the same weights", up to what ``kind`` of comparison allows
    (:data:`TOLERANCES`): equal hashes, or probe features within the tolerance."""
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
    return bool(np.abs(e - a).max() <= TOLERANCES[kind] * scale)


def same_outputs(got, want, kind: str = "frozen") -> bool:
    """Two outputs (tensors) of the same probe batch agree within ``kind``'s tolerance of the
    largest value (:data:`TOLERANCES`)."""
    return got.shape == want.shape and float((got - want).abs().max()) <= TOLERANCES[kind] * (
        float(want.abs().max()) or 1.0
    )
