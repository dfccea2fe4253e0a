"""Images where big collections live (issue 24): WebDataset / img2dataset tar shards read member by
member by offset, and image columns in Parquet (binary, or Hugging Face's {bytes, path} struct);
every input exactly one row, hostile ones error rows with their reason."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import TINY, imgsent_cli, jpeg_bytes, rgb_array, run_cli, write_images

import imgsent
from imgsent.errors import ImgsentWarning

KW = {"backbones": [TINY], "random_weights": True, "workers": 0, "progress": False}


def _add(tar: tarfile.TarFile, name: str, data: bytes, **info) -> None:
    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    for k, v in info.items():
        setattr(ti, k, v)
    tar.addfile(ti, io.BytesIO(data) if ti.isreg() else None)


def webdataset_shards(root: Path, shards: int = 2, per_shard: int = 3) -> dict[str, bytes]:
    """img2dataset-like shards: KEY.jpg, KEY.json, KEY.txt; returns {id: jpeg bytes}."""
    root.mkdir(parents=True, exist_ok=True)
    images = {}
    for s in range(shards):
        with tarfile.open(root / f"{s:05d}.tar", "w") as tar:
            for k in range(per_shard):
                key = f"{s:05d}{k:04d}"
                data = jpeg_bytes(rgb_array(60 + 4 * k, 80, 10 * s + k))
                images[f"{s:05d}/{key}"] = data
                _add(tar, f"{key}.jpg", data)
                _add(tar, f"{key}.json", json.dumps({"key": key, "url": f"https://x.org/{key}.jpg"}).encode())
                _add(tar, f"{key}.txt", b"a caption")
    return images


def test_tar_shards_give_the_features_of_the_same_images_as_files(tmp_path):
    images = webdataset_shards(tmp_path / "shards")
    folder = tmp_path / "folder"
    for rid, data in images.items():
        (folder / rid).parent.mkdir(parents=True, exist_ok=True)
        (folder / f"{rid}.jpg").write_bytes(data)
    imgsent.extract([str(tmp_path / "shards")], str(tmp_path / "a"), **KW)
    imgsent.extract([str(folder)], str(tmp_path / "b"), **KW)
    a, b = imgsent.features.load(str(tmp_path / "a")), imgsent.features.load(str(tmp_path / "b"))
    assert a.ids == sorted(images) and [i + ".jpg" for i in a.ids] == b.ids
    np.testing.assert_array_equal(a.X, b.X)
    assert a.paths[0] == f"{tmp_path / 'shards' / '00000.tar'}/000000000.jpg"
    # a brace range, quoted (as from a list), names the same shards; ids keep the path as given
    pattern = f"{tmp_path / 'shards'}/{{00000..00001}}.tar"
    imgsent.extract([pattern], str(tmp_path / "c"), **KW)
    c = imgsent.features.load(str(tmp_path / "c"))
    assert c.ids == [f"{tmp_path / 'shards'}/{i}" for i in sorted(images)]
    np.testing.assert_array_equal(c.X, a.X)


def test_score_a_tar_shard_from_the_cli_resumes_and_keeps_every_row(tmp_path):
    images = webdataset_shards(tmp_path / "shards", shards=3, per_shard=4)
    out = f"{tmp_path / 'scores'}/"
    store = tmp_path / "m"
    labels = tmp_path / "l.txt"
    labels.write_text("".join(f"{rid} {k % 2}\n" for k, rid in enumerate(sorted(images))))
    imgsent.extract([str(tmp_path / "shards")], str(tmp_path / "S"), **KW)
    with pytest.warns(ImgsentWarning):  # a throwaway model: it may learn nothing
        imgsent.train(str(tmp_path / "S"), labels=str(labels), epochs=1, cv=0, out=str(store))
    r = imgsent_cli("score", tmp_path / "shards", "--model", store, "--out", out, "--rows-per-shard", "5", "-q")
    assert r.returncode == 0, r.stderr
    got = pq.read_table(out).to_pydict()
    assert sorted(got["id"]) == sorted(images) and set(got["status"]) == {"ok"}


def _hostile_tar(path: Path) -> dict[str, str]:
    """A shard holding every kind of bad member; returns {id: expected status or reason fragment}."""
    good = jpeg_bytes(rgb_array(40, 50, 1))
    with tarfile.open(path, "w") as tar:
        _add(tar, "a.jpg", good)
        _add(tar, "../escape.jpg", good)
        _add(tar, "/etc/absolute.jpg", good)
        _add(tar, "link.jpg", b"", type=tarfile.SYMTYPE, linkname="a.jpg")
        _add(tar, "dev.jpg", b"", type=tarfile.CHRTYPE, devmajor=1, devminor=3)
        _add(tar, "notes.txt", b"not an image, not a row")
        _add(tar, "text.jpg", b"this is no jpeg")
        _add(tar, "a.jpg", jpeg_bytes(rgb_array(40, 50, 2)))  # a duplicate key
        _add(tar, "b.jpg", good)
    return {
        "h/a": "ok",
        "h/a#2": "ok",
        "h/b": "ok",
        "h/../escape": "leaves the archive",
        "h//etc/absolute": "leaves the archive",
        "h/link": "is a link",
        "h/dev": "device",
        "h/text": "not a recognised image format",
    }


def test_every_hostile_tar_member_is_one_row_with_its_reason(tmp_path):
    expect = _hostile_tar(tmp_path / "h.tar")
    imgsent.extract([str(tmp_path / "h.tar")], str(tmp_path / "s"), **KW)
    fs = imgsent.features.load(str(tmp_path / "s"), only_ok=False)
    got = {i: (s if s == "ok" else e) for i, s, e in zip(fs.ids, fs.status, fs.error)}
    assert sorted(got) == sorted(expect)
    for rid, want in expect.items():
        assert want in got[rid], (rid, got[rid])
    assert not (tmp_path / "escape.jpg").exists() and not (tmp_path.parent / "escape.jpg").exists()


def test_a_truncated_tar_keeps_what_came_before_the_cut(tmp_path):
    webdataset_shards(tmp_path / "shards", shards=1, per_shard=4)
    whole = (tmp_path / "shards" / "00000.tar").read_bytes()
    cut = tmp_path / "cut.tar"
    with tarfile.open(tmp_path / "shards" / "00000.tar") as t:
        third = [m for m in t.getmembers() if m.name.endswith(".jpg")][2]
    cut.write_bytes(whole[: third.offset_data + third.size // 2])  # the third image cut in half
    with pytest.warns(ImgsentWarning, match="cut.tar ends early or has a damaged header"):
        imgsent.extract([str(cut)], str(tmp_path / "s"), **KW)
    fs = imgsent.features.load(str(tmp_path / "s"), only_ok=False)
    assert fs.ids == ["cut/000000000", "cut/000000001", "cut/000000002"]
    assert fs.status == ["ok", "ok", "error"] and "truncated" in fs.error[2]


def test_a_member_declaring_2_gb_is_refused_not_read(tmp_path):
    path = tmp_path / "big.tar"
    with tarfile.open(path, "w") as tar:
        _add(tar, "small.jpg", jpeg_bytes(rgb_array(30, 30, 0)))
    header = tarfile.TarInfo("huge.jpg")
    header.size = 2 * 2**30
    with tarfile.open(path) as tar:
        small = tar.getmembers()[0]
    end = small.offset_data + -(-small.size // 512) * 512  # where the zero blocks that end the archive start
    with open(path, "r+b") as fh:  # a header that claims 2 GB, followed by a few bytes only
        fh.seek(end)
        fh.write(header.tobuf(format=tarfile.GNU_FORMAT) + b"\xff\xd8" + b"\0" * 510)
        fh.truncate()
    with pytest.warns(ImgsentWarning, match="ends early"):
        imgsent.extract([str(path)], str(tmp_path / "s"), **KW)
    fs = imgsent.features.load(str(tmp_path / "s"), only_ok=False)
    assert fs.status == ["error", "ok"]  # big/huge, big/small
    assert "2.0 GB, over the 256 MB limit" in fs.error[0]


def test_a_file_named_tar_that_is_no_tar_is_one_error_row(tmp_path):
    (tmp_path / "x.tar").write_bytes(b"\x89PNG not a tar at all" * 40)
    imgsent.extract([str(tmp_path / "x.tar")], str(tmp_path / "s"), **KW)
    fs = imgsent.features.load(str(tmp_path / "s"), only_ok=False)
    assert fs.ids == ["x/"] and fs.status == ["error"] and "not a readable uncompressed tar" in fs.error[0]


def _posts(path: Path, n: int = 5, **extra) -> list[bytes]:
    images = [jpeg_bytes(rgb_array(50, 60 + k, k)) for k in range(n)]
    pq.write_table(
        pa.table({"tweet_id": [f"t{k}" for k in range(n)], "image": images, **extra}), path, row_group_size=2
    )
    return images


def test_a_parquet_image_column_gives_the_features_of_the_same_images_as_files(tmp_path):
    images = _posts(tmp_path / "posts.parquet")
    write_dir = tmp_path / "files"
    write_dir.mkdir()
    for k, data in enumerate(images):
        (write_dir / f"t{k}.jpg").write_bytes(data)
    opts = {"image_column": "image", "id_column": "tweet_id"}
    imgsent.extract([str(tmp_path / "posts.parquet")], str(tmp_path / "a"), **KW, **opts)
    imgsent.extract([str(write_dir)], str(tmp_path / "b"), **KW)
    a, b = imgsent.features.load(str(tmp_path / "a")), imgsent.features.load(str(tmp_path / "b"))
    assert a.ids == [f"t{k}" for k in range(5)] and b.ids == [f"t{k}.jpg" for k in range(5)]
    np.testing.assert_array_equal(a.X, b.X)
    assert a.paths[3] == f"{tmp_path / 'posts.parquet'}#3"
    # no --id-column: the row number; a dataset folder of several files: FILE/ROW
    imgsent.extract([str(tmp_path / "posts.parquet")], str(tmp_path / "c"), **KW, image_column="image")
    assert imgsent.features.load(str(tmp_path / "c")).ids == ["0", "1", "2", "3", "4"]
    ds = tmp_path / "dataset"
    ds.mkdir()
    _posts(ds / "part-0.parquet", 2)
    _posts(ds / "part-1.parquet", 3)
    imgsent.extract([str(ds)], str(tmp_path / "d"), **KW, image_column="image")
    assert imgsent.features.load(str(tmp_path / "d")).ids == [
        "part-0/0",
        "part-0/1",
        "part-1/0",
        "part-1/1",
        "part-1/2",
    ]


def test_hugging_face_image_structs_nulls_and_text_are_rows_with_reasons(tmp_path):
    good = jpeg_bytes(rgb_array(40, 40, 3))
    column = pa.array(
        [
            {"bytes": good, "path": "a.jpg"},
            None,
            {"bytes": None, "path": "elsewhere/b.jpg"},
            {"bytes": b"junk", "path": None},
        ]
    )
    pq.write_table(pa.table({"image": column}), tmp_path / "hf.parquet")
    pq.write_table(pa.table({"image": ["a/path.jpg", None]}), tmp_path / "text.parquet")
    imgsent.extract([str(tmp_path / "hf.parquet")], str(tmp_path / "s"), **KW, image_column="image")
    fs = imgsent.features.load(str(tmp_path / "s"), only_ok=False)
    assert fs.status == ["ok", "error", "error", "error"]
    assert "is null" in fs.error[1] and "only a path (elsewhere/b.jpg)" in fs.error[2]
    assert "not a recognised image format" in fs.error[3]
    imgsent.extract([str(tmp_path / "text.parquet")], str(tmp_path / "t"), **KW, image_column="image")
    ft = imgsent.features.load(str(tmp_path / "t"), only_ok=False)
    assert ft.status == ["error", "error"] and "is text, not image bytes" in ft.error[0]


def test_parquet_mistakes_are_one_line(tmp_path, capsys, monkeypatch):
    _posts(tmp_path / "posts.parquet", n=3, score=[1, 2, 3])
    base = ["extract", tmp_path / "posts.parquet", "-o", tmp_path / "S", "-B", TINY, "--random-weights"]
    cases = [
        (["--image-column", "nope"], "has no column 'nope' for --image-column"),
        (["--image-column", "score"], "column 'score' of"),
        (["--image-column", "image", "--id-column", "nope"], "no column 'nope' for --id-column"),
        ([], "is a Parquet / Arrow file: give --image-column NAME"),
    ]
    for flags, fragment in cases:
        code, _, err = run_cli([*base, *flags], capsys, monkeypatch)
        assert code == 2 and err.count("\n") == 1 and fragment in err, err
    pq.write_table(pa.table({"id": ["a", "a"], "image": [b"x", b"y"]}), tmp_path / "dup.parquet")
    argv = ["extract", tmp_path / "dup.parquet", "-o", tmp_path / "S", "-B", TINY, "--image-column", "image"]
    code, _, err = run_cli([*argv, "--id-column", "id"], capsys, monkeypatch)
    assert code == 2 and "repeats the id 'a'" in err, err
    write_images(tmp_path / "imgs", 1)
    code, _, err = run_cli(
        ["extract", tmp_path / "imgs", "-o", tmp_path / "S", "-B", TINY, "--id-column", "id"], capsys, monkeypatch
    )
    assert code == 2 and "give --image-column too" in err, err


def test_keep_columns_carries_tar_json_fields_and_parquet_columns_into_the_scores(tmp_path, tiny_model):
    images = webdataset_shards(tmp_path / "shards", shards=1, per_shard=3)
    with tarfile.open(tmp_path / "shards" / "00000.tar", "a") as tar:  # img2dataset writes a status field too
        _add(tar, "000000000.json", json.dumps({"key": "000000000", "status": "success", "n": 7}).encode())
    score = {"model": str(tiny_model), "workers": 0}
    imgsent.score(
        [str(tmp_path / "shards")], str(tmp_path / "s.parquet"), keep_columns=("url,status", "n", "txt"), **score
    )
    got = pq.read_table(tmp_path / "s.parquet").to_pylist()
    assert [g["id"] for g in got] == sorted(images)
    assert got[0]["source_status"] == "success" and got[0]["status"] == "ok"  # never over imgsent's own column
    assert got[0]["n"] == "7" and got[0]["txt"] == "a caption"
    assert got[1]["url"] == "https://x.org/000000001.jpg" and got[1]["source_status"] is None
    _posts(tmp_path / "posts.parquet", n=3, likes=[10, 20, 30])
    posts = [str(tmp_path / "posts.parquet")]
    imgsent.score(posts, str(tmp_path / "p.jsonl"), image_column="image", keep_columns=("*",), **score)
    rows = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert [(row["id"], row["tweet_id"], row["likes"]) for row in rows] == [
        ("0", "t0", "10"),
        ("1", "t1", "20"),
        ("2", "t2", "30"),
    ]
    with pytest.raises(imgsent.ImgsentError, match="no column 'nope' for --keep-columns"):
        imgsent.score(posts, str(tmp_path / "q.jsonl"), image_column="image", keep_columns=("nope",), **score)
    with pytest.warns(ImgsentWarning, match="--keep-columns found no fields"):
        write_images(tmp_path / "plain", 1)
        imgsent.score([str(tmp_path / "plain")], str(tmp_path / "r.jsonl"), keep_columns=("url",), **score)


def test_arrow_ipc_files_as_hugging_face_saves_them(tmp_path):
    images = [jpeg_bytes(rgb_array(40, 50 + k, k)) for k in range(3)]
    column = pa.array([{"bytes": b, "path": f"{k}.jpg"} for k, b in enumerate(images)])
    table = pa.table({"image": column, "label": [0, 1, 0]})
    ds = tmp_path / "saved"
    ds.mkdir()
    with pa.OSFile(str(ds / "data-00000-of-00001.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)  # the stream format, as datasets' save_to_disk writes
    pq.write_table(table, tmp_path / "same.parquet")
    imgsent.extract([str(ds)], str(tmp_path / "a"), **KW, image_column="image")
    imgsent.extract([str(tmp_path / "same.parquet")], str(tmp_path / "b"), **KW, image_column="image")
    a, b = imgsent.features.load(str(tmp_path / "a")), imgsent.features.load(str(tmp_path / "b"))
    assert a.ids == b.ids == ["0", "1", "2"]
    np.testing.assert_array_equal(a.X, b.X)


def test_remote_paths_through_fsspec(tmp_path):
    """``memory://`` and ``file://`` stand in for s3:// / gs:// / hf:// (same fsspec code path)."""
    import fsspec

    images = webdataset_shards(tmp_path / "shards", shards=1, per_shard=3)
    fs = fsspec.filesystem("memory")
    fs.pipe("/bucket/shards/00000.tar", (tmp_path / "shards" / "00000.tar").read_bytes())
    fs.pipe("/bucket/photos/a.jpg", jpeg_bytes(rgb_array(40, 40, 9)))
    fs.pipe("/bucket/photos/notes.txt", b"not an image")
    try:
        imgsent.extract(["memory://bucket"], str(tmp_path / "s"), **KW)
        fs_ = imgsent.features.load(str(tmp_path / "s"), only_ok=False)
        assert fs_.ids == ["photos/a.jpg"] + [f"shards/{i}" for i in sorted(images)]
        assert set(fs_.status) == {"ok"} and fs_.paths[0].startswith("memory://")
        assert fs_.paths[0].endswith("bucket/photos/a.jpg")  # fsspec writes memory:///bucket, s3://bucket
    finally:
        fs.rm("/bucket", recursive=True)
    imgsent.extract([str(tmp_path / "shards")], str(tmp_path / "local"), **KW)
    imgsent.extract([f"file://{tmp_path / 'shards'}"], str(tmp_path / "f"), **KW)
    local, remote = imgsent.features.load(str(tmp_path / "local")), imgsent.features.load(str(tmp_path / "f"))
    assert remote.ids == local.ids
    np.testing.assert_array_equal(remote.X, local.X)
    _posts(tmp_path / "posts.parquet", n=3)
    imgsent.extract([f"file://{tmp_path / 'posts.parquet'}"], str(tmp_path / "p"), **KW, image_column="image")
    assert imgsent.features.load(str(tmp_path / "p")).ids == ["0", "1", "2"]
    r = imgsent_cli("extract", "nosuchfs://x/y", "-o", tmp_path / "S", "-B", TINY, "--random-weights")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "nosuchfs" in r.stderr, r.stderr


