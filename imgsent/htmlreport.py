"""A self-contained HTML report of a score output: what was scored, the score distribution, class
shares with intervals (per group), a contact sheet of the most positive, most negative and least
sure images, and (with a labelled sample) the confusion matrix and ROC curve.

One file that opens offline: charts are SVG drawn by matplotlib (a core dependency, so the
report works right after install), thumbnails small JPEGs embedded as data URIs, no script, font or image is
fetched. Only the columns the report needs are read, and at most ``per_class`` images per sheet
(and group) are opened, so a report over millions of rows stays small and quick to build.
"""

from __future__ import annotations

import base64
import html
import io
import os
import re
from collections import Counter

import numpy as np

from .errors import ImgsentError

THUMB = 112  # thumbnail box, pixels
MAX_GROUPS = 12  # groups shown in charts and sheets (the largest ones)


def require_matplotlib():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # a core dependency: only a broken install lacks it
        raise ImgsentError("charts need matplotlib, which is missing: pip install matplotlib") from None
    return plt


def check_html_output(out: str) -> None:
    """The report's file must be ``.html`` / ``.htm`` in a folder that exists: one line otherwise,
    before anything is read (never HTML under another extension, never a temporary file's name)."""
    if os.path.splitext(out)[1].lower() not in (".html", ".htm"):
        raise ImgsentError(f"the report is an HTML file: give --out a name ending in .html, not {out}")
    folder = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(folder):
        raise ImgsentError(f"cannot write {out}: the folder {os.path.dirname(out) or folder} does not exist")


def svg(fig) -> str:
    """A matplotlib figure as inline SVG (text kept as paths: no font is needed to view it)."""
    import matplotlib.pyplot as plt

    buf = io.StringIO()
    with plt.rc_context({"svg.fonttype": "path", "svg.hashsalt": "imgsent"}):  # reproducible ids
        fig.savefig(
            buf,
            format="svg",
            bbox_inches="tight",
            metadata={"Creator": None, "Date": None, "Format": None, "Type": None},
        )
    plt.close(fig)
    text = buf.getvalue()
    text = text[text.index("<svg") :]
    # Inline SVG in HTML needs no namespace declarations; without them the file names no URL at all.
    return re.sub(r'\s+xmlns(:\w+)?="[^"]*"', "", text, count=0)


def _thumbnail(path: str, source: str | None = None) -> str | None:
    """A data URI of a small JPEG of the image (read from its ``source`` when it is no file: a tar
    member, a Parquet cell, a URL), or None when it cannot be read any more."""
    from .decode import DecodeError, preview_jpeg

    try:
        data = preview_jpeg(path, THUMB, quality=80, source=source or "")
    except DecodeError:
        return None
    return "data:image/jpeg;base64," + base64.b64encode(data).decode()


def _card(items: list[tuple[str, float]], title: str) -> str:
    cells = []
    for (ident, path, source), score in items:
        uri = _thumbnail(path, source) if path or source else None
        pic = f'<img src="{uri}" alt="">' if uri else '<div class="missing">image no longer readable</div>'
        cells.append(f"<figure>{pic}<figcaption>{html.escape(ident)}<br>{score:.3f}</figcaption></figure>")
    return f"<h4>{html.escape(title)}</h4><div class=sheet>{''.join(cells) or '<p>none</p>'}</div>"


def _pick(keyed: list, p: np.ndarray, idx: np.ndarray, k: int) -> list:
    return [(keyed[i], float(p[i])) for i in idx[:k]]


def _histogram(plt, scores: np.ndarray, label: str) -> str:
    fig, ax = plt.subplots(figsize=(6, 2.6))
    ax.hist(scores, bins=40, range=(0, 1), color="#4a7bb7")
    ax.set_xlabel(label)
    ax.set_ylabel("images")
    return svg(fig)


def _shares_figure(plt, estimates, cls: str, method: str):
    rows = [e for e in estimates if e.cls == cls and e.method == method]
    fig, ax = plt.subplots(figsize=(6, 0.45 * len(rows) + 1))
    y = np.arange(len(rows))
    ax.barh(y, [e.estimate for e in rows], color="#4a7bb7")
    if rows and rows[0].ci_low is not None:
        lo = [e.estimate - e.ci_low for e in rows]
        hi = [e.ci_high - e.estimate for e in rows]
        ax.errorbar([e.estimate for e in rows], y, xerr=[lo, hi], fmt="none", color="black", capsize=3)
    ax.set_yticks(y, [f"{e.group} (n={e.n})" for e in rows])
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel(f"share {cls} ({method.replace('_', ' ')})")
    return fig


