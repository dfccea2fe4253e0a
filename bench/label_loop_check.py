"""How much the labelling loop (`imgsent label`) gains, and whether its estimates are honest, on
Twitter I with a simulated annotator (its 3-agree ground truth) through the HTTP API.

    python bench/label_loop_check.py [--checkpoints 20 50 100 200 400] [--seed 0] [--out FILE]

Two collections, each with a starting model that has not seen it:
- ``held-out``: a NN head trained (as `imgsent train` trains it) on a random 30 % of Twitter I over
  the default model's backbones; the collection is the other 70 % (888 images: 666 served, 222 test).
- ``default``: the packaged default model, on the 387 Twitter I images outside its training set
  (5-agree), the hard, ambiguous ones (291 served, 96 test).
- ``shifted``: the same images with positives left out at random until 30 % are positive (the
  default calls far more of them positive: the kind of shift other collections show).
For each strategy (random, active, mix) the annotator labels through `GET /api/next?wait=` and
`POST /api/label`; at each checkpoint the server is stopped with SIGTERM (it writes `--model-out`)
and restarted on the same labels file. The written model is scored on the images not yet labelled
(accuracy, ROC-AUC), beside the starting model on the same images, and on a fixed quarter of the
collection that is never served (the same images for every strategy: the unlabelled rest of an
active run is easier than a random run's); the page's accuracy estimate and its 95 % interval are
read from `/api/status` and checked against the truth on the unlabelled rest.

Then the learner, offline on random labels (8 draws): the starting model's logits as a prior with
a linear correction (imgsent's; with and without its accuracy check), fine-tuning the starting
head, and a linear model on the labels alone. Results: bench/results/label_loop_check.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from _common import ROOT, SHARED, TWITTER, require_shared

import imgsent  # noqa: E402
import imgsent.scoring  # noqa: E402
from imgsent import adapting  # noqa: E402
from imgsent.features import load  # noqa: E402
from imgsent.models import resolve_model  # noqa: E402
from imgsent.protocols import metrics  # noqa: E402
from imgsent.training import load_model  # noqa: E402

GT = SHARED / "data" / "twitter_i" / "ground_truth"


def truth(name: str) -> dict[str, str]:
    out = {}
    for line in (GT / name).read_text().splitlines():
        f, v = line.split()
        out[f] = "positive" if v == "1" else "negative"
    return out


def start_server(args: list[str], cwd: Path) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "imgsent", "label", *args, "--no-browser", "--port", "0", "--token", "bench", "-q"],
        cwd=cwd,
        stderr=subprocess.PIPE,
        text=True,
    )
    while True:
        line = proc.stderr.readline()
        m = re.search(r"open (http://127\.0\.0\.1:\d+)/\?token=bench", line)
        if m:
            return proc, m.group(1)
        if not line and proc.poll() is not None:
            raise SystemExit(f"bench: imgsent label did not start: {proc.stderr.read()}")


def stop_server(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=600)[1]
    if proc.returncode != 0:
        raise SystemExit(f"bench: imgsent label exited {proc.returncode}: {err[-2000:]}")


def evaluate_on(store: str, model: str, keep, gt: dict[str, str]) -> dict:
    """Accuracy and ROC-AUC of ``model`` on the images of ``store`` whose id ``keep`` accepts."""
    m = load_model(model) if os.path.isdir(model) else resolve_model(model)
    fs = load(store, backbones=[k for k, _ in m.blocks])
    rows = [k for k, i in enumerate(fs.ids) if keep(i)]
    y = np.asarray([m.classes.index(gt[os.path.basename(fs.ids[k])]) for k in rows])
    got = metrics(y, m.predict_proba(fs.X[rows]))
    return {
        "images": len(rows),
        "accuracy": round(got["accuracy"], 4),
        "auc": round(got.get("roc_auc", float("nan")), 4),
    }


def run_loop(name, store, full, test, start_model, gt, strategy, checkpoints, work: Path, seed: int) -> list[dict]:
    import httpx

    labels = work / f"{name}-{strategy}.csv"
    labels.unlink(missing_ok=True)
    rows = []
    done: list[str] = []
    for target in checkpoints:
        model_out = work / f"{name}-{strategy}-{target}"
        args = ["--features", store, "--out", str(labels), "--model", start_model, "--strategy", strategy]
        args += ["--seed", str(seed), "--model-out", str(model_out)]
        proc, url = start_server(args, work)
        t0 = time.monotonic()
        with httpx.Client(base_url=url, headers={"Authorization": "Bearer bench"}, timeout=600) as c:
            while len(done) < target:
                n = c.get("/api/next", params={"wait": 300}).json()
                if n["id"] is None:
                    break
                r = c.post("/api/label", json={"id": n["id"], "label": gt[os.path.basename(n["id"])]})
                r.raise_for_status()
                done.append(n["id"])
            c.get("/api/next", params={"wait": 300})  # the model has learnt every label
            status = c.get("/api/status").json()
        stop_server(proc)
        if len(done) < target:
            break
        seen = set(done)
        rest = evaluate_on(store, str(model_out), lambda i, seen=seen: i not in seen, gt)
        start = evaluate_on(store, start_model, lambda i, seen=seen: i not in seen, gt)
        on_test = lambda i: os.path.basename(i) in test  # noqa: E731
        acc = status["accuracy"]
        row = {
            "collection": name,
            "strategy": strategy,
            "labels": len(done),
            "by_mode": status["by_mode"],
            "written_model": rest,
            "starting_model": start,
            "test_written": evaluate_on(full, str(model_out), on_test, gt),
            "test_starting": evaluate_on(full, start_model, on_test, gt),
            "estimate": {k: acc[k] for k in ("estimate", "low", "high", "n")},
            "interval_covers_truth": None
            if acc["estimate"] is None
            else bool(acc["low"] <= rest["accuracy"] <= acc["high"]),
            "prevalence": status.get("prevalence", {}).get("classes"),
            "seconds": round(time.monotonic() - t0, 1),
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
        lost = len(done) - sum(1 for _ in open(labels)) + 1
        assert lost == 0, f"{lost} acknowledged labels are not in {labels}"
    return rows


def learners(store, start_model, gt, checkpoints, draws=8) -> list[dict]:
    m = load_model(start_model) if os.path.isdir(start_model) else resolve_model(start_model)
    fs = load(store, backbones=[k for k, _ in m.blocks])
    y = np.asarray([m.classes.index(gt[os.path.basename(i)]) for i in fs.ids])
    prior = adapting.Prior(m, m.classes, fs.blocks)
    alone = adapting.Prior(None, m.classes, fs.blocks)
    U, S = prior.inputs(fs.X)
    out = []
    for n in checkpoints:
        if n >= len(y) - 50:
            continue
        res: dict[str, list] = {k: [] for k in ("start", "prior", "prior_unguarded", "finetune", "labels_alone")}
        for d in range(draws):
            perm = np.random.default_rng(d).permutation(len(y))
            tr, te = perm[:n], perm[n:]

            def score(p, te=te):
                got = metrics(y[te], p)
                return got["accuracy"], got.get("roc_auc", float("nan"))

            res["start"].append(score(m.predict_proba(fs.X[te])))
            c = adapting.fit_correction(U[tr], S[tr], y[tr], 2, seed=d)
            res["prior"].append(score(adapting.predict(prior, c, fs.X[te])))
            lam = adapting.select_penalty(U[tr], S[tr], y[tr], 2, seed=d, guard=False)
            res["prior_unguarded"].append(
                score(adapting.predict(prior, adapting.fit_penalised(U[tr], S[tr], y[tr], 2, lam), fs.X[te]))
            )
            res["finetune"].append(score(adapting.finetune(prior, fs.X[tr], y[tr], seed=d).predict_proba(fs.X[te])))
            c2 = adapting.fit_correction(U[tr], None, y[tr], 2, seed=d)
            res["labels_alone"].append(score(adapting.predict(alone, c2, fs.X[te])))
        row = {"labels": n}
        for k, v in res.items():
            a = np.asarray(v)
            row[k] = {"accuracy": round(float(a[:, 0].mean()), 4), "auc": round(float(a[:, 1].mean()), 4)}
        print(json.dumps(row), flush=True)
        out.append(row)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoints", type=int, nargs="+", default=[20, 50, 100, 200, 400])
    ap.add_argument("--strategies", nargs="+", default=["random", "active", "mix"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--collections", nargs="+", default=["held-out", "default", "shifted"])
    ap.add_argument("--work", default=str(ROOT / "bench" / "out" / "label_loop"))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "label_loop_check.json"))
    args = ap.parse_args()
    require_shared()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    gt = truth("twitter_three_agrees.txt")
    five = set(truth("twitter_five_agrees.txt"))
    names = sorted(gt)
    rng = np.random.default_rng(args.seed)
    start_part = set(rng.choice(names, size=int(0.3 * len(names)), replace=False).tolist())
    hard = [n for n in names if n not in five]
    neg = [n for n in hard if gt[n] == "negative"]
    pos = sorted(rng.choice([n for n in hard if gt[n] == "positive"], size=int(len(neg) * 0.3 / 0.7), replace=False))
    collections = {
        "held-out": [n for n in names if n not in start_part],
        "default": hard,
        "shifted": sorted(neg + list(pos)),  # the hard images with 30 % positive: the model says positive too often
    }
    collections = {k: v for k, v in collections.items() if k in args.collections}
    tests = {}
    for name, files in collections.items():  # a fixed quarter of each collection is never served
        rng_t = np.random.default_rng(args.seed + 1)
        tests[name] = set(rng_t.choice(files, size=len(files) // 4, replace=False).tolist())
        collections[name] = [f for f in files if f not in tests[name]]
    full = str(work / "twitter_i.features")
    imgsent.scoring.extract_model_features([str(TWITTER)], full, workers=1)  # resumable: once
    started = str(work / "start-held-out")
    if not os.path.isdir(started):
        (work / "start.txt").write_text("".join(f"{n} {gt[n]}\n" for n in sorted(start_part)))
        imgsent.train(full, labels=str(work / "start.txt"), head="nn", out=started, seed=args.seed)
    starts = {"held-out": started, "default": "default", "shifted": "default"}
    result = {"seed": args.seed, "loops": [], "learners": {}}
    for name, files in collections.items():
        listing = work / f"{name}.txt"
        listing.write_text("".join(f"{TWITTER / n}\n" for n in files))
        store = str(work / f"{name}.features")
        imgsent.scoring.extract_model_features([f"@{listing}"], store, workers=1)
        points = [c for c in args.checkpoints if c <= len(files) - 100]
        for strategy in args.strategies:
            result["loops"] += run_loop(
                name, store, full, tests[name], starts[name], gt, strategy, points, work, args.seed
            )
        result["learners"][name] = learners(store, starts[name], gt, points)
        Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
