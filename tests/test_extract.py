import json
import os

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import TINY, TINY2, write_images

import imgsent.shards
from imgsent.errors import ImgsentError
from imgsent.extraction import extract
from imgsent.features import load
from imgsent.shards import MANIFEST_KEY, read_manifest

KW = dict(backbones=[TINY], random_weights=True, workers=0, batch_size=4)


@pytest.fixture
def images(tmp_path):
    d = tmp_path / "imgs"
    write_images(d, 9)
    (d / "bad.jpg").write_text("not an image")
    (d / "empty.png").write_bytes(b"")
    return d


def test_store_has_every_input_once_with_status_and_manifest(images, tmp_path):
    out = tmp_path / "store"
    s = extract([str(images)], str(out), rows_per_shard=4, **KW)
    assert (s.total, s.ok, s.errors) == (11, 9, 2)
    m = read_manifest(str(out / "_manifest.parquet"))
    assert m["complete"] and m["rows"] == 11 and len(m["shards"]) == 3
    bb = m["header"]["backbones"][0]
    assert (
        bb["key"] == TINY
        and bb["dim"] == 96
        and "sha256" in bb["fingerprint"]
        and bb["preprocess"]["input_size"] == [160, 160]
    )
    df = pl.read_parquet(str(out / "part-*.parquet"))
    assert df.height == 11 and df["id"].n_unique() == 11
    assert set(df.columns) >= {"id", "path", "status", "error", "width", "height", TINY}
    bad = df.filter(pl.col("status") == "error")
    assert sorted(bad["id"].to_list()) == ["bad.jpg", "empty.png"]
    assert bad["error"].null_count() == 0 and bad[TINY].null_count() == 2
    assert df.filter(pl.col("status") == "ok")["width"].to_list() == [120] * 9


def test_load_returns_sorted_ids_and_one_matrix(images, tmp_path):
    out = str(tmp_path / "store")
    extract([str(images)], out, **{**KW, "backbones": [TINY, TINY2]})
    fs = load(out)
    assert fs.X.shape == (9, 96 + 256) and fs.X.dtype == np.float32
    assert fs.ids == sorted(fs.ids) and np.isfinite(fs.X).all()
    only2 = load(out, backbones=[TINY2])
    assert np.array_equal(only2.X, fs.X[:, 96:])
    everything = load(out, only_ok=False)
    assert len(everything) == 11 and np.isnan(everything.X[~everything.ok]).all()
    with pytest.raises(ImgsentError, match="no backbone"):
        load(out, backbones=["timm:nope"])


