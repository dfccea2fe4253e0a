"""Faults on a real two-node Ray cluster on this machine (``ray.cluster_utils.Cluster``: a head and one
worker node of 1 CPU each, loopback only): a node lost mid-run, the driver killed mid-run, a worker dying
while it writes a shard. Every row must come out exactly once, equal to the local engine's."""

import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from conftest import TINY, write_images

import imgsent
from imgsent.shards import Chunk, ShardedWriter, ShardTarget, list_store, read_manifest

ray = pytest.importorskip("ray", reason="Ray is an optional extra: pip install 'imgsent[ray]'")

KW = dict(backbones=[TINY], random_weights=True, batch_size=4, rows_per_shard=8)
N = 160  # 20 shards


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("cluster") / "imgs"
    write_images(d, N - 1)
    (d / "broken.jpg").write_text("not an image")
    return d


@pytest.fixture(scope="module")
def local_store(images, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("cluster") / "local")
    imgsent.extract([str(images)], out, workers=0, **KW)
    return out


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False}, connect=False)
    ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture
def two_nodes(cluster):
    """The head (1 CPU) and one worker node (1 CPU), added anew for each test (a test may remove it)."""
    worker = cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    yield cluster, worker
    if worker in cluster.worker_nodes:
        cluster.remove_node(worker)


def _listed(out: str) -> int:
    try:
        return len(read_manifest(os.path.join(out, "_manifest.parquet"))["shards"])
    except Exception:
        return 0


def _same_as_local(out: str, local: str) -> None:
    a, b = imgsent.features.load(local, only_ok=False), imgsent.features.load(out, only_ok=False)
    assert a.ids == b.ids and a.status == b.status  # every row exactly once, in order
    np.testing.assert_allclose(a.X, b.X, rtol=1e-5, atol=1e-6)
    ma, mb = (
        read_manifest(os.path.join(local, "_manifest.parquet")),
        read_manifest(os.path.join(out, "_manifest.parquet")),
    )
    assert mb["complete"] and [e["ids_sha256"] for e in ma["shards"]] == [e["ids_sha256"] for e in mb["shards"]]
    assert sorted(os.listdir(out)) == sorted(os.listdir(local))  # no partial file of a lost worker left


def test_a_node_lost_mid_run(two_nodes, images, local_store, tmp_path):
    cluster, worker = two_nodes
    out = str(tmp_path / "ray")
    seen = {}

    def remove_worker_node():
        while _listed(out) < 2:
            time.sleep(0.02)
        seen["listed"] = _listed(out)
        cluster.remove_node(worker)

    killer = threading.Thread(target=remove_worker_node, daemon=True)
    killer.start()
    s = imgsent.extract([str(images)], out, engine="ray", ray_workers=2, **KW)
    killer.join(timeout=60)
    assert seen["listed"] < N // 8  # the node went while shards were still to be written
    assert (s.total, s.errors) == (N, 1)
    assert s.details["ray workers lost"].startswith("1 (")  # and its shards were redone by the other
    _same_as_local(out, local_store)


def test_the_driver_killed_mid_run_then_rerun(two_nodes, images, local_store, tmp_path):
    cluster, _ = two_nodes
    out = str(tmp_path / "ray")
    cmd = [sys.executable, "-m", "imgsent", "extract", str(images), "-o", out, "-B", TINY, "--random-weights"]
    cmd += ["--batch-size", "4", "--rows-per-shard", "8", "--engine", "ray", "--ray-workers", "2"]
    cmd += ["--ray-address", cluster.address, "-q"]
    driver = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while _listed(out) < 1 and driver.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    driver.send_signal(signal.SIGKILL)
    driver.wait(timeout=30)
    listed = _listed(out)
    assert 1 <= listed < N // 8, driver.stderr.read().decode()[-2000:]
    s = imgsent.extract([str(images)], out, engine="ray", ray_workers=2, **KW)
    assert s.resumed >= 8 * listed and s.total == N
    _same_as_local(out, local_store)


def _die_while_writing(directory: str) -> None:
    import pyarrow as pa

    f = ShardTarget(directory).open(Chunk(0, 0, 3000))
    f.append(pa.table({"id": [f"i{k}" for k in range(2500)], "x": np.arange(2500.0)}))  # two row groups on disk
    os._exit(9)  # killed mid-shard: no finish, no cleanup


def test_a_worker_dying_while_writing_leaves_no_listed_partial_shard(tmp_path):
    out = tmp_path / "store"
    out.mkdir()
    child = multiprocessing.get_context("fork").Process(target=_die_while_writing, args=(str(out),))
    child.start()
    child.join(timeout=60)
    assert child.exitcode == 9
    left = [p.name for p in out.iterdir()]
    assert len(left) == 1 and left[0].startswith(".tmp-part-00000.parquet.")  # the temporary file, never a part-*
    with ShardedWriter(str(out), kind="k", header={}, rows_per_shard=3000) as w:  # the next run of the job
        assert w.plan([f"i{k}" for k in range(3000)]) == ([Chunk(0, 0, 3000)], 0)
        w.finish()
    assert list_store(str(out)).files == [] and sorted(p.name for p in out.iterdir()) == ["_manifest.parquet"]
