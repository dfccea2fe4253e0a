import json

import pytest
import torch
from conftest import TINY
from torch import nn

from imgsent.backbones import BackboneSpec, create_backbone, expand_presets, fingerprints_match, probe_image
from imgsent.errors import ImgsentError


def test_spec_parsing():
    s = BackboneSpec.parse("torchvision:mobilenet_v2.IMAGENET1K_V1:probs@/w/x.safetensors")
    assert (s.source, s.name, s.tag, s.output, s.weights) == (
        "torchvision",
        "mobilenet_v2",
        "IMAGENET1K_V1",
        "probs",
        "/w/x.safetensors",
    )
    assert s.key == "torchvision:mobilenet_v2.IMAGENET1K_V1:probs"
    assert BackboneSpec.parse("timm:vit_base_patch16_siglip_224.webli").tag == "webli"
    assert BackboneSpec.parse("torchscript:/a/b.c/model.pt").name == "/a/b.c/model.pt"
    for bad in ["resnet50", "nope:resnet50", "timm:", "timm:x@"]:
        with pytest.raises(ImgsentError):
            BackboneSpec.parse(bad)


def test_presets_expand_and_dedupe():
    specs = expand_presets(["indomain", "timm:efficientnet_b2.ra_in1k,clip"])
    assert specs[0] == "timm:efficientnet_b2.ra_in1k" and len(specs) == 3
    assert len(expand_presets(["paper", "indomain"])) == 5  # the paper's five views include the pair


def test_timm_backbone_features_and_probs():
    bb = create_backbone(TINY, random_weights=True)
    assert bb.dim == 96 and bb.preprocess.input_size == (160, 160)
    x = probe_image(bb.preprocess).repeat(2, 1, 1, 1)
    with torch.inference_mode():
        assert bb(x).shape == (2, 96)
    probs = create_backbone(TINY + ":probs", random_weights=True)
    with torch.inference_mode():
        p = probs(x)
    assert p.shape[1] == probs.dim and torch.allclose(p.sum(1), torch.ones(2), atol=1e-5)
    head = create_backbone(TINY + ":head", random_weights=True)  # the raw head: what :probs softmaxes
    assert head.key == TINY + ":head" and head.dim == probs.dim
    with torch.inference_mode():
        torch.testing.assert_close(torch.softmax(head(x), dim=1), p)


def test_random_weights_are_seeded():
    a = create_backbone(TINY, random_weights=True)
    b = create_backbone(TINY, random_weights=True)
    assert a.fingerprint == b.fingerprint


def test_torchvision_preprocessing_comes_from_weights_entry():
    bb = create_backbone("torchvision:mobilenet_v3_small", random_weights=True)
    assert bb.dim == 1024  # input of the last Linear
    assert bb.preprocess.resize_size == 256 and bb.preprocess.input_size == (224, 224)
    q = create_backbone("torchvision:mobilenet_v2.IMAGENET1K_QNNPACK_V1", random_weights=True)
    assert q.preprocess.resize_size == 256 and q.dim == 1280
    with pytest.raises(ImgsentError, match="no weights tag"):
        create_backbone("torchvision:mobilenet_v2.NOPE", random_weights=True)
    with pytest.raises(ImgsentError, match="no classification model"):
        create_backbone("torchvision:not_a_model", random_weights=True)


def test_local_weights_file_round_trip(tmp_path):
    from safetensors.torch import save_file

    a = create_backbone(TINY, random_weights=True, seed=1)
    import timm

    full = timm.create_model("test_resnet")
    torch.manual_seed(5)
    for p in full.parameters():
        p.data.normal_()
    save_file({k: v.contiguous() for k, v in full.state_dict().items()}, str(tmp_path / "w.safetensors"))
    b = create_backbone(f"{TINY}@{tmp_path / 'w.safetensors'}")
    assert b.fingerprint["sha256"] != a.fingerprint["sha256"] and not b.fingerprint["random"]
    torch.save(full.state_dict(), tmp_path / "w.pth")
    c = create_backbone(f"{TINY}@{tmp_path / 'w.pth'}")
    assert c.fingerprint["probe"] == b.fingerprint["probe"]


@pytest.mark.parametrize(
    "content,match",
    [(b"", "cannot read weights"), (b"garbage" * 10, "cannot read weights")],
)
def test_bad_weights_files_give_one_clear_error(tmp_path, content, match):
    p = tmp_path / "bad.safetensors"
    p.write_bytes(content)
    with pytest.raises(ImgsentError, match=match):
        create_backbone(f"{TINY}@{p}")
    with pytest.raises(ImgsentError, match="not found"):
        create_backbone(f"{TINY}@{tmp_path / 'missing.pth'}")


def test_weights_for_another_model_are_refused(tmp_path):
    from safetensors.torch import save_file

    save_file({"fc.weight": torch.zeros(3, 3)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ImgsentError, match="do not fit"):
        create_backbone(f"{TINY}@{tmp_path / 'other.safetensors'}")


def test_pretrained_download_failure_says_how_to_use_local_file():
    with pytest.raises(ImgsentError, match="@/path/to/weights"):
        create_backbone(TINY)


def test_torchscript_backbone_with_sidecar_preprocessing(tmp_path):
    net = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    path = tmp_path / "enc.pt"
    torch.jit.script(net).save(str(path))
    (tmp_path / "enc.pt.json").write_text(json.dumps({"input_size": [64, 64], "resize_size": 72}))
    bb = create_backbone(f"torchscript:{path}")
    assert bb.dim == 4 and bb.preprocess.input_size == (64, 64) and bb.preprocess.resize_size == 72
    with pytest.raises(ImgsentError, match="not found"):
        create_backbone(f"torchscript:{tmp_path / 'missing.pt'}")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(ImgsentError, match="cannot load TorchScript"):
        create_backbone(f"torchscript:{tmp_path / 'junk.pt'}")


def test_fingerprints_tolerate_rounding_only():
    fp = {"sha256": "a", "probe": [1.0, 2.0, 3.0], "probe_norm": 10.0}
    assert fingerprints_match(fp, {"sha256": "b", "probe": [1.0001, 2.0, 3.0], "probe_norm": 10.0})
    assert not fingerprints_match(fp, {"sha256": "b", "probe": [1.5, 2.0, 3.0], "probe_norm": 10.0})
    assert not fingerprints_match(fp, {})


def test_all_zero_probes_say_nothing_about_the_weights():
    from imgsent.backbones import fingerprints_match

    blank = {"probe": [0.0] * 4, "probe_norm": 0.0}
    assert not fingerprints_match({**blank, "sha256": "a"}, {**blank, "sha256": "b"})  # a detector that saw nothing
    assert fingerprints_match({**blank, "sha256": "a"}, {**blank, "sha256": "a"})
