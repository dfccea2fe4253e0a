import io
import os

import numpy as np
import pytest
from conftest import jpeg_bytes, rgb_array
from PIL import Image
from torchvision import transforms

from imgsent.decode import DecodeError, Preprocess, decode_image, make_views


def _save(img: Image.Image, path, **kw):
    img.save(path, **kw)
    return str(path)


@pytest.mark.parametrize(
    "mode,fmt",
    [
        ("RGB", "JPEG"),
        ("L", "PNG"),
        ("1", "PNG"),
        ("P", "GIF"),
        ("RGBA", "PNG"),
        ("LA", "PNG"),
        ("CMYK", "JPEG"),
        ("RGB", "WEBP"),
        ("RGBA", "WEBP"),
        ("RGB", "BMP"),
        ("RGB", "TIFF"),
        ("I;16", "PNG"),
    ],
)
def test_every_mode_and_format_decodes_to_rgb(tmp_path, mode, fmt):
    base = Image.fromarray(rgb_array(40, 50))
    img = (
        base.convert(mode)
        if mode != "I;16"
        else Image.fromarray((np.arange(2000).reshape(40, 50) * 30).astype(np.uint16))
    )
    path = _save(img, tmp_path / f"x.{fmt.lower()}", format=fmt)
    out, size = decode_image(path)
    assert out.mode == "RGB" and out.size == (50, 40) and size == (50, 40)


def test_16bit_grey_is_scaled_not_clipped(tmp_path):
    arr = np.full((8, 8), 65535, dtype=np.uint16)
    arr[:, :4] = 257 * 100
    path = _save(Image.fromarray(arr), tmp_path / "g16.png")
    out, _ = decode_image(path)
    px = np.asarray(out)
    assert px[0, 0, 0] == 100 and px[0, 7, 0] == 255


def test_transparency_is_composited_on_white(tmp_path):
    rgba = Image.new("RGBA", (10, 10), (255, 0, 0, 0))  # fully transparent red
    out, _ = decode_image(_save(rgba, tmp_path / "t.png"))
    assert np.asarray(out)[0, 0].tolist() == [255, 255, 255]
    pal = Image.new("P", (10, 10), 0)
    pal.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    pal.info["transparency"] = 0
    out, _ = decode_image(_save(pal, tmp_path / "p.png", transparency=0))
    assert np.asarray(out)[0, 0].tolist() == [255, 255, 255]


def test_animated_gif_uses_first_frame(tmp_path):
    frames = [Image.new("RGB", (8, 8), c) for c in [(255, 0, 0), (0, 0, 255)]]
    path = str(tmp_path / "a.gif")
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)
    out, _ = decode_image(path)
    r, g, b = np.asarray(out)[0, 0]
    assert r > 200 and b < 50


@pytest.mark.parametrize("orientation,expect_size", [(1, (60, 30)), (6, (30, 60)), (8, (30, 60)), (3, (60, 30))])
def test_exif_orientation_is_applied(tmp_path, orientation, expect_size):
    img = Image.fromarray(rgb_array(30, 60))
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = _save(img, tmp_path / "o.jpg", exif=exif.tobytes())
    out, size = decode_image(path)
    assert out.size == expect_size and size == expect_size


def test_corrupt_exif_keeps_pixels(tmp_path):
    data = bytearray(jpeg_bytes(rgb_array(20, 30)))
    # Insert an APP1 "Exif" segment with garbage after SOI.
    garbage = b"Exif\x00\x00" + b"\xff\x00garbage" * 4
    seg = b"\xff\xe1" + (len(garbage) + 2).to_bytes(2, "big") + garbage
    path = tmp_path / "e.jpg"
    path.write_bytes(bytes(data[:2]) + seg + bytes(data[2:]))
    out, size = decode_image(str(path))
    assert size == (30, 20)


def test_big_jpeg_is_draft_decoded_but_reports_full_size(tmp_path):
    path = tmp_path / "big.jpg"
    path.write_bytes(jpeg_bytes(rgb_array(2400, 3200)))
    out, size = decode_image(str(path), min_short_side=256)
    assert size == (3200, 2400)
    assert out.size == (800, 600)  # 1/4 scale: the largest that keeps the short side >= 2 x 256


