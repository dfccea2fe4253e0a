"""A newcomer's sharp edges (issue 23): models that learnt nothing are said so, downloads give up,
stdout carries data only, stderr only what matters, and every message names flags as typed."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
import warnings

import numpy as np
import pytest
from conftest import TINY, imgsent_cli, run_cli, write_images

import imgsent
from imgsent.errors import ImgsentWarning, UselessModelWarning
from imgsent.labels import map_labels, read_labels
from imgsent.training import TrainConfig, fit


def one_error_line(r: subprocess.CompletedProcess, *fragments: str) -> None:
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert r.stderr.startswith("imgsent: error: "), r.stderr
    for fragment in fragments:
        assert fragment in r.stderr, r.stderr


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """24 images (12 bright-ish, 12 inverted), a store of a tiny random backbone, labels 0/1."""
    root = tmp_path_factory.mktemp("edges")
    write_images(root / "imgs" / "pos", 12, size=(80, 60), seed=0)
    write_images(root / "imgs" / "neg", 12, size=(80, 60), seed=40)
    store = str(root / "store")
    imgsent.extract([str(root / "imgs")], store, backbones=[TINY], random_weights=True, workers=0, progress=False)
    ids = sorted(p.relative_to(root / "imgs").as_posix() for p in (root / "imgs").rglob("*.jpg"))
    labels = root / "labels.txt"
    labels.write_text("".join(f"{i} {int(i.startswith('pos'))}\n" for i in ids))
    model = root / "model"
    with warnings.catch_warnings():  # a throwaway model on random features: the messages are the point
        warnings.simplefilter("ignore", UselessModelWarning)
        imgsent.train(store, labels=str(labels), head="nn", epochs=30, lr=1e-3, cv=0, out=str(model))
    scores = root / "scores.parquet"
    imgsent.score([str(root / "imgs")], str(scores), model=str(model), workers=0)
    return {"root": root, "imgs": root / "imgs", "store": store, "ids": ids, "model": model, "scores": scores}


def one_line(result: tuple[int, str, str], *fragments: str) -> None:
    """An in-process CLI run (:func:`conftest.run_cli`) that ended with one error line, exit 2."""
    code, _, err = result
    one_error_line(subprocess.CompletedProcess([], code, "", err), *fragments)


# --- training on small sets -------------------------------------------------------------------


def _separable(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` rows of 64-d features, 70 % class 1, the classes apart along one direction."""
    rng = np.random.default_rng(seed)
    y = (rng.uniform(size=n) < 0.7).astype(np.int64)
    X = rng.normal(size=(n, 64)).astype(np.float32)
    X[:, :8] += np.where(y[:, None] == 1, 0.8, -0.8)
    return X, y


@pytest.mark.parametrize("head", ["moe1", "moe2", "nn"])
def test_the_default_schedule_trains_on_a_small_set(head):
    X, y = _separable(140, 0)
    Xt, yt = _separable(400, 1)
    blocks = [("feats", 64)]
    stretched = fit(X, y, ["negative", "positive"], blocks, TrainConfig.named(head))
    acc = float((stretched.predict_proba(Xt).argmax(1) == yt).mean())
    assert acc > 0.85, acc  # the majority rate is 0.70
    sched = stretched.training["schedule"]
    assert sched["optimiser_steps"] >= (1000 if head == "nn" else 300)
    paper = fit(X, y, ["negative", "positive"], blocks, TrainConfig.named(head, min_steps=0))
    assert paper.training["schedule"]["optimiser_steps"] < sched["optimiser_steps"]


def test_the_lr_decay_is_stretched_with_the_epochs_and_explicit_epochs_are_kept():
    cfg = TrainConfig.named("moe1").resolved()
    assert cfg.schedule_for(138) == (360, 120)  # 1 step an epoch: 120 epochs x3, decay every 40 x3
    assert cfg.schedule_for(700) == (120, 40)  # 3 steps an epoch: 360 steps, the paper's schedule
    assert TrainConfig.named("moe1", epochs=5).resolved().schedule_for(138) == (5, 40)
    assert TrainConfig.named("moe1", epochs=5, min_steps=20).resolved().schedule_for(138) == (20, 160)