def _shares_chart(plt, estimates, cls: str, method: str) -> str:
    return svg(_shares_figure(plt, estimates, cls, method))


def shares_plot(report, path: str) -> None:
    """``imgsent prevalence --plot FILE``: the share of the negative class (or the first) over the
    groups, with interval bars when there are intervals; SVG, PNG or PDF by the file's extension."""
    from .atomicio import atomic_path

    plt = require_matplotlib()
    methods = {e.method for e in report.estimates}
    method = next(m for m in ("calibrated_probability", "adjusted_count", "classify_and_count") if m in methods)
    cls = "negative" if "negative" in report.classes else report.classes[0]
    fmt = os.path.splitext(path)[1].lstrip(".").lower()
    if fmt not in ("svg", "png", "pdf"):
        raise ImgsentError(f"plot must end in .svg, .png or .pdf, got {path!r}")
    fig = _shares_figure(plt, report.estimates, cls, method)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=fmt, bbox_inches="tight")
    plt.close(fig)


def draw_confusion(ax, cm: np.ndarray, classes: list[str]) -> None:
    """A confusion matrix (rows true, columns predicted) with its counts, on a matplotlib axis."""
    ax.imshow(cm, cmap="Blues")
    for i in range(len(classes)):
        for j in range(len(classes)):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center")
    ax.set_xticks(range(len(classes)), classes)
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")


