"""The Ray distributor gives the same rows as the local engine (CI installs the `ray` extra and runs a
local Ray instance on loopback: num_cpus=2, no dashboard)."""

import builtins
import os

import numpy as np
import polars as pl
import pytest
from conftest import TINY, write_images

import imgsent
import imgsent.shards
from imgsent.errors import ImgsentError
from imgsent.shards import read_manifest

# the models these tests train (a few epochs on generated images) are throwaway: what they learn is not the point
pytestmark = pytest.mark.filterwarnings("ignore::imgsent.errors.UselessModelWarning")

ray = pytest.importorskip("ray", reason="Ray is an optional extra: pip install 'imgsent[ray]'")

KW = dict(backbones=[TINY], random_weights=True, batch_size=4, rows_per_shard=4)


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("ray") / "imgs"
    write_images(d, 9)
    (d / "broken.jpg").write_text("not an image")
    return d


def _frame(directory):
    return pl.read_parquet(f"{directory}/part-*.parquet").sort("id")


def test_extract_on_ray_equals_local(cluster, images, tmp_path):
    local, remote = tmp_path / "local", tmp_path / "ray"
    imgsent.extract([str(images)], str(local), workers=0, **KW)
    s = imgsent.extract([str(images)], str(remote), engine="ray", **KW)
    assert (s.total, s.errors) == (10, 1)
    a, b = _frame(local), _frame(remote)
    assert a.drop(TINY).equals(b.drop(TINY))  # ids, paths, status, errors, sizes
    fa, fb = imgsent.features.load(str(local), only_ok=False), imgsent.features.load(str(remote), only_ok=False)
    np.testing.assert_allclose(fa.X, fb.X, rtol=1e-5, atol=1e-6)
    ma = read_manifest(str(local / "_manifest.parquet"))
    mb = read_manifest(str(remote / "_manifest.parquet"))
    assert ma["complete"] and mb["complete"] and ma["rows"] == mb["rows"] == 10
    assert [e["ids_sha256"] for e in ma["shards"]] == [e["ids_sha256"] for e in mb["shards"]]


def test_score_on_ray_equals_local_and_resumes(cluster, images, tmp_path, interrupt_after_commits):
    store = str(tmp_path / "store")
    imgsent.extract([str(images)], store, workers=0, **KW)
    labels = tmp_path / "labels.txt"
    labels.write_text("".join(f"img{i:03d}.jpg {i % 2}\n" for i in range(9)))
    imgsent.train(store, labels=str(labels), head="nn", epochs=2, out=str(tmp_path / "model"))
    common = dict(model=str(tmp_path / "model"), batch_size=4, rows_per_shard=4)
    imgsent.score([str(images)], str(tmp_path / "local") + "/", workers=0, **common)

    interrupt_after_commits.arm(1, RuntimeError("simulated failure of the Ray job"))
    with pytest.raises(RuntimeError):
        imgsent.score([str(images)], str(tmp_path / "ray") + "/", engine="ray", **common)
    interrupt_after_commits.disarm()
    s = imgsent.score([str(images)], str(tmp_path / "ray") + "/", engine="ray", **common)
    assert s.resumed == 4  # the finished shard was not redone
    a, b = _frame(tmp_path / "local"), _frame(tmp_path / "ray")
    assert a.drop("p_negative", "p_positive", "score").equals(b.drop("p_negative", "p_positive", "score"))
    np.testing.assert_allclose(a["p_positive"].to_numpy(), b["p_positive"].to_numpy(), rtol=1e-5, atol=1e-6)


