"""int8 backbones (``--precision int8``): torchvision's official quantized weights run natively on the
CPU; models without them stay float32; numerics recorded, matched and refused like bf16's."""

import warnings

import numpy as np
import pytest
import torch
from conftest import SHARED_TORCHSCRIPT, SHARED_WEIGHTS, TINY, write_images

import imgsent
from imgsent.backbones import create_backbone, probe_image
from imgsent.errors import ImgsentError, ImgsentWarning

# the models these tests train (a few epochs on generated images) are throwaway: what they learn is not the point
pytestmark = pytest.mark.filterwarnings("ignore::imgsent.errors.UselessModelWarning")

MNV2 = "torchvision:mobilenet_v2.IMAGENET1K_QNNPACK_V1"
KW = {"random_weights": True, "workers": 0, "batch_size": 4}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("int8") / "imgs"
    write_images(d, 8, size=(120, 90))
    return d


def test_an_int8_backbone_is_quantized_cpu_only_and_batch_independent(images, tmp_path):
    bb = create_backbone(MNV2, random_weights=True, int8=True)
    assert bb.int8 and bb.quantized and bb.dim == 1280 and bb.recipe()["numerics"] == "int8"
    assert any(str(m.__class__.__module__).startswith("torch.ao.nn.quantized") for m in bb.module.modules())
    assert create_backbone(MNV2, random_weights=True).fingerprint != bb.fingerprint  # other weights, other numbers
    stores = []
    for batch in (8, 3):
        out = str(tmp_path / f"b{batch}")
        imgsent.extract([str(images)], out, backbones=[MNV2], precision="int8", **{**KW, "batch_size": batch})
        stores.append(imgsent.features.load(out))
    assert stores[0].header["numerics"] == "int8" and np.isfinite(stores[0].X).all()
    np.testing.assert_array_equal(stores[0].X, stores[1].X)


def test_convolutional_networks_without_official_weights_get_a_deterministic_post_training_int8(images, tmp_path):
    from imgsent.quantized import CALIBRATION, calibration_images

    a = create_backbone(TINY, random_weights=True, int8=True)
    b = create_backbone(TINY, random_weights=True, int8=True)
    assert a.int8 == CALIBRATION and a.quantized and a.recipe()["int8"]["images"] == 64
    assert a.fingerprint == b.fingerprint  # same calibration, same quantized weights and scales
    assert a.fingerprint != create_backbone(TINY, random_weights=True).fingerprint
    cal = calibration_images(4, 32, 48, seed=0)
    assert cal.dtype == torch.uint8 and cal.shape == (4, 3, 32, 48) and torch.equal(cal, calibration_images(4, 32, 48))
    assert 60 < cal.float().mean() < 200 and cal.float().std() > 20  # mid-grey photos with contrast
    stores = []
    for batch in (8, 3):
        out = str(tmp_path / f"b{batch}")
        imgsent.extract([str(images)], out, backbones=[TINY], precision="int8", **{**KW, "batch_size": batch})
        stores.append(imgsent.features.load(out).X)
    np.testing.assert_array_equal(stores[0], stores[1])


def test_transformers_and_torchscript_stay_float32_and_say_so(tmp_path):
    with pytest.warns(ImgsentWarning, match="stays float32 under int8: not a convolutional network"):
        bb = create_backbone("timm:test_vit", random_weights=True, int8=True)
    assert not bb.int8 and "numerics" not in bb.recipe()
    path = tmp_path / "net.pt"
    torch.jit.script(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1))).save(str(path))
    with pytest.warns(ImgsentWarning, match="TorchScript file cannot be re-quantized"):
        assert not create_backbone(f"torchscript:{path}", int8=True).int8
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")  # torchvision:resnet18 has official int8 weights: no warning
        bb = create_backbone("torchvision:resnet18", random_weights=True, int8=True)
    assert bb.int8 and bb.dim == 512 and not [w for w in seen if issubclass(w.category, ImgsentWarning)]


