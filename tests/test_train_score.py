"""End to end on generated images: extract -> train -> evaluate -> score, every way in and out."""

import json
import os
import subprocess
import sys

import numpy as np
import polars as pl
import pytest
from conftest import TINY, TINY2

import imgsent
import imgsent.shards
from imgsent.errors import ImgsentError, ImgsentWarning

KW = dict(random_weights=True, workers=0, batch_size=8)


@pytest.fixture(scope="module")
def store(tiny_dataset, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("s") / "store")
    imgsent.extract([str(tiny_dataset)], out, backbones=[TINY, TINY2], rows_per_shard=16, **KW)
    return out


@pytest.fixture(scope="module")
def model_dir(store, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("m") / "model")
    imgsent.train(store, labels_from_folders=True, head="nn", out=out, epochs=30, lr=1e-3)
    return out


def test_train_reports_join_counts_and_learns(store, tmp_path):
    m = imgsent.train(store, labels_from_folders=True, head="moe", epochs=60, lr=1e-3)
    t = m.training
    assert t["labelled"] == 40 and t["labelled_error_rows"] == 2  # broken/ files count, never vanish
    assert m.classes == ["negative", "positive"]  # the broken/ files are error rows: no class of their own
    held_out = t["held_out"]
    assert held_out["folds"] == 5 and held_out["majority_baseline"] == 0.5
    assert held_out["accuracy_mean"] >= 0.9, "unseen images of a separable set are classified, not guessed"


def test_train_two_class_from_label_file(store, tmp_path):
    lab = tmp_path / "labels.csv"
    rows = ["id,label"] + [f"positive/pos{i:02d}.{'png' if i % 3 == 0 else 'jpg'},1" for i in range(20)]
    rows += [f"negative/neg{i:02d}.{'png' if i % 3 == 0 else 'jpg'},0" for i in range(20)] + ["ghost.jpg,1"]
    lab.write_text("\n".join(rows))
    with pytest.warns(ImgsentWarning, match="1 of 41 labels name no image of the store, e.g. 'ghost.jpg'"):
        m = imgsent.train(store, labels=str(lab), head="nn", epochs=30, lr=1e-3, out=str(tmp_path / "m"))
    assert m.classes == ["negative", "positive"]
    assert m.training["labels_without_image"] == 1 and m.training["train_accuracy"] >= 0.95
    meta = json.loads((tmp_path / "m" / "model.json").read_text())
    assert [b["key"] for b in meta["features"]["backbones"]] == [TINY, TINY2]
    assert meta["features"]["normalize_blocks"] is True and meta["head"]["params"]["seed"] == 0


def test_evaluate_protocols_and_report(store, tmp_path):
    rep = tmp_path / "r.json"
    r = imgsent.evaluate(
        store, labels_from_folders=True, heads=["nn", "moe2"], ablation=True, splits=2, epochs=5, report=str(rep)
    )
    assert [(x.features, x.head) for x in r.results] == [
        (TINY, "nn"),
        (TINY2, "nn"),
        (f"{TINY} + {TINY2}", "nn"),
        (f"{TINY} + {TINY2}", "moe2"),
    ]
    data = json.loads(rep.read_text())
    assert len(data["results"][0]["per_split"]) == 2 and "roc_auc_mean" in data["results"][0]
    again = imgsent.evaluate(store, labels_from_folders=True, heads=["nn"], splits=2, epochs=5)
    assert again.results[0].per_split == r.results[2].per_split  # same seed, same numbers
    k = imgsent.evaluate(
        store,
        labels_from_folders=True,
        heads=["nn"],
        protocol="kfold",
        folds=4,
        epochs=2,
        report=str(tmp_path / "r.csv"),
    )
    assert len(k.splits) == 4 and sum(s["test"] for s in k.splits) == 40
    assert (tmp_path / "r.csv").read_text().startswith("features,head,accuracy_mean")
    with pytest.raises(ImgsentError, match="head must be one of nn, moe, moe1, moe2"):
        imgsent.evaluate(store, labels_from_folders=True, heads=["svm"])


