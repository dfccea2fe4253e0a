"""The GPU path, tested on the CPU: numerics recorded and matched, device and capability choices,
TorchScript device checks, non-finite features, decode and shared-memory limits."""

import numpy as np
import pytest
import torch
from conftest import TINY, write_images

import imgsent
import imgsent.engine
import imgsent.precision
from imgsent.backbones import Backbone, BackboneSpec
from imgsent.batches import FeatureBatch
from imgsent.decode import Preprocess
from imgsent.errors import ImgsentError
from imgsent.options import RunOptions

# the models these tests train (a few epochs on generated images) are throwaway: what they learn is not the point
pytestmark = pytest.mark.filterwarnings("ignore::imgsent.errors.UselessModelWarning")

KW = dict(backbones=[TINY], random_weights=True, workers=0, batch_size=4)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("gpu") / "imgs"
    write_images(d, 8)
    return d


def test_numerics_resolve_per_card(monkeypatch):
    asked = []

    def capability(device=None):
        asked.append(device)
        return capability.value

    monkeypatch.setattr(torch.cuda, "get_device_capability", capability)
    cuda1 = torch.device("cuda", 1)
    capability.value = (7, 5)  # Turing: no bf16 tensor cores, auto must not pick emulated bf16
    assert imgsent.precision.resolve_numerics(cuda1, "auto") == "fp16"
    capability.value = (9, 0)
    assert imgsent.precision.resolve_numerics(cuda1, "auto") == "bf16"
    assert asked == [cuda1, cuda1]  # the chosen card was asked, not the current one
    assert imgsent.precision.resolve_numerics(cuda1, "fp32") == "fp32"
    assert imgsent.precision.resolve_numerics(cuda1, "tf32") == "tf32"
    cpu = torch.device("cpu")
    assert [imgsent.precision.resolve_numerics(cpu, p) for p in ("auto", "fp32", "tf32", "bf16")] == [
        "fp32",
        "fp32",
        "fp32",
        "bf16",
    ]


def test_stores_record_numerics_and_never_mix_them(images, tmp_path):
    fp32, bf16 = str(tmp_path / "fp32"), str(tmp_path / "bf16")
    imgsent.extract([str(images)], fp32, **KW)
    imgsent.extract([str(images)], bf16, precision="bf16", **KW)
    assert "numerics" not in imgsent.features.load(fp32).header  # fp32 stores keep 0.1.0's header
    assert imgsent.features.load(bf16).header["numerics"] == "bf16"
    a, b = imgsent.features.load(fp32).X, imgsent.features.load(bf16).X
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cos.min() > 0.99 and not np.array_equal(a, b)  # close, not the same numbers
    with pytest.raises(ImgsentError, match="numerics"):
        imgsent.extract([str(images)], bf16, **KW)  # an fp32 run into a bf16 store


def test_models_keep_to_the_numerics_they_were_trained_on(images, tmp_path):
    fp32, bf16 = str(tmp_path / "fp32"), str(tmp_path / "bf16")
    imgsent.extract([str(images)], fp32, **KW)
    imgsent.extract([str(images)], bf16, precision="bf16", **KW)
    labels = tmp_path / "labels.txt"
    labels.write_text("".join(f"img{i:03d}.jpg {i % 2}\n" for i in range(8)))
    model = str(tmp_path / "model")
    trained = imgsent.train(bf16, labels=str(labels), head="nn", epochs=1, cv=0, out=model)
    assert trained.numerics == "bf16" and imgsent.load_model(model).numerics == "bf16"
    with pytest.raises(ImgsentError, match="trained on bf16 features"):
        imgsent.score(features=fp32, out=str(tmp_path / "x.csv"), model=model)
    imgsent.score(features=fp32, out=str(tmp_path / "x.csv"), model=model, precision="fp32")  # told: accepted
    # Scoring images: auto follows the recipe (bf16 here), so images and store give the same scores.
    imgsent.score([str(images)], str(tmp_path / "img.csv"), model=model, workers=0, batch_size=4)
    imgsent.score(features=bf16, out=str(tmp_path / "store.csv"), model=model)
    import polars as pl

    a, b = pl.read_csv(tmp_path / "img.csv"), pl.read_csv(tmp_path / "store.csv")
    np.testing.assert_array_equal(a["p_positive"].to_numpy(), b["p_positive"].to_numpy())


def test_device_choices(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ImgsentError, match="CUDA is not available"):
        imgsent.engine.select_device("cuda:1")
    assert imgsent.engine.select_device("auto").type in ("cpu", "mps")


def test_decoding_uses_every_core_of_a_gpu_host(monkeypatch):
    monkeypatch.setattr(imgsent.decodepool.os, "sched_getaffinity", lambda pid: set(range(16)))
    assert imgsent.engine.default_workers(torch.device("cuda", 0)) == 15
    assert imgsent.engine.default_workers(torch.device("cpu")) == 8


def test_ray_device_settings_are_refused_on_the_driver():
    from imgsent.distributed import _check_devices

    for kw, fragment in (
        (dict(device="cpu", gpus_per_worker=1), "asks for GPUs"),
        (dict(device="cuda"), "needs GPUs"),
        (dict(device="cuda:1", gpus_per_worker=1), "only the GPUs Ray gives it"),
    ):
        with pytest.raises(ImgsentError, match=fragment):
            _check_devices(RunOptions(engine="ray", **kw))
    _check_devices(RunOptions(engine="ray", device="cuda", gpus_per_worker=1))


