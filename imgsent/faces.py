"""The face networks shipped inside imgsent (``imgsent/face_models/``, MIT-licensed upstream weights,
converted by ``bench/convert_face_nets.py``), rebuilt here in plain torch:

* ``faces_rfb320`` / ``faces_rfb640``: the Ultra-Light-Fast-Generic-Face-Detector-1MB (Linzaer, MIT;
  ``version-RFB-320`` / ``-640``, trained on WIDER FACE), an SSD over a tiny MobileNet with an RFB
  block. It takes the image squashed to 320 x 240 (640 x 480), pixels ``(x - 127) / 128``; priors,
  box decoding and NMS (IoU 0.3) as upstream's predictor does them; detections scoring above 0.3 are
  returned, at most 50. Same call as D2Go's exported detectors (:class:`imgsent.objects.Detector`).
* ``face_expression``: face-api.js's FaceExpressionNet (Vincent Mühler, MIT): four dense blocks of
  depthwise-separable convolutions on a 112 x 112 face, 7 expression probabilities (neutral, happy,
  sad, angry, fearful, disgusted, surprised) followed by the 256-d pooled embedding (263 values).
  TF's ``same`` padding is asymmetric for stride 2 (nothing before, one pixel after): kept exactly.

Spec names: ``imgsent:face_expression`` (a backbone) and ``imgsent:faces_rfb320`` (a detector, in
``objects:`` and ``regions:`` views). With ``random_weights`` they are the same networks, seeded.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .decode import Preprocess
from .errors import ImgsentError
from .shipped import FACE_FOLDER as FOLDER
from .shipped import (
    SOURCES_FILE,  # noqa: F401  (imported from here too)
    shipped_in,  # noqa: F401  (imported from here too)
)
from .shipped import describe_face as describe  # noqa: F401  (imported from here too)
from .shipped import face_sources as sources  # noqa: F401  (imported from here too)

EXPRESSIONS = ("neutral", "happy", "sad", "angry", "fearful", "disgusted", "surprised")
EXPRESSION_MEAN_RGB = (122.782, 117.001, 104.298)  # face-api.js's normalisation, in 0..255 pixels


# --- the face detector ---------------------------------------------------------------------------


def _conv_bn(inp: int, oup: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(inp, oup, 3, stride, 1, bias=False), nn.BatchNorm2d(oup), nn.ReLU(inplace=True))


def _conv_dw(inp: int, oup: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(inp, inp, 3, stride, 1, groups=inp, bias=False),
        nn.BatchNorm2d(inp),
        nn.ReLU(inplace=True),
        nn.Conv2d(inp, oup, 1, 1, 0, bias=False),
        nn.BatchNorm2d(oup),
        nn.ReLU(inplace=True),
    )


class _BasicConv(nn.Module):
    def __init__(
        self, inp: int, oup: int, kernel: int, stride: int = 1, padding: int = 0, dilation: int = 1, relu=True
    ):
        super().__init__()
        self.conv = nn.Conv2d(inp, oup, kernel, stride, padding, dilation=dilation, bias=False)
        self.bn = nn.BatchNorm2d(oup, eps=1e-5, momentum=0.01, affine=True)
        self.relu = nn.ReLU(inplace=True) if relu else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.conv(x))
        return self.relu(x) if self.relu is not None else x


class _BasicRFB(nn.Module):
    def __init__(self, inp: int, oup: int, scale: float = 1.0, map_reduce: int = 8, vision: int = 1):
        super().__init__()
        self.scale = scale
        m = inp // map_reduce
        self.branch0 = nn.Sequential(
            _BasicConv(inp, m, 1, relu=False),
            _BasicConv(m, 2 * m, 3, padding=1),
            _BasicConv(2 * m, 2 * m, 3, padding=vision + 1, dilation=vision + 1, relu=False),
        )
        self.branch1 = nn.Sequential(
            _BasicConv(inp, m, 1, relu=False),
            _BasicConv(m, 2 * m, 3, padding=1),
            _BasicConv(2 * m, 2 * m, 3, padding=vision + 2, dilation=vision + 2, relu=False),
        )
        self.branch2 = nn.Sequential(
            _BasicConv(inp, m, 1, relu=False),
            _BasicConv(m, (m // 2) * 3, 3, padding=1),
            _BasicConv((m // 2) * 3, 2 * m, 3, padding=1),
            _BasicConv(2 * m, 2 * m, 3, padding=vision + 4, dilation=vision + 4, relu=False),
        )
        self.ConvLinear = _BasicConv(6 * m, oup, 1, relu=False)
        self.shortcut = _BasicConv(inp, oup, 1, relu=False)
        self.relu = nn.ReLU(inplace=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.cat((self.branch0(x), self.branch1(x), self.branch2(x)), 1)
        return self.relu(self.ConvLinear(out) * self.scale + self.shortcut(x))


def _separable(inp: int, oup: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(inp, inp, 3, padding=1, groups=inp), nn.ReLU(), nn.Conv2d(inp, oup, kernel_size=1))


MIN_BOXES = ((10, 16, 24), (32, 48), (64, 96), (128, 192, 256))
SHRINK = (8, 16, 32, 64)
CENTER_VARIANCE, SIZE_VARIANCE = 0.1, 0.2


def _priors(width: int, height: int) -> torch.Tensor:
    """Upstream's SSD priors (cx, cy, w, h in [0, 1]) for a width x height input."""
    rows = []
    for boxes, shrink in zip(MIN_BOXES, SHRINK):
        fw, fh = math.ceil(width / shrink), math.ceil(height / shrink)
        for j in range(fh):
            for i in range(fw):
                for b in boxes:
                    rows.append([(i + 0.5) / fw, (j + 0.5) / fh, b / width, b / height])
    return torch.tensor(rows, dtype=torch.float32).clamp(0.0, 1.0)


