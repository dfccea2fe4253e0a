"""``evaluate``: run a protocol over a labelled feature store for several heads / feature sets and
report mean +- std of accuracy, macro-F1, balanced accuracy and ROC-AUC (the paper's Table II layout).
"""

from __future__ import annotations

import csv
import json
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from .atomicio import atomic_open, write_json_atomic
from .batches import Blocks
from .errors import ImgsentError
from .protocols import (
    PROTOCOLS,
    Split,
    metrics,
    predefined_from_files,
    predefined_from_folders,
    random_splits,
    stratified_kfold,
    train_val_test,
)
from .report import FitProgress
from .training import LabelledFeatures, TrainConfig, fit, load_labelled

METRICS = ("accuracy", "macro_f1", "balanced_accuracy", "roc_auc")


@dataclass
class ConfigResult:
    features: str
    head: str
    views: str = "all"  # ablation rows: "alone", "all", "all but KEY"
    per_split: list[dict] = field(default_factory=list)
    predictions: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list, repr=False)  # (y, proba)

    def mean_std(self, metric: str) -> tuple[float, float]:
        vals = np.asarray([s[metric] for s in self.per_split], dtype=float)
        vals = vals[~np.isnan(vals)]  # ROC-AUC is NaN on a split whose test part holds one class
        return (float(vals.mean()), float(vals.std())) if len(vals) else (float("nan"), float("nan"))

    def to_dict(self) -> dict:
        d = {"features": self.features, "head": self.head, "views": self.views}
        for m in METRICS:
            d[f"{m}_mean"], d[f"{m}_std"] = self.mean_std(m)
        d["confusion"] = np.sum([s["confusion"] for s in self.per_split], axis=0).tolist()
        d["per_split"] = self.per_split
        return d


@dataclass
class EvaluationReport:
    protocol: str
    splits: list[dict]
    classes: list[str]
    data: dict
    results: list[ConfigResult]

    def to_dict(self) -> dict:
        return {
            "protocol": self.protocol,
            "classes": self.classes,
            "data": self.data,
            "splits": self.splits,
            "results": [r.to_dict() for r in self.results],
        }

    def save(self, path: str) -> None:
        if path.lower().endswith(".csv"):
            with atomic_open(path, "w", newline="") as fh:
                w = csv.writer(fh)
                w.writerow(
                    ["features", "head"]
                    + [f"{m}_{s}" for m in METRICS for s in ("mean", "std")]
                    + ["confusion", "views"]
                )
                for r in self.results:
                    row = [r.features, r.head]
                    for m in METRICS:
                        row += [f"{v:.6f}" for v in r.mean_std(m)]
                    w.writerow(row + [json.dumps(r.to_dict()["confusion"]), r.views])
        elif path.lower().endswith(".json"):
            write_json_atomic(path, self.to_dict())
        else:
            raise ImgsentError(f"report must end in .json or .csv, got {path!r}")

    def plots(self, directory: str) -> list[str]:
        """ROC curves (one per split, two-class) and the summed confusion matrix of every head and
        feature set, as PNG and SVG files in ``directory``; returns their paths."""
        from .atomicio import atomic_path
        from .htmlreport import draw_confusion, require_matplotlib, roc_points

        plt = require_matplotlib()
        os.makedirs(directory, exist_ok=True)
        written = []
        for r in self.results:
            fig, axes = plt.subplots(1, 2 if len(self.classes) == 2 else 1, figsize=(9, 3.8), squeeze=False)
            draw_confusion(axes[0][0], np.sum([s["confusion"] for s in r.per_split], axis=0), self.classes)
            axes[0][0].set_title("confusion, all splits")
            if len(self.classes) == 2:
                ax = axes[0][1]
                for (y, proba), s in zip(r.predictions, r.per_split):
                    ax.plot(*roc_points(y == 1, proba[:, 1]), label=f"{s['split']} AUC {s['roc_auc']:.3f}")
                ax.plot([0, 1], [0, 1], color="grey", linestyle=":")
                ax.set_xlabel(f"false positive rate ({self.classes[1]})")
                ax.set_ylabel("true positive rate")
                ax.legend(fontsize=7)
            fig.suptitle(f"{r.head} on {r.features}", fontsize=9)
            stem = re.sub(r"[^A-Za-z0-9._+-]+", "_", f"{r.head}__{r.features}")[:150]
            for ext in ("png", "svg"):
                path = os.path.join(directory, f"{stem}.{ext}")
                with atomic_path(path) as tmp:
                    fig.savefig(tmp, format=ext, bbox_inches="tight")
                written.append(path)
            plt.close(fig)
        return written

    def print(self) -> None:
        """The results table on stdout (it is the command's data; progress goes to stderr)."""
        from rich.console import Console
        from rich.table import Table

        t = Table(
            title=f"imgsent evaluate ({self.protocol}, {len(self.splits)} split(s), {self.data['labelled']} images)"
        )
        ablation = any(r.views != "all" for r in self.results)
        names = short_names([k for r in self.results for k in r.features.split(" + ")])
        t.add_column("views" if ablation else "features", no_wrap=ablation)
        t.add_column("head")
        for m in METRICS:
            t.add_column(m.replace("_", " "), justify="right")
        t.add_column("confusion (rows = true " + "/".join(self.classes) + ")")
        for r in self.results:
            cells = [f"{100 * mu:.2f} ± {100 * sd:.2f}" for mu, sd in (r.mean_std(m) for m in METRICS)]
            if not ablation:
                label = r.features
            elif r.views == "all":
                label = "all views"
            elif r.views == "alone":
                label = f"alone: {names[r.features]}"
            else:
                label = f"all but {names[r.views[len('all but ') :]]}"
            t.add_row(label, r.head, *cells, str(r.to_dict()["confusion"]))
        Console(width=None if sys.stdout.isatty() else 200).print(t)