def test_members_named_dot_slash_as_tar_c_dir_dot_writes_get_plain_ids(tmp_path):
    with tarfile.open(tmp_path / "t.tar", "w") as tar:
        _add(tar, "./a.jpg", jpeg_bytes(rgb_array(30, 40, 0)))
        _add(tar, "./a.json", json.dumps({"url": "https://x.org/a.jpg"}).encode())
    imgsent.extract([str(tmp_path / "t.tar")], str(tmp_path / "s"), **KW)
    fs = imgsent.features.load(str(tmp_path / "s"))
    assert fs.ids == ["t/a"] and fs.paths == [f"{tmp_path / 't.tar'}/a.jpg"]
    from imgsent.inputs import tar_members

    assert [json.loads(r.meta) for r in tar_members(str(tmp_path / "t.tar"), "t", ("url",))] == [
        {"url": "https://x.org/a.jpg"}
    ]


def test_reports_and_the_label_page_show_images_read_from_tar_shards(tmp_path):
    """Issue 33, bug 1: rows keep each image's source (a tar member here), so a report embeds a
    thumbnail of every image it shows and the labelling page serves them; a folder run's rows keep
    their columns as before."""
    from starlette.testclient import TestClient

    from imgsent.htmlreport import build_report
    from imgsent.labelling import open_session
    from imgsent.labelserver import create_app

    images = webdataset_shards(tmp_path / "shards", shards=2, per_shard=4)
    labels = tmp_path / "l.txt"
    labels.write_text("".join(f"{rid} {k % 2}\n" for k, rid in enumerate(sorted(images))))
    imgsent.extract([str(tmp_path / "shards")], str(tmp_path / "S"), **KW)
    fs = imgsent.features.load(str(tmp_path / "S"))
    assert all(json.loads(s)[0] == "tar" for s in fs.sources)
    write_images(tmp_path / "folder", 3)
    imgsent.extract([str(tmp_path / "folder")], str(tmp_path / "F"), **KW)
    assert imgsent.features.load(str(tmp_path / "F")).sources == [""] * 3
    assert "source" not in pq.read_table(next((tmp_path / "F").glob("part-*.parquet"))).column_names
    with pytest.warns(ImgsentWarning):  # a throwaway model: it may learn nothing
        imgsent.train(str(tmp_path / "S"), labels=str(labels), epochs=1, cv=0, out=str(tmp_path / "M"))
    scores = tmp_path / "scores.parquet"
    imgsent.score([str(tmp_path / "shards")], str(scores), model=str(tmp_path / "M"), workers=0)
    table = pq.read_table(scores).to_pydict()
    assert all(json.loads(s)[0] == "tar" for s in table["source"])
    build_report(str(scores), str(tmp_path / "r.html"), per_class=3)
    page = (tmp_path / "r.html").read_text()
    assert page.count('<img src="data:image/jpeg') == 9 and "no longer readable" not in page  # 3 sheets x 3
    from_store = tmp_path / "from_store.parquet"  # scoring the store keeps the sources too
    imgsent.score(out=str(from_store), model=str(tmp_path / "M"), features=str(tmp_path / "S"))
    assert pq.read_table(from_store).column("source").to_pylist() == fs.sources
    session = open_session(str(tmp_path / "S"), str(tmp_path / "labels.csv"), model=str(tmp_path / "M"))
    try:
        client = TestClient(create_app(session, "tok"), headers={"Authorization": "Bearer tok"})
        img = client.get(client.get("/api/next").json()["image"])
        assert img.status_code == 200 and img.content[:2] == b"\xff\xd8"
    finally:
        session.close()
