"""How far bfloat16 features are from float32 ones (the README's figures).

    python bench/precision_check.py [--precision bf16]

Extracts all Twitter I images with the real MobileNetV2 weights twice, in float32 and in
``--precision`` (CPU autocast here), and reports the cosine between each image's two feature
vectors, the largest element change relative to the image's largest feature, and what the default
model (trained on float32 features) makes of the other features: how far p_positive moves and how
many labels flip. Heads trained on the new features: ``imgsent evaluate STORE --labels ...``.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
from _common import MOBILENET, TWITTER, require_shared

import imgsent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--precision", default="bf16")
    args = ap.parse_args()
    require_shared()
    tmp = Path(tempfile.mkdtemp(prefix="imgsent-precision-"))
    for precision in ("fp32", args.precision):
        imgsent.extract([str(TWITTER)], str(tmp / precision), backbones=[MOBILENET], precision=precision)
    a, b = imgsent.features.load(str(tmp / "fp32")), imgsent.features.load(str(tmp / args.precision))
    assert a.ids == b.ids
    cos = (a.X * b.X).sum(1) / np.linalg.norm(a.X, axis=1) / np.linalg.norm(b.X, axis=1)
    rel = np.abs(a.X - b.X).max(1) / np.abs(a.X).max(1)
    model = imgsent.load_model(imgsent.models.model_path("mobilenet"))
    pa, pb = model.predict_proba(a.X), model.predict_proba(b.X)
    moved = np.abs(pa - pb)[:, 1]
    flips = int((pa.argmax(1) != pb.argmax(1)).sum())
    print(
        f"{len(a.ids)} images, {args.precision} vs fp32: cosine mean {cos.mean():.5f}, min {cos.min():.5f}; "
        f"largest change / largest feature: mean {rel.mean():.4f}, max {rel.max():.4f}"
    )
    print(
        f"default model: p_positive moved {moved.mean():.4f} on average, {moved.max():.4f} at most; "
        f"{flips} of {len(a.ids)} labels flipped ({100 * (1 - flips / len(a.ids)):.2f} % agree)"
    )
    print(f"stores: {tmp / 'fp32'} and {tmp / args.precision}")


if __name__ == "__main__":
    main()
