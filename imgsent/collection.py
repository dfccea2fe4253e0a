"""Answers about a collection: class shares with confidence intervals, and recalibration to it.

Counting predicted labels (classify and count) is biased whenever the collection differs from the
model's training data: a classifier's errors do not cancel out when the class shares move. With a
small random labelled sample of the collection itself, standard remedies estimate the shares
honestly:

* ``adjusted_count`` (Forman 2008, "adjusted classify and count"): the sample gives the model's
  true- and false-positive rates on this collection; the observed positive share q is corrected to
  (q - fpr) / (tpr - fpr). Two-class models.
* ``calibrated_probability``: the model's probabilities are recalibrated on the sample (Platt 1999;
  temperature for several classes) and averaged over the collection.

Intervals are percentile bootstrap intervals (seeded): the labelled sample is resampled (its size
is what limits precision), and the collection's own sampling noise is added per group. Without a
sample only ``classify_and_count`` and ``mean_probability`` are possible, with a warning and no
interval (their error is bias, which no interval from the data can show). Saerens et al. (2002)'s
EM prior adjustment is not offered: it assumes calibrated probabilities, which a domain shift breaks.
"""

from __future__ import annotations

import io
import os
import sys
from dataclasses import dataclass, field

import numpy as np

from .calibration import METHODS, fit_calibration, fit_platt
from .errors import ImgsentError, one_line
from .labels import map_labels, read_labels

ALL = "all"  # the group of every row


SCORE_COLUMNS = ("id", "path", "source", "status", "error", "label", "model", "model_version")


def read_scores(source: str, stdin=None, extra: tuple[str, ...] = ()):
    """A score output as a polars DataFrame: a file (.parquet, .csv, .tsv, .jsonl), a directory
    of shards, or ``-`` (JSON Lines or CSV/TSV on stdin). Needs ``id``, ``status``, ``label`` and
    ``p_<class>`` columns; of Parquet only those, :data:`SCORE_COLUMNS` and ``extra`` are read."""
    import polars as pl

    from .shards import list_store
    from .sinks import SCORES_KIND, format_of

    try:
        if source == "-":
            data = (stdin if stdin is not None else sys.stdin.buffer).read()
            head = data.lstrip()[:1]
            if head == b"{":
                df = pl.read_ndjson(io.BytesIO(data))
            else:
                first = data.split(b"\n", 1)[0]
                df = pl.read_csv(io.BytesIO(data), separator="\t" if b"\t" in first else ",")
        elif os.path.isdir(source):  # every job's finished shards, as the manifests list them
            df = _read_parquet_columns(list_store(source, kind=SCORES_KIND).files, extra)
        else:
            if not os.path.isfile(source):
                raise ImgsentError(f"scores {source!r} do not exist")
            fmt = format_of(source, None)
            if fmt == "parquet":
                df = _read_parquet_columns([source], extra)
            elif fmt == "jsonl":
                df = pl.read_ndjson(source)
            else:
                df = pl.read_csv(source, separator="\t" if fmt == "tsv" else ",")
    except ImgsentError:
        raise
    except Exception as exc:
        raise ImgsentError(f"cannot read scores {source}: {one_line(exc, 160)}") from None
    missing = [c for c in ("id", "status", "label") if c not in df.columns]
    classes = [c[2:] for c in df.columns if c.startswith("p_")]
    if missing or len(classes) < 2:
        raise ImgsentError(f"{source} is not an imgsent score output (needs id, status, label and p_<class> columns)")
    return df, classes


def _read_parquet_columns(files: list[str], extra: tuple[str, ...]):
    """Only the columns a score reader needs (a score table can carry kept features and more)."""
    import polars as pl

    lf = pl.scan_parquet(files)
    names = lf.collect_schema().names()
    keep = [c for c in names if c in SCORE_COLUMNS or c.startswith("p_") or c in extra]
    return lf.select(keep).collect()


@dataclass
class Estimate:
    group: str
    cls: str
    method: str
    estimate: float
    ci_low: float | None
    ci_high: float | None
    n: int

    def to_json(self) -> dict:
        return {
            "group": self.group,
            "class": self.cls,
            "method": self.method,
            "estimate": round(self.estimate, 6),
            "ci_low": None if self.ci_low is None else round(self.ci_low, 6),
            "ci_high": None if self.ci_high is None else round(self.ci_high, 6),
            "n": self.n,
        }


