"""The face networks shipped inside imgsent (imgsent/faces.py, imgsent/face_models/): their files,
their architectures, their views, and (with ../shared) the same outputs as an independent conversion."""

from __future__ import annotations

import hashlib
import json
import os
import sys
import warnings

import numpy as np
import pytest
import torch
from conftest import SHARED, run_cli

import imgsent
from imgsent import faces
from imgsent.backbones import create_backbone
from imgsent.errors import ImgsentError

SHARED_MODELS = SHARED / "models"
needs_shared_faces = pytest.mark.skipif(
    not (SHARED_MODELS / "faces_rfb640.pt").is_file(),
    reason="../shared/models/faces_rfb640.pt and face_expression.pt (an independent conversion) are absent",
)


def test_every_shipped_file_is_what_sources_json_says_with_its_licence():
    src = faces.sources()
    assert set(src) == set(faces.NETS)
    for name, entry in src.items():
        with open(faces.NETS[name].file, "rb") as fh:
            assert hashlib.sha256(fh.read()).hexdigest() == entry["sha256"], name
        assert entry["licence"] == "MIT" and entry["upstream"].startswith("https://github.com/")
        assert len(entry["commit"]) == 40 and entry["files"]
        licence = os.path.join(faces.FOLDER, entry["licence_file"])
        assert "MIT License" in open(licence, encoding="utf-8").read()
        module, source = faces.load(name)  # strict load: every tensor of the architecture is in the file
        assert "shipped with imgsent" in source and not module.training


def test_the_detector_answers_like_an_exported_d2go_detector():
    det, _ = faces.load("faces_rfb320", random_weights=True)
    det.threshold = 0.0  # random weights: keep everything, to see the boxes' frame
    image = torch.rand(3, 150, 200)
    with torch.inference_mode():
        inputs, (out,) = det([image])
    assert inputs[0] is image and set(out) == {"boxes", "labels", "scores"}
    n = len(out["scores"])
    assert 0 < n <= det.top and out["boxes"].shape == (n, 4) and (out["labels"] == 1).all()
    b = out["boxes"]
    assert (b[:, 0] >= 0).all() and (b[:, 2] <= 200).all() and (b[:, 1] >= 0).all() and (b[:, 3] <= 150).all()
    assert torch.all(out["scores"][:-1] >= out["scores"][1:])  # NMS keeps them best first


def test_priors_are_upstreams_grid():
    # upstream's fd_config for 320 x 240: feature maps 40x30, 20x15, 10x8, 5x4 with 3, 2, 2, 3 boxes each
    assert len(faces._priors(320, 240)) == 40 * 30 * 3 + 20 * 15 * 2 + 10 * 8 * 2 + 5 * 4 * 3 == 4420
    assert len(faces._priors(640, 480)) == 80 * 60 * 3 + 40 * 30 * 2 + 20 * 15 * 2 + 10 * 8 * 3 == 17640
    p = faces._priors(320, 240)
    assert (
        p.min() >= 0 and p.max() <= 1 and torch.allclose(p[0], torch.tensor([0.5 / 40, 0.5 / 30, 10 / 320, 10 / 240]))
    )


def test_tf_same_padding_is_asymmetric_at_stride_two():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    padded = faces._pad_same(x, 2)
    assert padded.shape[-2:] == (5, 5) and padded[0, 0, 0, 0] == 0 and padded[0, 0, 4].abs().sum() == 0
    assert torch.equal(padded[0, 0, :4, :4], x[0, 0])  # nothing before, one row / column after
    assert faces._pad_same(torch.zeros(1, 1, 5, 5), 2).shape[-2:] == (7, 7)  # odd side: one each side


def test_the_expression_net_gives_probabilities_then_its_embedding():
    net, _ = faces.load("face_expression")
    x = (torch.rand(2, 3, 112, 112) - torch.tensor(faces.EXPRESSION_PREPROCESS.mean).view(1, 3, 1, 1)).float()
    with torch.inference_mode():
        out = net(x)
    assert out.shape == (2, 263)
    assert torch.allclose(out[:, :7].sum(1), torch.ones(2)) and (out[:, 7:] >= 0).all()


