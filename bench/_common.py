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


def require_shared() -> None:
    if not WEIGHTS.is_file() or not TWITTER.is_dir():
        sys.exit(f"bench: needs the real weights and Twitter I images under {SHARED} (set IMGSENT_SHARED)")


def twitter_images(n: int, directory: Path) -> list[Path]:
    """n Twitter I images (cycling through the 1269 with new names if n is larger), as symlinks."""
    directory.mkdir(parents=True, exist_ok=True)
    src = sorted(TWITTER.glob("*.jpg"))
    out = []
    for i in range(n):
        link = directory / f"{i:06d}_{src[i % len(src)].name}"
        if not link.exists():
            link.symlink_to(src[i % len(src)])
        out.append(link)
    return out


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
