"""Scoring without torch (imgsent/ortengine.py, imgsent/bundles.py): the numpy heads, resizing and
detector post-processing give torch's numbers; a warm score of the default model imports no torch
and scores as the torch engine does; plans are keyed, checked and rewritten."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import polars as pl
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY, TWITTER, imgsent_cli, write_images

import imgsent
from imgsent import bundles, onnxrunner, ortengine
from imgsent.calibration import Calibration
from imgsent.heads import create_head
from imgsent.models import model_identity
from imgsent.options import RunOptions
from imgsent.training import SentimentModel, TrainConfig, load_model

pytestmark = pytest.mark.skipif(not onnxrunner.available(), reason="onnxruntime is not installed")


def _bundle(tmp_path, kind: str, calibration=None) -> str:
    torch.manual_seed(3)
    config = TrainConfig.named(kind, hidden=9).resolved()
    blocks = [("a", 7), ("b", 5)]
    head = create_head(config.head, 12, 2, {"hidden": 9, "dropout": 0.1, "experts": 2})
    for p in head.parameters():
        torch.nn.init.normal_(p, std=0.5)
    model = SentimentModel(head, config, ["negative", "positive"], blocks, [], {}, {}, calibration)
    path = str(tmp_path / kind)
    model.save(path)
    return path


@pytest.mark.parametrize("kind", ["nn", "moe1"])
@pytest.mark.parametrize("calibrated", [False, True])
def test_numpy_heads_give_the_torch_heads_probabilities(tmp_path, kind, calibrated):
    cal = Calibration("platt", 1, {"a": 1.3, "b": -0.2}, {}) if calibrated else None
    path = _bundle(tmp_path, kind, cal)
    torch_model, np_model = load_model(path), bundles.numpy_model(path)
    X = np.random.default_rng(0).normal(size=(1030, 12)).astype(np.float32)  # more than one block of rows
    want, got = torch_model.predict_proba(X), np_model.predict_proba(X)
    assert got.dtype == np.float32 and got.shape == (1030, 2)
    np.testing.assert_allclose(got, want, atol=2e-6)
    assert np_model.version() == model_identity(torch_model, path)[1]
    np.testing.assert_array_equal(np_model.predict_proba(X[:3]), got[:3])  # rows do not depend on the others


def test_the_default_models_head_in_numpy():
    torch_model, np_model = imgsent.models.resolve_model(None), bundles.numpy_model(None)
    X = np.random.default_rng(1).normal(size=(20, np_model.in_dim)).astype(np.float32)
    np.testing.assert_allclose(np_model.predict_proba(X), torch_model.predict_proba(X), atol=2e-6)
    assert np_model.version() == model_identity(torch_model, None)[1]


@pytest.mark.parametrize(
    "size,out,mode",
    [((37, 53), (112, 112), "bilinear"), ((301, 180), (112, 112), "bilinear"), ((90, 260), (64, 48), "bicubic")],
)
def test_antialiased_resizing_is_torchs(size, out, mode):
    image = np.random.default_rng(2).random((3, *size), dtype=np.float32)
    want = F.interpolate(torch.from_numpy(image)[None], size=out, mode=mode, antialias=True, align_corners=False)
    np.testing.assert_allclose(ortengine.resize(image, out, mode, antialias=True), want[0].numpy(), atol=2e-6)


def test_plain_bilinear_resizing_is_torchs():
    image = np.random.default_rng(3).random((3, 320, 320), dtype=np.float32) * 255
    want = F.interpolate(torch.from_numpy(image)[None], size=(240, 320), mode="bilinear", align_corners=False)
    np.testing.assert_allclose(ortengine.resize(image, (240, 320), antialias=False), want[0].numpy(), atol=5e-5)


def test_nms_is_torchvisions():
    from torchvision.ops import nms

    rng = np.random.default_rng(4)
    xy = rng.random((300, 2), dtype=np.float32) * 200
    boxes = np.concatenate([xy, xy + 10 + rng.random((300, 2), dtype=np.float32) * 60], axis=1)
    scores = rng.random(300, dtype=np.float32)
    want = nms(torch.from_numpy(boxes), torch.from_numpy(scores), 0.3).numpy()
    np.testing.assert_array_equal(ortengine.nms(boxes, scores, 0.3), want)


def test_face_detection_and_the_views_match_the_torch_views():
    """The detector's resize, threshold, NMS and the objects / regions views, against imgsent.objects
    and imgsent.faces around the same raw network outputs (random weights rarely detect anything,
    so the network's outputs are given: many overlapping candidates above the threshold)."""
    views = [
        imgsent.backbones.create_backbone(s, random_weights=True)
        for s in ("objects:imgsent:faces_rfb320", "regions:imgsent:faces_rfb320+imgsent:face_expression+k=3+min=0.5")
    ]
    det = views[0].module.detector.module
    priors = det.priors.numpy()
    rng = np.random.default_rng(5)
    conf = rng.random((1, len(priors)), dtype=np.float32) ** 8  # most below 0.3, some far above
    centre = priors[:, :2] + rng.normal(size=(len(priors), 2)).astype(np.float32) * 0.01
    half = priors[:, 2:] * 2
    boxes = np.concatenate([centre - half, centre + half], axis=1)[None].astype(np.float32)
    seen = []

    def network(y):
        seen.append(y.numpy() if isinstance(y, torch.Tensor) else y)
        return (torch.from_numpy(conf), torch.from_numpy(boxes)) if isinstance(y, torch.Tensor) else [conf, boxes]

    for v in views:
        v.module.detector.module.network = network
    pixels = rng.integers(0, 256, size=(2, 3, 320, 320), dtype=np.uint8)
    x = torch.from_numpy(pixels).float() / 255.0
    with torch.inference_mode():
        want_objects = views[0].module(x).numpy()
        want_regions = views[1].module(x).numpy()
    np_det = ortengine.FaceDetector.__new__(ortengine.FaceDetector)
    np_det.graph, np_det.size, np_det.width, np_det.height = network, 320, 320, 240
    np_det.threshold, np_det.iou, np_det.top = det.threshold, det.iou, det.top
    image = pixels.astype(np.float32) / np.float32(255.0)
    torch_inputs = list(seen)  # one detector pass per image: the regions view reused the objects view's
    assert len(torch_inputs) == 2
    detections = [np_det.detect(img) for img in image]
    for mine, theirs in zip(seen[2:], torch_inputs):  # the network's input: resized and scaled alike
        np.testing.assert_allclose(mine, theirs, atol=1e-5)
    assert all(len(d[0]) > 3 for d in detections)
    objects = ortengine._Objects({"classes": views[0].module.classes})
    np.testing.assert_allclose(objects(image, None, detections), want_objects, atol=1e-5)
    regions_view = views[1].module
    regions = ortengine._Regions.__new__(ortengine._Regions)
    inner = regions_view.inner

    class Inner:
        def passes(self, crops, output):
            with torch.inference_mode():
                return inner(torch.from_numpy(crops)).numpy()

    regions.inner, regions.inner_output = Inner(), "features"
    regions.k, regions.min, regions.crop_size, regions.mode = 3, 0.5, regions_view.crop_size, regions_view.mode
    regions.mean, regions.std = regions_view.mean.numpy(), regions_view.std.numpy()
    regions.dim = regions_view.dim
    got = regions(image, None, detections)
    assert np.abs(got).sum() > 0
    np.testing.assert_allclose(got, want_regions, atol=1e-4)


def _plans() -> list[str]:
    folder = os.path.join(os.environ["IMGSENT_HOME"], "onnx", "plans")
    return sorted(os.listdir(folder)) if os.path.isdir(folder) else []


def test_a_warm_score_of_the_default_model_imports_no_torch_and_scores_the_same(tmp_path):
    images = tmp_path / "imgs"
    paths = write_images(images, 5, size=(150, 110))
    (images / "broken.jpg").write_bytes(b"not an image")
    first = imgsent.score([str(images)], str(tmp_path / "torch.parquet"), workers=0, progress=False)
    assert "torch not loaded" not in first.details.get("runtime", "") and len(_plans()) == 1
    code = (
        "import sys, imgsent.scoring as s; "
        f"r = s.score([{str(images)!r}], {str(tmp_path / 'light.parquet')!r}, progress=False); "
        "print(r.details['runtime']); "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision', 'timm')))"
    )
    import subprocess

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "torch not loaded" in out.stdout and out.stdout.strip().endswith("[]"), out.stdout
    a, b = pl.read_parquet(tmp_path / "torch.parquet"), pl.read_parquet(tmp_path / "light.parquet")
    assert a["id"].to_list() == b["id"].to_list() and a["status"].to_list() == b["status"].to_list()
    assert b.filter(pl.col("status") == "error")["error"].to_list()[0]  # the broken file: a row with its reason
    assert a["label"].to_list() == b["label"].to_list() and a["model_version"].to_list() == b["model_version"].to_list()
    ok = a["status"] == "ok"
    np.testing.assert_allclose(b["p_positive"].to_numpy()[ok], a["p_positive"].to_numpy()[ok], atol=1e-5)
    # the CLI, as a user types it: one JSON row per image on stdout, nothing of torch loaded
    cli = imgsent_cli("score", str(paths[0]), "--out", "-", "-q")
    assert cli.returncode == 0, cli.stderr
    row = json.loads(cli.stdout)
    same = a.filter(pl.col("path").str.ends_with(paths[0].name))
    assert row["label"] == same["label"][0] and abs(row["p_positive"] - same["p_positive"][0]) < 1e-5


def test_runs_that_need_torch_do_not_take_the_plan(tmp_path, monkeypatch):
    images = tmp_path / "imgs"
    write_images(images, 3)
    store = str(tmp_path / "store")
    imgsent.extract([str(images)], store, backbones=[TINY], random_weights=True, workers=0)
    import warnings

    from imgsent.errors import UselessModelWarning

    labels = tmp_path / "labels.csv"
    labels.write_text(
        "id,label\n" + "".join(f"img{i:03d}.jpg,{'positive' if i % 2 else 'negative'}\n" for i in range(3))
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UselessModelWarning)
        imgsent.train(store, labels=str(labels), head="nn", epochs=2, cv=0, out=str(tmp_path / "model"))
    model = str(tmp_path / "model")
    imgsent.score([str(images)], str(tmp_path / "a.parquet"), model=model, workers=0, progress=False)
    assert len(_plans()) == 1
    opts = RunOptions.build(None, workers=0)
    assert ortengine.light_engine(model, opts) is not None
    for change in ({"runtime": "torch"}, {"precision": "bf16"}, {"compile": True}, {"engine": "ray"}):
        assert ortengine.light_engine(model, RunOptions.build(opts, **change)) is None, change
    monkeypatch.setenv("IMGSENT_NO_LIGHT", "1")
    assert ortengine.light_engine(model, opts) is None
    monkeypatch.delenv("IMGSENT_NO_LIGHT")
    # a graph that is no longer the file checked: the plan is not taken, torch checks and exports again
    plan = json.loads(open(os.path.join(os.environ["IMGSENT_HOME"], "onnx", "plans", _plans()[0])).read())
    graph = plan["backbones"][0]["graph"]["file"]
    with open(graph, "ab") as fh:
        fh.write(b"\0")
    assert ortengine.light_engine(model, opts) is None
    again = imgsent.score([str(images)], str(tmp_path / "b.parquet"), model=model, workers=0, progress=False)
    assert "torch not loaded" not in again.details["runtime"]
    assert ortengine.light_engine(model, opts) is not None  # checked, exported again, the plan rewritten
    light = imgsent.score([str(images)], str(tmp_path / "c.parquet"), model=model, workers=0, progress=False)
    assert "torch not loaded" in light.details["runtime"]
    a, c = pl.read_parquet(tmp_path / "a.parquet"), pl.read_parquet(tmp_path / "c.parquet")
    np.testing.assert_allclose(c["p_positive"].to_numpy(), a["p_positive"].to_numpy(), atol=1e-5)


def test_probabilities_of_a_probs_backbone_are_taken_once_on_onnx_runtime():
    from imgsent.backbones import create_backbone
    from imgsent.engine import FeatureEngine

    bb = create_backbone(f"{TINY}:probs", random_weights=True)
    pixels = torch.from_numpy(np.random.default_rng(6).integers(0, 256, (3, 1, 3, 160, 160), dtype=np.uint8))
    t = FeatureEngine([bb], device="cpu", workers=0, runtime="torch").embed(0, pixels).numpy()
    o_engine = FeatureEngine([bb], device="cpu", workers=0, runtime="onnx")
    assert o_engine.runtimes == ["onnx"]
    o = o_engine.embed(0, pixels).numpy()
    np.testing.assert_allclose(o.sum(1), 1, atol=1e-5)
    np.testing.assert_allclose(o, t, atol=1e-5)  # one softmax, not two


@pytest.mark.shared
@pytest.mark.skipif(not (TWITTER / "images").is_dir(), reason="../shared/data/twitter_i is absent")
def test_the_default_model_on_tweet_photos_scores_alike_with_and_without_torch(tmp_path):
    """Real photos, faces among them: detections, crops and their expressions go through numpy."""
    from imgsent.inputs import resolve_inputs
    from imgsent.scoring import extract_model_features

    listing = tmp_path / "list.txt"
    listing.write_text("".join(f"{p}\n" for p in sorted((TWITTER / "images").glob("*.jpg"))[:40]))
    imgsent.score([f"@{listing}"], str(tmp_path / "t.parquet"), workers=0, progress=False)  # writes the plan
    light = imgsent.score([f"@{listing}"], str(tmp_path / "o.parquet"), progress=False)
    assert "torch not loaded" in light.details["runtime"]
    t, o = pl.read_parquet(tmp_path / "t.parquet"), pl.read_parquet(tmp_path / "o.parquet")
    assert t["label"].to_list() == o["label"].to_list()
    np.testing.assert_allclose(o["p_positive"].to_numpy(), t["p_positive"].to_numpy(), atol=1e-5)
    # feature by feature: the torch engine (on ONNX Runtime) against the plan run here
    extract_model_features([f"@{listing}"], str(tmp_path / "store"), workers=0, progress=False)
    want = imgsent.features.load(str(tmp_path / "store"))
    opts = RunOptions.build(None, workers=0)
    _, engine = ortengine.light_engine(None, opts)
    batches = list(engine.run(resolve_inputs([f"@{listing}"], opts)))
    got = np.concatenate([np.concatenate([b.features[k] for k in engine.keys], axis=1) for b in batches])
    faces = want.matrix(["objects:imgsent:faces_rfb320"])[:, 1]
    assert (faces >= 0.9).sum() >= 5  # photos with a confident face: the regions view compared something
    np.testing.assert_allclose(got, want.matrix(engine.keys), atol=1e-4)


def test_a_dying_decoder_process_is_survived_without_torch_too(tmp_path, monkeypatch):
    """The engine without torch decodes in processes of its own (imgsent/decodepool.py): one that
    segfaults on a file leaves that image an error row saying so, the others are scored."""
    import signal

    import imgsent.decode

    images = tmp_path / "imgs"
    paths = write_images(images, 6)
    imgsent.score([str(images)], str(tmp_path / "first.parquet"), workers=0, progress=False)  # writes the plan
    real = imgsent.decode.decode_image

    def crashing(path, **kw):
        if path.endswith(paths[2].name):
            import faulthandler

            faulthandler.disable()
            os.kill(os.getpid(), signal.SIGSEGV)
        return real(path, **kw)

    monkeypatch.setattr(imgsent.decode, "decode_image", crashing)
    s = imgsent.score([str(images)], str(tmp_path / "s.parquet"), workers=1, batch_size=2, progress=False)
    assert "torch not loaded" in s.details["runtime"] and (s.total, s.errors) == (6, 1)
    rows = pl.read_parquet(tmp_path / "s.parquet")
    bad = rows.filter(pl.col("status") == "error")
    assert bad["path"].to_list()[0].endswith(paths[2].name) and "died" in bad["error"][0]
    first = pl.read_parquet(tmp_path / "first.parquet").filter(pl.col("status") == "ok")
    good = rows.filter(pl.col("status") == "ok")
    assert (
        good["p_positive"].to_list() == first.filter(pl.col("id").is_in(good["id"].to_list()))["p_positive"].to_list()
    )


def test_a_network_failing_on_every_image_stops_the_run_without_torch_too(tmp_path, monkeypatch):
    """The same rule and line as the torch engine (batches.FailureCount): broken, not the images."""
    from imgsent.errors import ImgsentError

    images = tmp_path / "imgs"
    write_images(images, 4)
    imgsent.score([str(images)], str(tmp_path / "first.parquet"), workers=0, progress=False)  # writes the plan

    def broken(self, x, pp, detections=None):
        raise RuntimeError("no kernel for this")

    monkeypatch.setattr(ortengine._Network, "__call__", broken)
    with pytest.raises(ImgsentError, match="failed on each of the first 4 images.*no kernel for this"):
        imgsent.score([str(images)], str(tmp_path / "s.parquet"), workers=0, progress=False)
