"""The objects view (the paper's G, from public detectors): what a COCO object detector finds in an
image, as a fixed-length vector.

Spec: ``objects:torchscript:PATH`` (a detector taking a list of float RGB (3, H, W) tensors in [0, 1]
and returning boxes / labels / scores, as D2Go's exported models do) or ``objects:torchvision:NAME``
(torchvision's detection models: ``fasterrcnn_mobilenet_v3_large_320_fpn``,
``fasterrcnn_resnet50_fpn_v2``, ``retinanet_resnet50_fpn_v2``...; COCO weights downloaded as
torchvision does, ``@FILE`` offline, ``--random-weights`` for tests).

Layout, for C classes (category ids 0..C-1; ids a detector never returns stay 0): columns
``[0, C)`` the highest score of each class, ``[C, 2C)`` the sum of its scores (a soft count),
``[2C, 3C)`` the score-weighted share of the image area its boxes cover (sum of score x box area /
image area). An image with no detection is all zeros. The detector sees the decoded image resized to
``SIZE`` x ``SIZE`` (all of it, aspect squashed), one image per call, so an image's vector never
depends on the others in its batch. Class names are recorded in the store header when known
(torchvision's weights metadata, or a ``PATH.classes.txt`` / ``NAME.classes.txt`` file beside a
TorchScript detector, one name per line for ids 1..).
"""

from __future__ import annotations

import os

import torch
from torch import nn

from .decode import Preprocess
from .errors import ImgsentError

SIZE = 320  # the detector input: D2Go rescales to 320 itself; torchvision's 320 models too
COCO_CLASSES = 91  # COCO category ids 0 (background) .. 90


class ObjectsView(nn.Module):
    """Wraps a detector: (N, 3, H, W) in [0, 1] -> (N, 3 * classes) (see the module docstring)."""

    def __init__(self, detector: nn.Module, classes: int):
        super().__init__()
        self.detector = detector
        self.classes = classes

    def _detect(self, image: torch.Tensor) -> dict:
        out = self.detector([image])
        if isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], list):  # (losses | inputs, detections)
            out = out[1]
        return out[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        c = self.classes
        feats = torch.zeros((n, 3 * c), dtype=torch.float32)
        for i in range(n):
            det = self._detect(x[i].float().contiguous())
            labels = det["labels"].long().cpu()
            scores = det["scores"].float().cpu()
            boxes = det["boxes"].float().cpu()
            keep = (labels >= 0) & (labels < c)
            labels, scores, boxes = labels[keep], scores[keep], boxes[keep]
            if len(labels) == 0:
                continue
            area = ((boxes[:, 2] - boxes[:, 0]).clamp(min=0) * (boxes[:, 3] - boxes[:, 1]).clamp(min=0)) / (h * w)
            feats[i, :c] = torch.zeros(c).scatter_reduce(0, labels, scores, reduce="amax")
            feats[i, c : 2 * c] = torch.zeros(c).index_add(0, labels, scores)
            feats[i, 2 * c :] = torch.zeros(c).index_add(0, labels, scores * area.clamp(max=1))
        return feats


def preprocess() -> Preprocess:
    """The whole image squashed to SIZE x SIZE, pixels / 255 (detectors normalise themselves)."""
    return Preprocess(input_size=(SIZE, SIZE), resize_size=(SIZE, SIZE), mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


def _class_names_file(path: str) -> str | None:
    for candidate in (path + ".classes.txt", os.path.splitext(path)[0] + ".classes.txt"):
        if os.path.isfile(candidate):
            return candidate
    return None


def load_detector(
    name: str, weights: str | None, random_weights: bool
) -> tuple[nn.Module, list[str] | None, str, bool]:
    """(detector, class names for ids 0.., weights source, cpu_only) for ``torchscript:PATH`` or
    ``torchvision:NAME``."""
    kind, sep, rest = name.partition(":")
    if not sep or kind not in ("torchscript", "torchvision") or not rest:
        raise ImgsentError(f"objects:{name}: give objects:torchscript:PATH or objects:torchvision:NAME")
    if kind == "torchscript":
        import torchvision  # noqa: F401  (registers torchvision::nms, which exported detectors call)

        from .backbones import load_torchscript_file

        module = load_torchscript_file(rest, "TorchScript detector")
        names_file = _class_names_file(rest)
        names = None
        if names_file:
            with open(names_file, encoding="utf-8") as fh:
                names = ["__background__"] + [ln.strip() for ln in fh if ln.strip()]
        quantized = any("quantized" in str(n.kind()) for n in module.inlined_graph.nodes())
        return module, names, rest, quantized
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
                f"cannot get COCO weights for {rest} ({type(exc).__name__}); offline, give objects:torchvision:{rest}@FILE"
            ) from None
        source = f"torchvision {entry} (torch hub cache)"
    return module.eval(), names, source, False
