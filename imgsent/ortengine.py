"""The engine without torch: a warm ``score`` whose backbones all run on ONNX Runtime.

The first ``score`` of a model on a CPU runs the torch engine (:class:`imgsent.engine.FeatureEngine`),
which exports each network to ONNX, checks it against torch and caches it
(:mod:`imgsent.onnxrunner`). When every backbone of the model then runs on ONNX Runtime (a
network, or a detector view whose detector and crop classifier both do), it also writes a *plan*:
the cached graphs (path, sha256, pass size) and what runs around them (preprocessing, a face
detector's resize, thresholds and NMS, a regions view's crops), in ``$IMGSENT_HOME/onnx/plans/``,
keyed by the model's name, version and recipes, the TTA, the pass size, and the imgsent,
onnxruntime and torch versions. A later ``score`` of that model finds the plan and runs it here:
Pillow decodes (:func:`imgsent.decode.decode_refs`, as everywhere), numpy normalises and does the
post-processing, ONNX Runtime runs the graphs, the head runs in numpy
(:class:`imgsent.bundles.NumpyModel`); torch, torchvision and timm are never imported. A graph
whose file no longer has the sha256 the plan recorded (the file it was checked as) sends the run
back to the torch engine, which checks and exports again.

Same numbers as the torch engine on ONNX Runtime: the same graphs on the same pixels, fixed passes
of ``batch`` images (the last one padded), crops resized with torch's antialiased kernels
(:func:`resize_weights`); scores agree within 1e-5 (tested on the default model). One lane per core, each
decoding its batch and running it, every session single-threaded, as the torch engine's lanes do.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import sys
from collections.abc import Iterator, Sequence

import numpy as np

from .batches import FailureCount, FeatureBatch, decoded_batch, group_batches
from .decode import Preprocess, decode_refs
from .decodepool import available_cores
from .errors import ImgsentError
from .inputs import ImageRef
from .lanes import remembered
from .specs import cache_dir

PLAN_FORMAT = 1
MEMO_SIZE = 4096  # detections kept per thread (as imgsent.objects keeps them)
ACCELERATOR_DEVICES = ("/dev/nvidiactl", "/dev/nvidia0", "/dev/kfd", "/dev/dxg")  # CUDA, ROCm, WSL's GPU


def session(path: str):
    """An ONNX Runtime session on the CPU with one intra-op thread (imgsent's lanes: no pool waits
    on a busy machine); every lane calls it from its own thread."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def _installed(package: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "none"


def plan_key(name: str, version: str, blocks, recipes: list[dict], tta: str, batch: int) -> str:
    """The key of a model's plan (see the module docstring); the same on both sides."""
    from . import __version__

    what = {
        "format": PLAN_FORMAT,
        "model": [name, version],
        "blocks": [[k, int(d)] for k, d in blocks],
        "recipes": recipes,
        "tta": tta,
        "batch": batch,
        "imgsent": __version__,
        "onnxruntime": _installed("onnxruntime"),
        "torch": _installed("torch"),
    }
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:32]


def plan_path(key: str) -> str:
    return os.path.join(cache_dir(), "onnx", "plans", f"{key}.json")


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_plan(key: str, backbones: list[dict], tta: str, batch: int) -> str:
    """Record a plan (written by the torch side once its runners are checked)."""
    from .atomicio import write_json_atomic

    for entry in backbones:
        for graph in _graphs(entry):
            graph["sha256"] = file_sha256(graph["file"])
    path = plan_path(key)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_json_atomic(path, {"format": PLAN_FORMAT, "tta": tta, "batch": batch, "backbones": backbones})
    return path


def _graphs(entry: dict) -> list[dict]:
    out = [entry["graph"]] if "graph" in entry else []
    if "detector" in entry:
        out.append(entry["detector"]["graph"])
    if "inner" in entry:
        out.append(entry["inner"]["graph"])
    return out


def read_plan(key: str) -> dict | None:
    """The plan of ``key`` if there is one whose every graph is still the file it was checked as."""
    try:
        with open(plan_path(key), encoding="utf-8") as fh:
            plan = json.load(fh)
        if plan.get("format") != PLAN_FORMAT:
            return None
        for entry in plan["backbones"]:
            for graph in _graphs(entry):
                if file_sha256(graph["file"]) != graph["sha256"]:
                    return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return plan


