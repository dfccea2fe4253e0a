"""Model bundles read without torch: where a packaged model lives, ``model.json`` checked, the
head's weights as numpy arrays, the model's version, and the NN / MoE heads' forward pass in numpy.

:func:`imgsent.training.load_model` builds its torch head on :func:`read_bundle`'s checks, so a bundle is
judged one way; :class:`NumpyModel` is what a warm score that runs every backbone on ONNX Runtime
uses instead (:mod:`imgsent.ortengine`): the same probabilities as the torch head (float32, within
1e-6; tested), and nothing of torch imported.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources

import numpy as np

from .calibration import Calibration
from .errors import ImgsentError
from .specs import MODELS_ENV, BackboneSpec, file_key, file_sha256, normalize_key, normalized_recipe, spec_files

MODEL_FORMAT = "imgsent-model"
MODEL_FORMAT_VERSION = 1
HEAD_FILE = "head.safetensors"
MODEL_FILE = "model.json"
HEAD_ROWS = 1024  # the head always sees blocks of exactly this many rows (see SentimentModel.predict_proba)

DEFAULT_MODEL = "default"
# name -> (folder inside the package, what it is). ``--model NAME`` picks one; a local folder of
# the same name is ./NAME.
PACKAGED_MODELS = {
    "default": (
        "default_model",
        "the default polarity model (EfficientNet-Lite1 + Lite2 features, faces and their expressions)",
    ),
    "lite": ("lite_model", "the previous default (v2: EfficientNet-Lite1 + Lite2 features, no faces)"),
    "mobilenet": ("mobilenet_model", "a faster, less accurate polarity model (MobileNetV2 features)"),
}


def packaged_name(model: str | None) -> str | None:
    """The packaged model ``model`` names (``None`` is the default), or None for a bundle directory."""
    if model is None:
        return DEFAULT_MODEL
    return model if model in PACKAGED_MODELS else None


def model_path(model: str | None) -> str:
    """The bundle directory of ``model``: a packaged model's name (``None`` = default), else a path."""
    name = packaged_name(model)
    return str(resources.files("imgsent") / PACKAGED_MODELS[name][0]) if name else str(model)


def check_model_exists(model: str | None) -> str:
    """``model``'s bundle directory, or the one-line error for a name that is neither."""
    path = model_path(model)
    if not os.path.exists(path):
        raise ImgsentError(
            f"no model {model!r}: not a packaged model ({', '.join(PACKAGED_MODELS)}), and not a model directory"
        )
    return path


def _bad(path: str, why: str) -> ImgsentError:
    return ImgsentError(f"model {path}: {why}")


@dataclass
class Bundle:
    """What ``model.json`` says, checked (:func:`read_bundle`)."""

    path: str
    classes: list[str]
    blocks: list[tuple[str, int]]
    recipes: list[dict]
    params: dict  # the head's kind and hyperparameters
    normalize_blocks: bool | None
    header: dict  # tta, numerics of the training features
    training: dict = field(default_factory=dict)
    calibration: Calibration | None = None


def read_bundle(path: str) -> Bundle:
    """Read and check a bundle directory's ``model.json`` (JSON only). A missing, malformed or
    hand-edited file raises :class:`ImgsentError` naming what is wrong."""
    json_path = os.path.join(path, MODEL_FILE)
    if not os.path.isdir(path) or not os.path.isfile(json_path):
        raise _bad(path, f"not a model directory (no {MODEL_FILE})")
    try:
        with open(json_path) as fh:
            meta = json.load(fh)
    except ValueError as exc:
        raise _bad(path, f"{MODEL_FILE} is not valid JSON ({exc})") from None
    except OSError as exc:
        raise _bad(path, f"cannot read {MODEL_FILE}: {exc.strerror}") from None
    if not isinstance(meta, dict) or meta.get("format") != MODEL_FORMAT:
        raise _bad(path, f"{MODEL_FILE} is not an imgsent model")
    if not isinstance(meta.get("format_version"), int) or meta["format_version"] > MODEL_FORMAT_VERSION:
        raise _bad(path, f"format version {meta.get('format_version')!r} is not one this imgsent reads")
    try:
        head_meta, feats = meta["head"], meta["features"]
        classes = meta["classes"]
        params = dict(head_meta["params"])
        blocks = [(normalize_key(b["key"]), b["dim"]) for b in feats["blocks"]]
        recipes = feats["backbones"]
    except (KeyError, TypeError) as exc:
        raise _bad(path, f"{MODEL_FILE} lacks field {exc}") from None
    if not (isinstance(classes, list) and len(classes) >= 2 and all(isinstance(c, str) for c in classes)):
        raise _bad(path, "'classes' must be a list of at least two names")
    if not all(isinstance(k, str) and isinstance(d, int) and 0 < d <= 1_000_000 for k, d in blocks) or not blocks:
        raise _bad(path, "'features.blocks' must list {key, dim} with 0 < dim <= 1000000")
    if not isinstance(recipes, list) or not all(isinstance(r, dict) and "key" in r for r in recipes):
        raise _bad(path, "'features.backbones' must be a list of backbone recipes")
    recipes = [normalized_recipe(r) for r in recipes]  # models before 0.5 keyed files by their whole path
    calibration = None
    if meta.get("calibration"):
        try:
            calibration = Calibration.from_json(meta["calibration"])
        except (TypeError, KeyError, ImgsentError) as exc:
            raise _bad(path, f"bad calibration ({exc})") from None
    header = {"tta": feats.get("tta", "none"), "numerics": feats.get("numerics", "fp32")}
    normalize = feats.get("normalize_blocks")
    return Bundle(path, classes, blocks, recipes, params, normalize, header, meta.get("training", {}), calibration)


