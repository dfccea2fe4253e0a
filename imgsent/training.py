"""Training: fit a head on labelled features; the :class:`SentimentModel` it returns; model bundles.

A bundle is a directory: ``head.safetensors`` (weights) and ``model.json`` (format version, head
type and hyperparameters, class names, the feature recipe: backbone specs, dims, weights
fingerprints, normalisation and block order; the training data summary, seed, imgsent version).
Loading reads JSON and safetensors only: nothing is unpickled.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from . import __version__
from .atomicio import write_json_atomic
from .backbones import fingerprints_match
from .bundles import (
    HEAD_FILE,
    HEAD_ROWS,
    MODEL_FILE,
    MODEL_FORMAT,
    MODEL_FORMAT_VERSION,
    head_label,
    read_bundle,
    read_head_arrays,
    training_summary,
)
from .calibration import Calibration
from .errors import ImgsentError, UselessModelWarning
from .features import FeatureSet, load
from .heads import HEADS, BlockNorm, create_head
from .labels import LabelJoin, join_labels, labels_from_folders, map_labels, read_labels
from .lanes import torch_threads
from .options import HEAD_NAMES
from .precision import HEAD_PRECISIONS
from .report import FitProgress
from .specs import file_record
from .weights import atomic_save_safetensors

# torch threads while a head trains: one. Its steps are small matrix products (batch 8 x 2,560 x
# 200 for nn) that gain little from a pool and lose much when the cores are shared: OpenMP's
# barrier waits for a core another process holds. bench/train_threads.py, 882 Twitter I images,
# 2 cores, seconds with 2 threads / 1: idle nn 7.0 / 7.6, moe1 3.3 / 4.7; beside 4 busy processes
# nn 31.2 / 14.8, moe1 19.8 / 9.6 (one thread: busy costs 2.0x idle; two threads: 4.5-5.9x).
FIT_THREADS = 1

# The paper's settings, one row per head (and MoE schedule). Flags override single fields.
# Not from the paper (it leaves them unsaid): the MoE dropout rate 0.5, and the NN's weight decay 0.
# Ours, not the paper's: ``min_steps``, the fewest optimiser steps a head trains for. The paper's
# schedules count epochs, which on a small labelled set leave a handful of steps (138 images, moe:
# one step an epoch, 120 in all at lr 1e-4) and the head stays near its start, predicting the
# majority class. A shorter schedule is stretched by a whole factor: more epochs, the lr decay at
# the same fraction of training. Measured on Twitter I 5-agree (MobileNetV2 + Lite2 features, 2
# random draws, accuracy on the images left out): 138 training images, moe1 82.7/79.4 -> 86.2/84.1,
# moe2 71.9/66.1 -> 86.2/83.9, nn 79.7/80.5 -> 86.4/86.0; 700 images, nn and moe1 unchanged (1,760
# and 360 steps), moe2 (180 steps) 83.5/84.1 -> 85.7/86.3 (it then runs moe1's 360 steps).
# ``min_steps=0`` (``--min-steps 0``) gives the paper's schedules exactly, as does an explicit epoch
# count (``--epochs N``: N epochs, unless ``--min-steps`` is given too).
_MOE = dict(lr=1e-4, batch_size=256, weight_decay=1e-3, dropout=0.5, normalize_blocks=False, min_steps=300)
HEAD_DEFAULTS: dict[str, dict] = {
    "nn": dict(
        epochs=20,
        lr=1e-4,
        batch_size=8,
        weight_decay=0.0,
        dropout=0.4,
        lr_step=0,
        normalize_blocks=True,
        min_steps=1000,
    ),
    "moe1": dict(_MOE, epochs=120, lr_step=40),
    "moe2": dict(_MOE, epochs=60, lr_step=20),
}


@dataclass
class TrainConfig:
    """Hyperparameters of one head. ``None`` fields take the paper's value for ``head``/``schedule``
    (``min_steps``: ours, see :data:`HEAD_DEFAULTS`)."""

    head: str = "nn"
    schedule: int = 1
    epochs: int | None = None
    lr: float | None = None
    batch_size: int | None = None
    weight_decay: float | None = None
    dropout: float | None = None
    lr_step: int | None = None
    lr_gamma: float = 0.1
    hidden: int = 200
    experts: int = 2
    normalize_blocks: bool | None = None
    seed: int = 0
    device: str = "cpu"
    min_steps: int | None = None

    @classmethod
    def named(cls, name: str, **overrides) -> TrainConfig:
        """``nn``, ``moe`` (schedule from ``schedule``, default 1), ``moe1``, ``moe2`` -> a config
        (overrides that are None are ignored). One vocabulary for train, evaluate and the API."""
        overrides = {k: v for k, v in overrides.items() if v is not None}
        if name in ("moe1", "moe2"):
            schedule = int(name[-1])
            if overrides.get("schedule", schedule) != schedule:
                raise ImgsentError(f"head {name} is MoE schedule {schedule}, but schedule={overrides['schedule']}")
            overrides["schedule"] = schedule
            name = "moe"
        if name not in HEAD_NAMES:
            raise ImgsentError(f"head must be one of {', '.join(HEAD_NAMES)}, got {name!r}")
        return cls(head=name, **overrides)

    def resolved(self) -> TrainConfig:
        if self.head not in HEADS:
            raise ImgsentError(f"head must be one of {', '.join(HEAD_NAMES)}, got {self.head!r}")
        if self.head == "moe" and self.schedule not in (1, 2):
            raise ImgsentError(f"schedule must be 1 or 2, got {self.schedule}")
        base = dict(HEAD_DEFAULTS["nn" if self.head == "nn" else f"moe{self.schedule}"])
        if self.epochs is not None:
            base["min_steps"] = 0  # epochs given: exactly that many, unless min_steps is given too
        filled = replace(self, **{k: v for k, v in base.items() if getattr(self, k) is None})
        if filled.min_steps < 0:
            raise ImgsentError(f"--min-steps must be >= 0, got {filled.min_steps}")
        for name in ("epochs", "batch_size", "hidden", "experts"):
            if getattr(filled, name) < 1:
                raise ImgsentError(f"{name} must be >= 1, got {getattr(filled, name)}")
        if not filled.lr > 0 or not 0 <= filled.dropout < 1 or filled.weight_decay < 0:
            raise ImgsentError("need lr > 0, 0 <= dropout < 1 and weight_decay >= 0")
        return filled

    @property
    def label(self) -> str:
        return head_label(self.head, self.schedule)

    def schedule_for(self, rows: int) -> tuple[int, int]:
        """(epochs, lr_step) for ``rows`` training rows: this (resolved) config's, stretched by a
        whole factor when its steps (epochs x batches per epoch) fall short of ``min_steps``."""
        steps = self.epochs * math.ceil(rows / self.batch_size)
        if not self.min_steps or steps >= self.min_steps:
            return self.epochs, self.lr_step
        factor = math.ceil(self.min_steps / steps)
        return self.epochs * factor, self.lr_step * factor


class SentimentModel:
    """A trained head plus everything needed to apply it: classes, feature blocks and recipes.

    ``predict_proba(X)`` takes a float matrix whose columns follow ``blocks`` (or a
    :class:`~imgsent.features.FeatureSet`, from which the blocks are picked) and returns (N, C).
    """

    def __init__(
        self,
        head: torch.nn.Module,
        config: TrainConfig,
        classes: list[str],
        blocks: list[tuple[str, int]],
        recipes: list[dict],
        feature_header: dict | None = None,
        training: dict | None = None,
        calibration: Calibration | None = None,
    ):
        self.head = head.eval()
        self.config = config
        self.classes = list(classes)
        self.blocks = [(str(k), int(d)) for k, d in blocks]
        self.recipes = recipes
        self.feature_header = {k: v for k, v in (feature_header or {}).items() if k in ("tta", "numerics")}
        self.training = training or {}
        self.norm = BlockNorm([d for _, d in self.blocks]) if config.normalize_blocks else None
        self.calibration = calibration  # applied after the head (see imgsent.calibration)

    @property
    def in_dim(self) -> int:
        return sum(d for _, d in self.blocks)

    def __repr__(self) -> str:
        t = self.training
        data = f", trained on {t['labelled']} images" if "labelled" in t else ""
        return (
            f"SentimentModel(head={self.config.label!r}, classes={self.classes}, "
            f"backbones={[k for k, _ in self.blocks]}, in_dim={self.in_dim}{data})"
        )

    def describe_training(self, with_warnings: bool = True) -> str:
        """One paragraph: head, data, join counts, training accuracy, the held-out estimate and (with
        ``with_warnings``) why the model may be useless (:func:`quality_warnings`)."""
        return training_summary(
            self.config.label, self.in_dim, self.classes, self.training, self.calibration, with_warnings
        )

    @property
    def positive_class(self) -> str | None:
        return "positive" if "positive" in self.classes else None

    def _matrix(self, X) -> np.ndarray:
        if isinstance(X, FeatureSet):
            return X.matrix([k for k, _ in self.blocks])
        X = np.asarray(X, dtype=np.float32)
        if X.ndim != 2 or X.shape[1] != self.in_dim:
            raise ImgsentError(f"features have shape {X.shape}; this model needs (N, {self.in_dim})")
        return X

    @torch.inference_mode()
    def predict_proba(
        self, X, precision: str = "fp32", device: torch.device | str | None = None, calibrated: bool = True
    ) -> np.ndarray:
        """Class probabilities (N, C), float32.

        The head always runs on blocks of exactly :data:`HEAD_ROWS` rows (the last one padded with
        zeros): float32 matrix kernels pick their blocking by the batch's shape, and one fixed shape
        makes a row's result independent of the rows around it, so scoring images batch by batch
        and scoring their store at once give identical numbers (tested).
        ``precision="bf16"`` runs the head under CPU autocast (bfloat16 inputs, float32
        accumulation): about twice as fast on CPUs with native bfloat16 (AVX512-BF16, AMX);
        probabilities move by about 1e-3. ``device``: where the head runs (default the CPU; a GPU run
        passes its card, the blocks stay fixed, so rows stay independent of their batch there too).
        ``calibrated``: apply the model's recalibration, if it has one (the default).
        """
        if precision not in HEAD_PRECISIONS:
            raise ImgsentError(f"head precision must be one of {', '.join(HEAD_PRECISIONS)}, got {precision!r}")
        X = self._matrix(X)
        n, d = X.shape
        dev = torch.device(device) if device is not None else torch.device("cpu")
        head = self._head_on(dev)
        out = np.empty((n, len(self.classes)), dtype=np.float32)
        amp = torch.autocast(dev.type, torch.bfloat16, enabled=precision == "bf16")
        with warnings.catch_warnings(), amp:
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            for s in range(0, n, HEAD_ROWS):
                block = X[s : s + HEAD_ROWS]
                m = len(block)
                if m < HEAD_ROWS:
                    block = np.concatenate([block, np.zeros((HEAD_ROWS - m, d), dtype=np.float32)])
                x = torch.from_numpy(block).to(dev, non_blocking=True)
                if self.norm is not None:
                    x = self.norm(x)
                out[s : s + m] = head.proba(head(x)).float()[:m].cpu().numpy()
        if calibrated and self.calibration is not None:
            out = self.calibration.apply(out)
        return out

    def _head_on(self, dev: torch.device) -> torch.nn.Module:
        """The head on ``dev`` (a copy, kept; the model's own head stays on the CPU)."""
        if dev.type == "cpu":
            return self.head
        cache = self.__dict__.setdefault("_heads", {})
        if dev not in cache:
            import copy

            cache[dev] = copy.deepcopy(self.head).to(dev).eval()
        return cache[dev]

    def predict(self, X) -> list[str]:
        return [self.classes[i] for i in self.predict_proba(X).argmax(1)]

    @property
    def numerics(self) -> str:
        """What the training features were computed in (fp32, tf32, bf16, fp16)."""
        return self.feature_header.get("numerics", "fp32")

    def check_recipe(self, header: dict, what: str = "the store", accept_numerics: str | None = None) -> None:
        """Refuse features made otherwise than the training features, naming the difference.
        Features of other numerics (bf16 features for an fp32-trained head...) only when
        ``accept_numerics`` names theirs (the user asked for it)."""
        have = {r.get("key"): r for r in header.get("backbones", [])}
        for key, dim in self.blocks:
            r = have.get(key)
            if r is None:
                raise ImgsentError(
                    f"{what} has no features from {key}, which this model needs (it has: {', '.join(have) or 'none'})"
                )
            if int(r.get("dim", -1)) != dim:
                raise ImgsentError(f"{what}: {key} features are {r.get('dim')}-d, the model expects {dim}-d")
        for mine in self.recipes:
            theirs = have[mine["key"]]
            if theirs.get("preprocess") != mine.get("preprocess"):
                raise ImgsentError(f"{what}: {mine['key']} used other preprocessing than the model's training features")
            if mine.get("numerics", "fp32") != theirs.get("numerics", "fp32"):
                continue  # int8 weights against float ones: accepted below only when asked for by name
            if not fingerprints_match(mine.get("fingerprint", {}), theirs.get("fingerprint", {})):
                raise ImgsentError(
                    f"{what}: {mine['key']} features come from other weights than the model was trained on "
                    f"(fingerprints differ)"
                )
        want_tta, got_tta = self.feature_header.get("tta", "none"), header.get("tta", "none")
        if want_tta != got_tta:
            raise ImgsentError(
                f"{what} used test-time augmentation {got_tta!r}; the model was trained with {want_tta!r}"
            )
        got = header.get("numerics", "fp32")
        if got != self.numerics and got != accept_numerics:
            raise ImgsentError(
                f"{what} holds {got} features; the model was trained on {self.numerics} features (re-extract with "
                f"precision {self.numerics}, or accept them with precision {got})"
            )

    # --- bundles ---------------------------------------------------------------------------------
    def to_json(self) -> dict:
        return {
            "format": MODEL_FORMAT,
            "format_version": MODEL_FORMAT_VERSION,
            "imgsent_version": __version__,
            "head": {"kind": self.config.head, "params": asdict(self.config)},
            "classes": self.classes,
            "positive_class": self.positive_class,
            "features": {
                "blocks": [{"key": k, "dim": d} for k, d in self.blocks],
                "normalize_blocks": bool(self.config.normalize_blocks),
                "tta": self.feature_header.get("tta", "none"),
                "numerics": self.numerics,
                "backbones": self.recipes,
            },
            "training": self.training,
            "calibration": self.calibration.to_json() if self.calibration is not None else None,
            "seed": self.config.seed,
        }

    def save(self, path: str, weights_dtype: str = "float32") -> None:
        """Write the bundle directory ``path`` (created if needed). ``weights_dtype="float16"``
        stores the head's weights rounded to float16 (half the file; they load into float32 as
        any bundle's do): what the packaged default does to stay under 2 MB."""
        if weights_dtype not in ("float32", "float16"):
            raise ImgsentError(f"weights_dtype must be float32 or float16, got {weights_dtype!r}")
        os.makedirs(path, exist_ok=True)
        dtype = torch.float16 if weights_dtype == "float16" else None
        state = {
            k: v.to(dtype) if dtype is not None and v.is_floating_point() else v
            for k, v in self.head.state_dict().items()
        }
        atomic_save_safetensors(state, Path(path) / HEAD_FILE)
        write_json_atomic(os.path.join(path, MODEL_FILE), self.to_json())


def load_model(path: str) -> SentimentModel:
    """Load a bundle directory written by :meth:`SentimentModel.save` (JSON + safetensors only).

    A missing, malformed or hand-edited bundle raises :class:`ImgsentError` naming what is wrong
    (``model.json`` is checked by :func:`imgsent.bundles.read_bundle`).
    """
    b = read_bundle(path)
    known = {f for f in TrainConfig.__dataclass_fields__}
    try:
        config = TrainConfig(**{k: v for k, v in b.params.items() if k in known}).resolved()
        if config.hidden > 100_000 or config.experts > 1000:
            raise ValueError("hidden/experts too large")
        head = create_head(config.head, sum(d for _, d in b.blocks), len(b.classes), asdict(config))
    except (TypeError, ValueError, ImgsentError) as exc:
        raise ImgsentError(f"model {path}: bad head parameters ({exc})") from None
    state = {k: torch.from_numpy(v) for k, v in read_head_arrays(path).items()}
    try:
        head.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ImgsentError(
            f"model {path}: {HEAD_FILE} does not match model.json ({str(exc).splitlines()[0]})"
        ) from None
    return SentimentModel(head, config, b.classes, b.blocks, b.recipes, b.header, b.training, b.calibration)


@dataclass
class LabelledFeatures:
    """A store's features joined with labels: ``X[i]`` has class ``classes[y[i]]``, id ``ids[i]``."""

    X: np.ndarray
    y: np.ndarray
    ids: list[str]
    paths: list[str]
    classes: list[str]
    blocks: list[tuple[str, int]]
    recipes: list[dict]
    header: dict
    join: LabelJoin = field(repr=False, default=None)


def load_labelled(
    store: str,
    *,
    labels: str | None = None,
    labels_from_folders_: bool = False,
    mapping: str = "auto",
    blocks: Sequence[str] | None = None,
    id_column: str | None = None,
    label_column: str | None = None,
) -> LabelledFeatures:
    """Load a store (its ``blocks``, default all) and join labels from a file or from folder names."""
    if (labels is None) == (not labels_from_folders_):
        raise ImgsentError("give exactly one of --labels FILE or --labels-from-folders")
    fs = load(store, backbones=blocks, only_ok=False)
    raw = (
        read_labels(labels, id_column=id_column, label_column=label_column)
        if labels is not None
        else labels_from_folders(fs.ids)
    )
    join = join_labels(fs.ids, fs.paths, fs.status, map_labels(raw, mapping))
    return LabelledFeatures(
        X=fs.X[join.rows],
        y=join.y,
        ids=[fs.ids[i] for i in join.rows],
        paths=[fs.paths[i] for i in join.rows],
        classes=join.classes,
        blocks=fs.blocks,
        recipes=fs.recipes,
        header=fs.header,
        join=join,
    )


def fit(
    X: np.ndarray,
    y: np.ndarray,
    classes: list[str],
    blocks: list[tuple[str, int]],
    config: TrainConfig,
    *,
    recipes: list[dict] | None = None,
    feature_header: dict | None = None,
    progress: bool | FitProgress = False,
    threads: int | None = None,
    what: str = "",
) -> SentimentModel:
    """Train one head on ``X`` (N, D) with integer labels ``y``; deterministic for a given seed.
    ``threads``: torch threads while it trains (default :data:`FIT_THREADS`). ``progress``: a bar
    of the epochs on a terminal; a :class:`~imgsent.report.FitProgress` also gets each epoch (and
    ``what`` this fit is) for its log lines."""
    with torch_threads(threads or FIT_THREADS):
        return _fit(X, y, classes, blocks, config, recipes, feature_header, progress, what)


def _fit(X, y, classes, blocks, config, recipes, feature_header, progress, what) -> SentimentModel:
    cfg = config.resolved()
    X = np.asarray(X, dtype=np.float32)
    if len(X) != len(y) or len(X) == 0:
        raise ImgsentError(f"need as many labels as feature rows (got {len(X)} rows, {len(y)} labels)")
    device = torch.device(cfg.device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        head = create_head(cfg.head, X.shape[1], len(classes), asdict(cfg)).to(device)
        norm = BlockNorm([d for _, d in blocks]) if cfg.normalize_blocks else None
        Xt = torch.from_numpy(X).to(device)
        if norm is not None:
            Xt = norm(Xt)
        yt = torch.as_tensor(y, dtype=torch.long, device=device)
        gen = torch.Generator().manual_seed(cfg.seed)
        n, bs = len(Xt), cfg.batch_size
        steps = math.ceil(n / bs)
        epochs, lr_step = cfg.schedule_for(n)
        opt = torch.optim.Adam(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=lr_step, gamma=cfg.lr_gamma) if lr_step else None
        tracker = progress if isinstance(progress, FitProgress) else None
        label = tracker.next_fit(what or cfg.label) if tracker is not None else cfg.label
        bar = _EpochBar(epochs, label, bool(progress))
        head.train()
        for _epoch in range(epochs):
            perm = torch.randperm(n, generator=gen).to(device)
            total = 0.0
            for s in range(0, n, bs):
                idx = perm[s : s + bs]
                loss = head.loss(head(Xt[idx]), yt[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += float(loss.detach())
            if sched is not None:
                sched.step()
            bar.update(total / steps)
            if tracker is not None:
                tracker.at_epoch(_epoch + 1, epochs)
        bar.close()
        head.eval()
    head = head.cpu()
    model = SentimentModel(head, cfg, classes, blocks, recipes or [], feature_header)
    model.training = {
        "rows": int(n),
        "per_class": {c: int((y == k).sum()) for k, c in enumerate(classes)},
        "schedule": {"epochs": epochs, "lr_step": lr_step, "optimiser_steps": epochs * steps},
    }
    return model


class _EpochBar:
    """A bar of the epochs on a terminal; nothing elsewhere (rich would leave a blank line in a log
    for each head trained)."""

    def __init__(self, epochs: int, label: str, enabled: bool):
        import sys

        self._p = None
        if enabled and sys.stderr.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

            from .report import stderr_console

            self._p = Progress(
                TextColumn(f"train {label}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]:.4f}"),
                console=stderr_console,
                transient=True,
            )
            self._task = self._p.add_task("epochs", total=epochs, loss=float("nan"))
            self._p.start()

    def update(self, loss: float) -> None:
        if self._p is not None:
            self._p.update(self._task, advance=1, loss=loss)

    def close(self) -> None:
        if self._p is not None:
            self._p.stop()


def held_out_estimate(data: LabelledFeatures, config: TrainConfig, folds: int, progress=False) -> dict:
    """Stratified ``folds``-fold accuracy of ``config`` on ``data`` (seeded by ``config.seed``),
    next to the majority-class baseline: what to expect on unseen images of the same kind."""
    from .protocols import stratified_kfold

    counts = np.bincount(data.y, minlength=len(data.classes))
    baseline = float(counts.max() / counts.sum())
    k = min(folds, int(counts[counts > 0].min()))
    if isinstance(progress, FitProgress):
        progress.fits = (k if k >= 2 else 0) + 1  # the folds this set allows, then the final fit
    if k < 2:
        return {"skipped": f"a class has fewer than 2 images, too few for {folds}-fold cross-validation"}
    from .protocols import metrics

    accs, balanced = [], []
    for j, sp in enumerate(stratified_kfold(data.y, k, seed=config.seed), start=1):
        m = fit(
            data.X[sp.train],
            data.y[sp.train],
            data.classes,
            data.blocks,
            config,
            progress=progress,
            what=f"fold {j} of {k}",
        )
        got = metrics(data.y[sp.test], m.predict_proba(data.X[sp.test]))
        accs.append(got["accuracy"])
        balanced.append(got["balanced_accuracy"])
    return {
        "method": f"stratified {k}-fold cross-validation, seed {config.seed}",
        "folds": k,
        "accuracy_mean": round(float(np.mean(accs)), 6),
        "accuracy_std": round(float(np.std(accs)), 6),
        "per_fold": [round(a, 6) for a in accs],
        "balanced_accuracy_mean": round(float(np.mean(balanced)), 6),
        "majority_baseline": round(baseline, 6),
    }


MARGIN = 0.02  # a held-out accuracy within this of the majority baseline is not "clearly above" it
CHANCE_MARGIN = 0.05  # a balanced accuracy within this of chance (1 / classes) is "near chance"


def quality_warnings(held_out: dict | None, train_pred: np.ndarray, y: np.ndarray, classes: list[str]) -> list[str]:
    """Why a trained model may be useless, each as one sentence (none: it learnt something): a
    held-out accuracy not clearly above the majority baseline (by :data:`MARGIN` and one standard
    deviation of the folds), a balanced accuracy near chance, or, with no held-out estimate, one
    class predicted for every training image of several classes."""
    out = []
    if held_out and "accuracy_mean" in held_out:
        acc, base = held_out["accuracy_mean"], held_out["majority_baseline"]
        if acc < base + max(MARGIN, held_out.get("accuracy_std", 0.0)):
            out.append(
                f"the held-out accuracy ({100 * acc:.2f}%) is not clearly above the majority-class baseline "
                f"({100 * base:.2f}%): this model may do no better than always predicting the commonest class"
            )
        bal = held_out.get("balanced_accuracy_mean")
        chance = 1 / len(classes)
        if bal is not None and bal < chance + CHANCE_MARGIN:
            out.append(f"the held-out balanced accuracy ({100 * bal:.2f}%) is near chance ({100 * chance:.0f}%)")
    elif len(np.unique(y)) > 1 and len(np.unique(train_pred)) == 1:
        out.append(f"the model predicts {classes[int(train_pred[0])]} for every training image")
    if out:
        out[-1] += "; more labelled images, a longer schedule (--epochs, --min-steps) or another head may help"
    return out


def check_model_output(out: str, overwrite: bool) -> None:
    """``out`` may be new, empty, or a previous model bundle; anything else (an image folder, a
    feature store) only with ``overwrite``."""
    if not os.path.exists(out):
        return
    if not os.path.isdir(out):
        raise ImgsentError(f"output {out} exists and is not a directory")
    others = sorted(set(os.listdir(out)) - {MODEL_FILE, HEAD_FILE})
    if others and not overwrite:
        raise ImgsentError(
            f"{out} holds other files ({', '.join(others[:3])}{', ...' if len(others) > 3 else ''}), not just a "
            f"model; choose another output directory, or pass --overwrite to write into it anyway"
        )


def train(
    store: str,
    *,
    labels: str | None = None,
    labels_from_folders: bool = False,
    mapping: str = "auto",
    head: str = "nn",
    blocks: Sequence[str] | None = None,
    out: str | None = None,
    overwrite: bool = False,
    id_column: str | None = None,
    label_column: str | None = None,
    cv: int = 5,
    progress: bool = False,
    features: Sequence[str] | None = None,
    **hyper,
) -> SentimentModel:
    """Train a head (``nn``, ``moe``, ``moe1``, ``moe2``) on a feature store and labels.

    ``blocks``: backbone keys to train on (default all; ``features`` is its old name). ``hyper``:
    any :class:`TrainConfig` field (``epochs``, ``lr``, ``seed``, ``schedule``...); unset ones
    take the paper's values. With ``cv`` >= 2, a stratified ``cv``-fold held-out accuracy and the
    majority baseline are measured first and recorded in ``model.training["held_out"]``; then the
    final model is fit on every labelled image. Writes the bundle to ``out`` when given.
    """
    if out is not None:
        check_model_output(out, overwrite)
    data = load_labelled(
        store,
        labels=labels,
        labels_from_folders_=labels_from_folders,
        mapping=mapping,
        blocks=blocks if blocks is not None else features,
        id_column=id_column,
        label_column=label_column,
    )
    config = TrainConfig.named(head, **hyper)
    fits = 1 + (cv if cv >= 2 else 0)
    start = f"{len(data.y)} labelled images, {config.label} head" + (
        f"; a {cv}-fold held-out estimate first, then the final fit" if cv >= 2 else ""
    )
    with FitProgress("train", fits, start, enabled=progress) as tracker:
        held_out = held_out_estimate(data, config, cv, progress=tracker) if cv >= 2 else None
        model = fit(
            data.X,
            data.y,
            data.classes,
            data.blocks,
            config,
            recipes=data.recipes,
            feature_header=data.header,
            progress=tracker,
            what="final model",
        )
    train_pred = model.predict_proba(data.X).argmax(1)
    train_acc = float((train_pred == data.y).mean())
    model.training = {
        **data.join.summary(),
        "train_accuracy": round(train_acc, 6),
        "schedule": model.training["schedule"],
        "store": os.path.abspath(store),
    }
    if labels is not None:
        model.training["labels_file"] = file_record(labels)
    if held_out is not None:
        model.training["held_out"] = held_out
    concerns = quality_warnings(held_out, train_pred, data.y, data.classes)
    if concerns:
        model.training["warnings"] = concerns
    for text in concerns:
        warnings.warn(text, UselessModelWarning, stacklevel=2)
    if out is not None:
        model.save(out)
    return model