def test_a_useless_model_is_said_so_on_stderr_and_in_its_card(small, tmp_path, capsys, monkeypatch):
    ids = sorted(p.relative_to(small["imgs"]).as_posix() for p in small["imgs"].rglob("*.jpg"))
    rng = np.random.default_rng(0)
    labels = tmp_path / "noise.txt"  # labels that have nothing to do with the images
    labels.write_text("".join(f"{i} {int(rng.uniform() < 0.75)}\n" for i in ids))
    with pytest.warns(ImgsentWarning) as caught:
        model = imgsent.train(small["store"], labels=str(labels), head="moe", out=str(tmp_path / "m"))
    assert [str(w.message) for w in caught] == model.training["warnings"]
    assert any("not clearly above the majority-class baseline" in w for w in model.training["warnings"])
    card = json.loads((tmp_path / "m" / "model.json").read_text())
    assert card["training"]["warnings"] == model.training["warnings"]
    assert "WARNING: the held-out accuracy" in imgsent.load_model(str(tmp_path / "m")).describe_training()
    argv = ["train", small["store"], "--labels", labels, "--head", "moe", "-o", tmp_path / "m2"]
    code, _, err = run_cli(argv, capsys, monkeypatch)
    assert code == 0, err
    assert "imgsent: warning: the held-out accuracy" in err and "WARNING" not in err


def test_a_model_that_learnt_something_gets_no_warning():
    X, y = _separable(300, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ImgsentWarning)
        fit(X, y, ["negative", "positive"], [("feats", 64)], TrainConfig.named("nn"))
        from imgsent.training import quality_warnings

        held = {"accuracy_mean": 0.9, "accuracy_std": 0.02, "balanced_accuracy_mean": 0.88, "majority_baseline": 0.7}
        assert quality_warnings(held, y, y, ["negative", "positive"]) == []
        assert quality_warnings(None, np.zeros_like(y), y, ["negative", "positive"]) == [
            "the model predicts negative for every training image; more labelled images, a longer schedule "
            "(--epochs, --min-steps) or another head may help"
        ]


# --- downloads ---------------------------------------------------------------------------------