class RFBFaceDetector(nn.Module):
    """Ultra-Light-Fast-Generic-Face-Detector-1MB (RFB version) with its post-processing: a list with
    one float RGB (3, H, W) image in [0, 1] -> ``(inputs, [{"boxes", "labels", "scores"}])``, boxes
    x1, y1, x2, y2 in the input's pixels, label 1 = face (the call D2Go's exported detectors take)."""

    def __init__(self, width: int = 320, height: int = 240, threshold: float = 0.3, iou: float = 0.3, top: int = 50):
        super().__init__()
        c = 16
        self.width, self.height, self.threshold, self.iou, self.top = width, height, threshold, iou, top
        self.base_net = nn.Sequential(
            _conv_bn(3, c, 2),
            _conv_dw(c, c * 2, 1),
            _conv_dw(c * 2, c * 2, 2),
            _conv_dw(c * 2, c * 2, 1),
            _conv_dw(c * 2, c * 4, 2),
            _conv_dw(c * 4, c * 4, 1),
            _conv_dw(c * 4, c * 4, 1),
            _BasicRFB(c * 4, c * 4, scale=1.0),
            _conv_dw(c * 4, c * 8, 2),
            _conv_dw(c * 8, c * 8, 1),
            _conv_dw(c * 8, c * 8, 1),
            _conv_dw(c * 8, c * 16, 2),
            _conv_dw(c * 16, c * 16, 1),
        )
        self.sources = (8, 11, 13)  # base_net layers whose outputs feed a header
        self.extras = nn.ModuleList(
            [
                nn.Sequential(
                    nn.Conv2d(c * 16, c * 4, kernel_size=1),
                    nn.ReLU(),
                    nn.Sequential(
                        nn.Conv2d(c * 4, c * 4, 3, stride=2, padding=1, groups=c * 4),
                        nn.ReLU(),
                        nn.Conv2d(c * 4, c * 16, kernel_size=1),
                    ),
                    nn.ReLU(),
                )
            ]
        )
        chans, anchors = (c * 4, c * 8, c * 16), (3, 2, 2)
        self.regression_headers = nn.ModuleList(
            [_separable(ch, a * 4) for ch, a in zip(chans, anchors)] + [nn.Conv2d(c * 16, 3 * 4, 3, padding=1)]
        )
        self.classification_headers = nn.ModuleList(
            [_separable(ch, a * 2) for ch, a in zip(chans, anchors)] + [nn.Conv2d(c * 16, 3 * 2, 3, padding=1)]
        )
        self.register_buffer("priors", _priors(width, height), persistent=False)
        self.network = None  # a runner of ``raw`` on another runtime (imgsent.onnxrunner.prepare_view)

    def exportable(self) -> tuple[nn.Module, torch.Tensor]:
        """``raw`` as a module of its own and an input of the one shape it gets: what another
        runtime exports (the priors, thresholds and NMS stay here)."""
        return _Raw(self), torch.zeros(1, 3, self.height, self.width)

    def raw(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, 3, height, width) normalised -> (face probability (N, P), boxes (N, P, 4) in [0, 1])."""
        confidences, locations = [], []
        start, header = 0, 0
        for end in self.sources:
            for layer in self.base_net[start:end]:
                x = layer(x)
            start = end
            confidences.append(self._header(self.classification_headers[header], x, 2))
            locations.append(self._header(self.regression_headers[header], x, 4))
            header += 1
        for layer in self.base_net[start:]:
            x = layer(x)
        for layer in self.extras:
            x = layer(x)
            confidences.append(self._header(self.classification_headers[header], x, 2))
            locations.append(self._header(self.regression_headers[header], x, 4))
            header += 1
        conf = torch.softmax(torch.cat(confidences, 1), dim=2)[..., 1]
        loc = torch.cat(locations, 1)
        p = self.priors[None]
        centre = loc[..., :2] * CENTER_VARIANCE * p[..., 2:] + p[..., :2]
        size = torch.exp(loc[..., 2:] * SIZE_VARIANCE) * p[..., 2:]
        return conf, torch.cat([centre - size / 2, centre + size / 2], dim=-1)

    @staticmethod
    def _header(head: nn.Module, x: torch.Tensor, width: int) -> torch.Tensor:
        out = head(x).permute(0, 2, 3, 1).contiguous()
        return out.view(out.size(0), -1, width)

    def forward(self, inputs: list[torch.Tensor]):
        from torchvision.ops import nms

        image = inputs[0]
        h, w = image.shape[-2:]
        y = F.interpolate(
            image[None].float() * 255.0, size=(self.height, self.width), mode="bilinear", align_corners=False
        )
        y = (y - 127.0) / 128.0
        conf, boxes = (self.network or self.raw)(y)
        scores, boxes = conf[0], boxes[0]
        keep = scores > self.threshold
        b = boxes[keep].clamp(0.0, 1.0) * torch.tensor([w, h, w, h], dtype=boxes.dtype, device=boxes.device)
        s = scores[keep]
        idx = nms(b, s, self.iou)[: self.top]
        b, s = b[idx], s[idx]
        return inputs, [{"boxes": b, "labels": torch.ones(len(s), dtype=torch.long, device=s.device), "scores": s}]


class _Raw(nn.Module):
    def __init__(self, detector: RFBFaceDetector):
        super().__init__()
        self.detector = detector

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.detector.raw(x)


# --- the expression classifier ----------------------------------------------------------------


class _SeparableSame(nn.Module):
    """TF's ``separableConv2d(..., 'same')`` + bias: depthwise 3x3 then pointwise 1x1."""

    def __init__(self, inp: int, oup: int, stride: int):
        super().__init__()
        self.stride = stride
        self.depthwise = nn.Conv2d(inp, inp, 3, stride, 0, groups=inp, bias=False)
        self.pointwise = nn.Conv2d(inp, oup, 1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise(self.depthwise(_pad_same(x, self.stride)))


def _pad_same(x: torch.Tensor, stride: int) -> torch.Tensor:
    """TF 'same' padding of a 3x3 kernel: (1, 1) at stride 1; at stride 2 on an even side (0, 1)."""
    if stride == 1:
        return F.pad(x, (1, 1, 1, 1))
    h, w = x.shape[-2:]
    ph, pw = max(3 - (2 if h % 2 == 0 else 1), 0), max(3 - (2 if w % 2 == 0 else 1), 0)
    return F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))


