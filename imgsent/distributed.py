"""The Ray distributor: the same shard work as the local engine, on a Ray cluster (Ray Data).

``RayEngine.run(refs, groups)`` has the local :class:`~imgsent.engine.FeatureEngine`'s contract
(ordered :class:`~imgsent.engine.FeatureBatch` es), so ``extract`` and ``score`` feed it to the same
sharded writer: same store / score layout, same manifest, same resume. Inside Ray Data, decoding runs
as CPU tasks (``map_batches`` over a function) and the backbones in an actor pool (``concurrency``
actors, ``num_gpus`` each), so weights load once per actor. Ray is an optional extra
(``pip install 'imgsent[ray]'``); nothing here is imported by the local engine.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence

import numpy as np

from .backbones import Backbone, create_backbone, fingerprints_match
from .decode import DEFAULT_MAX_PIXELS, Preprocess
from .engine import FeatureBatch, FeatureEngine, _ImageDataset
from .errors import ImgsentError
from .inputs import ImageRef

_FORWARDED_ENV = ("IMGSENT_WEIGHTS", "IMGSENT_HOME", "HF_HUB_OFFLINE", "HF_HOME", "TORCH_HOME", "XDG_CACHE_HOME")


def require_ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise ImgsentError("--engine ray needs Ray Data: pip install 'imgsent[ray]'") from None
    return ray


def _decode_batch(batch: dict, preprocesses: list[dict], tta: str, max_pixels: int) -> dict:
    """Ray task: decode a batch of paths into uint8 views (zeros on error rows)."""
    pps = [Preprocess.from_dict(p) for p in preprocesses]
    refs = [ImageRef(i, p) for i, p in zip(batch["id"], batch["path"])]
    data = _ImageDataset(refs, pps, tta, max_pixels)
    items = [data[k] for k in range(len(refs))]
    keys = list(dict.fromkeys(pp.view_key for pp in pps))
    crops = 5 if "crops" in tta else 1
    out = {
        "id": np.asarray([it.ref.id for it in items], dtype=object),
        "path": np.asarray([it.ref.path for it in items], dtype=object),
        "status": np.asarray([it.status for it in items], dtype=object),
        "error": np.asarray([it.error or "" for it in items], dtype=object),  # "" = none: blocks keep one type
        "width": np.asarray([it.width or -1 for it in items], dtype=np.int64),
        "height": np.asarray([it.height or -1 for it in items], dtype=np.int64),
    }
    for j, key in enumerate(keys):
        h, w = key[0]
        arr = np.zeros((len(items), crops, 3, h, w), dtype=np.uint8)
        for k, it in enumerate(items):
            if it.views is not None:
                arr[k] = it.views[key]
        out[f"view{j}"] = arr
    return out


class _EmbedActor:
    """Ray actor: builds the backbones once, then embeds decoded batches."""

    def __init__(self, specs: list[tuple[str, bool, dict]], engine_kwargs: dict, head_path: str | None = None):
        backbones = []
        for spec, random_weights, fingerprint in specs:
            bb = create_backbone(spec, random_weights=random_weights)
            if not fingerprints_match(fingerprint, bb.fingerprint):
                raise ImgsentError(f"{spec}: this Ray worker resolved other weights than the driver")
            backbones.append(bb)
        self.engine = FeatureEngine(backbones, workers=0, **engine_kwargs)
        self.keys = list(dict.fromkeys(bb.preprocess.view_key for bb in backbones))
        self.model = None
        if head_path is not None:
            from .training import head_precision, load_model

            self.model = load_model(head_path)
            self.head_precision = head_precision(engine_kwargs.get("precision", "auto"))

    def __call__(self, batch: dict) -> dict:
        import torch

        ok_pos = [k for k, s in enumerate(batch["status"]) if s == "ok"]
        views = {
            key: torch.from_numpy(np.ascontiguousarray(batch[f"view{j}"][ok_pos])) for j, key in enumerate(self.keys)
        }
        feats = self.engine.embed_views(views, ok_pos, len(batch["id"]))
        out = {k: batch[k] for k in ("id", "path", "status", "error", "width", "height")}
        for j, key in enumerate(self.engine.keys):
            out[f"feat{j}"] = feats[key]
        if self.model is not None:  # the head runs here too, next to the backbones
            proba = np.full((len(batch["id"]), len(self.model.classes)), np.nan, dtype=np.float32)
            if ok_pos:
                X = np.concatenate([feats[k][ok_pos] for k, _ in self.model.blocks], axis=1)
                proba[ok_pos] = self.model.predict_proba(X, self.head_precision)
            out["proba"] = proba
        return out


class RayEngine:
    """Run backbones over images on Ray Data; a drop-in for ``FeatureEngine`` in extract/score.

    ``workers``: actors in the pool (default: 1 per GPU asked, else 1); ``gpus_per_worker``:
    ``num_gpus`` of each actor; ``address``: an existing cluster (default: start a local one).
    """

    def __init__(
        self,
        backbones: Sequence[Backbone],
        *,
        address: str | None = None,
        workers: int | None = None,
        gpus_per_worker: float = 0.0,
        batch_size: int = 64,
        device: str = "auto",
        precision: str = "auto",
        tta: str = "none",
        max_pixels: int = DEFAULT_MAX_PIXELS,
        compile: bool = False,
        num_cpus: int | None = None,
        head_path: str | None = None,
    ):
        ray = require_ray()
        if not ray.is_initialized():
            env = {k: os.environ[k] for k in _FORWARDED_ENV if k in os.environ}
            ray.init(address=address, num_cpus=num_cpus if address is None else None, include_dashboard=False,
                     log_to_driver=False, configure_logging=False, runtime_env={"env_vars": env})  # fmt: skip
        import ray.data

        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True  # shards must hold the ids the plan expects
        ctx.enable_progress_bars = False
        self.ray = ray
        self.backbones = list(backbones)
        self.batch_size = batch_size
        self.tta = tta
        self.max_pixels = max_pixels
        self.workers = workers or 1
        self.gpus_per_worker = gpus_per_worker
        self.head_path = head_path
        self.specs = [(bb.recipe()["spec"], bool(bb.fingerprint.get("random")), bb.fingerprint) for bb in backbones]
        self.engine_kwargs = {"device": "cuda" if gpus_per_worker > 0 and device == "auto" else device,
                              "precision": precision, "batch_size": batch_size, "tta": tta, "compile": compile}  # fmt: skip

    @property
    def keys(self) -> list[str]:
        return [bb.key for bb in self.backbones]

    def run(self, refs: Sequence[ImageRef], groups: Sequence[int] | None = None) -> Iterator[FeatureBatch]:
        """Ordered feature batches for ``refs`` (``groups`` is accepted for the engine contract)."""
        if not refs:
            return
        import ray.data

        ds = ray.data.from_items([{"id": r.id, "path": r.path} for r in refs],
                                 override_num_blocks=max(1, len(refs) // self.batch_size))  # fmt: skip
        ds = ds.map_batches(
            _decode_batch,
            batch_size=self.batch_size,
            batch_format="numpy",
            fn_kwargs={
                "preprocesses": [bb.preprocess.to_dict() for bb in self.backbones],
                "tta": self.tta,
                "max_pixels": self.max_pixels,
            },  # fmt: skip
        )
        ds = ds.map_batches(
            _EmbedActor,
            batch_size=self.batch_size,
            batch_format="numpy",
            concurrency=self.workers,
            num_gpus=self.gpus_per_worker or None,
            fn_constructor_kwargs={
                "specs": self.specs,
                "engine_kwargs": self.engine_kwargs,
                "head_path": self.head_path,
            },
        )
        for batch in ds.iter_batches(batch_size=self.batch_size, batch_format="numpy", prefetch_batches=2):
            yield FeatureBatch(
                ids=[str(i) for i in batch["id"]],
                paths=[str(p) for p in batch["path"]],
                status=[str(s) for s in batch["status"]],
                error=[str(e) if e else None for e in batch["error"]],
                width=[None if w < 0 else int(w) for w in batch["width"]],
                height=[None if h < 0 else int(h) for h in batch["height"]],
                features={key: np.asarray(batch[f"feat{j}"], dtype=np.float32) for j, key in enumerate(self.keys)},
                proba=np.asarray(batch["proba"], dtype=np.float32) if "proba" in batch else None,
            )
