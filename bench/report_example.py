"""The README's report screenshot: ``imgsent report`` on synthetic pictures, rendered by Chromium.

    python bench/report_example.py [--out bench/report_example.png]

Draws 240 synthetic pictures (coloured shapes on gradients; no image of ../shared is shown, since
the benchmark photos may not be redistributed), scores them with the default model (real MobileNetV2
weights from ../shared), groups them by a made-up "day", writes the HTML report and screenshots its
top in headless Chromium, scaled to 900 pixels wide.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import polars as pl
from _common import ROOT, WEIGHTS, require_shared
from PIL import Image, ImageDraw

import imgsent

sys.path.insert(0, str(ROOT / "tests"))
from conftest import CHROMIUM_ARGS  # noqa: E402  (the flags the browser tests give Debian's chromium: one list)


def pictures(directory: Path, n: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        w, h = 320, 240
        top, bottom = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
        t = np.linspace(0, 1, h)[:, None, None]
        img = Image.fromarray(((1 - t) * top + t * bottom).repeat(w, 1).astype(np.uint8))
        draw = ImageDraw.Draw(img)
        for _ in range(int(rng.integers(2, 7))):
            x, y, r = int(rng.integers(0, w)), int(rng.integers(0, h)), int(rng.integers(10, 80))
            box = (x - r, y - r, x + r, y + r)
            colour = tuple(int(c) for c in rng.integers(0, 256, 3))
            (draw.ellipse if rng.uniform() < 0.5 else draw.rectangle)(box, fill=colour)
        img.save(directory / f"picture{i:04d}.jpg", quality=90)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "bench" / "report_example.png"))
    args = ap.parse_args()
    require_shared()
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        raise SystemExit("bench: needs Chromium (apt-get install chromium)")
    os.environ["IMGSENT_WEIGHTS"] = str(WEIGHTS)
    tmp = Path(tempfile.mkdtemp(prefix="imgsent-report-"))
    pictures(tmp / "pictures", 240)
    imgsent.score([str(tmp / "pictures")], str(tmp / "scores.parquet"))
    ids = pl.read_parquet(tmp / "scores.parquet")["id"]
    pl.DataFrame(
        {"id": ids, "day": [["2026-11-23", "2026-11-24", "2026-11-25"][i % 3] for i in range(len(ids))]}
    ).write_csv(tmp / "meta.csv")
    from imgsent.htmlreport import build_report

    build_report(
        str(tmp / "scores.parquet"), str(tmp / "report.html"), by="day", meta=str(tmp / "meta.csv"), per_class=8
    )
    shot = tmp / "shot.png"
    subprocess.run(
        [
            browser,
            "--headless",
            *CHROMIUM_ARGS,
            f"--user-data-dir={tmp / 'profile'}",
            "--window-size=1100,2300",
            f"--screenshot={shot}",
            f"file://{tmp / 'report.html'}",
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    img = Image.open(shot).convert("RGB")
    img = img.resize((900, int(img.height * 900 / img.width)), Image.Resampling.LANCZOS)
    img.quantize(colors=128).save(args.out, optimize=True)
    print(f"wrote {args.out} ({Path(args.out).stat().st_size // 1024} KB)")


if __name__ == "__main__":
    main()
