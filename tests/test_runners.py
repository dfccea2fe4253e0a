"""The runtime seam (imgsent/runners.py, imgsent/engineplan.py): a plan resolved once, one runner
per backbone, and a new runtime as one module the engine runs without knowing it."""

from __future__ import annotations

import dataclasses
import pickle
import types
import warnings

import numpy as np
import pytest
import torch
from conftest import TINY, TINY2, write_images

import imgsent
from imgsent import runners
from imgsent.backbones import create_backbone
from imgsent.engine import FeatureEngine
from imgsent.engineplan import EnginePlan, plan_engine
from imgsent.errors import ImgsentError
from imgsent.options import CPU_MODEL_BATCH, RunOptions
from imgsent.shards import manifest_paths, read_manifest


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("IMGSENT_HOME", str(tmp_path / "home"))


class _Doubled(runners.Runner):
    """A runner of a made-up runtime: the torch network, its output times two (so that its
    features are told apart from torch's)."""

    runtime = "doubled"

    def __init__(self, bb, plan):
        super().__init__(bb, plan, bb.module, torch.device("cpu"))
        self.calls = 0

    def __call__(self, x):
        self.calls += 1
        return 2 * self.backbone.run(self.module, x)


def _doubled_runtime(takes: str):
    """A runtime module as :data:`imgsent.runners.RUNTIMES` names them, taking backbones of key ``takes``."""
    return types.SimpleNamespace(
        NAME="doubled",
        applies_to=lambda plan: plan.runtime != "torch",
        runs_there=lambda bb: bb.key == takes,
        runner=lambda bb, plan: _Doubled(bb, plan),
    )


@pytest.fixture
def doubled(monkeypatch):
    fake = _doubled_runtime(TINY)
    monkeypatch.setattr(runners, "RUNTIMES", ("doubled",))
    monkeypatch.setattr(runners, "_runtime", lambda name: fake)
    return fake


def test_a_new_runtime_is_one_module_the_engine_runs_without_a_branch(doubled, tmp_path):
    write_images(tmp_path / "imgs", 5)
    refs = imgsent.inputs.find_images([str(tmp_path / "imgs")])
    backbones = [create_backbone(TINY, random_weights=True), create_backbone(TINY2, random_weights=True)]
    engine = FeatureEngine(backbones, device="cpu", workers=0, batch_size=4)
    assert engine.runtimes == ["doubled", "torch"] and engine.runtime_record() == {TINY: "doubled"}
    plain = FeatureEngine(backbones, device="cpu", workers=0, batch_size=4, runtime="torch")
    assert plain.runtimes == ["torch", "torch"]
    got = np.concatenate([b.features[TINY] for b in engine.run(refs)])
    want = np.concatenate([b.features[TINY] for b in plain.run(refs)])
    np.testing.assert_allclose(got, 2 * want, rtol=1e-4, atol=1e-5)
    assert engine.runners[0].calls == 2  # passes of model_batch (8): 4 images a batch, two batches
    other = np.concatenate([b.features[TINY2] for b in engine.run(refs)])
    np.testing.assert_array_equal(other, np.concatenate([b.features[TINY2] for b in plain.run(refs)]))


def test_a_store_records_the_new_runtime_and_resumes_on_it(doubled, tmp_path):
    write_images(tmp_path / "imgs", 6)
    out = tmp_path / "store"
    kw = dict(backbones=[TINY], random_weights=True, workers=0, batch_size=2, rows_per_shard=2)
    imgsent.extract([str(tmp_path / "imgs")], str(out), **kw)
    assert read_manifest(manifest_paths(str(out))[0])["header"]["runtimes"] == {TINY: "doubled"}
    imgsent.extract([str(tmp_path / "imgs")], str(tmp_path / "torch"), runtime="torch", **kw)
    first, plain = imgsent.features.load(str(out)), imgsent.features.load(str(tmp_path / "torch"))
    assert first.ids == plain.ids and len(first.ids) == 6
    np.testing.assert_allclose(first.X, 2 * plain.X, rtol=1e-4, atol=1e-5)
    # a resumed run: the engine is asked for torch by default (auto) but adopts the store's runtime
    engine = FeatureEngine([create_backbone(TINY, random_weights=True)], device="cpu", workers=0, runtime="torch")
    engine.adopt_runtimes({TINY: "doubled"})
    assert engine.runtimes == ["doubled"]
    engine.adopt_runtimes({})
    assert engine.runtimes == ["torch"]
    with pytest.raises(ImgsentError, match="this store ran it on tensorrt, which it cannot use here"):
        engine.adopt_runtimes({TINY: "tensorrt"})


