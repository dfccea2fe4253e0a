"""Overlap: the next batch decoded (and copied to the device) on a thread of its own while the
models run this one (on CUDA by default; here on the CPU with one lane, the same code path but
the CUDA stream and event)."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from conftest import TINY, write_images

import imgsent
from imgsent.engine import FeatureEngine
from imgsent.inputs import find_images
from imgsent.lanes import ahead


@pytest.fixture
def folder(tmp_path):
    d = tmp_path / "imgs"
    write_images(d, 13)
    (d / "bad.jpg").write_text("not an image")
    return d


def _engine(overlap: bool, **kw) -> FeatureEngine:
    bb = imgsent.create_backbone(TINY, random_weights=True)
    return FeatureEngine([bb], workers=kw.pop("workers", 0), batch_size=4, lanes=1, overlap=overlap, **kw)


def _stage_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "imgsent-stage"]


@pytest.mark.parametrize("decode", ["workers", "device"])
def test_overlapped_runs_give_the_same_rows_and_features(folder, decode):
    refs = find_images([str(folder)])
    runs = []
    for overlap in (False, True):
        batches = list(_engine(overlap, decode=decode).run(refs, groups=[6, 8]))
        runs.append(batches)
    for a, b in zip(*runs, strict=True):
        assert (a.ids, a.status, a.error) == (b.ids, b.status, b.error)
        np.testing.assert_array_equal(a.features[TINY], b.features[TINY])
    assert sum(s == "error" for b in runs[1] for s in b.status) == 1
    assert _stage_threads() == []


def test_the_next_batch_is_staged_while_the_models_run_this_one(folder):
    """The models wait, inside the first batch, until the second batch is being staged: only a
    stage running beside them lets that happen (one thread would wait out the timeout)."""
    engine = _engine(True)
    staged, seen = [], threading.Event()
    real_stage, real_embed = engine._stage, engine.embed_views

    def stage(batch):
        staged.append(threading.current_thread().name)
        if len(staged) == 2:
            seen.set()
        return real_stage(batch)

    def embed_views(*args):
        if not seen.is_set():
            assert seen.wait(30), "the second batch was not staged while the first one ran"
        return real_embed(*args)

    engine._stage, engine.embed_views = stage, embed_views
    batches = list(engine.run(find_images([str(folder)])))
    assert len(batches) == 4 and set(staged) == {"imgsent-stage"}


def test_an_error_while_staging_is_raised_in_order_and_the_stage_ends(folder):
    engine = _engine(True, workers=1)
    real = engine._views
    calls = []

    def views(batch):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("decoder crashed on batch 2")
        return real(batch)

    engine._views = views
    got = []
    with pytest.raises(RuntimeError, match="decoder crashed on batch 2"):
        for batch in engine.run(find_images([str(folder)])):
            got.append(batch)
    assert len(got) == 1  # the first batch came out, then the second one's error
    assert _stage_threads() == []


def test_a_consumer_stopping_early_stops_the_stage_and_its_decoding_processes(folder):
    engine = _engine(True, workers=1)
    run = engine.run(find_images([str(folder)]))
    next(run)
    run.close()
    assert _stage_threads() == []
    import multiprocessing

    assert [p for p in multiprocessing.active_children() if p.is_alive()] == []


def test_ahead_keeps_order_and_stays_at_most_depth_ahead():
    made, taken = [], []

    def items():
        for i in range(20):
            made.append(i)
            # the stage holds at most: depth results queued + the one it is putting + this one
            assert len(made) - len(taken) <= 2 + 2, (made, taken)
            yield i

    for got in ahead(lambda i: i * i, items(), depth=2):
        taken.append(got)
    assert taken == [i * i for i in range(20)]
