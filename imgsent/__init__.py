"""imgsent: score the sentiment of images in bulk.

The public API (each CLI subcommand is one of these calls)::

    imgsent.extract(inputs, out, backbones=["default"])   # images -> feature store
    imgsent.train(store, labels=..., head="nn" | "moe")   # -> SentimentModel (predict_proba)
    imgsent.evaluate(store, labels=..., protocol=...)      # -> EvaluationReport
    imgsent.score(inputs, out, model=None)                 # images or store -> scores
    imgsent.load_model(path), imgsent.features.load(store)

Submodules are imported lazily, so ``import imgsent`` is cheap.
"""

from __future__ import annotations

import importlib

__version__ = "0.7.0"

_API = {
    "extract": ("extraction", "extract"),
    "train": ("training", "train"),
    "fit": ("training", "fit"),
    "load_model": ("training", "load_model"),
    "SentimentModel": ("training", "SentimentModel"),
    "TrainConfig": ("training", "TrainConfig"),
    "evaluate": ("evaluation", "evaluate"),
    "score": ("scoring", "score"),
    "RunOptions": ("options", "RunOptions"),
    "prevalence": ("collection", "prevalence"),
    "calibrate": ("collection", "calibrate"),
    "label": ("labelling", "label"),
    "open_label_session": ("labelling", "open_session"),
    "create_backbone": ("backbones", "create_backbone"),
    "find_images": ("inputs", "find_images"),
    "ImgsentError": ("errors", "ImgsentError"),
}
_MODULES = {
    "adapting",
    "atomicio",
    "backbones",
    "batches",
    "calibration",
    "cli",
    "collection",
    "decode",
    "distributed",
    "engine",
    "errors",
    "evaluation",
    "extraction",
    "features",
    "heads",
    "htmlreport",
    "inputs",
    "labels",
    "labelling",
    "labelserver",
    "lanes",
    "models",
    "objects",
    "options",
    "precision",
    "protocols",
    "report",
    "scoring",
    "shards",
    "sinks",
    "sources",
    "training",
    "weights",
}

__all__ = sorted(_API) + ["__version__"]


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API) | _MODULES)


def __getattr__(name: str):
    if name in _API:
        module, attr = _API[name]
        return getattr(importlib.import_module(f".{module}", __name__), attr)
    if name in _MODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'imgsent' has no attribute {name!r}")
