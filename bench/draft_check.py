"""What JPEG draft decoding saves and what it costs (the README's and decode.py's figures).

    python bench/draft_check.py [--repeat 30]

(1) Time per image to decode and cut the 224-pixel view of a 256-pixel resize, for synthetic photo-
    like JPEGs (quality 90) at 1920x1080 and 640x480, smooth (no noise) and textured (noise 8): full
    decode, draft at 1/2 scale (>= 2x the resize, what imgsent does) and at 1/4 (>= 1x).
(2) On the Twitter I photos whose short side is >= 512 (with ../shared): cosine between real
    MobileNetV2 features of a draft decode down to 1x the resize and of a full decode.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _common import MOBILENET, TWITTER, WEIGHTS
from PIL import Image

from imgsent.decode import Preprocess, make_views

PP = Preprocess(input_size=(224, 224), resize_size=256)


def photo(path: Path, w: int, h: int, noise: float, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([255 * xx / w, 255 * yy / h, 128 + 100 * np.sin(xx / 37 + yy / 53)], -1)
    Image.fromarray(np.clip(base + rng.normal(0, noise, size=(h, w, 3)), 0, 255).astype(np.uint8)).save(
        path, quality=90
    )


def decode(path: Path, request: tuple[int, int] | None) -> Image.Image:
    with Image.open(path) as im:
        if request:
            im.draft("RGB", request)
        im.load()
        return im.convert("RGB")


def timings(repeat: int) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="imgsent-draft-"))
    for noise in (0, 8):
        for w, h in ((1920, 1080), (640, 480)):
            path = tmp / f"n{noise}_{w}.jpg"
            photo(path, w, h, noise)
            cells = []
            for name, request in (("full", None), ("1/2", (512, 512)), ("1/4", (256, 256))):
                if request and min(w, h) < 2 * request[0]:
                    continue  # libjpeg would not reduce it
                start = time.perf_counter()
                for _ in range(repeat):
                    make_views(decode(path, request), [PP])
                cells.append(f"{name} {1000 * (time.perf_counter() - start) / repeat:.2f} ms")
            kb = path.stat().st_size // 1024
            print(f"{w}x{h}, noise {noise} ({kb} KB): " + ", ".join(cells))


def fidelity() -> None:
    import imgsent

    if not WEIGHTS.is_file() or not TWITTER.is_dir():
        print("(2) skipped: needs ../shared")
        return
    bb = imgsent.create_backbone(MOBILENET)
    mean = torch.tensor(bb.preprocess.mean).view(1, 3, 1, 1) * 255
    std = torch.tensor(bb.preprocess.std).view(1, 3, 1, 1) * 255
    target = bb.preprocess.needed_short_side()
    cos = []
    for f in sorted(TWITTER.glob("*.jpg")):
        with Image.open(f) as im:
            if min(im.size) < 2 * target:
                continue
        views = [make_views(decode(f, r), [bb.preprocess])[bb.preprocess.view_key] for r in ((target, target), None)]
        with torch.inference_mode():
            a, b = (bb((torch.from_numpy(v).float() - mean) / std)[0] for v in views)
        cos.append(float(torch.nn.functional.cosine_similarity(a, b, dim=0)))
    cos = np.asarray(cos)
    print(
        f"(2) {len(cos)} Twitter I photos: draft to 1x the resize vs full decode, MobileNetV2 feature cosine "
        f"mean {cos.mean():.4f}, min {cos.min():.4f}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=30)
    args = ap.parse_args()
    timings(args.repeat)
    fidelity()


if __name__ == "__main__":
    main()