def test_float16_store(images, tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    extract([str(images)], a, **KW)
    extract([str(images)], b, dtype="float16", **KW)
    assert pq.read_schema(os.path.join(b, "part-00000.parquet")).field(TINY).type.value_type.bit_width == 16
    np.testing.assert_allclose(load(a).X, load(b).X, rtol=2e-3, atol=1e-3)


def test_workers_do_not_change_results(images, tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    extract([str(images)], a, **KW)
    extract([str(images)], b, **{**KW, "workers": 2})
    np.testing.assert_array_equal(load(a).X, load(b).X)


def test_other_backbones_refused_unless_overwrite(images, tmp_path):
    out = str(tmp_path / "store")
    extract([str(images)], out, **KW)
    with pytest.raises(ImgsentError, match="backbones"):
        extract([str(images)], out, **{**KW, "backbones": [TINY2]})
    extract([str(images)], out, overwrite=True, **{**KW, "backbones": [TINY2]})
    assert load(out).blocks == [(TINY2, 256)]


def test_resume_after_interruption_equals_uninterrupted(images, tmp_path, interrupt_after_commits):
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    extract([str(images)], full, rows_per_shard=3, **KW)
    interrupt_after_commits.arm(2, KeyboardInterrupt("simulated kill"))
    with pytest.raises(KeyboardInterrupt):
        extract([str(images)], part, rows_per_shard=3, **KW)
    m = read_manifest(os.path.join(part, "_manifest.parquet"))
    assert not m["complete"] and len(m["shards"]) == 2
    interrupt_after_commits.disarm()
    s = extract([str(images)], part, rows_per_shard=3, **KW)
    assert s.resumed == 6 and s.errors == 2
    a, b = load(full, only_ok=False), load(part, only_ok=False)
    assert a.ids == b.ids and a.status == b.status
    np.testing.assert_array_equal(a.X, b.X)
    assert sorted(os.listdir(part)) == sorted(os.listdir(full))


def test_a_killed_writers_temporary_files_are_removed_on_resume_but_not_another_jobs(images, tmp_path):
    # A process killed while writing a part or replacing its manifest leaves a '.tmp-' file.
    out = tmp_path / "store"
    extract([str(images)], str(out), rows_per_shard=4, shard="0/2", **KW)
    mine = [".tmp-_manifest.shard-0-of-2.parquet.k1ll3d.tmp", ".tmp-part-shard-0-of-2-00001.parquet.k1ll3d.tmp"]
    theirs = [".tmp-_manifest.shard-1-of-2.parquet.w0rk1n.tmp", ".tmp-part-shard-1-of-2-00000.parquet.w0rk1n.tmp"]
    for name in mine + theirs:
        (out / name).write_bytes(b"half written")
    extract([str(images)], str(out), rows_per_shard=4, shard="0/2", **KW)
    left = sorted(p.name for p in out.iterdir() if p.name.startswith(".tmp-"))
    assert left == sorted(theirs)


def test_job_array_shards_read_together(images, tmp_path):
    full, split = str(tmp_path / "full"), str(tmp_path / "split")
    extract([str(images)], full, **KW)
    for i in range(3):
        extract([str(images)], split, shard=f"{i}/3", **KW)
    assert len([f for f in os.listdir(split) if f.startswith("_manifest")]) == 3
    a, b = load(full, only_ok=False), load(split, only_ok=False)
    assert a.ids == b.ids
    # The jobs batch other images together; fixed-size micro-batches make features identical anyway.
    np.testing.assert_array_equal(a.X, b.X)


def test_second_writer_is_refused_and_dead_lock_taken_over(images, tmp_path):
    out = tmp_path / "store"
    out.mkdir()
    lock = out / "._manifest.parquet.lock"
    import socket

    lock.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))  # alive: us
    with pytest.raises(ImgsentError, match="another imgsent process"):
        extract([str(images)], str(out), **KW)
    lock.write_text(json.dumps({"pid": 2**22 + 12345, "host": socket.gethostname()}))  # dead pid
    assert extract([str(images)], str(out), **KW).total == 11
    assert not lock.exists()


def test_malformed_manifest_is_refused_clearly(images, tmp_path):
    out = tmp_path / "store"
    extract([str(images)], str(out), **KW)
    path = str(out / "_manifest.parquet")
    m = read_manifest(path)
    m.pop("schema")
    for broken in [
        "{not json",
        json.dumps({**m, "shards": [{"file": "../../etc/passwd", "rows": 1, "index": 0}]}),
        json.dumps({**m, "header": 5}),
        json.dumps({**m, "format_version": 99}),
    ]:
        pq.write_table(
            pa.table({"id": pa.array([], pa.string())}).replace_schema_metadata({MANIFEST_KEY: broken}), path
        )
        with pytest.raises(ImgsentError):
            load(str(out))
    (out / "_manifest.parquet").write_text("not parquet at all")
    with pytest.raises(ImgsentError, match="not a valid manifest"):
        load(str(out))


