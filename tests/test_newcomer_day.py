"""A newcomer's day (issue 35): nothing failed quietly."""

import shutil

from conftest import imgsent_cli


def test_a_run_in_which_every_image_fails_exits_1_with_one_line_naming_the_current_directory(
    tiny_dataset, tiny_model, tmp_path
):
    images = tmp_path / "imgs"
    images.mkdir()
    for name in ("pos01.jpg", "pos02.jpg", "neg01.jpg"):
        shutil.copy(tiny_dataset / name[:3].replace("pos", "positive").replace("neg", "negative") / name, images)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    listing = "pos01.jpg\npos02.jpg\nneg01.jpg\n"  # `ls imgs | imgsent score -`, run from another directory
    r = imgsent_cli(
        "score", "-", "--out", tmp_path / "s.csv", "--model", tiny_model, "-q", input=listing, cwd=elsewhere
    )
    assert r.returncode == 1, r.stderr
    lines = r.stderr.strip().splitlines()
    assert lines == [
        f"imgsent: error: 0 of 3 images scored; first error: file not found: neg01.jpg was read relative to the "
        f"current directory {elsewhere} (run from elsewhere?)"
    ]
    assert (tmp_path / "s.csv").read_text().count("\n") == 4  # the error rows are written all the same
    ok = imgsent_cli("score", "-", "--out", tmp_path / "t.csv", "--model", tiny_model, "-q", input=listing, cwd=images)
    assert ok.returncode == 0 and ok.stderr == ""


def test_a_single_file_output_of_another_model_is_kept_without_overwrite(tiny_dataset, tiny_model, tmp_path):
    import warnings

    import imgsent
    from imgsent.errors import ImgsentError, UselessModelWarning

    store = str(tiny_model.parent / "store")
    other = str(tmp_path / "other")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UselessModelWarning)
        imgsent.train(store, labels_from_folders=True, epochs=2, cv=0, out=other, seed=1)
    for ext in ("parquet", "csv", "jsonl"):
        out = str(tmp_path / f"s.{ext}")
        imgsent.score(features=store, out=out, model=str(tiny_model))
        before = open(out, "rb").read()
        imgsent.score(features=store, out=out, model=str(tiny_model))  # the same command again: replaced
        try:
            imgsent.score(features=store, out=out, model=other)
        except ImgsentError as exc:
            assert "holds scores made otherwise: model 'model'" in str(exc) and "--overwrite" in str(exc)
        else:
            raise AssertionError(f"{ext}: another model's scores replaced the file")
        assert open(out, "rb").read() == before
        imgsent.score(features=store, out=out, model=other, overwrite=True)
        assert open(out, "rb").read() != before
    (tmp_path / "notes.csv").write_text("my,own\nfile,here\n")
    r = imgsent_cli("score", "--features", store, "--model", tiny_model, "--out", tmp_path / "notes.csv")
    assert r.returncode == 2 and "is not a score file of imgsent; pass --overwrite" in r.stderr
    assert (tmp_path / "notes.csv").read_text() == "my,own\nfile,here\n"


def test_a_long_option_with_one_dash_is_named(capsys, monkeypatch):
    from conftest import run_cli

    code, _, err = run_cli(["score", "x.jpg", "-out", "s.parquet"], capsys, monkeypatch)
    assert code == 2 and err.strip() == "imgsent: error: -out has one dash (read as -o ut): did you mean --out?"
    code, _, err = run_cli(["label", "-model=x", "--out", "l.csv"], capsys, monkeypatch)
    assert code == 2 and "did you mean --model?" in err


def test_train_and_evaluate_say_what_they_do_in_logs(tiny_model, tmp_path):
    """Not a terminal (a log): a start line, then a line a second (IMGSENT_PROGRESS_EVERY=1) naming the fit and epoch."""
    store = tiny_model.parent / "store"
    env = {"IMGSENT_PROGRESS_EVERY": "0.2", "PYTHONWARNINGS": "ignore"}
    r = imgsent_cli("train", store, "--labels-from-folders", "--out", tmp_path / "m", "--min-steps", "3000", env=env)
    assert r.returncode == 0, r.stderr
    lines = r.stderr.splitlines()
    assert (
        lines[0] == "train: started: 40 labelled images, nn head; a 5-fold held-out estimate first, then the final fit"
    )
    assert any(line.startswith("train: fit 1 of 6 (fold 1 of 5), epoch ") for line in lines), lines[:5]
    r = imgsent_cli("evaluate", store, "--labels-from-folders", "--heads", "nn", "--splits", "2", env=env)
    assert r.returncode == 0 and r.stderr.startswith("evaluate: started: 40 labelled images"), r.stderr


def test_ctrl_c_on_a_single_file_output_points_to_a_resumable_directory(tiny_model, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    from conftest import CLI_ENV, write_images

    write_images(tmp_path / "imgs", 60, size=(200, 150))
    cmd = [sys.executable, "-m", "imgsent", "score", str(tmp_path / "imgs"), "--out", str(tmp_path / "s.parquet")]
    cmd += ["--model", str(tiny_model), "-b", "1", "--workers", "1", "-q"]
    proc = subprocess.Popen(cmd, env={**os.environ, **CLI_ENV}, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240

    def started() -> bool:  # rows are being written (the decoding process is running: not mid-fork)
        return any(p.name.startswith(".tmp-s.parquet") and p.stat().st_size > 0 for p in tmp_path.iterdir())

    while not started() and time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    want = f"imgsent: interrupted: {tmp_path / 's.parquet'} was not written (a single file appears only when the run completes); --out {tmp_path / 's'}/ writes shards that a rerun resumes"
    assert err.strip().splitlines()[-1] == want, err
    assert not (tmp_path / "s.parquet").exists()


def test_prevalence_orders_classes_alike_and_says_a_small_sample_is_wide(tmp_path):
    from test_collection import synthetic_scores, write_sample

    import imgsent

    y = synthetic_scores(tmp_path / "s.parquet", 2000, 0.3, seed=3)
    plain = imgsent.prevalence(str(tmp_path / "s.parquet"))
    write_sample(tmp_path / "small.txt", y, 24, 3)
    sampled = imgsent.prevalence(str(tmp_path / "s.parquet"), labels=str(tmp_path / "small.txt"), bootstrap=200)
    order = lambda r, m: [e.cls for e in r.estimates if e.method == m]  # noqa: E731
    assert order(plain, "classify_and_count") == order(sampled, "adjusted_count") == ["negative", "positive"]
    assert any("only 24 images: its intervals are wide" in w for w in sampled.warnings), sampled.warnings
    write_sample(tmp_path / "big.txt", y, 200, 3)
    big = imgsent.prevalence(str(tmp_path / "s.parquet"), labels=str(tmp_path / "big.txt"), bootstrap=200)
    assert not any("intervals are wide" in w for w in big.warnings)


def test_a_model_card_names_its_labels_file(tiny_model, tmp_path):
    import hashlib
    import warnings

    import imgsent
    from imgsent.errors import UselessModelWarning

    store = str(tiny_model.parent / "store")
    labels = tmp_path / "mine.csv"
    labels.write_text(
        "id,label\n" + "".join(f"{c}/{c[:3]}{k:02d}.jpg,{c}\n" for c in ("positive", "negative") for k in (1, 2, 4, 5))
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UselessModelWarning)
        model = imgsent.train(store, labels=str(labels), epochs=1, cv=0)
    card = model.training["labels_file"]
    assert card["name"] == "mine.csv" and card["sha256"] == hashlib.sha256(labels.read_bytes()).hexdigest()