def test_score_images_and_store_agree_and_every_input_once(tiny_dataset, store, model_dir, tmp_path):
    out = tmp_path / "scores.parquet"
    s = imgsent.score([str(tiny_dataset)], str(out), model=model_dir, workers=0, batch_size=8, rows_per_shard=16)
    assert (s.total, s.errors) == (42, 2)
    df = pl.read_parquet(out)
    assert df.height == 42 and df["id"].n_unique() == 42
    assert df.columns == [
        "id",
        "path",
        "status",
        "error",
        "label",
        "score",
        "p_negative",
        "p_positive",
        "model",
        "model_version",
    ]
    ok = df.filter(pl.col("status") == "ok")
    assert np.allclose(ok["p_negative"] + ok["p_positive"], 1, atol=1e-5)
    assert np.array_equal(ok["score"].to_numpy(), ok["p_positive"].to_numpy())
    truth = ok["id"].str.split("/").list.first()
    assert (ok["label"] == truth).mean() >= 0.95
    err = df.filter(pl.col("status") == "error")
    assert err["label"].null_count() == 2 and err["error"].null_count() == 0
    from_store = tmp_path / "from_store.parquet"
    imgsent.score(features=store, out=str(from_store), model=model_dir)
    df2 = pl.read_parquet(from_store)
    assert df2["id"].to_list() == df["id"].to_list()
    np.testing.assert_array_equal(df2["p_positive"].to_numpy(), df["p_positive"].to_numpy())


