"""Shared fixtures: generated images of every mode and format, a broken-file corpus, tiny
random backbones, and the real weights / data in ../shared (tests skip with a reason when absent)."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# No test may reach the network: hubs fail fast instead of retrying.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
SHARED_WEIGHTS = SHARED / "models" / "mobilenet_v2_imagenet1k.safetensors"
SHARED_TORCHSCRIPT = SHARED / "models" / "mobilenet_v2_quantized_torchscript.pt"
TWITTER = SHARED / "data" / "twitter_i"
DEFAULT_SPEC = "torchvision:mobilenet_v2.IMAGENET1K_QNNPACK_V1"

needs_shared_weights = pytest.mark.skipif(
    not SHARED_WEIGHTS.is_file(), reason=f"real MobileNetV2 weights not found at {SHARED_WEIGHTS} (../shared absent)"
)
needs_twitter = pytest.mark.skipif(
    not (TWITTER / "images").is_dir() or not SHARED_WEIGHTS.is_file(),
    reason=f"Twitter I data or real weights not found under {SHARED} (../shared absent)",
)

TINY = "timm:test_resnet"  # 96-d, 160x160 input, random weights
TINY2 = "timm:test_efficientnet"  # 256-d, bicubic: a second preprocessing


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("IMGSENT_HOME", str(tmp_path / "imgsent-home"))
    monkeypatch.delenv("IMGSENT_WEIGHTS", raising=False)


def rgb_array(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A smooth, deterministic picture (gradients + a blob) so that resizing is meaningful."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    cy, cx = rng.uniform(0.3, 0.7) * h, rng.uniform(0.3, 0.7) * w
    blob = np.exp(-(((yy - cy) / (0.2 * h + 1)) ** 2 + ((xx - cx) / (0.2 * w + 1)) ** 2))
    r = 255 * xx / max(w - 1, 1)
    g = 255 * yy / max(h - 1, 1)
    b = 255 * blob
    noise = rng.normal(0, 8, size=(h, w, 3))
    return np.clip(np.stack([r, g, b], -1) + noise, 0, 255).astype(np.uint8)


def write_images(root: Path, n: int, size=(120, 90), seed: int = 0, fmt: str = "jpg") -> list[Path]:
    root.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        p = root / f"img{i:03d}.{fmt}"
        Image.fromarray(rgb_array(size[1], size[0], seed + i)).save(p)
        out.append(p)
    return out


def labelled_images(root: Path, n: int, size=(96, 72)) -> tuple[Path, Path]:
    """``n`` generated images in ``root/imgs`` and a ``<file> <0|1>`` labels file (alternating)."""
    write_images(root / "imgs", n, size=size)
    labels = root / "labels.txt"
    labels.write_text("".join(f"img{i:03d}.jpg {i % 2}\n" for i in range(n)))
    return root / "imgs", labels


class HalvesDetector:
    """Stand-in for an exported detector (call ``module()``): two boxes, the image's left and right
    halves, each scored by its mean brightness, best first."""

    @staticmethod
    def module():
        import torch

        class Halves(torch.nn.Module):
            def forward(self, images: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
                x = images[0]
                h, w = x.shape[1], x.shape[2]
                half = w // 2
                scores = torch.stack([x[:, :, :half].mean(), x[:, :, half:].mean()])
                boxes = torch.tensor([[0.0, 0.0, float(half), float(h)], [float(half), 0.0, float(w), float(h)]])
                order = torch.argsort(scores, descending=True)
                return images, [{"boxes": boxes[order], "labels": torch.tensor([1, 2])[order], "scores": scores[order]}]

        return Halves()


def jpeg_bytes(arr: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", **kw)
    return buf.getvalue()


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """40 small JPEG/PNG images in pos/ and neg/ folders that a head can tell apart, plus 2 broken files."""
    root = tmp_path_factory.mktemp("tiny")
    for label, base in (("positive", 0), ("negative", 1)):
        d = root / label
        d.mkdir()
        for i in range(20):
            arr = rgb_array(64 + 4 * i, 80, seed=100 * base + i)
            if label == "negative":
                arr = 255 - arr  # inverted colours: separable by any backbone
            Image.fromarray(arr).save(d / f"{label[:3]}{i:02d}.{'png' if i % 3 == 0 else 'jpg'}")
    (root / "broken").mkdir()
    (root / "broken" / "empty.jpg").write_bytes(b"")
    (root / "broken" / "text.png").write_text("not an image")
    return root


class _Interrupter:
    def __init__(self):
        self.left: int | None = None
        self.exc: BaseException | None = None
        self.commits = 0

    def arm(self, commits: int, exc: BaseException) -> None:
        """After ``commits`` more shard commits, the next one raises ``exc`` (a simulated crash)."""
        self.left, self.exc = commits, exc

    def disarm(self) -> None:
        self.left = None


@pytest.fixture
def interrupt_after_commits(monkeypatch):
    """Simulate a crash in the middle of a sharded run: ``arm(n, exc)`` lets n shards be listed in
    the manifest, then listing the next raises ``exc``; ``disarm()`` lets everything through again.
    (Listing is where the local engine's and Ray workers' shards meet: ``ShardedWriter.record``.)"""
    import imgsent.shards

    ctl = _Interrupter()
    real = imgsent.shards.ShardedWriter.record

    def record(self, index, entry, schema=None):
        if ctl.left == 0:
            raise ctl.exc
        if ctl.left is not None:
            ctl.left -= 1
        ctl.commits += 1
        return real(self, index, entry, schema)

    monkeypatch.setattr(imgsent.shards.ShardedWriter, "record", record)
    return ctl


def run_cli(argv, capsys, monkeypatch):
    """``imgsent ARGV`` in this process: (exit code, stdout, stderr)."""
    from imgsent.cli import main

    monkeypatch.setattr(sys, "argv", ["imgsent", *map(str, argv)])
    with pytest.raises(SystemExit) as exc:
        main()
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err


CLI_ENV = {"PYTHONWARNINGS": "ignore", "IMGSENT_PROGRESS_EVERY": "1000"}


def imgsent_cli(*args, env=None, umask=None, timeout=300, **kw) -> subprocess.CompletedProcess:
    """``python -m imgsent ARGS`` as a user types it, in a subprocess (text output captured)."""

    def preexec():
        if umask is not None:
            os.umask(umask)

    return subprocess.run(
        [sys.executable, "-m", "imgsent", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **CLI_ENV, **(env or {})},
        preexec_fn=preexec,
        **kw,
    )


@pytest.fixture(scope="session")
def tiny_model(tiny_dataset, tmp_path_factory) -> Path:
    """A model bundle over the tiny random backbone, trained on ``tiny_dataset`` (fast to load: for
    tests about inputs and outputs, not accuracy)."""
    import warnings

    import imgsent
    from imgsent.errors import UselessModelWarning

    root = tmp_path_factory.mktemp("tiny-model")
    store = str(root / "store")
    imgsent.extract([str(tiny_dataset)], store, backbones=[TINY], random_weights=True, workers=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UselessModelWarning)
        imgsent.train(store, labels_from_folders=True, head="nn", epochs=5, cv=0, out=str(root / "model"))
    return root / "model"


# Debian's chromium, headless, as root on a closed network: without the background-networking flags
# it tries (and fails) to reach Google's hosts at every start.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
