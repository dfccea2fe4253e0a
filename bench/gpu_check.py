"""The prepared GPU check: one short run on a lent GPU, one JSON file out (public API only).

    python bench/gpu_check.py --out gpu_check.json [--images 2000] [--device cuda]

Random weights and synthetic JPEGs (no network, no ../shared); under 8 minutes on one modern GPU
with 16 cores. Measures:
  decode ceiling        the engine's decoding processes alone (no model), images/s
  models                MobileNetV2, EfficientNet-B2, EfficientNet-B2 + BiT ResNet-v2: model alone
                        (uint8 batches already decoded) and end to end (imgsent.extract), images/s,
                        at batch 64 and 256, precision fp32 (TF32 off) and bf16
  agreement             GPU vs CPU features (EfficientNet-B2, 64 images): cosine min / mean and max
                        relative error, for fp32 and bf16
  independence          GPU features at batch 64 vs 256 and in reversed order: max abs difference
  memory                peak GPU memory (torch.cuda.max_memory_allocated)
  score vs extract      imgsent.score on the images (head on the GPU) vs imgsent.extract, images/s
  detector views        objects + regions views of a torchvision detector (random weights, so it
                        finds little) over 200 images on the device: images/s, or the error
Runs on the CPU too (``--device cpu --images 64``: a smoke test of this script, not a measurement).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from extract_bench import synthetic_jpegs  # noqa: E402

import imgsent  # noqa: E402
from imgsent.engine import FeatureEngine  # noqa: E402
from imgsent.inputs import find_images  # noqa: E402

MODELS = {
    "mobilenet_v2": ["torchvision:mobilenet_v2"],
    "efficientnet_b2": ["timm:efficientnet_b2"],
    "efficientnet_b2+bit_resnetv2_101": ["timm:efficientnet_b2", "timm:resnetv2_101x1_bit"],
}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def decode_ceiling(images: Path, device: str) -> float:
    engine = FeatureEngine([imgsent.create_backbone("timm:efficientnet_b2", random_weights=True)], device=device)
    refs = find_images([str(images)])
    batches = [list(range(s, min(s + engine.batch_size, len(refs)))) for s in range(0, len(refs), engine.batch_size)]
    start = time.perf_counter()
    for _ in engine.loader(engine.dataset(refs), batches):
        pass
    return len(refs) / (time.perf_counter() - start)


def model_alone(specs, device: str, batch: int, precision: str, n: int) -> float:
    models = [imgsent.create_backbone(s, random_weights=True) for s in specs]
    engine = FeatureEngine(models, device=device, batch_size=batch, precision=precision, workers=0)
    engine.prepare()
    views = {}
    for bb in models:
        h, w = bb.preprocess.input_size
        x = torch.randint(0, 256, (batch, 1, 3, h, w), dtype=torch.uint8)
        views[bb.preprocess.view_key] = x.pin_memory() if device.startswith("cuda") else x
    ok = list(range(batch))
    engine.embed_views(views, ok, batch)  # warm-up
    _sync(device)
    start = time.perf_counter()
    for _ in range(max(1, n // batch)):
        engine.embed_views(views, ok, batch)
    _sync(device)
    return max(1, n // batch) * batch / (time.perf_counter() - start)


def end_to_end(images: Path, specs, device: str, batch: int, precision: str, out: Path) -> float:
    start = time.perf_counter()
    s = imgsent.extract(
        [str(images)],
        str(out),
        backbones=specs,
        random_weights=True,
        device=device,
        batch_size=batch,
        precision=precision,
        overwrite=True,
    )
    assert s.errors == 0
    return s.total / (time.perf_counter() - start)


def agreement(images: Path, device: str, tmp: Path) -> dict:
    sub = tmp / "agree"
    sub.mkdir(exist_ok=True)
    for p in sorted(images.iterdir())[:64]:
        (sub / p.name).symlink_to(p)
    spec = ["timm:efficientnet_b2"]
    cpu = tmp / "agree_cpu"
    imgsent.extract([str(sub)], str(cpu), backbones=spec, random_weights=True, device="cpu", workers=0)
    ref = imgsent.features.load(str(cpu)).X.astype(np.float64)
    out = {}
    for precision in ("fp32", "bf16"):
        st = tmp / f"agree_{precision}"
        imgsent.extract([str(sub)], str(st), backbones=spec, random_weights=True, device=device, precision=precision)
        x = imgsent.features.load(str(st)).X.astype(np.float64)
        cos = (x * ref).sum(1) / np.linalg.norm(x, axis=1) / np.linalg.norm(ref, axis=1)
        rel = np.abs(x - ref).max() / np.abs(ref).max()
        out[precision] = {"cosine_min": float(cos.min()), "cosine_mean": float(cos.mean()), "max_rel_err": float(rel)}
    return out


def independence(images: Path, device: str, tmp: Path) -> dict:
    spec = ["timm:efficientnet_b2"]
    got = {}
    lst = tmp / "reversed.txt"
    lst.write_text("".join(f"{p}\n" for p in sorted(images.iterdir(), reverse=True)[:300]))
    fwd = tmp / "forward.txt"
    fwd.write_text("".join(f"{p}\n" for p in sorted(images.iterdir())[:300]))
    for name, src, batch in (("b64", fwd, 64), ("b256", fwd, 256), ("reversed", lst, 64)):
        st = tmp / f"ind_{name}"
        imgsent.extract(
            [f"@{src}"],
            str(st),
            backbones=spec,
            random_weights=True,
            device=device,
            batch_size=batch,
            precision="fp32",
            rows_per_shard=37,
        )
        got[name] = imgsent.features.load(str(st)).X
    return {
        "batch_64_vs_256_max_abs_diff": float(np.abs(got["b64"] - got["b256"]).max()),
        "order_max_abs_diff": float(np.abs(got["b64"] - got["reversed"]).max()),
    }


def detector_views(images: Path, device: str, tmp: Path) -> dict:
    """The objects and regions views of one torchvision detector on the device (decode once, one
    detector pass per image for both views)."""
    sub = tmp / "views"
    sub.mkdir(exist_ok=True)
    picked = sorted(images.iterdir())[:200]
    for p in picked:
        (sub / p.name).symlink_to(p)
    detector = "torchvision:fasterrcnn_mobilenet_v3_large_320_fpn"
    specs = [f"objects:{detector}", f"regions:{detector}+timm:efficientnet_b2+min=0"]
    try:
        t = time.perf_counter()
        s = imgsent.extract([str(sub)], str(tmp / "views_store"), backbones=specs, random_weights=True, device=device)
        rate = len(picked) / (time.perf_counter() - t)
    except Exception as exc:  # a new path on a GPU: record why, keep the rest of the check
        return {"error": f"{type(exc).__name__}: {exc}"[:500]}
    x = imgsent.features.load(str(tmp / "views_store")).X
    return {"images_per_s": round(rate, 1), "errors": s.errors, "rows_with_detections": int((x != 0).any(1).sum())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "gpu_check.json"))
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    t0 = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="imgsent-gpu-check-"))
    result: dict = {
        "imgsent": imgsent.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cores": os.cpu_count(),
        "device": args.device,
        "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
    }

    def save() -> None:
        result["elapsed_s"] = round(time.perf_counter() - t0, 1)
        Path(args.out).write_text(json.dumps(result, indent=1))

    images = tmp / "images"
    synthetic_jpegs(images, args.images, (640, 480))
    result["decode_ceiling_images_per_s"] = round(decode_ceiling(images, args.device), 1)
    save()
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    result["models"] = {}
    for name, specs in MODELS.items():
        for batch in (64, 256):
            for precision in ("fp32", "bf16"):
                key = f"{name}/batch{batch}/{precision}"
                result["models"][key] = {
                    "model_alone": round(model_alone(specs, args.device, batch, precision, args.images), 1),
                    "end_to_end": round(end_to_end(images, specs, args.device, batch, precision, tmp / "e2e"), 1),
                }
                print(key, result["models"][key], flush=True)
                save()
    result["agreement_vs_cpu"] = agreement(images, args.device, tmp)
    result["independence"] = independence(images, args.device, tmp)
    if args.device.startswith("cuda"):
        result["peak_gpu_memory_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    save()
    store = tmp / "for_head"
    spec = ["timm:efficientnet_b2"]
    t = time.perf_counter()
    imgsent.extract([str(images)], str(store), backbones=spec, random_weights=True, device=args.device)
    extract_rate = args.images / (time.perf_counter() - t)
    labels = tmp / "labels.txt"
    labels.write_text("".join(f"{p.name} {i % 2}\n" for i, p in enumerate(sorted(images.iterdir()))))
    imgsent.train(str(store), labels=str(labels), head="nn", epochs=1, cv=0, out=str(tmp / "model"))
    t = time.perf_counter()
    imgsent.score([str(images)], str(tmp / "scores.parquet"), model=str(tmp / "model"), device=args.device)
    result["score_vs_extract_images_per_s"] = {
        "extract": round(extract_rate, 1),
        "score": round(args.images / (time.perf_counter() - t), 1),
    }
    save()
    result["detector_views"] = detector_views(images, args.device, tmp)
    save()
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
