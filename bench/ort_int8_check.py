"""int8 for the EfficientNet-Lite family through ONNX Runtime's static quantisation: cosine to
float32, accuracy, speed (issue 34, item 4: adopted as ``--precision int8`` only if cosine >= 0.99
and held-out accuracy within 0.5 point).

    python bench/ort_int8_check.py [--shared ../shared] [--images 300] [--calibration synthetic|twitter]

1. Lite1 and Lite2 exported as imgsent runs them on ONNX Runtime (float32, passes of 8), then
   quantised by ``onnxruntime.quantization.quantize_static`` (QDQ, int8 weights per channel, uint8
   activations, MinMax) on imgsent's shipped calibration set (64 seeded synthetic images,
   :data:`imgsent.quantized.CALIBRATION`), or on 64 Twitter I images outside 5-agree.
2. Twitter I (1,269 images) extracted twice with ``--runtime onnx``: float32 graphs, then the int8
   ones (the engine's runner swapped for the bench); per backbone and image, cosine of int8 to
   float32 features.
3. The NN head on Lite1 + Lite2 (the ``lite`` model's recipe), 5-agree, 5 random 80/20 splits with
   seed 1, on float32 and on int8 features.
4. Speed: ``imgsent.extract`` of the first ``--images`` images, float32 then int8, twice each in turns.
Results: bench/results/ort_int8_check_{synthetic,twitter}.json (--out).
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
import imgsent.features  # noqa: E402
from imgsent import onnxrunner  # noqa: E402

LITES = ["timm:tf_efficientnet_lite1", "timm:tf_efficientnet_lite2"]
BATCH = 8


def calibration(bb, kind: str, shared: Path) -> np.ndarray:
    """(64, 3, H, W) float32 inputs normalised as ``bb`` wants."""
    import torch

    from imgsent.quantized import CALIBRATION, calibration_images

    h, w = bb.preprocess.input_size
    if kind == "synthetic":
        images = calibration_images(CALIBRATION["images"], h, w, seed=CALIBRATION["seed"]).float()
    else:
        from imgsent.decode import decode_image, make_views

        five = {ln.split()[0] for ln in (shared / "data/twitter_i/ground_truth/twitter_five_agrees.txt").open()}
        names = sorted(p for p in os.listdir(shared / "data/twitter_i/images") if p not in five)[:64]
        views = []
        for name in names:
            img, _ = decode_image(str(shared / "data/twitter_i/images" / name))
            views.append(torch.from_numpy(make_views(img, [bb.preprocess])[bb.preprocess.view_key][0]))
        images = torch.stack(views).float()
    mean = torch.tensor(bb.preprocess.mean).view(1, 3, 1, 1)
    std = torch.tensor(bb.preprocess.std).view(1, 3, 1, 1)
    return ((images / 255 - mean) / std).numpy().astype(np.float32)


def quantise(bb, float_path: str, kind: str, shared: Path, out: str) -> None:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    x = calibration(bb, kind, shared)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"x": x[i : i + BATCH]} for i in range(0, len(x), BATCH)])

        def get_next(self):
            return next(self.batches, None)

    quantize_static(
        float_path,
        out,
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", default=str(ROOT.parent / "shared"))
    ap.add_argument("--images", type=int, default=300)
    ap.add_argument("--calibration", choices=["synthetic", "twitter"], default="synthetic")
    ap.add_argument("--out", default=None, help="default: bench/results/ort_int8_check_CALIBRATION.json")
    args = ap.parse_args()
    shared = Path(args.shared)
    images = str(shared / "data" / "twitter_i" / "images")
    labels = str(shared / "data" / "twitter_i" / "ground_truth" / "twitter_five_agrees.txt")
    tmp = tempfile.mkdtemp()
    backbones = {s: imgsent.create_backbone(s) for s in LITES}
    int8_paths = {}
    for bb in backbones.values():
        runner = onnxrunner.prepare(bb, BATCH)
        int8_paths[bb.key] = os.path.join(tmp, f"{bb.key.split(':')[1]}.int8.onnx")
        quantise(bb, runner.path, args.calibration, shared, int8_paths[bb.key])

    real_prepare = onnxrunner.prepare

    def int8_prepare(bb, batch):  # the engine's runner, on the quantised graph
        real_prepare(bb, batch)
        return onnxrunner.OrtRunner(onnxrunner._session(int8_paths[bb.key]), batch, int8_paths[bb.key])

    kw = dict(backbones=LITES, runtime="onnx")
    imgsent.extract([images], os.path.join(tmp, "float"), **kw)
    onnxrunner.prepare = int8_prepare
    try:
        imgsent.extract([images], os.path.join(tmp, "int8"), **kw)
    finally:
        onnxrunner.prepare = real_prepare
    f, q = imgsent.features.load(os.path.join(tmp, "float")), imgsent.features.load(os.path.join(tmp, "int8"))
    assert f.ids == q.ids
    result: dict = {"calibration": args.calibration, "images": len(f.ids), "backbones": {}}
    for key in LITES:
        a, b = f.matrix([key]).astype(np.float64), q.matrix([key]).astype(np.float64)
        cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
        result["backbones"][key] = {
            "cosine_mean": round(float(cos.mean()), 5),
            "cosine_worst": round(float(cos.min()), 5),
        }
        print(key, result["backbones"][key], flush=True)
    for name, store in (("float32", "float"), ("int8", "int8")):
        rep = imgsent.evaluate(os.path.join(tmp, store), labels=labels, heads=["nn"], splits=5, seed=1, blocks=LITES)
        mean, std = rep.results[0].mean_std("accuracy")
        result[f"accuracy_{name}"] = [round(100 * mean, 2), round(100 * std, 2)]
        print(name, result[f"accuracy_{name}"], flush=True)
    files = sorted(os.listdir(images))[: args.images]
    listing = os.path.join(tmp, "list.txt")
    Path(listing).write_text("".join(os.path.join(images, p) + "\n" for p in files))
    times: dict[str, list[float]] = {"float32": [], "int8": []}
    for k in range(2):
        for name in ("float32", "int8"):
            if name == "int8":
                onnxrunner.prepare = int8_prepare
            try:
                t = time.perf_counter()
                imgsent.extract([f"@{listing}"], os.path.join(tmp, f"speed-{name}-{k}"), **kw)
                times[name].append(round(time.perf_counter() - t, 2))
            finally:
                onnxrunner.prepare = real_prepare
    result["seconds"] = times
    result["speedup"] = round(sum(times["float32"]) / sum(times["int8"]), 3)
    cos_ok = all(v["cosine_mean"] >= 0.99 for v in result["backbones"].values())
    acc_ok = result["accuracy_int8"][0] >= result["accuracy_float32"][0] - 0.5
    result["adopt"] = bool(cos_ok and acc_ok)
    out = args.out or str(ROOT / "bench" / "results" / f"ort_int8_check_{args.calibration}.json")
    Path(out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
