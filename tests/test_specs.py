"""The spec grammar parsed once into a tree (imgsent/specs.py): what a view's parts are, written
back as they were, the files they name, and mistakes refused at parse time in one line."""

from __future__ import annotations

import pytest

from imgsent.errors import ImgsentError
from imgsent.specs import BackboneSpec, map_files, spec_files

WRITTEN = [
    "timm:tf_efficientnet_lite2",
    "timm:vit_base_patch16_clip_224.openai:head",
    "torchvision:mobilenet_v2.IMAGENET1K_QNNPACK_V1@/m/mobilenet_v2_imagenet1k.safetensors",
    "torchscript:/a/b.c/model.pt:probs",
    "imgsent:face_expression",
    "objects:imgsent:faces_rfb320",
    "objects:torchscript:/m/d2go_coco_objects.pt",
    "objects:torchvision:fasterrcnn_resnet50_fpn_v2@/w/f@home.pth",
    "regions:imgsent:faces_rfb320+imgsent:face_expression+k=3+min=0.9",
    "regions:torchscript:/m/faces.pt+timm:resnet18@/w/r.safetensors+k=3",
    "regions:torchvision:fasterrcnn_resnet50_fpn@/w/f.pth+torchscript:/m/e.pt:probs",
]


@pytest.mark.parametrize("text", WRITTEN)
def test_a_spec_is_written_back_as_it_was_and_its_files_map_in_place(text):
    spec = BackboneSpec.parse(text)
    assert str(spec) == text
    assert BackboneSpec.parse(str(spec)) == spec
    assert map_files(text, lambda p: p) == text
    moved = BackboneSpec.parse(text).map_files(lambda p: "/new/" + p.rsplit("/", 1)[1])
    assert moved.key == spec.key  # keys hold file names, not folders
    assert all(f.startswith("/new/") for f in moved.files()) and len(moved.files()) == len(spec.files())


def test_a_views_parts_are_a_tree():
    objects = BackboneSpec.parse("objects:torchvision:fasterrcnn_resnet50_fpn_v2@/w/f@home.pth")
    det = objects.detector
    assert (det.source, det.name, det.weights) == ("torchvision", "fasterrcnn_resnet50_fpn_v2", "/w/f@home.pth")
    assert objects.key == "objects:torchvision:fasterrcnn_resnet50_fpn_v2"
    regions = BackboneSpec.parse("regions:torchscript:/m/faces.pt+timm:resnet18@/w/r.safetensors+k=3")
    assert (regions.detector.source, regions.detector.name) == ("torchscript", "/m/faces.pt")
    assert (regions.inner.source, regions.inner.name, regions.inner.weights) == ("timm", "resnet18", "/w/r.safetensors")
    assert (regions.k, regions.min, regions.settings) == (3, 0.3, ("k=3",))
    assert regions.key == "regions:torchscript:faces.pt+timm:resnet18+k=3+min=0.3"
    assert regions.files() == spec_files(str(regions)) == ["/m/faces.pt", "/w/r.safetensors"]
    assert regions.text == str(regions)  # what recipes record


@pytest.mark.parametrize(
    "text, match",
    [
        ("objects:onnx:/m/d.onnx", "give imgsent:NAME, torchscript:PATH or torchvision:NAME"),
        ("objects:torchvision:fasterrcnn@", "nothing after '@'"),
        ("regions:imgsent:faces_rfb320", "give regions:DETECTOR"),
        ("regions:imgsent:faces_rfb320+objects:imgsent:faces_rfb320", "must be an image classifier"),
        ("regions:imgsent:faces_rfb320+imgsent:face_expression+k=0", "k must be >= 1"),
        ("regions:imgsent:faces_rfb320+imgsent:face_expression+top=3", "unknown setting"),
    ],
)
def test_a_wrong_view_is_refused_when_parsed(text, match):
    with pytest.raises(ImgsentError, match=match):
        BackboneSpec.parse(text)