def test_score_formats_and_threshold(tiny_dataset, model_dir, tmp_path):
    imgsent.score([str(tiny_dataset / "positive")], str(tmp_path / "s.csv"), model=model_dir, workers=0)
    csv = pl.read_csv(tmp_path / "s.csv")
    assert csv.height == 20 and "p_positive" in csv.columns
    imgsent.score(
        [str(tiny_dataset / "positive")], str(tmp_path / "s.jsonl"), model=model_dir, workers=0, threshold=1.0
    )
    lines = [json.loads(x) for x in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert len(lines) == 20 and all(r["label"] == "negative" for r in lines if r["score"] < 1.0)
    with pytest.raises(ImgsentError, match="threshold"):
        imgsent.score([str(tiny_dataset)], str(tmp_path / "x.csv"), model=model_dir, threshold=2.0)


def test_score_directory_output_resumes_exactly(tiny_dataset, model_dir, tmp_path, interrupt_after_commits):
    full, part = str(tmp_path / "full") + "/", str(tmp_path / "part") + "/"
    imgsent.score([str(tiny_dataset)], full, model=model_dir, workers=0, batch_size=8, rows_per_shard=10)
    interrupt_after_commits.arm(2, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        imgsent.score([str(tiny_dataset)], part, model=model_dir, workers=0, batch_size=8, rows_per_shard=10)
    interrupt_after_commits.disarm()
    s = imgsent.score([str(tiny_dataset)], part, model=model_dir, workers=0, batch_size=8, rows_per_shard=10)
    assert s.resumed == 20
    a = pl.read_parquet(full + "part-*.parquet")
    b = pl.read_parquet(part + "part-*.parquet")
    assert a.equals(b)
    assert sum(s.labels.values()) == 40


def test_keep_features_writes_a_store(tiny_dataset, model_dir, tmp_path):
    feats = str(tmp_path / "kept")
    imgsent.score([str(tiny_dataset)], str(tmp_path / "s.parquet"), model=model_dir, workers=0, keep_features=feats)
    fs = imgsent.features.load(feats, only_ok=False)
    assert len(fs) == 42
    imgsent.score(features=feats, out=str(tmp_path / "s2.parquet"), model=model_dir)
    a, b = pl.read_parquet(tmp_path / "s.parquet"), pl.read_parquet(tmp_path / "s2.parquet")
    assert a.equals(b)


def test_score_a_job_array_store_sorted_like_one_job(tiny_dataset, model_dir, tmp_path):
    one, split = str(tmp_path / "one"), str(tmp_path / "split")
    imgsent.extract([str(tiny_dataset)], one, backbones=[TINY, TINY2], rows_per_shard=6, **KW)
    for i in range(3):
        imgsent.extract([str(tiny_dataset)], split, backbones=[TINY, TINY2], shard=f"{i}/3", rows_per_shard=6, **KW)
    s = imgsent.score(features=split, out=str(tmp_path / "split.jsonl"), model=model_dir)
    imgsent.score(features=one, out=str(tmp_path / "one.jsonl"), model=model_dir)
    a, b = pl.read_ndjson(tmp_path / "one.jsonl"), pl.read_ndjson(tmp_path / "split.jsonl")
    assert a["id"].to_list() == sorted(a["id"].to_list()) == b["id"].to_list()
    assert a.select("id", "status", "label").equals(b.select("id", "status", "label"))
    # other batch compositions in extraction: fixed micro-batches and head blocks make scores identical
    np.testing.assert_array_equal(a["p_positive"].to_numpy(), b["p_positive"].to_numpy())
    assert (s.total, s.errors, sum(s.labels.values())) == (42, 2, 40)


def test_mismatched_model_and_store_refused(tiny_dataset, model_dir, tmp_path):
    other = str(tmp_path / "other")
    imgsent.extract([str(tiny_dataset / "positive")], other, backbones=[TINY], **KW)
    with pytest.raises(ImgsentError, match="no features from"):
        imgsent.score(features=other, out=str(tmp_path / "x.parquet"), model=model_dir)
    tta = str(tmp_path / "tta")
    imgsent.extract([str(tiny_dataset / "positive")], tta, backbones=[TINY, TINY2], tta="flip", **KW)
    with pytest.raises(ImgsentError, match="augmentation"):
        imgsent.score(features=tta, out=str(tmp_path / "x.parquet"), model=model_dir)


def test_cli_pipeline_stdin_to_stdout(tiny_dataset, model_dir, tmp_path):
    paths = "".join(f"{p}\0" for p in sorted((tiny_dataset / "negative").iterdir()))
    paths += f"{tiny_dataset / 'broken' / 'empty.jpg'}\0"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "imgsent",
            "score",
            "-",
            "--null",
            "--out",
            "-",
            "--model",
            model_dir,
            "--workers",
            "0",
            "-q",
        ],
        input=paths.encode(),
        capture_output=True,
        env=env,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr.decode()
    rows = [json.loads(x) for x in r.stdout.decode().splitlines()]
    assert len(rows) == 21 and sum(r["status"] == "error" for r in rows) == 1
    assert sum(r["label"] == "negative" for r in rows) >= 19
    # A closed pipe ends the run quietly.
    r = subprocess.run(
        f"{sys.executable} -m imgsent score {tiny_dataset} --out - --model {model_dir} --workers 0 "
        f"--batch-size 2 -q | head -n 1",
        shell=True,
        capture_output=True,
        env=env,
        timeout=300,
    )
    assert len(r.stdout.decode().splitlines()) == 1
    assert b"Traceback" not in r.stderr, r.stderr.decode()


def test_bad_precision_refused_when_scoring_a_store(store, model_dir, tmp_path):
    with pytest.raises(ImgsentError, match="precision must be one of"):
        imgsent.score(features=store, out=str(tmp_path / "x.parquet"), model=model_dir, precision="fp8")
    assert not (tmp_path / "x.parquet").exists()


def test_ablation_rows_follow_the_papers_table_two():
    from imgsent.evaluation import ablation_configs

    blocks = [("a", 1), ("b", 2), ("c", 3)]
    rows = [([k for k, _ in bl], head, label) for bl, head, label in ablation_configs(blocks, ["nn", "moe1", "moe2"])]
    assert rows == [
        (["a"], "nn", "alone"),
        (["b"], "nn", "alone"),
        (["c"], "nn", "alone"),
        (["a", "b", "c"], "nn", "all"),
        (["a", "b", "c"], "moe1", "all"),
        (["a", "b", "c"], "moe2", "all"),
        (["b", "c"], "nn", "all but a"),
        (["a", "c"], "nn", "all but b"),
        (["a", "b"], "nn", "all but c"),
    ]
    assert [r[2] for r in ablation_configs(blocks[:2], ["nn"])] == ["alone", "alone", "all"]  # no "all but" of two
    assert ablation_configs(blocks[:1], ["nn", "moe2"]) == [(blocks[:1], "nn", "all"), (blocks[:1], "moe2", "all")]


def test_ablation_tables_name_views_briefly_and_unambiguously():
    from imgsent.evaluation import short_names

    keys = [
        "torchvision:mobilenet_v2.IMAGENET1K_QNNPACK_V1",
        "torchvision:mobilenet_v2.IMAGENET1K_QNNPACK_V1:probs",
        "objects:torchscript:/models/d2go.pt",
        "regions:torchscript:/models/d2go.pt+torchvision:mobilenet_v2+k=5+min=0.3",
        "torchscript:/a/net.pt",
        "torchscript:/b/net.pt",
    ]
    assert short_names(keys) == {
        keys[0]: "mobilenet_v2.IMAGENET1K_QNNPACK_V1",
        keys[1]: "mobilenet_v2.IMAGENET1K_QNNPACK_V1:probs",
        keys[2]: "objects:torchscript:d2go.pt",
        keys[3]: "regions:torchscript:d2go.pt+torchvision:mobilenet_v2+k=5+min=0.3",
        keys[4]: "torchscript:/a/net.pt",  # two files of one name: full paths
        keys[5]: "torchscript:/b/net.pt",
    }