def test_missing_ray_extra_is_one_clear_line(monkeypatch, images, tmp_path):
    real_import = builtins.__import__

    def no_ray(name, *args, **kwargs):
        if name == "ray" or name.startswith("ray."):
            raise ImportError("No module named 'ray'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    with pytest.raises(ImgsentError, match=r"pip install 'imgsent\[ray\]'"):
        imgsent.extract([str(images)], str(tmp_path / "s"), engine="ray", **KW)


def test_streamed_ray_scores_are_the_local_ones_to_the_last_bit(cluster, images, tmp_path):
    """Issue 33 item 5: the streaming path's actors run the local engine over slices of the inputs
    and hand back features (Arrow tables: an error row's missing size and reason as nulls); the head
    runs once, on the driver, as for every other path: one output file equals the local one."""
    from imgsent.distributed import RayEngine, batch_table, table_batch
    from imgsent.models import model_backbones

    store = str(tmp_path / "store")
    imgsent.extract([str(images)], store, workers=0, **KW)
    labels = tmp_path / "labels.txt"
    labels.write_text("".join(f"img{i:03d}.jpg {i % 2}\n" for i in range(9)))
    model = imgsent.train(store, labels=str(labels), head="moe", epochs=2, out=str(tmp_path / "model"))
    common = dict(model=str(tmp_path / "model"), batch_size=4)
    imgsent.score([str(images)], str(tmp_path / "local.csv"), workers=0, **common)
    imgsent.score([str(images)], str(tmp_path / "ray.csv"), engine="ray", **common)
    assert (tmp_path / "ray.csv").read_text() == (tmp_path / "local.csv").read_text()

    engine = RayEngine(model_backbones(model), batch_size=4)
    # one plan, resolved on the driver for every actor: a worker's CPUs give its lanes and decoders
    assert engine.plan.device == "cpu" and engine.plan.lanes == engine.resources["num_cpus"] == 2
    assert engine.plan.batch_size == 4 and engine.plan.numerics == "fp32"
    refs = imgsent.find_images([str(images)])
    batches = list(engine.run(refs))
    assert [r for b in batches for r in b.ids] == [r.id for r in refs]
    bad = [(b, i) for b in batches for i, s in enumerate(b.status) if s == "error"]
    assert bad and all(b.width[i] is None and b.error[i] for b, i in bad)
    again = table_batch(batch_table(batches[0], engine.keys), engine.keys)
    assert again.ids == batches[0].ids and again.error == batches[0].error and again.width == batches[0].width
    for key in engine.keys:
        np.testing.assert_array_equal(again.features[key], batches[0].features[key])


def test_quiet_silences_rays_own_logging(images, tmp_path):
    import os
    import subprocess
    import sys

    cmd = [
        sys.executable,
        "-m",
        "imgsent",
        "extract",
        str(images),
        "-o",
        str(tmp_path / "s"),
        "-B",
        TINY,
        "--random-weights",
        "--engine",
        "ray",
        "-q",
    ]
    env = {k: v for k, v in os.environ.items() if k != "RAY_BACKEND_LOG_LEVEL"}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**env, "PYTHONWARNINGS": "ignore"})
    assert r.returncode == 0 and r.stderr == "" and r.stdout == ""


def test_tar_shards_and_parquet_on_ray_equal_local(cluster, tmp_path):
    import io
    import tarfile

    import pyarrow as pa
    import pyarrow.parquet as pq
    from conftest import jpeg_bytes, rgb_array

    data = [jpeg_bytes(rgb_array(40, 50 + k, k)) for k in range(6)]
    with tarfile.open(tmp_path / "00000.tar", "w") as tar:
        for k, d in enumerate(data):
            info = tarfile.TarInfo(f"{k:04d}.jpg")
            info.size = len(d)
            tar.addfile(info, io.BytesIO(d))
    pq.write_table(pa.table({"image": data + [None]}), tmp_path / "p.parquet", row_group_size=4)
    for inputs, extra in (
        ([str(tmp_path / "00000.tar")], {}),
        ([str(tmp_path / "p.parquet")], {"image_column": "image"}),
    ):
        imgsent.extract(inputs, str(tmp_path / "local"), workers=0, overwrite=True, **extra, **KW)
        imgsent.extract(inputs, str(tmp_path / "ray"), engine="ray", overwrite=True, **extra, **KW)
        a = imgsent.features.load(str(tmp_path / "local"), only_ok=False)
        b = imgsent.features.load(str(tmp_path / "ray"), only_ok=False)
        assert a.ids == b.ids and a.status == b.status and a.error == b.error
        np.testing.assert_allclose(a.X, b.X, rtol=1e-5, atol=1e-6)