def roc_points(positive: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(false positive rates, true positive rates) of the ROC curve, from (0, 0): ``positive`` is
    a boolean per row, ``score`` its score for the positive class."""
    order = np.argsort(-score, kind="mergesort")
    hits = positive[order].astype(np.float64)
    tp = np.cumsum(hits) / max(hits.sum(), 1)
    fp = np.cumsum(1 - hits) / max((1 - hits).sum(), 1)
    return np.r_[0, fp], np.r_[0, tp]


def _confusion_and_roc(plt, y: np.ndarray, proba: np.ndarray, classes: list[str], pos: int) -> str:
    from .protocols import confusion, metrics

    fig, (a, b) = plt.subplots(1, 2, figsize=(8, 3.4))
    draw_confusion(a, confusion(y, proba.argmax(1), len(classes)), classes)
    b.plot(*roc_points(y == pos, proba[:, pos]), color="#4a7bb7")
    b.plot([0, 1], [0, 1], color="grey", linestyle=":")
    b.set_title(f"ROC ({classes[pos]}), AUC {metrics(y, proba)['roc_auc']:.3f}")
    b.set_xlabel("false positive rate")
    b.set_ylabel("true positive rate")
    return svg(fig)


STYLE = """body{font-family:sans-serif;margin:2em;max-width:1100px;color:#222}
table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}
.sheet{display:flex;flex-wrap:wrap;gap:6px}figure{margin:0;width:120px;font-size:11px;word-break:break-all}
figure img{width:112px;height:112px;object-fit:contain;background:#eee}
.missing{width:112px;height:112px;background:#eee;color:#900;display:flex;align-items:center;
justify-content:center;text-align:center;font-size:11px}.warn{color:#a40}"""


def build_report(
    scores: str,
    out: str,
    *,
    by: str | None = None,
    meta: str | None = None,
    labels: str | None = None,
    per_class: int = 24,
    seed: int = 0,
    mapping: str = "auto",
) -> dict:
    """Write the HTML report of ``scores`` to ``out``; returns what it holds (counts, sections)."""
    import polars as pl

    from .atomicio import write_text_atomic
    from .collection import load_collection, read_sample, shares

    if not 1 <= per_class <= 200:
        raise ImgsentError(f"--per-class must be between 1 and 200, got {per_class}")
    check_html_output(out)
    df, classes = load_collection(scores, by=by, meta=meta)  # read once, for every section
    plt = require_matplotlib()
    pos = classes.index("positive") if "positive" in classes else len(classes) - 1
    ok = df.filter(pl.col("status") == "ok")
    sections = []
    errors = Counter(df.filter(pl.col("status") != "ok")["error"].fill_null("(no reason)").to_list())
    model = df["model"][0] if "model" in df.columns and df.height else "unknown"
    version = df["model_version"][0] if "model_version" in df.columns and df.height else ""
    card = ""
    from .models import packaged_model_named

    m = packaged_model_named(model)
    if m is not None:
        card = "".join(
            f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>"
            for k, v in m.training.get("card", {}).items()
        )
    rows = [
        ("images", df.height),
        ("scored", ok.height),
        ("error rows", df.height - ok.height),
        ("model", f"{model} {version}"),
    ]
    head = "".join(f"<tr><th>{k}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows)
    err = "".join(f"<tr><td>{html.escape(str(r))}</td><td>{n}</td></tr>" for r, n in errors.most_common(20))
    sections.append(
        f"<h2>What was scored</h2><table>{head}{card}</table>"
        + (f"<h3>Error rows by reason</h3><table><tr><th>reason</th><th>rows</th></tr>{err}</table>" if errors else "")
    )
    score_col = f"p_{classes[pos]}"
    sections.append(f"<h2>Scores</h2>{_histogram(plt, ok[score_col].to_numpy(), score_col)}")
    sample = None if labels is None else read_sample(labels, mapping)
    rep = shares(df, classes, sample=sample, sample_name=labels, by=by, seed=seed)
    method = "calibrated_probability" if labels else "classify_and_count"
    cls = "negative" if "negative" in classes else classes[0]
    table = "".join(
        f"<tr><td>{html.escape(e.group)}</td><td>{html.escape(e.cls)}</td><td>{e.method}</td><td>{e.estimate:.3f}</td>"
        f"<td>{'' if e.ci_low is None else f'[{e.ci_low:.3f}, {e.ci_high:.3f}]'}</td><td>{e.n}</td></tr>"
        for e in rep.estimates
    )
    warn = "".join(f'<p class="warn">{html.escape(w)}</p>' for w in rep.warnings)
    sections.append(
        f"<h2>Class shares</h2>{_shares_chart(plt, rep.estimates, cls, method)}{warn}"
        f"<table><tr><th>group</th><th>class</th><th>method</th><th>share</th><th>{100 * rep.level:g}% interval</th>"
        f"<th>n</th></tr>{table}</table>"
    )
    groups = [("all images", ok)]
    if by is not None:
        top = ok.group_by(by).len().sort("len", descending=True).head(MAX_GROUPS)[by].to_list()
        groups += [(f"{by} = {g}", ok.filter(pl.col(by) == g)) for g in top]
    sheets = []
    for title, part in groups:
        p = part[score_col].to_numpy()
        ids = part["id"].to_list()
        paths = part["path"].to_list() if "path" in part.columns else [None] * part.height
        sources = part["source"].to_list() if "source" in part.columns else [None] * part.height
        keyed = list(zip(ids, paths, sources))
        order = np.argsort(-p, kind="mergesort")
        unsure = np.argsort(np.abs(p - 0.5), kind="mergesort")
        sheets.append(
            f"<h3>{html.escape(title)}</h3>"
            + _card(_pick(keyed, p, order, per_class), f"most {classes[pos]}")
            + _card(_pick(keyed, p, order[::-1], per_class), f"least {classes[pos]}")
            + _card(_pick(keyed, p, unsure, per_class), "least sure")
        )
    sections.append("<h2>Contact sheets</h2>" + "".join(sheets))
    if rep.sample_scores is not None:
        y, proba = rep.sample_scores
        sections.append(
            f"<h2>On the labelled sample ({rep.sample['size']} images)</h2>"
            + _confusion_and_roc(plt, y, proba, classes, pos)
        )
    page = (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>imgsent report: {html.escape(str(scores))}</title>"
        f"<style>{STYLE}</style></head><body><h1>imgsent report</h1><p>{html.escape(str(scores))}</p>"
        + "".join(sections)
        + "</body></html>"
    )
    write_text_atomic(out, page)
    return {"rows": df.height, "ok": ok.height, "sections": len(sections), "bytes": len(page)}