def test_heads_keep_to_int8_or_float_features(images, tmp_path):
    fp32, int8 = str(tmp_path / "fp32"), str(tmp_path / "int8")
    imgsent.extract([str(images)], fp32, backbones=[MNV2], **KW)
    imgsent.extract([str(images)], int8, backbones=[MNV2], precision="int8", **KW)
    with pytest.raises(ImgsentError, match="different settings"):
        imgsent.extract([str(images)], int8, backbones=[MNV2], **KW)  # a float run into an int8 store
    labels = tmp_path / "labels.txt"
    labels.write_text("".join(f"img{i:03d}.jpg {i % 2}\n" for i in range(8)))
    model = str(tmp_path / "model")
    assert imgsent.train(fp32, labels=str(labels), head="nn", epochs=1, cv=0, out=model).numerics == "fp32"
    with pytest.raises(ImgsentError, match="holds int8 features"):
        imgsent.score(features=int8, out=str(tmp_path / "x.csv"), model=model)
    imgsent.score(features=int8, out=str(tmp_path / "x.csv"), model=model, precision="int8")  # told: accepted
    int8_model = str(tmp_path / "int8_model")
    imgsent.train(int8, labels=str(labels), head="nn", epochs=1, cv=0, out=int8_model)
    # Scoring images with an int8-trained model builds int8 backbones: the same scores as its store.
    imgsent.score([str(images)], str(tmp_path / "img.csv"), model=int8_model, **{k: KW[k] for k in ("workers",)})
    imgsent.score(features=int8, out=str(tmp_path / "store.csv"), model=int8_model)
    import polars as pl

    a, b = pl.read_csv(tmp_path / "img.csv"), pl.read_csv(tmp_path / "store.csv")
    np.testing.assert_array_equal(a["p_positive"].to_numpy(), b["p_positive"].to_numpy())


@pytest.mark.skipif(
    not SHARED_TORCHSCRIPT.is_file(), reason=f"the int8 MobileNetV2 TorchScript is not at {SHARED_TORCHSCRIPT}"
)
def test_the_official_int8_mobilenet_v2_is_read_from_its_traced_file_exactly():
    traced = torch.jit.load(str(SHARED_TORCHSCRIPT))
    probs = create_backbone(f"{MNV2}:probs@{SHARED_TORCHSCRIPT}", int8=True)
    noise = torch.rand(3, 3, 224, 224, generator=torch.Generator().manual_seed(0)) * 4 - 2
    x = torch.cat([probe_image(probs.preprocess), noise])
    with torch.inference_mode():
        ours = probs(x)
        theirs = torch.softmax(torch.cat([traced(x[i : i + 1]) for i in range(len(x))]), dim=1)
    # The same int8 network, other kernels: the probe image agrees to rounding. Noise images spread
    # their probability over near-tied classes, where the quantized engines' rounding (x86 here,
    # qnnpack when the file was traced) moves a probability by up to ~0.02 and can swap the top two
    # (measured over 8 noise seeds on an x86 Xeon): close on the whole, not equal.
    assert ours[0].argmax() == theirs[0].argmax()
    torch.testing.assert_close(ours[:1], theirs[:1], atol=2e-3, rtol=0)
    assert (ours[1:] - theirs[1:]).abs().max() < 0.05 and (ours[1:] - theirs[1:]).abs().mean() < 1e-3
    if SHARED_WEIGHTS.is_file():  # and close to the float network made from the same checkpoint
        float_bb = create_backbone(f"{MNV2}@{SHARED_WEIGHTS}")
        int8_bb = create_backbone(f"{MNV2}@{SHARED_TORCHSCRIPT}", int8=True)
        with torch.inference_mode():
            a, b = float_bb(x[:1]), int8_bb(x[:1])
            assert (
                torch.nn.functional.cosine_similarity(a, b).item() > 0.9
            )  # 0.947 on the probe; photos 0.989 on average


def test_int8_weights_that_are_not_int8_weights_are_one_clear_error(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ImgsentError, match="int8 weights of mobilenet_v2"):
        create_backbone(f"{MNV2}@{bad}", int8=True)


def test_tensorflow_same_padding_networks_get_int8_too():
    """EfficientNet-Lite (the default model's family) pads 'same' from each input's shape, which FX
    cannot trace: the padding is fixed for the backbone's input size first, with the same numbers."""
    import copy

    from imgsent.quantized import static_same_padding

    bb = create_backbone("timm:tf_efficientnet_lite0", random_weights=True)
    x = torch.randn(2, 3, *bb.preprocess.input_size, generator=torch.Generator().manual_seed(0))
    fixed = static_same_padding(copy.deepcopy(bb.module), x[:1])
    assert not any(type(m).__name__ == "Conv2dSame" for m in fixed.modules())
    with torch.inference_mode():
        torch.testing.assert_close(fixed(x), bb.module(x), rtol=0, atol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ImgsentWarning)  # no "stays float32" warning
        q = create_backbone("timm:tf_efficientnet_lite0", random_weights=True, int8=True)
    assert q.int8 is not None and q.quantized and q.dim == bb.dim
