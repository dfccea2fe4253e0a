"""imgsent label: the learner, the labels file, the JSON API (in process and as a served process)."""

import os
import re
import signal
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
from conftest import CLI_ENV

import imgsent
from imgsent import adapting
from imgsent.errors import ImgsentError, ImgsentWarning, UselessModelWarning
from imgsent.labelling import FIELDS, LabelLog, LabelRow, open_session
from imgsent.labels import read_labels
from imgsent.training import TrainConfig, fit, load_model


@pytest.fixture(scope="module")
def store(tiny_model):
    return str(tiny_model.parent / "store")  # the tiny model's own store: 40 images + 2 broken files


def truth(image_id: str) -> str:
    return "positive" if os.path.basename(image_id).startswith("pos") else "negative"


def _separable(n=300, d=40, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d)).astype(np.float32)
    y = (X @ rng.normal(size=d) > 0).astype(np.int64)
    return X, y


def test_the_correction_folds_into_an_nn_head_exactly_and_few_labels_keep_the_starting_model():
    X, y = _separable()
    blocks = [("a", 20), ("b", 20)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UselessModelWarning)
        base = fit(X[:60], y[:60], ["negative", "positive"], blocks, TrainConfig.named("nn", min_steps=100))
    prior = adapting.Prior(base, base.classes, blocks)
    U, S = prior.inputs(X)
    # two labels of a class: no correction, the model is the one the loop started from
    few = adapting.fit_correction(U[:4], S[:4], np.array([0, 0, 1, 1]), 2)
    assert few.lam is None and not few.V.any()
    np.testing.assert_allclose(adapting.predict(prior, few, X), base.predict_proba(X), atol=1e-5)
    c = adapting.fit_correction(U[60:200], S[60:200], y[60:200], 2)
    merged = adapting.merge(prior, c, [], None)
    assert merged.config.hidden == base.config.hidden + 4
    np.testing.assert_allclose(merged.predict_proba(X[200:]), adapting.predict(prior, c, X[200:]), atol=1e-5)
    acc = lambda p: float((p.argmax(1) == y[200:]).mean())  # noqa: E731
    assert acc(merged.predict_proba(X[200:])) > acc(base.predict_proba(X[200:])) + 0.05
    # without a prior (other classes), the correction alone is the model: an NN head of 2C units
    alone = adapting.Prior(None, ["a", "b"], blocks)
    c2 = adapting.fit_correction(*alone.inputs(X[:200]), y[:200], 2)
    m2 = adapting.merge(alone, c2, [], None)
    assert m2.config.hidden == 4 and acc(m2.predict_proba(X[200:])) > 0.75


def test_wilson_interval_and_kappa():
    lo, hi = adapting.wilson(80, 100)
    assert round(lo, 3) == 0.711 and round(hi, 3) == 0.867  # the textbook values for 80 of 100
    assert adapting.cohen_kappa(["a", "b", "a", "b"], ["a", "b", "a", "b"]) == 1.0
    assert adapting.cohen_kappa(["a", "a", "b", "b"], ["a", "b", "a", "b"]) == 0.0


def test_the_labels_file_appends_resumes_drops_a_torn_row_and_undoes_atomically(tmp_path):
    path = str(tmp_path / "l.csv")
    log = LabelLog(path)
    for k in range(3):
        log.append(LabelRow(f"x{k}.jpg", f"/d/x{k}.jpg", "positive" if k else None, "random", "ann", "t", 0.5))
    with open(path, "a") as fh:
        fh.write("x9.jpg,/d/x9.jpg,posi")  # a write cut short by kill -9: never acknowledged
    again = LabelLog(path)
    assert [r.id for r in again.rows] == ["x0.jpg", "x1.jpg", "x2.jpg"] and again.rows[0].label is None
    assert open(path).read().endswith("\n") and "x9" not in open(path).read()
    again.remove(1)
    assert [r.id for r in LabelLog(path).rows] == ["x0.jpg", "x2.jpg"]
    assert open(path).readline().strip() == ",".join(FIELDS)
    other = tmp_path / "other.csv"
    other.write_text("file,label\na.jpg,positive\n")
    with pytest.raises(ImgsentError, match="not a labels file of imgsent label"):
        LabelLog(str(other))


def test_a_loop_file_reads_in_train_and_prevalence_as_is(tmp_path):
    p = tmp_path / "l.csv"
    p.write_text(
        ",".join(FIELDS) + "\n"
        "a.jpg,/d/a.jpg,positive,random,ann,t,0.9\n"
        "b.jpg,/d/b.jpg,,random,ann,t,0.2\n"  # skipped
        "c.jpg,/d/c.jpg,negative,active,ann,t,0.5\n"
        "a.jpg,/d/a.jpg,negative,repeat,bob,t,0.9\n"  # a second annotator's label: agreement only
    )
    assert read_labels(str(p)) == {"a.jpg": "positive", "c.jpg": "negative"}
    with pytest.warns(ImgsentWarning, match="using its 1 mode=random labels only; 1 labels chosen otherwise"):
        assert read_labels(str(p), random_only=True) == {"a.jpg": "positive"}


