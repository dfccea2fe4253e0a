"""Models and stores that travel: keys hold file names, not folders; a model finds its files by
name and hash; stores and models written with whole-path keys (before 0.5) still load."""

from __future__ import annotations

import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import HalvesDetector, imgsent_cli, labelled_images, run_cli, write_images

import imgsent
from imgsent.errors import ImgsentError
from imgsent.specs import BackboneSpec, map_files, normalize_key, spec_files

# the models these tests train (a few epochs on generated images) are throwaway: what they learn is not the point
pytestmark = pytest.mark.filterwarnings("ignore::imgsent.errors.UselessModelWarning")


class Colour(torch.nn.Module):
    def __init__(self, scale: float = 1.0):
        super().__init__()
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3))], 1) * self.scale


def _files(folder, scale=1.0):
    folder.mkdir(parents=True, exist_ok=True)
    torch.jit.script(HalvesDetector.module()).save(str(folder / "halves.pt"))
    torch.jit.script(Colour(scale)).save(str(folder / "colour.pt"))
    return folder


def _specs(folder) -> list[str]:
    return [
        f"torchscript:{folder}/colour.pt",
        f"objects:torchscript:{folder}/halves.pt",
        f"regions:torchscript:{folder}/halves.pt+torchscript:{folder}/colour.pt+k=1",
    ]


@pytest.fixture
def setup(tmp_path):
    """Images with labels, the files in old/, a store and a model made from them."""
    images, labels = labelled_images(tmp_path, 8, size=(96, 64))
    old = _files(tmp_path / "old")
    store, model = str(tmp_path / "s"), str(tmp_path / "m")
    imgsent.extract([str(images)], store, backbones=_specs(old), workers=0)
    imgsent.train(store, labels=str(labels), head="nn", epochs=2, cv=0, out=model)
    return tmp_path, images, store, model


def test_keys_hold_file_names_and_never_a_folder():
    assert BackboneSpec.parse("torchscript:/a/b.c/model.pt").key == "torchscript:model.pt"
    assert BackboneSpec.parse("torchscript:rel/dir/model.pt:probs").key == "torchscript:model.pt:probs"
    assert BackboneSpec.parse("objects:torchscript:/x/d2go.pt").key == "objects:torchscript:d2go.pt"
    assert BackboneSpec.parse("objects:torchvision:fasterrcnn_resnet50_fpn@/w/f.pth").key == (
        "objects:torchvision:fasterrcnn_resnet50_fpn"
    )
    assert BackboneSpec.parse("regions:torchscript:/m/faces.pt+torchscript:/m/expr.pt+k=3+min=0.9").key == (
        "regions:torchscript:faces.pt+torchscript:expr.pt+k=3+min=0.9"
    )
    assert BackboneSpec.parse("timm:tf_efficientnet_lite2@/m/l2.safetensors").key == "timm:tf_efficientnet_lite2"
    # keys written before 0.5 held the whole path
    assert normalize_key("objects:torchscript:/old/place/d2go.pt") == "objects:torchscript:d2go.pt"
    assert normalize_key("timm:resnet50") == "timm:resnet50"


def test_the_files_a_spec_names_are_found_and_replaced_in_place():
    spec = "regions:torchscript:/m/faces.pt+timm:resnet18@/w/r.safetensors+k=3"
    assert spec_files(spec) == ["/m/faces.pt", "/w/r.safetensors"]
    assert map_files(spec, lambda p: "/new/" + p.rsplit("/", 1)[1]) == (
        "regions:torchscript:/new/faces.pt+timm:resnet18@/new/r.safetensors+k=3"
    )
    assert map_files("torchscript:/a/x.pt:probs", str.upper) == "torchscript:/A/X.PT:probs"
    assert spec_files("timm:resnet50") == []


def test_two_folders_holding_the_same_files_give_identical_stores(tmp_path):
    write_images(tmp_path / "imgs", 3)
    a, b = _files(tmp_path / "a"), _files(tmp_path / "b" / "deeper")
    imgsent.extract([str(tmp_path / "imgs")], str(tmp_path / "sa"), backbones=_specs(a), workers=0)
    imgsent.extract([str(tmp_path / "imgs")], str(tmp_path / "sb"), backbones=_specs(b), workers=0)
    fa, fb = imgsent.features.load(str(tmp_path / "sa")), imgsent.features.load(str(tmp_path / "sb"))
    assert fa.blocks == fb.blocks and str(tmp_path) not in "".join(k for k, _ in fa.blocks)
    np.testing.assert_array_equal(fa.X, fb.X)
    names = [pq.read_schema(f).names for s in ("sa", "sb") for f in sorted((tmp_path / s).glob("part-*.parquet"))]
    assert names and all(n == names[0] for n in names)
    files = fa.recipes[0]["files"]
    assert [f["name"] for f in files] == ["colour.pt"] and len(files[0]["sha256"]) == 64


