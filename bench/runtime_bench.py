"""torch vs ONNX Runtime on the CPU, whole `imgsent score` processes side by side.

    python bench/runtime_bench.py [--images 1000] [--models default mobilenet] [--repeat 2] [--shared ../shared]

Three ways to run, for each model:
- `torch`: `--runtime torch` (imgsent's frozen TorchScript graphs);
- `onnx_in_torch_engine`: `--runtime onnx` with `IMGSENT_NO_LIGHT=1`: the torch engine, its networks on
  ONNX Runtime (what every first run of a model does);
- `onnx`: `--runtime onnx` once the model's plan is written: no torch imported (imgsent/ortengine.py).
A warm-up run per way (frozen graphs, ONNX graphs and the plan cached), then, in turns,
`imgsent score @LIST` of the first N Twitter I images (whole process, start-up included), `--repeat`
times each; a warm one-image `imgsent score ONE.jpg --out -` per way (5 times, median); a cold one
with an empty `$IMGSENT_HOME` (nothing cached: the graphs are built; the same for both onnx ways).
Scores are compared with torch's (max |p_positive difference|, labels that differ).
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
WAYS = {  # name -> (--runtime, extra environment)
    "torch": ("torch", {}),
    "onnx_in_torch_engine": ("onnx", {"IMGSENT_NO_LIGHT": "1"}),
    "onnx": ("onnx", {}),
}


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
        row: dict = {way: {"seconds": []} for way in WAYS}

        def score(way: str, what: str, out: str, home: str | None = None, model: str = model) -> float:
            runtime, extra = WAYS[way]
            run_env = {**env, **extra, **({"IMGSENT_HOME": home} if home else {})}
            return run(["score", what, "--model", model, "--runtime", runtime, "--out", out, "-q"], run_env)

        for way in WAYS:
            score(way, f"@{warm_list}", str(tmp / f"w-{model}-{way}.parquet"))
        for k in range(args.repeat):
            for way in WAYS:
                took = score(way, f"@{listing}", str(tmp / f"{model}-{way}-{k}.parquet"))
                row[way]["seconds"].append(round(took, 2))
                print(model, way, f"{took:.1f} s", flush=True)
        for way in WAYS:
            starts = [score(way, str(images[0]), "-") for _ in range(5)]
            row[way]["warm_one_image_s"] = round(statistics.median(starts), 2)
            row[way]["warm_one_image_all_s"] = [round(s, 2) for s in starts]
            home = str(tmp / f"cold-{model}-{way}")
            row[way]["cold_one_image_s"] = round(score(way, str(images[0]), "-", home), 2)
            row[way]["images_per_s"] = round(len(images) / statistics.mean(row[way]["seconds"]), 1)
        a = pq.read_table(tmp / f"{model}-torch-0.parquet").to_pydict()
        for way in list(WAYS)[1:]:
            b = pq.read_table(tmp / f"{model}-{way}-0.parquet").to_pydict()
            assert a["id"] == b["id"]
            row[way]["max_p_positive_difference"] = max(abs(x - y) for x, y in zip(a["p_positive"], b["p_positive"]))
            row[way]["labels_that_differ"] = sum(x != y for x, y in zip(a["label"], b["label"]))
            row[way]["speedup_over_torch"] = round(
                statistics.mean(row["torch"]["seconds"]) / statistics.mean(row[way]["seconds"]), 3
            )
        result["models"][model] = row
        print(model, json.dumps(row), flush=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
