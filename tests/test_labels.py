import warnings

import pytest

from imgsent.errors import ImgsentError, ImgsentWarning
from imgsent.labels import join_labels, labels_from_folders, map_labels, read_labels


def test_plain_list_csv_tsv_and_headers(tmp_path):
    (tmp_path / "a.txt").write_text("x.jpg 1\ny.jpg 0\n")
    assert read_labels(str(tmp_path / "a.txt")) == {"x.jpg": "1", "y.jpg": "0"}
    (tmp_path / "b.csv").write_text("path,sentiment,other\nx.jpg,positive,3\n")
    assert read_labels(str(tmp_path / "b.csv")) == {"x.jpg": "positive"}
    (tmp_path / "c.tsv").write_text("x.jpg\tjoy\ny.jpg\tfear\n")
    assert read_labels(str(tmp_path / "c.tsv")) == {"x.jpg": "joy", "y.jpg": "fear"}
    (tmp_path / "d.csv").write_text("img,cls\nx.jpg,a\n")
    assert read_labels(str(tmp_path / "d.csv"), id_column="img", label_column="cls") == {"x.jpg": "a"}


@pytest.mark.parametrize(
    "content,match",
    [
        ("", "no labels"),
        ("justonefield\n", "expected '<file> <label>'"),
        ("a.jpg 1\na.jpg 0\n", "both"),
        ("img,cls\nx.jpg,a\n", "cannot tell which column"),
    ],
)
def test_bad_label_files_give_clear_errors(tmp_path, content, match):
    p = tmp_path / ("l.csv" if "," in content else "l.txt")
    p.write_text(content)
    with pytest.raises(ImgsentError, match=match):
        read_labels(str(p))
    with pytest.raises(ImgsentError, match="cannot read"):
        read_labels(str(tmp_path / "missing.txt"))


def test_polarity_mapping():
    assert map_labels({"a": "1", "b": "0"}) == {"a": "positive", "b": "negative"}
    with pytest.warns(ImgsentWarning, match="emotion names"):  # auto keeps emotions, and says so
        assert map_labels({"a": "Joy", "b": "sadness"}) == {"a": "Joy", "b": "sadness"}
    assert map_labels({"a": "Joy", "b": "sadness", "c": "awe"}, "polarity") == {
        "a": "positive",
        "b": "negative",
        "c": "positive",
    }
    with pytest.raises(ImgsentError, match="no polarity"):
        map_labels({"a": "meh"}, "polarity")


def test_join_counts_everything():
    ids = ["pos/a.jpg", "neg/b.jpg", "pos/c.jpg", "d.jpg"]
    paths = ["/x/" + i for i in ids]
    status = ["ok", "ok", "error", "ok"]
    labels = {"pos/a.jpg": "positive", "/x/neg/b.jpg": "negative", "c.jpg": "positive", "zzz.jpg": "negative"}
    with pytest.warns(ImgsentWarning, match="1 of 4 labels name no image of the store, e.g. 'zzz.jpg'"):
        j = join_labels(ids, paths, status, labels)
    assert j.rows.tolist() == [0, 1] and j.classes == ["negative", "positive"] and j.y.tolist() == [1, 0]
    s = j.summary()
    assert (s["images_without_label"], s["labels_without_image"], s["labelled_error_rows"]) == (1, 1, 1)
    assert labels_from_folders(ids[:2]) == {"pos/a.jpg": "pos", "neg/b.jpg": "neg"}
    with pytest.raises(ImgsentError, match="single class"):
        join_labels(ids[:1], paths[:1], status[:1], {"pos/a.jpg": "positive"})


def test_labels_land_on_exactly_the_images_they_name():
    """Class folders that reuse file names (pos/1.jpg, neg/1.jpg): a label by path names one image;
    the unlabelled image of the same file name is never labelled through its name (issue 32)."""
    ids = [f"{c}/{k}.jpg" for c in ("pos", "neg") for k in range(1, 6)]
    paths = ["/data/" + i for i in ids]
    status = ["ok"] * len(ids)
    labels = {"/data/pos/1.jpg": "positive", "/data/pos/2.jpg": "positive", "neg/3.jpg": "negative"}
    j = join_labels(ids, paths, status, labels)
    assert [ids[r] for r in j.rows] == ["pos/1.jpg", "pos/2.jpg", "neg/3.jpg"]
    assert j.summary()["images_without_label"] == 7 and j.summary()["labels_without_image"] == 0
    # A bare file name matches only where it is unique in the store; a shared one matches nothing, said so.
    only = {"ok1.jpg": "positive", "3.jpg": "negative", "pos/4.jpg": "negative"}
    with pytest.warns(ImgsentWarning, match="1 of them are file names that several images share"):
        j = join_labels(ids + ["x/ok1.jpg"], paths + ["/data/x/ok1.jpg"], status + ["ok"], only)
    assert [(ids + ["x/ok1.jpg"])[r] for r in j.rows] == ["pos/4.jpg", "x/ok1.jpg"]


def test_semicolon_csv_and_signed_labels_train_a_negative_positive_model(tiny_model, tmp_path):
    """European spreadsheets save CSV with semicolons; -1/1 is a common polarity coding (issue 35)."""
    import imgsent
    from imgsent.errors import UselessModelWarning

    store = str(tiny_model.parent / "store")
    semi = tmp_path / "export.csv"
    semi.write_text("image;sentiment\n" + "".join(f"pos{i:02d}.jpg;1\nneg{i:02d}.jpg;-1\n" for i in (1, 2, 4, 5, 7)))
    with pytest.warns(ImgsentWarning, match="-1 / 1: read as negative / positive"):
        assert read_labels(str(semi))["pos01.jpg"] == "1" and map_labels({"a": "-1", "b": "1"}) == {
            "a": "negative",
            "b": "positive",
        }
    with pytest.warns(ImgsentWarning, match="-1 / 1"), warnings.catch_warnings():
        warnings.simplefilter("ignore", UselessModelWarning)
        model = imgsent.train(store, labels=str(semi), epochs=2, cv=0)
    assert model.classes == ["negative", "positive"] and model.training["labelled"] == 10
    assert map_labels({"a": "-1", "b": "0", "c": "1"}) == {"a": "-1", "b": "0", "c": "1"}  # three classes: kept
    assert map_labels({"a": "-1", "b": "+1"}, "polarity") == {"a": "negative", "b": "positive"}


def test_swapped_columns_are_named_as_the_likely_cause(tmp_path):
    p = tmp_path / "l.csv"
    p.write_text("positive,a.jpg\nnegative,b.jpg\npositive,c.jpg\n")
    with pytest.raises(ImgsentError, match="columns look swapped: the label column holds file names"):
        read_labels(str(p))
