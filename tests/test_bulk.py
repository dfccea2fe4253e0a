"""Bulk runs lose nothing: each case run as a user types it (a real subprocess of the CLI)."""

import json
import os
import re
import signal
import stat
import subprocess
import sys
import time
import types

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
from conftest import CLI_ENV, TINY, imgsent_cli, run_cli, write_images

import imgsent
from imgsent.shards import read_manifest

# the models these tests train (a few epochs on generated images) are throwaway: what they learn is not the point
pytestmark = pytest.mark.filterwarnings("ignore::imgsent.errors.UselessModelWarning")

ENV = {**os.environ, **CLI_ENV}
cli = imgsent_cli


def one_error_line(r: subprocess.CompletedProcess, fragment: str) -> None:
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert r.stderr.startswith("imgsent: error: ") and fragment in r.stderr, r.stderr


@pytest.fixture
def here(capsys, monkeypatch):
    """``imgsent ARGS`` run in this process (seconds less than a subprocess, which the tests about
    signals, pipes and the process's environment keep), with a CompletedProcess's fields."""

    def run(*argv):
        code, out, err = run_cli(argv, capsys, monkeypatch)
        return types.SimpleNamespace(returncode=code, stdout=out, stderr=err)

    return run


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """12 images, and a model (NN head over a tiny random backbone) trained on them."""
    root = tmp_path_factory.mktemp("bulk")
    imgs = root / "imgs"
    write_images(imgs, 12)
    store = str(root / "store")
    imgsent.extract([str(imgs)], store, backbones=[TINY], random_weights=True, workers=0)
    labels = root / "labels.txt"
    labels.write_text("".join(f"img{i:03d}.jpg {i % 2}\n" for i in range(12)))
    imgsent.train(store, labels=str(labels), head="nn", epochs=2, cv=0, out=str(root / "model"))
    return {"root": root, "imgs": imgs, "store": store, "model": str(root / "model")}


def test_job_array_into_one_file_is_refused_and_a_shared_directory_keeps_every_row(setup, tmp_path, here):
    imgs, model = setup["imgs"], setup["model"]
    r = here("score", imgs, "--shard", "0/2", "-o", tmp_path / "s.parquet", "--model", model, "-q")
    one_error_line(r, "give a directory")
    assert not (tmp_path / "s.parquet").exists()
    for i in range(2):  # the safe way: every job of the array writes into one directory
        r = here("score", imgs, "--shard", f"{i}/2", "-o", f"{tmp_path / 'scores'}/", "--model", model, "-q")
        assert r.returncode == 0, r.stderr
    ids = pq.read_table(tmp_path / "scores").column("id").to_pylist()
    assert sorted(ids) == [f"img{i:03d}.jpg" for i in range(12)]


def test_a_directory_named_like_an_image_is_walked(setup, tmp_path, here):
    src = tmp_path / "in"
    write_images(src / "sub.jpg", 2)
    r = here("score", src, "-o", tmp_path / "s.csv", "--model", setup["model"], "-q")
    assert r.returncode == 0, r.stderr
    df = pl.read_csv(tmp_path / "s.csv")
    assert sorted(df["id"]) == ["sub.jpg/img000.jpg", "sub.jpg/img001.jpg"] and set(df["status"]) == {"ok"}


def test_a_mistyped_input_is_an_error_and_writes_nothing(setup, tmp_path, here):
    one_error_line(
        here("score", tmp_path / "nosuchdir", "-o", tmp_path / "x.csv", "--model", setup["model"]), "nosuchdir"
    )
    assert not (tmp_path / "x.csv").exists()
    r = here("extract", tmp_path / "nosuchdir", "-o", tmp_path / "S", "-B", TINY, "--random-weights")
    one_error_line(r, "does not exist")
    assert not (tmp_path / "S").exists()


def test_a_directory_without_images_warns_and_exits_0(setup, tmp_path, here):
    (tmp_path / "empty" / "deeper").mkdir(parents=True)
    r = here("extract", tmp_path / "empty", "-o", tmp_path / "S", "-B", TINY, "--random-weights", "-q")
    assert r.returncode == 0
    assert r.stderr.startswith("imgsent: warning: no image files under") and "Traceback" not in r.stderr


