"""Frozen CPU graphs cached on disk (imgsent.graphcache): later runs load them instead of tracing,
build no network for a model whose graphs are cached, and give identical numbers."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch
from conftest import TINY, TINY2, labelled_images, write_images

import imgsent
import imgsent.backbones
import imgsent.models
from imgsent.errors import ImgsentError

# the models these tests train (a few epochs on generated images) are throwaway: what they learn is not the point
pytestmark = pytest.mark.filterwarnings("ignore::imgsent.errors.UselessModelWarning")

KW = dict(runtime="torch", random_weights=True, workers=0, batch_size=8)


def _graphs() -> list[str]:
    folder = os.path.join(os.environ["IMGSENT_HOME"], "compiled")
    return sorted(os.listdir(folder)) if os.path.isdir(folder) else []


@pytest.fixture
def trained(tmp_path):
    images, labels = labelled_images(tmp_path, 12)
    store, model = str(tmp_path / "s"), str(tmp_path / "m")
    imgsent.extract([str(images)], store, backbones=[TINY, TINY2], **KW)
    imgsent.train(store, labels=str(labels), head="nn", epochs=2, cv=0, out=model)
    return images, store, model


def test_a_second_run_loads_the_cached_graphs_and_builds_no_network(trained, tmp_path, monkeypatch):
    images, store, model = trained
    assert len(_graphs()) == 2  # the extraction traced and cached both backbones
    shutil.rmtree(os.path.join(os.environ["IMGSENT_HOME"], "compiled"))
    first = imgsent.score([str(images)], str(tmp_path / "a.csv"), model=model, workers=0, runtime="torch")

    def no_build(*a, **k):
        raise AssertionError("a network was built although its graph is cached")

    monkeypatch.setattr(imgsent.models, "create_backbone", no_build)
    second = imgsent.score([str(images)], str(tmp_path / "b.csv"), model=model, workers=0, runtime="torch")
    assert (tmp_path / "a.csv").read_text() == (tmp_path / "b.csv").read_text()
    assert "compiled graph" in second.details["weights"] and "compiled graph" not in first.details["weights"]
    # the store's own features (traced in the extraction) and the cached graphs' agree exactly
    s = imgsent.score(out=str(tmp_path / "c.csv"), model=model, features=store, runtime="torch")
    assert s.errors == 0 and (tmp_path / "c.csv").read_text() == (tmp_path / "a.csv").read_text()


def test_cached_and_freshly_traced_graphs_give_identical_features(tmp_path):
    write_images(tmp_path / "imgs", 10)
    imgsent.extract([str(tmp_path / "imgs")], str(tmp_path / "cold"), backbones=[TINY2], **KW)
    assert len(_graphs()) == 1
    imgsent.extract([str(tmp_path / "imgs")], str(tmp_path / "warm"), backbones=[TINY2], **KW)
    a, b = imgsent.features.load(str(tmp_path / "cold")), imgsent.features.load(str(tmp_path / "warm"))
    np.testing.assert_array_equal(a.X, b.X)


def test_an_unreadable_cached_graph_is_rebuilt(tmp_path):
    write_images(tmp_path / "imgs", 4)
    imgsent.extract([str(tmp_path / "imgs")], str(tmp_path / "a"), backbones=[TINY], **KW)
    (path,) = _graphs()
    full = os.path.join(os.environ["IMGSENT_HOME"], "compiled", path)
    with open(full, "wb") as fh:
        fh.write(b"not a torchscript archive")
    imgsent.extract([str(tmp_path / "imgs")], str(tmp_path / "b"), backbones=[TINY], **KW)
    assert os.path.getsize(full) > 1000  # traced and written again
    a, b = imgsent.features.load(str(tmp_path / "a")), imgsent.features.load(str(tmp_path / "b"))
    np.testing.assert_array_equal(a.X, b.X)


class _Other(torch.nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3)).repeat(1, self.dim)[:, : self.dim] + 1.0


def test_a_cached_graph_that_gives_other_features_is_removed(trained, tmp_path):
    images, store, model = trained
    before = (
        tmp_path / "before.csv",
        imgsent.score([str(images)], str(tmp_path / "before.csv"), model=model, workers=0, runtime="torch"),
    )
    folder = os.path.join(os.environ["IMGSENT_HOME"], "compiled")
    for name in _graphs():  # same keys, other numbers: the check against the recipe's probe fails
        torch.jit.save(torch.jit.script(_Other(96)), os.path.join(folder, name))
    with pytest.raises(ImgsentError, match="does not give its recipe's features; it was removed"):
        imgsent.score([str(images)], str(tmp_path / "x.csv"), model=model, workers=0, runtime="torch")
    assert _graphs() == []  # both were checked (side by side, one lane each) and removed
    for name in _graphs():
        os.remove(os.path.join(folder, name))
    # an extraction (which has the network at hand) checks a cached graph against it and retraces
    for name in ("a", "b"):
        imgsent.extract([str(images)], str(tmp_path / name), backbones=[TINY], **KW)
        if name == "a":
            (graph,) = _graphs()
            torch.jit.save(torch.jit.script(_Other(96)), os.path.join(folder, graph))
    a, b = imgsent.features.load(str(tmp_path / "a")), imgsent.features.load(str(tmp_path / "b"))
    np.testing.assert_array_equal(a.X, b.X)
    after = imgsent.score([str(images)], str(tmp_path / "after.csv"), model=model, workers=0, runtime="torch")
    assert after.errors == before[1].errors == 0
    assert (tmp_path / "after.csv").read_text() == before[0].read_text()


def test_other_engine_settings_build_the_network_as_before(trained, tmp_path, monkeypatch):
    images, store, model = trained
    imgsent.score([str(images)], str(tmp_path / "a.csv"), model=model, workers=0, runtime="torch")
    built = []
    real = imgsent.models.create_backbone
    monkeypatch.setattr(imgsent.models, "create_backbone", lambda *a, **k: built.append(a) or real(*a, **k))
    imgsent.score([str(images)], str(tmp_path / "b.csv"), model=model, workers=0, runtime="torch", precision="int8")
    assert len(built) == 2  # int8 backbones are other networks: built, not read from the float graphs
