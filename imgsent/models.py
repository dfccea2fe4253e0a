"""Models to score with: the packaged default, bundle directories, and the backbones a model's
recipe names (with their weights checked against it)."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from importlib import resources

from .backbones import Backbone, BackboneSpec, cached_float_weights, create_backbone, fingerprints_match
from .errors import ImgsentError
from .training import SentimentModel, load_model

DEFAULT_MODEL = "default"
DEFAULT_MODEL_NAME = "imgsent-default"


def default_model_path() -> str:
    """Where the packaged default polarity model lives."""
    return str(resources.files("imgsent") / "default_model")


def is_default(model: str | None) -> bool:
    return model in (None, DEFAULT_MODEL)


def model_path(model: str | None) -> str:
    """The bundle directory of ``model``: ``None``/``default`` is the packaged model."""
    return default_model_path() if is_default(model) else str(model)


def resolve_model(model: str | None) -> SentimentModel:
    """``None``/``default``: the packaged model; else a bundle directory."""
    return load_model(model_path(model))


def model_identity(model: SentimentModel, path: str | None) -> tuple[str, str]:
    """(name, version) of a model as score rows record it: the bundle's directory name (or
    ``imgsent-default``) and the first 12 hex digits of a hash of the head's weights."""
    name = DEFAULT_MODEL_NAME if is_default(path) else os.path.basename(os.path.normpath(path))
    h = hashlib.sha256()
    for k, v in sorted(model.head.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().contiguous().numpy().tobytes())
    if model.calibration is not None:  # a recalibrated model scores differently: another version
        h.update(json.dumps(model.calibration.to_json(), sort_keys=True).encode())
    return name, h.hexdigest()[:12]


def _weights_for(model: SentimentModel, weights: Sequence[str]) -> dict[str, str]:
    """``--weights FILE`` (one-backbone models) or ``--weights KEY=FILE`` -> {key: file}."""
    keys = [k for k, _ in model.blocks]
    out: dict[str, str] = {}
    for w in weights:
        key, sep, path = w.partition("=")
        if sep and key in keys:
            out[key] = path
        elif len(keys) == 1:
            out[keys[0]] = w
        else:
            raise ImgsentError(
                f"this model has {len(keys)} backbones: give weights as KEY=FILE with KEY one of {', '.join(keys)}"
            )
    return out


def model_backbones(model: SentimentModel, weights: Sequence[str] = (), *, int8: bool = False) -> list[Backbone]:
    """Build exactly the backbones the model's recipe names, and check their weights' fingerprints
    (``int8``: official int8 weights where they exist; a backbone whose numerics differ from its
    recipe's, because the run asked for other numerics by name, is not compared).

    Weights, in order: ``weights`` (``--weights``), the file named in the recipe if it exists
    here, then the backbone's own resolution (imgsent's cache, environment, download).
    """
    given = _weights_for(model, weights)
    recipes = {r["key"]: r for r in model.recipes}
    out = []
    for key, _dim in model.blocks:
        recipe = recipes.get(key)
        if recipe is None:
            raise ImgsentError(f"model recipe has no backbone entry for block {key}")
        spec = BackboneSpec.parse(recipe.get("spec", key))
        path = given.get(key) or (spec.weights if spec.weights and os.path.isfile(spec.weights) else None)
        spec_str = key + (f"@{path}" if path else "")
        if spec.source == "regions":  # its weight files are inside the spec (detector, crop backbone)
            spec_str = recipe.get("spec", key)
        # A model trained on random (seeded, test-only) backbone weights gets them again.
        random_weights = bool(recipe.get("fingerprint", {}).get("random")) and not path
        bb = create_backbone(spec_str, random_weights=random_weights, int8=int8)
        same_numerics = recipe.get("numerics", "fp32") == ("int8" if bb.int8 else "fp32")
        if same_numerics and not fingerprints_match(recipe.get("fingerprint", {}), bb.fingerprint):
            raise ImgsentError(
                f"weights for {key}{' (' + path + ')' if path else ''} are not the ones this model was trained on "
                f"(their probe features differ); point --weights at the right file"
            )
        out.append(bb)
    return out


def describe_model(model: str | None = None) -> str:
    """A model's card as text: what ``imgsent models [MODEL]`` prints."""
    from .weights import WEIGHTS_ENV, cache_dir

    m = resolve_model(model)
    name, version = model_identity(m, model)
    lines = [
        f"model: {name} {version} ({model_path(model)})",
        f"  head: {m.config.label}, classes: {', '.join(m.classes)}",
        f"  backbones: {', '.join(f'{k} ({d}-d)' for k, d in m.blocks)}",
        f"  training: {m.describe_training()}",
    ]
    lines += [f"  {k}: {v}" for k, v in m.training.get("card", {}).items()]
    if is_default(model):
        env = os.environ.get(WEIGHTS_ENV)
        m_spec = BackboneSpec.parse(m.recipes[0]["key"])
        cached = cached_float_weights(m_spec)
        if env:
            now = f"{env} (from ${WEIGHTS_ENV})"
        elif cached.is_file():
            now = f"{cached} (imgsent's cache)"
        else:
            now = "none here yet: the first score downloads and caches them"
        lines += [
            f"backbone weights a score would use now: {now}",
            "backbone weights for the default model are looked up in this order:",
            f"  1. --weights FILE, or ${WEIGHTS_ENV}=FILE (float mobilenet_v2 weights, .safetensors or .pth)",
            f"  2. imgsent's cache: {cache_dir() / 'weights'} (set $IMGSENT_HOME to move it)",
            "  3. download torchvision's official quantized MobileNetV2 (IMAGENET1K_QNNPACK_V1) through torchvision,",
            "     convert it to float32 and cache it (needs internet once)",
            "offline: copy the converted file (mobilenet_v2.IMAGENET1K_QNNPACK_V1.float32.safetensors) into the cache,",
            f"  or pass --weights / set ${WEIGHTS_ENV}. Weights that do not match the model are refused.",
        ]
    return "\n".join(lines)