@dataclass
class PrevalenceReport:
    classes: list[str]
    estimates: list[Estimate]
    rows: int
    error_rows: int
    level: float
    sample: dict | None = None
    by: str | None = None
    warnings: list[str] = field(default_factory=list)
    sample_scores: tuple[np.ndarray, np.ndarray] | None = field(default=None, repr=False)  # (y, proba)

    def to_json_lines(self) -> str:
        import json

        return "".join(json.dumps(e.to_json()) + "\n" for e in self.estimates)

    def table(self) -> str:
        """A plain text table (one line per group, class and method); the warnings are apart
        (``warnings``: the CLI prints them on stderr)."""
        lines = [
            f"{self.rows} rows scored; {self.error_rows} error rows left out"
            + (f"; groups by {self.by}" if self.by else ""),
        ]
        if self.sample:
            s = self.sample
            lines.append(
                f"labelled sample: {s['size']} images used ({', '.join(f'{k} {v}' for k, v in s['per_class'].items())})"
                f"; {s['not_in_scores']} sample ids not in the scores, {s['error_rows']} of them error rows"
            )
        pct = f"{100 * self.level:g}%"
        lines.append(f"{'group':<20} {'class':<12} {'method':<24} {'share':>7}  {pct + ' interval':>17}  {'n':>8}")
        for e in self.estimates:
            ci = f"[{e.ci_low:.3f}, {e.ci_high:.3f}]" if e.ci_low is not None else "(biased; no CI)"
            lines.append(f"{e.group[:20]:<20} {e.cls[:12]:<12} {e.method:<24} {e.estimate:7.3f}  {ci:>17}  {e.n:>8}")
        return "\n".join(lines)


def _sample(df, classes: list[str], raw: dict[str, str], labels: str):
    """The labelled sample ``raw`` ({id or path: class}, read from the file ``labels``) joined to the
    scores by id or path: (p (n, C), y (n,), predicted (n,), info)."""
    unknown = sorted({v for v in raw.values() if v not in classes})
    if unknown:
        raise ImgsentError(
            f"labels file {labels}: label(s) {', '.join(map(repr, unknown[:3]))} are not classes of the scores "
            f"({', '.join(classes)}); use --map to map them"
        )
    index = {i: k for k, i in enumerate(df["id"].to_list())}
    paths = df["path"].to_list() if "path" in df.columns else []
    by_path = {p: k for k, p in enumerate(paths)}
    rows, ys, missing = [], [], 0
    for key, label in raw.items():
        k = index.get(key, by_path.get(key))
        if k is None:
            missing += 1
            continue
        rows.append(k)
        ys.append(classes.index(label))
    status = np.asarray(df["status"].to_list())
    rows = np.asarray(rows, dtype=np.int64)
    ok = status[rows] == "ok" if len(rows) else np.zeros(0, dtype=bool)
    errors = int((~ok).sum())
    rows, y = rows[ok], np.asarray(ys, dtype=np.int64)[ok]
    if len(rows) == 0:
        raise ImgsentError(f"labels file {labels} names no scored image (ids must match the scores' ids or paths)")
    proba = df.select([f"p_{c}" for c in classes]).to_numpy().astype(np.float64)[rows]
    pred = np.asarray([classes.index(v) for v in df["label"].to_numpy()[rows]])
    counts = np.bincount(y, minlength=len(classes))
    info = {
        "size": int(len(y)),
        "per_class": {c: int(n) for c, n in zip(classes, counts)},
        "not_in_scores": missing,
        "error_rows": errors,
    }
    return proba, y, pred, info


def _adjusted(q: np.ndarray, tpr: np.ndarray, fpr: np.ndarray) -> np.ndarray:
    denom = tpr - fpr
    with np.errstate(divide="ignore", invalid="ignore"):
        est = np.where(np.abs(denom) > 1e-9, (q - fpr) / denom, q)
    return np.clip(est, 0.0, 1.0)