def no_accelerator() -> bool:
    """Whether ``--device auto`` means the CPU here, told without torch: no CUDA, ROCm or WSL GPU
    device file, not an Apple-silicon Mac (MPS). Conservative: when in doubt, torch decides."""
    import platform

    if sys.platform == "darwin" and platform.machine() == "arm64":
        return False
    return not any(os.path.exists(d) for d in ACCELERATOR_DEVICES)


# --- resizing as torch does it ------------------------------------------------------------------


def _bicubic(x: np.ndarray) -> np.ndarray:
    a = np.float32(-0.5)
    x = np.abs(x)
    return np.where(x < 1, ((a + 2) * x - (a + 3)) * x * x + 1, np.where(x < 2, (((x - 5) * x + 8) * x - 4) * a, 0.0))


def _triangle(x: np.ndarray) -> np.ndarray:
    return np.maximum(1.0 - np.abs(x), 0.0)


@functools.lru_cache(maxsize=1024)
def resize_weights(n_in: int, n_out: int, mode: str, antialias: bool) -> np.ndarray:
    """(n_out, n_in) float32 weights of torch's ``F.interpolate`` along one axis
    (``align_corners=False``): ``antialias=True`` (bilinear or bicubic, PIL's filters, as
    torch computes them) or plain bilinear. Cached: do not modify the array returned."""
    w = np.zeros((n_out, n_in), dtype=np.float32)
    f32 = np.float32
    if antialias:  # in float32 throughout, as torch's kernel computes them (identical weights)
        scale = f32(n_in) / f32(n_out)
        interp = 4 if mode == "bicubic" else 2
        support = f32(interp * 0.5) * scale if scale >= 1.0 else f32(interp * 0.5)
        invscale = f32(1.0) / scale if scale >= 1.0 else f32(1.0)
        filt = _bicubic if mode == "bicubic" else _triangle
        for i in range(n_out):
            center = scale * (f32(i) + f32(0.5))
            lo = max(int(center - support + f32(0.5)), 0)
            hi = min(int(center + support + f32(0.5)), n_in)
            taps = filt((np.arange(lo, hi, dtype=np.float32) - center + f32(0.5)) * invscale).astype(np.float32)
            total = taps.sum(dtype=np.float32)
            w[i, lo:hi] = taps / total if total != 0 else taps
        return w
    if mode != "bilinear":
        raise ValueError(f"plain resizing is bilinear here, not {mode}")
    scale = f32(n_in) / f32(n_out)
    for i in range(n_out):
        src = max(scale * (f32(i) + f32(0.5)) - f32(0.5), f32(0.0))
        i0 = int(src)
        i1 = i0 + (1 if i0 < n_in - 1 else 0)
        frac = src - f32(i0)
        w[i, i0] += f32(1.0) - frac
        w[i, i1] += frac
    return w


def resize(image: np.ndarray, size: tuple[int, int], mode: str = "bilinear", antialias: bool = True) -> np.ndarray:
    """A float32 (C, H, W) image resized to ``size`` (h, w) as ``F.interpolate`` would: width
    first, then height, each output pixel the sum of its few taps in order (no matrix product:
    cheap, single-threaded, and torch's sums)."""
    h, w = image.shape[-2:]
    out = np.asarray(image, dtype=np.float32)
    if w != size[1]:  # scale 1: every weight lands on its own pixel, with or without antialiasing
        out = _along(out, resize_weights(w, size[1], mode, antialias), axis=-1)
    if h != size[0]:
        out = _along(out, resize_weights(h, size[0], mode, antialias), axis=-2)
    return np.ascontiguousarray(out)


