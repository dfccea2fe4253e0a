"""Where should face crops come from? The regions view's faces on Twitter I, four ways.

    python bench/face_view_check.py [--shared ../shared] [--store STORE] [--out bench/results/face_view_check.json]

The `lab` preset's face views (``faces_rfb640.pt`` finds faces, ``face_expression.pt`` reads the
three most confident, score >= 0.9) see the image as imgsent's detector views give it. Faces in
tweets are small, so this script measures, on the 882 Twitter I 5-agree images, the expression
features of the top-3 faces taken four ways (crops resized to 112 x 112, antialiased bilinear, as
the regions view does):

- ``squashed512`` (imgsent's detector view): the whole image squashed to 512 x 512, given to the
  detector at 320 x 320 (imgsent's TorchScript detector size); crops from the 512 view;
- ``squashed640``: squashed to 640 x 640, the detector sees that view; crops from it;
- ``letterbox640``: longer side 640, aspect kept, padded to 640 x 640; the detector sees it;
- ``original``: the decoded image as it is (the detector rescales it itself); crops from it.

For each: images with a face found, and held-out accuracy of logistic regression (standardised,
5 random 80/20 splits, seed 0) on the face features alone and on EfficientNet-Lite2 + them (the
Lite2 features from ``--store``, an imgsent store of Twitter I holding ``timm:tf_efficientnet_lite2``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import imgsent  # noqa: E402

K, MIN_SCORE, CROP = 3, 0.9, 112
WAYS = ("squashed512", "squashed640", "letterbox640", "original")


def resize(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    return F.interpolate(x[None], size=(h, w), mode="bilinear", antialias=True, align_corners=False)[0]


def view(img: torch.Tensor, way: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(what the detector sees, what crops come from) and the scale from the first to the second."""
    _, h, w = img.shape
    if way == "squashed512":
        v = resize(img, 512, 512)
        return resize(v, 320, 320), v
    if way == "squashed640":
        v = resize(img, 640, 640)
        return v, v
    if way == "letterbox640":
        s = 640 / max(h, w)
        nh, nw = max(1, round(h * s)), max(1, round(w * s))
        v = torch.zeros(3, 640, 640)
        top, left = (640 - nh) // 2, (640 - nw) // 2
        v[:, top : top + nh, left : left + nw] = resize(img, nh, nw)
        return v, v
    return img, img


def crop(image: torch.Tensor, box) -> torch.Tensor:
    side_h, side_w = image.shape[-2:]
    x0, y0, x1, y1 = (float(v) for v in box)
    x0, y0 = min(max(math.floor(x0), 0), side_w - 2), min(max(math.floor(y0), 0), side_h - 2)
    x1, y1 = max(min(math.ceil(x1), side_w), x0 + 2), max(min(math.ceil(y1), side_h), y0 + 2)
    return resize(image[:, y0:y1, x0:x1], CROP, CROP)


def features(det, expr, mean, img: torch.Tensor, way: str) -> tuple[np.ndarray, int]:
    det_in, source = view(img, way)
    scale = source.shape[-1] / det_in.shape[-1]
    out = det([det_in.contiguous()])[1][0]
    scores, boxes = out["scores"], out["boxes"] * scale
    keep = torch.nonzero(scores >= MIN_SCORE).flatten()
    keep = keep[torch.argsort(scores[keep], descending=True, stable=True)][:K]
    if len(keep) == 0:
        return np.zeros(263, np.float32), 0
    crops = torch.stack([crop(source, boxes[j]) for j in keep.tolist()]).clamp(0, 1) - mean  # x/255 - mean, std 1
    feats = expr(crops).float()
    w = scores[keep].float()
    return ((feats * w[:, None]).sum(0) / w.sum()).numpy(), len(keep)


def held_out(X: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    accs = []
    for split in range(5):
        tr, te = train_test_split(np.arange(len(y)), test_size=0.2, random_state=split, stratify=y)
        clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=0.1, random_state=0))
        clf.fit(X[tr], y[tr])
        accs.append(float((clf.predict(X[te]) == y[te]).mean()))
    return round(100 * float(np.mean(accs)), 2), round(100 * float(np.std(accs)), 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", default=str(ROOT.parent / "shared"))
    ap.add_argument("--store", required=True, help="imgsent store of Twitter I with timm:tf_efficientnet_lite2")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "face_view_check.json"))
    args = ap.parse_args()
    shared = Path(args.shared)
    import torchvision  # noqa: F401  (registers torchvision::nms for the detector)

    torch.set_num_threads(2)
    det = torch.jit.load(str(shared / "models" / "faces_rfb640.pt")).eval()
    expr = torch.jit.load(str(shared / "models" / "face_expression.pt")).eval()
    sidecar = json.loads((shared / "models" / "face_expression.pt.json").read_text())
    mean = torch.tensor(sidecar["mean"]).view(1, 3, 1, 1)
    labels = dict(
        ln.split()
        for ln in (shared / "data" / "twitter_i" / "ground_truth" / "twitter_five_agrees.txt").read_text().splitlines()
        if ln.strip()
    )
    fs = imgsent.features.load(args.store, ["timm:tf_efficientnet_lite2"])
    rows = {i: n for n, i in enumerate(fs.ids)}
    ids = sorted(i for i in labels if i in rows)
    y = np.asarray([int(labels[i]) for i in ids])
    lite2 = fs.X[[rows[i] for i in ids]]
    result = {"images": len(ids), "k": K, "min_score": MIN_SCORE, "lite2_alone": held_out(lite2, y), "ways": {}}
    for way in WAYS:
        t = time.perf_counter()
        feats, found = [], 0
        with torch.inference_mode():
            for i in ids:
                with Image.open(shared / "data" / "twitter_i" / "images" / i) as im:
                    img = ImageOps.exif_transpose(im).convert("RGB")
                x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()
                f, n = features(det, expr, mean, x, way)
                feats.append(f)
                found += n > 0
        F_ = np.stack(feats)
        result["ways"][way] = {
            "images_with_a_face": found,
            "faces_alone": held_out(F_, y),
            "lite2_plus_faces": held_out(np.concatenate([lite2, F_], 1), y),
            "seconds": round(time.perf_counter() - t, 1),
        }
        print(way, result["ways"][way], flush=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
