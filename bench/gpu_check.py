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
  resolution            decode-bound extraction (tiny backbone) at 1920x1080 over 640x480, time
                        ratio, on every core the host has (issue 16 item 8)
                        with Pillow in the decoding processes and with ``decode="device"``
  device decode         ``decode="device"`` (nvJPEG): JPEGs decoded on the card vs refused; features
                        vs Pillow-decoded ones (cosine); end to end images/s for MobileNetV2 and
                        EfficientNet-B2 (bf16, batch 64 and 256), both ways of decoding
  nvjpeg probe          torchvision's GPU JPEG decoder alone on the 1080p files (batch decode +
                        bicubic resize on the card), images/s; its pixel difference from PIL's decode
  decoders              each installed ``decode="device"`` decoder (nvImageCodec, TorchCodec,
                        torchvision; ``IMGSENT_DEVICE_DECODER``): EfficientNet-B2 and MobileNetV2 end
                        to end (bf16, batch 256) at 640x480 and 1920x1080, overlap on and off
                        (``FeatureEngine(overlap=...)``), and features vs Pillow-decoded ones: the
                        measurement that sets ``devicedecode.PREFERRED`` (issue 26)
Each section runs on its own: an error is recorded in the JSON (with the traceback's tail) and the
rest goes on; sections are skipped once ``--budget`` seconds have passed. The JSON is rewritten
after every section, so a run stopped early still leaves what it measured.
Runs on the CPU too (``--device cpu --images 64``: a smoke test of this script, not a measurement).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from extract_bench import decode_bound_rate, synthetic_jpegs  # noqa: E402

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


def end_to_end(images: Path, specs, device: str, batch: int, precision: str, out: Path, decode="workers") -> float:
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
        decode=decode,
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
    scale = float(np.abs(got["b64"]).max())
    return {
        "batch_64_vs_256_max_abs_diff": float(np.abs(got["b64"] - got["b256"]).max()),
        "order_max_abs_diff": float(np.abs(got["b64"] - got["reversed"]).max()),
        "order_max_rel_diff": float(np.abs(got["b64"] - got["reversed"]).max()) / scale,
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
    t = time.perf_counter()
    s = imgsent.extract([str(sub)], str(tmp / "views_store"), backbones=specs, random_weights=True, device=device)
    rate = len(picked) / (time.perf_counter() - t)
    x = imgsent.features.load(str(tmp / "views_store")).X
    return {"images_per_s": round(rate, 1), "errors": s.errors, "rows_with_detections": int((x != 0).any(1).sum())}


def make_jpegs(directory: Path, n: int, size: tuple[int, int]) -> None:
    """``synthetic_jpegs`` in chunks on every core (making 2,000 photos on one core costs a minute
    of the lent GPU's time)."""
    chunk = max(1, -(-n // (os.cpu_count() or 1)))
    with ProcessPoolExecutor() as pool:
        jobs = [pool.submit(synthetic_jpegs, directory, min(chunk, n - f), size, f) for f in range(0, n, chunk)]
        for job in jobs:
            job.result()


def resolution(tmp: Path, n: int, device: str) -> dict:
    """Decode-bound extraction (``timm:test_resnet``) time at 1920x1080 over 640x480, default
    workers, Pillow decoding and (on CUDA) decoding on the card."""
    out = {}
    for decode in ("workers", "device") if device.startswith("cuda") else ("workers",):
        for w, h in ((1920, 1080), (640, 480)):
            d = tmp / f"res_{w}x{h}"
            if not d.exists():
                make_jpegs(d, n, (w, h))
            rate = decode_bound_rate(d, tmp / f"res_store_{w}_{decode}", device=device, decode=decode)
            out[f"{decode}/{w}x{h}_images_per_s"] = round(rate, 1)
        ratio = out[f"{decode}/640x480_images_per_s"] / out[f"{decode}/1920x1080_images_per_s"]
        out[f"{decode}/time_ratio_1080p_over_640x480"] = round(ratio, 2)
    return out


def device_decode(images: Path, device: str, tmp: Path) -> dict:
    """decode="device": how many JPEGs the card decoded; features against Pillow's; images/s."""
    refs = find_images([str(images)])
    spec = "timm:efficientnet_b2"
    engine = FeatureEngine([imgsent.create_backbone(spec, random_weights=True)], device=device, decode="device")
    for _ in engine.run(refs[:512]):
        pass
    out: dict = {"decoded_on_device": engine.device_decoded[0], "refused_then_pillow": engine.device_decoded[1]}
    sub = tmp / "dd_sub"
    sub.mkdir(exist_ok=True)
    for p in sorted(images.iterdir())[:300]:
        (sub / p.name).symlink_to(p)
    x = {}
    for decode in ("workers", "device"):
        st = tmp / f"dd_{decode}"
        imgsent.extract([str(sub)], str(st), backbones=[spec], random_weights=True, device=device, decode=decode)
        x[decode] = imgsent.features.load(str(st)).X.astype(np.float64)
    a, b = x["workers"], x["device"]
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    out["features_vs_pillow"] = {"cosine_min": float(cos.min()), "cosine_mean": float(cos.mean())}
    rates = {}
    for name, specs in (("mobilenet_v2", MODELS["mobilenet_v2"]), ("efficientnet_b2", [spec])):
        for batch in (64, 256):
            for decode in ("workers", "device"):
                rate = end_to_end(images, specs, device, batch, "bf16", tmp / "dd_e2e", decode)
                rates[f"{name}/batch{batch}/bf16/{decode}"] = round(rate, 1)
    out["end_to_end_images_per_s"] = rates
    return out


def nvjpeg_probe(tmp: Path, device: str) -> dict:
    """torchvision.io.decode_jpeg on the card over the 1080p files of ``resolution``, batches of 64,
    then a bicubic antialiased resize to 288 short side (EfficientNet-B2's input) on the card."""
    import torch.nn.functional as F
    import torchvision.io as tio
    from PIL import Image

    files = sorted((tmp / "res_1920x1080").iterdir())
    data = [tio.read_file(str(f)) for f in files]
    out = {}
    for rep in range(2):  # the first pass initialises nvJPEG
        _sync(device)
        t = time.perf_counter()
        for s in range(0, len(data), 64):
            imgs = tio.decode_jpeg(data[s : s + 64], device=device)
            x = torch.stack(imgs).float()
            F.interpolate(x, size=(288, 512), mode="bicubic", antialias=True, align_corners=False)
        _sync(device)
        out["images_per_s" if rep else "first_pass_images_per_s"] = round(len(data) / (time.perf_counter() - t), 1)
    gpu = tio.decode_jpeg(data[0], device=device).permute(1, 2, 0).cpu().numpy().astype(np.int16)
    ref = np.asarray(Image.open(files[0]).convert("RGB")).astype(np.int16)
    out["max_abs_pixel_diff_vs_pil"] = int(np.abs(gpu - ref).max())
    out["mean_abs_pixel_diff_vs_pil"] = round(float(np.abs(gpu - ref).mean()), 3)
    return out


def decoders(images: Path, tmp: Path, device: str, n_1080p: int) -> dict:
    """Each installed device decoder x overlap on / off, end to end; features against Pillow's."""
    from imgsent import devicedecode

    big = tmp / "res_1920x1080"
    if not big.is_dir():
        make_jpegs(big, n_1080p, (1920, 1080))
    sets = {"640x480": find_images([str(images)]), "1920x1080": find_images([str(big)])}
    out: dict = {"installed": [b for b in devicedecode.BACKENDS if devicedecode.installed(b)], "runs": {}}
    pillow = {}
    for name, specs in (("efficientnet_b2", MODELS["efficientnet_b2"]), ("mobilenet_v2", MODELS["mobilenet_v2"])):
        models = [imgsent.create_backbone(s, random_weights=True) for s in specs]
        ref_engine = FeatureEngine(models, device=device, batch_size=256, precision="bf16", decode="workers")
        pillow[name] = np.concatenate([b.features[specs[0]] for b in ref_engine.run(sets["640x480"][:256])])
        for decoder in out["installed"]:
            os.environ[devicedecode.CHOICE_ENV] = decoder
            for overlap in (True, False):
                engine = FeatureEngine(
                    models, device=device, batch_size=256, precision="bf16", decode="device", overlap=overlap
                )
                for _ in engine.run(sets["640x480"][:256]):  # warm-up (and cuDNN / nvJPEG set-up)
                    pass
                for size, refs in sets.items():
                    _sync(device)
                    t = time.perf_counter()
                    feats = [b.features[specs[0]] for b in engine.run(refs)]
                    _sync(device)
                    key = f"{name}/{decoder}/{'overlap' if overlap else 'serial'}/{size}"
                    out["runs"][key] = round(len(refs) / (time.perf_counter() - t), 1)
                    if size == "640x480" and overlap:
                        a, b = pillow[name].astype(np.float64), np.concatenate(feats)[:256].astype(np.float64)
                        cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
                        out[f"{name}/{decoder}/cosine_vs_pillow_min"] = round(float(cos.min()), 5)
                out[f"{name}/{decoder}/refused_then_pillow"] = engine.device_decoded[1]
    os.environ.pop(devicedecode.CHOICE_ENV, None)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "gpu_check.json"))
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--resolution-images", type=int, default=800)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--budget", type=float, default=420, help="seconds; sections not begun by then are skipped")
    ap.add_argument("--sections", default="", help="comma-separated name prefixes of the sections to run (all)")
    args = ap.parse_args()
    t0 = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="imgsent-gpu-check-"))
    cuda = args.device.startswith("cuda")
    result: dict = {
        "imgsent": imgsent.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cores": os.cpu_count(),
        "device": args.device,
        "gpu": torch.cuda.get_device_name() if cuda else None,
        "capability": list(torch.cuda.get_device_capability()) if cuda else None,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "shm_free_mb": round(shutil.disk_usage("/dev/shm").free / 2**20) if os.path.isdir("/dev/shm") else None,
        "errors": {},
        "skipped": [],
    }

    def save() -> None:
        result["elapsed_s"] = round(time.perf_counter() - t0, 1)
        Path(args.out).write_text(json.dumps(result, indent=1))

    wanted = [w for w in args.sections.split(",") if w]

    def section(name: str, fn, *a):
        if wanted and not any(name.startswith(w) for w in wanted):
            return None
        if time.perf_counter() - t0 > args.budget:
            result["skipped"].append(name)
            save()
            return None
        t = time.perf_counter()
        try:
            got = fn(*a)
        except Exception as exc:  # one section's failure must not cost the others
            result["errors"][name] = f"{type(exc).__name__}: {exc}"[:400] + " | " + traceback.format_exc()[-1200:]
            got = None
        result.setdefault("section_s", {})[name] = round(time.perf_counter() - t, 1)
        print(name, round(time.perf_counter() - t0, 1), "s", json.dumps(got)[:300], flush=True)
        save()
        return got

    images = tmp / "images"
    make_jpegs(images, args.images, (640, 480))
    result["decode_ceiling_images_per_s"] = section(
        "decode_ceiling", lambda: round(decode_ceiling(images, args.device), 1)
    )
    result["agreement_vs_cpu"] = section("agreement", agreement, images, args.device, tmp)
    result["independence"] = section("independence", independence, images, args.device, tmp)
    result["detector_views"] = section("detector_views", detector_views, images, args.device, tmp)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    result["models"] = {}
    for name, specs in MODELS.items():
        for batch in (64, 256):
            for precision in ("fp32", "bf16"):
                key = f"{name}/batch{batch}/{precision}"
                result["models"][key] = section(key, one_model, images, specs, args, batch, precision, tmp)
    if cuda:
        result["peak_gpu_memory_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    result["score_vs_extract_images_per_s"] = section("score_vs_extract", score_vs_extract, images, args.device, tmp)
    result["device_decode"] = section("device_decode", device_decode, images, args.device, tmp) if cuda else None
    result["resolution"] = section("resolution", resolution, tmp, args.resolution_images, args.device)
    if cuda:
        result["nvjpeg_probe"] = section("nvjpeg_probe", nvjpeg_probe, tmp, args.device)
    result["decoders"] = section("decoders", decoders, images, tmp, args.device, args.resolution_images)
    save()
    print(json.dumps(result, indent=1))


def one_model(images: Path, specs, args, batch: int, precision: str, tmp: Path) -> dict:
    return {
        "model_alone": round(model_alone(specs, args.device, batch, precision, args.images), 1),
        "end_to_end": round(end_to_end(images, specs, args.device, batch, precision, tmp / "e2e"), 1),
    }


def score_vs_extract(images: Path, device: str, tmp: Path) -> dict:
    store = tmp / "for_head"
    shutil.rmtree(store, ignore_errors=True)
    spec = ["timm:efficientnet_b2"]
    n = len(list(images.iterdir()))
    t = time.perf_counter()
    imgsent.extract([str(images)], str(store), backbones=spec, random_weights=True, device=device)
    extract_rate = n / (time.perf_counter() - t)
    labels = tmp / "labels.txt"
    labels.write_text("".join(f"{p.name} {i % 2}\n" for i, p in enumerate(sorted(images.iterdir()))))
    imgsent.train(str(store), labels=str(labels), head="nn", epochs=1, cv=0, out=str(tmp / "model"))
    t = time.perf_counter()
    imgsent.score([str(images)], str(tmp / "scores.parquet"), model=str(tmp / "model"), device=device)
    return {"extract": round(extract_rate, 1), "score": round(n / (time.perf_counter() - t), 1)}


if __name__ == "__main__":
    main()