def _along(x: np.ndarray, weights: np.ndarray, axis: int) -> np.ndarray:
    """``x`` resampled along ``axis`` by ``weights`` (n_out, n_in), tap by tap."""
    nz = weights != 0
    lo = nz.argmax(axis=1)
    taps = int((weights.shape[1] - nz[:, ::-1].argmax(axis=1) - lo).max())
    n_in = weights.shape[1]
    out = None
    for t in range(taps):
        idx = np.minimum(lo + t, n_in - 1)
        w = np.where(lo + t < n_in, weights[np.arange(len(lo)), idx], 0).astype(np.float32)
        shape = [1] * x.ndim
        shape[axis] = len(lo)
        term = np.take(x, idx, axis=axis) * w.reshape(shape)
        out = term if out is None else out + term
    return out


# --- the parts a plan runs --------------------------------------------------------------------------


class _Graph:
    """A checked graph's session, for passes of exactly ``batch`` inputs (the last one padded)."""

    def __init__(self, spec: dict):
        self.session = session(spec["file"])
        self.batch = int(spec["batch"])
        self.input = self.session.get_inputs()[0].name

    def __call__(self, x: np.ndarray) -> list[np.ndarray]:
        return self.session.run(None, {self.input: np.ascontiguousarray(x, dtype=np.float32)})

    def passes(self, x: np.ndarray, output: str = "features") -> np.ndarray:
        """(n, ...) normalised inputs -> (n, D) outputs, pass by pass; ``probs``: softmax after."""
        outs = []
        for s in range(0, len(x), self.batch):
            part = x[s : s + self.batch]
            m = len(part)
            if m < self.batch:
                part = np.concatenate([part, np.zeros((self.batch - m, *part.shape[1:]), dtype=np.float32)])
            y = self(part)[0].reshape(self.batch, -1)[:m]
            if output == "probs":
                e = np.exp(y - y.max(axis=1, keepdims=True))
                y = e / e.sum(axis=1, keepdims=True)
            outs.append(y.astype(np.float32))
        return outs[0] if len(outs) == 1 else np.concatenate(outs)


def normalized(pixels: np.ndarray, pp: Preprocess) -> np.ndarray:
    """uint8 (n, 3, H, W) -> float32 normalised, with the torch engine's operations and order."""
    mean = (np.asarray(pp.mean, dtype=np.float32) * np.float32(255.0)).reshape(1, 3, 1, 1)
    std = (np.asarray(pp.std, dtype=np.float32) * np.float32(255.0)).reshape(1, 3, 1, 1)
    return (pixels.astype(np.float32) - mean) / std


class _Network:
    def __init__(self, entry: dict):
        self.graph = _Graph(entry["graph"])
        self.output = entry.get("output", "features")

    def __call__(self, x: np.ndarray, pp: Preprocess, detections=None) -> np.ndarray:
        return self.graph.passes(normalized(x, pp), self.output)


class FaceDetector:
    """:class:`imgsent.faces.RFBFaceDetector` behind :class:`imgsent.objects.Detector`, in numpy
    around its graph: the view at the detector's size, squashed to width x height, ``(x*255 - 127) /
    128``, face probabilities and boxes from the graph, > threshold, NMS, the top ones."""

    def __init__(self, spec: dict):
        self.graph = _Graph(spec["graph"])
        self.size, self.width, self.height = int(spec["size"]), int(spec["width"]), int(spec["height"])
        self.threshold, self.iou, self.top = float(spec["threshold"]), float(spec["iou"]), int(spec["top"])

    def detect_all(self, images: np.ndarray) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """:meth:`detect` of each image, remembered per thread by the image's exact bytes (the
        objects and regions views of one detector run it once per image, as the torch side does)."""
        out = []
        for image in images:
            key = (id(self), hashlib.blake2b(np.ascontiguousarray(image).tobytes(), digest_size=16).digest())
            out.append(remembered("face detections", key, functools.partial(self.detect, image), MEMO_SIZE))
        return out

    def detect(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """A (3, S, S) float image in [0, 1] -> boxes (N, 4) in its pixels, labels (N,), scores (N,)."""
        side = image.shape[-1]
        small = image if side == self.size else resize(image, (self.size, self.size), "bilinear", True)
        h, w = small.shape[-2:]
        y = resize(small * np.float32(255.0), (self.height, self.width), "bilinear", antialias=False)
        y = (y - np.float32(127.0)) / np.float32(128.0)
        conf, boxes = self.graph(y[None])
        scores, boxes = conf[0], boxes[0]
        keep = scores > self.threshold
        b = np.clip(boxes[keep], 0.0, 1.0) * np.asarray([w, h, w, h], dtype=np.float32)
        s = scores[keep]
        idx = nms(b, s, self.iou)[: self.top]
        scale = np.float32(side / self.size)
        return b[idx] * scale, np.ones(len(idx), dtype=np.int64), s[idx]


def nms(boxes: np.ndarray, scores: np.ndarray, iou: float) -> np.ndarray:
    """torchvision's ``nms``: indices kept, by decreasing score; a box goes when its IoU with a kept
    one is above ``iou``."""
    order = np.argsort(-scores, kind="stable")
    x1, y1, x2, y2 = (boxes[:, i] for i in range(4))
    areas = (x2 - x1) * (y2 - y1)
    suppressed = np.zeros(len(boxes), dtype=bool)
    keep = []
    for pos, i in enumerate(order):
        if suppressed[i]:
            continue
        keep.append(i)
        rest = order[pos + 1 :]
        ww = np.maximum(np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]), 0)
        hh = np.maximum(np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]), 0)
        inter = ww * hh
        suppressed[rest[inter / (areas[i] + areas[rest] - inter) > iou]] = True
    return np.asarray(keep, dtype=np.int64)


