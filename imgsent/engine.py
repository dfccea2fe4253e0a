"""The extraction engine: image references in, feature batches out.

A DataLoader's worker processes decode each image once (:func:`~imgsent.decode.decode_image`) and
cut the uint8 views every backbone needs (shared between backbones with the same preprocessing).
The main process moves uint8 batches to the device (pinned memory, ``non_blocking``), normalises
there, and runs every backbone under ``inference_mode`` (AMP and channels_last on CUDA).
Bad images become rows with ``status="error"``; they never stop the run.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .backbones import Backbone
from .decode import DEFAULT_MAX_PIXELS, TTA_MODES, DecodeError, Preprocess, decode_image, make_views
from .errors import ImgsentError
from .inputs import ImageRef

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
OPTIMIZE = ("auto", "jit", "none")
PREFETCH = 4  # batches each decoding process works ahead


@dataclass
class FeatureBatch:
    """Rows for a batch of images, in input order. ``features[key]`` has one row per image;
    rows of error images are NaN (and written as nulls)."""

    ids: list[str]
    paths: list[str]
    status: list[str]
    error: list[str | None]
    width: list[int | None]
    height: list[int | None]
    features: dict[str, np.ndarray] = field(default_factory=dict)
    proba: np.ndarray | None = None  # class probabilities, when a head already ran (Ray actors)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def ok_mask(self) -> np.ndarray:
        return np.asarray([s == "ok" for s in self.status], dtype=bool)


@dataclass
class _Decoded:
    ref: ImageRef
    status: str
    error: str | None
    width: int | None
    height: int | None
    views: dict[tuple, np.ndarray] | None


class _ImageDataset(Dataset):
    def __init__(self, refs: Sequence[ImageRef], preprocesses: list[Preprocess], tta: str, max_pixels: int):
        self.refs = list(refs)
        self.preprocesses = preprocesses
        self.tta = tta
        self.max_pixels = max_pixels
        self.min_short_side = max(pp.needed_short_side() for pp in preprocesses)

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, index: int) -> _Decoded:
        ref = self.refs[index]
        try:
            img, (width, height) = decode_image(
                ref.path, min_short_side=self.min_short_side, max_pixels=self.max_pixels
            )
            views = make_views(img, self.preprocesses, self.tta)
            return _Decoded(ref, "ok", None, width, height, views)
        except DecodeError as exc:
            return _Decoded(ref, "error", str(exc), None, None, None)
        except Exception as exc:  # never let one image stop a worker
            return _Decoded(ref, "error", f"{type(exc).__name__}: {exc}"[:300], None, None, None)


@dataclass
class _CollatedBatch:
    items: list[_Decoded]
    views: dict[tuple, torch.Tensor]  # key -> uint8 (n_ok, n_crops, 3, H, W)

    def pin_memory(self):
        self.views = {k: v.pin_memory() for k, v in self.views.items()}
        return self


def _collate(items: list[_Decoded]) -> _CollatedBatch:
    ok = [it for it in items if it.status == "ok"]
    views: dict[tuple, torch.Tensor] = {}
    if ok:
        for key in ok[0].views:
            views[key] = torch.from_numpy(np.stack([it.views[key] for it in ok]))
    for it in items:
        it.views = None  # pixels travel once, in the stacked tensors
    return _CollatedBatch(items, views)


def _group_batches(n: int, groups: Sequence[int] | None, batch_size: int) -> list[list[int]]:
    sizes = list(groups) if groups else [n]
    if sum(sizes) != n:
        raise ValueError("groups must add up to the number of references")
    batches, start = [], 0
    for size in sizes:
        for s in range(start, start + size, batch_size):
            batches.append(list(range(s, min(s + batch_size, start + size))))
        start += size
    return batches


def _isolated_decode(dataset: _ImageDataset, indices: list[int]) -> list[_Decoded]:
    """Decode ``indices`` one by one in a forked process; an image during which that process dies
    is reported as an error and the process restarted for the rest."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    results: list[_Decoded] = []
    todo = list(indices)
    while todo:
        recv, send = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_decode_serially, args=(dataset, todo, send), daemon=True)
        proc.start()
        send.close()
        got = 0
        try:
            while got < len(todo):
                results.append(recv.recv())
                got += 1
        except EOFError:
            proc.join()
            ref = dataset.refs[todo[got]]
            reason = f"the decoding process died on this image twice (exit code {proc.exitcode})"
            results.append(_Decoded(ref, "error", reason, None, None, None))
            got += 1
        finally:
            recv.close()
            proc.join(timeout=5)
        todo = todo[got:]
    return results


