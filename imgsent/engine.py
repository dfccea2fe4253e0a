"""The extraction engine: image references in, feature batches out.

A DataLoader's worker processes decode each image once (:func:`~imgsent.decode.decode_image`) and
cut the uint8 views every backbone needs (shared between backbones with the same preprocessing);
with ``decode="device"`` they read JPEGs' bytes only, and the main process decodes each batch of
them on the device (:mod:`~imgsent.devicedecode`; nvJPEG on CUDA), other files as before.
The main process moves uint8 batches to the device (pinned memory, ``non_blocking``), normalises
there, and runs every backbone under ``inference_mode`` (AMP and channels_last on CUDA).
Bad images become rows with ``status="error"``; they never stop the run.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import os
import shutil
import sys
import threading
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .backbones import Backbone
from .batches import FailureCount, FeatureBatch, decoded_batch, flag_nonfinite, group_batches, mark_failed  # noqa: F401  (flag_nonfinite, mark_failed: imported from here too)
from .compiled import (
    WARMUP_CALLS,
    drop_graph,
    first_output,
    graph_key,
    load_graph,
    probe_batch,
    save_graph,
    unfused,
)
from .compiled import fusion as _fusion
from .decode import (
    DEVICE_INTERPOLATIONS,
    DecodedImage,
    Preprocess,
    crop_count,
    decode_ref,
    decode_refs,
    read_jpeg,
)
from .decodepool import PREFETCH
from .errors import ImgsentError, last_line, one_line
from .inputs import ImageRef
from .lanes import ahead, in_lanes
from .options import CPU_MODEL_BATCH, DEFAULT_BATCH_SIZE, RunOptions
from .precision import AUTOCAST, resolve_numerics

CUDA_BATCH_SIZE = 256  # default batch on CUDA: enough images in flight to keep a modern GPU busy

OPTIMIZE = ("auto", "jit", "none")
DEVICE_PREFETCH = 2  # the same when they only read JPEG files (decode="device"): reading is quick
JPEG_BYTES = 512 * 1024  # shared memory assumed per JPEG handed over whole (decode="device")


class ImageDataset(Dataset):
    """The decode step as a map-style dataset: item ``i`` is ``refs[i]`` decoded into the views
    of every distinct preprocessing (:func:`~imgsent.decode.decode_ref`); with ``decode="device"``
    a plain JPEG's bytes instead (:func:`~imgsent.decode.read_jpeg`), decoded later on the device."""

    def __init__(
        self,
        refs: Sequence[ImageRef],
        preprocesses: list[Preprocess],
        tta: str,
        max_pixels: int,
        decode: str = "workers",
        keep_images: str | None = None,
    ):
        self.refs = list(refs)
        self.keep_images = keep_images
        self.preprocesses = preprocesses
        self.tta = tta
        self.max_pixels = max_pixels
        self.decode = decode

    def __len__(self) -> int:
        return len(self.refs)

    def __getitems__(self, indices: list[int]) -> list[DecodedImage]:
        """A whole batch (the DataLoader asks so): URLs in it download side by side."""
        if self.decode == "device" or not any(self.refs[i].source for i in indices):
            return [self[i] for i in indices]
        refs = [self.refs[i] for i in indices]
        return decode_refs(refs, self.preprocesses, self.tta, self.max_pixels, self.keep_images)

    def __getitem__(self, index: int) -> DecodedImage:
        if self.decode == "device":
            encoded = read_jpeg(self.refs[index], self.max_pixels)
            if encoded is not None:
                return encoded
        return decode_ref(self.refs[index], self.preprocesses, self.tta, self.max_pixels)


@dataclasses.dataclass
class _CollatedBatch:
    items: list[DecodedImage]
    views: dict[tuple, torch.Tensor]  # key -> uint8 (n_decoded, n_crops, 3, H, W), the rows decoded by Pillow
    jpeg_pos: list[int] = dataclasses.field(default_factory=list)  # rows left for the device to decode
    jpeg_bytes: torch.Tensor | None = None  # their files' bytes, end to end (one shared-memory block)
    jpeg_sizes: list[int] = dataclasses.field(default_factory=list)

    def pin_memory(self):
        self.views = {k: v.pin_memory() for k, v in self.views.items()}
        return self