class _Objects:
    """:class:`imgsent.objects.ObjectsView`: per class max score, sum of scores, score-weighted area share."""

    def __init__(self, entry: dict):
        self.classes = int(entry["classes"])

    def __call__(self, x: np.ndarray, pp: Preprocess, detections) -> np.ndarray:
        n, _, h, w = x.shape
        c = self.classes
        feats = np.zeros((n, 3 * c), dtype=np.float32)
        for i, (boxes, labels, scores) in enumerate(detections):
            keep = (labels >= 0) & (labels < c)
            labels, scores, boxes = labels[keep], scores[keep], boxes[keep]
            if len(labels) == 0:
                continue
            area = (np.maximum(boxes[:, 2] - boxes[:, 0], 0) * np.maximum(boxes[:, 3] - boxes[:, 1], 0)) / np.float32(
                h * w
            )
            np.maximum.at(feats[i, :c], labels, scores)
            np.add.at(feats[i, c : 2 * c], labels, scores)
            np.add.at(feats[i, 2 * c :], labels, scores * np.minimum(area, 1))
        return feats


class _Regions:
    """:class:`imgsent.objects.RegionsView`: the score-weighted mean of the crop classifier's
    outputs over the top-k detections scoring at least ``min``."""

    def __init__(self, entry: dict):
        self.inner = _Graph(entry["inner"]["graph"])
        self.inner_output = entry["inner"].get("output", "features")
        self.k, self.min = int(entry["k"]), float(entry["min"])
        self.crop_size = tuple(int(v) for v in entry["crop_size"])
        self.mode = entry["mode"]
        self.mean = np.asarray(entry["mean"], dtype=np.float32).reshape(1, 3, 1, 1)
        self.std = np.asarray(entry["std"], dtype=np.float32).reshape(1, 3, 1, 1)
        self.dim = int(entry["dim"])

    def crop(self, image: np.ndarray, box: np.ndarray) -> np.ndarray:
        side_h, side_w = image.shape[-2:]
        x0, y0, x1, y1 = (float(v) for v in box)
        x0, y0 = min(max(math.floor(x0), 0), side_w - 2), min(max(math.floor(y0), 0), side_h - 2)
        x1, y1 = max(min(math.ceil(x1), side_w), x0 + 2), max(min(math.ceil(y1), side_h), y0 + 2)
        return resize(image[:, y0:y1, x0:x1], self.crop_size, self.mode, antialias=True)

    def __call__(self, x: np.ndarray, pp: Preprocess, detections) -> np.ndarray:
        n = len(x)
        crops, owners, weights = [], [], []
        for i, (boxes, _labels, scores) in enumerate(detections):
            keep = np.flatnonzero(scores >= self.min)
            keep = keep[np.argsort(-scores[keep], kind="stable")][: self.k]
            for j in keep:
                crops.append(self.crop(x[i], boxes[j]))
                owners.append(i)
                weights.append(np.float32(scores[j]))
        out = np.zeros((n, self.dim), dtype=np.float32)
        if not crops:
            return out
        batch = (np.clip(np.stack(crops), 0, 1) - self.mean) / self.std
        feats = self.inner.passes(batch, self.inner_output)
        w = np.asarray(weights, dtype=np.float32)
        idx = np.asarray(owners, dtype=np.int64)
        np.add.at(out, idx, feats * w[:, None])
        total = np.zeros(n, dtype=np.float32)
        np.add.at(total, idx, w)
        return out / np.maximum(total, 1e-12)[:, None]


