"""int8 for the EfficientNet-Lite family (the default model's backbones): accuracy and speed side by
side with float32.

    python bench/lite_int8_check.py --store FLOAT_STORE [--images 300] [--out bench/results/lite_int8_check.json]

1. Extracts Twitter I (1,269 images) with Lite1 + Lite2 under ``--precision int8`` (post-training
   static int8, imgsent's shipped calibration set: the Lite weights have no official int8 version).
2. Per backbone: cosine of each image's int8 features to the float32 ones in ``--store`` (an imgsent
   store of Twitter I holding ``timm:tf_efficientnet_lite1`` and ``timm:tf_efficientnet_lite2``).
3. Held-out accuracy of the default model's head (NN) trained on int8 features vs float32 ones
   (``imgsent.evaluate``, 5 random 80/20 splits of 5-agree, seed 0), and the packaged default
   model (trained on float32) fed int8 features: labels that flip.
4. Speed: ``imgsent.extract`` of the first ``--images`` images, float32 then int8, twice each in turns.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import imgsent  # noqa: E402

LITES = ["timm:tf_efficientnet_lite1", "timm:tf_efficientnet_lite2"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", default=str(ROOT.parent / "shared"))
    ap.add_argument("--store", required=True)
    ap.add_argument("--images", type=int, default=300)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "lite_int8_check.json"))
    args = ap.parse_args()
    data = Path(args.shared) / "data" / "twitter_i"
    labels = str(data / "ground_truth" / "twitter_five_agrees.txt")
    tmp = Path(tempfile.mkdtemp(prefix="lite-int8-"))
    int8_store = str(tmp / "int8")
    imgsent.extract([str(data / "images")], int8_store, backbones=LITES, precision="int8", progress=True)
    f32 = imgsent.features.load(args.store, LITES)
    i8 = imgsent.features.load(int8_store, LITES)
    assert f32.ids == i8.ids
    result: dict = {"images": len(f32.ids), "cosine_int8_to_float32": {}}
    for key in LITES:
        a, b = f32.matrix([key]), i8.matrix([key])
        c = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
        result["cosine_int8_to_float32"][key] = {"mean": round(float(c.mean()), 4), "worst": round(float(c.min()), 4)}
    for name, store in (("float32", args.store), ("int8", int8_store)):
        r = imgsent.evaluate(store, labels=labels, heads=["nn"], splits=5, seed=0, blocks=LITES).results[0]
        mean, std = r.mean_std("accuracy")
        result[f"nn_held_out_accuracy_{name}"] = f"{100 * mean:.2f} +- {100 * std:.2f}"
    model = imgsent.load_model(imgsent.models.default_model_path())
    p32 = model.predict_proba(f32.matrix(LITES))
    p8 = model.predict_proba(i8.matrix(LITES))
    result["default_model_on_int8_features"] = {
        "labels_flipped": int((p32.argmax(1) != p8.argmax(1)).sum()),
        "mean_abs_p_change": round(float(np.abs(p32 - p8)[:, 1].mean()), 4),
    }
    listing = tmp / "list.txt"
    listing.write_text(
        "".join(str(data / "images" / f) + "\n" for f in sorted(os.listdir(data / "images"))[: args.images])
    )
    rates: dict[str, list[float]] = {"float32": [], "int8": []}
    for rep in range(2):
        for name in rates:
            t = time.perf_counter()
            precision = "fp32" if name == "float32" else name
            imgsent.extract([f"@{listing}"], str(tmp / f"speed-{name}-{rep}"), backbones=LITES, precision=precision)
            rates[name].append(round(args.images / (time.perf_counter() - t), 1))
    result["extract_images_per_second"] = rates
    result["int8_speedup"] = round(max(rates["int8"]) / max(rates["float32"]), 2)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
