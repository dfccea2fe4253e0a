"""ONNX Runtime as the CPU runner of exportable backbones (imgsent/onnxrunner.py): the same features
as torch, its graph cache, and what a store records about it."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from conftest import TINY, TINY2, TWITTER, HalvesDetector, run_cli, write_images

import imgsent
from imgsent import onnxrunner
from imgsent.backbones import create_backbone
from imgsent.engine import FeatureEngine
from imgsent.errors import ImgsentError
from imgsent.fingerprints import probe_batch
from imgsent.shards import manifest_paths, read_manifest

pytestmark = pytest.mark.skipif(not onnxrunner.available(), reason="onnxruntime is not installed")


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("IMGSENT_HOME", str(tmp_path / "home"))


@pytest.mark.parametrize(
    "spec", [TINY, TINY2, "torchvision:mobilenet_v2", "timm:tf_efficientnet_lite0", "imgsent:face_expression"]
)
def test_features_equal_torchs(spec):
    bb = create_backbone(spec, random_weights=True)
    runner = onnxrunner.prepare(bb, 4)
    g = torch.Generator().manual_seed(1)
    h, w = bb.preprocess.input_size
    x = torch.randn(4, 3, h, w, generator=g)
    with torch.inference_mode():
        want = bb(x).float().numpy()
    got = runner(x).numpy()
    assert got.shape == want.shape == (4, bb.dim)
    cosine = (got * want).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))
    assert cosine.min() >= 0.9999 and np.abs(got - want).max() <= 1e-4 * max(np.abs(want).max(), 1e-6)


def test_the_graph_is_cached_checked_and_rebuilt_when_wrong():
    bb = create_backbone(TINY, random_weights=True)
    first = onnxrunner.prepare(bb, 2)
    path = first.path
    assert path.startswith(os.environ["IMGSENT_HOME"]) and os.path.isfile(path)
    stamp = os.stat(path).st_mtime_ns
    again = onnxrunner.prepare(bb, 2)  # loaded, not exported again
    assert again.path == path and os.stat(path).st_mtime_ns == stamp
    other = create_backbone(TINY, random_weights=True, seed=7)  # other weights, under the first's key
    wrong = onnxrunner.prepare(other, 2).path
    os.replace(wrong, path)
    rebuilt = onnxrunner.prepare(bb, 2)  # fails the recipe's probe: removed and exported again
    x = probe_batch(bb.preprocess, 2, channels_last=False)
    with torch.inference_mode():
        np.testing.assert_allclose(rebuilt(x).numpy(), bb(x).numpy(), atol=1e-4)
    with open(path, "wb") as fh:
        fh.write(b"not an onnx file")
    assert onnxrunner.prepare(bb, 2).path == path  # unreadable: exported again


def test_what_cannot_export_stays_on_torch_under_auto(tmp_path):
    torch.jit.script(HalvesDetector.module()).save(str(tmp_path / "halves.pt"))
    scripted = create_backbone(f"objects:torchscript:{tmp_path / 'halves.pt'}")
    assert "detector" in onnxrunner.not_exportable(scripted) and not onnxrunner.runs_there(scripted)
    with pytest.raises(ImgsentError, match="cannot run on ONNX Runtime"):
        onnxrunner.prepare(scripted, 2)
    assert onnxrunner.prepare_view(scripted.module) is None  # a TorchScript detector offers no network
    engine = FeatureEngine([create_backbone(TINY, random_weights=True), scripted], device="cpu", workers=0)
    assert engine.runtimes == ["onnx", "torch"] and engine.runtime_record() == {TINY: "onnx"}
    assert FeatureEngine([create_backbone(TINY, random_weights=True)], device="cpu", runtime="torch").runtimes == [
        "torch"
    ]


def test_the_face_views_run_their_networks_there():
    specs = ["objects:imgsent:faces_rfb320", "regions:imgsent:faces_rfb320+imgsent:face_expression+k=3+min=0"]
    views = [create_backbone(s, random_weights=True) for s in specs]
    assert all(onnxrunner.runs_there(v) for v in views)
    engine = FeatureEngine(views, device="cpu", workers=0)
    assert engine.runtimes == ["onnx", "onnx"]
    regions = engine.runners[1].module
    assert isinstance(regions.inner, onnxrunner.OrtRunner) and regions.detector.module.network is not None
    assert views[1].module.detector.module.network is None  # the caller's view is not changed
    detector = views[0].module.detector.module
    x = torch.rand(1, 3, 240, 320) * 2 - 1
    with torch.inference_mode():
        want = detector.raw(x)
    got = engine.runners[0].module.detector.module.network(x)
    for g, w in zip(got, want):  # face probabilities and boxes: what NMS and the views then take as torch's
        assert torch.allclose(g, w, atol=1e-5)


@pytest.mark.shared
@pytest.mark.skipif(not (TWITTER / "images").is_dir(), reason="../shared/data/twitter_i is absent")
def test_the_default_face_views_on_real_photos_agree_across_runtimes(tmp_path):
    """Real weights on tweet photos (random ones make near-ties that NMS may break either way)."""
    listing = tmp_path / "list.txt"
    listing.write_text("".join(f"{p}\n" for p in sorted((TWITTER / "images").glob("*.jpg"))[:24]))
    specs = ["objects:imgsent:faces_rfb320", "regions:imgsent:faces_rfb320+imgsent:face_expression+k=3+min=0.9"]
    imgsent.extract([f"@{listing}"], str(tmp_path / "t"), backbones=specs, runtime="torch", workers=0)
    imgsent.extract([f"@{listing}"], str(tmp_path / "o"), backbones=specs, runtime="onnx", workers=0)
    t, o = imgsent.features.load(str(tmp_path / "t")), imgsent.features.load(str(tmp_path / "o"))
    assert (t.X[:, 1] >= 0.9).sum() >= 3  # photos with a confident face: the comparison compared something
    np.testing.assert_allclose(o.X, t.X, atol=1e-4)


def test_onnx_refuses_what_it_cannot_run():
    bb = create_backbone(TINY, random_weights=True)
    with pytest.raises(ImgsentError, match="runtime onnx runs float32 networks on the CPU"):
        FeatureEngine([bb], device="cpu", runtime="onnx", precision="bf16")
    with pytest.raises(ImgsentError, match="runtime onnx runs float32 networks on the CPU"):
        FeatureEngine([bb], device="cpu", runtime="onnx", compile=True)
    assert FeatureEngine([bb], device="cpu", precision="bf16").runtimes == ["torch"]  # auto: torch for bf16


def test_stores_say_what_ran_and_never_mix_two(tmp_path):
    write_images(tmp_path / "imgs", 6)
    kw = dict(backbones=[TINY, TINY2], random_weights=True, workers=0)
    imgsent.extract([str(tmp_path / "imgs")], str(tmp_path / "t"), runtime="torch", **kw)
    imgsent.extract([str(tmp_path / "imgs")], str(tmp_path / "o"), runtime="onnx", **kw)
    header = read_manifest(manifest_paths(str(tmp_path / "o"))[0])["header"]
    assert header["runtimes"] == {TINY: "onnx", TINY2: "onnx"}
    assert "runtimes" not in read_manifest(manifest_paths(str(tmp_path / "t"))[0])["header"]  # as before 0.8
    t, o = imgsent.features.load(str(tmp_path / "t")), imgsent.features.load(str(tmp_path / "o"))
    assert t.ids == o.ids and np.abs(t.X - o.X).max() <= 1e-4
    with pytest.raises(ImgsentError, match="made with torch for every backbone, this run uses ONNX Runtime"):
        imgsent.extract([str(tmp_path / "imgs")], str(tmp_path / "t"), runtime="onnx", **kw)
    with pytest.raises(ImgsentError, match="choose with --runtime"):
        imgsent.extract([str(tmp_path / "imgs")], str(tmp_path / "o"), runtime="torch", **kw)
    write_images(tmp_path / "imgs", 9)  # three more images: auto resumes each store as it was begun
    for name in ("t", "o"):
        s = imgsent.extract([str(tmp_path / "imgs")], str(tmp_path / name), runtime="auto", **kw)
        assert s.total == 9 and s.errors == 0
    t2, o2 = imgsent.features.load(str(tmp_path / "t")), imgsent.features.load(str(tmp_path / "o"))
    np.testing.assert_array_equal(t2.X[: len(t.ids)], t.X)
    np.testing.assert_array_equal(o2.X[: len(o.ids)], o.X)
    assert "runtimes" not in read_manifest(manifest_paths(str(tmp_path / "t"))[0])["header"]
    assert read_manifest(manifest_paths(str(tmp_path / "o"))[0])["header"]["runtimes"] == header["runtimes"]


def test_the_cli_takes_runtime_and_refuses_a_bad_one(tmp_path, capsys, monkeypatch):
    write_images(tmp_path / "imgs", 3)
    argv = ["extract", str(tmp_path / "imgs"), "--out", str(tmp_path / "s"), "-B", TINY, "--random-weights"]
    code, _, err = run_cli([*argv, "--runtime", "tpu"], capsys, monkeypatch)
    assert code == 2 and "--runtime" in err and "Traceback" not in err
    code, _, err = run_cli([*argv, "--runtime", "onnx"], capsys, monkeypatch)
    assert code in (0, None) and "onnxruntime" in err  # the summary says what ran
