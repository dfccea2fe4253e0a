"""Decoding on the device (``decode="device"``): JPEG bytes in, the same uint8 views as
:func:`~imgsent.decode.make_views` out, made where the models run.

The decoding processes only read each JPEG's bytes and header (:func:`~imgsent.decode.read_jpeg`);
here a whole batch is decoded at once (nvJPEG on CUDA, libjpeg-turbo on the CPU) by TorchCodec's
``decode_jpeg`` when it is installed (``pip install 'imgsent[gpu]'``: the maintained successor of
torchvision's image codecs, which torchvision 0.29 deprecates), else by torchvision's
(:func:`backend` says which), EXIF orientation is applied, and each view is resized (antialiased, like Pillow) and
cropped with the geometry of :func:`~imgsent.decode.view_plan`. Pixels differ from Pillow's by a
grey level or so (another IDCT and chroma upsampling, no reduced-scale draft decode, float
resizing), so features are close to, not equal to, those of ``decode="workers"``.
An image the device cannot decode is reported back (its index), to be decoded by Pillow instead.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F

from .decode import Preprocess, view_plan

BACKENDS = ("torchcodec", "torchvision")


@functools.cache
def backend() -> str:
    """The JPEG decoder in use: ``torchcodec`` when it imports (with this torch), else ``torchvision``.
    On the CPU both are libjpeg-turbo (pixel-identical, the same speed, measured on Twitter I)."""
    try:
        import torchcodec.decoders  # noqa: F401
    except Exception:  # not installed, or built for another torch
        return "torchvision"
    return "torchcodec"


def _decoder(name: str) -> tuple[Callable, bool]:
    """(decode_jpeg(one or a list, device) of backend ``name``, whether it applies EXIF orientation
    itself: TorchCodec does, torchvision does not)."""
    if name == "torchcodec":
        from torchcodec.decoders import decode_jpeg as tc_decode

        return (lambda data, device: tc_decode(data, mode="RGB", device=device)), True
    from torchvision.io import ImageReadMode
    from torchvision.io import decode_jpeg as tv_decode

    return (lambda data, device: tv_decode(data, mode=ImageReadMode.RGB, device=device)), False


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


def _decode(jpegs: list[torch.Tensor], device: torch.device) -> tuple[list[torch.Tensor | None], bool]:
    """One group decoded together; a group the decoder refuses as a whole, image by image (None:
    refused), so one bad file costs only itself. Also: whether EXIF orientation is already applied."""
    decode, oriented = _decoder(backend())
    with _quiet():
        try:
            return list(decode(jpegs, device)), oriented
        except RuntimeError:
            images: list[torch.Tensor | None] = []
            for data in jpegs:
                try:
                    images.append(decode(data, device))
                except RuntimeError:
                    images.append(None)
            return images, oriented


def decode_views(
    jpegs: list[torch.Tensor],
    orientations: list[int],
    preprocesses: list[Preprocess],
    tta: str,
    device: torch.device,
) -> tuple[dict[tuple, torch.Tensor], list[int]]:
    """JPEG byte tensors (CPU uint8) -> (views of the decoded ones, stacked per key on ``device``;
    indices of those the device could not decode). Decoded :data:`DECODE_GROUP` at a time, each
    group cut into views before the next is decoded (256 4K photos at full size would be 6 GB)."""
    failed: list[int] = []
    per_key: dict[tuple, list[torch.Tensor]] = {}
    for start in range(0, len(jpegs), DECODE_GROUP):
        images, oriented = _decode(jpegs[start : start + DECODE_GROUP], device)
        for i, (img, orientation) in enumerate(zip(images, orientations[start : start + DECODE_GROUP])):
            if img is None:
                failed.append(start + i)
                continue
            img = img if oriented else orient(img, orientation)
            for key, view in make_views(img, preprocesses, tta).items():
                per_key.setdefault(key, []).append(view)
    return {key: torch.stack(v) for key, v in per_key.items()}, failed
