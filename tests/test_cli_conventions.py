"""CLI conventions, honest training feedback and the paper protocols' sharp edges, through the CLI."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TINY, TINY2, run_cli

import imgsent

# the models these tests train (a few epochs on generated images) are throwaway: what they learn is not the point
pytestmark = pytest.mark.filterwarnings("ignore::imgsent.errors.UselessModelWarning")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def store(tiny_dataset, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("conv") / "store")
    imgsent.extract([str(tiny_dataset)], out, backbones=[TINY, TINY2], random_weights=True, workers=0)
    return out


def test_train_accepts_every_head_name_evaluate_does(store, tmp_path, capsys, monkeypatch):
    for head, schedule in (("moe1", 1), ("moe2", 2)):
        out = tmp_path / head
        code, _, err = run_cli(
            ["train", store, "--labels-from-folders", "--head", head, "--epochs", "2", "--cv", "0", "-o", out],
            capsys,
            monkeypatch,
        )
        assert code == 0, err
        params = json.loads((out / "model.json").read_text())["head"]["params"]
        assert (params["head"], params["schedule"]) == ("moe", schedule)
    assert imgsent.train(store, labels_from_folders=True, head="moe2", epochs=1, cv=0).config.label == "moe2"
    code, _, err = run_cli(
        ["train", store, "--labels-from-folders", "--head", "moe1", "--schedule", "2", "-o", tmp_path / "x"],
        capsys,
        monkeypatch,
    )
    assert code == 2 and "schedule" in err


def test_version(capsys, monkeypatch):
    for argv in (["--version"], ["version"]):
        code, out, _ = run_cli(argv, capsys, monkeypatch)
        assert code == 0 and out.strip() == f"imgsent {imgsent.__version__}"


@pytest.mark.parametrize(
    "argv,flag,values",
    [
        (["score", "x", "--device", "tpu"], "--device", "auto, cpu, cuda, mps, cuda:N"),
        (["score", "x", "--precision", "fp8"], "--precision", "'auto', 'fp32', 'tf32', 'bf16', 'fp16'"),
        (["extract", "x", "-o", "s", "--tta", "rotate"], "--tta", "'none', 'flip', 'crops', 'flip+crops'"),
        (["extract", "x", "-o", "s", "--dtype", "int8"], "--dtype", "'float32', 'float16'"),
        (["score", "x", "--format", "xls"], "--format", "'parquet', 'csv', 'tsv', 'jsonl'"),
        (["train", "s", "-o", "m", "--head", "svm"], "--head", "'nn', 'moe', 'moe1', 'moe2'"),
        (["evaluate", "s", "--heads", "nn,svm"], "--heads", "nn, moe, moe1, moe2"),
        (["evaluate", "s", "--protocol", "loo"], "--protocol", "'random-splits', 'kfold'"),
        (["train", "s", "-o", "m", "--map", "emoji"], "--map", "'auto', 'polarity', 'none'"),
        (["score", "x", "--engine", "spark"], "--engine", "'local', 'ray'"),
    ],
)
def test_choices_are_refused_at_once_listing_the_valid_ones(argv, flag, values, capsys, monkeypatch):
    code, _, err = run_cli(argv, capsys, monkeypatch)  # "x" and "s" do not exist: nothing got that far
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert flag in err and values in err


def test_help_lists_choices_and_readable_metavars(capsys, monkeypatch):
    for cmd in ("extract", "train", "evaluate", "score", "models"):
        code, out, _ = run_cli([cmd, "--help"], capsys, monkeypatch)
        assert code == 0
        assert not re.search(r"<(str|int|float|list\[[^]]*\])>", out), f"{cmd} --help shows a Python type:\n{out}"
    _, out, _ = run_cli(["score", "--help"], capsys, monkeypatch)
    assert "<auto|fp32|tf32|bf16|fp16|int8>" in out and "auto|cpu|cuda|cuda:N|mps" in out and "I/N" in out
    assert "INPUT..." in out
    _, out, _ = run_cli(["extract", "--help"], capsys, monkeypatch)
    assert "INPUT..." in out and "SPEC" in out and "<none|flip|crops|flip+crops>" in out
    _, out, _ = run_cli(["train", "--help"], capsys, monkeypatch)
    assert "the paper gives no rate" in " ".join(out.split())  # which defaults are the paper's, which ours


def test_one_meaning_per_flag_name(store, tmp_path, capsys, monkeypatch):
    base = ["train", store, "--labels-from-folders", "--epochs", "1", "--cv", "0"]
    code, _, err = run_cli([*base, "--features", TINY, "-o", tmp_path / "a"], capsys, monkeypatch)
    assert code == 2 and "--features" in err  # renamed --blocks: a store in score, never blocks
    code, _, err = run_cli([*base, "--hidden", "50", "-o", tmp_path / "b"], capsys, monkeypatch)
    assert code == 2  # renamed --hidden-units: --hidden means hidden files
    code, _, err = run_cli([*base, "--blocks", TINY, "--hidden-units", "16", "-o", tmp_path / "c"], capsys, monkeypatch)
    assert code == 0, err
    meta = json.loads((tmp_path / "c" / "model.json").read_text())
    assert [b["key"] for b in meta["features"]["blocks"]] == [TINY] and meta["head"]["params"]["hidden"] == 16


def test_bash_completion_offers_choices_and_files(tmp_path):
    script = ROOT / "completions" / "imgsent.bash"

    def complete(*words):
        cmd = (
            f"source {script}; COMP_WORDS=(imgsent {' '.join(words)}); COMP_CWORD={len(words)}; "
            'cd "$1"; _imgsent; printf "%s\\n" "${COMPREPLY[@]}"'
        )
        r = subprocess.run(["bash", "-c", cmd, "bash", str(tmp_path)], capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stderr
        return r.stdout.split()

    (tmp_path / "images").mkdir()
    (tmp_path / "labels.txt").write_text("")
    assert "cpu" in complete("score", "--device", "''")
    assert complete("score", "--precision", "b") == ["bf16"]
    assert complete("extract", "--tta", "f") == ["flip", "flip+crops"]
    assert complete("train", "-o", "''") == ["images"]  # a directory option: directories only
    assert sorted(complete("train", "--labels", "''")) == ["images", "labels.txt"]
    assert "--hidden-units" in complete("train", "--hid")


def test_evaluate_table_goes_to_stdout(store, capsys, monkeypatch):
    code, out, err = run_cli(
        ["evaluate", store, "--labels-from-folders", "--heads", "nn", "--splits", "2", "--epochs", "2", "-q"],
        capsys,
        monkeypatch,
    )
    assert code == 0
    assert "accuracy" in out and "nn" in out and "accuracy" not in err


def test_backbones_never_cuts_a_spec():
    env = {"COLUMNS": "40", "PATH": "/usr/bin:/bin"}
    r = subprocess.run([sys.executable, "-m", "imgsent", "backbones"], capture_output=True, text=True, env=env)
    from imgsent.backbones import PRESETS

    lines = [ln.strip() for ln in r.stdout.splitlines()]
    for specs, _ in PRESETS.values():
        for spec in specs:
            assert spec in lines, f"{spec} is not printed whole on a line"


def test_python_api_shows_itself(store):
    names = dir(imgsent)
    assert {"extract", "train", "evaluate", "score", "load_model", "RunOptions"} <= set(names)
    m = imgsent.train(store, labels_from_folders=True, head="nn", epochs=1, cv=0)
    assert repr(m) == (
        f"SentimentModel(head='nn', classes=['negative', 'positive'], backbones=['{TINY}', '{TINY2}'], "
        "in_dim=352, trained on 40 images)"
    )


def test_train_reports_a_held_out_estimate_and_the_card_shows_it(store, tmp_path, capsys, monkeypatch):
    out = tmp_path / "m"
    code, _, err = run_cli(
        ["train", store, "--labels-from-folders", "--epochs", "3", "--cv", "4", "-o", out], capsys, monkeypatch
    )
    assert code == 0, err
    assert "held-out accuracy" in err and "4-fold" in err and "majority-class baseline 50.00%" in err
    held_out = json.loads((out / "model.json").read_text())["training"]["held_out"]
    assert held_out["folds"] == 4 and len(held_out["per_fold"]) == 4
    code, card, _ = run_cli(["models", out], capsys, monkeypatch)
    assert code == 0 and "held-out accuracy" in card and "4-fold" in card
    code, _, err = run_cli(
        ["train", store, "--labels-from-folders", "--epochs", "1", "--cv", "0", "-o", tmp_path / "n"],
        capsys,
        monkeypatch,
    )
    assert code == 0 and "held-out" not in err


def test_a_label_file_matching_few_images_shows_examples(store, tmp_path, capsys, monkeypatch):
    lab = tmp_path / "labels.csv"
    rows = [f"positive/pos{i:02d}.{'png' if i % 3 == 0 else 'jpg'},1" for i in range(20)]
    rows += [f"negative/neg{i:02d}.{'png' if i % 3 == 0 else 'jpg'},0" for i in range(20)]
    lab.write_text("id,label\n" + "\n".join(rows + ["photos/ghost1.jpg,1", "photos/ghost2.jpg,0"]))
    code, _, err = run_cli(
        ["train", store, "-l", lab, "--epochs", "1", "--cv", "0", "-o", tmp_path / "m"], capsys, monkeypatch
    )
    assert code == 0
    assert "imgsent: warning: 2 of 42 labels name no image" in err and "photos/ghost1.jpg" in err


def test_train_refuses_to_write_into_a_folder_that_is_not_a_model(store, tiny_dataset, tmp_path, capsys, monkeypatch):
    base = ["train", store, "--labels-from-folders", "--epochs", "1", "--cv", "0", "-o"]
    code, _, err = run_cli([*base, tiny_dataset / "positive"], capsys, monkeypatch)
    assert code == 2 and "holds other files" in err
    assert (tiny_dataset / "positive" / "model.json").exists() is False
    code, _, err = run_cli([*base, store], capsys, monkeypatch)
    assert code == 2 and "holds other files" in err
    code, _, _ = run_cli([*base, tmp_path / "m"], capsys, monkeypatch)
    assert code == 0
    code, _, _ = run_cli([*base, tmp_path / "m"], capsys, monkeypatch)  # a previous model: replaced
    assert code == 0
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    code, _, _ = run_cli([*base, tmp_path / "other", "--overwrite"], capsys, monkeypatch)
    assert code == 0 and (tmp_path / "other" / "notes.txt").exists()


def test_predefined_split_lists_match_exactly_and_report_the_rest(tmp_path, store, capsys, monkeypatch):
    from imgsent.errors import ImgsentError
    from imgsent.protocols import predefined_from_files

    ids = ["anger/1.jpg", "joy/1.jpg", "joy/2.jpg", "fear/3.jpg"]
    f = tmp_path / "t.txt"
    f.write_text("1.jpg\n")  # a bare file name that two images share: never matches either
    with pytest.raises(ImgsentError, match="name no labelled image"):
        predefined_from_files(ids, [str(f)])
    f.write_text("joy/1.jpg\tjoy\nfear/3.jpg 0\nmissing.jpg\n")  # id<TAB>label, id label, one unmatched
    with pytest.warns(imgsent.errors.ImgsentWarning, match="1 line"):
        (s,) = predefined_from_files(ids, [str(f)])
    assert s.test.tolist() == [1, 3] and s.report["unmatched"] == ["missing.jpg"]
    f.write_text("joy/1.jpg\n" + "".join(f"nope{i}.jpg\n" for i in range(6)))
    with pytest.raises(ImgsentError, match="6 of 7 lines"):
        predefined_from_files(ids, [str(f)])
    split = tmp_path / "split.txt"  # through the CLI, on the store
    split.write_text("".join(f"positive/pos{i:02d}.{'png' if i % 3 == 0 else 'jpg'}\tpositive\n" for i in range(5)))
    code, out, err = run_cli(
        [
            "evaluate",
            store,
            "--labels-from-folders",
            "--protocol",
            "predefined",
            "--split",
            split,
            "--heads",
            "nn",
            "--epochs",
            "1",
            "-q",
        ],
        capsys,
        monkeypatch,
    )
    assert code == 0, err


def test_extract_and_score_share_one_group_of_run_flags():
    """Every run flag extract and score both offer reaches RunOptions the same way (one builder)."""
    import dataclasses
    import inspect

    from imgsent import cli
    from imgsent.options import RunOptions

    fields = {f.name for f in dataclasses.fields(RunOptions)} | {"hidden", "quiet"}
    extract = set(inspect.signature(cli.extract).parameters) & fields
    score = set(inspect.signature(cli.score).parameters) & fields
    assert extract - score == {"tta"} and score - extract == {"keep_columns"}  # the only differences
    opts = cli._run_options(
        {"hidden": True, "quiet": True, "keep_images": Path("kept"), "keep_columns": None, "device": "cpu", "out": "x"}
    )
    assert opts == RunOptions(include_hidden=True, progress=False, keep_images="kept", device="cpu")
    assert cli._run_options({"quiet": False, "keep_columns": ["a"]}) == RunOptions(progress=True, keep_columns=("a",))
    for command in (cli.train, cli.evaluate):  # and train / evaluate share the head-fitting flags
        assert set(cli.FIT_FLAGS) <= set(inspect.signature(command).parameters)