def test_a_model_finds_its_moved_files_by_name_and_hash(setup, capsys, monkeypatch):
    tmp_path, images, store, model = setup
    new = tmp_path / "new"
    shutil.move(str(tmp_path / "old"), str(new))
    want = imgsent.score([str(images)], str(tmp_path / "want.csv"), model=model, workers=0, models=[str(new)])
    assert want.errors == 0

    # the user's scenario: moved files, no hint -> one line saying what is missing and how to point at it
    code, _, err = run_cli(
        ["score", images, "--model", model, "--out", tmp_path / "p.parquet", "--workers", "0"], capsys, monkeypatch
    )
    assert code == 2 and "Traceback" not in err
    assert "needs colour.pt" in err and "--models DIR" in err and len(err.strip().splitlines()) == 1

    # found through --models, $IMGSENT_MODELS, or beside the bundle: the same scores each time
    outs = []
    code, _, err = run_cli(
        ["score", images, "--model", model, "--models", new, "--out", tmp_path / "p1.parquet", "--workers", "0", "-q"],
        capsys,
        monkeypatch,
    )
    assert code in (0, None), err
    outs.append(tmp_path / "p1.parquet")
    monkeypatch.setenv("IMGSENT_MODELS", str(new))
    imgsent.score([str(images)], str(tmp_path / "p2.parquet"), model=model, workers=0)
    outs.append(tmp_path / "p2.parquet")
    monkeypatch.delenv("IMGSENT_MODELS")
    for f in ("halves.pt", "colour.pt"):
        shutil.copy(new / f, tmp_path / "m" / f)
    imgsent.score([str(images)], str(tmp_path / "p3.parquet"), model=model, workers=0)
    outs.append(tmp_path / "p3.parquet")
    tables = [pq.read_table(p) for p in outs]
    for t in tables[1:]:
        assert t.column("p_positive").to_pylist() == tables[0].column("p_positive").to_pylist()

    # the store form: a store extracted from the new folder scores with the old model
    s2 = str(tmp_path / "s2")
    imgsent.extract([str(images)], s2, backbones=_specs(new), workers=0)
    imgsent.score(out=str(tmp_path / "p4.parquet"), model=model, features=s2)
    assert pq.read_table(tmp_path / "p4.parquet").column("p_positive").to_pylist() == (
        tables[0].column("p_positive").to_pylist()
    )

    code, out, _ = run_cli(["models", model], capsys, monkeypatch)
    assert code in (0, None)
    assert f"colour.pt for torchscript:colour.pt: {tmp_path / 'm' / 'colour.pt'} (beside the model)" in out
    assert "halves.pt for objects:torchscript:halves.pt" in out and "sha256" in out


def test_a_file_with_the_right_name_and_the_wrong_hash_is_refused_naming_both(setup):
    tmp_path, images, store, model = setup
    other = _files(tmp_path / "other", scale=2.0)  # same names, other content
    shutil.rmtree(tmp_path / "old")
    with pytest.raises(
        ImgsentError,
        match=r"colour\.pt has sha256 [0-9a-f]{64}, but this model needs the colour\.pt "
        r"with sha256 [0-9a-f]{64}",
    ):
        imgsent.score([str(images)], str(tmp_path / "x.csv"), model=model, workers=0, models=[str(other)])
    r = imgsent_cli("score", images, "--model", model, "--models", other, "--out", tmp_path / "y.csv")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "sha256" in r.stderr


def test_stores_and_models_with_whole_path_keys_still_load_and_score(tmp_path, monkeypatch):
    """Simulate imgsent < 0.5: keys held the whole path and recipes listed no files."""
    import imgsent.backbones

    labelled_images(tmp_path, 6, size=(96, 64))
    old = _files(tmp_path / "old")
    with monkeypatch.context() as m:

        def old_key(self):  # the whole path, as imgsent < 0.5 keyed torchscript and objects specs
            return f"{self.source}:{self.name}"

        m.setattr(BackboneSpec, "key", property(old_key))
        m.setattr(imgsent.backbones, "spec_files", lambda spec: [])
        specs = _specs(old)[:2]
        imgsent.extract([str(tmp_path / "imgs")], str(tmp_path / "s"), backbones=specs, workers=0)
        imgsent.train(
            str(tmp_path / "s"), labels=str(tmp_path / "labels.txt"), head="nn", epochs=2, cv=0, out=str(tmp_path / "m")
        )
    columns = pq.read_schema(next((tmp_path / "s").glob("part-*.parquet"))).names
    assert f"torchscript:{old}/colour.pt" in columns  # really written the old way

    fs = imgsent.features.load(str(tmp_path / "s"))
    assert [k for k, _ in fs.blocks] == ["torchscript:colour.pt", "objects:torchscript:halves.pt"]
    model = imgsent.load_model(str(tmp_path / "m"))
    assert [k for k, _ in model.blocks] == ["torchscript:colour.pt", "objects:torchscript:halves.pt"]
    a = imgsent.score(out=str(tmp_path / "a.csv"), model=str(tmp_path / "m"), features=str(tmp_path / "s"))
    b = imgsent.score([str(tmp_path / "imgs")], str(tmp_path / "b.csv"), model=str(tmp_path / "m"), workers=0)
    assert a.errors == b.errors == 0
    assert (tmp_path / "a.csv").read_text() == (tmp_path / "b.csv").read_text()
    # and the old model's files still move: found by name in a folder given
    shutil.move(str(old), str(tmp_path / "new"))
    c = imgsent.score(
        [str(tmp_path / "imgs")],
        str(tmp_path / "c.csv"),
        model=str(tmp_path / "m"),
        workers=0,
        models=[str(tmp_path / "new")],
    )
    assert c.errors == 0 and (tmp_path / "c.csv").read_text() == (tmp_path / "b.csv").read_text()


def test_two_files_of_one_name_in_one_run_are_refused(tmp_path):
    write_images(tmp_path / "imgs", 1)
    a, b = _files(tmp_path / "a"), _files(tmp_path / "b", scale=3.0)
    specs = [f"torchscript:{a}/colour.pt", f"torchscript:{b}/colour.pt"]
    with pytest.raises(ImgsentError, match="share the key torchscript:colour.pt"):
        imgsent.extract([str(tmp_path / "imgs")], str(tmp_path / "s"), backbones=specs)
