import io
import os

import pytest

from imgsent.errors import ImgsentError
from imgsent.inputs import find_images, select_shard, shard_of
from imgsent.options import parse_shard


def _touch(p, data=b"x"):
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)


def test_directory_walk_is_recursive_sorted_and_case_insensitive(tmp_path):
    for name in ["b/z.JPG", "a.png", "b/c/d.WebP", "x.txt", "e.TIFF", "f.gif", "g.bmp", "h.jpeg", "i.tif"]:
        _touch(tmp_path / name)
    refs = find_images([str(tmp_path)])
    assert [r.id for r in refs] == ["a.png", "b/c/d.WebP", "b/z.JPG", "e.TIFF", "f.gif", "g.bmp", "h.jpeg", "i.tif"]
    assert all(os.path.isabs(r.path) or r.path.startswith(str(tmp_path)) for r in refs)


def test_hidden_files_and_dirs_skipped_unless_asked(tmp_path):
    _touch(tmp_path / ".hidden.jpg")
    _touch(tmp_path / ".cache" / "a.jpg")
    _touch(tmp_path / "ok.jpg")
    assert [r.id for r in find_images([str(tmp_path)])] == ["ok.jpg"]
    assert len(find_images([str(tmp_path)], include_hidden=True)) == 3


def test_symlink_loop_does_not_hang(tmp_path):
    _touch(tmp_path / "d" / "a.jpg")
    os.symlink(tmp_path / "d", tmp_path / "d" / "loop")
    os.symlink(tmp_path / "self.jpg", tmp_path / "self.jpg")  # a file link pointing at itself
    refs = find_images([str(tmp_path)])
    assert "d/a.jpg" in [r.id for r in refs]
    assert "self.jpg" in [r.id for r in refs]  # listed, so it becomes an error row, not a silent drop
    assert len(refs) < 10


def test_a_directory_named_like_an_image_is_walked_never_a_row(tmp_path):
    (tmp_path / "sub.jpg").mkdir()
    _touch(tmp_path / "sub.jpg" / "a.jpg")
    (tmp_path / "empty.png" / "deeper").mkdir(parents=True)
    assert [r.id for r in find_images([str(tmp_path)])] == ["sub.jpg/a.jpg"]
    assert [r.id for r in find_images([str(tmp_path / "sub.jpg")])] == ["a.jpg"]  # named: walked too
    listed = find_images(["-"], stdin=io.BytesIO(f"{tmp_path / 'sub.jpg'}\n".encode()))
    assert [r.path for r in listed] == [str(tmp_path / "sub.jpg" / "a.jpg")]


def test_stdin_newline_and_null_modes(tmp_path):
    a, b = tmp_path / "a b.jpg", tmp_path / "new\nline.jpg"
    _touch(a)
    _touch(b)
    refs = find_images(["-"], stdin=io.BytesIO(f"{a}\n\n".encode()))
    assert [r.path for r in refs] == [str(a)]
    refs = find_images(["-"], null=True, stdin=io.BytesIO(f"{a}\0{b}\0".encode()))
    assert sorted(r.path for r in refs) == sorted([str(a), str(b)])


def test_list_file_and_missing_paths_are_kept(tmp_path):
    lst = tmp_path / "list.txt"
    lst.write_text("# comment\n/does/not/exist.jpg\n")
    refs = find_images([f"@{lst}"])
    assert [r.id for r in refs] == ["/does/not/exist.jpg"]
    with pytest.raises(ImgsentError, match="cannot read input list"):
        find_images([f"@{tmp_path / 'nope.txt'}"])


def test_several_directories_keep_distinct_ids(tmp_path):
    _touch(tmp_path / "one" / "a.jpg")
    _touch(tmp_path / "two" / "a.jpg")
    refs = find_images([str(tmp_path / "one"), str(tmp_path / "two")])
    assert len({r.id for r in refs}) == 2


def test_non_utf8_names_get_printable_ids(tmp_path):
    name = os.fsencode(str(tmp_path)) + b"/caf\xe9.jpg"
    with open(name, "wb") as fh:
        fh.write(b"x")
    (ref,) = find_images([str(tmp_path)])
    ref.id.encode("utf-8")  # printable/storable
    assert os.path.exists(ref.path)


def test_shards_partition_inputs_deterministically(tmp_path):
    for i in range(50):
        _touch(tmp_path / f"{i}.jpg")
    refs = find_images([str(tmp_path)])
    parts = [select_shard(refs, (i, 4)) for i in range(4)]
    assert sorted(r.id for p in parts for r in p) == sorted(r.id for r in refs)
    assert all(len(p) > 0 for p in parts)
    assert shard_of("abc", 7) == shard_of("abc", 7)
    assert parse_shard("1/4") == (1, 4)
    for bad in ["4/4", "x", "1/0", "-1/2"]:
        with pytest.raises(ImgsentError):
            parse_shard(bad)


def test_no_input_is_an_error():
    with pytest.raises(ImgsentError):
        find_images([])
