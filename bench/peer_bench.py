"""imgsent score against timm's own bulk-inference script, and imgsent's start-up, as whole processes.

    python bench/peer_bench.py [--images 1000] [--repeat 3] [--model default|mobilenet] [--shared ../shared]

On the first ``--images`` Twitter I images (a folder of symlinks), timed in the same run, in turns:
- ``imgsent score IMGS --out s.parquet -q --model MODEL`` (start-up included);
- ``../shared/peers/timm_inference.py`` (timm's ``inference.py``) on each backbone the model uses,
  with the same weights, ``--channels-last -b 64 -j 1`` on the CPU: a timm user who wants the same
  networks' outputs runs it once per network, so its time is the sum over them;
- ``imgsent score ONE.jpg --out -``: one image, the whole process: an upper bound on the time to the
  first scored image (``--first``, the issue's <= 2.5 s), twice: a cold cache (imgsent's compiled
  and ONNX graphs removed) and a warm one.
Detector views (the default's faces) have no timm network: the peer runs only the model's classifiers.
Prints one JSON object: seconds per run, medians, and the ratio peer / imgsent.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def timed(cmd: list[str], env: dict) -> float:
    t = time.perf_counter()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - t
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:4])}... failed ({r.returncode}): {r.stderr[-800:]}")
    return elapsed


def checkpoints(model_name: str, folder: Path) -> list[tuple[str, Path]]:
    """(timm model name, state dict with the model's own weights) for each backbone of the model."""
    import timm
    import torch

    import imgsent
    from imgsent.models import model_backbones

    model = imgsent.load_model(imgsent.models.model_path(model_name))
    out = []
    for bb in model_backbones(model):
        if bb.spec.source in ("objects", "regions"):  # the default's face views: timm has no such network,
            continue  # so the peer runs fewer networks than imgsent does (a comparison in timm's favour)
        if bb.spec.source == "timm":
            name = bb.spec.name
            net = timm.create_model(name)
            state = {k: v for k, v in bb.module.state_dict().items()}
            net.load_state_dict(state, strict=False)  # the classifier stays random: timing only
        else:  # torchvision MobileNetV2: timm's own mobilenetv2_100 of the same shape (random weights)
            name = "mobilenetv2_100"
            net = timm.create_model(name)
        path = folder / f"{name}.pth"
        torch.save(net.state_dict(), path)
        out.append((name, path))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--model", default="default")
    ap.add_argument("--shared", default=str(ROOT.parent / "shared"))
    args = ap.parse_args()
    shared = Path(args.shared)
    peer = shared / "peers" / "timm_inference.py"
    src = shared / "data" / "twitter_i" / "images"
    if not peer.is_file() or not src.is_dir():
        raise SystemExit(f"needs {peer} and {src}")
    work = Path(tempfile.mkdtemp(prefix="peer-bench-"))
    imgs = work / "imgs"
    imgs.mkdir()
    for f in sorted(os.listdir(src))[: args.images]:
        (imgs / f).symlink_to(src / f)
    one = work / "one"
    one.mkdir()
    (one / "a.jpg").symlink_to(src / sorted(os.listdir(src))[0])
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "IMGSENT_HOME": str(work / "home")}
    if args.model == "mobilenet":
        env["IMGSENT_WEIGHTS"] = str(shared / "models" / "mobilenet_v2_imagenet1k.safetensors")
    ckpts = checkpoints(args.model, work)
    imgsent_cmd = [
        sys.executable,
        "-m",
        "imgsent",
        "score",
        str(imgs),
        "--out",
        str(work / "s.parquet"),
        "-q",
        "--overwrite",
        "--model",
        args.model,
    ]
    first_cmd = [sys.executable, "-m", "imgsent", "score", str(one), "--out", "-", "-q", "--model", args.model]
    peer_cmds = [
        [
            sys.executable,
            str(peer),
            str(imgs),
            "--model",
            name,
            "--checkpoint",
            str(path),
            "--device",
            "cpu",
            "--channels-last",
            "-b",
            "64",
            "-j",
            "1",
            "--results-dir",
            str(work / f"out-{name}"),
            "--results-format",
            "parquet",
            "--no-console-results",
            "--topk",
            "2",
        ]
        for name, path in ckpts
    ]
    runs: dict[str, list[float]] = {"imgsent": [], "peer": [], "first_cold": [], "first_warm": []}
    for _ in range(args.repeat):
        for cache in ("compiled", "onnx"):  # frozen graphs and ONNX Runtime graphs: a cold start builds both
            shutil.rmtree(work / "home" / cache, ignore_errors=True)
        runs["first_cold"].append(timed(first_cmd, env))
        runs["first_warm"].append(timed(first_cmd, env))
        runs["imgsent"].append(timed(imgsent_cmd, env))
        runs["peer"].append(sum(timed(c, env) for c in peer_cmds))
    med = {k: statistics.median(v) for k, v in runs.items()}
    print(
        json.dumps(
            {
                "images": args.images,
                "model": args.model,
                "peer_networks": [n for n, _ in ckpts],
                "cores": os.cpu_count(),
                "seconds": {k: [round(x, 2) for x in v] for k, v in runs.items()},
                "median_seconds": {k: round(v, 2) for k, v in med.items()},
                "speedup_vs_peer": round(med["peer"] / med["imgsent"], 2),
                "imgsent_images_per_second": round(args.images / med["imgsent"], 1),
            },
            indent=1,
        )
    )
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
