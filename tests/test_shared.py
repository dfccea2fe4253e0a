"""Integration tests on the real weights and data in ../shared (skipped, with the reason, when absent)."""

import numpy as np
import pytest
import torch
from conftest import DEFAULT_SPEC, SHARED_TORCHSCRIPT, SHARED_WEIGHTS, TWITTER, needs_shared_weights, needs_twitter
from PIL import Image

import imgsent


def _twitter_subset(tmp_path, n, agree="five"):
    """The first n images of a Twitter I subset (sorted names), linked into a folder, and their labels."""
    lines = (TWITTER / "ground_truth" / f"twitter_{agree}_agrees.txt").read_text().split("\n")
    rows = sorted(ln.split() for ln in lines if ln.strip())[:n]
    d = tmp_path / "tw"
    d.mkdir()
    for name, _ in rows:
        (d / name).symlink_to(TWITTER / "images" / name)
    lab = tmp_path / "labels.txt"
    lab.write_text("".join(f"{name} {y}\n" for name, y in rows))
    return d, lab


@needs_twitter
def test_extract_equals_direct_torchvision_forward(tmp_path):
    from safetensors.torch import load_file
    from torchvision.models import mobilenet_v2
    from torchvision.models.quantization import MobileNet_V2_QuantizedWeights

    d, _ = _twitter_subset(tmp_path, 6)
    store = str(tmp_path / "store")
    imgsent.extract([str(d)], store, backbones=[f"{DEFAULT_SPEC}@{SHARED_WEIGHTS}"], workers=0)
    fs = imgsent.features.load(store)
    net = mobilenet_v2()
    net.load_state_dict(load_file(str(SHARED_WEIGHTS)))
    net.classifier = torch.nn.Identity()
    net.eval()
    tf = MobileNet_V2_QuantizedWeights.IMAGENET1K_QNNPACK_V1.transforms()
    for i, image_id in enumerate(fs.ids):
        with Image.open(d / image_id) as im:
            x = tf(im.convert("RGB"))[None]
        with torch.no_grad():
            ref = net(x)[0].numpy()
        np.testing.assert_allclose(fs.X[i], ref, atol=1e-4, rtol=0)


@needs_shared_weights
def test_default_backbone_weights_from_environment_and_cache(monkeypatch, tmp_path):
    from imgsent.backbones import create_backbone

    explicit = create_backbone(f"{DEFAULT_SPEC}@{SHARED_WEIGHTS}")
    monkeypatch.setenv("IMGSENT_WEIGHTS", str(SHARED_WEIGHTS))
    assert create_backbone(DEFAULT_SPEC).fingerprint == explicit.fingerprint
    monkeypatch.delenv("IMGSENT_WEIGHTS")
    cache = tmp_path / "imgsent-home" / "weights"
    cache.mkdir(parents=True)
    (cache / "mobilenet_v2.IMAGENET1K_QNNPACK_V1.float32.safetensors").symlink_to(SHARED_WEIGHTS)
    assert create_backbone(DEFAULT_SPEC).fingerprint == explicit.fingerprint


@needs_shared_weights
def test_offline_without_weights_says_how_to_supply_them(tmp_path):
    with pytest.raises(imgsent.ImgsentError, match="IMGSENT_WEIGHTS"):
        imgsent.create_backbone(DEFAULT_SPEC)


@pytest.mark.skipif(not SHARED_TORCHSCRIPT.is_file(), reason="shared TorchScript model absent (../shared)")
@needs_twitter
def test_quantized_torchscript_backbone_agrees_with_float_weights(tmp_path):
    d, _ = _twitter_subset(tmp_path, 8)
    store = str(tmp_path / "store")
    imgsent.extract(
        [str(d)],
        store,
        backbones=[
            f"torchscript:{SHARED_TORCHSCRIPT}",
            f"torchvision:mobilenet_v2.IMAGENET1K_QNNPACK_V1:probs@{SHARED_WEIGHTS}",
        ],
        workers=0,
    )
    fs = imgsent.features.load(store)
    logits, probs = fs.X[:, :1000], fs.X[:, 1000:]
    assert (logits.argmax(1) == probs.argmax(1)).mean() >= 0.75


@needs_twitter
def test_twitter_subset_accuracy_well_above_chance(tmp_path):
    d, lab = _twitter_subset(tmp_path, 240)
    store = str(tmp_path / "store")
    imgsent.extract([str(d)], store, backbones=[f"{DEFAULT_SPEC}@{SHARED_WEIGHTS}"], workers=1)
    r = imgsent.evaluate(store, labels=str(lab), heads=["nn", "moe1"], splits=3, epochs=10)
    for res in r.results:
        acc, _ = res.mean_std("accuracy")
        assert acc >= 0.75, (res.head, acc)  # majority class is about 0.66


@needs_twitter
def test_default_model_scores_twitter_like_evaluate_predictions(tmp_path, monkeypatch):
    monkeypatch.setenv("IMGSENT_WEIGHTS", str(SHARED_WEIGHTS))
    d, lab = _twitter_subset(tmp_path, 40)
    out = tmp_path / "s.parquet"
    store = str(tmp_path / "kept")
    s = imgsent.score([str(d)], str(out), keep_features=store, workers=0)
    assert s.total == 40 and s.errors == 0
    import polars as pl

    df = pl.read_parquet(out)
    model = imgsent.load_model(imgsent.models.default_model_path())
    fs = imgsent.features.load(store)
    np.testing.assert_allclose(df["p_positive"].to_numpy(), model.predict_proba(fs)[:, 1], rtol=1e-6, atol=1e-7)
    truth = dict(line.split() for line in lab.read_text().splitlines())
    acc = np.mean([(lbl == "positive") == (truth[i] == "1") for i, lbl in zip(df["id"], df["label"])])
    assert acc >= 0.8  # these images are in its training set; a sanity floor, not a benchmark