def make_splits(
    data: LabelledFeatures,
    protocol: str,
    *,
    splits: int = 5,
    test_size: float = 0.2,
    folds: int = 5,
    split_files: Sequence[str] = (),
    split_from_folders: bool = False,
    fractions: tuple[float, float, float] = (0.8, 0.15, 0.05),
    seed: int = 0,
) -> list[Split]:
    n = len(data.y)
    if protocol == "random-splits":
        return random_splits(n, splits, test_size, seed)
    if protocol == "kfold":
        return stratified_kfold(data.y, folds, seed)
    if protocol == "predefined":
        return (
            predefined_from_folders(data.ids)
            if split_from_folders
            else predefined_from_files(data.ids, split_files, data.paths)
        )
    if protocol == "train-val-test":
        return train_val_test(n, fractions, seed)
    raise ImgsentError(f"--protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")


def short_names(keys: Sequence[str]) -> dict[str, str]:
    """Readable names for feature keys in a table: no ``timm:`` / ``torchvision:`` prefix,
    TorchScript paths cut to their file names; a key whose short name would be ambiguous keeps
    its full name."""

    def short(key: str) -> str:
        key = re.sub(r"torchscript:([^+]*)", lambda m: "torchscript:" + os.path.basename(m.group(1)), key)
        return re.sub(r"^(timm|torchvision):", "", key)

    unique = list(dict.fromkeys(keys))
    counts: dict[str, int] = {}
    for k in unique:
        counts[short(k)] = counts.get(short(k), 0) + 1
    return {k: short(k) if counts[short(k)] == 1 else k for k in unique}


def ablation_configs(
    blocks: list[tuple[str, int]], heads: Sequence[str]
) -> list[tuple[list[tuple[str, int]], str, str]]:
    """The paper's Table II rows: each view alone with the NN head, all views with every head, then
    (three views or more) all views but one with the NN head. (blocks, head, label) each."""
    if len(blocks) == 1:
        return [(blocks, h, "all") for h in heads]
    rows = [([b], "nn", "alone") for b in blocks]
    rows += [(blocks, h, "all") for h in heads]
    if len(blocks) > 2:
        rows += [([o for o in blocks if o != b], "nn", f"all but {b[0]}") for b in blocks]
    return rows


