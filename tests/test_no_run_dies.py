"""No run dies for one image or one view: a backbone that raises on some images makes those images
error rows and the run goes on; a backbone that fails on every image stops the run with one line;
TorchScript detectors run side by side with imgsent's fused graphs (the lane race of issue 23)."""

from __future__ import annotations

import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SHARED, TINY, TWITTER, imgsent_cli, write_images
from PIL import Image

import imgsent
from imgsent.switches import fusion

D2GO = SHARED / "models" / "d2go_coco_objects.pt"
FACES = SHARED / "models" / "faces_rfb640.pt"
KW = {"device": "cpu", "workers": 0, "progress": False, "random_weights": True}


class Picky(torch.nn.Module):
    """A classifier that raises on bright images (mean of the normalised input above 1.5: a white
    image is about 2.2, the fingerprint's probe about 0.1), as a broken export or an op without a
    kernel for some shapes would."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool((x.mean(dim=(1, 2, 3)) > 1.5).any()):
            raise RuntimeError("this model cannot take bright images")
        return x.mean(dim=(2, 3))


def picky_spec(tmp_path: Path) -> str:
    path = tmp_path / "picky.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script / save: deprecated, still what users export
        torch.jit.save(torch.jit.script(Picky()), str(path))
    return f"torchscript:{path}"


def white_images(root: Path, names: list[str]) -> None:
    for name in names:
        Image.new("RGB", (64, 48), (255, 255, 255)).save(root / name)


def test_images_a_backbone_raises_on_become_error_rows_and_the_rest_equal_a_clean_run(tmp_path):
    imgs = tmp_path / "imgs"
    write_images(imgs, 10, size=(80, 60))
    white_images(imgs, ["img003.jpg", "img007.jpg"])  # two of the ten, in the first batch
    spec = picky_spec(tmp_path)
    summary = imgsent.extract([str(imgs)], str(tmp_path / "s"), backbones=[TINY, spec], batch_size=4, **KW)
    fs = imgsent.features.load(str(tmp_path / "s"), only_ok=False)
    assert len(fs.ids) == 10 and summary.errors == 2
    bad = {i: e for i, s, e in zip(fs.ids, fs.status, fs.error) if s != "ok"}
    assert sorted(bad) == ["img003.jpg", "img007.jpg"]
    for reason in bad.values():
        assert reason.startswith("torchscript:picky.pt failed on this image: RuntimeError")
        assert "cannot take bright images" in reason and "\n" not in reason
    assert np.isnan(fs.X[~fs.ok]).all()

    # the other eight: the features a run without the bright images gives (retries change nothing)
    clean = tmp_path / "clean"
    clean.mkdir()
    for p in sorted(imgs.iterdir()):
        if p.name not in bad:
            (clean / p.name).write_bytes(p.read_bytes())
    imgsent.extract([str(clean)], str(tmp_path / "c"), backbones=[TINY, spec], batch_size=4, **KW)
    ref = imgsent.features.load(str(tmp_path / "c"))
    got = imgsent.features.load(str(tmp_path / "s"))
    assert got.ids == ref.ids
    np.testing.assert_array_equal(got.X, ref.X)


def test_a_backbone_failing_on_every_image_stops_the_run_with_one_line(tmp_path):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    white_images(imgs, [f"w{i:02d}.jpg" for i in range(12)])
    spec = picky_spec(tmp_path)
    r = imgsent_cli(
        "extract", imgs, "-o", tmp_path / "s", "-B", TINY, "-B", spec, "--device", "cpu", "--random-weights", "-q"
    )
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
    assert "imgsent: error: backbone torchscript:picky.pt failed on each of the first 12 images" in r.stderr
    assert "cannot take bright images" in r.stderr


def test_a_backbone_that_worked_on_some_images_is_not_stopped_by_images_it_fails_on(tmp_path):
    imgs = tmp_path / "imgs"
    write_images(imgs, 4, size=(80, 60))  # img000-003: fine
    white_images(imgs, [f"w{i:02d}.jpg" for i in range(12)])  # then only images it fails on
    spec = picky_spec(tmp_path)
    out = tmp_path / "s"
    imgsent.extract([str(imgs)], str(out), backbones=[TINY, spec], batch_size=4, rows_per_shard=4, **KW)
    fs = imgsent.features.load(str(out), only_ok=False)
    assert fs.status.count("ok") == 4 and fs.status.count("error") == 12  # it worked on some: not broken


def test_a_view_failing_on_all_it_gets_keeps_the_shards_already_finished(tmp_path):
    imgs = tmp_path / "imgs"
    write_images(imgs, 4, size=(80, 60))
    out, spec = tmp_path / "s", picky_spec(tmp_path)
    imgsent.extract([str(imgs)], str(out), backbones=[spec], batch_size=4, rows_per_shard=4, **KW)
    white_images(imgs, [f"w{i:02d}.jpg" for i in range(12)])  # the rerun gets only what it fails on
    with pytest.raises(imgsent.ImgsentError, match="failed on each of the first 8 images"):
        imgsent.extract([str(imgs)], str(out), backbones=[spec], batch_size=4, rows_per_shard=4, **KW)
    assert imgsent.features.load(str(out)).ids == [f"img{i:03d}.jpg" for i in range(4)]


class OptimisationSpy(torch.nn.Module):
    """Records whether graph-executor optimisation was on (this thread) when it was called."""

    def __init__(self):
        super().__init__()
        self.seen: list[bool] = []

    def forward(self, images: list[torch.Tensor]):
        self.seen.append(torch._C._get_graph_executor_optimize())
        return images, [{"boxes": torch.zeros((0, 4)), "labels": torch.zeros(0), "scores": torch.zeros(0)}]


def test_detectors_run_unoptimised_whatever_another_lane_switched_on():
    from imgsent.objects import Detector

    spy = OptimisationSpy()
    det = Detector(spy, 32, "spy")
    held, release = threading.Event(), threading.Event()

    def other_lane():  # a frozen backbone running meanwhile: fusion on, process-wide
        with fusion(True):
            held.set()
            release.wait(10)

    t = threading.Thread(target=other_lane)
    t.start()
    held.wait(10)
    try:
        assert torch.jit.onednn_fusion_enabled()
        det.detect(torch.rand(2, 3, 32, 32))
    finally:
        release.set()
        t.join()
    assert spy.seen == [False, False]
    assert torch._C._get_graph_executor_optimize()  # this thread's setting is restored


def _twitter_images(n: int) -> list[torch.Tensor]:
    files = sorted((TWITTER / "images").glob("*.jpg"))[:n]
    out = []
    for f in files:
        im = Image.open(f).convert("RGB").resize((512, 512))
        out.append(torch.from_numpy(np.array(im)).permute(2, 0, 1).float().div(255)[None])
    return out


@pytest.mark.parametrize("detector", [D2GO, FACES], ids=["d2go", "faces"])
def test_real_torchscript_detectors_under_concurrent_lanes_and_fusion(detector):
    """The cause of the crash in issue 23: with oneDNN fusion on (another lane running a frozen
    graph), the profiling executor fused these exported detectors' graphs and every later call
    raised "Cannot input a tensor of dimension other than 0 as a scalar argument". Two threads call
    one detector at once while a third switches fusion on and off: results equal a serial run."""
    if not detector.is_file() or not (TWITTER / "images").is_dir():
        pytest.skip(f"{detector.name} or Twitter I not under {SHARED}")
    bb = imgsent.create_backbone(f"objects:torchscript:{detector}")
    images = _twitter_images(12)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in each lane (kernels split over threads sum in another order)
    try:
        with torch.inference_mode():
            serial = [bb(x) for x in images]
    finally:
        torch.set_num_threads(threads)
    # a fresh copy of the detector (its graphs not optimised yet), its memo of detections empty
    fresh = imgsent.create_backbone(f"objects:torchscript:{detector}")
    stop = threading.Event()

    def toggler():
        while not stop.is_set():
            with fusion(True):
                stop.wait(0.002)

    results: dict[int, torch.Tensor] = {}
    errors: list[BaseException] = []

    def lane(indices):
        torch.set_num_threads(1)
        try:
            with torch.inference_mode():
                for i in indices:
                    results[i] = fresh(images[i])
        except BaseException as exc:  # noqa: BLE001 (reported below)
            errors.append(exc)

    tog = threading.Thread(target=toggler)
    tog.start()
    lanes = [threading.Thread(target=lane, args=(range(k, 12, 2),)) for k in range(2)]
    try:
        for t in lanes:
            t.start()
        for t in lanes:
            t.join(120)
    finally:
        stop.set()
        tog.join()
    assert not errors, errors[0]
    for i in range(12):
        torch.testing.assert_close(results[i], serial[i], rtol=0, atol=0)
