"""Recalibrating a model's probabilities on a labelled sample of the collection it scores.

* ``platt`` (Platt 1999): two classes; p' = sigmoid(a * logit(p) + b), fit by maximum likelihood
  with Platt's smoothed targets. Two parameters: fine on small samples (the default below
  :data:`ISOTONIC_MIN`).
* ``isotonic``: two classes; a monotone step function of p fit by pool-adjacent-violators, for
  large samples (needs no parametric shape, overfits small ones).
* ``temperature``: any number of classes; p' = softmax(log p / T), one parameter.

A :class:`Calibration` is plain data (stored in ``model.json``), applied after the head.
Pure numpy; checked against scikit-learn in the tests.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from .errors import ImgsentError
from .options import CALIBRATION_METHODS as METHODS

ISOTONIC_MIN = 1000  # labelled images from which ``auto`` picks isotonic regression
MIN_SAMPLE = 20  # labelled images needed at all
MIN_PER_CLASS = 5  # ... and of each class
EPS = 1e-6


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, EPS, 1 - EPS)
    return np.log(p) - np.log1p(-p)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def fit_platt(p: np.ndarray, y: np.ndarray, iters: int = 100) -> tuple[float, float]:
    """(a, b) maximising the likelihood of ``y`` (0/1) under sigmoid(a * logit(p) + b), with
    Platt's targets (n+ + 1) / (n+ + 2) and 1 / (n- + 2); Newton's method with a backtracking
    line search (plain Newton oscillates off to infinity when the optimum is far from the start,
    as it is for a weak model on a shifted collection)."""
    z = _logit(np.asarray(p, dtype=np.float64))
    y = np.asarray(y, dtype=np.float64)
    n_pos, n_neg = y.sum(), len(y) - y.sum()
    t = np.where(y == 1, (n_pos + 1) / (n_pos + 2), 1 / (n_neg + 2))

    def nll(a: float, b: float) -> float:
        s = a * z + b
        return float((np.logaddexp(0, s) - t * s).sum())  # -sum(t log q + (1 - t) log(1 - q))

    a, b = 1.0, 0.0
    current = nll(a, b)
    for _ in range(iters):
        q = _sigmoid(a * z + b)
        g = np.array([((q - t) * z).sum(), (q - t).sum()])
        w = q * (1 - q) + 1e-12
        h = np.array([[(w * z * z).sum(), (w * z).sum()], [(w * z).sum(), w.sum()]]) + 1e-9 * np.eye(2)
        step = np.linalg.solve(h, g)
        scale = 1.0
        while scale > 1e-10 and nll(a - scale * step[0], b - scale * step[1]) > current:
            scale /= 2
        a, b = a - scale * step[0], b - scale * step[1]
        previous, current = current, nll(a, b)
        if previous - current < 1e-12 * max(1.0, abs(current)):
            break
    return float(a), float(b)


def fit_isotonic(p: np.ndarray, y: np.ndarray) -> tuple[list[float], list[float]]:
    """A non-decreasing function of ``p`` fit to ``y`` (0/1) by pool-adjacent-violators (equal
    ``p`` pooled first): (knots, values), applied by linear interpolation between knots and
    clipped at the ends (as scikit-learn's ``IsotonicRegression(out_of_bounds="clip")``)."""
    x, inverse = np.unique(np.asarray(p, dtype=np.float64), return_inverse=True)
    w = np.bincount(inverse).astype(np.float64)
    t = np.bincount(inverse, weights=np.asarray(y, dtype=np.float64)) / w
    values: list[float] = []
    weights: list[float] = []
    sizes: list[int] = []
    for v, wi in zip(t, w):
        values.append(float(v))
        weights.append(float(wi))
        sizes.append(1)
        while len(values) > 1 and values[-2] > values[-1]:
            total = weights[-2] + weights[-1]
            values[-2] = (values[-2] * weights[-2] + values[-1] * weights[-1]) / total
            weights[-2] = total
            sizes[-2] += sizes[-1]
            del values[-1], weights[-1], sizes[-1]
    fitted = np.repeat(values, sizes)
    return [float(v) for v in x], [float(v) for v in fitted]


def fit_temperature(proba: np.ndarray, y: np.ndarray) -> float:
    """The temperature T minimising the cross-entropy of softmax(log p / T) on ``y`` (golden
    section search over log T in [-3, 3])."""
    logp = np.log(np.clip(np.asarray(proba, dtype=np.float64), EPS, 1))

    def nll(log_t: float) -> float:
        z = logp / np.exp(log_t)
        z = z - z.max(1, keepdims=True)
        return float(-(z[np.arange(len(y)), y] - np.log(np.exp(z).sum(1))).mean())

    lo, hi = -3.0, 3.0
    g = (np.sqrt(5) - 1) / 2
    for _ in range(80):
        m1, m2 = hi - g * (hi - lo), lo + g * (hi - lo)
        if nll(m1) < nll(m2):
            hi = m2
        else:
            lo = m1
    return float(np.exp((lo + hi) / 2))


@dataclass
class Calibration:
    """A fitted recalibration: ``method`` and its parameters, plus what it was fit on."""

    method: str
    positive: int | None = None  # column of the positive class (two-class methods)
    params: dict = field(default_factory=dict)
    sample: dict = field(default_factory=dict)  # size, per-class counts, date, source

    def apply(self, proba: np.ndarray) -> np.ndarray:
        """Calibrated probabilities (N, C) for uncalibrated ``proba`` (N, C); NaN rows stay NaN."""
        proba = np.asarray(proba, dtype=np.float64)
        if self.method == "temperature":
            z = np.log(np.clip(proba, EPS, 1)) / self.params["temperature"]
            z = z - np.nanmax(z, axis=1, keepdims=True)
            e = np.exp(z)
            return (e / e.sum(1, keepdims=True)).astype(np.float32)
        p = proba[:, self.positive]
        if self.method == "platt":
            q = _sigmoid(self.params["a"] * _logit(p) + self.params["b"])
        else:
            q = np.interp(p, self.params["knots"], self.params["values"])
        out = np.empty_like(proba)
        out[:, self.positive] = q
        out[:, 1 - self.positive] = 1 - q
        return out.astype(np.float32)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> Calibration:
        if d.get("method") not in METHODS[1:]:
            raise ImgsentError(f"unknown calibration method {d.get('method')!r}")
        return cls(**{k: d[k] for k in ("method", "positive", "params", "sample") if k in d})


def fit_calibration(
    proba: np.ndarray,
    y: np.ndarray,
    classes: list[str],
    positive: int | None,
    method: str = "auto",
    sample: dict | None = None,
) -> Calibration:
    """Fit a recalibration of ``proba`` (N, C, the model's) to labels ``y`` (indices into
    ``classes``). ``auto``: Platt for two classes (isotonic from :data:`ISOTONIC_MIN` images),
    temperature otherwise. Refuses samples too small to fit, saying the minimum."""
    if method not in METHODS:
        raise ImgsentError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    y = np.asarray(y)
    counts = np.bincount(y, minlength=len(classes))
    if len(y) < MIN_SAMPLE or counts.min() < MIN_PER_CLASS:
        raise ImgsentError(
            f"the labelled sample has {len(y)} usable images ({', '.join(f'{c}: {n}' for c, n in zip(classes, counts))}); "
            f"calibration needs at least {MIN_SAMPLE}, with {MIN_PER_CLASS} of each class (a few hundred are better)"
        )
    two = len(classes) == 2
    if method == "auto":
        method = ("isotonic" if len(y) >= ISOTONIC_MIN else "platt") if two else "temperature"
    if method in ("platt", "isotonic") and not two:
        raise ImgsentError(f"{method} calibration is for two-class models; use temperature")
    pos = positive if positive is not None else 1
    info = {"size": int(len(y)), "per_class": {c: int(n) for c, n in zip(classes, counts)}, **(sample or {})}
    if method == "temperature":
        return Calibration("temperature", None, {"temperature": fit_temperature(proba, y)}, info)
    target = (y == pos).astype(np.float64)
    if method == "platt":
        a, b = fit_platt(proba[:, pos], target)
        return Calibration("platt", pos, {"a": a, "b": b}, info)
    knots, values = fit_isotonic(proba[:, pos], target)
    return Calibration("isotonic", pos, {"knots": knots, "values": values}, info)
