"""Wall time of the local engine vs Ray Data on the same images (needs the `ray` extra).

    python bench/ray_bench.py [--images 1000] [--ray-workers 1]

Extracts ``--images`` Twitter I images with the default backbone (real MobileNetV2 weights from
../shared) twice: ``engine="local"`` and ``engine="ray"`` on a local Ray instance with all cores,
and prints both wall times (Ray's includes starting the instance and its actors).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path

from _common import MOBILENET, Timer, require_shared, twitter_images

import imgsent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--ray-workers", type=int, default=1)
    args = ap.parse_args()
    require_shared()
    import ray

    tmp = Path(tempfile.mkdtemp(prefix="imgsent-ray-bench-"))
    try:
        twitter_images(args.images, tmp / "images")
        with Timer() as local:
            imgsent.extract([str(tmp / "images")], str(tmp / "local"), backbones=[MOBILENET])
        with Timer() as start:
            ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, configure_logging=False)
        with Timer() as remote:
            imgsent.extract(
                [str(tmp / "images")],
                str(tmp / "ray"),
                backbones=[MOBILENET],
                engine="ray",
                ray_workers=args.ray_workers,
            )
        n = args.images
        print(f"local engine: {local.seconds:6.1f} s ({n / local.seconds:.1f} images/s)")
        print(
            f"ray engine:   {remote.seconds:6.1f} s ({n / remote.seconds:.1f} images/s) "
            f"+ {start.seconds:.1f} s to start the Ray instance; {remote.seconds / local.seconds:.2f}x local"
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
