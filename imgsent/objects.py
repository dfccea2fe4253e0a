"""Detector views (the paper's G, from public detectors): what a COCO object detector finds in an
image, as a fixed-length vector.

Detectors: ``imgsent:faces_rfb320`` / ``imgsent:faces_rfb640`` (the face detectors shipped inside
imgsent, see :mod:`imgsent.faces`; each sees the image at its own input size), ``torchscript:PATH`` (a detector taking a list of float RGB (3, H, W) tensors in [0, 1]
and returning boxes / labels / scores, as D2Go's exported models do; it sees the image at 320 x 320)
or ``torchvision:NAME`` (torchvision's detection models: ``fasterrcnn_mobilenet_v3_large_320_fpn``,
``fasterrcnn_resnet50_fpn_v2``, ``retinanet_resnet50_fpn_v2``...; each sees the image at its own
``min_size``; COCO weights downloaded as torchvision does, ``@FILE`` offline, ``--random-weights``
for tests).

Both views read the same uint8 view of the image (all of it, squashed to ``max(512, detector
size)`` square, so the two views of one detector decode once) and share one detector pass per image
(:class:`Detector` keeps the detections of recent inputs, keyed by their exact bytes). One image per
detector call, so an image's vector never depends on the others in its batch.

**Objects view** ``objects:DETECTOR``, for C classes (category ids 0..C-1; ids a detector never
returns stay 0): columns ``[0, C)`` the highest score of each class, ``[C, 2C)`` the sum of its
scores (a soft count), ``[2C, 3C)`` the score-weighted share of the image area its boxes cover
(sum of score x box area / image area). An image with no detection is all zeros. Class names are
recorded in the store header when known (torchvision's weights metadata, or a ``PATH.classes.txt`` /
``NAME.classes.txt`` file beside a TorchScript detector, one name per line for ids 1..).

**Regions view** ``regions:DETECTOR+BACKBONE[+k=K][+min=S]`` (closer to the paper's object graph,
whose nodes are detected objects): the ``k`` highest-scoring detections (default 5) scoring at
least ``min`` (default 0.3), each cropped from the decoded view, resized to BACKBONE's input size
(bilinear or bicubic as BACKBONE's config says, antialiased) and normalised as BACKBONE wants, run
through BACKBONE (any spec, ``:probs`` included), then averaged with the detection scores as
weights. Zeros when nothing passes. Crops go through BACKBONE in passes of exactly
``min(CROP_BATCH, k)`` (the last one padded), so a crop's features do not depend on the others. Paths must not contain
``+``. Example: ``regions:torchscript:d2go.pt+torchvision:mobilenet_v2@mnv2.safetensors+k=3``.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import hashlib
import math
import os

import torch
import torch.nn.functional as F
from torch import nn

from .decode import Preprocess
from .errors import ImgsentError
from .lanes import remembered
from .specs import BackboneSpec
from .switches import unfused

VIEW_MIN = 512  # the shared view's side: crops for the regions view come from it
TORCHSCRIPT_SIZE = 320  # what exported D2Go detectors expect (they rescale to 320 themselves)
COCO_CLASSES = 91  # COCO category ids 0 (background) .. 90
CROP_BATCH = 8  # regions view: at most this many crops per backbone pass (k when smaller), fixed per view
MEMO_SIZE = 4096  # detections kept per thread (a few batches; each entry is a few hundred floats)


@dataclasses.dataclass(frozen=True)
class Detections:
    """One image's detections, boxes (N, 4) x1, y1, x2, y2 in the pixels of the view given."""

    boxes: torch.Tensor
    labels: torch.Tensor
    scores: torch.Tensor


class Detector(nn.Module):
    """A detector behind one call: ``detect(x)`` for a (N, 3, S, S) batch in [0, 1] -> one
    :class:`Detections` per image, boxes in the batch's pixels. The image goes in at ``size``
    (antialiased), one image per call. Results are remembered per thread by the detector's
    weights and the image's exact bytes, so the objects and regions views of one detector (or
    copies of it on other lanes) run it once per image."""

    def __init__(self, module: nn.Module, size: int, identity: str, view: int | None = None):
        super().__init__()
        self.module = module
        self.size = size
        self.identity = identity
        self.view = view or max(VIEW_MIN, size)  # the side of the square view both views decode

    def _run(self, image: torch.Tensor) -> Detections:
        with unfused():  # never fused under another lane's switch (see imgsent.switches.unfused)
            out = self.module([image])
        if isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], list):  # (losses | inputs, detections)
            out = out[1]
        det = out[0]
        return Detections(det["boxes"].float().cpu(), det["labels"].long().cpu(), det["scores"].float().cpu())

    def detect(self, x: torch.Tensor) -> list[Detections]:
        side = x.shape[-1]
        small = x.float()
        if side != self.size:
            small = F.interpolate(small, size=(self.size, self.size), mode="bilinear", antialias=True)
        scale = side / self.size
        out = []
        for i in range(len(x)):
            image = small[i].contiguous()
            key = (self.identity, side, hashlib.blake2b(image.cpu().numpy().tobytes(), digest_size=16).digest())
            out.append(remembered("detections", key, functools.partial(self._scaled, image, scale), MEMO_SIZE))
        return out

    def _scaled(self, image: torch.Tensor, scale: float) -> Detections:
        det = self._run(image)
        return Detections(det.boxes * scale, det.labels, det.scores)


