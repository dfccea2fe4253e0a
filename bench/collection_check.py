"""Class shares and recalibration on images the default model never saw (the README's figures).

    python bench/collection_check.py [--samples 40] [--sample-size 200] [--share 0.3]

The collection: the Twitter I images outside the 5-agree set (the default model's training data),
labelled by 3-agree, subsampled to ``--share`` positive. For ``--samples`` seeded random labelled
samples of ``--sample-size``: does the 95 % interval of each estimate cover the true share, how far
is the estimate from it, and the label accuracy of the model recalibrated on the sample (Platt),
against the raw model's and the majority rate.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import numpy as np
import polars as pl
from _common import SHARED, WEIGHTS, require_shared

import imgsent
from imgsent.calibration import _logit, fit_platt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=40)
    ap.add_argument("--sample-size", type=int, default=200)
    ap.add_argument("--share", type=float, default=0.3)
    args = ap.parse_args()
    require_shared()
    os.environ["IMGSENT_WEIGHTS"] = str(WEIGHTS)
    root = SHARED / "data" / "twitter_i"
    gt = root / "ground_truth"
    seen = {ln.split()[0] for ln in (gt / "twitter_five_agrees.txt").read_text().splitlines() if ln.strip()}
    three = dict(ln.split() for ln in (gt / "twitter_three_agrees.txt").read_text().splitlines() if ln.strip())
    unseen = sorted(k for k in three if k not in seen)
    rng = np.random.default_rng(0)
    neg = [k for k in unseen if three[k] == "0"]
    pos = [k for k in unseen if three[k] == "1"]
    pos = list(rng.choice(pos, size=int(round(len(neg) * args.share / (1 - args.share))), replace=False))
    tmp = Path(tempfile.mkdtemp(prefix="imgsent-collection-"))
    (tmp / "list.txt").write_text("".join(f"{root / 'images' / k}\n" for k in sorted(neg + pos)))
    imgsent.score([f"@{tmp / 'list.txt'}"], str(tmp / "scores.parquet"), model="mobilenet")
    df = pl.read_parquet(tmp / "scores.parquet")
    y = np.asarray([three[i.rsplit("/", 1)[1]] == "1" for i in df["id"]], dtype=int)
    p = df["p_positive"].to_numpy().astype(np.float64)
    truth, majority = y.mean(), max(y.mean(), 1 - y.mean())
    from imgsent.protocols import metrics

    auc = metrics(y, np.stack([1 - p, p], 1))["roc_auc"]
    print(f"collection: {len(y)} unseen Twitter I images, {truth:.3f} positive; model ROC-AUC {auc:.3f}")
    print(f"classify and count: {(df['label'] == 'positive').mean():.3f}; mean probability {p.mean():.3f}")
    cover = {"adjusted_count": [], "calibrated_probability": []}
    err = {k: [] for k in cover}
    acc = []
    for seed in range(args.samples):
        r = np.random.default_rng(seed)
        idx = r.choice(len(y), size=args.sample_size, replace=False)
        (tmp / "sample.txt").write_text("".join(f"{df['id'][int(i)]} {y[i]}\n" for i in idx))
        rep = imgsent.prevalence(str(tmp / "scores.parquet"), labels=str(tmp / "sample.txt"), seed=seed)
        for e in rep.estimates:
            if e.group == "all" and e.cls == "positive":
                cover[e.method].append(e.ci_low <= truth <= e.ci_high)
                err[e.method].append(abs(e.estimate - truth))
        a, b = fit_platt(p[idx], y[idx])
        acc.append(float(((1 / (1 + np.exp(-(a * _logit(p) + b))) >= 0.5) == y).mean()))
    for m in cover:
        print(
            f"{m}: interval covers the truth in {np.mean(cover[m]):.0%} of {args.samples} samples; "
            f"|estimate - truth| mean {np.mean(err[m]):.3f}, max {np.max(err[m]):.3f}"
        )
    raw = ((p >= 0.5) == y).mean()
    print(
        f"label accuracy: raw model {raw:.3f}; recalibrated on the sample {np.mean(acc):.3f} on average "
        f"(min {np.min(acc):.3f}, max {np.max(acc):.3f}); majority rate {majority:.3f}"
    )


if __name__ == "__main__":
    main()
