"""How many torch threads a head's training should use, idle and on a busy machine.

    python bench/train_threads.py [--busy 4] [--out bench/results/train_threads.json]

Trains the NN and MoE (schedule 1) heads on the default model's features of Twitter I 5-agree
(882 images, 2,560-d) with torch's default thread count and with one thread, first on an idle
machine, then with ``--busy`` processes spinning beside it (each a busy loop: the "ordinary load"
of a shared machine). `imgsent train` uses what this measures (imgsent.training.FIT_THREADS).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import time
from pathlib import Path

import numpy as np
from _common import ROOT, SHARED, TWITTER, require_shared


def spin(stop) -> None:
    x = 0
    while not stop.is_set():
        x += 1


def timed(X, y, blocks, head: str, threads: int) -> float:
    from imgsent.training import TrainConfig, fit

    t = time.perf_counter()
    fit(X, y, ["negative", "positive"], blocks, TrainConfig.named(head), threads=threads)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--busy", type=int, default=4)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "train_threads.json"))
    args = ap.parse_args()
    require_shared()
    import torch

    import imgsent.scoring
    from imgsent.features import load

    store = ROOT / "bench" / "out" / "twitter_i_default.features"
    imgsent.scoring.extract_model_features([str(TWITTER)], str(store), workers=1)
    gt = dict(
        line.split()
        for line in (SHARED / "data/twitter_i/ground_truth/twitter_five_agrees.txt").read_text().splitlines()
    )
    fs = load(str(store))
    rows = [k for k, i in enumerate(fs.ids) if os.path.basename(i) in gt]
    X, y = fs.X[rows], np.asarray([int(gt[os.path.basename(fs.ids[k])]) for k in rows])
    default = torch.get_num_threads()
    result = {"cores": os.cpu_count(), "torch_default_threads": default, "images": len(rows), "runs": []}
    for load_name in ("idle", f"{args.busy} busy processes"):
        stop, procs = mp.Event(), []
        if load_name != "idle":
            procs = [mp.Process(target=spin, args=(stop,)) for _ in range(args.busy)]
            for p in procs:
                p.start()
        try:
            for head in ("nn", "moe1"):
                for threads in sorted({default, 1}, reverse=True):
                    s = timed(X, y, fs.blocks, head, threads)
                    row = {"load": load_name, "head": head, "threads": threads, "seconds": round(s, 2)}
                    print(json.dumps(row), flush=True)
                    result["runs"].append(row)
        finally:
            stop.set()
            for p in procs:
                p.join()
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
