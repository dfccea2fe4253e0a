"""Helpers shared by the benchmark scripts (paths into ../shared, image subsets, timing, memory)."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = Path(os.environ.get("IMGSENT_SHARED", ROOT.parent / "shared"))
WEIGHTS = SHARED / "models" / "mobilenet_v2_imagenet1k.safetensors"
TWITTER = SHARED / "data" / "twitter_i" / "images"
MOBILENET = f"torchvision:mobilenet_v2.IMAGENET1K_QNNPACK_V1@{WEIGHTS}"
INT8_WEIGHTS = SHARED / "models" / "mobilenet_v2_quantized_torchscript.pt"  # the same network, int8
MOBILENET_INT8 = f"torchvision:mobilenet_v2.IMAGENET1K_QNNPACK_V1@{INT8_WEIGHTS}"  # with --precision int8


def require_shared() -> None:
    if not WEIGHTS.is_file() or not TWITTER.is_dir():
        sys.exit(f"bench: needs the real weights and Twitter I images under {SHARED} (set IMGSENT_SHARED)")


def twitter_images(n: int, directory: Path) -> list[Path]:
    """n Twitter I images (cycling through the 1269 with new names if n is larger), as symlinks,
    with the page cache warmed (:func:`warm_page_cache`)."""
    directory.mkdir(parents=True, exist_ok=True)
    src = sorted(TWITTER.glob("*.jpg"))
    out = []
    for i in range(n):
        link = directory / f"{i:06d}_{src[i % len(src)].name}"
        if not link.exists():
            link.symlink_to(src[i % len(src)])
        out.append(link)
    warm_page_cache(out)
    return out


def warm_page_cache(paths) -> None:
    """Read every file once, so that no contender in a benchmark pays for cold disk reads."""
    for p in paths:
        Path(p).read_bytes()


def naive_loop(paths, backbones, transforms, head=None) -> None:
    """The way a first script would do it: for each backbone, for each image, PIL open, the
    torchvision transform, the model on a batch of one; then the head (if any) on each image's
    features. With two backbones every image is decoded twice. ``backbones``: imgsent
    :class:`~imgsent.backbones.Backbone` objects (eager modules), ``transforms`` one per backbone."""
    import torch
    from PIL import Image

    with torch.inference_mode():
        for bb, tf in zip(backbones, transforms):
            for p in paths:
                with Image.open(p) as im:
                    feats = bb(tf(im.convert("RGB"))[None])
                if head is not None:
                    head.predict_proba(feats.numpy())


class Timer:
    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start


def tree_pss_mb(pid: int) -> float:
    """Memory of a process and all its descendants (MB): proportional set size from
    /proc/PID/smaps_rollup, so pages a forked decode worker shares with its parent count once."""
    total = 0
    pids = [pid]
    while pids:
        p = pids.pop()
        try:
            with open(f"/proc/{p}/smaps_rollup") as fh:
                for line in fh:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1])
            with open(f"/proc/{p}/task/{p}/children") as fh:
                pids.extend(int(c) for c in fh.read().split())
        except OSError:
            continue
    return total / 1024