def read_head_arrays(path: str) -> dict[str, np.ndarray]:
    """The head's weights of bundle ``path`` as float32 numpy arrays (float16 storage widened)."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        state = load_file(os.path.join(path, HEAD_FILE))
    except (OSError, SafetensorError) as exc:
        raise _bad(path, f"cannot read {HEAD_FILE} ({exc})") from None
    return {k: v.astype(np.float32) if v.dtype.kind == "f" else v for k, v in state.items()}


def head_version(arrays: dict[str, np.ndarray], calibration: Calibration | None) -> str:
    """A model's version as score rows record it: the first 12 hex digits of a hash of its head's
    float32 weights (sorted by name) and of its recalibration, if any."""
    h = hashlib.sha256()
    for k, v in sorted(arrays.items()):
        h.update(k.encode())
        h.update(np.ascontiguousarray(v).tobytes())
    if calibration is not None:  # a recalibrated model scores differently: another version
        h.update(json.dumps(calibration.to_json(), sort_keys=True).encode())
    return h.hexdigest()[:12]


def head_label(head: str, schedule: int | None) -> str:
    """A head's name as ``--head`` takes it: ``nn``, ``moe1``, ``moe2``."""
    return "nn" if head == "nn" else f"moe{schedule}"


def training_summary(
    label: str, in_dim: int, classes: list[str], training: dict, calibration: Calibration | None, with_warnings: bool
) -> str:
    """One paragraph about a model: head, data, join counts, training accuracy, the held-out
    estimate and (with ``with_warnings``) why the model may be useless; its recalibration. Models
    taught in the labelling loop (``imgsent label --model-out``) say their learner and their
    out-of-fold estimate instead."""
    t = training
    parts = [f"{label} head on {in_dim}-d features, classes {', '.join(classes)}"]
    if "images_without_label" in t:
        parts.append(
            f"{t['labelled']} labelled images (unlabelled images {t['images_without_label']}, labels without "
            f"image {t['labels_without_image']}, labelled error rows {t['labelled_error_rows']})"
        )
    elif "labelled" in t:
        modes = ", ".join(f"{n} {m}" for m, n in t.get("by_mode", {}).items())
        parts.append(f"{t['labelled']} labelled images" + (f" ({modes})" if modes else ""))
    if "learner" in t:
        parts.append(f"learner: {t['learner']}")
    if "train_accuracy" in t:
        parts.append(f"training accuracy {100 * t['train_accuracy']:.2f}% (optimistic: seen data)")
    ho = t.get("held_out")
    if ho and "accuracy_mean" in ho:
        parts.append(
            f"held-out accuracy {100 * ho['accuracy_mean']:.2f} ± {100 * ho['accuracy_std']:.2f}% "
            f"({ho['method']}); majority-class baseline {100 * ho['majority_baseline']:.2f}%"
        )
    elif ho and "accuracy" in ho:
        interval = f", {100 * ho['low']:.1f}-{100 * ho['high']:.1f}%" if "low" in ho and "high" in ho else ""
        parts.append(f"held-out accuracy {100 * ho['accuracy']:.2f}%{interval} ({ho.get('method', '?')})")
    elif ho:
        parts.append(f"no held-out estimate: {ho.get('skipped')}")
    parts += [f"WARNING: {w}" for w in t.get("warnings", []) if with_warnings]
    if calibration is not None:
        c = calibration.sample
        parts.append(
            f"recalibrated ({calibration.method}) on {c.get('size')} labelled images"
            f"{' of ' + c['source'] if c.get('source') else ''}{' on ' + c['date'] if c.get('date') else ''}"
        )
    return "; ".join(parts)


