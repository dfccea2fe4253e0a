"""torch vs ONNX Runtime on the CPU, whole `imgsent score` processes side by side.

    python bench/runtime_bench.py [--images 1000] [--models default mobilenet] [--repeat 2] [--shared ../shared]

For each model: a warm-up run per runtime (frozen graphs and ONNX graphs cached), then, in turns,
`imgsent score @LIST --runtime torch|onnx` of the first N Twitter I images (whole process, start-up
included), `--repeat` times each; a warm one-image `imgsent score ONE.jpg --out -` per runtime (3
times, median); a cold one with an empty `$IMGSENT_HOME` (nothing cached: the graphs are built).
Scores of the two runtimes are compared (max |p_positive difference|, labels that differ).
Results: bench/results/runtime_bench.json. `mobilenet` reads $IMGSENT_WEIGHTS (set here from
../shared's MobileNetV2 file).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
RUNTIMES = ("torch", "onnx")


def run(args: list[str], env: dict) -> float:
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "imgsent", *args], env=env, capture_output=True, text=True)
    took = time.perf_counter() - t
    if r.returncode != 0:
        raise SystemExit(f"imgsent {' '.join(args)} failed:\n{r.stderr[-2000:]}")
    return took


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--models", nargs="+", default=["default", "mobilenet"])
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--shared", default=str(ROOT.parent / "shared"))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "runtime_bench.json"))
    args = ap.parse_args()
    shared = Path(args.shared)
    images = sorted((shared / "data" / "twitter_i" / "images").glob("*.jpg"))[: args.images]
    tmp = Path(tempfile.mkdtemp())
    listing = tmp / "list.txt"
    listing.write_text("".join(f"{p}\n" for p in images))
    warm_list = tmp / "warm.txt"
    warm_list.write_text("".join(f"{p}\n" for p in images[:16]))
    env = {**os.environ, "IMGSENT_WEIGHTS": str(shared / "models" / "mobilenet_v2_imagenet1k.safetensors")}
    result: dict = {"images": len(images), "cpu_cores": os.cpu_count(), "models": {}}
    for model in args.models:
        row: dict = {rt: {"seconds": []} for rt in RUNTIMES}
        for rt in RUNTIMES:
            run(
                [
                    "score",
                    f"@{warm_list}",
                    "--model",
                    model,
                    "--runtime",
                    rt,
                    "--out",
                    str(tmp / f"w-{model}-{rt}.parquet"),
                    "-q",
                ],
                env,
            )
        for k in range(args.repeat):
            for rt in RUNTIMES:
                out = tmp / f"{model}-{rt}-{k}.parquet"
                took = run(["score", f"@{listing}", "--model", model, "--runtime", rt, "--out", str(out), "-q"], env)
                row[rt]["seconds"].append(round(took, 2))
                print(model, rt, f"{took:.1f} s", flush=True)
        for rt in RUNTIMES:
            starts = [
                run(["score", str(images[0]), "--model", model, "--runtime", rt, "--out", "-", "-q"], env)
                for _ in range(3)
            ]
            row[rt]["warm_one_image_s"] = round(statistics.median(starts), 2)
            cold_env = {**env, "IMGSENT_HOME": str(tmp / f"cold-{model}-{rt}")}
            row[rt]["cold_one_image_s"] = round(
                run(["score", str(images[0]), "--model", model, "--runtime", rt, "--out", "-", "-q"], cold_env), 2
            )
            row[rt]["images_per_s"] = round(len(images) / statistics.mean(row[rt]["seconds"]), 1)
        a = pq.read_table(tmp / f"{model}-torch-0.parquet").to_pydict()
        b = pq.read_table(tmp / f"{model}-onnx-0.parquet").to_pydict()
        assert a["id"] == b["id"]
        row["max_p_positive_difference"] = max(abs(x - y) for x, y in zip(a["p_positive"], b["p_positive"]))
        row["labels_that_differ"] = sum(x != y for x, y in zip(a["label"], b["label"]))
        row["onnx_speedup"] = round(
            statistics.mean(row["torch"]["seconds"]) / statistics.mean(row["onnx"]["seconds"]), 3
        )
        result["models"][model] = row
        print(model, json.dumps(row), flush=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
