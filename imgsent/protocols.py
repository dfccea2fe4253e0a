"""Evaluation protocols (which rows train, which test) and metrics. Pure numpy, seeded.

* ``random-splits``: ``n_splits`` random train/test splits (Twitter I: 5 x 80/20).
* ``kfold``: stratified k folds, each the test set once.
* ``predefined``: test sets given by the user (files listing test ids, or folder names).
* ``train-val-test``: one random split (FI: 80/15/5 train/test/val).
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .errors import ImgsentError, ImgsentWarning
from .options import PROTOCOLS  # noqa: F401  (imported from here too)


@dataclass
class Split:
    train: np.ndarray
    test: np.ndarray
    val: np.ndarray | None = None
    name: str = ""
    report: dict | None = None  # predefined splits: how the split file's lines matched


def random_splits(n: int, n_splits: int = 5, test_size: float = 0.2, seed: int = 0) -> list[Split]:
    if not 0 < test_size < 1 or n_splits < 1:
        raise ImgsentError("need 0 < --test-size < 1 and --splits >= 1")
    rng = np.random.default_rng(seed)
    n_test = int(round(n * test_size))
    if n_test < 1 or n_test >= n:
        raise ImgsentError(f"--test-size {test_size} leaves an empty train or test set for {n} images")
    out = []
    for k in range(n_splits):
        perm = rng.permutation(n)
        out.append(Split(train=np.sort(perm[n_test:]), test=np.sort(perm[:n_test]), name=f"split{k + 1}"))
    return out


def stratified_kfold(y: np.ndarray, folds: int = 5, seed: int = 0) -> list[Split]:
    if folds < 2:
        raise ImgsentError("--folds must be >= 2")
    rng = np.random.default_rng(seed)
    fold_of = np.empty(len(y), dtype=np.int64)
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        fold_of[idx] = np.arange(len(idx)) % folds
    if np.bincount(fold_of, minlength=folds).min() == 0:
        raise ImgsentError(f"too few images for {folds} folds")
    return [
        Split(np.flatnonzero(fold_of != f), np.flatnonzero(fold_of == f), name=f"fold{f + 1}") for f in range(folds)
    ]


def train_val_test(n: int, fractions: tuple[float, float, float] = (0.8, 0.15, 0.05), seed: int = 0) -> list[Split]:
    if abs(sum(fractions) - 1) > 1e-6 or min(fractions) <= 0:
        raise ImgsentError("train/test/val fractions must be positive and sum to 1")
    perm = np.random.default_rng(seed).permutation(n)
    n_train = int(round(n * fractions[0]))
    n_test = int(round(n * fractions[1]))
    return [
        Split(
            np.sort(perm[:n_train]),
            np.sort(perm[n_train : n_train + n_test]),
            np.sort(perm[n_train + n_test :]),
            "split1",
        )
    ]


MAX_UNMATCHED_LINES = 5  # more split-file lines than this that name no image (or several): an error


def _line_keys(line: str) -> list[str]:
    """What a split-file line may name: the whole line, its first tab field (``id<TAB>label``),
    or all but its last space-separated word (``file label``)."""
    keys = [line]
    if "\t" in line:
        keys.append(line.split("\t", 1)[0].strip())
    parts = line.rsplit(None, 1)
    if len(parts) == 2:
        keys.append(parts[0])
    return keys


def match_split_file(path: str, ids: Sequence[str], paths: Sequence[str] | None = None) -> tuple[np.ndarray, dict]:
    """Rows of ``ids`` that the split file ``path`` lists, matched exactly on id (or on path when
    ``paths`` is given), never on a bare file name. Returns (mask, report) where the report counts
    the lines and gives examples of lines that match no image or several."""
    index: dict[str, set[int]] = {}
    for i, key in enumerate(ids):
        index.setdefault(key, set()).add(i)
    for i, key in enumerate(paths or ()):
        index.setdefault(key, set()).add(i)
    try:
        with open(path, encoding="utf-8-sig") as fh:
            lines = [ln.strip() for ln in fh if ln.strip() and not ln.lstrip().startswith("#")]
    except OSError as exc:
        raise ImgsentError(f"cannot read split file {path}: {exc.strerror}") from None
    mask = np.zeros(len(ids), dtype=bool)
    unmatched, ambiguous = [], []
    for line in lines:
        hits = next((index[k] for k in _line_keys(line) if k in index), set())
        if not hits:
            unmatched.append(line)
        elif len(hits) > 1:
            ambiguous.append(line)
        else:
            mask[next(iter(hits))] = True
    return mask, {"lines": len(lines), "matched": int(mask.sum()), "unmatched": unmatched, "ambiguous": ambiguous}


def predefined_from_files(
    ids: Sequence[str], test_files: Sequence[str], paths: Sequence[str] | None = None
) -> list[Split]:
    """One split per file: the labelled images it lists (by exact id or path) are the test set, the
    rest train. Lines that name no labelled image, or several, are counted and reported (a warning);
    more than :data:`MAX_UNMATCHED_LINES` of them is an error naming examples."""
    if not test_files:
        raise ImgsentError("--protocol predefined needs --split FILE (once per split) or --split-from-folders")
    out = []
    for f in test_files:
        mask, rep = match_split_file(f, ids, paths)
        bad = len(rep["unmatched"]) + len(rep["ambiguous"])
        if not mask.any() or bad > MAX_UNMATCHED_LINES:
            examples = ", ".join(repr(x) for x in (rep["unmatched"] + rep["ambiguous"])[:3])
            raise ImgsentError(
                f"split file {f}: {len(rep['unmatched'])} of {rep['lines']} lines name no labelled image of the store "
                f"and {len(rep['ambiguous'])} name several (e.g. {examples}); lines must give an image's id or path "
                f"exactly, as the store lists them"
            )
        if bad:
            warnings.warn(
                f"split file {f}: {bad} line(s) match no labelled image or several, left out of the test set: "
                + ", ".join(repr(x) for x in (rep["unmatched"] + rep["ambiguous"])[:3]),
                ImgsentWarning,
                stacklevel=2,
            )
        out.append(Split(np.flatnonzero(~mask), np.flatnonzero(mask), name=os.path.basename(f), report=rep))
    return out


_FOLD_DIR = re.compile(r"^(?:partition|fold|split)[_-]?(\d+)$", re.IGNORECASE)


def predefined_from_folders(ids: Sequence[str]) -> list[Split]:
    """Folder names give the splits: ``train/`` + ``test/`` (one split), or ``partition1..K``/``foldK``
    (K splits, each folder the test set once)."""
    parts = [i.split("/") for i in ids]
    tt = np.asarray([("test" in p[:-1]) - ("train" in p[:-1]) for p in parts])
    if (tt != 0).all():
        return [Split(np.flatnonzero(tt < 0), np.flatnonzero(tt > 0), name="test")]
    folds = []
    for p in parts:
        m = [int(mm.group(1)) for d in p[:-1] if (mm := _FOLD_DIR.match(d))]
        folds.append(m[0] if m else -1)
    folds = np.asarray(folds)
    if (folds < 0).any():
        raise ImgsentError(
            "--split-from-folders: every image must sit under train/ or test/, or under partitionK/ or foldK/"
        )
    return [Split(np.flatnonzero(folds != k), np.flatnonzero(folds == k), name=f"fold{k}") for k in sorted(set(folds))]


# --- metrics --------------------------------------------------------------------------------------


def confusion(y: np.ndarray, pred: np.ndarray, n_classes: int) -> np.ndarray:
    return np.bincount(y * n_classes + pred, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def _auc_binary(y: np.ndarray, score: np.ndarray) -> float:
    pos, neg = (y == 1).sum(), (y == 0).sum()
    if pos == 0 or neg == 0:
        return float("nan")
    order = np.argsort(score, kind="mergesort")
    ranks = np.empty(len(score))
    sorted_scores = score[order]
    # average ranks for ties
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    avg = first + (counts - 1) / 2.0 + 1
    ranks[order] = np.repeat(avg, counts)
    return float((ranks[y == 1].sum() - pos * (pos + 1) / 2) / (pos * neg))


def metrics(y: np.ndarray, proba: np.ndarray) -> dict:
    """accuracy, macro-F1, balanced accuracy, ROC-AUC (one-vs-rest macro for C > 2), confusion matrix."""
    n_classes = proba.shape[1]
    pred = proba.argmax(1)
    cm = confusion(y, pred, n_classes)
    tp = np.diag(cm).astype(float)
    support, predicted = cm.sum(1), cm.sum(0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros_like(tp), where=(precision + recall) > 0)
    present = support > 0
    if n_classes == 2:
        auc = _auc_binary(y, proba[:, 1])
    else:
        aucs = [_auc_binary((y == c).astype(int), proba[:, c]) for c in range(n_classes) if present[c]]
        auc = float(np.nanmean(aucs)) if aucs else float("nan")
    return {
        "accuracy": float((pred == y).mean()),
        "macro_f1": float(f1[present].mean()),
        "balanced_accuracy": float(recall[present].mean()),
        "roc_auc": auc,
        "confusion": cm.tolist(),
    }
