"""How an engine runs, resolved once: :class:`EnginePlan` from :class:`~imgsent.options.RunOptions`.

The plan is plain data (device name, numerics, batch and pass sizes, lanes, overlap, decoding
processes, channels_last, optimisation, runtime asked for): the engine's loop and every runner
(:mod:`imgsent.runners`) read it, and nothing in it changes once the engine is built.
"""

from __future__ import annotations

import dataclasses

import torch

from .errors import ImgsentError
from .options import CPU_MODEL_BATCH, DEFAULT_BATCH_SIZE, RunOptions
from .precision import AUTOCAST, resolve_numerics

CUDA_BATCH_SIZE = 256  # default batch on CUDA: enough images in flight to keep a modern GPU busy
OPTIMIZE = ("auto", "jit", "none")


@dataclasses.dataclass(frozen=True)
class EnginePlan:
    """An engine's settings, every default resolved (see :func:`plan_engine`)."""

    device: str  # a torch device name: "cpu", "cuda", "cuda:1", "mps"
    numerics: str  # precision.resolve_numerics: fp32, tf32, bf16, fp16
    batch_size: int  # images a decoded batch holds
    model_batch: int  # images a forward pass holds (frozen, compiled and CUDA passes exactly this many)
    lanes: int  # batches embedded side by side (CPU: one single-threaded lane per torch thread)
    overlap: bool  # the next batch staged on a thread (and CUDA stream) of its own
    workers: int  # decoding processes
    channels_last: bool
    optimize: str  # auto (CPU: trace and freeze), jit, none
    compile: bool  # torch.compile instead of freezing
    runtime: str  # asked for: auto, torch, onnx (each backbone's runner says what it got)
    tta: str  # test-time augmentation: none, flip, ...

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)

    @property
    def amp_dtype(self) -> torch.dtype | None:
        return AUTOCAST[self.numerics]

    def traces(self, dev: torch.device) -> bool:
        """Whether a network on ``dev`` is traced and frozen (CPU, or everywhere with ``jit``)."""
        return self.optimize == "jit" or (self.optimize == "auto" and dev.type == "cpu")

    def runs_frozen(self, batch: int, dev: torch.device | None = None) -> bool:
        """Whether a backbone on ``dev`` runs as a CPU graph frozen for passes of ``batch`` images,
        channels_last: what a cached graph (:mod:`imgsent.graphcache`) was made for."""
        dev = dev or self.torch_device
        return (
            dev.type == "cpu"
            and self.traces(dev)
            and not self.compile
            and self.model_batch == batch
            and self.channels_last
        )


def plan_engine(
    options: RunOptions,
    *,
    channels_last: bool | None = None,
    optimize: str = "auto",
    model_batch: int | None = None,
    lanes: int | None = None,
    overlap: bool | None = None,
    device: torch.device | None = None,
    numerics: str | None = None,
    cores: int | None = None,
) -> EnginePlan:
    """The plan of a local engine with ``options`` (see :class:`~imgsent.engine.FeatureEngine` for
    what each keyword means); raises :class:`ImgsentError` with one line on a bad value.
    ``device``, ``numerics`` and ``cores`` (the CPUs the engine has: its lanes on a CPU and its
    decoding processes) default to what this process finds; a Ray driver plans for its workers
    with theirs (the card they get, the CPUs Ray reserves for each)."""
    device = device if device is not None else select_device(options.device)
    cuda = device.type == "cuda"
    batch_size = options.batch_size or (CUDA_BATCH_SIZE if cuda else DEFAULT_BATCH_SIZE)
    if optimize not in OPTIMIZE:
        raise ImgsentError(f"optimize must be one of {', '.join(OPTIMIZE)}, got {optimize!r}")
    lanes = lanes or ((cores or torch.get_num_threads()) if device.type == "cpu" else 1)
    if lanes < 1:
        raise ImgsentError(f"lanes must be >= 1, got {lanes}")
    return EnginePlan(
        device=str(device),
        numerics=numerics or resolve_numerics(device, options.precision),
        batch_size=batch_size,
        model_batch=model_batch or (batch_size if cuda else CPU_MODEL_BATCH),
        lanes=lanes,
        # each batch's decoding and copies to the device on a thread (and CUDA stream) of their own,
        # while the models run the batch before: on CUDA, where one lane runs the models
        overlap=(cuda and lanes == 1) if overlap is None else overlap,
        workers=default_workers(device, cores) if options.workers is None else options.workers,
        channels_last=True if channels_last is None else channels_last,
        optimize=optimize,
        compile=options.compile,
        runtime=options.runtime,
        tta=options.tta,
    )


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


def default_workers(device: torch.device | None = None, cores: int | None = None) -> int:
    """Decoding processes for an engine on ``device`` (:func:`imgsent.decodepool.default_workers`)."""
    from .decodepool import default_workers as workers_for

    return workers_for(device is not None and device.type == "cuda", cores)


def frozen_cpu_batch(options: RunOptions) -> int | None:
    """The pass size a local engine with ``options`` freezes CPU graphs for (channels_last, fp32),
    or None when it would not freeze them (another device, numerics, engine or ``compile``)."""
    if options.engine != "local" or options.compile or options.precision == "int8":
        return None
    dev = select_device(options.device)
    if dev.type != "cpu" or resolve_numerics(dev, options.precision) != "fp32":
        return None
    return CPU_MODEL_BATCH