def model_name(model: str | None) -> str:
    """A model's name as score rows record it: ``imgsent-NAME`` for a packaged model, else the
    bundle's directory name."""
    packaged = packaged_name(model)
    return f"imgsent-{packaged}" if packaged else os.path.basename(os.path.normpath(str(model)))


# --- the files a recipe reads -----------------------------------------------------------------


@dataclass
class RecipeFile:
    """A local file a backbone's recipe names: where it was (``written``, as in the spec;
    ``recorded``, absolute), its content hash (None for recipes before 0.5), where it is now."""

    key: str
    name: str
    sha256: str | None
    written: str
    recorded: str
    optional: bool  # @FILE weights of a timm / torchvision backbone: else its own resolution serves
    path: str | None = None
    where: str = "not found"


def search_places(model_dir: str | None, models_dirs: Sequence[str] = ()) -> list[tuple[str, str]]:
    """Where a model looks for its files, in order: beside the bundle, ``$IMGSENT_MODELS``,
    each ``--models DIR``; then (not listed here) the path the file had when the model was made."""
    places = [(model_dir, "beside the model")] if model_dir else []
    if os.environ.get(MODELS_ENV):
        places.append((os.environ[MODELS_ENV], f"${MODELS_ENV}"))
    places += [(d, f"--models {d}") for d in models_dirs]
    return places


def recipe_files(recipe: dict) -> list[RecipeFile]:
    """The files ``recipe``'s spec names, with the name and hash recorded for each."""
    text = recipe.get("spec", recipe["key"])
    spec = BackboneSpec.parse(text)
    written = spec_files(text)
    records = recipe.get("files") or [{"name": file_key(p), "sha256": None, "path": p} for p in written]
    if len(records) != len(written):
        raise ImgsentError(
            f"model recipe for {recipe['key']} lists {len(records)} files for {len(written)} in its spec"
        )
    weights = spec.weights if spec.source in ("timm", "torchvision") else None
    return [
        RecipeFile(recipe["key"], r["name"], r.get("sha256"), w, r.get("path", w), optional=w == weights)
        for w, r in zip(written, records)
    ]


def locate(f: RecipeFile, places: list[tuple[str, str]]) -> RecipeFile:
    """``f`` with ``path``/``where`` set: the first place holding a file of that name and hash.
    Only files of the wrong hash: one line naming both hashes."""
    seen, wrong = set(), []
    candidates = [(os.path.join(d, f.name), where) for d, where in places] + [(f.recorded, "its recorded path")]
    for path, where in candidates:
        real = os.path.realpath(path)
        if real in seen or not os.path.isfile(path):
            continue
        seen.add(real)
        digest = file_sha256(path) if f.sha256 else None
        if digest == f.sha256:
            f.path, f.where = path, where
            return f
        wrong.append((path, digest))
    if wrong:
        path, digest = wrong[0]
        raise ImgsentError(
            f"{path} has sha256 {digest}, but this model needs the {f.name} with sha256 {f.sha256} (for {f.key})"
        )
    return f


def model_files(model, model_dir: str | None, models_dirs: Sequence[str] = ()) -> list[RecipeFile]:
    """Every file the model's backbones read (``model``: a bundle's model, torch or numpy head:
    its ``recipes`` and ``blocks``), located (see :func:`search_places`)."""
    places = search_places(model_dir, models_dirs)
    recipes = {r["key"]: r for r in model.recipes}
    return [locate(f, places) for key, _ in model.blocks if key in recipes for f in recipe_files(recipes[key])]


# --- the heads in numpy ---------------------------------------------------------------------------


def _linear(x: np.ndarray, arrays: dict, name: str) -> np.ndarray:
    return x @ arrays[f"{name}.weight"].T + arrays[f"{name}.bias"]