PARTS = {"network": _Network, "objects": _Objects, "regions": _Regions}


class OrtEngine:
    """An :class:`~imgsent.batches.Engine` that runs a plan (see the module docstring)."""

    numerics = "fp32"
    decoder = None
    device = None  # the head runs on the CPU

    def __init__(self, plan: dict, options, lanes: int | None = None, checked_here: bool = False):
        self.options = options
        self.checked_here = checked_here  # made by the torch engine, which checked the graphs this run
        self.tta = plan["tta"]
        self.entries = plan["backbones"]
        self.batch_size = options.batch_size or _default_batch_size()
        self.preprocesses = [Preprocess.from_dict(e["preprocess"]) for e in self.entries]
        self.parts = [PARTS[e["kind"]](e) for e in self.entries]
        self.detectors: dict[str, FaceDetector] = {}
        for e in self.entries:
            if "detector" in e:
                self.detectors.setdefault(e["detector"]["graph"]["file"], FaceDetector(e["detector"]))
        self.lanes = lanes or available_cores()
        self._failures = FailureCount(len(self.entries))
        self._side_by_side = False

    @property
    def keys(self) -> list[str]:
        return [e["key"] for e in self.entries]

    def runtime_record(self) -> dict[str, str]:
        return {k: "onnx" for k in self.keys}

    def run_details(self) -> dict[str, str]:
        import onnxruntime

        how = "torch loaded to check them" if self.checked_here else "torch not loaded"
        return {"runtime": f"onnxruntime {onnxruntime.__version__}: every backbone (numpy around the graphs; {how})"}

    def run(self, refs: Sequence[ImageRef], groups: Sequence[int] | None = None) -> Iterator[FeatureBatch]:
        """One :class:`~imgsent.batches.FeatureBatch` per batch of ``refs``, in order (no batch
        straddles two ``groups``): decoded by ``workers`` processes (:mod:`imgsent.decodepool`; with
        none, in the lanes), embedded in lanes."""
        from .decodepool import decoded_batches, default_workers
        from .lanes import in_lanes

        if not refs:
            return
        batches = group_batches(len(refs), groups, self.batch_size)
        self.begin(len(refs), len(batches))
        opts = self.options

        def decode_batch(indices: list[int]):
            chosen = [refs[i] for i in indices]
            return decode_refs(chosen, self.preprocesses, self.tta, opts.max_pixels, opts.keep_images)

        workers = default_workers() if opts.workers is None else opts.workers
        if workers == 0:
            yield from in_lanes(lambda indices: self._embed_decoded(decode_batch(indices)), batches, self.lanes)
            return
        decoded = decoded_batches(decode_batch, lambda i: decode_batch([i])[0], refs, batches, workers)
        yield from in_lanes(self._embed_decoded, decoded, self.lanes)

    def begin(self, images: int, batches: int) -> None:
        """A run of ``images`` in ``batches`` starts: a backbone failing on each of its first
        min(8, images) images stops it; a run of one batch embeds its backbones side by side."""
        self._failures.begin(images)
        self._side_by_side = batches == 1 and self.lanes > 1

    def _embed_decoded(self, items) -> FeatureBatch:
        ok = [it for it in items if it.status == "ok"]
        views = {pp.view_key: np.stack([it.views[pp.view_key] for it in ok]) for pp in self.preprocesses} if ok else {}
        return self.embed_items(items, views)

    def embed_items(self, items, views: dict[tuple, np.ndarray]) -> FeatureBatch:
        """The features of a decoded batch: ``items`` (:class:`~imgsent.decode.DecodedImage`) and
        the uint8 views of its good ones, stacked per view key (what the torch engine's decoding
        processes hand over too)."""
        n = len(items)
        ok_pos = [i for i, it in enumerate(items) if it.status == "ok"]
        feats = {e["key"]: np.full((n, int(e["dim"])), np.nan, dtype=np.float32) for e in self.entries}
        failed: dict[int, str] = {}
        if ok_pos:

            def embed(index: int) -> tuple[np.ndarray, dict[int, str]]:
                return self._embed_or_retry(index, views[self.preprocesses[index].view_key])

            from .lanes import in_lanes

            lanes = self.lanes if self._side_by_side else 1
            for entry, (out, bad) in zip(self.entries, in_lanes(embed, range(len(self.entries)), lanes)):
                feats[entry["key"]][ok_pos] = out
                failed.update((ok_pos[j], r) for j, r in bad.items() if ok_pos[j] not in failed)
        return decoded_batch(items, feats, failed)

    def embed(self, index: int, pixels: np.ndarray) -> np.ndarray:
        """Backbone ``index`` on uint8 (n, crops, 3, H, W) -> float32 (n, D), averaged over crops and flips."""
        n, crops = pixels.shape[:2]
        x = pixels.reshape(n * crops, *pixels.shape[2:])
        out = self._forward(index, x)
        if "flip" in self.tta:
            out = (out + self._forward(index, np.ascontiguousarray(x[..., ::-1]))) / 2
        return out.reshape(n, crops, -1).mean(axis=1)

    def _forward(self, index: int, x: np.ndarray) -> np.ndarray:
        entry, pp, part = self.entries[index], self.preprocesses[index], self.parts[index]
        detections = None
        if "detector" in entry:
            image = normalized(x, pp)  # the view in [0, 1]
            detector = self.detectors[entry["detector"]["graph"]["file"]]
            detections = detector.detect_all(image)
            return part(image, pp, detections)
        return part(x, pp, detections)

    def _embed_or_retry(self, index: int, pixels: np.ndarray) -> tuple[np.ndarray, dict[int, str]]:
        entry = self.entries[index]
        return self._failures.embed_or_retry(
            index,
            entry["key"],
            lambda x: self.embed(index, x),
            pixels,
            lambda: np.full((1, int(entry["dim"])), np.nan, dtype=np.float32),
            np.concatenate,
        )