def _rates(y: np.ndarray, pred: np.ndarray, pos: int) -> tuple[float, float]:
    pos_rows, neg_rows = y == pos, y != pos
    tpr = float((pred[pos_rows] == pos).mean()) if pos_rows.any() else 1.0
    fpr = float((pred[neg_rows] == pos).mean()) if neg_rows.any() else 0.0
    return tpr, fpr


def prevalence(
    scores: str,
    *,
    labels: str | None = None,
    by: str | None = None,
    meta: str | None = None,
    level: float = 0.95,
    bootstrap: int = 1000,
    seed: int = 0,
    mapping: str = "auto",
    id_column: str | None = None,
    label_column: str | None = None,
    stdin=None,
) -> PrevalenceReport:
    """Class shares of the images in a score output, overall and per ``by`` group (a column of the
    scores, or of the ``meta`` table joined on ``id``). With a labelled random sample of the same
    collection (``labels``, any format ``train`` reads), adjusted and calibrated estimates with
    bootstrap intervals at ``level``; without one, the biased counts and a warning."""

    df, classes = load_collection(scores, by=by, meta=meta, stdin=stdin)
    raw = None if labels is None else read_sample(labels, mapping, id_column, label_column)
    return shares(df, classes, sample=raw, sample_name=labels, by=by, level=level, bootstrap=bootstrap, seed=seed)


def read_sample(labels: str, mapping: str = "auto", id_column=None, label_column=None) -> dict[str, str]:
    """A labelled sample file (any format ``train`` reads) as {id or path: class}; of a file of
    ``imgsent label``, its random-mode labels only."""
    return map_labels(read_labels(labels, id_column=id_column, label_column=label_column, random_only=True), mapping)


def load_collection(scores: str, *, by: str | None = None, meta: str | None = None, stdin=None):
    """(scores DataFrame, classes) with the ``by`` column there: from the scores, or joined on id
    from the ``meta`` table."""
    df, classes = read_scores(scores, stdin, extra=(by,) if by else ())
    if meta is not None:
        if by is None:
            raise ImgsentError("--meta needs --by COLUMN: the column of the metadata table to group by")
        df = df.join(_read_meta(meta, by), on="id", how="left")
    elif by is not None and by not in df.columns:
        raise ImgsentError(
            f"the scores have no column {by!r} (columns: {', '.join(df.columns)}); give --meta FILE, a table with id and that column"
        )
    return df, classes