@pytest.mark.parametrize("w,h", [(1920, 1080), (1080, 1920), (4000, 3000), (600, 520)])
def test_draft_decoded_views_match_a_full_decode(tmp_path, w, h):
    from imgsent.decode import Preprocess, make_views

    path = tmp_path / "photo.jpg"
    path.write_bytes(jpeg_bytes(rgb_array(h, w, seed=w), quality=92))
    pp = Preprocess(input_size=(224, 224), resize_size=256)
    draft, _ = decode_image(str(path), min_short_side=pp.needed_short_side())
    full, _ = decode_image(str(path))
    assert min(draft.size) >= 512 and (min(draft.size) < 2 * 512 or min(w, h) < 1024)
    a = make_views(draft, [pp])[pp.view_key].astype(np.float32)
    b = make_views(full, [pp])[pp.view_key].astype(np.float32)
    assert np.abs(a - b).mean() < 1.0 and np.abs(a - b).max() < 24  # grey levels of 255


def test_bomb_limit(tmp_path):
    path = _save(Image.new("L", (3000, 3000)), tmp_path / "bomb.png")
    with pytest.raises(DecodeError, match="over the limit"):
        decode_image(path, max_pixels=1_000_000)


@pytest.mark.parametrize(
    "name,data,reason",
    [
        ("zero.jpg", b"", r"^empty file \(0 bytes\)$"),  # not "not a recognised image format" (issue 35)
        ("text.jpg", b"hello, not an image", "not a recognised image"),
        ("page.jpg", b"<html><body>404 Not Found</body></html>", "not a recognised image"),
    ],
)
def test_unreadable_files_raise_decode_error(tmp_path, name, data, reason):
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(DecodeError, match=reason):
        decode_image(str(path))


def test_truncated_jpeg_and_png(tmp_path):
    jpg = jpeg_bytes(rgb_array(200, 200))
    (tmp_path / "t.jpg").write_bytes(jpg[: len(jpg) // 2])
    buf = io.BytesIO()
    Image.fromarray(rgb_array(200, 200)).save(buf, "PNG")
    (tmp_path / "t.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    reasons = []
    for name in ("t.jpg", "t.png"):
        with pytest.raises(DecodeError) as exc:
            decode_image(str(tmp_path / name))
        reasons.append(str(exc.value))
    # the reasons a person reads in the error column: what happened, not Pillow's exception (issue 35)
    assert all(not r.startswith("OSError") for r in reasons), reasons
    assert any(r.startswith("truncated file: the image data ends early") for r in reasons), reasons
    (tmp_path / "e.jpg").write_bytes(b"")
    with pytest.raises(DecodeError, match=r"^empty file \(0 bytes\)$"):
        decode_image(str(tmp_path / "e.jpg"))


def test_jpeg_named_png_still_decodes(tmp_path):
    path = tmp_path / "really_jpeg.png"
    path.write_bytes(jpeg_bytes(rgb_array(20, 20)))
    out, _ = decode_image(str(path))
    assert out.size == (20, 20)


def test_missing_directory_and_permission(tmp_path):
    with pytest.raises(DecodeError, match="not found"):
        decode_image(str(tmp_path / "gone.jpg"))
    (tmp_path / "d.jpg").mkdir()
    with pytest.raises(DecodeError, match="directory"):
        decode_image(str(tmp_path / "d.jpg"))
    if os.geteuid() != 0:  # root reads anything
        p = tmp_path / "secret.jpg"
        p.write_bytes(jpeg_bytes(rgb_array(10, 10)))
        p.chmod(0)
        with pytest.raises(DecodeError, match="permission"):
            decode_image(str(p))


@pytest.mark.parametrize("size", [(300, 200), (200, 300), (224, 224), (100, 60)])
@pytest.mark.parametrize("interp", ["bilinear", "bicubic"])
def test_views_match_torchvision_transforms_exactly(size, interp):
    img = Image.fromarray(rgb_array(size[1], size[0], seed=3))
    pp = Preprocess(input_size=(224, 224), resize_size=256, interpolation=interp)
    mode = transforms.InterpolationMode(interp)
    ref = transforms.Compose([transforms.Resize(256, interpolation=mode), transforms.CenterCrop(224)])(img)
    view = make_views(img, [pp])[pp.view_key]
    assert view.shape == (1, 3, 224, 224)
    assert np.array_equal(view[0].transpose(1, 2, 0), np.asarray(ref))


def test_views_shared_between_equal_preprocessing_and_crops_tta():
    img = Image.fromarray(rgb_array(100, 140))
    a = Preprocess(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    b = Preprocess()
    views = make_views(img, [a, b])
    assert len(views) == 1  # normalisation differs, pixels are shared
    views = make_views(img, [b], tta="crops")
    assert views[b.view_key].shape == (5, 3, 224, 224)


def test_extreme_aspect_ratio_stays_small():
    img = Image.fromarray(rgb_array(1, 10000))
    pp = Preprocess()
    view = make_views(img, [pp])[pp.view_key]
    assert view.shape == (1, 3, 224, 224)
