"""Run options: how ``extract`` and ``score`` find inputs, run the engine and write outputs.

One dataclass (like timm's pretrained config), built and validated once at the boundary
(:meth:`RunOptions.build`), then passed down unchanged to inputs, the engine and the writers.
Its defaults are the only copy of each default; the CLI reads them from here. Errors name the
option (``batch_size``), since library users never typed a flag. Torch-free.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .decode import DEFAULT_MAX_PIXELS, TTA_MODES
from .errors import ImgsentError

PRECISIONS = ("auto", "fp32", "tf32", "bf16", "fp16", "int8")
NUMERICS = ("fp32", "tf32", "bf16", "fp16")  # what a run's features were computed in ("auto" resolved)
ENGINES = ("local", "ray")
RUNTIMES = ("auto", "torch", "onnx")  # what runs the backbones' networks (imgsent.onnxrunner)
DECODES = ("workers", "device")  # JPEGs decoded by Pillow in the decoding processes, or on the run's device
DEFAULT_BATCH_SIZE = 64
CPU_MODEL_BATCH = 8  # images per forward pass on a CPU: small passes keep activations in cache
# Every environment variable imgsent reads, what it sets, and whether Ray workers need it (Ray
# forwards exactly these, with the hubs' caches: imgsent.distributed.forwarded_env).
ENV = {
    "IMGSENT_HOME": ("imgsent's cache: weights, frozen and ONNX graphs, plans (default ~/.cache/imgsent)", True),
    "IMGSENT_MODELS": ("a folder where models look for the files their backbones read", True),
    "IMGSENT_WEIGHTS": ("a weights file for the backbone that needs one (offline MobileNetV2...)", True),
    "IMGSENT_DOWNLOAD_TIMEOUT": ("seconds a weights download may go without receiving anything", True),
    "IMGSENT_DEVICE_DECODER": ("the JPEG decoder of --decode device", True),
    "IMGSENT_URL_CONCURRENCY": ("URLs of a batch downloaded side by side", True),
    "IMGSENT_URL_CONNECT_TIMEOUT": ("seconds to connect to a URL's host", True),
    "IMGSENT_URL_READ_TIMEOUT": ("seconds a URL may go without sending", True),
    "IMGSENT_URL_RETRIES": ("retries of a URL that fails", True),
    "IMGSENT_URL_MAX_BYTES": ("the largest image a URL may send", True),
    "IMGSENT_NO_LIGHT": ("1: never score without torch (imgsent.ortengine)", True),
    "IMGSENT_PROGRESS_EVERY": ("seconds between progress lines in logs", False),
    "IMGSENT_RAY_START_TIMEOUT": ("seconds a Ray run waits with no worker able to start", False),
    "IMGSENT_DEBUG": ("1: tracebacks instead of one-line errors", False),
}

# The vocabularies the CLI offers as choices and the library checks: one copy each.
HEAD_NAMES = ("nn", "moe", "moe1", "moe2")  # moe = moe1 unless a schedule is given
FEATURE_DTYPES = ("float32", "float16")  # how a store keeps features
PROTOCOLS = ("random-splits", "kfold", "predefined", "train-val-test")
OUTPUT_FORMATS = ("parquet", "csv", "tsv", "jsonl")  # score's one-file outputs
CALIBRATION_METHODS = ("auto", "platt", "isotonic", "temperature")
STRATEGIES = ("mix", "random", "active")  # which image the labelling page shows next
LABEL_MAPS = ("auto", "polarity", "none")  # how label names are mapped to classes
DEFAULT_ROWS_PER_SHARD = 10_000


def parse_shard(spec: str | tuple[int, int] | None) -> tuple[int, int] | None:
    """``I/N`` (0 <= I < N) -> (I, N); ``None`` or ``""`` means all inputs."""
    if spec is None or spec == "":
        return None
    if isinstance(spec, tuple):
        index, count = spec
    else:
        try:
            i_str, n_str = spec.split("/")
            index, count = int(i_str), int(n_str)
        except ValueError:
            raise ImgsentError(f"shard must look like I/N (for example 0/4), got {spec!r}") from None
    if count < 1 or not 0 <= index < count:
        raise ImgsentError(f"shard {index}/{count}: need 0 <= I < N")
    return int(index), int(count)


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ImgsentError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
    return value


@dataclass(frozen=True)
class RunOptions:
    """Everything about *how* a run goes (not *what* it computes: backbones, model, outputs).

    Inputs: ``null`` (NUL-separated lists), ``include_hidden``, ``shard`` (``I/N`` of a job array),
    ``image_column`` / ``id_column`` (Parquet inputs: the column holding the images, and their ids),
    ``keep_columns`` (score: fields of tar shards' ``KEY.json`` / other Parquet columns to carry into
    the score rows; ``*`` for all), ``keep_images`` (a folder where downloaded URL images are saved).
    Engine: ``device`` (auto, cpu, cuda, cuda:N, mps), ``precision`` (:data:`PRECISIONS`; ``auto``:
    float32 on CPU, bf16 autocast on CUDA cards with bf16 tensor cores, else fp16; ``fp32`` on CUDA
    turns TF32 off, ``tf32`` allows it), ``batch_size`` (None: 64, or 256 on CUDA), ``workers``
    (decoding processes; None = cores - 1), ``decode`` (``workers``: Pillow in those processes;
    ``device``: JPEGs decoded on the run's device, nvJPEG on CUDA, see :mod:`imgsent.devicedecode`),
    ``compile``, ``runtime`` (``auto``: ONNX Runtime on a CPU for every backbone whose network
    exports and checks out, torch otherwise; ``torch``; ``onnx``: ONNX Runtime wherever a network
    exports, failing with one line where one that should does not; see :mod:`imgsent.onnxrunner`), ``tta``,
    ``max_pixels``; ``engine`` (local or ray) with ``ray_address``, ``ray_workers``,
    ``gpus_per_worker``. Outputs: ``overwrite``, ``rows_per_shard``. ``progress``: progress and
    summaries on stderr.
    """

    device: str = "auto"
    precision: str = "auto"
    batch_size: int | None = None
    workers: int | None = None
    decode: str = "workers"
    compile: bool = False
    runtime: str = "auto"
    tta: str = "none"
    max_pixels: int = DEFAULT_MAX_PIXELS
    engine: str = "local"
    ray_address: str | None = None
    ray_workers: int | None = None
    gpus_per_worker: float = 0.0
    shard: tuple[int, int] | str | None = None
    overwrite: bool = False
    rows_per_shard: int = DEFAULT_ROWS_PER_SHARD
    null: bool = False
    include_hidden: bool = False
    image_column: str | None = None
    id_column: str | None = None
    keep_columns: tuple[str, ...] = ()
    keep_images: str | None = None
    progress: bool = False

    @classmethod
    def build(cls, options: RunOptions | None = None, **overrides) -> RunOptions:
        """``options`` (or the defaults) with ``overrides`` applied, validated. An unknown
        override raises ``TypeError`` naming it, as a misspelt keyword argument would."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise TypeError(f"unknown run option(s): {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        base = options if options is not None else cls()
        return dataclasses.replace(base, **overrides).validated()

    def validated(self) -> RunOptions:
        check_choice("precision", self.precision, PRECISIONS)
        check_choice("tta", self.tta, TTA_MODES)
        check_choice("engine", self.engine, ENGINES)
        check_choice("decode", self.decode, DECODES)
        check_choice("runtime", self.runtime, RUNTIMES)
        if self.decode == "device" and self.engine == "ray":
            raise ImgsentError("decode=device runs with the local engine only (Ray decodes in its own tasks)")
        for name, low in (("batch_size", 1), ("max_pixels", 1), ("rows_per_shard", 1)):
            if getattr(self, name) is not None and getattr(self, name) < low:
                raise ImgsentError(f"{name} must be >= {low}, got {getattr(self, name)}")
        if self.workers is not None and self.workers < 0:
            raise ImgsentError(f"workers must be >= 0, got {self.workers}")
        if self.ray_workers is not None and self.ray_workers < 1:
            raise ImgsentError(f"--ray-workers must be >= 1, got {self.ray_workers}")
        if self.gpus_per_worker < 0:
            raise ImgsentError(f"--gpus-per-worker must be >= 0, got {self.gpus_per_worker}")
        if self.keep_images is not None:
            import os

            if not os.path.isdir(self.keep_images):
                raise ImgsentError(f"--keep-images {self.keep_images}: no such folder (create it first)")
        shard = parse_shard(self.shard)
        keep = tuple(c.strip() for item in self.keep_columns for c in item.split(",") if c.strip())
        if shard == self.shard and keep == self.keep_columns:
            return self
        return dataclasses.replace(self, shard=shard, keep_columns=keep)


def head_precision(precision: str) -> str:
    """The head's precision for a run's ``precision``: bf16 when asked for, float32 otherwise
    (the head is tiny next to the backbones; fp16 autocast has no fast CPU kernels)."""
    return "bf16" if check_choice("precision", precision, PRECISIONS) == "bf16" else "fp32"
