"""decode="device": JPEGs decoded together where the models run (nvImageCodec, TorchCodec or
torchvision.io; hardware engines / nvJPEG on CUDA, libjpeg-turbo on the CPU, which is how these tests
run each of them), other files by Pillow as before."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from conftest import TINY, TINY2, jpeg_bytes, rgb_array, run_cli
from PIL import Image

import imgsent
from imgsent import devicedecode
from imgsent.decode import Preprocess, decode_ref, read_jpeg
from imgsent.engine import FeatureEngine
from imgsent.errors import ImgsentError
from imgsent.inputs import ImageRef, find_images

KW = {"backbones": [TINY, TINY2], "random_weights": True, "workers": 0, "batch_size": 4}
PPS = [Preprocess((224, 224), 256, "bilinear"), Preprocess((288, 288), 288, "bicubic"), Preprocess((64, 96), 40)]


def _with_orientation(arr: np.ndarray, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=95, exif=exif)
    return buf.getvalue()


@pytest.fixture
def mixed(tmp_path):
    """JPEGs of several sizes (one 1920x1080, one grey, one turned by EXIF), a PNG, a CMYK JPEG,
    a truncated JPEG and a non-image."""
    d = tmp_path / "mixed"
    d.mkdir()
    for i, (w, h) in enumerate([(640, 480), (1920, 1080), (300, 500), (100, 80), (1000, 60)]):
        (d / f"a{i}.jpg").write_bytes(jpeg_bytes(rgb_array(h, w, seed=i), quality=90))
    (d / "grey.jpg").write_bytes(jpeg_bytes(rgb_array(200, 240, seed=7)[..., 0]))
    (d / "turned.jpg").write_bytes(_with_orientation(rgb_array(120, 200, seed=8), 6))
    Image.fromarray(rgb_array(90, 120, seed=9)).save(d / "b.png")
    Image.fromarray(rgb_array(90, 120, seed=10)).convert("CMYK").save(d / "cmyk.jpg")
    (d / "cut.jpg").write_bytes(jpeg_bytes(rgb_array(300, 400, seed=11))[:3000])
    (d / "text.jpg").write_text("not an image")
    return d


@pytest.fixture(params=devicedecode.BACKENDS)
def jpeg_backend(request, monkeypatch):
    """Each JPEG decoder imgsent can use, chosen as a user does ($IMGSENT_DEVICE_DECODER); the
    optional ones (imgsent[gpu]) are skipped where they are not installed."""
    if not devicedecode.installed(request.param):
        pytest.skip(f"{request.param} is optional (pip install 'imgsent[gpu]') and not installed here")
    monkeypatch.setenv(devicedecode.CHOICE_ENV, request.param)
    return request.param


def _max_diff(a: np.ndarray, b: np.ndarray) -> tuple[int, float]:
    diff = np.abs(a.astype(np.int16) - b.astype(np.int16))
    return int(diff.max()), float(diff.mean())


@pytest.mark.parametrize("tta", ["none", "crops"])
def test_device_views_are_pillows_within_a_few_grey_levels(mixed, tta, jpeg_backend):
    for path in sorted(mixed.glob("a*.jpg")) + [mixed / "grey.jpg", mixed / "turned.jpg"]:
        ref = ImageRef(path.name, str(path))
        want = decode_ref(ref, PPS, tta)
        got = read_jpeg(ref)
        assert got is not None and (got.width, got.height) == (want.width, want.height)
        views, failed = devicedecode.decode_views(
            [torch.from_numpy(got.jpeg)], [got.orientation], PPS, tta, torch.device("cpu")
        )
        assert failed == []
        for key, ref_view in want.views.items():
            assert views[key].shape[1:] == ref_view.shape, path.name
            worst, mean = _max_diff(views[key][0].numpy(), ref_view)
            assert worst <= 4 and mean < 0.5, (path.name, key, worst, mean)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied_as_pillow_does(tmp_path, orientation, jpeg_backend):
    path = tmp_path / f"o{orientation}.jpg"
    path.write_bytes(_with_orientation(rgb_array(60, 100, seed=orientation), orientation))
    ref = ImageRef(path.name, str(path))
    got = read_jpeg(ref)
    assert got.orientation == orientation
    pp = [Preprocess((40, 40), 40)]
    want = decode_ref(ref, pp)
    assert (got.width, got.height) == (want.width, want.height) == ((60, 100) if orientation >= 5 else (100, 60))
    views, _ = devicedecode.decode_views([torch.from_numpy(got.jpeg)], [orientation], pp, "none", torch.device("cpu"))
    worst, mean = _max_diff(views[pp[0].view_key][0].numpy(), want.views[pp[0].view_key])
    assert worst <= 4 and mean < 0.5  # a wrong turn would differ by tens of grey levels


def test_files_the_device_cannot_take_are_left_to_pillow(mixed):
    for name in ("b.png", "cmyk.jpg", "cut.jpg", "text.jpg"):
        assert read_jpeg(ImageRef(name, str(mixed / name))) is None, name


def test_a_jpeg_the_device_refuses_is_decoded_by_pillow(mixed, monkeypatch):
    """A batch the decoder rejects costs only the image it chokes on; that one goes to Pillow."""
    real = devicedecode._decoder

    def picky_decoder(name, device):
        decode, oriented = real(name, device)

        def picky(data):
            if len(data) > 1 or len(data[0]) == (mixed / "a3.jpg").stat().st_size:
                raise RuntimeError("nvjpeg: unsupported")
            return decode(data)

        return picky, oriented

    monkeypatch.setattr(devicedecode, "_decoder", picky_decoder)
    engine = FeatureEngine([imgsent.create_backbone(TINY, random_weights=True)], workers=0, decode="device")
    refs = find_images([str(mixed)])
    batches = list(engine.run(refs))
    status = {i: s for b in batches for i, s in zip(b.ids, b.status)}
    assert status["a3.jpg"] == "ok"
    assert engine.device_decoded[1] == 1 and engine.device_decoded[0] == 6


def test_extract_with_device_decoding_matches_pillow_closely(mixed, tmp_path, monkeypatch):
    """Also the full-size column: the device reads it from the header, Pillow from the decode."""
    pil, dev = tmp_path / "pil", tmp_path / "dev"
    s = imgsent.extract([str(mixed)], str(pil), **KW)
    assert "device decoding" not in s.details
    monkeypatch.setenv(devicedecode.CHOICE_ENV, "torchvision")  # the decoder of imgsent 0.6 (the header's default)
    s = imgsent.extract([str(mixed)], str(dev), decode="device", **KW)
    assert s.details["device decoding"] == "torchvision (libjpeg-turbo): 7 JPEGs; 0 refused and left to Pillow"
    a, b = imgsent.features.load(str(pil)), imgsent.features.load(str(dev))
    assert a.ids == b.ids and len(a.ids) == 9
    # the same rows fail, for the same reasons (Pillow decodes what the device does not take)
    fa, fb = (imgsent.features.load(str(s), only_ok=False) for s in (pil, dev))
    assert (fa.ids, fa.status, fa.error) == (fb.ids, fb.status, fb.error)
    assert fa.status.count("error") == 2
    cos = (a.X * b.X).sum(1) / np.linalg.norm(a.X, axis=1) / np.linalg.norm(b.X, axis=1)
    assert cos.min() > 0.99 and not np.array_equal(a.X, b.X)
    assert b.header["decode"] == "device" and "decode" not in a.header and "decoder" not in b.header
    with pytest.raises(ImgsentError, match="decode"):
        imgsent.extract([str(mixed)], str(dev), **KW)  # a workers-decoded run into a device-decoded store


@pytest.mark.parametrize("other", [b for b in devicedecode.BACKENDS if b != "torchvision"])
def test_the_store_says_which_decoder_and_a_resume_keeps_to_it(mixed, tmp_path, monkeypatch, other):
    if not devicedecode.installed(other):
        pytest.skip(f"{other} is optional (pip install 'imgsent[gpu]') and not installed here")
    store = str(tmp_path / "s")
    monkeypatch.setenv(devicedecode.CHOICE_ENV, other)
    s = imgsent.extract([str(mixed)], store, decode="device", **KW)
    assert s.details["device decoding"].startswith(f"{other} (libjpeg-turbo): 7 JPEGs")
    assert imgsent.features.load(store).header["decoder"] == other
    monkeypatch.setenv(devicedecode.CHOICE_ENV, "torchvision")
    with pytest.raises(ImgsentError, match=f"decoder={other!r}, this run computes 'torchvision'"):
        imgsent.extract([str(mixed)], store, decode="device", **KW)
    monkeypatch.setenv(devicedecode.CHOICE_ENV, other)
    assert imgsent.extract([str(mixed)], store, decode="device", **KW).resumed == 11


def test_a_decoder_choice_that_cannot_be_had_is_one_line(monkeypatch, capsys, mixed, tmp_path):
    monkeypatch.setenv(devicedecode.CHOICE_ENV, "dali")
    with pytest.raises(ImgsentError, match="must be auto or one of nvimgcodec, torchcodec, torchvision, got 'dali'"):
        FeatureEngine([imgsent.create_backbone(TINY, random_weights=True)], workers=0, decode="device")
    monkeypatch.setattr(devicedecode, "installed", lambda name: name == "torchvision")
    monkeypatch.setenv(devicedecode.CHOICE_ENV, "nvimgcodec")
    args = ["extract", mixed, "-o", tmp_path / "s", "-B", TINY, "--random-weights", "--workers", "0"]
    code, _, err = run_cli([*args, "--decode", "device"], capsys, monkeypatch)
    assert code == 2 and err.strip().splitlines() == [
        "imgsent: error: IMGSENT_DEVICE_DECODER=nvimgcodec, but nvimgcodec is not installed: pip install 'imgsent[gpu]'"
    ]
    assert run_cli(args, capsys, monkeypatch)[0] == 0  # not asked for without decode=device
    monkeypatch.setenv(devicedecode.CHOICE_ENV, "auto")
    assert devicedecode.backend("cuda") == devicedecode.backend("cpu") == "torchvision"


def test_the_preferred_decoders(monkeypatch):
    monkeypatch.delenv(devicedecode.CHOICE_ENV, raising=False)
    monkeypatch.setattr(devicedecode, "installed", lambda name: True)
    # On CUDA nvImageCodec (the cards' hardware JPEG engines); on the CPU all three are libjpeg-turbo.
    assert (devicedecode.backend("cuda"), devicedecode.backend("cpu")) == ("nvimgcodec", "torchcodec")
    monkeypatch.setattr(devicedecode, "installed", lambda name: name != "nvimgcodec")
    assert devicedecode.backend("cuda") == "torchcodec"


def test_device_decoding_keeps_features_independent_of_batching(mixed, tmp_path):
    kw = {**KW, "decode": "device"}
    imgsent.extract([str(mixed)], str(tmp_path / "b4"), **kw)
    imgsent.extract([str(mixed)], str(tmp_path / "b3"), **{**kw, "batch_size": 3, "workers": 1})
    x4, x3 = (imgsent.features.load(str(tmp_path / s)).X for s in ("b4", "b3"))
    np.testing.assert_array_equal(x4, x3)


def test_device_decoding_settings_are_checked():
    with pytest.raises(ImgsentError, match="local engine"):
        imgsent.options.RunOptions.build(decode="device", engine="ray")
    with pytest.raises(ImgsentError, match="decode must be one of"):
        imgsent.options.RunOptions.build(decode="gpu")
    lanczos = imgsent.create_backbone(TINY, random_weights=True)
    lanczos.preprocess = Preprocess((160, 160), 160, "lanczos")
    with pytest.raises(ImgsentError, match="lanczos"):
        FeatureEngine([lanczos], decode="device")


def test_the_cli_takes_decode(mixed, tmp_path, capsys, monkeypatch):
    store = tmp_path / "s"
    args = ["extract", mixed, "-o", store, "-B", TINY, "--random-weights", "--workers", "0", "--decode", "device"]
    code, _, err = run_cli(args, capsys, monkeypatch)
    assert code == 0, err
    assert imgsent.features.load(str(store)).header["decode"] == "device"
    code, _, err = run_cli([*args[:-1], "gpu"], capsys, monkeypatch)
    assert code == 2 and "gpu" in err


def test_device_decoding_works_group_by_group(mixed, monkeypatch):
    """Groups smaller than the batch give the same views, and a refusal is placed right."""
    jpegs, refs = [], []
    for path in sorted(mixed.glob("a*.jpg")):
        refs.append(read_jpeg(ImageRef(path.name, str(path))))
        jpegs.append(torch.from_numpy(refs[-1].jpeg))
    jpegs.insert(2, torch.tensor([0xFF, 0xD8, 0xFF, 0xD9], dtype=torch.uint8))  # no image in it
    orientations = [1] * len(jpegs)
    whole, failed = devicedecode.decode_views(jpegs, orientations, PPS, "none", torch.device("cpu"))
    monkeypatch.setattr(devicedecode, "DECODE_GROUP", 2)
    grouped, failed2 = devicedecode.decode_views(jpegs, orientations, PPS, "none", torch.device("cpu"))
    assert failed == failed2 == [2]
    for key in whole:
        assert whole[key].shape[0] == len(refs)
        assert torch.equal(whole[key], grouped[key])


def test_shared_memory_check_counts_whole_jpegs_for_device_decoding(monkeypatch):
    import collections

    from imgsent import loader as engine

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(engine.shutil, "disk_usage", lambda p: usage(64 << 20, 54 << 20, 10 << 20))
    monkeypatch.setattr(engine.os.path, "isdir", lambda p: True)
    pp = [Preprocess((160, 160), 160)]  # 75 KB a view: 4.7 MB in flight for 2 workers x batch 4
    engine.check_shared_memory(2, 4, pp, "none")
    with pytest.raises(ImgsentError, match="shm-size"):  # 512 KB a JPEG: 16 MB
        engine.check_shared_memory(2, 4, pp, "none", "device")
