"""Ray on this machine: how fast next to the local engine, and what the driver carries (needs the `ray` extra).

    python bench/ray_bench.py speed [--images 4000] [--ray-workers 1 2]
    python bench/ray_bench.py driver [--images 2000 16000] [--code DIR] [--json OUT]

``speed``: ``--images`` Twitter I images (real MobileNetV2 weights from ../shared), extracted with the
local engine, then with ``engine="ray"`` on a local Ray instance already started (so Ray's own start-up is
not counted; starting the workers and loading their models is), for each ``--ray-workers`` (with
``--rows-per-shard`` images per shard, so that every worker has shards to write).

``driver``: what the driver process itself spends when the features are wide: one 21,843-d view (a
random-weights TorchScript module: pool, then a Linear to 21,843 outputs, the width of an ImageNet-21k
``:probs`` view, at almost no compute, so the driver's share shows). Each run is a fresh process (peak
RSS is a process's lifetime peak): the driver's CPU seconds (user + system of the driver process alone;
Ray's own daemons are other processes) per 1,000 images, its peak RSS and the wall time. ``--code DIR``
runs another imgsent checkout (e.g. the last release, for "before"). Writes a JSON record with ``--json``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import MOBILENET, ROOT, Timer, require_shared, twitter_images

WIDE = 21_843


def _start_ray() -> float:
    import ray

    with Timer() as t:
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, configure_logging=False)
    return t.seconds


def speed(args) -> dict:
    import imgsent

    tmp = Path(tempfile.mkdtemp(prefix="imgsent-ray-bench-"))
    try:
        twitter_images(args.images, tmp / "images")
        common = dict(backbones=[MOBILENET], rows_per_shard=args.rows_per_shard)
        with Timer() as local:
            imgsent.extract([str(tmp / "images")], str(tmp / "local"), **common)
        started = _start_ray()
        out = {"images": args.images, "rows_per_shard": args.rows_per_shard, "local_s": round(local.seconds, 1)}
        out["ray_start_s"] = round(started, 1)
        print(f"local engine:        {local.seconds:6.1f} s ({args.images / local.seconds:.1f} images/s)")
        for w in args.ray_workers:
            with Timer() as remote:
                imgsent.extract([str(tmp / "images")], str(tmp / f"ray{w}"), engine="ray", ray_workers=w, **common)
            ratio = remote.seconds / local.seconds
            out[f"ray_{w}_workers_s"] = round(remote.seconds, 1)
            out[f"ray_{w}_workers_vs_local"] = round(ratio, 3)
            print(
                f"ray, {w} worker(s):   {remote.seconds:6.1f} s ({args.images / remote.seconds:.1f} images/s), "
                f"{ratio:.2f}x local (Ray itself started before: {started:.1f} s)"
            )
        return out
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _wide_module(path: Path) -> None:
    import torch

    class Wide(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.pool = torch.nn.AdaptiveAvgPool2d(8)
            self.fc = torch.nn.Linear(3 * 8 * 8, WIDE)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.pool(x).flatten(1))

    torch.manual_seed(0)
    torch.jit.save(torch.jit.script(Wide().eval()), str(path))


def driver_child(args) -> None:
    """One measured run, in this fresh process: prints a JSON line."""
    sys.path.insert(0, args.code)  # before _common's ROOT: the checkout asked for (its Ray workers get PYTHONPATH)
    import imgsent

    _start_ray()
    spec = f"torchscript:{args.module}"
    before = resource.getrusage(resource.RUSAGE_SELF)
    with Timer() as wall:
        s = imgsent.extract(
            [args.images_dir],
            args.out,
            backbones=[spec],
            engine="ray",
            ray_workers=args.ray_workers,
            rows_per_shard=args.rows_per_shard,
        )
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    record = {
        "images": s.total,
        "errors": s.errors,
        "imgsent": imgsent.__version__,
        "driver_cpu_s": round(cpu, 2),
        "driver_cpu_s_per_1000": round(1000 * cpu / s.total, 3),
        "driver_peak_rss_mb": round(after.ru_maxrss / 1024, 1),
        "wall_s": round(wall.seconds, 1),
    }
    print(json.dumps(record))


def driver(args) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="imgsent-ray-driver-"))
    results = []
    try:
        module = tmp / "wide21843.pt"
        _wide_module(module)
        for n in args.images:
            twitter_images(n, tmp / f"images{n}")
            env = dict(
                os.environ, PYTHONPATH=os.pathsep.join([str(args.code or ROOT), os.environ.get("PYTHONPATH", "")])
            )
            cmd = [sys.executable, __file__, "_driver_child", "--images-dir", str(tmp / f"images{n}")]
            cmd += ["--out", str(tmp / f"out{n}"), "--module", str(module), "--ray-workers", str(args.ray_workers)]
            cmd += ["--rows-per-shard", str(args.rows_per_shard), "--code", str(args.code or ROOT)]
            started = time.time()
            r = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tmp)
            if r.returncode:
                sys.exit(f"bench: the driver run failed:\n{r.stderr[-3000:]}")
            record = json.loads(r.stdout.strip().splitlines()[-1])
            record["code"] = str(args.code or ROOT)
            results.append(record)
            print(json.dumps(record), f"({time.time() - started:.0f} s with start-up)")
            shutil.rmtree(tmp / f"out{n}", ignore_errors=True)
        if len(results) >= 2:
            growth = results[-1]["driver_peak_rss_mb"] / results[0]["driver_peak_rss_mb"] - 1
            print(f"driver peak RSS {results[0]['images']} -> {results[-1]['images']} images: {100 * growth:+.1f} %")
        return {"runs": results, "width": WIDE, "ray_workers": args.ray_workers, "rows_per_shard": args.rows_per_shard}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="what", required=True)
    sp = sub.add_parser("speed")
    sp.add_argument("--images", type=int, default=4000)
    sp.add_argument("--ray-workers", type=int, nargs="+", default=[1, 2])
    sp.add_argument("--rows-per-shard", type=int, default=500)
    sp.add_argument("--json")
    dp = sub.add_parser("driver")
    dp.add_argument("--images", type=int, nargs="+", default=[2000, 16000])
    dp.add_argument("--ray-workers", type=int, default=2)
    dp.add_argument("--rows-per-shard", type=int, default=1000)
    dp.add_argument("--code", help="another imgsent checkout to run (default: this one)")
    dp.add_argument("--json")
    cp = sub.add_parser("_driver_child")
    for name in ("--images-dir", "--out", "--module", "--code"):
        cp.add_argument(name, required=True)
    cp.add_argument("--ray-workers", type=int, default=2)
    cp.add_argument("--rows-per-shard", type=int, default=1000)
    args = ap.parse_args()
    if args.what == "_driver_child":
        driver_child(args)
        return
    require_shared()
    result = speed(args) if args.what == "speed" else driver(args)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
