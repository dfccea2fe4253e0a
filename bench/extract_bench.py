"""Extraction speed on this machine: naive loop vs imgsent, against the machine's bound.

    python bench/extract_bench.py [--images 400] [--batch-size 64] [--workers N]

Times, on the same Twitter I images in one run:
  (a) a naive loop: PIL open, torchvision transforms, model, one image and one backbone at a time
      (with two backbones it decodes every image twice);
  (b) imgsent's engine (imgsent.extract), one and two backbones, and the one in int8
      (``--precision int8``: the official int8 MobileNetV2, run natively);
  (c) the model alone on ready tensors (batched, all cores, the engine's lanes);
  (d) decoding alone (imgsent's decoder in worker processes on all cores, no model).
  (e) decode-bound: a tiny backbone (timm test_resnet, random weights) over ``--resolution-images``
      synthetic JPEGs at 1920x1080 and at 640x480; the time ratio shows what big photos cost
      (draft decoding at the largest scale that still covers the resize).
On a CPU-only machine decode and model share the cores, so the bound is 1 / (decode + model time)
per image, each measured alone on all cores. Backbones: the real MobileNetV2 from ../shared, and a
second one (``--second``, default torchvision EfficientNet-B0, the paper's EfficientNet family at a
CPU-friendly size; random weights cost the same as real ones). Model set-up is timed on both sides.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import torch
from _common import MOBILENET, MOBILENET_INT8, Timer, naive_loop, require_shared, twitter_images, warm_page_cache

import imgsent
from imgsent.backbones import create_backbone
from imgsent.engine import FeatureEngine, default_workers
from imgsent.inputs import find_images
from imgsent.lanes import in_lanes
from imgsent.options import RunOptions

SECOND = "torchvision:efficientnet_b0"  # --second: any spec; random weights (same cost as real ones)


def naive(paths, specs) -> float:
    """One image, one backbone at a time (``_common.naive_loop``); model set-up included."""
    from torchvision.models import get_model_weights

    with Timer() as t:
        models = [create_backbone(s, random_weights=(s == SECOND)) for s in specs]
        tfs = [get_model_weights("mobilenet_v2").IMAGENET1K_V1.transforms() for _ in specs]
        naive_loop(paths, models, tfs)
    return t.seconds


def model_alone(paths, specs, batch_size, precision="fp32") -> float:
    """imgsent's model step (normalise + optimised forward) on ready uint8 tensors, all cores, run
    the engine's fastest way (its lanes: one batch per core side by side)."""
    models = [create_backbone(s, random_weights=(s == SECOND), int8=precision == "int8") for s in specs]
    engine = FeatureEngine(models, device="cpu", batch_size=batch_size, workers=0, precision=precision)
    engine.prepare()
    n = len(paths)
    x = torch.randint(0, 256, (batch_size, 1, 3, 224, 224), dtype=torch.uint8)

    def embed(rows: int) -> None:
        for i in range(len(models)):
            engine.embed(i, x[:rows])

    sizes = [min(batch_size, n - s) for s in range(0, n, batch_size)]
    with Timer() as t:
        for _ in in_lanes(embed, sizes, engine.lanes):
            pass
    return t.seconds


def decode_alone(refs, specs, batch_size, workers, precision="fp32") -> float:
    """The engine's loader with no model: decode + resize/crop on every core."""
    models = [create_backbone(s, random_weights=(s == SECOND), int8=precision == "int8") for s in specs]
    engine = FeatureEngine(models, device="cpu", batch_size=batch_size, workers=max(workers, 2))
    with Timer() as t:
        batches = [list(range(s, min(s + batch_size, len(refs)))) for s in range(0, len(refs), batch_size)]
        for _ in engine.loader(engine.dataset(refs), batches):
            pass
    return t.seconds


def synthetic_jpegs(directory: Path, n: int, size: tuple[int, int], first: int = 0) -> None:
    """``n`` photo-like JPEGs (smooth gradients, a blob, noise) of ``size`` (w, h), quality 90,
    named from ``first`` on (noise seeded by ``first``, so chunks can be made in parallel)."""
    import numpy as np
    from PIL import Image

    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(first)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([255 * xx / w, 255 * yy / h, 128 + 100 * np.sin(xx / 37 + yy / 53)], -1)
    for i in range(first, first + n):
        img = np.clip(base + rng.normal(0, 12, size=(h, w, 3)) + 40 * np.sin(i + xx / 91)[..., None], 0, 255)
        Image.fromarray(img.astype(np.uint8)).save(directory / f"{i:05d}.jpg", quality=90)


def decode_bound_rate(images: Path, store: Path, workers=None, device="auto", decode="workers") -> float:
    """Images/s of ``imgsent.extract`` with a tiny backbone (``timm:test_resnet``): what decoding allows."""
    n = sum(1 for _ in images.iterdir())
    with Timer() as t:
        imgsent.extract(
            [str(images)],
            str(store),
            backbones=["timm:test_resnet"],
            random_weights=True,
            workers=workers,
            device=device,
            decode=decode,
            overwrite=True,
        )
    return n / t.seconds