class _DenseBlock4(nn.Module):
    def __init__(self, inp: int, oup: int, first: bool):
        super().__init__()
        self.first = first
        self.conv0 = nn.Conv2d(inp, oup, 3, 2, 0, bias=True) if first else _SeparableSame(inp, oup, 2)
        self.conv1 = _SeparableSame(oup, oup, 1)
        self.conv2 = _SeparableSame(oup, oup, 1)
        self.conv3 = _SeparableSame(oup, oup, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out1 = F.relu(self.conv0(_pad_same(x, 2)) if self.first else self.conv0(x))
        out2 = self.conv1(out1)
        out3 = self.conv2(F.relu(out1 + out2))
        out4 = self.conv3(F.relu(out1 + out2 + out3))
        return F.relu(out1 + out2 + out3 + out4)


class FaceExpressionNet(nn.Module):
    """face-api.js's FaceExpressionNet: (N, 3, 112, 112) as :data:`EXPRESSION_PREPROCESS` normalises
    it -> (N, 263): 7 expression probabilities, then the 256-d pooled embedding."""

    def __init__(self):
        super().__init__()
        self.dense0 = _DenseBlock4(3, 32, first=True)
        self.dense1 = _DenseBlock4(32, 64, first=False)
        self.dense2 = _DenseBlock4(64, 128, first=False)
        self.dense3 = _DenseBlock4(128, 256, first=False)
        self.fc = nn.Linear(256, len(EXPRESSIONS))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dense3(self.dense2(self.dense1(self.dense0(x))))
        emb = F.avg_pool2d(x, 7, 2).flatten(1)
        return torch.cat([torch.softmax(self.fc(emb), dim=-1), emb], 1)


EXPRESSION_PREPROCESS = Preprocess(
    input_size=(112, 112),
    resize_size=(112, 112),
    interpolation="bilinear",
    mean=tuple(m / 255.0 for m in EXPRESSION_MEAN_RGB),
    std=(1.0, 1.0, 1.0),
)


# --- the shipped files ------------------------------------------------------------------------


@dataclass(frozen=True)
class FaceNet:
    name: str
    build: object  # () -> nn.Module
    what: str
    preprocess: Preprocess | None = None  # a backbone's input (None: a detector, which sizes its own)

    @property
    def file(self) -> str:
        return os.path.join(FOLDER, f"{self.name}.safetensors")


NETS = {
    "faces_rfb320": FaceNet("faces_rfb320", lambda: RFBFaceDetector(320, 240), "face detector, 320 x 240 input"),
    "faces_rfb640": FaceNet("faces_rfb640", lambda: RFBFaceDetector(640, 480), "face detector, 640 x 480 input"),
    "face_expression": FaceNet(
        "face_expression", FaceExpressionNet, "facial expressions of a 112 x 112 face", EXPRESSION_PREPROCESS
    ),
}
DETECTORS = tuple(name for name, net in NETS.items() if net.preprocess is None)
CLASS_NAMES = ["__background__", "face"]


def load(name: str, random_weights: bool = False) -> tuple[nn.Module, str]:
    """(network in eval mode, weights source) for a shipped face network's name."""
    net = NETS.get(name)
    if net is None:
        raise ImgsentError(f"imgsent ships no network named {name!r}; it has {', '.join(NETS)}")
    module = net.build()
    if random_weights:
        return module.eval(), "random (seeded)"
    from .weights import load_state_dict_file

    if not os.path.isfile(net.file):
        raise ImgsentError(f"{net.file} is missing from this install of imgsent: reinstall it")
    module.load_state_dict(load_state_dict_file(net.file))
    return module.eval(), f"{net.file} (shipped with imgsent)"