def test_an_auto_runtime_that_cannot_take_a_backbone_leaves_it_on_torch_with_a_warning(monkeypatch):
    def refuses(bb, plan):
        raise ImgsentError(f"{bb.key} does not export")

    fake = _doubled_runtime(TINY)
    fake.runner = refuses
    monkeypatch.setattr(runners, "RUNTIMES", ("doubled",))
    monkeypatch.setattr(runners, "_runtime", lambda name: fake)
    bb = create_backbone(TINY, random_weights=True)
    with pytest.warns(imgsent.errors.ImgsentWarning, match="does not export; it runs on torch"):
        assert FeatureEngine([bb], device="cpu", workers=0).runtimes == ["torch"]


def test_the_plan_is_resolved_once_as_plain_data():
    plan = plan_engine(RunOptions.build(None, device="cpu", workers=0))
    assert isinstance(plan, EnginePlan) and plan.device == "cpu" and plan.numerics == "fp32"
    assert plan.model_batch == CPU_MODEL_BATCH and plan.lanes == torch.get_num_threads() and not plan.overlap
    assert pickle.loads(pickle.dumps(plan)) == plan  # what a remote worker could be handed
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.lanes = 3
    assert plan.traces(torch.device("cpu")) and plan.runs_frozen(CPU_MODEL_BATCH)
    assert not dataclasses.replace(plan, compile=True).runs_frozen(CPU_MODEL_BATCH)
    engine = FeatureEngine([create_backbone(TINY, random_weights=True)], device="cpu", workers=0, lanes=1)
    assert engine.plan.lanes == engine.lanes == 1 and engine.plan.workers == 0
    with pytest.raises(ImgsentError, match="optimize must be one of"):
        plan_engine(RunOptions.build(None, device="cpu"), optimize="fast")


def test_what_a_backbone_is_decides_how_it_runs(tmp_path):
    """The runner reads what a backbone is (a view, quantized, a module traced for one image), not
    flags about how to run it: a TorchScript file traced for one image at a time is run image by
    image in a batch of four, with the features each image gets alone."""
    from imgsent.inputs import find_images

    class OneImage(torch.nn.Module):
        def forward(self, x):
            return x.mean(dim=(2, 3)).reshape(1, -1)  # a traced reshape that only takes one image

    path = tmp_path / "one.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's notice that tracing is deprecated
        torch.jit.trace(OneImage(), torch.rand(1, 3, 224, 224)).save(str(path))
    bb = create_backbone(f"torchscript:{path}")
    assert not bb.batchable and not bb.is_view and not bb.quantized and bb.dim == 3
    plan = plan_engine(RunOptions(device="cpu", batch_size=4, workers=0))
    assert runners.device_for(bb, plan).type == "cpu"
    write_images(tmp_path / "im", 5)
    refs = find_images([str(tmp_path / "im")])
    together = np.concatenate(
        [b.features[bb.key] for b in FeatureEngine([bb], device="cpu", batch_size=4, workers=0).run(refs)]
    )
    alone = np.concatenate(
        [b.features[bb.key] for b in FeatureEngine([bb], device="cpu", batch_size=1, workers=0).run(refs)]
    )
    assert together.shape == (5, 3) and np.isfinite(together).all()
    np.testing.assert_array_equal(together, alone)