def _default_batch_size() -> int:
    from .options import DEFAULT_BATCH_SIZE

    return DEFAULT_BATCH_SIZE


def light_engine(model: str | None, options, *, needs_torch: str | None = None):
    """(numpy model, :class:`OrtEngine`) for scoring with ``model`` under ``options`` without torch,
    or None when this run needs torch: ``needs_torch`` (a reason the caller has), options that
    choose torch (another engine, device, precision or decoder, ``--compile``, ``--runtime torch``),
    a GPU that ``--device auto`` would take, no onnxruntime, no plan for this model yet, or a graph
    that is no longer the file checked. ``IMGSENT_NO_LIGHT=1`` turns it off."""
    o = options
    if needs_torch or os.environ.get("IMGSENT_NO_LIGHT") == "1":
        return None
    if o.engine != "local" or o.compile or o.runtime == "torch" or o.decode != "workers":
        return None
    if o.precision not in ("auto", "fp32") or o.device not in ("auto", "cpu"):
        return None
    if o.device == "auto" and not no_accelerator():
        return None
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return None
    from .bundles import model_name, numpy_model

    try:
        model_np = numpy_model(model)
    except ImgsentError:
        return None  # the torch side says what is wrong, in its words
    if model_np.numerics != "fp32":
        return None
    from .options import CPU_MODEL_BATCH

    tta = model_np.feature_header.get("tta", "none")
    key = plan_key(
        model_name(model), model_np.version(), model_np.blocks, model_np.bundle.recipes, tta, CPU_MODEL_BATCH
    )
    plan = read_plan(key)
    if plan is None or [e["key"] for e in plan["backbones"]] != [r["key"] for r in model_np.recipes]:
        return None
    return model_np, OrtEngine(plan, o)