def test_workers_write_the_shards_and_the_driver_only_lists_them(cluster, images, tmp_path, monkeypatch):
    """Directory outputs: Ray workers write the shard files; the driver neither receives a feature
    (Ray Data's stream is not used) nor writes a row."""
    from imgsent.distributed import RayEngine

    # One image a shard (10 shards, not 3): with 3 tiny shards the first worker could finish them all
    # before the second had started, and the run then rightly reported one worker.
    # torch, not ONNX Runtime: the tiny backbone on ONNX Runtime writes all 10 shards in the time a second
    # worker takes to start on a loaded machine (each worker then freezes its own graph first).
    kw = {**KW, "rows_per_shard": 1, "runtime": "torch"}
    local = tmp_path / "local"
    imgsent.extract([str(images)], str(local), workers=0, **kw)

    def no_stream(*a, **k):
        raise AssertionError("features streamed to the driver")

    def no_rows(*a, **k):
        raise AssertionError("the driver wrote rows")

    monkeypatch.setattr(RayEngine, "run", no_stream)
    monkeypatch.setattr(imgsent.shards.ShardFile, "append", no_rows)  # the driver's copy; workers have their own
    s = imgsent.extract([str(images)], str(tmp_path / "ray"), engine="ray", ray_workers=2, **kw)
    assert (s.total, s.errors) == (10, 1)
    # two workers of 1 CPU were asked for; on a loaded machine the first may write all ten tiny shards
    # before the second has started, and the summary then says so (seen once in CI)
    workers = s.details["ray workers"]
    assert workers.startswith("2 x 1 CPU") or (workers.startswith("1 x 1 CPU") and "1 more had not started" in workers)
    fa, fb = (
        imgsent.features.load(str(local), only_ok=False),
        imgsent.features.load(str(tmp_path / "ray"), only_ok=False),
    )
    assert fa.ids == fb.ids and fa.status == fb.status
    np.testing.assert_allclose(fa.X, fb.X, rtol=1e-5, atol=1e-6)
    assert sorted(p.name for p in local.iterdir()) == sorted(p.name for p in (tmp_path / "ray").iterdir())


def test_a_store_resumes_across_engines(cluster, images, tmp_path, interrupt_after_commits):
    full = str(tmp_path / "full")
    imgsent.extract([str(images)], full, workers=0, **KW)
    for first, then in (("local", "ray"), ("ray", "local")):
        out = str(tmp_path / f"{first}-then-{then}")
        interrupt_after_commits.arm(1, KeyboardInterrupt("simulated kill"))
        with pytest.raises(KeyboardInterrupt):
            imgsent.extract([str(images)], out, engine=first, workers=0, **KW)
        interrupt_after_commits.disarm()
        s = imgsent.extract([str(images)], out, engine=then, workers=0, **KW)
        assert s.resumed == 4, (first, then)
        a, b = imgsent.features.load(full, only_ok=False), imgsent.features.load(out, only_ok=False)
        assert a.ids == b.ids and a.status == b.status, (first, then)
        np.testing.assert_allclose(a.X, b.X, rtol=1e-5, atol=1e-6)
        assert sorted(os.listdir(full)) == sorted(os.listdir(out))  # no stray temporary file of a worker


def test_score_directory_on_ray_keeps_columns_like_local(cluster, tiny_model, tmp_path):
    import io
    import json
    import tarfile

    from conftest import jpeg_bytes, rgb_array

    with tarfile.open(tmp_path / "00000.tar", "w") as tar:
        for k in range(6):
            for name, data in (
                (f"{k:04d}.jpg", jpeg_bytes(rgb_array(40, 50 + k, k))),
                (f"{k:04d}.json", json.dumps({"url": f"http://x/{k}", "status": "success"}).encode()),
            ):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    common = dict(model=str(tiny_model), batch_size=4, rows_per_shard=4, keep_columns=("url,status",))
    imgsent.score([str(tmp_path / "00000.tar")], str(tmp_path / "local") + "/", workers=0, **common)
    imgsent.score([str(tmp_path / "00000.tar")], str(tmp_path / "ray") + "/", engine="ray", **common)
    a, b = _frame(tmp_path / "local"), _frame(tmp_path / "ray")
    assert b["url"].to_list() == [f"http://x/{k}" for k in range(6)] and set(b["source_status"]) == {"success"}
    assert a.drop("p_negative", "p_positive", "score").equals(b.drop("p_negative", "p_positive", "score"))


def test_fewer_shards_than_workers_is_said(cluster, images, tmp_path):
    from imgsent.errors import ImgsentWarning

    with pytest.warns(ImgsentWarning, match=r"1 shard\(s\) to write for 2 Ray workers.*--rows-per-shard"):
        s = imgsent.extract(
            [str(images)], str(tmp_path / "s"), engine="ray", ray_workers=2, **{**KW, "rows_per_shard": 100}
        )
    assert s.total == 10 and s.details["ray workers"].startswith("1 x")


