"""Decoding: one image file in, RGB pixels out, then the resized/cropped views backbones need.

``decode_image`` opens a file once (Pillow), lets libjpeg decode big JPEGs at a reduced scale
(``Image.draft``), applies EXIF orientation, composites transparency on white and converts every
mode to 8-bit RGB. ``make_views`` produces, for each distinct :class:`Preprocess`, the uint8 CHW
array(s) a backbone consumes; backbones that share a preprocessing share the work.

Resizing and cropping reproduce torchvision's PIL code path exactly (same output size rounding,
same Pillow resampling call), so features match a plain ``weights.transforms()`` pipeline.
Failures raise :class:`DecodeError` with a one-line reason; the engine turns it into an error row.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import stat
import threading
import warnings
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageFile, ImageOps

from .inputs import IMAGE_EXTENSIONS, ImageRef
from .sources import SourceError, not_found, read_source, read_sources

DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's own decompression-bomb threshold (about 0.25 GB of RGBA)

_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}

TTA_MODES = ("none", "flip", "crops", "flip+crops")


def crop_count(tta: str) -> int:
    """Views per image and preprocessing: the centre crop, plus four corners with ``crops`` TTA."""
    return 5 if "crops" in tta else 1


class DecodeError(Exception):
    """An image that cannot be turned into pixels; ``str(exc)`` is the one-line reason."""


@dataclass(frozen=True)
class Preprocess:
    """How one backbone wants its input: resize, crop, normalise (normalisation runs on device).

    ``resize_size``: an int resizes the shorter side to it keeping the aspect ratio (torchvision's
    ``Resize(int)``); a pair resizes to exactly (h, w). Then a centre crop to ``input_size`` (h, w).
    """

    input_size: tuple[int, int] = (224, 224)
    resize_size: int | tuple[int, int] = 256
    interpolation: str = "bilinear"
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    def __post_init__(self) -> None:
        if self.interpolation not in _RESAMPLE:
            raise ValueError(f"unknown interpolation {self.interpolation!r}; use one of {sorted(_RESAMPLE)}")

    @property
    def view_key(self) -> tuple:
        """Backbones with the same key consume the same uint8 pixels (mean/std applied later)."""
        return (tuple(self.input_size), self.resize_size, self.interpolation)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["input_size"] = list(self.input_size)
        d["resize_size"] = list(self.resize_size) if isinstance(self.resize_size, tuple) else self.resize_size
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Preprocess:
        rs = d["resize_size"]
        return cls(
            input_size=tuple(int(x) for x in d["input_size"]),
            resize_size=tuple(int(x) for x in rs) if isinstance(rs, (list, tuple)) else int(rs),
            interpolation=str(d["interpolation"]),
            mean=tuple(float(x) for x in d["mean"]),
            std=tuple(float(x) for x in d["std"]),
        )

    def needed_short_side(self) -> int:
        rs = self.resize_size
        return max(rs) if isinstance(rs, tuple) else int(rs)


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB; transparency is composited on white."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        if mode.startswith("I;16") or (mode == "I" and arr.size and arr.max() > 255):
            arr = arr / 257.0
        return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L").convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in img.info)
    if has_alpha:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


_pillow_lock = threading.Lock()


@contextlib.contextmanager
def _pillow_settings(max_pixels: int):
    """Pillow's process-wide switches as decoding needs them, restored afterwards: truncated files
    fail (never half-grey pictures), and Pillow's own bomb limit sits at or above ``max_pixels``
    (our check runs first and names the limit)."""
    with _pillow_lock:
        before = Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES
        if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < max_pixels:
            Image.MAX_IMAGE_PIXELS = max_pixels
        ImageFile.LOAD_TRUNCATED_IMAGES = False
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = before


def _check_regular_file(path: str) -> None:
    """Only regular files are opened: a FIFO would block forever, a directory is no image."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise DecodeError(not_found(path)) from None
    except PermissionError:
        raise DecodeError("permission denied") from None
    except OSError as exc:
        raise DecodeError(f"cannot stat the file: {exc.strerror or exc}") from None
    if stat.S_ISDIR(st.st_mode):
        raise DecodeError("is a directory, not an image file")
    if not stat.S_ISREG(st.st_mode):
        kind = "a FIFO" if stat.S_ISFIFO(st.st_mode) else "a socket" if stat.S_ISSOCK(st.st_mode) else "a device"
        raise DecodeError(f"is {kind}, not a regular file")


