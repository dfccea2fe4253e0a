"""Convert the upstream face networks into the files imgsent ships (``imgsent/face_models/``).

Upstream (both MIT; their licence texts are shipped beside the weights):

* Ultra-Light-Fast-Generic-Face-Detector-1MB, https://github.com/Linzaer/Ultra-Light-Fast-Generic-Face-Detector-1MB
  ``models/pretrained/version-RFB-320.pth`` and ``version-RFB-640.pth`` (torch state dicts of its
  ``create_Mb_Tiny_RFB_fd``): the keys are imgsent's :class:`imgsent.faces.RFBFaceDetector`'s, as they are.
* face-api.js, https://github.com/justadudewhohacks/face-api.js
  ``weights/face_expression_model-weights_manifest.json`` + ``face_expression_model-shard1`` (TF.js:
  weights in manifest order, uint8-quantised ``q * scale + min`` or float32): TF layouts turned into
  torch's (conv HWIO -> OIHW, depthwise HW I 1 -> I 1 H W, dense (in, out) -> (out, in)).

Usage (a checkout of each repository, e.g. the ``fetch`` tool's mirrors, read with ``git show``)::

    python bench/convert_face_nets.py --rfb-repo PATH/Ultra-Light... --faceapi-repo PATH/face-api.js

It checks every tensor landed (strict load), and writes ``sources.json`` with each upstream file's
repository, commit, path and sha256 and each shipped file's sha256.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from imgsent import faces  # noqa: E402
from imgsent.weights import atomic_save_safetensors  # noqa: E402

RFB_URL = "https://github.com/Linzaer/Ultra-Light-Fast-Generic-Face-Detector-1MB"
FACEAPI_URL = "https://github.com/justadudewhohacks/face-api.js"
RFB_FILES = {
    "faces_rfb320": "models/pretrained/version-RFB-320.pth",
    "faces_rfb640": "models/pretrained/version-RFB-640.pth",
}
FACEAPI_MANIFEST = "weights/face_expression_model-weights_manifest.json"


def git_bytes(repo: str, path: str) -> bytes:
    """A file's bytes at HEAD of a checkout or bare mirror."""
    return subprocess.run(["git", "-C", repo, "show", f"HEAD:{path}"], check=True, capture_output=True).stdout


def git_head(repo: str) -> str:
    return subprocess.run(
        ["git", "-C", repo, "rev-parse", "HEAD"], check=True, capture_output=True, text=True
    ).stdout.strip()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def convert_rfb(data: bytes, name: str) -> dict[str, torch.Tensor]:
    state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    module, _ = faces.load(name, random_weights=True)
    module.load_state_dict(state, strict=True)
    return {k: v.contiguous() for k, v in module.state_dict().items()}


def read_tfjs(manifest: list, shards: dict[str, bytes]) -> dict[str, np.ndarray]:
    """TF.js weights: every group's shards concatenated, weights in manifest order."""
    out: dict[str, np.ndarray] = {}
    for group in manifest:
        blob = b"".join(shards[p] for p in group["paths"])
        offset = 0
        for w in group["weights"]:
            n = int(np.prod(w["shape"])) if w["shape"] else 1
            q = w.get("quantization")
            if q:
                if q["dtype"] != "uint8":
                    raise SystemExit(f"{w['name']}: quantisation {q['dtype']} not handled")
                raw = np.frombuffer(blob, dtype=np.uint8, count=n, offset=offset).astype(np.float32)
                values = raw * np.float32(q["scale"]) + np.float32(q["min"])
                offset += n
            else:
                if w["dtype"] != "float32":
                    raise SystemExit(f"{w['name']}: dtype {w['dtype']} not handled")
                values = np.frombuffer(blob, dtype=np.float32, count=n, offset=offset).copy()
                offset += 4 * n
            out[w["name"]] = values.reshape(w["shape"])
        if offset != len(blob):
            raise SystemExit(f"TF.js shards hold {len(blob)} bytes, the manifest names {offset}")
    return out