def _scripted_backbone(fn_module: torch.nn.Module, dim: int) -> Backbone:
    scripted = torch.jit.script(fn_module)
    bb = Backbone(BackboneSpec.parse("torchscript:x.pt"), scripted, Preprocess(), dim=dim)
    from imgsent.backbones import probe_image

    with torch.inference_mode():
        probe = bb(probe_image(bb.preprocess))[0]
    bb.fingerprint = {"probe": [float(v) for v in probe[:16]], "probe_norm": float(probe.norm())}
    return bb


class _Mean(torch.nn.Module):
    def forward(self, x):
        return x.mean(dim=(2, 3))


class _Fails(torch.nn.Module):
    def forward(self, x):
        if x.shape[0] > 0:
            raise RuntimeError("no kernel for this device")
        return x.mean(dim=(2, 3))


def test_torchscript_backbones_are_checked_on_their_device():
    from imgsent.runners import check_on_device as _check_on_device

    bb = _scripted_backbone(_Mean(), 3)
    _check_on_device(bb, bb.module, torch.device("cpu"), channels_last=True)
    bb.fingerprint["probe"] = [v + 1 for v in bb.fingerprint["probe"]]  # as if the device computed otherwise
    with pytest.raises(ImgsentError, match="other features"):
        _check_on_device(bb, bb.module, torch.device("cpu"), channels_last=False)
    bad = Backbone(BackboneSpec.parse("torchscript:y.pt"), torch.jit.script(_Fails()), Preprocess(), dim=3)
    with pytest.raises(ImgsentError, match="cannot run on cpu"):
        _check_on_device(bad, bad.module, torch.device("cpu"), channels_last=False)


def test_non_finite_features_become_error_rows(images):
    class Overflow(torch.nn.Module):
        def forward(self, x):
            out = x.mean(dim=(2, 3))
            return torch.cat([out[:1] * float("inf"), out[1:]])  # the first image of each pass overflows

    bb = Backbone(BackboneSpec.parse("torchscript:overflow.pt"), Overflow().eval(), Preprocess(), dim=3)
    engine = imgsent.engine.FeatureEngine([bb], workers=0, batch_size=4, optimize="none")
    refs = imgsent.inputs.find_images([str(images)])
    batches = list(engine.run(refs))
    status = [s for b in batches for s in b.status]
    errors = [e for b in batches for e in b.error]
    assert "error" in status and "ok" in status
    for b in batches:
        assert np.isfinite(b.features[bb.key][b.ok_mask]).all()
    assert all("non-finite features" in e for e, s in zip(errors, status) if s == "error")
    batch = FeatureBatch(
        ["a", "b"],
        ["a", "b"],
        ["ok", "ok"],
        [None, None],
        [1, 1],
        [1, 1],
        {"k": np.array([[1.0, np.nan], [1.0, 2.0]], dtype=np.float32)},
    )
    flagged = imgsent.engine.flag_nonfinite(batch)
    assert flagged.status == ["error", "ok"] and np.isnan(flagged.features["k"][0]).all()


def test_compiled_backbones_get_fixed_padded_batches(images, monkeypatch):
    shapes = []

    def fake_compile(module, dynamic=None):
        assert dynamic is False

        def run(x):
            shapes.append(tuple(x.shape))
            return module(x)

        return run

    monkeypatch.setattr(torch, "compile", fake_compile)
    model = imgsent.create_backbone(TINY, random_weights=True)
    engine = imgsent.engine.FeatureEngine([model], workers=0, batch_size=3, compile=True, model_batch=3)
    list(engine.run(imgsent.inputs.find_images([str(images)])))  # 8 images: batches of 3, 3, 2
    assert set(shapes) == {(3, 3, 160, 160)}  # the tail was padded: one shape, no recompile


def test_the_engine_leaves_the_callers_backbones_alone(images):
    model = imgsent.create_backbone(TINY, random_weights=True)
    module = model.module
    before = {k: v.clone() for k, v in module.state_dict().items()}
    engine = imgsent.engine.FeatureEngine([model], workers=0, batch_size=4)
    list(engine.run(imgsent.inputs.find_images([str(images)])))
    assert model.module is module and not isinstance(model.module, torch.jit.ScriptModule)
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())
    assert next(module.parameters()).is_contiguous()  # not turned channels_last under the caller


def test_too_little_shared_memory_fails_at_once(images, tmp_path, monkeypatch):
    import collections

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(imgsent.loader.shutil, "disk_usage", lambda p: usage(64 << 20, 63 << 20, 1 << 20))
    monkeypatch.setattr(imgsent.loader.os.path, "isdir", lambda p: True)
    with pytest.raises(ImgsentError, match="shm-size"):
        imgsent.extract([str(images)], str(tmp_path / "s"), backbones=[TINY], random_weights=True, workers=2)
    imgsent.extract([str(images)], str(tmp_path / "s"), backbones=[TINY], random_weights=True, workers=0)
