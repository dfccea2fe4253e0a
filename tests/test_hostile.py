"""Hostile and odd inputs, crashes and full disks: no case may crash or hang a run, lose work,
or let a partial shard be read as complete."""

import errno
import io
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
from conftest import TINY, jpeg_bytes, rgb_array
from PIL import Image

import imgsent
import imgsent.shards
from imgsent.errors import ImgsentError
from imgsent.shards import read_manifest

# the models these tests train (a few epochs on generated images) are throwaway: what they learn is not the point
pytestmark = pytest.mark.filterwarnings("ignore::imgsent.errors.UselessModelWarning")

KW = dict(backbones=[TINY], random_weights=True, workers=1, batch_size=4)


def _exif(orientation: int) -> bytes:
    e = Image.Exif()
    e[0x0112] = orientation
    return e.tobytes()


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    """name -> expected status ('ok' or 'error') for a corpus of nasty files."""
    d = tmp_path_factory.mktemp("hostile")
    expect = {}

    def put(name, data, status):
        (d / name).write_bytes(data)
        expect[name] = status

    def img(name, im, status="ok", **kw):
        buf = io.BytesIO()
        im.save(buf, **kw)
        put(name, buf.getvalue(), status)

    jpg = jpeg_bytes(rgb_array(120, 160))
    put("zero.jpg", b"", "error")
    put("truncated.jpg", jpg[: len(jpg) // 2], "error")
    png = io.BytesIO()
    Image.fromarray(rgb_array(120, 160)).save(png, "PNG")
    put("truncated.png", png.getvalue()[: len(png.getvalue()) // 2], "error")
    put("text.jpg", b"just some text\n" * 10, "error")
    put("jpeg_named.png", jpg, "ok")
    put("error_page.jpg", b"<!DOCTYPE html><html><body><h1>403 Forbidden</h1></body></html>", "error")
    img("cmyk.jpg", Image.fromarray(rgb_array(50, 60)).convert("CMYK"), format="JPEG")
    img("grey16.png", Image.fromarray((np.arange(3000).reshape(50, 60) * 20).astype(np.uint16)), format="PNG")
    pal = Image.fromarray(rgb_array(50, 60)).convert("P")
    img("palette_transparent.png", pal, format="PNG", transparency=0)
    img("one_bit.png", Image.fromarray(rgb_array(50, 60)).convert("1"), format="PNG")
    img("rgba.webp", Image.fromarray(rgb_array(50, 60)).convert("RGBA"), format="WEBP")
    frames = [Image.new("RGB", (30, 30), c) for c in [(255, 0, 0), (0, 255, 0)]]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], loop=0)
    put("animated.gif", buf.getvalue(), "ok")
    img("tiny_1x1.png", Image.new("RGB", (1, 1), (10, 20, 30)), format="PNG")
    img("bomb_20000x20000.png", Image.new("1", (20000, 20000)), "error", format="PNG")
    img("strip_10000x1.png", Image.fromarray(rgb_array(1, 10000)), format="PNG")
    img("exif6.jpg", Image.fromarray(rgb_array(40, 80)), format="JPEG", exif=_exif(6))
    img("exif8.jpg", Image.fromarray(rgb_array(40, 80)), format="JPEG", exif=_exif(8))
    seg = b"Exif\x00\x00" + b"\xff\x00garbage" * 4
    put("corrupt_exif.jpg", jpg[:2] + b"\xff\xe1" + (len(seg) + 2).to_bytes(2, "big") + seg + jpg[2:], "ok")
    (d / "dir.jpg").mkdir()  # an empty directory named like an image: walked, never a row
    (d / "x.jpg").mkdir()  # a directory named like an image, holding images: they are read
    (d / "x.jpg" / "inner.jpg").write_bytes(jpg)
    expect["x.jpg/inner.jpg"] = "ok"
    (d / "empty" / "deeper" / "deepest").mkdir(parents=True)
    os.symlink(d / "no-such-target.png", d / "y.png")  # dangling
    expect["y.png"] = "error"
    os.mkfifo(d / "z.jpg")  # opening it would block forever
    expect["z.jpg"] = "error"
    os.symlink(d / "loop.jpg", d / "loop.jpg")
    expect["loop.jpg"] = "error"
    put("with space 'quote\".jpg", jpg, "ok")
    put("x" * 240 + ".jpg", jpg, "ok")
    bad_name = os.fsencode(str(d)) + b"/latin1_caf\xe9.jpg"
    with open(bad_name, "wb") as fh:
        fh.write(jpg)
    expect["latin1_caf\\xe9.jpg"] = "ok"
    if os.geteuid() != 0:
        put("unreadable.jpg", jpg, "error")
        os.chmod(d / "unreadable.jpg", 0)
    return d, expect


def _grow_slowly(path, data, pieces=20, pause=0.05):
    with open(path, "ab") as fh:
        for k in range(pieces):
            fh.write(data[k * len(data) // pieces : (k + 1) * len(data) // pieces])
            fh.flush()
            time.sleep(pause)


def test_every_hostile_case_ends_as_a_row(hostile, tmp_path):
    d, expect = hostile
    growing = d / "growing.jpg"  # an image still being written while the run reads it
    growing.write_bytes(b"")
    writer = threading.Thread(target=_grow_slowly, args=(growing, jpeg_bytes(rgb_array(300, 400))))
    writer.start()
    out = str(tmp_path / "store")
    try:
        s = imgsent.extract([str(d)], out, **KW)
    finally:
        writer.join()
        growing.unlink()
    fs = imgsent.features.load(out, only_ok=False)
    got = dict(zip(fs.ids, fs.status))
    assert got.pop("growing.jpg") in ("ok", "error")  # either way: exactly one row
    assert sorted(got) == sorted(expect), "every input appears exactly once, no directory is a row"
    assert got == expect
    assert s.errors == sum(v == "error" for v in expect.values()) + (fs.status[fs.ids.index("growing.jpg")] == "error")
    reasons = dict(zip(fs.ids, fs.error))
    assert all(reasons[k] for k, v in expect.items() if v == "error")
    assert "over the limit" in reasons["bomb_20000x20000.png"]
    assert np.isfinite(fs.X[fs.ok]).all()


def test_newlines_in_names_through_null_stdin(tmp_path):
    d = tmp_path / "n"
    d.mkdir()
    names = ["new\nline.jpg", "tab\there.jpg", "plain.jpg"]
    for n in names:
        (d / n).write_bytes(jpeg_bytes(rgb_array(30, 30)))
    stdin = io.BytesIO(b"".join(os.fsencode(str(d / n)) + b"\0" for n in names))
    s = imgsent.extract(["-"], str(tmp_path / "s"), null=True, stdin=stdin, **KW)
    assert (s.total, s.errors) == (3, 0)


def test_file_deleted_between_listing_and_decoding(tmp_path, monkeypatch):
    d = tmp_path / "d"
    d.mkdir()
    for i in range(3):
        (d / f"{i}.jpg").write_bytes(jpeg_bytes(rgb_array(30, 30)))
    real = imgsent.inputs.find_images

    def list_then_delete(*a, **kw):
        refs = real(*a, **kw)
        os.unlink(d / "1.jpg")
        return refs

    monkeypatch.setattr(imgsent.inputs, "find_images", list_then_delete)
    imgsent.extract([str(d)], str(tmp_path / "s"), **KW)
    fs = imgsent.features.load(str(tmp_path / "s"), only_ok=False)
    assert dict(zip(fs.ids, fs.status)) == {"0.jpg": "ok", "1.jpg": "error", "2.jpg": "ok"}


def test_disk_full_is_one_clear_error_and_rerun_resumes(tmp_path, monkeypatch):
    d = tmp_path / "d"
    d.mkdir()
    for i in range(6):
        (d / f"{i}.jpg").write_bytes(jpeg_bytes(rgb_array(30, 30, seed=i)))
    out = str(tmp_path / "s")
    real = pq.ParquetWriter.write_table
    calls = {"n": 0}

    def full_disk(self, table, *args, **kwargs):
        if ".tmp-part-" in str(self.where):  # a shard's rows (not a manifest)
            calls["n"] += 1
        if calls["n"] == 2:  # the second shard's write hits a full disk
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, table, *args, **kwargs)

    monkeypatch.setattr(pq.ParquetWriter, "write_table", full_disk)
    with pytest.raises(ImgsentError, match="No space left"):
        imgsent.extract([str(d)], out, rows_per_shard=2, **KW)
    assert calls["n"] == 2, "the error came from the Parquet write"
    assert sorted(os.listdir(out)) == ["_manifest.parquet", "part-00000.parquet"]  # no lock, no partial file
    monkeypatch.setattr(pq.ParquetWriter, "write_table", real)
    s = imgsent.extract([str(d)], out, rows_per_shard=2, **KW)
    assert s.resumed == 2 and len(imgsent.features.load(out)) == 6


def _extract_cmd(src, out):
    args = f"extract {src} --out {out} -B {TINY} --random-weights --rows-per-shard 3 --batch-size 1 --workers 1 -q"
    return [sys.executable, "-m", "imgsent", *args.split()]


def _kill_9_mid_run(cmd, out, env, shards_first: int) -> None:
    """Start ``cmd``, wait until ``shards_first`` shards are committed, kill -9 it there, and check
    the kill landed mid-run (the process was still working, the manifest is not complete)."""
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    manifest = out / "_manifest.parquet"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        try:
            if len(read_manifest(str(manifest))["shards"]) >= shards_first:
                break
        except ImgsentError:
            pass
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not read_manifest(str(manifest))["complete"], "the kill landed after the run had finished"


def test_kill_9_at_random_moments_then_rerun_equals_uninterrupted(tmp_path):
    src = tmp_path / "imgs"
    src.mkdir()
    for i in range(18):
        (src / f"{i:02d}.jpg").write_bytes(jpeg_bytes(rgb_array(60, 80, seed=i)))
    (src / "bad.jpg").write_bytes(b"nope")
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    ref = tmp_path / "ref"
    subprocess.run(_extract_cmd(src, ref), check=True, env=env, timeout=300)
    expected = pl.read_parquet(str(ref / "part-*.parquet")).sort("id")
    rng = np.random.default_rng(0)
    mismatches = 0
    for k in range(2):
        out = tmp_path / f"killed{k}"
        _kill_9_mid_run(_extract_cmd(src, out), out, env, shards_first=int(rng.integers(1, 5)))
        subprocess.run(_extract_cmd(src, out), check=True, env=env, timeout=300)  # rerun: resumes
        got = pl.read_parquet(str(out / "part-*.parquet")).sort("id")
        assert got["id"].n_unique() == got.height == 19
        mismatches += int(not got.drop("path").equals(expected.drop("path")))
    assert mismatches == 0


def test_kill_9_during_score_then_rerun_equals_uninterrupted(tmp_path):
    src = tmp_path / "imgs"
    src.mkdir()
    for i in range(18):
        (src / f"{i:02d}.jpg").write_bytes(jpeg_bytes(rgb_array(60, 80, seed=i)))
    (src / "bad.jpg").write_bytes(b"nope")
    store = str(tmp_path / "store")
    imgsent.extract([str(src)], store, **KW)
    labels = tmp_path / "labels.txt"
    labels.write_text("".join(f"{i:02d}.jpg {i % 2}\n" for i in range(18)))
    imgsent.train(store, labels=str(labels), head="nn", epochs=2, out=str(tmp_path / "model"))
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}

    def cmd(out):
        args = f"score {src} --out {out}/ --model {tmp_path / 'model'} --rows-per-shard 3 --batch-size 1 --workers 1 -q"
        return [sys.executable, "-m", "imgsent", *args.split()]

    subprocess.run(cmd(tmp_path / "ref"), check=True, env=env, timeout=300)
    expected = pl.read_parquet(str(tmp_path / "ref" / "part-*.parquet")).sort("id")
    rng = np.random.default_rng(1)
    mismatches = 0
    for k in range(3):
        out = tmp_path / f"killed{k}"
        _kill_9_mid_run(cmd(out), out, env, shards_first=int(rng.integers(1, 5)))
        subprocess.run(cmd(out), check=True, env=env, timeout=300)
        got = pl.read_parquet(str(out / "part-*.parquet")).sort("id")
        assert got["id"].n_unique() == got.height == 19
        mismatches += int(not got.equals(expected))
    assert mismatches == 0


def test_score_on_the_hostile_corpus_gives_one_row_per_image_file(hostile, tmp_path):
    d, expect = hostile
    train_dir = tmp_path / "train"
    train_dir.mkdir()
    for i in range(6):
        (train_dir / f"{i}.jpg").write_bytes(jpeg_bytes(rgb_array(40, 50, seed=i)))
    store = str(tmp_path / "store")
    imgsent.extract([str(train_dir)], store, **KW)
    (tmp_path / "labels.txt").write_text("".join(f"{i}.jpg {i % 2}\n" for i in range(6)))
    model = str(tmp_path / "model")
    imgsent.train(store, labels=str(tmp_path / "labels.txt"), head="nn", epochs=1, cv=0, out=model)
    out = tmp_path / "scores.csv"
    s = imgsent.score([str(d)], str(out), model=model, workers=1, batch_size=4)
    df = pl.read_csv(out)
    assert sorted(df["id"].to_list()) == sorted(expect), "every image file exactly once, no directory"
    assert dict(zip(df["id"], df["status"])) == expect and s.errors == sum(v == "error" for v in expect.values())