def test_plain_progress_lines_in_batch_logs(setup, tmp_path):
    r = cli(
        "extract",
        setup["imgs"],
        "-o",
        tmp_path / "S",
        "-B",
        TINY,
        "--random-weights",
        "-b",
        "4",
        env={"IMGSENT_PROGRESS_EVERY": "0"},
    )
    assert r.returncode == 0, r.stderr
    first, *lines = [ln for ln in r.stderr.splitlines() if ln.startswith("extract: ")]
    assert first == f"extract: started on 12 images; backbones {TINY}"  # at once, before any batch
    assert lines[-1].startswith("extract: 12/12 (100.0%)") and "images/s, 0 errors" in lines[-1]
    assert all("ETA" in ln for ln in lines) and "\x1b" not in r.stderr  # no control codes


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_every_file_follows_the_umask(setup, tmp_path, capsys, monkeypatch):
    def with_umask(umask, *argv):
        old = os.umask(umask)
        try:
            return run_cli(argv, capsys, monkeypatch)
        finally:
            os.umask(old)

    for umask, want in ((0o022, 0o644), (0o007, 0o660)):
        out = tmp_path / f"s{umask:o}.parquet"
        code, _, err = with_umask(umask, "score", setup["imgs"], "-o", out, "--model", setup["model"], "-q")
        assert code == 0, err
        assert _mode(out) == want
        shards = tmp_path / f"d{umask:o}"
        code, _, err = with_umask(umask, "score", setup["imgs"], "-o", f"{shards}/", "--model", setup["model"], "-q")
        assert code == 0, err
        assert {_mode(p) for p in shards.iterdir()} == {want}
        model = tmp_path / f"m{umask:o}"
        lab = tmp_path / "labels.txt"
        lab.write_text("".join(f"img{i:03d}.jpg {i % 2}\n" for i in range(12)))
        code, _, err = with_umask(
            umask, "train", setup["store"], "-l", lab, "-o", model, "--epochs", "1", "--cv", "0", "-q"
        )
        assert code == 0, err
        assert {_mode(p) for p in model.iterdir()} == {want}


def test_tsv_output_and_unknown_extensions(setup, tmp_path, here):
    r = here("score", setup["imgs"], "-o", tmp_path / "s.tsv", "--model", setup["model"], "-q")
    assert r.returncode == 0, r.stderr
    df = pl.read_csv(tmp_path / "s.tsv", separator="\t")
    assert df.height == 12 and df.columns[:3] == ["id", "path", "status"]
    r = here("score", setup["imgs"], "-o", tmp_path / "s.txt", "--model", setup["model"])
    one_error_line(r, "--format")
    assert not (tmp_path / "s.txt").exists()
    r = here("score", setup["imgs"], "-o", tmp_path / "s.txt", "--format", "csv", "--model", setup["model"], "-q")
    assert r.returncode == 0 and pl.read_csv(tmp_path / "s.txt").height == 12


def _readers(directory) -> dict:
    import duckdb
    import pandas as pd
    import pyarrow.dataset as ds

    d = str(directory)
    return {
        "pandas": sorted(pd.read_parquet(d)["id"]),
        "pyarrow": sorted(pq.read_table(d).column("id").to_pylist()),
        "pyarrow.dataset": sorted(ds.dataset(d, format="parquet").to_table().column("id").to_pylist()),
        "polars": sorted(pl.read_parquet(d)["id"]),
        "duckdb": sorted(r[0] for r in duckdb.sql(f"select id from read_parquet('{d}/*.parquet')").fetchall()),
    }


def test_output_directories_read_as_datasets_everywhere(setup, tmp_path, here):
    want = [f"img{i:03d}.jpg" for i in range(12)]
    r = here(
        "score",
        setup["imgs"],
        "-o",
        f"{tmp_path / 'scores'}/",
        "--model",
        setup["model"],
        "--rows-per-shard",
        "5",
        "-q",
    )
    assert r.returncode == 0, r.stderr
    for reader, ids in _readers(tmp_path / "scores").items():
        assert ids == want, reader
    for reader, ids in _readers(setup["store"]).items():
        assert ids == want, reader


