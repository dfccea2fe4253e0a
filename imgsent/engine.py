"""The extraction engine: image references in, feature batches out; the loop that joins the stages.

Each batch is decoded once for every backbone by :mod:`~imgsent.loader`'s processes (with
``decode="device"`` they read JPEGs' bytes only, and this process decodes each batch of them on
the device: :mod:`~imgsent.devicedecode`), its uint8 views cross to each device once, and each
backbone's runner (:mod:`~imgsent.runners`, chosen once: torch, ONNX Runtime...) embeds them under
the engine's plan (:mod:`~imgsent.engineplan`). A backbone that raises on a batch is retried image
by image; bad images become rows with ``status="error"``; they never stop the run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader

from . import runners
from .backbones import Backbone
from .batches import FailureCount, FeatureBatch, decoded_batch, flag_nonfinite, group_batches, mark_failed  # noqa: F401  (flag_nonfinite, mark_failed: imported from here too)
from .decode import DEVICE_INTERPOLATIONS
from .engineplan import (  # noqa: F401  (CUDA_BATCH_SIZE, default_workers, frozen_cpu_batch, select_device: imported from here too)
    CUDA_BATCH_SIZE,
    EnginePlan,
    default_workers,
    frozen_cpu_batch,
    plan_engine,
    select_device,
)
from .errors import ImgsentError
from .inputs import ImageRef
from .lanes import ahead, in_lanes
from .loader import (  # noqa: F401  (check_shared_memory, prefetch_for: imported from here too)
    CollatedBatch,
    ImageDataset,
    batch_views,
    check_shared_memory,
    decoded_batches,
    make_loader,
    prefetch_for,
)
from .options import RunOptions
from .runners import Runner

PLAN_SETTINGS = frozenset({f.name for f in dataclasses.fields(EnginePlan)} - {"device"} | {"amp_dtype"})


class FeatureEngine:
    """Runs backbones over images (the local :class:`~imgsent.batches.Engine`). Build once, then
    :meth:`run` any number of reference lists.

    ``options``: a :class:`~imgsent.options.RunOptions` (device, precision, batch_size, workers,
    compile, tta, max_pixels); keyword ``overrides`` replace single fields of it.
    ``channels_last``: None = on. ``optimize``: ``auto`` (CPU: trace + freeze each module, checked
    against eager on a probe; GPU: eager, AMP), ``jit``, ``none``; ``compile`` uses
    ``torch.compile`` instead. ``model_batch``: images per forward pass (default: 8 on CPU, where
    small batches keep the activations in cache and run 3-4x faster than 64; the whole batch on
    GPU). Frozen and compiled modules always get exactly that many (the last pass padded), so an
    image's features never depend on which images share its batch. ``lanes``: batches embedded
    side by side (default: on CPU one per torch thread, each lane single-threaded, see
    :func:`~imgsent.lanes.in_lanes`; 1 on GPU). ``overlap``: the next batch's decoding (on the
    device, or by Pillow for what it refuses) and copies to the device run on a thread (and CUDA
    stream) of their own while the models run this one (:func:`~imgsent.lanes.ahead`; default: on
    CUDA with one lane); features are the same either way. ``plan``: an
    :class:`~imgsent.engineplan.EnginePlan` resolved elsewhere (a Ray driver's, for its workers),
    instead of these keywords.
    The caller's :class:`~imgsent.backbones.Backbone` objects are never modified: the engine keeps
    its own prepared (moved, traced, compiled) modules.
    """

    def __init__(
        self,
        backbones: Sequence[Backbone],
        options: RunOptions | None = None,
        *,
        channels_last: bool | None = None,
        optimize: str = "auto",
        model_batch: int | None = None,
        lanes: int | None = None,
        overlap: bool | None = None,
        plan: EnginePlan | None = None,
        **overrides,
    ):
        if not backbones:
            raise ImgsentError("no backbone given")
        opts = RunOptions.build(options, **overrides)
        self.options = opts
        if plan is None:
            plan = plan_engine(
                opts,
                channels_last=channels_last,
                optimize=optimize,
                model_batch=model_batch,
                lanes=lanes,
                overlap=overlap,
            )
        self.plan = plan
        self.device = plan.torch_device
        self.max_pixels = opts.max_pixels
        self.decode = opts.decode
        self.decoder: str | None = None  # the JPEG decoder of decode="device" (devicedecode.BACKENDS)
        self.backbones = list(backbones)
        if self.decode == "device":
            for bb in self.backbones:
                if bb.preprocess.interpolation not in DEVICE_INTERPOLATIONS:
                    raise ImgsentError(
                        f"decode=device resizes with {' or '.join(DEVICE_INTERPOLATIONS)} only; backbone {bb.key} "
                        f"uses {bb.preprocess.interpolation} (use decode=workers)"
                    )
            from .devicedecode import backend

            self.decoder = backend(self.device.type)
        self.device_decoded = [0, 0]  # JPEGs decoded on the device, and those it refused (then Pillow)
        self._count_lock = threading.Lock()
        self._failures = FailureCount(len(self.backbones))
        self._prepared = False
        self._prepare_lock = threading.Lock()
        # what runs each network (imgsent.runners), decided now, so that a store's header can say
        self.runners: list[Runner] = [runners.prepare(bb, plan) for bb in self.backbones]
        self._torch_free = self._torch_free_engine()

    def __getattr__(self, name: str):
        """The plan's settings read as the engine's own (``engine.batch_size``, ``engine.lanes``...):
        one copy of each, in the plan."""
        plan = self.__dict__.get("plan")
        if plan is not None and name in PLAN_SETTINGS:
            return getattr(plan, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    @property
    def runtimes(self) -> list[str]:
        """Each backbone's runtime: ``torch``, ``onnx``."""
        return [r.runtime for r in self.runners]

    def _torch_free_engine(self):
        """When every backbone runs on ONNX Runtime in a form :mod:`imgsent.ortengine` runs (networks,
        the shipped face detectors' views), that engine over the same checked graphs: :meth:`run`
        hands it the work, so that the first run of a model and every warm run after it (which never
        loads torch) compute the same numbers. None otherwise."""
        if any(r != "onnx" for r in self.runtimes) or self.decode != "workers":
            return None
        from . import onnxrunner
        from .ortengine import OrtEngine

        entries = onnxrunner.plan_entries(self.runners)
        if entries is None:
            return None
        return OrtEngine({"tta": self.tta, "backbones": entries}, self.options, lanes=self.lanes, checked_here=True)

    @property
    def torch_free(self):
        """The :class:`~imgsent.ortengine.OrtEngine` that runs this engine's work, or None."""
        return self._torch_free

    def runtime_record(self) -> dict[str, str]:
        """The backbones that do not run on torch, for a store's header: ``{key: "onnx"}``."""
        return {r.backbone.key: r.runtime for r in self.runners if r.runtime != "torch"}

    def adopt_runtimes(self, record: dict[str, str]) -> None:
        """Run each backbone on what ``record`` (a store's header) says, so that ``--runtime auto``
        resumes a store with the runtime it was begun with (a store never mixes two)."""
        for i, bb in enumerate(self.backbones):
            want = record.get(bb.key, "torch")
            if want != self.runners[i].runtime:
                self.runners[i] = runners.prepare_on(bb, self.plan, want)
        self._torch_free = self._torch_free_engine()

    def prepare(self) -> None:
        """Make every runner (trace, freeze, fuse on CPU; or ``torch.compile``), in the engine's own
        copies of the modules. Done once, on first use: :meth:`run` starts its decoding processes
        first, so they decode the first batches while this runs."""
        with self._prepare_lock:
            if self._prepared:
                return
            for runner in self.runners:
                runner.ready()
            # checks and warm-up calls (cached graphs): side by side, one lane each (as batches run)
            for _ in in_lanes(_warm, self.runners, min(self.lanes, len(self.runners))):
                pass
            for dev in dict.fromkeys(r.device for r in self.runners if r.device.type == "cuda"):
                # Prepared on whichever thread and stream came first (the staging one, overlapped):
                # every copy done before any stream uses the modules.
                torch.cuda.synchronize(dev)
            self._prepared = True

    @property
    def _prefetch(self) -> int:
        return prefetch_for(self.decode)

    @property
    def keys(self) -> list[str]:
        return [bb.key for bb in self.backbones]

    def run_details(self) -> dict[str, str]:
        """Lines for the run summary about how this engine ran (which backbones ONNX Runtime ran;
        device decoding: which decoder)."""
        if self._torch_free is not None:
            return self._torch_free.run_details()
        details = {}
        onnx = [bb.key for bb, r in zip(self.backbones, self.runtimes) if r == "onnx"]
        if onnx:
            from .onnxrunner import version

            details["runtime"] = (
                f"{version()}: {', '.join(onnx)}; torch: the others"
                if len(onnx) < len(self.backbones)
                else f"{version()}: every backbone"
            )
        if self.decode != "device":
            return details
        from .devicedecode import describe

        on, refused = self.device_decoded
        what = describe(self.decoder, self.device)
        return {**details, "device decoding": f"{what}: {on} JPEGs; {refused} refused and left to Pillow"}

    def dataset(self, refs: Sequence[ImageRef]) -> ImageDataset:
        """The decode step for ``refs`` with this engine's preprocessings, TTA and pixel limit."""
        pps = [bb.preprocess for bb in self.backbones]
        return ImageDataset(refs, pps, self.tta, self.max_pixels, self.decode, self.options.keep_images)

    def loader(self, dataset: ImageDataset, batches: list[list[int]]) -> DataLoader:
        """Decoding processes (``workers``) turning index batches of ``dataset`` into collated
        uint8 batches (pinned on CUDA): :func:`imgsent.loader.make_loader`."""
        return make_loader(dataset, batches, self.workers, self._prefetch, self.device.type == "cuda")

    def embed(self, index: int, pixels: torch.Tensor) -> torch.Tensor:
        """Backbone ``index`` on uint8 (n, crops, 3, H, W) -> float32 (n, D), averaged over crops
        and flips (:meth:`imgsent.runners.Runner.embed`)."""
        self.prepare()
        return self.runners[index].embed(pixels)

    def run(self, refs: Sequence[ImageRef], groups: Sequence[int] | None = None) -> Iterator[FeatureBatch]:
        """Yield one :class:`~imgsent.batches.FeatureBatch` per batch of ``refs``, in order.

        ``groups``: sizes of consecutive runs of ``refs`` (output shards) that no batch may straddle.
        Batches then depend only on the group, so a resumed run computes exactly the same numbers.
        A decoding process that dies (a decoder segfault, an OOM kill) does not end the run: the
        batches it may have held are decoded again one image at a time in a separate process, and
        an image that kills that process too becomes an error row.
        """
        if not refs:
            return
        batches = group_batches(len(refs), groups, self.batch_size)
        self._failures.begin(len(refs))
        if self._torch_free is not None:
            self._torch_free.begin(len(refs), len(batches))
        dataset = self.dataset(refs)
        check_shared_memory(
            self.workers, self.batch_size, [bb.preprocess for bb in self.backbones], self.tta, self.decode
        )
        with torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext():
            # the chosen card is current while loaders pin memory and kernels launch (cuda:N)
            decoded = decoded_batches(
                dataset, batches, self.workers, self._prefetch, self.device.type == "cuda", started=self.prepare
            )
            if self.overlap:
                yield from map(self._embed, ahead(self._stage, decoded, context=self._staging))
            else:
                yield from in_lanes(self._features, decoded, self.lanes)

    def _staging(self):
        """Where :meth:`_stage` runs when overlapped: this engine's card, on a CUDA stream of its own."""
        if self.device.type != "cuda":
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        stack.enter_context(torch.cuda.device(self.device))
        stack.enter_context(torch.cuda.stream(torch.cuda.Stream(self.device)))
        return stack

    def embed_views(
        self, views: dict[tuple, torch.Tensor], ok_pos: list[int], n: int
    ) -> tuple[dict[str, np.ndarray], dict[int, str]]:
        """Features of every backbone for ``n`` rows: uint8 views (of the ``ok_pos`` rows, in order)
        in, float32 (n, D) per backbone key out, NaN on the other rows; and the rows some backbone
        failed on, with a one-line reason each (see :meth:`embed_or_retry`)."""
        feats = {bb.key: np.full((n, bb.dim), np.nan, dtype=np.float32) for bb in self.backbones}
        failed: dict[int, str] = {}
        if not ok_pos:
            return feats, failed
        self.prepare()
        on_device: dict[tuple, torch.Tensor] = {}  # shared pixels cross to each device once
        outs = []
        for idx, bb in enumerate(self.backbones):
            dev = self.runners[idx].device
            key = (bb.preprocess.view_key, dev)
            if key not in on_device:
                on_device[key] = views[bb.preprocess.view_key].to(dev, non_blocking=True)
            out, bad = self.embed_or_retry(idx, on_device[key])
            failed.update((ok_pos[j], reason) for j, reason in bad.items() if ok_pos[j] not in failed)
            outs.append(out)
        # One copy back (one host sync) per device and batch, not one per backbone.
        host: dict[int, np.ndarray] = {}
        devices = [r.device for r in self.runners]
        for dev in dict.fromkeys(devices):
            idxs = [i for i, d in enumerate(devices) if d == dev]
            joined = torch.cat([outs[i] for i in idxs], dim=1).cpu().numpy()
            for i, part in zip(idxs, np.split(joined, np.cumsum([outs[i].shape[1] for i in idxs])[:-1], axis=1)):
                host[i] = part
        for idx, bb in enumerate(self.backbones):
            feats[bb.key][ok_pos] = host[idx]
        return feats, failed

    def embed_or_retry(self, index: int, pixels: torch.Tensor) -> tuple[torch.Tensor, dict[int, str]]:
        """:meth:`embed`, and when the backbone raises on the batch, the batch again image by image:
        (features, NaN rows for the images it still fails on; {row: one-line reason}). A backbone
        that has failed on each of the first images of the run it was given (``FAILING_VIEW``, or
        all of a shorter run) stops the run with one line: it is broken, not the images."""
        bb, dev = self.backbones[index], self.runners[index].device
        return self._failures.embed_or_retry(
            index,
            bb.key,
            lambda x: self.embed(index, x),
            pixels,
            lambda: torch.full((1, bb.dim), float("nan"), device=dev),
            torch.cat,
        )

    def _views(self, batch: CollatedBatch) -> tuple[dict[tuple, torch.Tensor], list[int]]:
        """The batch's views (rows of its good images, in order) and those rows' positions; JPEGs
        left for the device decoded there now (:func:`imgsent.loader.batch_views`)."""
        if not batch.jpeg_pos:
            return batch.views, [i for i, it in enumerate(batch.items) if it.status == "ok"]
        pps = [bb.preprocess for bb in self.backbones]
        views, ok_pos, counts = batch_views(batch, pps, self.tta, self.max_pixels, self.device, self.decoder)
        with self._count_lock:
            self.device_decoded = [a + b for a, b in zip(self.device_decoded, counts)]
        return views, ok_pos

    def _features(self, batch: CollatedBatch) -> FeatureBatch:
        if self._torch_free is not None:  # every backbone on ONNX Runtime: the same code as a run without torch
            return self._torch_free.embed_items(batch.items, {k: v.numpy() for k, v in batch.views.items()})
        return self._embed(self._stage(batch))

    def _stage(self, batch: CollatedBatch) -> _Staged:
        """A batch's views on the device (decoded there, or copied over). On a CUDA side stream
        (overlap), an event marks when they are ready."""
        views, ok_pos = self._views(batch)
        ready = None
        if self.device.type == "cuda" and torch.cuda.current_stream(self.device) != torch.cuda.default_stream(
            self.device
        ):
            ready = torch.cuda.Event()
            ready.record()
        return _Staged(batch, views, ok_pos, ready)

    def _embed(self, staged: _Staged) -> FeatureBatch:
        views, ok_pos, items = staged.views, staged.ok_pos, staged.batch.items
        if staged.ready is not None:  # made on the staging stream: wait for it, and keep its memory until used
            here = torch.cuda.current_stream(self.device)
            here.wait_event(staged.ready)
            for v in views.values():
                if v.device.type == "cuda":
                    v.record_stream(here)
        feats, failed = self.embed_views(views, ok_pos, len(items))
        return decoded_batch(items, feats, failed)


def _warm(runner: Runner) -> None:
    runner.warm()


@dataclasses.dataclass
class _Staged:
    """A batch ready for the models: its views (on the device), the rows they are, and (on a CUDA
    side stream) the event that says the views are there."""

    batch: CollatedBatch
    views: dict[tuple, torch.Tensor]
    ok_pos: list[int]
    ready: torch.cuda.Event | None
