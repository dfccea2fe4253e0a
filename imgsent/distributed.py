"""The Ray distributor: the same shard work as the local engine, on a Ray cluster (Ray Data).

``RayEngine`` keeps the :class:`~imgsent.batches.Engine` contract (ordered
:class:`~imgsent.batches.FeatureBatch` es, or :class:`~imgsent.batches.ScoredBatch` es when it runs
the head too), so ``extract`` and ``score`` feed it to the same
sharded writer: same store / score layout, same manifest, same resume. Inside Ray Data, decoding runs
as CPU tasks (``map_batches`` over a function) and the backbones in an actor pool (``concurrency``
actors, ``num_gpus`` each), so weights load once per actor. Ray is an optional extra
(``pip install 'imgsent[ray]'``); nothing here is imported by the local engine.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import sys
from collections.abc import Iterator, Sequence

import numpy as np

from .backbones import Backbone, create_backbone, fingerprints_match
from .batches import FeatureBatch, ScoredBatch
from .decode import Preprocess, crop_count, decode_refs
from .engine import FeatureEngine, flag_nonfinite, mark_failed
from .errors import ImgsentError
from .inputs import ImageRef
from .options import RunOptions

_FORWARDED_ENV = ("IMGSENT_WEIGHTS", "IMGSENT_HOME", "HF_HUB_OFFLINE", "HF_HOME", "TORCH_HOME", "XDG_CACHE_HOME")


def require_ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise ImgsentError("--engine ray needs Ray Data: pip install 'imgsent[ray]'") from None
    return ray


def _decode_batch(
    batch: dict, preprocesses: list[dict], tta: str, max_pixels: int, keep_images: str | None = None
) -> dict:
    """Ray task: decode a batch of paths into uint8 views (zeros on error rows)."""
    pps = [Preprocess.from_dict(p) for p in preprocesses]
    refs = [ImageRef(i, p, s) for i, p, s in zip(batch["id"], batch["path"], batch["source"])]
    items = decode_refs(refs, pps, tta, max_pixels, keep_images)
    keys = list(dict.fromkeys(pp.view_key for pp in pps))
    crops = crop_count(tta)
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

    def __init__(self, specs: list[tuple[str, bool, dict]], options: RunOptions, head_path: str | None = None):
        backbones = []
        for spec, random_weights, fingerprint in specs:
            bb = create_backbone(spec, random_weights=random_weights, int8=options.precision == "int8")
            if not fingerprints_match(fingerprint, bb.fingerprint):
                raise ImgsentError(f"{spec}: this Ray worker resolved other weights than the driver")
            backbones.append(bb)
        self.engine = FeatureEngine(backbones, options, workers=0)
        self.keys = list(dict.fromkeys(bb.preprocess.view_key for bb in backbones))
        self.model = None
        if head_path is not None:
            from .precision import head_precision
            from .training import load_model

            self.model = load_model(head_path)
            self.head_precision = head_precision(options.precision)

    def __call__(self, batch: dict) -> dict:
        import torch

        ok_pos = [k for k, s in enumerate(batch["status"]) if s == "ok"]
        views = {
            key: torch.from_numpy(np.ascontiguousarray(batch[f"view{j}"][ok_pos])) for j, key in enumerate(self.keys)
        }
        feats, failed = self.engine.embed_views(views, ok_pos, len(batch["id"]))
        status, error = [str(s) for s in batch["status"]], [str(e) if e else None for e in batch["error"]]
        checked = flag_nonfinite(mark_failed(FeatureBatch([], [], status, error, [], [], feats), failed))
        ok_pos = [k for k, s in enumerate(checked.status) if s == "ok"]
        out = {k: batch[k] for k in ("id", "path", "width", "height")}
        out["status"] = np.asarray(checked.status, dtype=object)
        out["error"] = np.asarray([e or "" for e in checked.error], dtype=object)
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
    """Run backbones over images on Ray Data; the :class:`~imgsent.batches.Engine` contract.

    ``options``: the run's :class:`~imgsent.options.RunOptions`: ``ray_workers`` actors in the pool
    (default 1), ``gpus_per_worker`` (``num_gpus`` of each actor), ``ray_address`` (an existing
    cluster; default: start a local one), and the engine settings each actor uses. Device and GPU
    settings are checked here, on the driver, with one clear line.
    """

    def __init__(
        self,
        backbones: Sequence[Backbone],
        options: RunOptions | None = None,
        *,
        num_cpus: int | None = None,
        head_path: str | None = None,
        **overrides,
    ):
        opts = RunOptions.build(options, **overrides)
        _check_devices(opts)
        ray = require_ray()
        if not opts.progress:  # quiet: Ray's and Ray Data's own logs too (Python and the C++ core)
            _quiet_ray()
        if not ray.is_initialized():
            env = {k: os.environ[k] for k in _FORWARDED_ENV if k in os.environ}
            quiet = contextlib.nullcontext() if opts.progress else _stderr_silenced()
            with quiet:  # Ray's C++ core announces its log level on stderr before any setting applies
                ray.init(
                    address=opts.ray_address,
                    num_cpus=num_cpus if opts.ray_address is None else None,
                    include_dashboard=False,
                    log_to_driver=False,
                    configure_logging=False,
                    logging_level=logging.INFO if opts.progress else logging.ERROR,
                    runtime_env={"env_vars": env},
                )
        if not opts.progress:
            _quiet_ray()
        if opts.gpus_per_worker > 0 and not ray.cluster_resources().get("GPU", 0):
            raise ImgsentError(
                f"gpus_per_worker={opts.gpus_per_worker} but the Ray cluster has no GPU; "
                f"use gpus_per_worker=0 (CPU actors) or a cluster with GPUs"
            )
        import ray.data

        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True  # shards must hold the ids the plan expects
        ctx.enable_progress_bars = False
        self.ray = ray
        self.backbones = list(backbones)
        self.options = opts
        self.head_path = head_path
        self.specs = [(bb.recipe()["spec"], bool(bb.fingerprint.get("random")), bb.fingerprint) for bb in backbones]
        device = "cuda" if opts.gpus_per_worker > 0 and opts.device == "auto" else opts.device
        if opts.gpus_per_worker == 0 and opts.device == "auto":
            device = "cpu"  # an actor with no GPU asked for must not grab one it happens to see
        # Resolved here, so that every actor computes the numerics the store records: on GPUs,
        # auto is bf16 (the driver cannot ask the actors' cards whether they have bf16 cores).
        on_gpu = device.startswith("cuda")
        self.numerics = {"auto": "bf16" if on_gpu else "fp32", "tf32": "tf32" if on_gpu else "fp32"}.get(
            opts.precision, opts.precision
        )
        self.batch_size = opts.batch_size or (256 if on_gpu else 64)
        self.actor_options = dataclasses.replace(
            opts,
            device=device,
            precision=self.numerics,
            batch_size=self.batch_size,
            workers=0,
            engine="local",
            progress=False,
        )

    @property
    def keys(self) -> list[str]:
        return [bb.key for bb in self.backbones]

    def run(self, refs: Sequence[ImageRef], groups: Sequence[int] | None = None) -> Iterator[FeatureBatch]:
        """Ordered feature batches for ``refs`` (``groups`` is accepted for the engine contract)."""
        if not refs:
            return
        import ray.data

        bs = self.batch_size
        ds = ray.data.from_items(
            [{"id": r.id, "path": r.path, "source": r.source} for r in refs],
            override_num_blocks=max(1, len(refs) // bs),
        )
        ds = ds.map_batches(
            _decode_batch,
            batch_size=bs,
            batch_format="numpy",
            fn_kwargs={
                "preprocesses": [bb.preprocess.to_dict() for bb in self.backbones],
                "tta": self.options.tta,
                "max_pixels": self.options.max_pixels,
                "keep_images": self.options.keep_images,
            },
        )
        ds = ds.map_batches(
            _EmbedActor,
            batch_size=bs,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=self.options.ray_workers or 1),
            num_gpus=self.options.gpus_per_worker or None,
            fn_constructor_kwargs={"specs": self.specs, "options": self.actor_options, "head_path": self.head_path},
        )
        for batch in ds.iter_batches(batch_size=bs, batch_format="numpy", prefetch_batches=2):
            rows = FeatureBatch(
                ids=[str(i) for i in batch["id"]],
                paths=[str(p) for p in batch["path"]],
                status=[str(s) for s in batch["status"]],
                error=[str(e) if e else None for e in batch["error"]],
                width=[None if w < 0 else int(w) for w in batch["width"]],
                height=[None if h < 0 else int(h) for h in batch["height"]],
                features={key: np.asarray(batch[f"feat{j}"], dtype=np.float32) for j, key in enumerate(self.keys)},
            )
            if "proba" in batch:
                rows = ScoredBatch(**vars(rows), proba=np.asarray(batch["proba"], dtype=np.float32))
            yield rows


@contextlib.contextmanager
def _stderr_silenced():
    """File descriptor 2 to /dev/null for the block (output of C++ code included), then back."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _quiet_ray() -> None:
    """Ray's loggers (they set levels of their own) to errors only; the C++ core's log too, for
    processes started from here on."""
    os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")
    for name in [n for n in logging.root.manager.loggerDict if n == "ray" or n.startswith("ray.")] + ["ray"]:
        logging.getLogger(name).setLevel(logging.ERROR)


def _check_devices(opts: RunOptions) -> None:
    """Device and GPU settings that cannot work on Ray, refused before any actor starts."""
    device = opts.device.split(":")[0]
    if device == "cuda" and ":" in opts.device:
        raise ImgsentError(
            f"device {opts.device}: on Ray each actor sees only the GPUs Ray gives it; use device cuda or auto"
        )
    if opts.gpus_per_worker > 0 and device in ("cpu", "mps"):
        raise ImgsentError(f"gpus_per_worker={opts.gpus_per_worker} asks for GPUs but device is {opts.device}")
    if device == "cuda" and opts.gpus_per_worker == 0:
        raise ImgsentError(
            "device cuda on Ray needs GPUs for the actors: set gpus_per_worker (for example 1), "
            "or Ray schedules them on CPU-only nodes"
        )