def convert_expression(tf: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    def t(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))

    state: dict[str, torch.Tensor] = {}
    for b in range(4):
        for c in range(4):
            p, q = f"dense{b}/conv{c}", f"dense{b}.conv{c}"
            if b == 0 and c == 0:
                state[f"{q}.weight"] = t(tf[f"{p}/filters"].transpose(3, 2, 0, 1))
                state[f"{q}.bias"] = t(tf[f"{p}/bias"])
                continue
            state[f"{q}.depthwise.weight"] = t(tf[f"{p}/depthwise_filter"].transpose(2, 3, 0, 1))
            state[f"{q}.pointwise.weight"] = t(tf[f"{p}/pointwise_filter"].transpose(3, 2, 0, 1))
            state[f"{q}.pointwise.bias"] = t(tf[f"{p}/bias"])
    state["fc.weight"] = t(tf["fc/weights"].T)
    state["fc.bias"] = t(tf["fc/bias"])
    used = {f"dense{b}/conv{c}" for b in range(4) for c in range(4)} | {"fc"}
    left = [k for k in tf if k.rsplit("/", 1)[0] not in used]
    if left:
        raise SystemExit(f"TF.js weights not converted: {left}")
    module, _ = faces.load("face_expression", random_weights=True)
    module.load_state_dict(state, strict=True)
    return {k: v.contiguous() for k, v in module.state_dict().items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rfb-repo", required=True, help="a checkout of Ultra-Light-Fast-Generic-Face-Detector-1MB")
    ap.add_argument("--faceapi-repo", required=True, help="a checkout of face-api.js")
    ap.add_argument("--out", default=faces.FOLDER)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    record: dict[str, dict] = {}
    rfb_commit = git_head(args.rfb_repo)
    for name, path in RFB_FILES.items():
        data = git_bytes(args.rfb_repo, path)
        target = os.path.join(args.out, f"{name}.safetensors")
        atomic_save_safetensors(convert_rfb(data, name), Path(target))
        record[name] = {
            "upstream": RFB_URL,
            "commit": rfb_commit,
            "files": {path: sha256(data)},
            "licence": "MIT",
            "licence_file": "LICENSE-Ultra-Light-Fast-Generic-Face-Detector-1MB.txt",
        }
    fa_commit = git_head(args.faceapi_repo)
    manifest_bytes = git_bytes(args.faceapi_repo, FACEAPI_MANIFEST)
    manifest = json.loads(manifest_bytes)
    folder = os.path.dirname(FACEAPI_MANIFEST)
    shards = {p: git_bytes(args.faceapi_repo, f"{folder}/{p}") for g in manifest for p in g["paths"]}
    atomic_save_safetensors(
        convert_expression(read_tfjs(manifest, shards)), Path(args.out) / "face_expression.safetensors"
    )
    record["face_expression"] = {
        "upstream": FACEAPI_URL,
        "commit": fa_commit,
        "files": {FACEAPI_MANIFEST: sha256(manifest_bytes), **{f"{folder}/{p}": sha256(b) for p, b in shards.items()}},
        "licence": "MIT",
        "licence_file": "LICENSE-face-api.js.txt",
    }
    for repo, name in (
        (args.rfb_repo, "Ultra-Light-Fast-Generic-Face-Detector-1MB"),
        (args.faceapi_repo, "face-api.js"),
    ):
        with open(os.path.join(args.out, f"LICENSE-{name}.txt"), "wb") as fh:
            fh.write(git_bytes(repo, "LICENSE"))
    for name, entry in record.items():
        with open(os.path.join(args.out, f"{name}.safetensors"), "rb") as fh:
            entry["sha256"] = sha256(fh.read())
    with open(os.path.join(args.out, faces.SOURCES_FILE), "w", encoding="utf-8") as fh:
        json.dump(record, fh, indent=1, sort_keys=True)
        fh.write("\n")
    print(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