def _softmax(z: np.ndarray, axis: int) -> np.ndarray:
    e = np.exp(z - z.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def _nn_proba(x: np.ndarray, w: dict) -> np.ndarray:
    hidden = np.maximum(_linear(x, w, "net.0"), 0)  # Linear -> ReLU (-> Dropout: none at inference)
    return _softmax(_linear(hidden, w, "net.3"), axis=1)


def _moe_proba(x: np.ndarray, w: dict) -> np.ndarray:
    i = np.maximum(_linear(x, w, "embed.0"), 0)  # Linear -> Dropout (none) -> ReLU
    gates = _linear(i, w, "gate")
    experts = _linear(i, w, "expert")
    c = gates.shape[1] - experts.shape[1]  # C * (E + 1) - C * E
    e_per = experts.shape[1] // c
    e = 1.0 / (1.0 + np.exp(-experts.reshape(-1, c, e_per)))
    g = _softmax(gates.reshape(-1, c, e_per + 1), axis=2)
    out = (e * g[:, :, :e_per]).sum(axis=2)  # the dummy expert contributes 0
    return out / np.maximum(out.sum(axis=1, keepdims=True), 1e-12)


HEAD_FORWARD = {"nn": (_nn_proba, ("net.0", "net.3")), "moe": (_moe_proba, ("embed.0", "expert", "gate"))}


class NumpyModel:
    """A bundle's head applied in numpy: what :class:`~imgsent.training.SentimentModel` offers
    scoring (``classes``, ``blocks``, ``positive_class``, ``numerics``, ``predict_proba``),
    without torch. Rows go through in fixed blocks of :data:`HEAD_ROWS` as the torch head's do."""

    def __init__(self, bundle: Bundle, arrays: dict[str, np.ndarray]):
        kind = bundle.params.get("head")
        if kind not in HEAD_FORWARD:
            raise _bad(bundle.path, f"head {kind!r} has no numpy forward")
        forward, layers = HEAD_FORWARD[kind]
        want = {f"{layer}.{p}" for layer in layers for p in ("weight", "bias")}
        if set(arrays) != want:
            raise _bad(bundle.path, f"{HEAD_FILE} does not match model.json (a {kind} head)")
        self.bundle = bundle
        self.classes = list(bundle.classes)
        self.blocks = [(str(k), int(d)) for k, d in bundle.blocks]
        self.recipes = bundle.recipes
        self.feature_header = dict(bundle.header)
        self.calibration = bundle.calibration
        self.training = dict(bundle.training)
        self.label = head_label(kind, bundle.params.get("schedule"))
        self._forward = forward
        self._arrays = arrays
        normalize = bundle.normalize_blocks
        self._normalize = (kind == "nn") if normalize is None else bool(normalize)
        first = arrays[f"{layers[0]}.weight"]
        if first.shape[1] != self.in_dim:
            raise _bad(bundle.path, f"{HEAD_FILE} takes {first.shape[1]}-d features, model.json lists {self.in_dim}")

    @property
    def in_dim(self) -> int:
        return sum(d for _, d in self.blocks)

    @property
    def positive_class(self) -> str | None:
        return "positive" if "positive" in self.classes else None

    @property
    def numerics(self) -> str:
        return self.feature_header.get("numerics", "fp32")

    def version(self) -> str:
        return head_version(self._arrays, self.calibration)

    def describe_training(self, with_warnings: bool = True) -> str:
        return training_summary(self.label, self.in_dim, self.classes, self.training, self.calibration, with_warnings)

    def _normalized(self, x: np.ndarray) -> np.ndarray:
        parts, start = [], 0
        for _, d in self.blocks:
            p = x[:, start : start + d]
            parts.append(p / np.maximum(np.linalg.norm(p, axis=1, keepdims=True), 1e-12))
            start += d
        return np.concatenate(parts, axis=1)

    def predict_proba(self, X, precision: str = "fp32", device=None, calibrated: bool = True) -> np.ndarray:
        """Class probabilities (N, C), float32 (``precision`` and ``device`` are accepted for the
        torch head's signature: only fp32 on the CPU reaches here)."""
        X = np.asarray(X, dtype=np.float32)
        if X.ndim != 2 or X.shape[1] != self.in_dim:
            raise ImgsentError(f"features have shape {X.shape}; this model needs (N, {self.in_dim})")
        n = len(X)
        out = np.empty((n, len(self.classes)), dtype=np.float32)
        for s in range(0, n, HEAD_ROWS):
            block = X[s : s + HEAD_ROWS]
            m = len(block)
            if m < HEAD_ROWS:
                block = np.concatenate([block, np.zeros((HEAD_ROWS - m, X.shape[1]), dtype=np.float32)])
            if self._normalize:
                block = self._normalized(block)
            out[s : s + m] = self._forward(block, self._arrays)[:m]
        if calibrated and self.calibration is not None:
            out = self.calibration.apply(out)
        return out


def numpy_model(model: str | None) -> NumpyModel:
    """The packaged model or bundle directory ``model`` with its head in numpy."""
    path = check_model_exists(model)
    return NumpyModel(read_bundle(path), read_head_arrays(path))