def test_api_next_label_skip_undo_conflicts_and_honest_estimates(store, tiny_model, tmp_path):
    from starlette.testclient import TestClient

    from imgsent.labelserver import create_app

    out = str(tmp_path / "labels.csv")
    session = open_session(store, out, model=str(tiny_model), strategy="random", annotator="ann")
    try:
        client = TestClient(create_app(session, "tok"), headers={"Authorization": "Bearer tok"})
        first = client.get("/api/next").json()
        assert first["mode"] == "random" and first["image"].startswith("/api/image?id=")
        assert client.get("/api/next").json()["id"] == first["id"]  # the same image until it is labelled
        img = client.get(first["image"])
        assert img.status_code == 200 and img.headers["content-type"] == "image/jpeg" and img.content[:2] == b"\xff\xd8"
        assert client.post("/api/label", json={"id": first["id"], "label": truth(first["id"])}).json() == {
            "labelled": 1
        }
        # a second tab labelling the same image, an unknown id, a label that is no class: 4xx, nothing written
        assert client.post("/api/label", json={"id": first["id"], "label": "positive"}).status_code == 409
        assert client.post("/api/label", json={"id": "nope.jpg", "label": "positive"}).status_code == 404
        nxt = client.get("/api/next").json()
        assert client.post("/api/label", json={"id": nxt["id"], "label": "maybe"}).status_code == 422
        assert client.post("/api/label", json={"id": nxt["id"], "label": None}).json() == {"labelled": 1}  # skip
        assert client.post("/api/undo").json() == {"undone": nxt["id"], "labelled": 1}
        assert client.get("/api/next").json()["id"] == nxt["id"]  # offered again after undo
        for _ in range(30):
            n = client.get("/api/next?wait=60").json()
            if n["id"] is None:
                break
            assert client.post("/api/label", json={"id": n["id"], "label": truth(n["id"])}).status_code == 200
        rows = LabelLog(out).rows
        assert len(rows) == 31 and len({r.id for r in rows}) == 31  # nothing written twice
        assert session.wait_fitted(120)
        s = client.get("/api/status").json()
        assert s["labelled"] == 31 and s["by_mode"] == {"random": 31} and s["remaining"] == 40 - 31
        acc = s["accuracy"]
        assert acc["n"] == 31 and acc["low"] <= acc["estimate"] <= acc["high"]
        assert set(s["prevalence"]["classes"]) == {"negative", "positive"}
        # the model written learnt from those labels and scores as any bundle does
        model = session.current_model(out)
        model.save(str(tmp_path / "m"))
        loaded = load_model(str(tmp_path / "m"))
        assert loaded.training["labelled"] == 31 and loaded.training["labels_file"]["name"] == "labels.csv"
        scored = imgsent.score(features=store, out=str(tmp_path / "s.parquet"), model=str(tmp_path / "m"))
        assert scored.total == 42 and scored.ok == 40
    finally:
        session.close()


def test_two_annotators_repeat_images_for_their_agreement(store, tiny_model, tmp_path):
    out = str(tmp_path / "labels.csv")
    session = open_session(store, out, model=str(tiny_model), strategy="random", annotator="ann")
    try:
        for _ in range(10):
            o = session.next("ann")
            session.label(o.id, truth(o.id), "ann")
        repeats = 0
        for _ in range(12):
            o = session.next("bob")
            repeats += o.mode == "repeat"
            session.label(o.id, truth(o.id), "bob")
        assert repeats >= 1
        assert session.wait_fitted(120)
        agreement = session.status()["agreement"]
        assert agreement["annotators"] == ["ann", "bob"] and agreement["n"] == repeats and agreement["kappa"] == 1.0
        assert read_labels(out).keys() == {r.id for r in LabelLog(out).rows if r.mode != "repeat"}
    finally:
        session.close()


def test_every_request_needs_the_token_and_images_are_served_by_id_only(store, tiny_model, tmp_path):
    from starlette.testclient import TestClient

    from imgsent.labelserver import create_app

    session = open_session(store, str(tmp_path / "l.csv"), model=str(tiny_model))
    try:
        client = TestClient(create_app(session, "s3cret"))
        for url in ("/", "/api/next", "/api/status", "/api/image?id=x"):
            assert client.get(url).status_code == 401
            assert client.get(url, headers={"Authorization": "Bearer wrong"}).status_code == 403
        assert client.post("/api/label", json={"id": "x", "label": None}).status_code == 401
        assert client.get("/?token=s3cret").status_code == 200
        for evil in ("../../etc/passwd", "/etc/passwd", str(tmp_path / "l.csv")):
            r = client.get("/api/image", params={"id": evil, "token": "s3cret"})
            assert r.status_code == 404 and "no image with id" in r.json()["error"]
    finally:
        session.close()