@pytest.fixture
def silent_proxy():
    """A proxy on 127.0.0.1 that accepts connections and never answers."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept():
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                pass

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    t.join()
    for c in held:
        c.close()
    server.close()


@pytest.mark.parametrize(
    "spec", ["torchvision:resnet18", "torchvision:mobilenet_v2.IMAGENET1K_QNNPACK_V1"], ids=["hub", "quantized"]
)
def test_a_download_behind_a_silent_proxy_gives_up_with_one_line(spec, silent_proxy, tmp_path):
    env = {
        "https_proxy": silent_proxy,
        "HTTPS_PROXY": silent_proxy,
        "http_proxy": silent_proxy,
        "HTTP_PROXY": silent_proxy,
        "no_proxy": "",
        "NO_PROXY": "",
        "TORCH_HOME": str(tmp_path / "torch-home"),
        "IMGSENT_DOWNLOAD_TIMEOUT": "1",
    }
    write_images(tmp_path / "imgs", 1)
    start = time.monotonic()
    r = imgsent_cli("extract", tmp_path / "imgs", "-o", tmp_path / "S", "-B", spec, "-q", env=env, timeout=120)
    assert time.monotonic() - start < 60
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    *before, last = r.stderr.strip().splitlines()
    assert all(line.startswith("Downloading: ") for line in before), r.stderr  # torch hub's notice, on stderr
    assert last.startswith("imgsent: error: ") and "no answer within 1 s" in last and "IMGSENT_DOWNLOAD_TIMEOUT" in last
    assert f"{spec}@" in last
    assert "--weights FILE or" not in r.stderr  # extract has no --weights


def test_a_hub_client_that_retries_a_silent_proxy_is_given_up_once_nothing_arrives(silent_proxy, tmp_path):
    """timm's weights come through Hugging Face's client, which retries its metadata request five
    times with pauses: 150 s behind a silent proxy at the 30 s default. imgsent gives the whole
    attempt up once nothing has arrived for the limit (issue 35)."""
    env = {
        **{k: silent_proxy for k in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY")},
        "no_proxy": "",
        "NO_PROXY": "",
        "HF_HOME": str(tmp_path / "hf-home"),
        "HF_HUB_OFFLINE": "0",
        "TORCH_HOME": str(tmp_path / "torch-home"),
        "IMGSENT_DOWNLOAD_TIMEOUT": "3",
    }
    write_images(tmp_path / "imgs", 1)
    start = time.monotonic()
    r = imgsent_cli(
        "extract", tmp_path / "imgs", "-o", tmp_path / "S", "-B", "timm:resnet18", "-q", env=env, timeout=120
    )
    took = time.monotonic() - start
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("imgsent: error: cannot get pretrained weights for timm:resnet18 (no answer within 3 s"), (
        last
    )
    assert took < 25, f"{took:.0f} s"  # the client's own retries would take about 40 s


def test_what_a_hub_prints_while_downloading_goes_to_stderr(small, capsys, monkeypatch):
    model = small["model"]
    import imgsent.backbones as bbs

    real = bbs._SOURCES["timm"]

    def chatty(spec, random_weights):
        print(f'Downloading: "https://example.org/{spec.name}.pth" to /somewhere')  # as torch hub does
        return real(spec, random_weights)

    monkeypatch.setitem(bbs._SOURCES, "timm", chatty)
    code, out, err = run_cli(["score", small["imgs"], "--model", model, "--out", "-", "-q"], capsys, monkeypatch)
    assert code == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    assert len(rows) == 24 and "Downloading:" in err


def test_torch_cpp_warnings_stay_off_stderr(tmp_path):
    """An int8 TorchScript module prints "Quantizer.cpp:111 ... deprecated" from C++ as it loads."""
    import torch

    class Pool(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(3, 4)

        def forward(self, x):
            return self.fc(x.mean(dim=(2, 3)))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = torch.ao.quantization.quantize_dynamic(Pool().eval(), {torch.nn.Linear}, dtype=torch.qint8)
        torch.jit.save(torch.jit.script(q), str(tmp_path / "q.pt"))
    write_images(tmp_path / "imgs", 2)
    r = imgsent_cli("extract", tmp_path / "imgs", "-o", tmp_path / "S", "-B", f"torchscript:{tmp_path / 'q.pt'}", "-q")
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    args = ("extract", tmp_path / "imgs", "-o", tmp_path / "S2", "-B", f"torchscript:{tmp_path / 'q.pt'}", "-q")
    debug = imgsent_cli(*args, env={"IMGSENT_DEBUG": "1"})
    assert "Quantizer.cpp" in debug.stderr  # the switch is what hides it (and IMGSENT_DEBUG shows it)


# --- messages ----------------------------------------------------------------------------------


def test_report_messages(small, tmp_path, capsys, monkeypatch):
    def cli(*args):
        return run_cli(list(args), capsys, monkeypatch)

    one_line(cli("report", tmp_path / "missing.parquet", "--out", tmp_path / "r.html"), "missing.parquet")
    scores = small["scores"]
    code, _, err = cli("report", scores, "--out", tmp_path / "nodir" / "r.html")
    one_line((code, "", err), "nodir", "does not exist")
    assert ".tmp" not in err
    one_line(cli("report", scores, "--out", tmp_path / "r.pdf"), "ending in .html")
    assert not (tmp_path / "r.pdf").exists()
    code, _, err = cli("report", scores, "--out", tmp_path / "r.html", "-q")
    assert code == 0 and (tmp_path / "r.html").read_text().startswith("<!DOCTYPE html>"), err


def test_json_labels_are_read_and_bad_ones_get_a_short_message(tmp_path):
    ids = [f"img{i:03d}.jpg" for i in range(300)]
    mapping = {i: ("positive" if k % 2 else "negative") for k, i in enumerate(ids)}
    (tmp_path / "l.json").write_text(json.dumps(mapping))
    assert read_labels(str(tmp_path / "l.json")) == mapping
    (tmp_path / "l2.json").write_text(json.dumps([{"file": i, "sentiment": v} for i, v in mapping.items()]))
    assert read_labels(str(tmp_path / "l2.json")) == mapping
    (tmp_path / "l.jsonl").write_text("".join(json.dumps({"id": i, "label": v}) + "\n" for i, v in mapping.items()))
    assert read_labels(str(tmp_path / "l.jsonl")) == mapping
    (tmp_path / "bad.json").write_text(json.dumps({i: {"label": v, "votes": 5} for i, v in mapping.items()}))
    with pytest.raises(imgsent.ImgsentError) as err:
        read_labels(str(tmp_path / "bad.json"))
    assert len(str(err.value)) < 300 and "neither {id: label}" in str(err.value)
    wide = tmp_path / "wide.csv"  # a CSV whose header names no id column: the message lists a few
    wide.write_text(",".join(f"column_{k}" for k in range(500)) + "\n" + ",".join("x" * 500) + "\n")
    with pytest.raises(imgsent.ImgsentError) as err:
        read_labels(str(wide))
    assert len(str(err.value)) < 400 and "(500 in all)" in str(err.value)


def test_emotion_labels_are_said_so_and_mapped_with_polarity():
    raw = {"a.jpg": "happy", "b.jpg": "sad", "c.jpg": "Happy"}
    with pytest.warns(ImgsentWarning, match=r"emotion names .*--map polarity"):
        assert map_labels(raw, "auto") == raw
    assert map_labels(raw, "polarity") == {"a.jpg": "positive", "b.jpg": "negative", "c.jpg": "positive"}
    with warnings.catch_warnings():
        warnings.simplefilter("error", ImgsentWarning)
        assert map_labels({"a.jpg": "cat", "b.jpg": "dog"}, "auto") == {"a.jpg": "cat", "b.jpg": "dog"}


def test_messages_name_flags_as_typed(small, tmp_path, capsys, monkeypatch):
    def cli(*args):
        return run_cli(list(args), capsys, monkeypatch)

    labels = tmp_path / "l.txt"
    labels.write_text("pos/img000.jpg 1\n")
    one_line(
        cli("train", small["store"], "--labels", labels, "--labels-from-folders", "-o", tmp_path / "m"),
        "--labels FILE or --labels-from-folders",
    )
    code, _, err = cli("train", small["store"], "--labels-from-folders", "--head", "moee", "-o", tmp_path / "m")
    one_line((code, "", err), "'moee' is not one of")
    assert "Value error" not in err
    one_line(cli("prevalence", small["scores"], "--by", "day"), "give --meta FILE")
    one_line(cli("prevalence", small["scores"], "--meta", labels), "--meta needs --by COLUMN")


def test_prevalence_warnings_go_to_stderr_with_the_prefix(small, capsys, monkeypatch):
    code, out, err = run_cli(["prevalence", small["scores"]], capsys, monkeypatch)
    assert code == 0, err
    assert "warning" not in out.lower()
    assert err.startswith("imgsent: warning: ") and "biased" in err


@pytest.mark.filterwarnings("ignore::imgsent.errors.UselessModelWarning")  # two epochs: stderr is the point
def test_no_blank_lines_on_stderr_outside_a_terminal(small, tmp_path, capsys, monkeypatch):
    for args in (
        ["train", small["store"], "--labels-from-folders", "--epochs", "2", "-o", tmp_path / "m"],
        ["evaluate", small["store"], "--labels-from-folders", "--epochs", "1", "--splits", "2"],
    ):
        code, _, err = run_cli(args, capsys, monkeypatch)  # captured: stderr is no terminal
        assert code == 0, err
        assert "\n\n" not in err and not err.startswith("\n"), repr(err[:200])


def test_a_run_says_at_once_that_it_started_then_reports_on_a_timer(small, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("IMGSENT_PROGRESS_EVERY", "1")
    argv = ["extract", small["imgs"], "-o", tmp_path / "S", "-B", TINY, "--random-weights", "--workers", "0"]
    code, _, err = run_cli(argv, capsys, monkeypatch)
    assert code == 0, err
    assert err.splitlines()[0] == f"extract: started on 24 images; backbones {TINY}"
    import io

    from imgsent.report import RunProgress

    err = io.StringIO()
    real, sys.stderr = sys.stderr, err
    try:
        bar = RunProgress(10, "extract", plain=True)
        bar._every = 0.05
        with bar:
            time.sleep(0.5)  # a batch that takes long: the lines come anyway
    finally:
        sys.stderr = real
    first, *lines = err.getvalue().splitlines()
    assert first == "extract: started on 10 images"
    assert len(lines) >= 3 and all(ln.startswith("extract: 0/10 (0.0%)") for ln in lines)


def test_evaluate_with_a_one_class_test_split_gives_nan_auc_without_numpy_warnings():
    from imgsent.evaluation import ConfigResult

    r = ConfigResult("f", "nn", per_split=[{"roc_auc": float("nan"), "accuracy": 1.0}] * 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mean, std = r.mean_std("roc_auc")
        assert np.isnan(mean) and np.isnan(std)
        assert r.mean_std("accuracy") == (1.0, 0.0)
