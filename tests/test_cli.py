"""The command line: thin, one clear line and exit code 2 for bad input, never a traceback."""

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TINY, run_cli, write_images

from imgsent.completions import scripts

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def imgs(tmp_path):
    write_images(tmp_path / "imgs", 3)
    return tmp_path / "imgs"


@pytest.mark.parametrize(
    "argv,fragment",
    [
        (["extract", "IMGS", "--out", "OUT", "-B", "nope:resnet"], "unknown backbone source"),
        (["extract", "IMGS", "--out", "OUT", "-B", TINY, "--random-weights", "--device", "tpu9"], "--device"),
        (["extract", "IMGS", "--out", "OUT", "-B", TINY, "--random-weights", "--shard", "2/2"], "--shard"),
        (["extract", "IMGS", "--out", "OUT", "-B", TINY, "--random-weights", "--tta", "rotate"], "--tta"),
        (["extract", "IMGS", "--out", "OUT", "-B", TINY, "--random-weights", "--dtype", "int8"], "--dtype"),
        (["extract", "IMGS", "--out", "OUT", "-B", TINY, "--random-weights", "--engine", "spark"], "--engine"),
        (["extract", "@missing.txt", "--out", "OUT", "-B", TINY, "--random-weights"], "cannot read input list"),
        (["extract", "IMGS", "--out", "OUT", "-B", "torchvision:mobilenet_v2@/no/such.safetensors"], "not found"),
        (["train", "OUT", "--labels", "x.txt", "--out", "M"], "not a directory"),
        (["score", "IMGS", "--model", "/no/such/model"], "not a model directory"),
        (["score", "IMGS", "--model", "mobilnet"], "not a packaged model (default, lite, mobilenet)"),
        (["score", "IMGS", "--models", "/no/such/dir", "--out", "OUT.csv"], "does not exist"),
        (["score", "--out", "-"], "give either images"),
        (["evaluate", "OUT", "--labels-from-folders", "--protocol", "loo"], "--protocol"),
        (["evaluate", "OUT", "--labels-from-folders"], "not a directory"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(argv, fragment, imgs, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = [a.replace("IMGS", str(imgs)).replace("OUT", str(tmp_path / "out")) for a in argv]
    code, out, err = run_cli(argv, capsys, monkeypatch)
    assert code == 2
    assert fragment in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and err.startswith("imgsent: error: ")


def test_usage_errors_exit_2_without_traceback(capsys, monkeypatch):
    for argv in (["extract"], ["extract", "x", "--batch-size", "many"], ["frobnicate"]):
        code, _, err = run_cli(argv, capsys, monkeypatch)
        assert code == 2 and "Traceback" not in err


def test_extract_cli_summary_goes_to_stderr(imgs, tmp_path, capsys, monkeypatch):
    code, out, err = run_cli(
        ["extract", str(imgs), "--out", str(tmp_path / "s"), "-B", TINY, "--random-weights", "--workers", "0"],
        capsys,
        monkeypatch,
    )
    assert code in (0, None) and out == "" and "images/s" in err


def test_backbones_and_models_commands(capsys, monkeypatch):
    code, out, _ = run_cli(["backbones"], capsys, monkeypatch)
    assert code in (0, None) and "paper" in out and "efficientnet_b2" in out
    code, out, _ = run_cli(["models"], capsys, monkeypatch)
    assert code in (0, None) and "imgsent-default" in out and "held_out_accuracy" in out
    code, out, _ = run_cli(["models", "mobilenet"], capsys, monkeypatch)
    assert code in (0, None) and "IMGSENT_WEIGHTS" in out and "held_out_accuracy" in out


def test_python_dash_m_works():
    r = subprocess.run([sys.executable, "-m", "imgsent", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "extract" in r.stdout and "score" in r.stdout


def test_completion_scripts_are_current():
    for name, text in scripts().items():
        path = ROOT / "completions" / name
        assert path.is_file(), f"missing {path}: run python -m imgsent.completions completions"
        assert path.read_text() == text, f"{path} is stale: run python -m imgsent.completions completions"


def test_completion_scripts_parse():
    r = subprocess.run(["bash", "-n", str(ROOT / "completions" / "imgsent.bash")], capture_output=True)
    assert r.returncode == 0, r.stderr
