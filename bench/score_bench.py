"""Scoring speed: an existing feature store (rows/s, Parquet in and out), and images end to end.

    python bench/score_bench.py [--rows 100000] [--images 500 (0: skip)] [--repeat 5]

(1) Builds a synthetic store of ``--rows`` rows of 1280-d features shaped like the default model's
    (same recipe, random values), then times ``imgsent.score(features=STORE, out=x.parquet)``: read,
    recipe check, head, write; with the head in float32 (the default) and in bfloat16
    (``--precision bf16``), ``--repeat`` times each. (2) With ../shared present, scores ``--images`` Twitter I images end to
    end with the MobileNetV2 model (``--model mobilenet``; weights from ../shared via IMGSENT_WEIGHTS) and compares with the
    naive loop of extract_bench (PIL, torchvision transforms, model, one image at a time, then head);
    then again with its backbone in int8 (``--precision int8``, the official int8 MobileNetV2 from
    ../shared; the float-trained head accepts int8 features only because the run names them).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from _common import INT8_WEIGHTS, WEIGHTS, Timer, naive_loop, twitter_images

import imgsent
from imgsent.batches import FeatureBatch
from imgsent.features import feature_table
from imgsent.models import model_path
from imgsent.shards import ShardedWriter

MODEL = "mobilenet"  # the MobileNetV2 model (the default before 0.5), whose figures the README quotes


def synthetic_store(path: str, rows: int, seed: int = 0) -> None:
    meta = json.loads((Path(model_path(MODEL)) / "model.json").read_text())
    recipe = meta["features"]["backbones"][0]
    header = {"backbones": [recipe], "dtype": "float32", "tta": "none"}
    rng = np.random.default_rng(seed)
    per = 10_000
    with ShardedWriter(path, kind="features", header=header, rows_per_shard=per) as w:
        pending, _ = w.plan([f"img{i:08d}.jpg" for i in range(rows)])
        for c in pending:
            n = c.stop - c.start
            feats = np.abs(rng.normal(0, 1, size=(n, recipe["dim"]))).astype(np.float32)
            ids = [f"img{i:08d}.jpg" for i in range(c.start, c.stop)]
            status = ["ok"] * n
            batch = FeatureBatch(
                ids, [f"/data/{i}" for i in ids], status, [None] * n, [640] * n, [480] * n, {recipe["key"]: feats}
            )
            w.write(c, feature_table(batch))
        w.finish()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--images", type=int, default=500)
    ap.add_argument("--repeat", type=int, default=5, help="timed runs per precision (the first pays cold caches)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="imgsent-score-bench-"))
    try:
        store = str(tmp / "store")
        with Timer() as t:
            synthetic_store(store, args.rows)
        print(f"synthetic store: {args.rows} rows x 1280 float32 written in {t.seconds:.1f} s")
        import imgsent.scoring  # noqa: F401  (imports are not part of the rate)

        for precision in ("fp32", "bf16"):
            times = []
            for _ in range(args.repeat):
                with Timer() as t:
                    imgsent.score(features=store, out=str(tmp / "scores.parquet"), precision=precision, model=MODEL)
                times.append(t.seconds)
            rates = ", ".join(f"{args.rows / x:,.0f}" for x in times)
            print(f"score a store, head {precision}: best {args.rows / min(times):,.0f} rows/s (runs: {rates})")
        if WEIGHTS.is_file() and args.images:
            os.environ["IMGSENT_WEIGHTS"] = str(WEIGHTS)
            images = tmp / "images"
            twitter_images(args.images, images)  # page cache warmed for both contenders
            with Timer() as t:
                imgsent.score([str(images)], str(tmp / "img_scores.parquet"), model=MODEL)
            rate = args.images / t.seconds
            with Timer() as tn:
                _naive_score(sorted(images.iterdir()))
            naive = args.images / tn.seconds
            print(
                f"score images end to end: {rate:.1f} images/s; naive loop {naive:.1f} images/s ({rate / naive:.2f}x)"
            )
            if INT8_WEIGHTS.is_file():
                with Timer() as t8:
                    imgsent.score(
                        [str(images)],
                        str(tmp / "int8_scores.parquet"),
                        weights=[str(INT8_WEIGHTS)],
                        precision="int8",
                        model=MODEL,
                    )
                rate8 = args.images / t8.seconds
                print(f"score images end to end, backbone int8: {rate8:.1f} images/s ({rate8 / rate:.2f}x float32)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _naive_score(paths) -> None:
    """``_common.naive_loop`` with the default model's backbone and head."""
    from torchvision.models.quantization import MobileNet_V2_QuantizedWeights

    from imgsent.backbones import create_backbone

    model = imgsent.load_model(model_path(MODEL))
    bb = create_backbone(f"torchvision:mobilenet_v2.IMAGENET1K_QNNPACK_V1@{WEIGHTS}")
    naive_loop(paths, [bb], [MobileNet_V2_QuantizedWeights.IMAGENET1K_QNNPACK_V1.transforms()], head=model)


if __name__ == "__main__":
    main()
