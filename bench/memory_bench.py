"""Peak memory of ``imgsent extract`` as the number of images grows (should stay flat).

    python bench/memory_bench.py [--sizes 1000,8000]

Runs ``imgsent extract`` in a subprocess on n Twitter I images (cycled under new names) with the
default backbone (float32, then int8 from the official int8 MobileNetV2), sampling the memory (PSS) of the whole process tree (main + decode workers)
every 0.1 s, and prints the peak per size and the ratio of the largest to the smallest.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import MOBILENET, MOBILENET_INT8, require_shared, tree_pss_mb, twitter_images


def peak_pss(n: int, tmp: Path, precision: str = "fp32") -> tuple[float, float]:
    images = tmp / f"images{n}"
    twitter_images(n, images)
    cmd = [
        sys.executable,
        "-m",
        "imgsent",
        "extract",
        str(images),
        "--out",
        str(tmp / f"store{n}{precision}"),
        "-B",
        MOBILENET_INT8 if precision == "int8" else MOBILENET,
        "--precision",
        precision,
        "-q",
    ]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    peak = 0.0
    while proc.poll() is None:
        peak = max(peak, tree_pss_mb(proc.pid))
        time.sleep(0.1)
    if proc.returncode != 0:
        sys.exit(f"extract failed with {proc.returncode}")
    return peak, time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1000,8000")
    args = ap.parse_args()
    require_shared()
    tmp = Path(tempfile.mkdtemp(prefix="imgsent-mem-bench-"))
    try:
        for precision in ("fp32", "int8"):
            peaks = {}
            for n in [int(x) for x in args.sizes.split(",")]:
                peak, secs = peak_pss(n, tmp, precision)
                peaks[n] = peak
                print(
                    f"{precision} {n:6d} images: peak PSS (main + workers) {peak:7.0f} MB, {secs:.0f} s, "
                    f"{n / secs:.1f} images/s"
                )
            lo, hi = min(peaks), max(peaks)
            print(f"{precision} peak at {hi} / peak at {lo}: {peaks[hi] / peaks[lo]:.3f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