def shares(
    df,
    classes: list[str],
    *,
    sample: dict[str, str] | None = None,
    sample_name: str | None = None,
    by: str | None = None,
    level: float = 0.95,
    bootstrap: int = 1000,
    seed: int = 0,
) -> PrevalenceReport:
    """The estimates of :func:`prevalence` on scores already loaded (:func:`load_collection`) and a
    labelled ``sample`` already read ({id or path: class}; ``sample_name`` names it in messages)."""
    import polars as pl

    if not 0.5 <= level < 1:
        raise ImgsentError(f"level must be in [0.5, 1), got {level}")
    if bootstrap < 100:
        raise ImgsentError(f"bootstrap must be >= 100 resamples, got {bootstrap}")
    rows = df.height
    info = None
    warnings: list[str] = []
    if sample is not None:
        proba_s, y_s, pred_s, info = _sample(df, classes, sample, sample_name or "(sample)")
    ok_df = df.filter(pl.col("status") == "ok")
    groups = [(ALL, ok_df)]
    if by is not None:
        keyed = ok_df.with_columns(pl.col(by).cast(pl.String).fill_null("(none)").alias("__group"))
        for key, part in sorted(keyed.partition_by("__group", as_dict=True).items(), key=lambda kv: str(kv[0])):
            groups.append((str(key[0] if isinstance(key, tuple) else key), part))
    two = len(classes) == 2
    pos = classes.index("positive") if "positive" in classes else 1
    rng = np.random.default_rng(seed)
    alpha = (1 - level) / 2
    estimates: list[Estimate] = []
    if info is not None:
        counts = np.bincount(y_s, minlength=len(classes))
        if info["size"] < SMALL_SAMPLE:
            half = 100 * 1.96 * np.sqrt(0.25 / info["size"])
            warnings.append(
                f"the labelled sample has only {info['size']} images: its intervals are wide (a share's "
                f"sampling error alone is up to ±{half:.0f} points); about 200 labels give ±7"
            )
        if counts.min() < 5:
            raise ImgsentError(
                f"the labelled sample has {info['size']} usable images ({', '.join(f'{c} {n}' for c, n in zip(classes, counts))}); "
                "adjusted estimates need at least 5 of each class (a few hundred images in all are better)"
            )
        boot = rng.integers(0, len(y_s), size=(bootstrap, len(y_s)))
        if two:
            tpr, fpr = _rates(y_s, pred_s, pos)
            tb = np.array([_rates(y_s[i], pred_s[i], pos) for i in boot])
            if tpr - fpr < 0.2:
                warnings.append(
                    f"the model separates the classes poorly on this sample (tpr {tpr:.2f}, fpr {fpr:.2f}): "
                    "adjusted counts are unstable, their intervals wide"
                )
            a, b = fit_platt(proba_s[:, pos], (y_s == pos).astype(float))
            ab = np.array([fit_platt(proba_s[i, pos], (y_s[i] == pos).astype(float)) for i in boot])
        else:
            cal = fit_calibration(proba_s, y_s, classes, None, "temperature")
            tb = ab = None
    for name, part in groups:
        n = part.height
        if n == 0:
            continue
        pred = np.asarray([classes.index(v) for v in part["label"].to_list()])
        proba = part.select([f"p_{c}" for c in classes]).to_numpy().astype(np.float64)
        cc = np.bincount(pred, minlength=len(classes)) / n
        if info is None:
            for k, c in enumerate(classes):
                estimates.append(Estimate(name, c, "classify_and_count", float(cc[k]), None, None, n))
                estimates.append(Estimate(name, c, "mean_probability", float(proba[:, k].mean()), None, None, n))
            continue
        if two:
            q = cc[pos]
            est = float(_adjusted(np.asarray(q), np.asarray(tpr), np.asarray(fpr)))
            qb = rng.binomial(n, q, size=bootstrap) / n  # the group's own sampling noise
            dist = _adjusted(qb, tb[:, 0], tb[:, 1])
            _add_binary(estimates, name, classes, pos, "adjusted_count", est, dist, alpha, n)
            z = np.log(np.clip(proba[:, pos], 1e-6, 1 - 1e-6)) - np.log1p(-np.clip(proba[:, pos], 1e-6, 1 - 1e-6))
            cal_p = 1 / (1 + np.exp(-(a * z + b)))
            est = float(cal_p.mean())
            sub = z[rng.integers(0, n, size=min(n, 20_000))]  # the group's values, subsampled for speed
            means = (1 / (1 + np.exp(-(ab[:, :1] * sub[None] + ab[:, 1:])))).mean(1)
            dist = means + rng.normal(0, cal_p.std() / np.sqrt(n), size=bootstrap)
            _add_binary(estimates, name, classes, pos, "calibrated_probability", est, dist, alpha, n)
        else:
            cal_p = cal.apply(proba).mean(0)
            for k, c in enumerate(classes):
                estimates.append(Estimate(name, c, "calibrated_probability", float(cal_p[k]), None, None, n))
    if info is None:
        warnings.append(
            "without a labelled sample these shares are biased whenever this collection differs from the "
            "model's training data (other years, places, topics, image kinds): classify-and-count moves with "
            "the model's errors, not only with the truth. Label a random sample of ~200 images and pass it "
            f"with --labels FILE for adjusted estimates with intervals{_card_note(df)}"
        )
    elif not two:
        warnings.append("adjusted counts and intervals are for two-class models; shown: calibrated probabilities")
    return PrevalenceReport(
        classes=classes,
        estimates=estimates,
        rows=rows,
        error_rows=rows - ok_df.height,
        level=level,
        sample=info,
        by=by,
        warnings=warnings,
        sample_scores=(y_s, proba_s) if info is not None else None,
    )


SMALL_SAMPLE = 100  # a labelled sample below this many images gets a warning about its intervals' width


def _add_binary(out: list, group: str, classes, pos: int, method: str, est: float, dist, alpha, n: int) -> None:
    """Both classes' estimates, in the order of ``classes`` (as without a sample)."""
    lo, hi = (float(v) for v in np.quantile(np.clip(dist, 0, 1), [alpha, 1 - alpha]))
    pair = {pos: Estimate(group, classes[pos], method, est, lo, hi, n)}
    pair[1 - pos] = Estimate(group, classes[1 - pos], method, 1 - est, 1 - hi, 1 - lo, n)
    out.extend(pair[k] for k in sorted(pair))