def test_a_store_written_by_0_1_0_still_opens_and_resumes(setup, tmp_path):
    old = tmp_path / "old"
    imgsent.extract([str(setup["imgs"])], str(old), backbones=[TINY], random_weights=True, workers=0)
    m = read_manifest(str(old / "_manifest.parquet"))  # rewrite it as 0.1.0 did: JSON, another name
    m.pop("schema")
    (old / "manifest.json").write_text(json.dumps(m))
    (old / "_manifest.parquet").unlink()
    fs = imgsent.features.load(str(old))
    assert len(fs) == 12
    s = imgsent.extract([str(setup["imgs"])], str(old), backbones=[TINY], random_weights=True, workers=0)
    assert s.resumed == 12
    assert (old / "_manifest.parquet").is_file() and not (old / "manifest.json").exists()
    np.testing.assert_array_equal(imgsent.features.load(str(old)).X, fs.X)


def test_a_closed_pipe_exits_0(setup):
    cmd = (
        f"{sys.executable} -m imgsent score {setup['imgs']} --model {setup['model']} --out - -b 1 --workers 0 -q"
        f" | head -3; exit ${{PIPESTATUS[0]}}"
    )
    r = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=300, env=ENV)
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.splitlines()) == 3 and r.stderr == ""


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_keeps_finished_shards_and_says_how_to_resume(setup, tmp_path, sig, code):
    src = tmp_path / "imgs"
    write_images(src, 40, size=(200, 150))
    out = tmp_path / "S"
    cmd = [
        sys.executable,
        "-m",
        "imgsent",
        "extract",
        str(src),
        "-o",
        str(out),
        "-B",
        TINY,
        "--random-weights",
        "--rows-per-shard",
        "4",
        "-b",
        "1",
        "--workers",
        "1",
        "-q",
    ]
    proc = subprocess.Popen(cmd, env=ENV, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not (out / "_manifest.parquet").is_file() and time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.01)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert re.search(r"interrupted: \d+ finished shard\(s\) are kept; rerun the same command to resume", err), err
    assert "Traceback" not in err
    manifest = read_manifest(str(out / "_manifest.parquet"))
    assert manifest["shards"] and not manifest["complete"]
    assert not [p for p in out.iterdir() if p.name.startswith((".tmp-", "._manifest.parquet.lock"))]
    r = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and len(imgsent.features.load(str(out))) == 40


def test_single_file_outputs_carry_provenance_and_summaries_name_the_model(setup, tmp_path, here):
    out = tmp_path / "s.parquet"
    r = here("score", setup["imgs"], "-o", out, "--model", setup["model"], "--threshold", "0.4")
    assert r.returncode == 0, r.stderr
    meta = json.loads(pq.read_schema(out).metadata[b"imgsent"])
    assert meta["model"] == "model" and len(meta["model_version"]) == 12 and meta["threshold"] == 0.4
    assert meta["imgsent_version"] == imgsent.__version__
    assert [b["key"] for b in meta["backbones"]] == [TINY] and meta["backbones"][0]["sha256"]
    assert f"model {meta['model_version']}" in r.stderr and "random (seeded)" in r.stderr
    r = here("models")
    assert r.returncode == 0 and "backbone weights a score would use now" in r.stdout


def test_an_output_in_a_missing_folder_is_one_line_not_a_traceback(setup, tmp_path, here):
    lab = tmp_path / "labels.txt"
    lab.write_text("".join(f"img{i:03d}.jpg {i % 2}\n" for i in range(12)))
    r = here(
        "evaluate",
        setup["store"],
        "-l",
        lab,
        "--heads",
        "nn",
        "--splits",
        "1",
        "--epochs",
        "1",
        "-q",
        "--report",
        tmp_path / "no" / "such" / "r.json",
    )
    one_error_line(r, "No such file or directory")
