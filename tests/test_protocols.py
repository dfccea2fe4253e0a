import numpy as np
import pytest

from imgsent.errors import ImgsentError
from imgsent.protocols import (
    _auc_binary,
    metrics,
    predefined_from_files,
    predefined_from_folders,
    random_splits,
    stratified_kfold,
    train_val_test,
)


def test_random_splits_sizes_and_no_leak():
    splits = random_splits(882, 5, 0.2, seed=0)
    assert len(splits) == 5
    for s in splits:
        assert len(s.test) == 176 and len(s.train) == 706
        assert not set(s.train) & set(s.test)
    assert not np.array_equal(splits[0].test, splits[1].test)
    again = random_splits(882, 5, 0.2, seed=0)
    assert all(np.array_equal(a.test, b.test) for a, b in zip(splits, again))


def test_kfold_is_stratified_and_covers_everything_once():
    y = np.array([0] * 30 + [1] * 70)
    folds = stratified_kfold(y, 5, seed=1)
    all_test = np.concatenate([f.test for f in folds])
    assert sorted(all_test.tolist()) == list(range(100))
    for f in folds:
        assert (y[f.test] == 0).sum() == 6 and not set(f.train) & set(f.test)


def test_train_val_test_fractions():
    (s,) = train_val_test(1000, (0.8, 0.15, 0.05), seed=0)
    assert (len(s.train), len(s.test), len(s.val)) == (800, 150, 50)
    assert len(set(s.train) | set(s.test) | set(s.val)) == 1000


def test_predefined_from_files_and_folders(tmp_path):
    ids = ["a.jpg", "b.jpg", "c.jpg", "d.jpg"]
    f = tmp_path / "test1.txt"
    f.write_text("a.jpg 1\nc.jpg 0\n")
    (s,) = predefined_from_files(ids, [str(f)])
    assert s.test.tolist() == [0, 2] and s.train.tolist() == [1, 3]
    (tmp_path / "none.txt").write_text("zzz.jpg\n")
    with pytest.raises(ImgsentError):
        predefined_from_files(ids, [str(tmp_path / "none.txt")])
    folds = predefined_from_folders(["partition1/x.jpg", "partition2/y.jpg", "partition1/z.jpg"])
    assert [f.test.tolist() for f in folds] == [[0, 2], [1]]
    (tt,) = predefined_from_folders(["train/pos/a.jpg", "test/neg/b.jpg"])
    assert tt.train.tolist() == [0] and tt.test.tolist() == [1]
    with pytest.raises(ImgsentError):
        predefined_from_folders(["x/a.jpg"])


def test_metrics_by_hand():
    y = np.array([0, 0, 1, 1, 1])
    proba = np.array([[0.9, 0.1], [0.4, 0.6], [0.3, 0.7], [0.8, 0.2], [0.1, 0.9]])
    m = metrics(y, proba)
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["confusion"] == [[1, 1], [1, 2]]
    assert m["balanced_accuracy"] == pytest.approx((1 / 2 + 2 / 3) / 2)
    f1_neg = 2 * 0.5 * 0.5 / 1.0
    f1_pos = 2 * (2 / 3) * (2 / 3) / (4 / 3)
    assert m["macro_f1"] == pytest.approx((f1_neg + f1_pos) / 2)
    # AUC: pairs (pos, neg) ranked correctly: pos scores .7,.2,.9 vs neg .1,.6 -> 5 of 6
    assert m["roc_auc"] == pytest.approx(5 / 6)
    assert _auc_binary(np.array([0, 1]), np.array([0.5, 0.5])) == 0.5


@pytest.mark.parametrize("n_classes", [2, 3, 5])
def test_hand_written_metrics_agree_with_scikit_learn(n_classes):
    skm = pytest.importorskip("sklearn.metrics", reason="scikit-learn is a test-only reference (pip install '.[test]')")
    rng = np.random.default_rng(n_classes)
    for trial in range(20):
        n = int(rng.integers(20, 200))
        y = rng.integers(0, n_classes, n)
        y[:n_classes] = np.arange(n_classes)  # every class present
        logits = rng.normal(size=(n, n_classes)) + 1.5 * np.eye(n_classes)[y] * rng.uniform(0, 1)
        if trial % 4 == 0:
            logits = np.round(logits, 1)  # ties in the scores
        proba = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
        m = metrics(y, proba)
        pred = proba.argmax(1)
        assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
        assert m["macro_f1"] == pytest.approx(skm.f1_score(y, pred, average="macro", zero_division=0))
        assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
        if n_classes == 2:
            ref_auc = skm.roc_auc_score(y, proba[:, 1])
        else:
            ref_auc = skm.roc_auc_score(y, proba, multi_class="ovr", average="macro")
        assert m["roc_auc"] == pytest.approx(ref_auc)
        np.testing.assert_array_equal(m["confusion"], skm.confusion_matrix(y, pred, labels=range(n_classes)))