def evaluate(
    store: str,
    *,
    labels: str | None = None,
    labels_from_folders: bool = False,
    mapping: str = "auto",
    protocol: str = "random-splits",
    heads: Sequence[str] = ("nn", "moe1", "moe2"),
    blocks: Sequence[str] | None = None,
    ablation: bool = False,
    splits: int = 5,
    test_size: float = 0.2,
    folds: int = 5,
    split_files: Sequence[str] = (),
    split_from_folders: bool = False,
    seed: int = 0,
    report: str | None = None,
    plots: str | None = None,
    progress: bool = False,
    id_column: str | None = None,
    label_column: str | None = None,
    **hyper,
) -> EvaluationReport:
    """Evaluate heads (``nn``, ``moe`` = ``moe1``, ``moe1``, ``moe2``) under a protocol, on the
    store's ``blocks`` (default all). With ``ablation``, the rows of :func:`ablation_configs`
    (each view alone, all views with every head, all views but one). Same seed, same numbers."""
    for h in heads:
        TrainConfig.named(h)  # one vocabulary of head names: an unknown one is refused here
    reading = {"mapping": mapping, "id_column": id_column, "label_column": label_column}  # how the labels are read
    data = load_labelled(store, labels=labels, labels_from_folders_=labels_from_folders, blocks=blocks, **reading)
    split_list = make_splits(
        data,
        protocol,
        splits=splits,
        test_size=test_size,
        folds=folds,
        split_files=split_files,
        split_from_folders=split_from_folders,
        seed=seed,
    )
    configs = ablation_configs(data.blocks, heads) if ablation else [(data.blocks, h, "all") for h in heads]
    layout = Blocks.of(data.blocks)
    recipes = {r["key"]: r for r in data.recipes}
    results = []
    start = (
        f"{len(data.y)} labelled images, {len(configs)} head/feature set(s) x {len(split_list)} split(s) ({protocol})"
    )
    with FitProgress("evaluate", len(configs) * len(split_list), start, enabled=progress) as tracker:
        for blocks, head, views in configs:
            X = data.X if len(blocks) == len(data.blocks) else data.X[:, layout.columns([k for k, _ in blocks])]
            res = ConfigResult(features=" + ".join(k for k, _ in blocks), head=head, views=views)
            for k, sp in enumerate(split_list):
                config = TrainConfig.named(head, seed=seed + k, **hyper)
                model = fit(
                    X[sp.train],
                    data.y[sp.train],
                    data.classes,
                    blocks,
                    config,
                    recipes=[recipes[b] for b, _ in blocks],
                    progress=tracker,
                    what=f"{head} on {views}, split {sp.name}",
                )
                proba = model.predict_proba(X[sp.test])
                m = metrics(data.y[sp.test], proba)
                res.predictions.append((data.y[sp.test], proba))
                if sp.val is not None and len(sp.val):
                    m["val_accuracy"] = metrics(data.y[sp.val], model.predict_proba(X[sp.val]))["accuracy"]
                m["split"] = sp.name
                res.per_split.append(m)
            results.append(res)
    out = EvaluationReport(
        protocol=protocol,
        splits=[
            {
                "name": s.name,
                "train": int(len(s.train)),
                "test": int(len(s.test)),
                "val": int(len(s.val)) if s.val is not None else 0,
                **(
                    {"split_file": {k: v[:10] if isinstance(v, list) else v for k, v in s.report.items()}}
                    if s.report
                    else {}
                ),
            }
            for s in split_list
        ],
        classes=data.classes,
        data={**data.join.summary(), "store": os.path.abspath(store)},
        results=results,
    )
    if report:
        out.save(report)
    if plots:
        out.plots(plots)
    return out