def _collate(items: list[DecodedImage]) -> _CollatedBatch:
    """Stack the views of the rows Pillow decoded; the bytes of JPEGs left for the device go end
    to end into one tensor (a decoding process hands it over in shared memory, not pickled)."""
    ok = [it for it in items if it.status == "ok" and it.views is not None]
    views: dict[tuple, torch.Tensor] = {}
    if ok:
        for key in ok[0].views:
            views[key] = torch.from_numpy(np.stack([it.views[key] for it in ok]))
    jpeg_pos = [i for i, it in enumerate(items) if it.jpeg is not None]
    blob = torch.from_numpy(np.concatenate([items[i].jpeg for i in jpeg_pos])) if jpeg_pos else None
    sizes = [len(items[i].jpeg) for i in jpeg_pos]
    for it in items:
        it.views = it.jpeg = None  # pixels and bytes travel once, in the tensors
    return _CollatedBatch(items, views, jpeg_pos, blob, sizes)


def _isolated_decode(dataset: ImageDataset, indices: list[int]) -> list[DecodedImage]:
    """Decode ``indices`` one by one in a forked process (:func:`imgsent.decodepool.decode_isolated`)."""
    from .decodepool import decode_isolated

    return decode_isolated(dataset.__getitem__, dataset.refs, indices)


def _worker_init(_worker_id: int) -> None:
    torch.set_num_threads(1)
    sys.excepthook = _quiet_lost_parent


