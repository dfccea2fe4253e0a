"""Decoding on the device (``decode="device"``): JPEG bytes in, the same uint8 views as
:func:`~imgsent.decode.make_views` out, made where the models run.

The decoding processes only read each JPEG's bytes and header (:func:`~imgsent.decode.read_jpeg`);
here a whole batch is decoded at once by one of three decoders (:func:`backend` says which):

- ``nvimgcodec``: NVIDIA's nvImageCodec (``pip install 'imgsent[gpu]'``). On CUDA it uses the
  hardware JPEG engines of data-center cards (A100, H100, H200) where there are some, nvJPEG's
  CUDA decoder otherwise; on the CPU, libjpeg-turbo.
- ``torchcodec``: TorchCodec's ``decode_jpeg`` (``imgsent[gpu]`` too), the maintained successor of
  torchvision's image codecs, which torchvision 0.29 deprecates; nvJPEG on CUDA, libjpeg-turbo on the CPU.
- ``torchvision``: ``torchvision.io.decode_jpeg``, always there.

The first installed one of :data:`PREFERRED` for the device is used, or the one
``$IMGSENT_DEVICE_DECODER`` names. On the CPU all three are libjpeg-turbo: pixel-identical, within
a few per cent of each other in speed (measured on Twitter I), so nvImageCodec is not preferred there.
EXIF orientation is applied, and each view is resized (antialiased, like Pillow) and
cropped with the geometry of :func:`~imgsent.decode.view_plan`. Pixels differ from Pillow's by a
grey level or so (another IDCT and chroma upsampling, no reduced-scale draft decode, float
resizing), so features are close to, not equal to, those of ``decode="workers"``.
An image the device cannot decode is reported back (its index), to be decoded by Pillow instead.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
import threading
import warnings
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from .decode import Preprocess, view_plan
from .errors import ImgsentError

BACKENDS = ("nvimgcodec", "torchcodec", "torchvision")
# Tried in this order. On CUDA nvImageCodec first: it alone drives the cards' hardware JPEG engines.
PREFERRED = {"cuda": BACKENDS, "cpu": ("torchcodec", "torchvision")}
CHOICE_ENV = "IMGSENT_DEVICE_DECODER"
_MODULES = {"nvimgcodec": "nvidia.nvimgcodec", "torchcodec": "torchcodec.decoders", "torchvision": "torchvision.io"}
_WHERE = {
    ("nvimgcodec", "cuda"): "hardware JPEG engines or nvJPEG",
    ("torchcodec", "cuda"): "nvJPEG",
    ("torchvision", "cuda"): "nvJPEG",
}


@functools.cache
def installed(name: str) -> bool:
    """Whether decoder ``name`` imports (with this torch; nvImageCodec's warnings about files it
    refuses are quietened: imgsent counts refusals itself)."""
    os.environ.setdefault("PYNVIMGCODEC_VERBOSITY", "1")
    try:
        importlib.import_module(_MODULES[name])
    except Exception:  # not installed, or built for another torch / CUDA
        return False
    return True


def backend(device_type: str = "cpu") -> str:
    """The JPEG decoder a run on ``device_type`` (``cuda``, ``cpu``...) uses: ``$IMGSENT_DEVICE_DECODER``
    when set (it must be installed), else the first installed one of :data:`PREFERRED`."""
    chosen = os.environ.get(CHOICE_ENV, "").strip().lower()
    if chosen and chosen != "auto":
        if chosen not in BACKENDS:
            raise ImgsentError(f"{CHOICE_ENV} must be auto or one of {', '.join(BACKENDS)}, got {chosen!r}")
        if not installed(chosen):
            raise ImgsentError(f"{CHOICE_ENV}={chosen}, but {chosen} is not installed: pip install 'imgsent[gpu]'")
        return chosen
    return next(name for name in PREFERRED.get(device_type, PREFERRED["cpu"]) if installed(name))


def describe(name: str, device: torch.device) -> str:
    """``torchcodec (nvJPEG)``: a decoder and what does the work on ``device``."""
    return f"{name} ({_WHERE.get((name, device.type), 'libjpeg-turbo')})"


Decode = Callable[[list[torch.Tensor]], list[torch.Tensor | None]]
_made = threading.local()  # decoders are built once per thread and device (nvImageCodec's hold state)


def _decoder(name: str, device: torch.device) -> tuple[Decode, bool]:
    """(decode: JPEG byte tensors -> (3, H, W) uint8 images on ``device``, None where refused (or
    raises for the whole list); whether it applies EXIF orientation itself)."""
    cache = _made.__dict__.setdefault("decoders", {})
    key = (name, str(device))
    if key not in cache:
        cache[key] = _make_decoder(name, device)
    return cache[key]


def _make_decoder(name: str, device: torch.device) -> tuple[Decode, bool]:
    if name == "nvimgcodec":
        return _nvimgcodec(device), True
    if name == "torchcodec":
        from torchcodec.decoders import decode_jpeg as tc_decode

        return (lambda data: tc_decode(data, mode="RGB", device=device)), True
    from torchvision.io import ImageReadMode
    from torchvision.io import decode_jpeg as tv_decode

    return (lambda data: tv_decode(data, mode=ImageReadMode.RGB, device=device)), False


def _nvimgcodec(device: torch.device) -> Decode:
    installed("nvimgcodec")  # its verbosity set before the import
    from nvidia import nvimgcodec as nv

    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        # Fancy (smooth) chroma upsampling, as libjpeg-turbo and so Pillow do by default.
        decoder = nv.Decoder(device_id=index, options=":fancy_upsampling=1")
    else:
        decoder = nv.Decoder(device_id=nv.NVIMGCODEC_DEVICE_CPU_ONLY, backends=[nv.Backend(nv.CPU_ONLY)])
    params = nv.DecodeParams(
        apply_exif_orientation=True, color_spec=nv.SRGB, allow_any_depth=False, sample_format=nv.I_RGB
    )

    def decode(jpegs: list[torch.Tensor]) -> list[torch.Tensor | None]:
        stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
        images = decoder.decode([j.numpy() for j in jpegs], params=params, cuda_stream=stream)
        return [None if im is None else _chw(im, device) for im in images]

    return decode


def _chw(image, device: torch.device) -> torch.Tensor:
    """An nvImageCodec image (H, W, 3, on the card or in host memory) as a (3, H, W) tensor, no copy."""
    if device.type == "cuda":
        hwc = torch.from_dlpack(image)
    else:
        hwc = torch.from_numpy(np.asarray(image.cpu()))
    return hwc.permute(2, 0, 1)


def orient(img: torch.Tensor, orientation: int) -> torch.Tensor:
    """(3, H, W) turned as EXIF ``orientation`` says (Pillow's ``ImageOps.exif_transpose``)."""
    if orientation == 2:
        return img.flip(2)
    if orientation == 3:
        return img.flip(1).flip(2)
    if orientation == 4:
        return img.flip(1)
    if orientation == 5:
        return img.transpose(1, 2)
    if orientation == 6:
        return torch.rot90(img, -1, dims=(1, 2))
    if orientation == 7:
        return img.transpose(1, 2).flip(1).flip(2)
    if orientation == 8:
        return torch.rot90(img, 1, dims=(1, 2))
    return img


def make_views(img: torch.Tensor, preprocesses: list[Preprocess], tta: str = "none") -> dict[tuple, torch.Tensor]:
    """For each distinct view key, uint8 (n_crops, 3, H, W) of a (3, H, W) uint8 image, on its
    device: :func:`~imgsent.decode.make_views` with tensors."""
    views: dict[tuple, torch.Tensor] = {}
    height, width = img.shape[1:]
    for pp in preprocesses:
        if pp.view_key in views:
            continue
        plan = view_plan(width, height, pp, tta)
        x = img if plan.source is None else img[:, plan.source[1] : plan.source[3], plan.source[0] : plan.source[2]]
        if plan.resized != (x.shape[2], x.shape[1]):
            size = (plan.resized[1], plan.resized[0])
            x = F.interpolate(x[None].float(), size=size, mode=pp.interpolation, antialias=True, align_corners=False)
            x = x[0].round_().clamp_(0, 255).to(torch.uint8)
        if plan.canvas is not None:
            canvas = x.new_zeros((3, plan.canvas[1], plan.canvas[0]))
            top, left = (plan.canvas[1] - x.shape[1]) // 2, (plan.canvas[0] - x.shape[2]) // 2
            canvas[:, top : top + x.shape[1], left : left + x.shape[2]] = x
            x = canvas
        views[pp.view_key] = torch.stack([x[:, top:bottom, left:right] for left, top, right, bottom in plan.boxes])
    return views


@contextlib.contextmanager
def _quiet():
    """torchvision 0.29 marks its image codecs deprecated (TorchCodec's are to replace them): one
    DeprecationWarning per call, which says nothing to an imgsent user."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "The image decoding and encoding", DeprecationWarning)
        yield


DECODE_GROUP = 64  # JPEGs decoded at once: full-size pixels of at most this many are held on the device


def _decode(jpegs: list[torch.Tensor], device: torch.device, name: str) -> tuple[list[torch.Tensor | None], bool]:
    """One group decoded together; a group the decoder refuses as a whole, image by image (None:
    refused), so one bad file costs only itself. Also: whether EXIF orientation is already applied."""
    decode, oriented = _decoder(name, device)
    with _quiet():
        try:
            return list(decode(jpegs)), oriented
        except RuntimeError:
            images: list[torch.Tensor | None] = []
            for data in jpegs:
                try:
                    images.append(decode([data])[0])
                except RuntimeError:
                    images.append(None)
            return images, oriented


def decode_views(
    jpegs: list[torch.Tensor],
    orientations: list[int],
    preprocesses: list[Preprocess],
    tta: str,
    device: torch.device,
    decoder: str | None = None,
) -> tuple[dict[tuple, torch.Tensor], list[int]]:
    """JPEG byte tensors (CPU uint8) -> (views of the decoded ones, stacked per key on ``device``;
    indices of those the device could not decode). ``decoder``: one of :data:`BACKENDS` (default:
    :func:`backend`). Decoded :data:`DECODE_GROUP` at a time, each group cut into views before the
    next is decoded (256 4K photos at full size would be 6 GB)."""
    name = decoder or backend(device.type)
    failed: list[int] = []
    per_key: dict[tuple, list[torch.Tensor]] = {}
    for start in range(0, len(jpegs), DECODE_GROUP):
        images, oriented = _decode(jpegs[start : start + DECODE_GROUP], device, name)
        for i, (img, orientation) in enumerate(zip(images, orientations[start : start + DECODE_GROUP])):
            if img is None:
                failed.append(start + i)
                continue
            img = img if oriented else orient(img, orientation)
            for key, view in make_views(img, preprocesses, tta).items():
                per_key.setdefault(key, []).append(view)
    return {key: torch.stack(v) for key, v in per_key.items()}, failed