def _card_note(df) -> str:
    """What the model's own card says about its accuracy, when the scores name a packaged model."""
    from .models import packaged_model_named

    model = packaged_model_named(df["model"][0]) if "model" in df.columns and df.height else None
    card = model.training.get("card", {}) if model is not None else {}
    acc = card.get("held_out_accuracy") or card.get("cross_validated_accuracy")
    return f". The model's accuracy on its own (Twitter I) data was {acc}; elsewhere expect less" if acc else ""


def _read_meta(meta: str, by: str):
    import polars as pl

    try:
        table = pl.read_parquet(meta) if meta.lower().endswith((".parquet", ".pq")) else pl.read_csv(meta)
    except Exception as exc:
        raise ImgsentError(f"cannot read metadata {meta}: {one_line(exc, 160)}") from None
    for col in ("id", by):
        if col not in table.columns:
            raise ImgsentError(f"metadata {meta} has no column {col!r} (columns: {', '.join(table.columns)})")
    if table["id"].n_unique() != table.height:
        raise ImgsentError(f"metadata {meta}: ids must be unique (one row per image)")
    return table.select(pl.col("id").cast(pl.String), pl.col(by))


def calibrate(
    model: str | None,
    *,
    labels: str,
    out: str,
    features: str | None = None,
    scores: str | None = None,
    method: str = "auto",
    mapping: str = "auto",
    id_column: str | None = None,
    label_column: str | None = None,
    overwrite: bool = False,
):
    """Recalibrate ``model`` (a bundle; None: the default) on a labelled random sample of a
    collection, and write the result as a new bundle ``out`` (same head and recipe, the
    calibration recorded with the sample's size and date). The model's probabilities on the
    sample come from a feature store (``features``) or from its score output (``scores``)."""
    import datetime

    from .features import load
    from .labels import join_labels
    from .models import model_identity, model_path, resolve_model
    from .training import check_model_output

    if (features is None) == (scores is None):
        raise ImgsentError(
            "give the sample's features (--features STORE) or the model's scores (--scores FILE), one of them"
        )
    if method not in METHODS:
        raise ImgsentError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    check_model_output(out, overwrite)
    m = resolve_model(model)
    raw = read_sample(labels, mapping, id_column, label_column)
    if features is not None:
        fs = load(features, backbones=[k for k, _ in m.blocks], only_ok=False)
        m.check_recipe(fs.header, what=f"store {features}")
        join = join_labels(fs.ids, fs.paths, fs.status, raw)
        unknown = [c for c in join.classes if c not in m.classes]
        if unknown:
            raise ImgsentError(f"labels {', '.join(map(repr, unknown))} are not classes of the model ({m.classes})")
        proba = m.predict_proba(fs.X[join.rows], calibrated=False)
        y = np.asarray([m.classes.index(join.classes[k]) for k in join.y])
        source = os.path.abspath(features)
    else:
        df, classes = read_scores(scores)
        if classes != m.classes:
            raise ImgsentError(f"scores {scores} have classes {classes}, the model {m.classes}")
        if "model_version" in df.columns and df.height and df["model_version"][0] != model_identity(m, model)[1]:
            raise ImgsentError(f"scores {scores} were made by another model (or version) than {model_path(model)}")
        if m.calibration is not None:
            raise ImgsentError("this model is already calibrated: its scores are too; recalibrate from a feature store")
        proba, y, _, _ = _sample(df, classes, raw, labels)
        source = os.path.abspath(scores)
    info = {"date": datetime.date.today().isoformat(), "source": source}
    m.calibration = fit_calibration(
        proba, y, m.classes, m.classes.index(m.positive_class) if m.positive_class else None, method, info
    )
    if len(y) < SMALL_SAMPLE:
        import warnings as _warnings

        from .errors import ImgsentWarning

        _warnings.warn(
            f"the labelled sample has only {len(y)} images: the recalibration is rough (about 200 labels "
            "make it steady)",
            ImgsentWarning,
            stacklevel=2,
        )
    m.save(out)
    return m