class ObjectsView(nn.Module):
    """(N, 3, S, S) in [0, 1] -> (N, 3 * classes) (see the module docstring)."""

    def __init__(self, detector: Detector, names: list[str] | None):
        super().__init__()
        self.detector = detector
        self.classes = len(names) if names else COCO_CLASSES
        self.names = names or [f"class{k}" for k in range(self.classes)]

    @property
    def columns(self) -> list[str]:
        return [f"{what}:{n}" for what in ("max_score", "sum_score", "area_share") for n in self.names]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        c = self.classes
        feats = torch.zeros((n, 3 * c), dtype=torch.float32)
        for i, det in enumerate(self.detector.detect(x)):
            keep = (det.labels >= 0) & (det.labels < c)
            labels, scores, boxes = det.labels[keep], det.scores[keep], det.boxes[keep]
            if len(labels) == 0:
                continue
            area = ((boxes[:, 2] - boxes[:, 0]).clamp(min=0) * (boxes[:, 3] - boxes[:, 1]).clamp(min=0)) / (h * w)
            feats[i, :c] = torch.zeros(c).scatter_reduce(0, labels, scores, reduce="amax")
            feats[i, c : 2 * c] = torch.zeros(c).index_add(0, labels, scores)
            feats[i, 2 * c :] = torch.zeros(c).index_add(0, labels, scores * area.clamp(max=1))
        return feats.to(x.device)  # with the other backbones on the run's device