def test_specs_name_the_shipped_networks_and_refuse_misuse():
    b = create_backbone("regions:imgsent:faces_rfb320+imgsent:face_expression+k=3+min=0.9", random_weights=True)
    assert b.key == "regions:imgsent:faces_rfb320+imgsent:face_expression+k=3+min=0.9" and b.dim == 263
    assert b.files == []  # nothing local: the model travels as it is
    o = create_backbone("objects:imgsent:faces_rfb320", random_weights=True)
    assert o.dim == 6 and o.columns[1] == "max_score:face"
    with pytest.raises(ImgsentError, match="is a detector: use objects:imgsent:faces_rfb320"):
        create_backbone("imgsent:faces_rfb320")
    with pytest.raises(ImgsentError, match="ships no network named 'nope'"):
        create_backbone("imgsent:nope")
    with pytest.raises(ImgsentError, match="imgsent ships the detectors"):
        create_backbone("objects:imgsent:face_expression")


def test_a_regions_view_with_k_below_the_crop_batch_runs_passes_of_k(tmp_path):
    from imgsent.objects import CROP_BATCH

    b = create_backbone("regions:imgsent:faces_rfb320+imgsent:face_expression+k=3", random_weights=True)
    assert b.module.crop_batch == 3 < CROP_BATCH
    big = create_backbone("regions:imgsent:faces_rfb320+imgsent:face_expression+k=12", random_weights=True)
    assert big.module.crop_batch == CROP_BATCH


def test_models_says_where_the_face_files_come_from(capsys, monkeypatch):
    code, out, _ = run_cli(["models"], capsys, monkeypatch)
    assert code in (0, None)
    assert "face_models" in out and "Ultra-Light-Fast-Generic-Face-Detector-1MB" in out and "face-api.js" in out


def test_the_converter_reads_tfjs_weights_quantised_and_float(tmp_path):
    sys.path.insert(0, str(faces.__file__).rsplit("/imgsent/", 1)[0] + "/bench")
    try:
        import convert_face_nets as conv
    finally:
        sys.path.pop(0)
    q = np.array([0, 1, 255, 7], dtype=np.uint8)
    f = np.array([1.5, -2.0], dtype=np.float32)
    manifest = [
        {
            "paths": ["s1", "s2"],
            "weights": [
                {
                    "name": "a",
                    "shape": [2, 2],
                    "dtype": "float32",
                    "quantization": {"dtype": "uint8", "scale": 0.5, "min": -1},
                },
                {"name": "b", "shape": [2], "dtype": "float32"},
            ],
        }
    ]
    blob = q.tobytes() + f.tobytes()
    out = conv.read_tfjs(manifest, {"s1": blob[:3], "s2": blob[3:]})
    np.testing.assert_array_equal(out["a"], np.array([[-1, -0.5], [126.5, 2.5]], dtype=np.float32))
    np.testing.assert_array_equal(out["b"], f)
    with pytest.raises(SystemExit, match="manifest names"):
        conv.read_tfjs(manifest, {"s1": blob, "s2": b"\0"})


@needs_shared_faces
@pytest.mark.shared
def test_same_outputs_as_an_independent_conversion():
    """../shared holds the same upstream networks converted by other code (TorchScript): the RFB-640
    detector finds the same faces, and the expression net's outputs agree within 1e-5."""
    import torchvision  # noqa: F401  (registers torchvision::nms for the TorchScript detector)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        ref_det = torch.jit.load(str(SHARED_MODELS / "faces_rfb640.pt"))
        ref_expr = torch.jit.load(str(SHARED_MODELS / "face_expression.pt"))
    expr, _ = faces.load("face_expression")
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 112, 112, generator=g) - 0.45
    with torch.inference_mode():
        assert torch.allclose(ref_expr(x), expr(x), atol=1e-5, rtol=0)
    pp = json.loads((SHARED_MODELS / "face_expression.pt.json").read_text())
    assert np.allclose(pp["mean"], faces.EXPRESSION_PREPROCESS.mean) and tuple(pp["input_size"]) == (112, 112)
    det, _ = faces.load("faces_rfb640")
    images = sorted((SHARED / "data" / "twitter_i" / "images").glob("*.jpg"))[:25]
    if not images:
        pytest.skip("../shared/data/twitter_i is absent")
    from PIL import Image

    found = 0
    for path in images:
        arr = np.asarray(Image.open(path).convert("RGB"))
        image = torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 255
        with torch.inference_mode():
            ref, mine = ref_det([image])[1][0], det([image])[1][0]
        assert len(ref["scores"]) == len(mine["scores"]), path.name
        assert torch.allclose(ref["boxes"], mine["boxes"], atol=1e-3) and torch.allclose(
            ref["scores"], mine["scores"], atol=1e-5
        )
        found += int((mine["scores"] >= 0.9).sum())
    assert found > 0  # tweet photos show faces: the comparison compared something


def test_imgsent_faces_module_is_reachable_from_the_package():
    assert imgsent.faces is faces