def resolution_ratio(tmp: Path, n: int, workers: int, decode: str = "workers") -> None:
    """(e): decode-bound extraction time at 1920x1080 over 640x480."""
    rates = {}
    for size in ((1920, 1080), (640, 480)):
        d = tmp / f"synthetic_{size[0]}x{size[1]}"
        synthetic_jpegs(d, n, size)
        warm_page_cache(sorted(d.iterdir()))
        rates[size] = decode_bound_rate(d, tmp / f"store_{size[0]}", workers, decode=decode)
        print(f"  (e) {size[0]}x{size[1]}: {rates[size]:8.1f} images/s (tiny backbone, decode-bound, decode={decode})")
    print(f"  (e) 1920x1080 / 640x480 time ratio: {rates[(640, 480)] / rates[(1920, 1080)]:.2f}")


def main() -> None:
    global SECOND
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch threads in the main process")
    ap.add_argument("--second", default=SECOND, help="the second backbone of the two-backbone runs")
    ap.add_argument("--resolution-images", type=int, default=800, help="(e): synthetic JPEGs per size (0: skip)")
    ap.add_argument("--decode", choices=["workers", "device"], default="workers", help="(e): where JPEGs are decoded")
    args = ap.parse_args()
    SECOND = args.second
    require_shared()
    if args.threads:
        torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="imgsent-bench-"))
    try:
        paths = twitter_images(args.images, tmp / "images")  # page cache warmed
        refs = find_images([str(tmp / "images")])
        workers = default_workers() if args.workers is None else args.workers
        print(f"{args.images} Twitter I images, {torch.get_num_threads()} torch threads, {workers} decode workers")
        rates, naive_times = {}, {}
        for specs, precision in (([MOBILENET], "fp32"), ([MOBILENET_INT8], "int8"), ([MOBILENET, SECOND], "fp32")):
            n = len(specs)
            if n not in naive_times:  # int8 is compared with the float naive loop of this run
                naive_times[n] = naive(paths, specs)
            t_naive = naive_times[n]
            with Timer() as t:
                if n == 1:  # the public entry point, real weights
                    imgsent.extract(
                        [str(tmp / "images")],
                        str(tmp / "store1"),
                        backbones=specs,
                        batch_size=args.batch_size,
                        workers=workers,
                        overwrite=True,
                        precision=precision,
                    )
                else:  # the second backbone has random weights, which extract() would apply to both
                    _extract_mixed(tmp, specs, args.batch_size, workers)
            t_model = model_alone(paths, specs, args.batch_size, precision)
            t_decode = decode_alone(refs, specs, args.batch_size, workers, precision)
            bound = args.images / (t_model + t_decode)
            rate = rates[n, precision] = args.images / t.seconds
            print(f"\n{n} backbone(s), {precision}: {', '.join(specs)}")
            print(f"  (a) naive loop        {args.images / t_naive:8.1f} images/s")
            print(f"  (b) imgsent extract   {rate:8.1f} images/s   = {rate * t_naive / args.images:.2f}x naive")
            print(f"  (c) model alone       {args.images / t_model:8.1f} images/s")
            print(f"  (d) decode alone      {args.images / t_decode:8.1f} images/s")
            print(f"  bound 1/(c+d)         {bound:8.1f} images/s   imgsent reaches {rate / bound:.2f} of it")
            if precision == "int8":
                print(f"  int8 extract / fp32 extract in this run: {rate / rates[1, 'fp32']:.2f}x")
        if args.resolution_images:
            print(f"\ndecode-bound, {args.resolution_images} synthetic JPEGs per size:")
            resolution_ratio(tmp, args.resolution_images, workers, args.decode)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _extract_mixed(tmp, specs, batch_size, workers):
    """``imgsent.extract`` with two backbones, the first with real weights and the second
    (``SECOND``) random ones: the same stages (engine, sharded writer), built by hand."""
    from imgsent.features import KIND, feature_table, store_header
    from imgsent.jobs import build_engine, run_job
    from imgsent.shards import ShardedWriter

    options = RunOptions(device="cpu", batch_size=batch_size, workers=workers, overwrite=True)
    models = [create_backbone(s, random_weights=(s == SECOND)) for s in specs]
    engine = build_engine(models, options)
    refs = find_images([str(tmp / "images")])
    out = str(tmp / "store2")
    header = store_header([m.recipe() for m in models], "float32", "none")
    writer = ShardedWriter(out, kind=KIND, header=header, overwrite=True)
    return run_job(engine, refs, [(writer, feature_table)], options, "extract", out)


if __name__ == "__main__":
    main()
