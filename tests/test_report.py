"""The HTML report, as a user sees it: self-contained, every section, rendered by a real browser."""

import builtins
import re
import shutil
import subprocess
import sys

import numpy as np
import polars as pl
import pytest
from conftest import CHROMIUM_ARGS, write_images

import imgsent
from imgsent.errors import ImgsentError
from imgsent.htmlreport import build_report

EXTERNAL = re.compile(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:|//)|url\(\s*["']?(?:https?:|//)|<script|<link""", re.I)


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    """60 generated images with made-up scores, a day per image, a labelled sample; one image deleted."""
    root = tmp_path_factory.mktemp("report")
    paths = write_images(root / "imgs", 60, size=(90, 70))
    rng = np.random.default_rng(0)
    y = (rng.uniform(size=60) < 0.4).astype(int)
    p = np.clip(np.where(y == 1, rng.beta(5, 2, 60), rng.beta(2, 5, 60)), 0, 1).astype(np.float32)
    ids = [q.name for q in paths]
    df = pl.DataFrame(
        {
            "id": ids + ["broken.jpg"],
            "path": [str(q) for q in paths] + [str(root / "imgs" / "broken.jpg")],
            "status": ["ok"] * 60 + ["error"],
            "error": [None] * 60 + ["not a recognised image format"],
            "label": list(np.where(p >= 0.5, "positive", "negative")) + [None],
            "score": list(p) + [None],
            "p_negative": list(1 - p) + [None],
            "p_positive": list(p) + [None],
            "model": ["m"] * 61,
            "model_version": ["abc"] * 61,
        }
    )
    df.write_parquet(root / "scores.parquet")
    pl.DataFrame({"id": ids, "day": ["mon", "tue", "wed"] * 20}).write_csv(root / "meta.csv")
    (root / "sample.txt").write_text("".join(f"{i} {t}\n" for i, t in zip(ids[:40], y[:40])))
    (root / "imgs" / ids[int(np.argmax(p))]).unlink()  # the most positive, deleted after scoring: a placeholder
    return root


def test_report_is_self_contained_with_every_section(scored, tmp_path):
    out = tmp_path / "r.html"
    info = build_report(str(scored / "scores.parquet"), str(out), per_class=5)
    page = out.read_text()
    assert not EXTERNAL.search(page), EXTERNAL.search(page)
    for section in ("What was scored", "Scores", "Class shares", "Contact sheets", "most positive", "least sure"):
        assert section in page
    assert "On the labelled sample" not in page and "biased" in page  # no sample: the warning
    assert "not a recognised image format" in page  # error rows by reason
    assert page.count("<figure>") == 3 * 5 and "image no longer readable" in page
    assert page.count("<svg") == 2 and info["bytes"] < 2_000_000


def test_report_by_group_with_a_labelled_sample(scored, tmp_path):
    out = tmp_path / "r.html"
    build_report(
        str(scored / "scores.parquet"),
        str(out),
        by="day",
        meta=str(scored / "meta.csv"),
        labels=str(scored / "sample.txt"),
        per_class=4,
    )
    page = out.read_text()
    assert not EXTERNAL.search(page)
    assert all(f"day = {d}" in page for d in ("mon", "tue", "wed"))
    assert "On the labelled sample (40 images)" in page
    assert page.count("<svg") == 3  # histogram, shares, confusion + ROC
    assert page.count("<figure>") == 3 * 4 * 4  # all images and three days
    assert "calibrated_probability" in page and "adjusted_count" in page


def test_report_renders_in_headless_chromium(scored, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("Chromium is not installed (.ci/run installs Debian's chromium)")
    from PIL import Image

    out = tmp_path / "r.html"
    build_report(
        str(scored / "scores.parquet"),
        str(out),
        by="day",
        meta=str(scored / "meta.csv"),
        labels=str(scored / "sample.txt"),
    )
    shot = tmp_path / "shot.png"
    r = subprocess.run(
        [
            browser,
            "--headless",
            *CHROMIUM_ARGS,
            f"--user-data-dir={tmp_path / 'profile'}",
            "--window-size=1200,2000",
            f"--screenshot={shot}",
            "--enable-logging=stderr",
            "--v=0",
            f"file://{out}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert shot.is_file(), r.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float32)
    assert pixels.std() > 20 and (pixels < 128).mean() > 0.01, "the screenshot is blank"
    console = [ln for ln in r.stderr.splitlines() if "CONSOLE" in ln or "Uncaught" in ln]
    assert not console, console


def test_report_cli_prevalence_plot_and_missing_matplotlib(scored, tmp_path, monkeypatch):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "imgsent",
            "report",
            str(scored / "scores.parquet"),
            "-o",
            str(tmp_path / "r.html"),
            "-q",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0 and (tmp_path / "r.html").is_file(), r.stderr
    report = imgsent.prevalence(str(scored / "scores.parquet"), labels=str(scored / "sample.txt"))
    from imgsent.htmlreport import shares_plot

    for ext in ("svg", "png"):
        shares_plot(report, str(tmp_path / f"shares.{ext}"))
        assert (tmp_path / f"shares.{ext}").stat().st_size > 1000
    real = builtins.__import__

    def no_matplotlib(name, *a, **kw):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    with pytest.raises(ImgsentError, match=r"charts need matplotlib, which is missing: pip install matplotlib"):
        build_report(str(scored / "scores.parquet"), str(tmp_path / "x.html"))


def test_evaluate_plots(tiny_dataset, tmp_path):
    from conftest import TINY

    store = str(tmp_path / "store")
    imgsent.extract([str(tiny_dataset)], store, backbones=[TINY], random_weights=True, workers=0)
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "imgsent",
            "evaluate",
            store,
            "--labels-from-folders",
            "--heads",
            "nn,moe2",
            "--splits",
            "2",
            "--epochs",
            "2",
            "--plots",
            str(tmp_path / "plots"),
            "-q",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    names = sorted(p.name for p in (tmp_path / "plots").iterdir())
    assert len(names) == 4 and {n.rsplit(".", 1)[1] for n in names} == {"png", "svg"}
    assert all(n.startswith(("nn__", "moe2__")) for n in names)
    assert all((tmp_path / "plots" / n).stat().st_size > 5000 for n in names)
