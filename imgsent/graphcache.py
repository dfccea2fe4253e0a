"""The frozen-graph cache: ``torch.jit.freeze`` graphs of CPU backbones, kept on disk (not
``--compile``, which is ``torch.compile`` and caches nothing here).

On a CPU the torch runner traces, freezes and (through oneDNN) fuses each backbone for passes of
exactly ``batch`` images (:func:`imgsent.runners.freeze`). That graph is saved under imgsent's cache
(``$IMGSENT_HOME/compiled/``), keyed by everything that shapes it: the backbone's key, weights
(the state-dict hash of its fingerprint), preprocessing, numerics, the pass size and memory
layout, the torch and imgsent versions and the CPU's instruction set. A later run loads it instead
of tracing again; a model whose graphs are all cached builds no network at all (no timm or
torchvision import: :func:`imgsent.models.model_backbones` with ``compiled=True``).

A loaded graph is checked before use: its output on the fingerprint's probe image must match the
probe features the recipe recorded (computed by the eager network). The cache is only a cache:
a file that cannot be read or fails the check is removed and rebuilt; one that cannot be written
is skipped.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings

import torch

from . import __version__
from .weights import cache_dir

# The profiling executor profiles a frozen graph on its first call and optimises (and fuses) it on
# the second; later calls run the optimised plan (measured: EfficientNet-Lite2, batch 8, on this
# CPU: 0.32 s, 0.39 s, then 0.16-0.20 s; outputs identical from the second call on).
WARMUP_CALLS = 2


def cpu_features() -> str:
    try:
        return torch.backends.cpu.get_cpu_capability()
    except Exception:  # older torch
        return "unknown"


def graph_key(recipe: dict, batch: int, channels_last: bool) -> str | None:
    """The cache key of a backbone's frozen CPU graph, from its recipe (the fields that do not
    depend on where its files were); None when the recipe has no weights hash."""
    sha = recipe.get("fingerprint", {}).get("sha256")
    if not sha:
        return None
    what = {
        "key": recipe["key"],
        "dim": recipe.get("dim"),
        "weights": sha,
        "preprocess": recipe.get("preprocess"),
        "int8": recipe.get("int8"),
        "batch": batch,
        "channels_last": channels_last,
        "torch": torch.__version__,
        "imgsent": __version__,
        "cpu": cpu_features(),
    }
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:32]


def graph_path(key: str) -> str:
    return os.path.join(cache_dir(), "compiled", f"{key}.pt")


def load_graph(key: str | None) -> torch.jit.ScriptModule | None:
    """The cached graph, or None (absent, or unreadable: then removed)."""
    if key is None:
        return None
    path = graph_path(key)
    if not os.path.isfile(path):
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.jit.load's deprecation notice
            return torch.jit.load(path, map_location="cpu").eval()
    except Exception:
        drop_graph(key)
        return None


def save_graph(key: str | None, module: torch.jit.ScriptModule) -> None:
    """Keep ``module`` for later runs (atomically); a cache that cannot be written is skipped."""
    if key is None:
        return
    from .atomicio import atomic_path

    path = graph_path(key)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with atomic_path(path) as tmp, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.jit.save(module, tmp)
    except (OSError, RuntimeError):
        pass


def drop_graph(key: str) -> None:
    try:
        os.remove(graph_path(key))
    except OSError:
        pass


def first_output(out) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out
