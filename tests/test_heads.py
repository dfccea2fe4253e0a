import json

import numpy as np
import pytest
import torch

from imgsent.errors import ImgsentError
from imgsent.heads import BlockNorm, MoEHead, NNHead
from imgsent.training import TrainConfig, fit, load_model


def test_moe_forward_matches_hand_computation():
    torch.manual_seed(0)
    head = MoEHead(in_dim=3, n_classes=2, hidden=4, dropout=0.0, experts=2).eval()
    x = torch.randn(5, 3)
    with torch.no_grad():
        out = head(x)
        i = torch.relu(head.embed[0](x))  # Linear -> Dropout (off) -> ReLU
        e = head.expert(i).view(5, 2, 2)
        g = head.gate(i).view(5, 2, 3)
    for n in range(5):
        for c in range(2):
            gate = np.exp(g[n, c].numpy()) / np.exp(g[n, c].numpy()).sum()  # 3 logits: 2 experts + dummy
            sig = 1 / (1 + np.exp(-e[n, c].numpy()))
            expected = sig[0] * gate[0] + sig[1] * gate[1] + 0.0 * gate[2]
            assert out[n, c].item() == pytest.approx(expected, rel=1e-5)
    assert (out < 1).all() and (out > 0).all()


@pytest.mark.parametrize("classes", [2, 8])
def test_head_shapes(classes):
    x = torch.randn(7, 30)
    assert NNHead(30, classes)(x).shape == (7, classes)
    moe = MoEHead(30, classes, experts=3)
    assert moe(x).shape == (7, classes)
    p = moe.proba(moe(x))
    assert torch.allclose(p.sum(1), torch.ones(7), atol=1e-5)


def test_block_norm_normalises_each_block():
    x = torch.tensor([[3.0, 4.0, 1.0, 0.0, 0.0]])
    y = BlockNorm([2, 3])(x)
    assert torch.allclose(y, torch.tensor([[0.6, 0.8, 1.0, 0.0, 0.0]]))


def _separable(n=300, d=16, classes=2, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 3, size=(classes, d))
    y = rng.integers(0, classes, n)
    X = (centers[y] + rng.normal(0, 0.5, size=(n, d))).astype(np.float32)
    return X, y


@pytest.mark.parametrize("head", ["nn", "moe1", "moe2"])
def test_separable_problem_is_learned(head):
    X, y = _separable()
    m = fit(X, y, ["negative", "positive"], [("a", 8), ("b", 8)], TrainConfig.named(head, lr=1e-2, epochs=30))
    assert (m.predict_proba(X).argmax(1) == y).mean() >= 0.99


def test_eight_classes_learned():
    X, y = _separable(n=400, classes=8)
    m = fit(X, y, [f"c{i}" for i in range(8)], [("a", 16)], TrainConfig.named("nn", lr=1e-2, epochs=30))
    assert (m.predict_proba(X).argmax(1) == y).mean() >= 0.95


def test_same_seed_same_model_other_seed_differs():
    X, y = _separable()
    cfg = TrainConfig.named("nn", epochs=2)
    a = fit(X, y, ["n", "p"], [("a", 16)], cfg).predict_proba(X)
    b = fit(X, y, ["n", "p"], [("a", 16)], cfg).predict_proba(X)
    c = fit(X, y, ["n", "p"], [("a", 16)], TrainConfig.named("nn", epochs=2, seed=1)).predict_proba(X)
    assert np.array_equal(a, b) and not np.allclose(a, c)


def test_paper_defaults():
    nn_cfg = TrainConfig.named("nn").resolved()
    assert (nn_cfg.epochs, nn_cfg.lr, nn_cfg.batch_size, nn_cfg.dropout, nn_cfg.normalize_blocks) == (
        20,
        1e-4,
        8,
        0.4,
        True,
    )
    moe = TrainConfig.named("moe").resolved()
    assert (moe.epochs, moe.batch_size, moe.weight_decay, moe.lr_step, moe.normalize_blocks) == (
        120,
        256,
        1e-3,
        40,
        False,
    )
    moe2 = TrainConfig.named("moe2").resolved()
    assert (moe2.epochs, moe2.lr_step) == (60, 20)
    with pytest.raises(ImgsentError):
        TrainConfig.named("svm").resolved()


def test_bundle_round_trip_and_tamper_detection(tmp_path):
    X, y = _separable()
    m = fit(
        X,
        y,
        ["negative", "positive"],
        [("a", 8), ("b", 8)],
        TrainConfig.named("moe1", epochs=3),
        recipes=[{"key": "a"}, {"key": "b"}],
    )
    m.save(str(tmp_path / "m"))
    m2 = load_model(str(tmp_path / "m"))
    assert np.array_equal(m.predict_proba(X), m2.predict_proba(X))
    meta = json.loads((tmp_path / "m" / "model.json").read_text())
    assert meta["head"]["kind"] == "moe" and meta["classes"] == ["negative", "positive"]
    assert [b["key"] for b in meta["features"]["blocks"]] == ["a", "b"]

    def tampered(change):
        d = json.loads(json.dumps(meta))
        change(d)
        (tmp_path / "m" / "model.json").write_text(json.dumps(d))
        with pytest.raises(ImgsentError):
            load_model(str(tmp_path / "m"))

    tampered(lambda d: d.pop("classes"))
    tampered(lambda d: d["features"]["blocks"][0].update(dim=9))  # wrong dims vs weights
    tampered(lambda d: d["features"]["blocks"][0].update(dim="8"))
    tampered(lambda d: d["head"]["params"].update(hidden=10**9))
    tampered(lambda d: d.update(format_version=999))
    (tmp_path / "m" / "model.json").write_text("{")
    with pytest.raises(ImgsentError, match="not valid JSON"):
        load_model(str(tmp_path / "m"))
    with pytest.raises(ImgsentError, match="not a model directory"):
        load_model(str(tmp_path / "nothing"))


@pytest.mark.parametrize("head", ["nn", "moe1"])
def test_a_rows_probabilities_do_not_depend_on_its_batch(head):
    """Scoring images batch by batch and their store at once must give identical numbers."""
    rng = np.random.default_rng(3)
    X = np.abs(rng.normal(size=(2500, 16))).astype(np.float32)
    y = (X[:, 0] > X[:, 1]).astype(np.int64)
    m = fit(X, y, ["negative", "positive"], [("a", 8), ("b", 8)], TrainConfig.named(head, epochs=1))
    whole = m.predict_proba(X)
    cuts = [0, 1, 8, 700, 1023, 1024, 2049, 2500]
    pieces = np.concatenate([m.predict_proba(X[a:b]) for a, b in zip(cuts, cuts[1:])])
    assert np.array_equal(whole, pieces)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert np.array_equal(m.predict_proba(X), whole)
    finally:
        torch.set_num_threads(before)
    bf16 = m.predict_proba(X, "bf16")
    np.testing.assert_allclose(bf16, whole, atol=0.03)
    with pytest.raises(ImgsentError, match="precision"):
        m.predict_proba(X, "fp8")
