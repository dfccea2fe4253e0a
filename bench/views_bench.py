"""Extraction speed of the ``lab`` preset (four views: MobileNetV2 pooled, MobileNetV2 ImageNet
probabilities, the D2Go objects view, its regions view over MobileNetV2), side by side:

  (a) a naive loop: each view on its own, one image at a time (PIL open, transform, model), so
      every image is decoded four times and the detector runs twice per image (once per view);
  (b) the same four views one after another through imgsent's engine (one ``extract`` each);
  (c) ``imgsent extract -B lab``: one decode per image, one detector pass per image for both
      detector views, frozen classifiers, lanes.

It also checks that (a) and (c) give the same features (cosine per view). Needs ../shared.

    python bench/views_bench.py [--images 300]
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from _common import SHARED, Timer, require_shared, twitter_images


def transform(pp):
    """The torchvision transform a script would write for an imgsent preprocessing."""
    from torchvision import transforms as T

    size = pp.resize_size if isinstance(pp.resize_size, int) else tuple(pp.resize_size)
    return T.Compose(
        [
            T.Resize(size, interpolation=T.InterpolationMode(pp.interpolation)),
            T.CenterCrop(tuple(pp.input_size)),
            T.ToTensor(),
            T.Normalize(pp.mean, pp.std),
        ]
    )


def naive(paths, specs):
    """Each view alone over all images, batch of one, no sharing of decodes or detections."""
    import numpy as np
    import torch
    from PIL import Image

    from imgsent import objects
    from imgsent.backbones import create_backbone

    size = objects.MEMO_SIZE
    objects.MEMO_SIZE = 0  # no detections shared between the two detector views
    feats = {}
    try:
        with Timer() as t, torch.inference_mode():
            for spec in specs:
                bb = create_backbone(spec)
                tf = transform(bb.preprocess)
                rows = []
                for p in paths:
                    with Image.open(p) as im:
                        rows.append(bb(tf(im.convert("RGB"))[None])[0].float().numpy())
                feats[bb.key] = np.stack(rows)
    finally:
        objects.MEMO_SIZE = size
    return t.seconds, feats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=300)
    args = ap.parse_args()
    require_shared()
    os.environ.setdefault("IMGSENT_MODELS", str(SHARED / "models"))
    import numpy as np
    import torch

    import imgsent
    from imgsent.backbones import expand_presets

    specs = expand_presets(["lab"])
    with tempfile.TemporaryDirectory() as tmp:
        paths = twitter_images(args.images, Path(tmp) / "imgs")
        t_naive, naive_feats = naive(paths, specs)
        with Timer() as t_each:
            for k, spec in enumerate(specs):
                imgsent.extract(
                    [str(Path(tmp) / "imgs")], str(Path(tmp) / f"each{k}"), backbones=[spec], progress=False
                )
        with Timer() as t_lab:
            imgsent.extract([str(Path(tmp) / "imgs")], str(Path(tmp) / "lab"), backbones=specs, progress=False)
        fs = imgsent.features.load(str(Path(tmp) / "lab"))
        order = {Path(p).name: i for i, p in enumerate(paths)}
        rows = [order[i] for i in fs.ids]
    n = args.images
    print(f"lab preset, {n} Twitter I images, {torch.get_num_threads()} threads (real weights from {SHARED})")
    print(f"  (a) naive loop, view by view          {n / t_naive:7.1f} images/s")
    print(
        f"  (b) imgsent extract, view by view      {n / t_each.seconds:7.1f} images/s   = {t_naive / t_each.seconds:.2f}x naive"
    )
    print(
        f"  (c) imgsent extract -B lab             {n / t_lab.seconds:7.1f} images/s   = {t_naive / t_lab.seconds:.2f}x naive"
    )
    print("  features, (c) against (a), cosine per image where both are non-zero (mean / worst):")
    for key, dim in fs.blocks:
        a, c = naive_feats[key][rows], fs.X[:, fs.layout.columns([key])]
        norms = np.linalg.norm(a, axis=1) * np.linalg.norm(c, axis=1)
        both = norms > 0
        cos = (a * c).sum(1)[both] / norms[both]
        za, zc = int((np.linalg.norm(a, axis=1) == 0).sum()), int((np.linalg.norm(c, axis=1) == 0).sum())
        print(
            f"    {key[:70]:70s} {dim:5d}-d  {cos.mean():.4f} / {cos.min():.4f}  (zero rows: {za} naive, {zc} imgsent)"
        )


if __name__ == "__main__":
    main()
