"""How good is post-training int8 (what ``--precision int8`` does for networks without official int8
weights)? Features and heads, on the real MobileNetV2 and Twitter I.

    python bench/ptq_check.py [--images 300] [--calibration 64]

Quantizes the float32 MobileNetV2 from ../shared with imgsent's post-training int8
(:func:`imgsent.quantized.post_training_int8`: torch.ao FX, the engine's default qconfig) calibrated
(a) on imgsent's shipped calibration set (seeded synthetic images with natural-image statistics) and
(b) on ``--calibration`` real Twitter I photos (an upper bound: real photos cannot ship), and prints
the cosine of each one's features to float32 on ``--images`` other Twitter I photos, next to
torchvision's official int8 weights (trained for int8, read from
``../shared/models/mobilenet_v2_quantized_torchscript.pt``).
"""

from __future__ import annotations

import argparse
import warnings

import numpy as np
import torch
from _common import INT8_WEIGHTS, MOBILENET, MOBILENET_INT8, TWITTER, require_shared

from imgsent.backbones import create_backbone
from imgsent.decode import decode_ref
from imgsent.inputs import ImageRef
from imgsent.quantized import post_training_int8


def photos(paths, pp) -> torch.Tensor:
    """uint8 (N, 3, H, W) views of ``paths`` as the engine decodes them for ``pp``."""
    return torch.stack(
        [torch.from_numpy(decode_ref(ImageRef(str(p), str(p)), [pp]).views[pp.view_key][0]) for p in paths]
    )


def cosine(a: np.ndarray, b: np.ndarray) -> str:
    """Per-image cosine of two feature matrices: 'mean / worst'."""
    c = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    return f"{c.mean():.4f} / {c.min():.4f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=300)
    ap.add_argument("--calibration", type=int, default=64)
    args = ap.parse_args()
    require_shared()
    warnings.filterwarnings("ignore")
    float_bb = create_backbone(MOBILENET)
    pp = float_bb.preprocess
    paths = sorted(TWITTER.glob("*.jpg"))
    mean, std = torch.tensor(pp.mean).view(1, 3, 1, 1), torch.tensor(pp.std).view(1, 3, 1, 1)
    test = (photos(paths[: args.images], pp).float() / 255 - mean) / std
    with torch.inference_mode():
        reference = float_bb(test).numpy()
    print(f"MobileNetV2 features vs float32 on {args.images} Twitter I photos, cosine mean / worst:")
    for name, images in (
        ("post-training int8, imgsent's calibration set", None),
        (f"post-training int8, {args.calibration} real photos", photos(paths[-args.calibration :], pp)),
    ):
        quantized = post_training_int8(float_bb.module, pp.mean, pp.std, pp.input_size, images)
        with torch.inference_mode():
            print(f"  {name:48s} {cosine(reference, quantized(test).numpy())}")
    if INT8_WEIGHTS.is_file():
        official = create_backbone(MOBILENET_INT8, int8=True)
        with torch.inference_mode():
            print(f"  {'official int8 weights (quantization-aware)':48s} {cosine(reference, official(test).numpy())}")


if __name__ == "__main__":
    main()