def test_a_backbone_failing_on_a_worker_stops_the_run_with_its_line(cluster, tmp_path):
    """What a worker raises comes back as the local engine's one line, not as a Ray traceback."""
    import warnings

    import torch
    from PIL import Image

    class Picky(torch.nn.Module):  # refuses bright images (the fingerprint's probe is dark)
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if bool((x.mean(dim=(1, 2, 3)) > 1.5).any()):
                raise RuntimeError("this model cannot take bright images")
            return x.mean(dim=(2, 3))

    path = tmp_path / "picky.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(torch.jit.script(Picky()), str(path))
    (tmp_path / "white").mkdir()
    for k in range(8):
        Image.new("RGB", (64, 48), "white").save(tmp_path / "white" / f"{k}.png")
    with pytest.raises(ImgsentError, match=r"failed on each of the first 8 images.*cannot take bright images"):
        opts = dict(engine="ray", backbones=[f"torchscript:{path}"], batch_size=4, rows_per_shard=8)
        imgsent.extract([str(tmp_path / "white")], str(tmp_path / "s"), **opts)


def test_writing_workers_start_the_decoding_processes_asked_for(cluster, images, tmp_path):
    """Issue 33: the shard-writing workers used to get the streaming actors' workers=0, so --workers
    never reached them and they decoded in their own process."""
    s = imgsent.extract([str(images)], str(tmp_path / "w1"), engine="ray", workers=1, **KW)
    assert s.details["ray workers"].endswith(", 1 decoding process(es) each"), s.details
    s = imgsent.extract([str(images)], str(tmp_path / "w0"), engine="ray", workers=0, **KW)
    assert s.details["ray workers"].endswith(", 0 decoding process(es) each"), s.details


def test_url_settings_reach_ray_workers_that_imgsent_did_not_start(cluster, images, tiny_model, tmp_path, monkeypatch):
    """Issue 33: IMGSENT_URL_* set after Ray started (here: after the cluster fixture's ray.init)
    reach the actors and decode tasks that download the URLs, on both Ray paths."""
    import functools
    import http.server
    import threading

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(images))
    handler.log_message = lambda *a: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        name = sorted(p.name for p in images.iterdir() if p.suffix == ".jpg" and p.name != "broken.jpg")[0]
        (tmp_path / "urls.txt").write_text(f"http://127.0.0.1:{httpd.server_address[1]}/{name}\n")
        monkeypatch.setenv("IMGSENT_URL_MAX_BYTES", "100")  # smaller than the image
        for out in (tmp_path / "dir", tmp_path / "one.parquet"):  # workers write / Ray Data streams
            if out.suffix:
                imgsent.score(
                    [f"@{tmp_path / 'urls.txt'}"], str(out), model=str(tiny_model), engine="ray", batch_size=4
                )
                rows = pl.read_parquet(out)
            else:
                imgsent.extract([f"@{tmp_path / 'urls.txt'}"], str(out), engine="ray", **KW)
                rows = pl.read_parquet(f"{out}/part-*.parquet")
            assert rows["status"].to_list() == ["error"], (out, rows)
            assert "limit" in rows["error"][0], rows["error"][0]
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_auto_numerics_on_ray_are_what_the_actors_cards_compute_locally(monkeypatch):
    """Issue 33, bug 3: ``auto`` was bf16 on every GPU actor, fp16 locally on pre-Ampere cards."""
    import torch

    import imgsent.precision
    from imgsent.distributed import _card_numerics, resolve_actor_numerics
    from imgsent.precision import resolve_numerics

    for native, want in ((False, "fp16"), (True, "bf16")):  # a T4 / V100, then an A100 / H100
        monkeypatch.setattr(imgsent.precision, "bf16_native", lambda device, native=native: native)
        assert _card_numerics("auto") == want == resolve_numerics(torch.device("cuda"), "auto")
        assert resolve_actor_numerics("auto", True, lambda: _card_numerics("auto")) == want
    asked = []
    for p in ("auto", "fp32", "tf32", "bf16", "fp16", "int8"):  # CPU actors: as a local CPU run, no card asked
        assert resolve_actor_numerics(p, False, lambda p=p: asked.append(p) or "bf16") == resolve_numerics(
            torch.device("cpu"), p
        )
        assert resolve_actor_numerics(p, True, lambda: "fp16") == ("fp16" if p == "auto" else p)
    assert asked == []