def _decode_serially(dataset: _ImageDataset, indices: list[int], conn) -> None:
    torch.set_num_threads(1)
    for i in indices:
        conn.send(dataset[i])
    conn.close()


def _worker_init(_worker_id: int) -> None:
    torch.set_num_threads(1)


def select_device(device: str = "auto") -> torch.device:
    """``auto``: cuda, then mps, then cpu. Anything else is passed to ``torch.device``."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ImgsentError(
            f"--device {device!r} is not a device torch knows (try auto, cpu, cuda, cuda:1, mps)"
        ) from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ImgsentError(f"--device {device}: CUDA is not available on this machine")
    return dev


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ImgsentError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return precision


def autocast_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    check_precision(precision)
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return None
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if precision == "bf16" else torch.float16


class FeatureEngine:
    """Runs backbones over images. Build once, then :meth:`run` any number of reference lists.

    ``device``: ``auto``/``cpu``/``cuda``...; ``precision``: ``auto`` (AMP on CUDA, fp32 elsewhere),
    ``fp32``, ``bf16``, ``fp16``; ``channels_last``: None = on; ``tta``: ``none``, ``flip``
    (mean of the image and its mirror), ``crops`` (mean of centre + 4 corner crops), ``flip+crops``.
    ``optimize``: ``auto`` (CPU: trace + freeze each module, checked against eager on a probe;
    GPU: eager, AMP), ``jit``, ``none``; ``compile`` uses ``torch.compile`` instead.
    ``model_batch``: images per forward pass (default: 8 on CPU, where small batches keep the
    activations in cache and run 3-4x faster than 64; the whole batch on GPU).
    ``lanes``: batches embedded side by side (default: on CPU one per torch thread, each lane
    single-threaded, see :func:`in_lanes`; 1 on GPU).
    """

    def __init__(
        self,
        backbones: Sequence[Backbone],
        *,
        device: str = "auto",
        precision: str = "auto",
        batch_size: int = 64,
        workers: int | None = None,
        channels_last: bool | None = None,
        compile: bool = False,
        tta: str = "none",
        max_pixels: int = DEFAULT_MAX_PIXELS,
        optimize: str = "auto",
        model_batch: int | None = None,
        lanes: int | None = None,
    ):
        if not backbones:
            raise ImgsentError("no backbone given")
        if tta not in TTA_MODES:
            raise ImgsentError(f"--tta must be one of {', '.join(TTA_MODES)}, got {tta!r}")
        if batch_size < 1:
            raise ImgsentError(f"--batch-size must be >= 1, got {batch_size}")
        if max_pixels < 1:
            raise ImgsentError(f"--max-pixels must be >= 1, got {max_pixels}")
        self.device = select_device(device)
        self.amp_dtype = autocast_dtype(self.device, precision)
        self.batch_size = batch_size
        self.workers = default_workers() if workers is None else workers
        if self.workers < 0:
            raise ImgsentError(f"--workers must be >= 0, got {workers}")
        self.channels_last = True if channels_last is None else channels_last
        if optimize not in OPTIMIZE:
            raise ImgsentError(f"--optimize must be one of {', '.join(OPTIMIZE)}, got {optimize!r}")
        self.model_batch = model_batch or (batch_size if self.device.type == "cuda" else 8)
        self.lanes = lanes or (torch.get_num_threads() if self.device.type == "cpu" else 1)
        if self.lanes < 1:
            raise ImgsentError(f"lanes must be >= 1, got {lanes}")
        self.tta = tta
        self.max_pixels = max_pixels
        self.backbones = list(backbones)
        self._devices: list[torch.device] = []
        self._norms: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._fixed_shape = [False] * len(self.backbones)  # frozen modules get exactly model_batch images
        self._compile, self._optimize = compile, optimize
        self._prepared = False
        self._prepare_lock = threading.Lock()
        for bb in self.backbones:
            dev = torch.device("cpu") if bb.cpu_only else self.device
            self._devices.append(dev)
            mean = torch.tensor(bb.preprocess.mean, device=dev).view(1, 3, 1, 1) * 255.0
            std = torch.tensor(bb.preprocess.std, device=dev).view(1, 3, 1, 1) * 255.0
            self._norms.append((mean, std))

    def prepare(self) -> None:
        """Move the backbones to their device and optimise them (trace, freeze, fuse on CPU; or
        ``torch.compile``). Done once, on first use: :meth:`run` starts its decoding processes
        first, so they decode the first batches while this runs."""
        with self._prepare_lock:
            if self._prepared:
                return
            for i, bb in enumerate(self.backbones):
                dev = self._devices[i]
                module = bb.module.to(dev)
                if self.channels_last and not isinstance(module, torch.jit.ScriptModule):
                    module = module.to(memory_format=torch.channels_last)
                scripted = isinstance(module, torch.jit.ScriptModule)
                if self._compile and not scripted:
                    module = torch.compile(module)
                elif not scripted and (self._optimize == "jit" or (self._optimize == "auto" and dev.type == "cpu")):
                    module, self._fixed_shape[i] = _freeze(bb, module, dev, self.channels_last, self.model_batch)
                bb.module = module
            self._prepared = True

    @property
    def keys(self) -> list[str]:
        return [bb.key for bb in self.backbones]

    def _dataset(self, refs: Sequence[ImageRef]) -> _ImageDataset:
        return _ImageDataset(refs, [bb.preprocess for bb in self.backbones], self.tta, self.max_pixels)

    def _loader(self, dataset: _ImageDataset, batches: list[list[int]]) -> DataLoader:
        kwargs = {}
        if self.workers > 0:
            kwargs = {"worker_init_fn": _worker_init, "prefetch_factor": PREFETCH, "persistent_workers": False}
        return DataLoader(
            dataset,
            batch_sampler=batches,
            num_workers=self.workers,
            collate_fn=_collate,
            pin_memory=self.device.type == "cuda",
            **kwargs,
        )

    def _embed(self, index: int, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 (n, crops, 3, H, W) -> float32 (n, D) on CPU, averaged over crops and flips."""
        dev = self._devices[index]
        mean, std = self._norms[index]
        n, crops = pixels.shape[:2]
        x = pixels.to(dev, non_blocking=True).flatten(0, 1)
        x = (x.float() - mean) / std
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        amp = (
            torch.autocast(device_type=dev.type, dtype=self.amp_dtype)
            if self.amp_dtype is not None and dev.type == self.device.type
            else contextlib.nullcontext()
        )
        with amp, _fusion(self._fixed_shape[index] and dev.type == "cpu"):
            out = self._forward(index, x)
            if "flip" in self.tta:
                out = (out + self._forward(index, torch.flip(x, dims=[3]))) / 2
        out = out.view(n, crops, -1).mean(dim=1)
        return out

    def _forward(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """Forward passes of ``model_batch`` images; a frozen module always gets exactly that many
        (the last pass padded), so its fused kernels are compiled for one shape only and an image's
        features do not depend on how many others share its pass."""
        bb, step = self.backbones[index], self.model_batch
        outs = []
        for s in range(0, len(x), step):
            part = x[s : s + step]
            m = len(part)
            if m < step and self._fixed_shape[index]:
                pad = part.new_zeros((step - m, *part.shape[1:]))
                part = torch.cat([part, pad]).contiguous(memory_format=part_format(part))
            outs.append(bb(part)[:m].float())
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def run(self, refs: Sequence[ImageRef], groups: Sequence[int] | None = None) -> Iterator[FeatureBatch]:
        """Yield one :class:`FeatureBatch` per batch of ``refs``, in order.

        ``groups``: sizes of consecutive runs of ``refs`` (output shards) that no batch may straddle.
        Batches then depend only on the group, so a resumed run computes exactly the same numbers
        (batch composition can change float rounding in some kernels).
        A decoding process that dies (a decoder segfault, an OOM kill) does not end the run: the
        batches it may have held are decoded again one image at a time in a separate process, and
        an image that kills that process too becomes an error row.
        """
        if not refs:
            return
        batches = _group_batches(len(refs), groups, self.batch_size)
        dataset = self._dataset(refs)
        yield from in_lanes(self._features, self._decoded(dataset, batches), self.lanes)

    def _decoded(self, dataset: _ImageDataset, batches: list[list[int]]) -> Iterator[_CollatedBatch]:
        received = 0
        while received < len(batches):
            loader = iter(self._loader(dataset, batches[received:]))  # decoding processes start
            self.prepare()
            try:
                for batch in loader:
                    received += 1
                    yield batch
            except RuntimeError as exc:
                if self.workers == 0 or "DataLoader worker" not in str(exc):
                    raise
                # Unregister the dead loader's workers first: torch's SIGCHLD handler would
                # otherwise raise again, anywhere, when the next child process exits.
                getattr(loader, "_shutdown_workers", lambda: None)()
                in_flight = batches[received : received + self.workers * PREFETCH + 1]
                for indices in in_flight:
                    received += 1
                    yield _collate(_isolated_decode(dataset, indices))

    def embed_views(self, views: dict[tuple, torch.Tensor], ok_pos: list[int], n: int) -> dict[str, np.ndarray]:
        """Features of every backbone for ``n`` rows: uint8 views (of the ``ok_pos`` rows, in order)
        in, float32 (n, D) per backbone key out, NaN on the other rows."""
        self.prepare()
        feats: dict[str, np.ndarray] = {}
        with torch.inference_mode():
            for idx, bb in enumerate(self.backbones):
                full = np.full((n, bb.dim), np.nan, dtype=np.float32)
                if ok_pos:
                    full[ok_pos] = self._embed(idx, views[bb.preprocess.view_key]).cpu().numpy()
                feats[bb.key] = full
        return feats

    def _features(self, batch: _CollatedBatch) -> FeatureBatch:
        items = batch.items
        ok_pos = [i for i, it in enumerate(items) if it.status == "ok"]
        return FeatureBatch(
            ids=[it.ref.id for it in items],
            paths=[it.ref.path for it in items],
            status=[it.status for it in items],
            error=[it.error for it in items],
            width=[it.width for it in items],
            height=[it.height for it in items],
            features=self.embed_views(batch.views, ok_pos, len(items)),
        )


def in_lanes(fn: Callable, items: Iterable, lanes: int) -> Iterator:
    """``map(fn, items)``, in order, on ``lanes`` threads at once with torch single-threaded in
    each (restored after). On a CPU this beats one lane with all cores (here +20 % for two
    convnets on 2 cores, 2x for the scoring head): no thread waits at an OpenMP barrier for a
    core that a decoding process took, and small batches do not scale across cores anyway.
    Torch and Parquet release the GIL. ``lanes=1``: plain, in this thread."""
    if lanes <= 1:
        yield from map(fn, items)
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(lanes, thread_name_prefix="imgsent-lane") as pool:
            pending: deque = deque()
            for item in items:
                pending.append(pool.submit(fn, item))
                if len(pending) >= lanes:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
    finally:
        torch.set_num_threads(before)


_fusion_lock = threading.Lock()
_fusion_users = [0, False]  # lanes inside _fusion(True), the setting before the first entered


@contextlib.contextmanager
def _fusion(on: bool):
    """oneDNN graph fusion for TorchScript on CPU (conv + bias + activation, ... in one kernel;
    1.3-1.5x on MobileNetV2 / EfficientNet here), on only while imgsent's own frozen modules run
    (counted, so that lanes running at once do not switch it off under each other)."""
    if not on:
        yield
        return
    with _fusion_lock:
        if _fusion_users[0] == 0:
            _fusion_users[1] = torch.jit.onednn_fusion_enabled()
            torch.jit.enable_onednn_fusion(True)
        _fusion_users[0] += 1
    try:
        yield
    finally:
        with _fusion_lock:
            _fusion_users[0] -= 1
            if _fusion_users[0] == 0:
                torch.jit.enable_onednn_fusion(_fusion_users[1])


def part_format(x: torch.Tensor) -> torch.memory_format:
    return (
        torch.channels_last
        if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
        else torch.contiguous_format
    )


def _freeze(bb: Backbone, module: torch.nn.Module, dev: torch.device, channels_last: bool, batch: int):
    """Trace and freeze ``module`` for batches of exactly ``batch`` images (folds batch-norm; on CPU
    oneDNN fuses the graph on the first calls, done here). Returns (module, frozen): eager when
    tracing fails or the frozen module disagrees with eager on the probe image."""
    import warnings

    from .backbones import probe_image

    probe = probe_image(bb.preprocess)
    x = torch.cat([probe, torch.flip(probe, dims=[3])]).repeat((batch + 1) // 2, 1, 1, 1)[:batch].to(dev)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    try:
        with torch.inference_mode(), warnings.catch_warnings(), _fusion(dev.type == "cpu"):
            warnings.simplefilter("ignore")
            eager = module(x[:2])  # the probe and its mirror: all the check needs
            frozen = torch.jit.freeze(torch.jit.trace(module, x, check_trace=False))
            for _ in range(WARMUP_CALLS):  # the profiling executor optimises (and fuses) after these
                got = frozen(x)
            eager = eager[0] if isinstance(eager, (tuple, list)) else eager
            got = (got[0] if isinstance(got, (tuple, list)) else got)[:2]
    except Exception:
        return module, False
    scale = float(eager.abs().max()) or 1.0
    if got.shape != eager.shape or float((got - eager).abs().max()) > 1e-4 * scale:
        return module, False
    return frozen, True


WARMUP_CALLS = 3


def default_workers() -> int:
    """Decoding processes: one per core beyond the first (the main process runs the models)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return max(1, min(8, cores - 1)) if cores > 1 else 0