class RegionsView(nn.Module):
    """(N, 3, S, S) in [0, 1] -> (N, D): the score-weighted mean of an inner backbone's features
    over the top-``k`` detected object crops (see the module docstring)."""

    columns = None

    def __init__(self, detector: Detector, inner, k: int, min_score: float):
        super().__init__()
        self.detector = detector
        self.inner = inner.module  # registered: moved, fingerprinted and copied with the view
        # the inner spec without its module: its output kind (:probs) and preprocessing; an engine
        # may swap ``inner`` for a traced copy built for ``crop_batch`` crops in ``memory_format``
        self.inner_backbone = dataclasses.replace(inner, module=None)
        self.memory_format = torch.contiguous_format
        self.inner_context = contextlib.nullcontext
        self.dim = inner.dim
        self.k, self.min_score = k, min_score
        self.crop_batch = min(CROP_BATCH, k)  # crops per pass: k=3 needs no pass of 8 (5 of them padding)
        pp = inner.preprocess
        self.crop_size = tuple(pp.input_size)
        self.mode = pp.interpolation if pp.interpolation in ("bilinear", "bicubic") else "bilinear"
        self.register_buffer("mean", torch.tensor(pp.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(pp.std).view(1, 3, 1, 1), persistent=False)

    def with_inner(self, inner: nn.Module, memory_format: torch.memory_format, context=None) -> RegionsView:
        """A copy of this view that shares its detector (exported detectors do not survive a deep
        copy) and runs its crops through ``inner`` (e.g. a traced copy) in ``memory_format``,
        inside ``context()`` (a settings context the traced copy wants, not the detector)."""
        view = copy.copy(self)
        view._modules = dict(self._modules)
        view.inner = inner
        view.memory_format = memory_format
        view.inner_context = context or contextlib.nullcontext
        return view

    def crop(self, image: torch.Tensor, box: torch.Tensor) -> torch.Tensor:
        """One detection's crop of a (3, S, S) image, resized to the inner backbone's input."""
        side_h, side_w = image.shape[-2:]
        x0, y0, x1, y1 = (float(v) for v in box)
        x0, y0 = min(max(math.floor(x0), 0), side_w - 2), min(max(math.floor(y0), 0), side_h - 2)
        x1, y1 = max(min(math.ceil(x1), side_w), x0 + 2), max(min(math.ceil(y1), side_h), y0 + 2)
        part = image[None, :, y0:y1, x0:x1].float()
        return F.interpolate(part, size=self.crop_size, mode=self.mode, antialias=True, align_corners=False)

    def _run_inner(self, part: torch.Tensor) -> torch.Tensor:
        m = len(part)
        if m < self.crop_batch:
            part = torch.cat([part, part.new_zeros((self.crop_batch - m, *part.shape[1:]))])
        part = part.contiguous(memory_format=self.memory_format)
        return self.inner_backbone.run(self.inner, part)[:m].float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = len(x)
        crops, owners, weights = [], [], []
        for i, det in enumerate(self.detector.detect(x)):
            keep = torch.nonzero(det.scores >= self.min_score).flatten()
            keep = keep[torch.argsort(det.scores[keep], descending=True, stable=True)][: self.k]
            for j in keep.tolist():
                crops.append(self.crop(x[i], det.boxes[j]))
                owners.append(i)
                weights.append(float(det.scores[j]))
        out = torch.zeros((n, self.dim), dtype=torch.float32, device=x.device)
        if not crops:
            return out
        batch = (torch.cat(crops).clamp(0, 1) - self.mean) / self.std
        with self.inner_context():
            step = self.crop_batch
            parts = [self._run_inner(batch[s : s + step]) for s in range(0, len(batch), step)]
        feats = torch.cat(parts)
        w = torch.tensor(weights, dtype=torch.float32, device=feats.device)
        idx = torch.tensor(owners, dtype=torch.long, device=feats.device)
        out.index_add_(0, idx, feats * w[:, None])
        total = torch.zeros(n, dtype=torch.float32, device=feats.device).index_add_(0, idx, w)
        return out / total.clamp(min=1e-12)[:, None]


def view_preprocess(detector: Detector) -> Preprocess:
    """The whole image squashed to a square of ``detector.view`` (``max(VIEW_MIN, detector size)``
    unless the detector says otherwise), pixels / 255."""
    side = detector.view
    return Preprocess(input_size=(side, side), resize_size=(side, side), mean=(0.0,) * 3, std=(1.0,) * 3)


def _class_names_file(path: str) -> str | None:
    for candidate in (path + ".classes.txt", os.path.splitext(path)[0] + ".classes.txt"):
        if os.path.isfile(candidate):
            return candidate
    return None


def load_detector(spec: BackboneSpec, random_weights: bool) -> tuple[Detector, list[str] | None, str, bool]:
    """(detector, class names for ids 0.., weights source, quantized) for a view's detector (the
    ``detector`` of its parsed spec: ``imgsent:NAME``, ``torchscript:PATH`` or ``torchvision:NAME[@FILE]``)."""
    from .weights import state_dict_sha256

    kind, rest, weights = spec.source, spec.name, spec.weights
    name = str(spec)
    if kind == "imgsent":
        from . import faces

        if rest not in faces.DETECTORS:
            raise ImgsentError(f"detector {name!r}: imgsent ships the detectors {', '.join(faces.DETECTORS)}")
        module, source = faces.load(rest, random_weights)
        # the view at the detector's own width: no second resize before it, and faces big enough to
        # score >= 0.9 are big enough in it for a 112 x 112 crop (bench/results/default_model_v3.json)
        detector = Detector(module, module.width, state_dict_sha256(module), view=module.width)
        return detector, list(faces.CLASS_NAMES), source, False
    if kind == "torchscript":
        import torchvision  # noqa: F401  (registers torchvision::nms, which exported detectors call)

        from .weights import load_torchscript_file

        module = load_torchscript_file(rest, "TorchScript detector")
        names_file = _class_names_file(rest)
        names = None
        if names_file:
            with open(names_file, encoding="utf-8") as fh:
                names = ["__background__"] + [ln.strip() for ln in fh if ln.strip()]
        quantized = any("quantized" in str(n.kind()) for n in module.inlined_graph.nodes())
        return Detector(module, TORCHSCRIPT_SIZE, state_dict_sha256(module)), names, rest, quantized
    import torchvision.models as tvm

    try:
        enum = tvm.get_model_weights(rest)
    except Exception:
        raise ImgsentError(f"torchvision has no detection model named {rest!r}") from None
    entry = enum.DEFAULT
    names = list(entry.meta.get("categories", [])) or None
    if random_weights or weights:
        module = tvm.get_model(rest, weights=None, weights_backbone=None, num_classes=len(names or []) or 91)
        if weights:
            from .weights import load_state_dict_file

            module.load_state_dict(load_state_dict_file(weights))
        source = weights or "random (seeded)"
    else:
        try:
            module = tvm.get_model(rest, weights=entry)
        except Exception as exc:
            raise ImgsentError(
                f"cannot get COCO weights for {rest} ({type(exc).__name__}); offline, give torchvision:{rest}@FILE"
            ) from None
        source = f"torchvision {entry} (torch hub cache)"
    module.eval()
    size = int(getattr(getattr(module, "transform", None), "min_size", (800,))[0])
    return Detector(module, size, state_dict_sha256(module)), names, source, False
