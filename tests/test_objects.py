"""The objects view (the paper's G): a COCO detector's findings as a fixed-length vector."""

import numpy as np
import pytest
from conftest import SHARED, TWITTER, write_images
from PIL import Image

import imgsent

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