def _quiet_lost_parent(exc_type, exc, tb) -> None:
    """In a decoding process: when the main process ends (Ctrl-C, SIGTERM), the thread that hands
    it shared-memory batches (multiprocessing's resource sharer, which reports through
    ``sys.excepthook``) loses its connection; that is no error worth a traceback."""
    if not issubclass(exc_type, (ConnectionError, EOFError)):
        sys.__excepthook__(exc_type, exc, tb)


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
    CUDA with one lane); features are the same either way.
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
        **overrides,
    ):
        if not backbones:
            raise ImgsentError("no backbone given")
        opts = RunOptions.build(options, **overrides)
        self.options = opts
        self.device = select_device(opts.device)
        self.numerics = resolve_numerics(self.device, opts.precision)
        self.amp_dtype = AUTOCAST[self.numerics]
        cuda = self.device.type == "cuda"
        self.batch_size = opts.batch_size or (CUDA_BATCH_SIZE if cuda else DEFAULT_BATCH_SIZE)
        self.workers = default_workers(self.device) if opts.workers is None else opts.workers
        self.channels_last = True if channels_last is None else channels_last
        if optimize not in OPTIMIZE:
            raise ImgsentError(f"optimize must be one of {', '.join(OPTIMIZE)}, got {optimize!r}")
        self.model_batch = model_batch or (self.batch_size if cuda else CPU_MODEL_BATCH)
        self.lanes = lanes or (torch.get_num_threads() if self.device.type == "cpu" else 1)
        if self.lanes < 1:
            raise ImgsentError(f"lanes must be >= 1, got {lanes}")
        self.tta = opts.tta
        self.max_pixels = opts.max_pixels
        self.decode = opts.decode
        # Each batch's decoding and copies to the device on a thread (and CUDA stream) of their own,
        # while the models run the batch before: on CUDA, where one lane runs the models.
        self.overlap = (cuda and self.lanes == 1) if overlap is None else overlap
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
        self._devices: list[torch.device] = []
        self._norms: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._modules: list[torch.nn.Module] = [bb.module for bb in self.backbones]  # replaced by prepare()
        self._fixed_shape = [False] * len(self.backbones)  # frozen/compiled/CUDA modules get exactly model_batch images
        self._compile, self._optimize = opts.compile, optimize
        self._prepared = False
        self._prepare_lock = threading.Lock()
        for bb in self.backbones:
            dev = torch.device("cpu") if bb.cpu_only else self.device
            self._devices.append(dev)
            mean = torch.tensor(bb.preprocess.mean, device=dev).view(1, 3, 1, 1) * 255.0
            std = torch.tensor(bb.preprocess.std, device=dev).view(1, 3, 1, 1) * 255.0
            self._norms.append((mean, std))
        # what runs each network: "torch", or "onnx" (decided now, so that a store's header can say)
        self.runtimes = ["torch"] * len(self.backbones)
        self._plan_runtimes(opts.runtime)
        self._torch_free = self._torch_free_engine()

    def _plan_runtimes(self, runtime: str) -> None:
        """ONNX Runtime runners (:mod:`imgsent.onnxrunner`) for the backbones that can have one:
        ``auto`` on a CPU in float32 without ``compile``, each backbone whose network exports and
        checks out (the others, and any that does not, stay on torch); ``onnx`` the same, but one
        that should export and does not stops the run with one line."""
        from . import onnxrunner

        on_cpu = {d.type for d in self._devices} == {"cpu"}
        if not onnxrunner.applies(runtime, on_cpu, self._compile, self.numerics) or self._optimize == "none":
            return
        for i, bb in enumerate(self.backbones):
            if not onnxrunner.runs_there(bb):
                continue
            try:
                module = onnxrunner.runner_for(bb, self.model_batch)
            except ImgsentError as exc:
                if runtime == "onnx":
                    raise
                import warnings

                from .errors import ImgsentWarning

                warnings.warn(f"{exc}; it runs on torch", ImgsentWarning, stacklevel=3)
                continue
            if module is None:  # a view with no part that exports
                continue
            self._modules[i], self.runtimes[i] = module, "onnx"
            self._fixed_shape[i] = bb.optimizable  # a detector view loops over its images itself

    def _torch_free_engine(self):
        """When every backbone runs on ONNX Runtime in a form :mod:`imgsent.ortengine` runs (networks,
        the shipped face detectors' views), that engine over the same checked graphs: :meth:`run`
        hands it the work, so that the first run of a model and every warm run after it (which never
        loads torch) compute the same numbers. None otherwise."""
        if any(r != "onnx" for r in self.runtimes) or self.decode != "workers":
            return None
        from . import onnxrunner
        from .ortengine import OrtEngine

        entries = onnxrunner.plan_entries(self)
        if entries is None:
            return None
        return OrtEngine({"tta": self.tta, "backbones": entries}, self.options, lanes=self.lanes, checked_here=True)

    @property
    def torch_free(self):
        """The :class:`~imgsent.ortengine.OrtEngine` that runs this engine's work, or None."""
        return self._torch_free

    def runtime_record(self) -> dict[str, str]:
        """The backbones that run on ONNX Runtime, for a store's header: ``{key: "onnx"}``."""
        return {bb.key: "onnx" for bb, r in zip(self.backbones, self.runtimes) if r == "onnx"}

    def adopt_runtimes(self, record: dict[str, str]) -> None:
        """Run each backbone on what ``record`` (a store's header) says, so that ``--runtime auto``
        resumes a store with the runtime it was begun with (a store never mixes two)."""
        from . import onnxrunner

        for i, bb in enumerate(self.backbones):
            want = record.get(bb.key, "torch")
            if want == self.runtimes[i]:
                continue
            module = bb.module if want == "torch" else onnxrunner.runner_for(bb, self.model_batch)
            if module is None:
                raise ImgsentError(f"{bb.key}: this store ran it on ONNX Runtime, which it cannot use here")
            self._modules[i], self.runtimes[i] = module, want
            self._fixed_shape[i] = want == "onnx" and bb.optimizable
        self._torch_free = self._torch_free_engine()

    def prepare(self) -> None:
        """Move the backbones to their device and optimise them (trace, freeze, fuse on CPU; or
        ``torch.compile``), into the engine's own copies. Done once, on first use: :meth:`run`
        starts its decoding processes first, so they decode the first batches while this runs."""
        with self._prepare_lock:
            if self._prepared:
                return
            for i, bb in enumerate(self.backbones):
                dev = self._devices[i]
                module = bb.module
                if self.runtimes[i] == "onnx":  # its runner was made with the engine
                    continue
                if not bb.optimizable:  # detectors: as they are, on their device
                    self._modules[i] = self._prepare_view(i, module, dev)
                    continue
                if bb.frozen_batch is not None:  # a cached frozen CPU graph (models.model_backbones)
                    if not self.runs_frozen(bb.frozen_batch, dev):
                        raise ImgsentError(
                            f"{bb.key} comes as a CPU graph frozen for passes of {bb.frozen_batch} images; this "
                            f"engine runs {self.model_batch} on {dev}{' compiled' if self._compile else ''}"
                        )
                    self._modules[i], self._fixed_shape[i] = module, True
                    continue
                scripted = isinstance(module, torch.jit.ScriptModule)
                if dev != _device_of(module) or (self.channels_last and not scripted):
                    module = copy.deepcopy(module).to(dev)  # the caller's module stays as it was
                    if self.channels_last and not scripted:
                        module = module.to(memory_format=torch.channels_last)
                if scripted and dev.type != "cpu":
                    module = _check_on_device(bb, module.to(dev), dev, self.channels_last)
                if self._compile and not scripted:
                    module, self._fixed_shape[i] = torch.compile(module, dynamic=False), True
                elif not scripted and self._traces(dev):
                    module, self._fixed_shape[i] = _freeze(bb, module, dev, self.channels_last, self.model_batch)
                if dev.type == "cuda":
                    # cuDNN picks its kernels by batch size: on an H200 an image in a 44-image pass
                    # came out up to 3.3e-5 off the same image in a 64-image pass (64 and 256 agreed
                    # exactly). Passes padded to model_batch keep features independent of batching.
                    self._fixed_shape[i] = True
                self._modules[i] = module
            # cached graphs: checked and warmed up side by side, one lane each (as batches run)
            frozen = [
                i for i, bb in enumerate(self.backbones) if bb.frozen_batch is not None and self.runtimes[i] == "torch"
            ]
            for _ in in_lanes(self._warm_frozen, frozen, min(self.lanes, len(frozen))):
                pass
            for dev in dict.fromkeys(d for d in self._devices if d.type == "cuda"):
                # Prepared on whichever thread and stream came first (the staging one, overlapped):
                # every copy done before any stream uses the modules.
                torch.cuda.synchronize(dev)
            self._prepared = True

    def _warm_frozen(self, index: int) -> None:
        bb = self.backbones[index]
        warm_frozen(bb, self._modules[index], bb.frozen_batch, self.channels_last)

    def runs_frozen(self, batch: int, dev: torch.device | None = None) -> bool:
        """Whether this engine runs a backbone as a CPU graph frozen for passes of ``batch`` images,
        channels_last: what a cached graph (:mod:`imgsent.compiled`) was made for."""
        dev = dev or self.device
        return (
            dev.type == "cpu"
            and self._traces(dev)
            and not self._compile
            and self.model_batch == batch
            and self.channels_last
        )

    @property
    def _prefetch(self) -> int:
        return prefetch_for(self.decode)

    def _traces(self, dev: torch.device) -> bool:
        return self._optimize == "jit" or (self._optimize == "auto" and dev.type == "cpu")

    def _prepare_view(self, index: int, module: torch.nn.Module, dev: torch.device) -> torch.nn.Module:
        """A detector view runs as it is, except the classifier a regions view runs on its crops
        (``inner``, ``inner_backbone``): on CPU traced and frozen for its fixed crop batch."""
        if dev != _device_of(module):
            module = copy.deepcopy(module).to(dev)  # the caller's module stays as it was
        inner = getattr(module, "inner_backbone", None)
        if inner is None or self._compile or not self._traces(dev):
            return module
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        own = copy.deepcopy(module.inner).to(memory_format=fmt)
        frozen, ok = _freeze(inner, own, dev, self.channels_last, module.crop_batch)
        if not ok:
            return module
        return module.with_inner(frozen, fmt, functools.partial(_fusion, dev.type == "cpu"))

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
        uint8 batches (pinned on CUDA)."""
        kwargs = {}
        if self.workers > 0:
            kwargs = {"worker_init_fn": _worker_init, "prefetch_factor": self._prefetch, "persistent_workers": False}
        return DataLoader(
            dataset,
            batch_sampler=batches,
            num_workers=self.workers,
            collate_fn=_collate,
            pin_memory=self.device.type == "cuda",
            **kwargs,
        )

    def embed(self, index: int, pixels: torch.Tensor) -> torch.Tensor:
        """Backbone ``index`` on uint8 (n, crops, 3, H, W) -> float32 (n, D), averaged over crops
        and flips; on the backbone's device (``pixels`` may already be there)."""
        self.prepare()
        dev = self._devices[index]
        n, crops = pixels.shape[:2]
        x = pixels.to(dev, non_blocking=True).flatten(0, 1)  # uint8; normalised pass by pass
        amp = (
            torch.autocast(device_type=dev.type, dtype=self.amp_dtype)
            if self.amp_dtype is not None and dev.type == self.device.type
            else contextlib.nullcontext()
        )
        with torch.inference_mode(), amp, self._graph_context(index, dev), _tf32(self.numerics):
            out = self._forward(index, x)
            if "flip" in self.tta:
                out = (out + self._forward(index, torch.flip(x, dims=[3]))) / 2
        return out.view(n, crops, -1).mean(dim=1)

    def _graph_context(self, index: int, dev: torch.device):
        """On a CPU: oneDNN fusion for the graphs this engine froze; every other module (detectors,
        a user's TorchScript) runs unoptimised, out of reach of that process-wide switch, which
        another lane may hold on meanwhile (:func:`~imgsent.compiled.unfused`)."""
        if dev.type != "cpu" or self.runtimes[index] == "onnx":
            return contextlib.nullcontext()
        return _fusion(True) if self._fixed_shape[index] else unfused()

    def _forward(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """Forward passes of ``model_batch`` uint8 images, each normalised just before its pass
        (while it is in cache: on CPU this costs as much as an int8 model otherwise); a frozen,
        compiled or CUDA module always gets exactly that many (the last pass padded), so its kernels
        are chosen for one shape only and an image's features do not depend on how many others
        share its pass."""
        bb, module, step = self.backbones[index], self._modules[index], self.model_batch
        mean, std = self._norms[index]
        onnx = self.runtimes[index] == "onnx"  # ONNX Runtime takes NCHW arrays: no channels_last copy
        fmt = torch.channels_last if self.channels_last and not onnx else torch.contiguous_format
        outs = []
        for s in range(0, len(x), step):
            part = x[s : s + step]
            m = len(part)
            if m < step and self._fixed_shape[index]:
                part = torch.cat([part, part.new_zeros((step - m, *part.shape[1:]))])
            part = part.contiguous(memory_format=fmt).float().sub_(mean).div_(std)
            outs.append(bb.run(module, part)[:m].float())
        return outs[0] if len(outs) == 1 else torch.cat(outs)

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
            decoded = self._decoded(dataset, batches)
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

    def _decoded(self, dataset: ImageDataset, batches: list[list[int]]) -> Iterator[_CollatedBatch]:
        received = 0
        while received < len(batches):
            loader = iter(self.loader(dataset, batches[received:]))  # decoding processes start
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
                in_flight = batches[received : received + self.workers * self._prefetch + 1]
                for indices in in_flight:
                    received += 1
                    yield _collate(_isolated_decode(dataset, indices))

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
            key = (bb.preprocess.view_key, self._devices[idx])
            if key not in on_device:
                on_device[key] = views[bb.preprocess.view_key].to(self._devices[idx], non_blocking=True)
            out, bad = self.embed_or_retry(idx, on_device[key])
            failed.update((ok_pos[j], reason) for j, reason in bad.items() if ok_pos[j] not in failed)
            outs.append(out)
        # One copy back (one host sync) per device and batch, not one per backbone.
        host: dict[int, np.ndarray] = {}
        for dev in dict.fromkeys(self._devices):
            idxs = [i for i, d in enumerate(self._devices) if d == dev]
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
        bb = self.backbones[index]
        try:
            out, failed = self.embed(index, pixels), {}
        except ImgsentError:
            raise
        except Exception:
            rows, failed = [], {}
            for j in range(len(pixels)):
                try:
                    rows.append(self.embed(index, pixels[j : j + 1]))
                except ImgsentError:
                    raise
                except Exception as exc:
                    failed[j] = f"{bb.key} failed on this image: {last_line(exc)}"
                    rows.append(torch.full((1, bb.dim), float("nan"), device=self._devices[index]))
            out = torch.cat(rows)
        self._failures.add(index, bb.key, len(pixels), failed)
        return out, failed

    def _views(self, batch: _CollatedBatch) -> tuple[dict[tuple, torch.Tensor], list[int]]:
        """The batch's views (rows of its good images, in order) and those rows' positions. JPEGs
        left for the device are decoded there now, together; one the device refuses is decoded
        by Pillow here (and becomes an error row with Pillow's reason if that fails too)."""
        items, jpeg_pos = batch.items, batch.jpeg_pos
        if not jpeg_pos:
            return batch.views, [i for i, it in enumerate(items) if it.status == "ok"]
        from .devicedecode import decode_views

        preprocesses = [bb.preprocess for bb in self.backbones]
        left = set(jpeg_pos)
        host_pos = [i for i, it in enumerate(items) if it.status == "ok" and i not in left]
        jpegs = list(torch.split(batch.jpeg_bytes, batch.jpeg_sizes))
        on_device, failed = decode_views(
            jpegs, [items[i].orientation for i in jpeg_pos], preprocesses, self.tta, self.device, self.decoder
        )
        refused = [jpeg_pos[j] for j in failed]
        refused_set = set(refused)
        device_pos = [p for p in jpeg_pos if p not in refused_set]
        for p in refused:
            items[p] = decode_ref(items[p].ref, preprocesses, self.tta, self.max_pixels)
        redone = [p for p in refused if items[p].status == "ok"]
        redone_views = _collate([items[p] for p in redone]).views
        with self._count_lock:
            self.device_decoded[0] += len(device_pos)
            self.device_decoded[1] += len(refused)
        ok_pos = [i for i, it in enumerate(items) if it.status == "ok"]
        row = {p: r for r, p in enumerate(ok_pos)}
        crops = crop_count(self.tta)
        views: dict[tuple, torch.Tensor] = {}
        for pp in preprocesses:
            if pp.view_key in views:
                continue
            x = torch.empty((len(ok_pos), crops, 3, *pp.input_size), dtype=torch.uint8, device=self.device)
            for positions, source in ((host_pos, batch.views), (device_pos, on_device), (redone, redone_views)):
                if positions:
                    x[[row[p] for p in positions]] = source[pp.view_key].to(self.device, non_blocking=True)
            views[pp.view_key] = x
        return views, ok_pos

    def _features(self, batch: _CollatedBatch) -> FeatureBatch:
        if self._torch_free is not None:  # every backbone on ONNX Runtime: the same code as a run without torch
            return self._torch_free.embed_items(batch.items, {k: v.numpy() for k, v in batch.views.items()})
        return self._embed(self._stage(batch))

    def _stage(self, batch: _CollatedBatch) -> _Staged:
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


@dataclasses.dataclass
class _Staged:
    """A batch ready for the models: its views (on the device), the rows they are, and (on a CUDA
    side stream) the event that says the views are there."""

    batch: _CollatedBatch
    views: dict[tuple, torch.Tensor]
    ok_pos: list[int]
    ready: torch.cuda.Event | None


def _device_of(module: torch.nn.Module) -> torch.device:
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return torch.device("cpu")


def _freeze(bb: Backbone, module: torch.nn.Module, dev: torch.device, channels_last: bool, batch: int):
    """Trace and freeze ``module`` for batches of exactly ``batch`` images (folds batch-norm; on CPU
    oneDNN fuses the graph on the first calls, done here), or on a CPU load the graph a previous run
    cached (:mod:`imgsent.compiled`). Returns (module, frozen): eager when tracing fails or the frozen
    module disagrees with eager on the probe image (a cached graph that does is removed, and traced anew)."""
    import warnings

    x = probe_batch(bb.preprocess, batch, channels_last, dev)
    key = graph_key(bb.recipe(), batch, channels_last) if dev.type == "cpu" else None
    for use_cache in (True, False):
        frozen = load_graph(key) if use_cache else None
        if use_cache and frozen is None:
            continue
        try:
            with torch.inference_mode(), warnings.catch_warnings(), _fusion(dev.type == "cpu"):
                warnings.simplefilter("ignore")
                eager = first_output(module(x[:2]))  # the probe and its mirror: all the check needs
                if frozen is None:
                    frozen = torch.jit.freeze(torch.jit.trace(module, x, check_trace=False))
                for _ in range(WARMUP_CALLS):  # the profiling executor optimises (and fuses) after these
                    got = frozen(x)
                got = first_output(got)[:2]
        except Exception:
            got = eager = None
        if got is not None and got.shape == eager.shape:
            if float((got - eager).abs().max()) <= 1e-4 * (float(eager.abs().max()) or 1.0):
                if not use_cache:
                    save_graph(key, frozen)
                return frozen, True
        if use_cache:
            drop_graph(key)
    return module, False


def warm_frozen(bb: Backbone, module: torch.jit.ScriptModule, batch: int, channels_last: bool) -> None:
    """A backbone whose module is a cached frozen graph (``bb.frozen_batch``): check it against the
    probe features its recipe recorded, and run the warm-up calls a freshly frozen graph gets."""
    from .backbones import PROBE_VALUES, fingerprints_match

    x = probe_batch(bb.preprocess, batch, channels_last)
    with torch.inference_mode(), _fusion(True):
        for _ in range(WARMUP_CALLS):
            got = bb.run(module, x).float()[0]
    here = {"probe": [float(v) for v in got[:PROBE_VALUES]], "probe_norm": float(got.norm())}
    if not fingerprints_match(bb.fingerprint, here):
        drop_graph(graph_key(bb.recipe(), batch, channels_last))
        raise ImgsentError(
            f"the compiled graph cached for {bb.key} does not give its recipe's features; it was removed: run the "
            f"command again"
        )


def frozen_cpu_batch(options: RunOptions) -> int | None:
    """The pass size a local engine with ``options`` freezes CPU graphs for (channels_last, fp32),
    or None when it would not freeze them (another device, numerics, engine or ``compile``)."""
    if options.engine != "local" or options.compile or options.precision == "int8":
        return None
    dev = select_device(options.device)
    if dev.type != "cpu" or resolve_numerics(dev, options.precision) != "fp32":
        return None
    return CPU_MODEL_BATCH


def default_workers(device: torch.device | None = None, cores: int | None = None) -> int:
    """Decoding processes for an engine on ``device`` (:func:`imgsent.decodepool.default_workers`)."""
    from .decodepool import default_workers as workers_for

    return workers_for(device is not None and device.type == "cuda", cores)


def prefetch_for(decode: str) -> int:
    """Batches each decoding process works ahead: fewer when it only reads JPEG files."""
    return DEVICE_PREFETCH if decode == "device" else PREFETCH


SHM = "/dev/shm"


def check_shared_memory(
    workers: int, batch_size: int, preprocesses: list[Preprocess], tta: str, decode: str = "workers"
) -> None:
    """Decoding processes hand batches over in shared memory (``/dev/shm``); containers give it
    64 MB by default. Fail at once, saying what to change, when the batches in flight cannot fit.
    With ``decode="device"`` they hand over whole JPEG files, assumed :data:`JPEG_BYTES` each (a
    tweet photo is 0.1-0.3 MB, a 12-megapixel camera photo 3-5 MB)."""
    if workers < 1 or not os.path.isdir(SHM):
        return
    crops = crop_count(tta)
    views = {pp.view_key: pp.input_size for pp in preprocesses}
    per_image = crops * sum(3 * h * w for h, w in views.values())
    if decode == "device":
        per_image = max(per_image, JPEG_BYTES)
    need = 2 * batch_size * per_image * workers * prefetch_for(decode)  # batches in flight, and room to hand them over
    free = shutil.disk_usage(SHM).free
    if free < need:
        raise ImgsentError(
            f"{SHM} has {free / 2**20:.0f} MB free, but {workers} decoding processes with batches of {batch_size} "
            f"need about {need / 2**20:.0f} MB there; give the container more shared memory (docker run "
            f"--shm-size=2g), or lower workers or batch_size (workers=0 decodes in this process)"
        )


@contextlib.contextmanager
def _tf32(numerics: str):
    """TF32 tensor cores for CUDA matmuls and convolutions only when the run's numerics say tf32
    (cuDNN allows them by default, which would make "fp32" features something else); restored."""
    if not torch.cuda.is_available():
        yield
        return
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = numerics == "tf32"
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def _check_on_device(bb: Backbone, module: torch.nn.Module, dev: torch.device, channels_last: bool):
    """A TorchScript backbone moved to ``dev``: it must run there, and give the features its CPU
    fingerprint recorded (within GPU rounding); else one clear error before any batch runs."""
    from .backbones import PROBE_VALUES, fingerprints_match, probe_image

    if channels_last:
        try:
            module = module.to(memory_format=torch.channels_last)
        except (RuntimeError, TypeError):
            pass  # a module that keeps its own layout
    x = probe_image(bb.preprocess).to(dev)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    try:
        with torch.inference_mode():
            got = bb.run(module, x).float()[0].cpu()
    except Exception as exc:
        reason = one_line(exc, 160)
        raise ImgsentError(f"backbone {bb.key} cannot run on {dev} ({reason}); use device cpu for it") from None
    here = {"probe": [float(v) for v in got[:PROBE_VALUES]], "probe_norm": float(got.norm())}
    if not fingerprints_match(bb.fingerprint, here, rtol=1e-2):
        raise ImgsentError(f"backbone {bb.key} gives other features on {dev} than on the CPU; use device cpu for it")
    return module
