"""The objects view (the paper's G): a COCO detector's findings as a fixed-length vector."""

import numpy as np
import pytest
import torch
from conftest import SHARED, TWITTER, HalvesDetector, write_images
from PIL import Image

import imgsent

# the models these tests train (a few epochs on generated images) are throwaway: what they learn is not the point
pytestmark = pytest.mark.filterwarnings("ignore::imgsent.errors.UselessModelWarning")

D2GO = SHARED / "models" / "d2go_coco_objects.pt"
PERSON_PHOTO = "100012144_428165730178064385_BfEe1ehCQAAD4uf.jpg"  # Twitter I: people, clearly


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("objects") / "imgs"
    write_images(d, 3, size=(200, 150))
    Image.new("RGB", (240, 160), (128, 128, 128)).save(d / "plain.jpg")
    return d


def test_objects_view_mechanics_with_a_random_torchvision_detector(images, tmp_path):
    spec = "objects:torchvision:fasterrcnn_mobilenet_v3_large_320_fpn"
    out = str(tmp_path / "s")
    s = imgsent.extract([str(images)], out, backbones=[spec], random_weights=True, workers=0, batch_size=3)
    assert s.errors == 0
    fs = imgsent.features.load(out)
    recipe = fs.recipes[0]
    assert recipe["key"] == spec and recipe["dim"] == 3 * 91 == fs.X.shape[1]
    assert recipe["columns"][1] == "max_score:person" and recipe["columns"][91 + 1] == "sum_score:person"
    assert recipe["columns"][2 * 91 + 1] == "area_share:person"
    c = 91
    assert (fs.X[:, :c] <= 1).all() and (fs.X >= 0).all()
    assert (fs.X[:, c : 2 * c] >= fs.X[:, :c] - 1e-6).all()  # a soft count is at least the best score
    again = str(tmp_path / "again")  # batch composition does not matter: one image per detector call
    imgsent.extract([str(images)], again, backbones=[spec], random_weights=True, workers=0, batch_size=1)
    np.testing.assert_array_equal(imgsent.features.load(again).X, fs.X)


@pytest.mark.skipif(
    not D2GO.is_file() or not (TWITTER / "images").is_dir(), reason=f"D2Go detector or Twitter I not under {SHARED}"
)
def test_the_real_d2go_detector_sees_people_and_nothing_in_a_blank_image(images, tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "people.jpg").symlink_to(TWITTER / "images" / PERSON_PHOTO)
    (tmp_path / "imgs" / "plain.jpg").symlink_to(images / "plain.jpg")
    out = str(tmp_path / "s")
    imgsent.extract([str(tmp_path / "imgs")], out, backbones=[f"objects:torchscript:{D2GO}"], workers=0)
    fs = imgsent.features.load(out)
    columns = fs.recipes[0]["columns"]
    person = columns.index("max_score:person")
    rows = dict(zip(fs.ids, fs.X))
    assert rows["people.jpg"][person] > 0.9
    assert 0 < rows["people.jpg"][columns.index("area_share:person")] < 1  # a small figure in this photo
    assert not rows["plain.jpg"].any()  # no detection: zeros, not an error


# --- the regions view: a scripted detector and classifier whose outputs are known -------------


class MeanColour(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))


@pytest.fixture(scope="module")
def scripted(tmp_path_factory):
    d = tmp_path_factory.mktemp("scripted")
    torch.jit.script(HalvesDetector.module()).save(str(d / "halves.pt"))
    torch.jit.script(MeanColour()).save(str(d / "mean.pt"))
    imgs = d / "imgs"
    imgs.mkdir()
    arr = np.zeros((100, 200, 3), np.uint8)
    arr[:, :100] = (255, 0, 0)  # left red: score 1/3
    arr[:, 100:] = 255  # right white: score 1
    Image.fromarray(arr).save(imgs / "red_white.png")
    Image.new("RGB", (120, 80)).save(imgs / "black.png")  # both halves score 0
    write_images(imgs, 3, size=(160, 120))
    return d


RED, WHITE = np.array([1.0, 0.0, 0.0]), np.ones(3)


def _normalised(rgb):  # what MeanColour sees for a crop of one colour (ImageNet mean / std)
    return (rgb - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])