def preview_jpeg(path: str, size: int, quality: int = 85, source: str = "") -> bytes:
    """A JPEG of the image at ``path`` (or read from ``source``, an
    :attr:`~imgsent.inputs.ImageRef.source`: a tar member, a Parquet cell, a URL), oriented as its
    EXIF says, its longer side at most ``size`` (the report's thumbnails, the labelling page's
    images); raises :class:`DecodeError`."""
    data = None
    if source:
        try:
            data = read_source(source)
        except (SourceError, OSError) as exc:
            raise DecodeError(f"cannot read {path}: {exc}") from None
    img, _ = decode_image(path, min_short_side=size // 2, data=data)
    img.thumbnail((size, size))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def decode_image(
    path: str, *, min_short_side: int = 0, max_pixels: int = DEFAULT_MAX_PIXELS, data: bytes | None = None
) -> tuple[Image.Image, tuple[int, int]]:
    """Open ``path`` (or the encoded image ``data``, read from a tar member or a Parquet cell);
    return an RGB image oriented as its EXIF says, and the full-resolution (width, height) of that
    oriented image (the pixels may be smaller, see ``min_short_side``).

    ``min_short_side``: libjpeg decodes big JPEGs at the largest reduced scale (1/2, 1/4, 1/8) that
    keeps both sides >= 2 * min_short_side (a 1920x1080 photo for a 256-pixel resize: 960x540, 44-57 %
    less time). Not smaller: decoding to 1x the resize (480x270) would save another 24-38 %, but
    changed real MobileNetV2 features of the 447 Twitter I photos it would touch by cosine 0.9946 on
    average and 0.938 at worst (``bench/draft_check.py``); 2x keeps views within a few grey levels of a
    full decode (tested).
    ``max_pixels`` guards against decompression bombs.
    """
    if data is None:
        _check_regular_file(path)
    try:
        with warnings.catch_warnings(), _pillow_settings(max_pixels):
            warnings.simplefilter("ignore")
            with Image.open(path if data is None else io.BytesIO(data)) as img:
                width, height = img.size
                if width * height > max_pixels:
                    raise DecodeError(f"image is {width}x{height} pixels, over the limit of {max_pixels}")
                if width < 1 or height < 1:
                    raise DecodeError(f"image has an empty size {width}x{height}")
                if img.format == "JPEG" and min_short_side > 0:
                    want = 2 * min_short_side
                    if min(width, height) >= 2 * want:
                        img.draft(img.mode, (want, want))
                img.load()
                loaded = img.size
                try:
                    oriented = ImageOps.exif_transpose(img)
                except Exception:  # a corrupt EXIF block: keep the pixels as stored
                    oriented = None
                oriented = img if oriented is None else oriented
                turned = oriented.size != loaded
                return _to_rgb(oriented).copy(), ((height, width) if turned else (width, height))
    except DecodeError:
        raise
    except FileNotFoundError:
        raise DecodeError(not_found(path)) from None
    except IsADirectoryError:
        raise DecodeError("is a directory, not an image file") from None
    except PermissionError:
        raise DecodeError("permission denied") from None
    except Image.DecompressionBombError:
        raise DecodeError(f"image is over the limit of {max_pixels} pixels") from None
    except Image.UnidentifiedImageError:
        if (len(data) if data is not None else _size(path)) == 0:
            raise DecodeError("empty file (0 bytes)") from None
        raise DecodeError("not a recognised image format (corrupt, or not an image)") from None
    except Exception as exc:  # truncated data, decoder errors, MemoryError...
        raise DecodeError(_plain_reason(exc)) from None


# Pillow's own words for broken image data, and what they mean to someone reading an error column.
_PILLOW_REASONS = {
    "truncated file read": "truncated file: the image data ends early (an interrupted copy or download?)",
    "image file is truncated": "truncated file: the image data ends early (an interrupted copy or download?)",
    "broken data stream": "corrupt image data (the decoder could not read it)",
}


def _plain_reason(exc: BaseException) -> str:
    """A decoder's exception as a reason a person can act on; others as ``Type: text``."""
    text = " ".join(str(exc).split())
    for words, reason in _PILLOW_REASONS.items():
        if words in text.lower():
            return reason
    return f"{type(exc).__name__}: {text or type(exc).__name__}"[:300]


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return -1


def _resized_size(width: int, height: int, size: int | tuple[int, int]) -> tuple[int, int]:
    """Output (w, h) of torchvision ``Resize(size)`` for a PIL image (same rounding)."""
    if isinstance(size, tuple):
        return size[1], size[0]
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size, int(size * long / short)
    return (new_short, new_long) if width <= height else (new_long, new_short)


def _crop_box(width: int, height: int, crop_h: int, crop_w: int) -> tuple[int, int, int, int]:
    top = int(round((height - crop_h) / 2.0))
    left = int(round((width - crop_w) / 2.0))
    return left, top, left + crop_w, top + crop_h


@dataclass(frozen=True)
class ViewPlan:
    """The geometry of one image's view(s), whatever decodes and resizes the pixels (Pillow here,
    the device in :mod:`imgsent.devicedecode`): ``source`` box cut first (None: the whole image),
    its ``resized`` (w, h), a ``canvas`` (w, h) it is centred on when smaller than the crop (None:
    no padding), and the crop ``boxes`` (left, top, right, bottom) in that canvas."""

    source: tuple[int, int, int, int] | None
    resized: tuple[int, int]
    canvas: tuple[int, int] | None
    boxes: list[tuple[int, int, int, int]]


def view_plan(width: int, height: int, pp: Preprocess, tta: str) -> ViewPlan:
    """torchvision's ``Resize`` + ``CenterCrop`` geometry (same rounding) for a ``width`` x
    ``height`` image, plus the five-crop boxes of ``tta="crops"``."""
    new_w, new_h = _resized_size(width, height, pp.resize_size)
    crop_h, crop_w = pp.input_size
    source = None
    if max(new_w, new_h) > 4 * max(crop_h, crop_w, 64) and "crops" not in tta:
        # Extreme aspect ratio (say 10000x1): resizing the whole strip would need gigabytes.
        # Cut the source down to the part that maps onto the centre crop first.
        sx, sy = width / new_w, height / new_h
        left, top, right, bottom = _crop_box(new_w, new_h, crop_h, crop_w)
        source = (
            max(0, math.floor(left * sx) - 2),
            max(0, math.floor(top * sy) - 2),
            min(width, math.ceil(right * sx) + 2),
            min(height, math.ceil(bottom * sy) + 2),
        )
        width, height = source[2] - source[0], source[3] - source[1]
        new_w = max(1, round(width / sx))
        new_h = max(1, round(height / sy))
    canvas = None
    if new_w < crop_w or new_h < crop_h:
        canvas = (max(crop_w, new_w), max(crop_h, new_h))
    w, h = canvas or (new_w, new_h)
    boxes = [_crop_box(w, h, crop_h, crop_w)]
    if "crops" in tta:
        boxes += [
            (0, 0, crop_w, crop_h),
            (w - crop_w, 0, w, crop_h),
            (0, h - crop_h, crop_w, h),
            (w - crop_w, h - crop_h, w, h),
        ]
    return ViewPlan(source, (new_w, new_h), canvas, boxes)


def _resize_and_crop(img: Image.Image, pp: Preprocess, tta: str) -> list[Image.Image]:
    plan = view_plan(img.size[0], img.size[1], pp, tta)
    if plan.source is not None:
        img = img.crop(plan.source)
    resized = img.resize(plan.resized, _RESAMPLE[pp.interpolation]) if plan.resized != img.size else img
    if plan.canvas is not None:
        padded = Image.new("RGB", plan.canvas)
        padded.paste(resized, ((plan.canvas[0] - resized.size[0]) // 2, (plan.canvas[1] - resized.size[1]) // 2))
        resized = padded
    return [resized.crop(b) for b in plan.boxes]


def make_views(img: Image.Image, preprocesses: list[Preprocess], tta: str = "none") -> dict[tuple, np.ndarray]:
    """For each distinct view key, a uint8 array (n_crops, 3, H, W) of the image's crop(s)."""
    views: dict[tuple, np.ndarray] = {}
    for pp in preprocesses:
        if pp.view_key in views:
            continue
        crops = _resize_and_crop(img, pp, tta)
        views[pp.view_key] = np.stack([np.asarray(c, dtype=np.uint8).transpose(2, 0, 1) for c in crops])
    return views


@dataclass
class DecodedImage:
    """One input after decoding: its reference, ``status`` (``ok``/``error``), the reason, the
    full-resolution size, and the uint8 views per view key (None on error). For decoding on the
    device, a JPEG's bytes instead of views (``jpeg``) and its EXIF ``orientation`` (1-8)."""

    ref: ImageRef
    status: str
    error: str | None
    width: int | None
    height: int | None
    views: dict[tuple, np.ndarray] | None
    jpeg: np.ndarray | None = None
    orientation: int = 1

    @classmethod
    def failed(cls, ref: ImageRef, reason: str) -> DecodedImage:
        return cls(ref, "error", reason, None, None, None)


DEVICE_INTERPOLATIONS = ("bilinear", "bicubic")  # what the device resizes like Pillow (antialiased)
DEVICE_JPEG_MODES = ("RGB", "L")  # JPEGs the device decodes; CMYK/YCCK ones are decoded here


def read_jpeg(ref: ImageRef, max_pixels: int = DEFAULT_MAX_PIXELS) -> DecodedImage | None:
    """For decoding on the device: a whole, plain JPEG's bytes, full (oriented) size and EXIF
    orientation, read from its header alone; None for anything else (other formats, CMYK, a file
    not ending in the JPEG end marker, an unreadable header), which is then decoded here as usual
    (:func:`decode_ref`), with its reason if it fails."""
    try:
        if ref.source:
            data = read_source(ref.source)
            if data[:2] != b"\xff\xd8":
                return None
        else:
            _check_regular_file(ref.path)
            with open(ref.path, "rb") as f:
                data = f.read(2)
                if data != b"\xff\xd8":
                    return None  # not a JPEG: Pillow decodes it (the rest of the file is not read twice)
                data += f.read()
        if data.rstrip(b"\x00\r\n ")[-2:] != b"\xff\xd9":
            return None  # truncated: Pillow decodes it or says why
        with warnings.catch_warnings(), _pillow_settings(max_pixels):
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as img:
                width, height = img.size
                if img.format != "JPEG" or img.mode not in DEVICE_JPEG_MODES:
                    return None
                if width < 1 or height < 1 or width * height > max_pixels:
                    return None
                orientation = int(img.getexif().get(0x0112, 1))
    except Exception:
        return None
    orientation = orientation if 1 <= orientation <= 8 else 1
    if orientation >= 5:  # transposed or rotated by 90 degrees
        width, height = height, width
    return DecodedImage(ref, "ok", None, width, height, None, np.frombuffer(bytearray(data), np.uint8), orientation)


def decode_refs(
    refs: list[ImageRef],
    preprocesses: list[Preprocess],
    tta: str = "none",
    max_pixels: int = DEFAULT_MAX_PIXELS,
    keep_images: str | None = None,
) -> list[DecodedImage]:
    """:func:`decode_ref` for a batch: the bytes of tar members, Parquet cells and URLs are read
    first, URLs many at once (:func:`~imgsent.sources.read_sources`), then each image decoded.
    ``keep_images``: a folder where downloaded images are saved; the row's ``path`` is then the copy."""
    if not any(ref.source for ref in refs):
        return [decode_ref(ref, preprocesses, tta, max_pixels) for ref in refs]
    fetched = read_sources([ref.source for ref in refs])
    out = []
    for ref, got in zip(refs, fetched):
        if keep_images and isinstance(got, bytes) and ref.source.startswith('["url"'):
            try:
                ref = ImageRef(ref.id, keep_copy(keep_images, ref.path, got), ref.source, ref.meta)
            except OSError as exc:
                got = SourceError(f"downloaded, but cannot save it in {keep_images}: {exc.strerror or exc}")
        out.append(decode_ref(ref, preprocesses, tta, max_pixels, data=got))
    return out


def decode_ref(
    ref: ImageRef,
    preprocesses: list[Preprocess],
    tta: str = "none",
    max_pixels: int = DEFAULT_MAX_PIXELS,
    data: bytes | SourceError | None = None,
) -> DecodedImage:
    """The decode step of every engine (local workers and Ray tasks): one image in, its views for
    every distinct preprocessing out. Never raises for a bad image: it comes back as an error.
    ``data``: the image's bytes when already read (:func:`decode_refs`), or why they could not be."""
    try:
        min_short_side = max(pp.needed_short_side() for pp in preprocesses)
        if isinstance(data, SourceError):
            raise data
        if data is None and ref.source:
            data = read_source(ref.source)
        img, (width, height) = decode_image(ref.path, min_short_side=min_short_side, max_pixels=max_pixels, data=data)
        return DecodedImage(ref, "ok", None, width, height, make_views(img, preprocesses, tta))
    except SourceError as exc:
        return DecodedImage.failed(ref, str(exc))
    except DecodeError as exc:
        return DecodedImage.failed(ref, str(exc))
    except Exception as exc:  # never let one image stop a worker
        return DecodedImage.failed(ref, f"{type(exc).__name__}: {exc}"[:300])


def keep_copy(directory: str, url: str, data: bytes) -> str:
    """Save a downloaded image under ``directory`` (``--keep-images``), named by the URL's sha256
    (and its extension when it has an image one), atomically; returns the file's path. Saving it
    again (a rerun) rewrites the same name."""
    import hashlib

    from .atomicio import atomic_open

    ext = os.path.splitext(url.split("?", 1)[0].split("#", 1)[0])[1].lower()
    name = hashlib.sha256(url.encode("utf-8", errors="surrogateescape")).hexdigest()[:32]
    path = os.path.join(directory, name + (ext if ext in IMAGE_EXTENSIONS else ".img"))
    with atomic_open(path, "wb") as fh:
        fh.write(data)
    return path