def _start(args, cwd):
    proc = subprocess.Popen(
        [sys.executable, "-m", "imgsent", "label", *map(str, args), "--no-browser", "--port", "0", "--token", "t"],
        cwd=cwd,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **CLI_ENV},
    )
    lines = []
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        lines.append(line)
        m = re.search(r"open (http://127\.0\.0\.1:\d+)/\?token=t", line)
        if m:
            return proc, m.group(1)
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise AssertionError("no URL printed: " + "".join(lines))


def test_kill_9_loses_no_acknowledged_label_and_sigterm_writes_the_model(store, tiny_model, tmp_path):
    import httpx

    out = tmp_path / "labels.csv"
    args = ["--features", store, "--out", out, "--model", tiny_model]
    proc, url = _start(args, tmp_path)
    acknowledged = []
    try:
        with httpx.Client(base_url=url, headers={"Authorization": "Bearer t"}, timeout=60) as c:
            for _ in range(5):
                n = c.get("/api/next").json()
                r = c.post("/api/label", json={"id": n["id"], "label": truth(n["id"])})
                assert r.status_code == 200
                acknowledged.append(n["id"])
    finally:
        proc.kill()  # SIGKILL: no clean-up at all
        proc.wait()
    assert [r.id for r in LabelLog(str(out)).rows] == acknowledged
    proc, url = _start([*args, "--model-out", tmp_path / "m"], tmp_path)
    try:
        with httpx.Client(base_url=url, headers={"Authorization": "Bearer t"}, timeout=60) as c:
            assert c.get("/api/status").json()["labelled"] == 5
            n = c.get("/api/next").json()
            assert n["id"] not in acknowledged  # labelled images are never shown again
            c.post("/api/label", json={"id": n["id"], "label": truth(n["id"])})
    finally:
        proc.send_signal(signal.SIGTERM)
        err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 0, err
    assert "wrote" in err and load_model(str(tmp_path / "m")).training["labelled"] == 6
    # its card: the loop's own training record (no join counts), not a traceback
    card = subprocess.run(
        [sys.executable, "-m", "imgsent", "models", str(tmp_path / "m")], capture_output=True, text=True, timeout=120
    )
    assert card.returncode == 0, card.stderr
    assert "6 labelled images" in card.stdout and "learner: " in card.stdout and "held-out accuracy" in card.stdout


def test_bad_command_lines_get_one_line_and_exit_2(store, tmp_path):
    from conftest import imgsent_cli

    r = imgsent_cli("label", "--out", tmp_path / "l.csv", "--no-browser")
    assert r.returncode == 2 and "give images to label" in r.stderr and "Traceback" not in r.stderr
    (tmp_path / "other.csv").write_text("file,label\na.jpg,positive\n")
    r = imgsent_cli("label", "--features", store, "--out", tmp_path / "other.csv", "--no-browser", "--model", "x/")
    assert r.returncode == 2 and "Traceback" not in r.stderr


def test_label_extracts_the_models_backbones_first_when_given_images(tiny_dataset, tiny_model, tmp_path):
    import httpx

    proc, url = _start([tiny_dataset / "positive", "--out", tmp_path / "l.csv", "--model", tiny_model], tmp_path)
    try:
        with httpx.Client(base_url=url, headers={"Authorization": "Bearer t"}, timeout=60) as c:
            assert c.get("/api/status").json()["images"] == 20
    finally:
        proc.send_signal(signal.SIGTERM)
        err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 0, err
    assert len(imgsent.features.load(str(tmp_path / "l.features"))) == 20  # beside the labels file, by default


def test_other_classes_than_the_models_learn_from_the_labels_alone(store, tiny_model, tmp_path):
    session = open_session(store, str(tmp_path / "l.csv"), model=str(tiny_model), classes=["cat", "dog"])
    try:
        assert session.status()["classes"] == ["cat", "dog"] and not session.status()["model"]["prior"]
        for k in range(12):
            o = session.next()
            session.label(o.id, "cat" if k % 2 else "dog")
        with pytest.raises(ValueError, match="not one of cat, dog"):
            session.label(session.next().id, "positive")
        assert session.wait_fitted(120)
        model = session.current_model()
        assert model.classes == ["cat", "dog"] and model.config.hidden == 4
    finally:
        session.close()


def test_a_run_that_cannot_start_leaves_no_labels_file(store, tiny_model, tmp_path):
    import socket

    from conftest import imgsent_cli

    common = ("--features", store, "--model", tiny_model, "--no-browser")
    r = imgsent_cli("label", *common, "--out", tmp_path / "a.csv", "--classes", "x")
    assert r.returncode == 2 and "--classes needs at least two" in r.stderr and not (tmp_path / "a.csv").exists()
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    try:
        port = str(taken.getsockname()[1])
        r = imgsent_cli("label", *common, "--out", tmp_path / "b.csv", "--port", port)
    finally:
        taken.close()
    assert r.returncode == 2 and "choose another --port" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "b.csv").exists()