def test_regions_view_is_the_score_weighted_mean_of_the_crops_features(scripted, tmp_path):
    det, inner = f"torchscript:{scripted / 'halves.pt'}", f"torchscript:{scripted / 'mean.pt'}"
    specs = [f"regions:{det}+{inner}", f"regions:{det}+{inner}+k=1", f"regions:{det}+{inner}+min=0.5"]
    out = str(tmp_path / "s")
    s = imgsent.extract([str(scripted / "imgs")], out, backbones=specs, workers=0)
    assert s.errors == 0
    fs = imgsent.features.load(out)
    assert [r["key"] for r in fs.recipes] == [  # keys hold file names, not folders
        "regions:torchscript:halves.pt+torchscript:mean.pt+k=5+min=0.3",
        "regions:torchscript:halves.pt+torchscript:mean.pt+k=1+min=0.3",
        "regions:torchscript:halves.pt+torchscript:mean.pt+k=5+min=0.5",
    ]
    rows = dict(zip(fs.ids, fs.X))
    both = (_normalised(RED) / 3 + _normalised(WHITE)) / (1 / 3 + 1)
    got = rows["red_white.png"]
    np.testing.assert_allclose(got[0:3], both, atol=0.03)
    np.testing.assert_allclose(got[3:6], _normalised(WHITE), atol=0.03)  # k=1: the best box only
    np.testing.assert_allclose(got[6:9], _normalised(WHITE), atol=0.03)  # min=0.5: the red half is out
    assert not rows["black.png"].any()  # nothing scores 0.3: zeros, not an error


def test_objects_and_regions_of_one_detector_run_it_once_per_image_whatever_the_batch(scripted, tmp_path, monkeypatch):
    from imgsent import objects

    calls = []
    run = objects.Detector._run
    monkeypatch.setattr(objects.Detector, "_run", lambda self, image: calls.append(1) or run(self, image))
    det, inner = f"torchscript:{scripted / 'halves.pt'}", f"torchscript:{scripted / 'mean.pt'}"
    specs = [f"objects:{det}", f"regions:{det}+{inner}"]
    stores = []
    for batch in (5, 2):
        imgsent.lanes.forget("detections")  # a fresh process
        calls.clear()
        out = str(tmp_path / f"b{batch}")
        imgsent.extract([str(scripted / "imgs")], out, backbones=specs, workers=0, batch_size=batch)
        assert len(calls) == 6  # five images and the fingerprint's probe image: one pass each, not two
        stores.append(imgsent.features.load(out).X)
    np.testing.assert_array_equal(stores[0], stores[1])  # features do not depend on the batch


def test_regions_specs_are_checked_and_keyed_without_local_files():
    from imgsent.backbones import BackboneSpec, create_backbone
    from imgsent.errors import ImgsentError

    spec = BackboneSpec.parse(
        "regions:torchvision:fasterrcnn_mobilenet_v3_large_320_fpn@/w/d.pth+timm:resnet18@/w/r.st"
    )
    assert spec.key == "regions:torchvision:fasterrcnn_mobilenet_v3_large_320_fpn+timm:resnet18+k=5+min=0.3"
    for bad in ("regions:torchscript:d.pt", "regions:torchscript:d.pt+timm:resnet18+k=0", "regions:a+b+size=3"):
        with pytest.raises(ImgsentError):
            BackboneSpec.parse(bad)
    with pytest.raises(ImgsentError, match="not a detector view"):
        create_backbone("regions:torchvision:fasterrcnn_mobilenet_v3_large_320_fpn+objects:torchscript:x.pt")


def test_a_random_torchvision_regions_view_runs_and_records_its_recipe(images, tmp_path):
    spec = "regions:torchvision:fasterrcnn_mobilenet_v3_large_320_fpn+timm:resnet18+k=2+min=0"
    out = str(tmp_path / "s")
    s = imgsent.extract([str(images)], out, backbones=[spec], random_weights=True, workers=0)
    assert s.errors == 0
    recipe = imgsent.features.load(out).recipes[0]
    assert recipe["dim"] == 512 and recipe["preprocess"]["input_size"] == [512, 512]
    assert recipe["spec"] == spec


def test_presets_with_model_files_name_the_folder_they_need(monkeypatch, tmp_path):
    from imgsent.backbones import expand_presets
    from imgsent.errors import ImgsentError

    monkeypatch.delenv("IMGSENT_MODELS", raising=False)
    with pytest.raises(ImgsentError, match=r"IMGSENT_MODELS.*d2go_coco_objects.pt"):
        expand_presets(["lab"])
    monkeypatch.setenv("IMGSENT_MODELS", str(tmp_path))
    specs = expand_presets(["lab"])
    assert len(specs) == 5 and all(str(tmp_path) in s for s in specs)
    assert len(expand_presets(["paper"])) == 5