def test_tta_flip_changes_features_and_is_recorded(images, tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    extract([str(images)], a, **KW)
    extract([str(images)], b, tta="flip", **KW)
    assert load(b).header["tta"] == "flip"
    assert not np.allclose(load(a).X, load(b).X)


def test_read_only_output_gives_clear_error(images, tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root can write to read-only directories")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    with pytest.raises(ImgsentError, match="cannot write"):
        extract([str(images)], str(ro / "store"), **KW)


def test_a_dying_decoder_process_is_survived(images, tmp_path, monkeypatch):
    """A decoder that segfaults on one file: that image becomes an error row, the rest are ok."""
    import signal

    import imgsent.decode

    real = imgsent.decode.decode_image

    def crashing(path, **kw):
        if path.endswith("img004.jpg"):
            import faulthandler

            faulthandler.disable()  # keep the test log free of the expected crash dump
            os.kill(os.getpid(), signal.SIGSEGV)
        return real(path, **kw)

    monkeypatch.setattr(imgsent.decode, "decode_image", crashing)
    out = str(tmp_path / "store")
    s = extract([str(images)], out, **{**KW, "workers": 1})
    assert (s.total, s.errors) == (11, 3)
    fs = load(out, only_ok=False)
    reasons = dict(zip(fs.ids, fs.error))
    assert "died" in reasons["img004.jpg"]
    assert sum(st == "ok" for st in fs.status) == 8


def test_shards_are_written_in_fixed_row_groups(images, tmp_path, monkeypatch):
    """Readers split shards by row group, so every shard has equal groups whatever the batch size."""
    monkeypatch.setattr(imgsent.shards, "ROW_GROUP_ROWS", 3)
    out = str(tmp_path / "s")
    extract([str(images)], out, rows_per_shard=7, **KW)  # batches of 4, shards of 7 rows
    files = sorted(f for f in os.listdir(out) if f.startswith("part-"))
    sizes = [
        [
            pq.ParquetFile(os.path.join(out, f)).metadata.row_group(g).num_rows
            for g in range(pq.ParquetFile(os.path.join(out, f)).num_row_groups)
        ]
        for f in files
    ]
    assert sizes == [[3, 3, 1], [3, 1]]
    assert load(out, only_ok=False).ids == sorted(os.listdir(images))


def test_shard_writing_runs_in_order_off_the_main_thread_and_its_errors_come_back():
    import threading

    from imgsent.lanes import behind

    seen = []

    def write_all(items):
        for i in items:
            seen.append((i, threading.current_thread() is threading.main_thread()))
            if i == 3:
                raise OSError(28, "No space left on device")

    put = 0
    with pytest.raises(OSError, match="No space left"):
        with behind(write_all, depth=2) as w:
            for i in range(10):
                w.put(i)
                put += 1
    assert [i for i, _ in seen] == [0, 1, 2, 3] and not any(main for _, main in seen)
    assert put <= 4 + 2 + 1  # at most `depth` items queued after the failing one, never all ten


def test_a_writing_stage_stopped_by_its_feeder_cleans_up_in_its_own_hands():
    from imgsent.lanes import Stopped, behind

    events = []

    def write_all(items):
        try:
            for i in items:
                events.append(i)
        except Stopped:
            events.append("stopped")
            raise

    with pytest.raises(KeyboardInterrupt):
        with behind(write_all) as w:
            w.put(1)
            while events != [1]:
                pass
            raise KeyboardInterrupt
    assert events == [1, "stopped"]  # the stage saw the stop (its files aborted by it), then the block ended
    with behind(lambda items: sum(items)) as w:
        for i in range(5):
            w.put(i)
    assert w.result == 10


def test_shards_a_worker_wrote_where_the_driver_cannot_see_them_are_refused(images, tmp_path, monkeypatch):
    """An engine whose workers write the shards (Ray) on a disk of their own, not the shared output:
    one line saying the output must be shared, never a manifest listing files that are not there."""
    from imgsent.engine import FeatureEngine
    from imgsent.shards import ShardTarget, write_chunk

    class ElsewhereEngine:  # writes every shard as a worker would, but into another directory
        def __init__(self, models, options):
            self.local = FeatureEngine(models, options)
            self.keys, self.numerics, self.decoder = self.local.keys, self.local.numerics, self.local.decoder
            self.runtime_record = self.local.runtime_record

        def write_shards(self, refs, items, outputs, done, progress):
            elsewhere = [(ShardTarget(str(tmp_path / "worker-disk"), t.shard), f) for t, f in outputs]
            for item in items:
                c = item.chunk
                done(write_chunk(self.local.run(refs[c.start : c.stop]), item, elsewhere), 0)
            return {}

    (tmp_path / "worker-disk").mkdir()
    monkeypatch.setattr(
        imgsent.extraction, "build_engine", lambda models, options, **kw: ElsewhereEngine(models, options)
    )
    monkeypatch.setattr(imgsent.shards, "VISIBLE_WAIT_S", 0.3)
    out = tmp_path / "S"
    with pytest.raises(ImgsentError, match=r"does not see it .* filesystem every node shares"):
        extract([str(images)], str(out), rows_per_shard=3, **KW)
    assert (tmp_path / "worker-disk" / "part-00000.parquet").is_file()
    assert not (out / "_manifest.parquet").exists()  # nothing was listed