@pytest.mark.skipif(
    not D2GO.is_file() or not (TWITTER / "images").is_dir(), reason=f"D2Go detector or Twitter I not under {SHARED}"
)
def test_the_lab_preset_runs_offline_on_real_photos(tmp_path, monkeypatch):
    monkeypatch.setenv("IMGSENT_MODELS", str(SHARED / "models"))
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "people.jpg").symlink_to(TWITTER / "images" / PERSON_PHOTO)
    out = str(tmp_path / "s")
    imgsent.extract([str(tmp_path / "imgs")], out, backbones=["lab"], workers=0)
    fs = imgsent.features.load(out)
    # MobileNetV2, EfficientNet-Lite2, D2Go objects, face objects (background + face), face expressions
    assert [d for _, d in fs.blocks] == [1280, 1280, 3 * 92, 3 * 2, 7 + 256]
    assert not any(str(SHARED) in k for k, _ in fs.blocks)  # keys hold file names, never a folder
    assert "max_score:face" in fs.recipes[3]["columns"]
    objects = fs.X[0, fs.layout.columns([fs.blocks[2][0]])]
    assert objects[fs.recipes[2]["columns"].index("max_score:person")] > 0.5  # D2Go sees the person
    mobilenet, lite2 = fs.X[0, :1280], fs.X[0, 1280:2560]
    assert mobilenet.any() and lite2.any() and np.abs(mobilenet - lite2).max() > 0.1


def test_an_interrupted_detector_view_store_resumes_to_the_same_numbers(scripted, tmp_path, interrupt_after_commits):
    det, inner = f"torchscript:{scripted / 'halves.pt'}", f"torchscript:{scripted / 'mean.pt'}"
    specs = [f"objects:{det}", f"regions:{det}+{inner}+k=1"]
    kw = {"backbones": specs, "workers": 0, "batch_size": 2, "rows_per_shard": 2}
    whole = str(tmp_path / "whole")
    imgsent.extract([str(scripted / "imgs")], whole, **kw)
    out = str(tmp_path / "resumed")
    interrupt_after_commits.arm(1, KeyboardInterrupt("simulated kill"))
    with pytest.raises(KeyboardInterrupt):
        imgsent.extract([str(scripted / "imgs")], out, **kw)
    interrupt_after_commits.disarm()
    imgsent.extract([str(scripted / "imgs")], out, **kw)
    a, b = imgsent.features.load(whole), imgsent.features.load(out)
    assert a.ids == b.ids and len(a.ids) == 5
    np.testing.assert_array_equal(a.X, b.X)


def test_the_objects_vector_comes_back_on_the_device_of_its_input():
    from imgsent import objects

    class Fixed(torch.nn.Module):  # stands in for a detector on another device
        def detect(self, x):
            return [objects.Detections(torch.tensor([[0.0, 0.0, 4.0, 4.0]]), torch.tensor([1]), torch.tensor([0.9]))]

    view = objects.ObjectsView(Fixed(), None)
    out = view(torch.empty((1, 3, 8, 8), device="meta"))  # any device but the CPU the loop builds on
    assert out.device.type == "meta" and out.shape == (1, 3 * objects.COCO_CLASSES)


def test_a_model_on_a_regions_view_rebuilds_it_with_its_local_weight_files(scripted, tmp_path):
    import timm
    from safetensors.torch import save_file

    weights = tmp_path / "tiny.safetensors"
    save_file(timm.create_model("test_resnet").state_dict(), str(weights))
    spec = f"regions:torchscript:{scripted / 'halves.pt'}+timm:test_resnet@{weights}"
    store = str(tmp_path / "s")
    imgsent.extract([str(scripted / "imgs")], store, backbones=[spec], workers=0)
    labels = tmp_path / "labels.txt"
    labels.write_text("".join(f"{n} {i % 2}\n" for i, n in enumerate(imgsent.features.load(store).ids)))
    model = str(tmp_path / "m")
    imgsent.train(store, labels=str(labels), head="nn", epochs=1, cv=0, out=model)
    # the recipe's key has no file in it; the model finds the crop backbone's weights in its spec
    s = imgsent.score([str(scripted / "imgs")], str(tmp_path / "scores.csv"), model=model, workers=0)
    assert s.errors == 0
