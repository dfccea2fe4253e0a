"""Labels: reading label files or folder names, mapping emotions to polarity, joining to a store."""

from __future__ import annotations

import csv
import io
import os
import warnings
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from .errors import ImgsentError, ImgsentWarning
from .inputs import is_image_name
from .options import LABEL_MAPS as MAPS

POSITIVE_EMOTIONS = ("joy", "surprise", "amusement", "awe", "contentment", "excitement")
NEGATIVE_EMOTIONS = ("anger", "disgust", "fear", "sadness")
_POLARITY_NAMES = {
    "positive": "positive",
    "pos": "positive",
    "negative": "negative",
    "neg": "negative",
    "1": "positive",
    "0": "negative",
}
# -1 / 1 (and +1): read as polarity by --map auto and polarity only when no label is anything else
# (-1 / 0 / 1 is three classes: negative, neutral, positive).
_SIGNED = {"-1": "negative", "1": "positive", "+1": "positive"}
# Other names of the paper's emotions (adjectives, and the expression classes of face datasets),
# so that --map polarity reads "happy" / "sad" as it reads "joy" / "sadness". "neutral" has none.
_EMOTION_SYNONYMS = {
    "happy": "positive",
    "happiness": "positive",
    "joyful": "positive",
    "surprised": "positive",
    "amused": "positive",
    "excited": "positive",
    "content": "positive",
    "sad": "negative",
    "angry": "negative",
    "disgusted": "negative",
    "fearful": "negative",
    "afraid": "negative",
    "scared": "negative",
}
POLARITY = {
    **_POLARITY_NAMES,
    **{e: "positive" for e in POSITIVE_EMOTIONS},
    **{e: "negative" for e in NEGATIVE_EMOTIONS},
    **_EMOTION_SYNONYMS,
}
ID_COLUMNS = ("id", "path", "file", "filename", "file_name", "image", "image_id", "name")
LABEL_COLUMNS = ("label", "labels", "class", "sentiment", "polarity", "emotion", "target", "y")


def _open_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8-sig") as fh:
            return fh.read()
    except OSError as exc:
        raise ImgsentError(f"cannot read labels file {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ImgsentError(f"labels file {path} is not UTF-8 text") from None


def read_labels(
    path: str, *, id_column: str | None = None, label_column: str | None = None, random_only: bool = False
) -> dict[str, str]:
    """Read ``{id_or_path: raw_label}`` from a CSV/TSV (header sniffed), a ``<file> <label>`` list,
    or JSON (``{id: label}``, a list of objects, or JSON Lines).

    A headed file's rows with an empty label are skipped images (``imgsent label`` writes them so),
    not labels. A ``mode`` column (``imgsent label``'s files): ``repeat`` rows (a second annotator's
    label of an image, kept for their agreement) are left out; with ``random_only``, so is every row
    whose mode is not ``random`` (images picked for the model are no random sample of the
    collection), said in a warning.

    Raises :class:`ImgsentError` naming the line for malformed files or conflicting duplicates.
    """
    text = _open_text(path)
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    if not lines:
        raise ImgsentError(f"labels file {path} has no labels")
    first = lines[0]
    delimited = path.lower().endswith((".csv", ".tsv")) or any(d in first for d in ",;\t")
    rows: list[tuple[int, str, str]] = []
    modes: dict[int, str] = {}  # line -> the row's mode, for files with a mode column
    headed = True
    if text.lstrip().startswith(("{", "[")):
        rows = _json_rows(text, path, id_column, label_column)
    elif delimited:
        delim = _delimiter(first, path)
        reader = list(csv.reader(io.StringIO("\n".join(lines)), delimiter=delim))
        header = [c.strip().lower() for c in reader[0]]
        # A header names columns; a data row holds an image file name (first, or swapped with its label).
        has_header = (
            id_column is not None
            or label_column is not None
            or any(h in ID_COLUMNS + LABEL_COLUMNS for h in header)
            or not any(is_image_name(c.strip()) for c in header)
        )
        mode_idx = None
        if has_header:
            id_idx = _column_index(header, id_column, ID_COLUMNS, path, "id")
            label_idx = _column_index(header, label_column, LABEL_COLUMNS, path, "label")
            mode_idx = header.index("mode") if "mode" in header else None
            body = list(enumerate(reader[1:], start=2))
        else:
            id_idx, label_idx = 0, 1
            body = list(enumerate(reader, start=1))
        headed = has_header
        for lineno, row in body:
            if len(row) <= max(id_idx, label_idx):
                raise ImgsentError(
                    f"labels file {path}, line {lineno}: expected at least {max(id_idx, label_idx) + 1} columns"
                )
            rows.append((lineno, row[id_idx].strip(), row[label_idx].strip()))
            if mode_idx is not None and len(row) > mode_idx:
                modes[lineno] = row[mode_idx].strip().lower()
    else:
        headed = False
        for lineno, ln in enumerate(lines, start=1):
            parts = ln.strip().rsplit(None, 1)
            if len(parts) != 2:
                raise ImgsentError(
                    f"labels file {path}, line {lineno}: expected '<file> <label>', got {ln.strip()[:80]!r}"
                )
            rows.append((lineno, parts[0], parts[1]))
    if modes:
        rows = [r for r in rows if modes.get(r[0]) != "repeat"]
        if random_only:
            kept = [r for r in rows if modes.get(r[0]) == "random"]
            others = sum(1 for r in rows if r[2]) - sum(1 for r in kept if r[2])
            if others:
                warnings.warn(
                    f"labels file {path}: using its {sum(1 for r in kept if r[2])} mode=random labels only; "
                    f"{others} labels chosen otherwise (for the model, not at random) would bias the estimate",
                    ImgsentWarning,
                    stacklevel=3,
                )
            rows = kept
    _check_not_swapped(rows, path)
    labels: dict[str, str] = {}
    for lineno, key, label in rows:
        if headed and key and not label:
            continue  # a skipped image
        if not key or not label:
            raise ImgsentError(f"labels file {path}, line {lineno}: empty id or label")
        if key in labels and labels[key] != label:
            raise ImgsentError(
                f"labels file {path}, line {lineno}: {key!r} is labelled both {labels[key]!r} and {label!r}"
            )
        labels[key] = label
    return labels


def _delimiter(first: str, path: str) -> str:
    """The delimiter of a CSV/TSV: a tab (or .tsv), else a semicolon where the first line has more
    of them than commas (spreadsheets in many European locales save so), else a comma."""
    if "\t" in first or path.lower().endswith(".tsv"):
        return "\t"
    return ";" if first.count(";") > first.count(",") else ","


def _check_not_swapped(rows: list[tuple[int, str, str]], path: str) -> None:
    """Refuse, naming the likely cause, a file whose label column holds the file names."""
    if len(rows) < 2:
        return
    names_as_labels = sum(is_image_name(label) for _, _, label in rows)
    names_as_ids = sum(is_image_name(key) for _, key, _ in rows)
    if names_as_labels >= 0.8 * len(rows) and names_as_ids <= 0.2 * len(rows):
        _, key, label = rows[0]
        raise ImgsentError(
            f"labels file {path}: the columns look swapped: the label column holds file names (e.g. {label!r}) "
            f"and the id column labels (e.g. {key!r}); put the file first, or name them with --id-column and "
            "--label-column"
        )


def _json_rows(text: str, path: str, id_column: str | None, label_column: str | None) -> list[tuple[int, str, str]]:
    """Rows of a JSON labels file: ``{"a.jpg": "positive", ...}``, a list of objects, or JSON Lines
    (one object a line), objects holding an id and a label field (named as in a CSV header)."""
    import json

    try:
        data = json.loads(text)
    except ValueError:
        try:
            data = [json.loads(ln) for ln in text.splitlines() if ln.strip()]
        except ValueError as exc:
            raise ImgsentError(f"labels file {path} is not valid JSON ({str(exc)[:80]})") from None
    if isinstance(data, dict) and all(isinstance(v, (str, int)) and not isinstance(v, bool) for v in data.values()):
        return [(k + 1, str(key), str(v)) for k, (key, v) in enumerate(data.items())]
    if isinstance(data, list) and data and all(isinstance(r, dict) for r in data):
        header = list(dict.fromkeys(str(c).lower() for r in data for c in r))
        id_key = header[_column_index(header, id_column, ID_COLUMNS, path, "id")]
        label_key = header[_column_index(header, label_column, LABEL_COLUMNS, path, "label")]
        rows = []
        for k, r in enumerate(data, start=1):
            low = {str(c).lower(): v for c, v in r.items()}
            rows.append((k, str(low.get(id_key, "")).strip(), str(low.get(label_key, "")).strip()))
        return rows
    raise ImgsentError(
        f"labels file {path} is JSON but neither {{id: label}} nor a list of objects with id and label fields"
    )


def _columns_text(header: list[str]) -> str:
    """A header for a message: at most 8 names of at most 40 characters."""
    names = [h if len(h) <= 40 else h[:37] + "..." for h in header[:8]]
    return ", ".join(names) + (f", ... ({len(header)} in all)" if len(header) > 8 else "")


def _column_index(header: list[str], wanted: str | None, candidates: tuple[str, ...], path: str, what: str) -> int:
    if wanted is not None:
        if wanted.lower() not in header:
            raise ImgsentError(f"labels file {path} has no column {wanted!r} (columns: {_columns_text(header)})")
        return header.index(wanted.lower())
    for c in candidates:
        if c in header:
            return header.index(c)
    raise ImgsentError(
        f"labels file {path}: cannot tell which column is the {what} (columns: {_columns_text(header)}); "
        f"name it with --{what}-column"
    )


def labels_from_folders(ids: list[str]) -> dict[str, str]:
    """The parent folder name of each id is its label (``positive/a.jpg`` -> ``positive``)."""
    out = {}
    for i in ids:
        parent = os.path.basename(os.path.dirname(i))
        if parent:
            out[i] = parent
    if not out:
        raise ImgsentError("--labels-from-folders: no image sits in a folder (ids have no parent directory)")
    return out


def map_labels(raw: dict[str, str], mapping: str = "auto") -> dict[str, str]:
    """Normalise label names. ``polarity``: emotions, 0/1 and pos/neg to positive/negative (unknown
    names are an error); ``auto``: the same when every label is a polarity name or 0/1, else
    unchanged; ``none``: unchanged."""
    if mapping not in MAPS:
        raise ImgsentError(f"--map must be one of {', '.join(MAPS)}, got {mapping!r}")
    lowered = {k: v.strip().lower() for k, v in raw.items()}
    if mapping == "none":
        return dict(raw)
    if mapping == "polarity":
        if set(lowered.values()) <= set(_SIGNED):
            return {k: _SIGNED[v] for k, v in lowered.items()}
        unknown = sorted({v for v in lowered.values() if v not in POLARITY})
        if unknown:
            raise ImgsentError(f"--map polarity: no polarity for label(s) {', '.join(unknown[:5])}")
        return {k: POLARITY[v] for k, v in lowered.items()}
    if all(v in _POLARITY_NAMES for v in lowered.values()):
        return {k: _POLARITY_NAMES[v] for k, v in lowered.items()}
    if set(lowered.values()) <= set(_SIGNED):
        warnings.warn(
            "the labels are -1 / 1: read as negative / positive (--map none keeps them as classes '-1' and '1')",
            ImgsentWarning,
            stacklevel=3,
        )
        return {k: _SIGNED[v] for k, v in lowered.items()}
    names = sorted(set(raw.values()))
    if all(v in POLARITY for v in lowered.values()):
        shown = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
        warnings.warn(
            f"the labels are emotion names ({shown}): training {len(names)} classes named so; --map polarity reads "
            f"them as positive / negative ({', '.join(f'{n} -> {POLARITY[n.strip().lower()]}' for n in names[:3])})",
            ImgsentWarning,
            stacklevel=3,
        )
    return dict(raw)


def is_bare_name(key: str) -> bool:
    """A label key that is only a file name (``1.jpg``), not a path (``pos/1.jpg``, ``/x/1.jpg``)."""
    return "/" not in key and "\\" not in key


@dataclass
class LabelJoin:
    """Labelled rows of a feature set: ``rows`` index the feature set, ``y`` index ``classes``."""

    rows: np.ndarray
    y: np.ndarray
    classes: list[str]
    counts: dict[str, int] = field(default_factory=dict)
    unlabelled_images: int = 0
    labels_without_image: int = 0
    error_images: int = 0
    unmatched_examples: list[str] = field(default_factory=list)  # a few labels that name no image

    def summary(self) -> dict:
        out = {
            "labelled": int(len(self.rows)),
            "per_class": self.counts,
            "images_without_label": self.unlabelled_images,
            "labels_without_image": self.labels_without_image,
            "labelled_error_rows": self.error_images,
        }
        if self.unmatched_examples:
            out["labels_without_image_examples"] = self.unmatched_examples
        return out


def join_labels(ids: list[str], paths: list[str], status: list[str], labels: dict[str, str]) -> LabelJoin:
    """Match labels to rows by id, then path; a label whose key is a bare file name (no folder)
    matches the one row whose file name it is, never a name that several rows share. A label that
    names a folder and a file is matched by id or path alone: ``pos/1.jpg`` never labels
    ``neg/1.jpg``. Error rows are counted, not used."""
    by_id = {rid: k for k, rid in enumerate(ids)}
    by_path = {p: k for k, p in enumerate(paths)}
    names = Counter(os.path.basename(p) for p in ids)
    by_name = {os.path.basename(rid): k for k, rid in enumerate(ids) if names[os.path.basename(rid)] == 1}
    row_key: dict[int, str] = {}
    for key in labels:
        k = by_id.get(key, by_path.get(key))
        if k is None and is_bare_name(key):
            k = by_name.get(key)
        if k is not None and k not in row_key:
            row_key[k] = key
    used = set(row_key.values())
    rows, y_names = [], []
    unlabelled = errors = 0
    for i, st in enumerate(status):
        key = row_key.get(i)
        if key is None:
            unlabelled += 1
            continue
        if st != "ok":
            errors += 1
            continue
        rows.append(i)
        y_names.append(labels[key])
    unmatched = sorted(set(labels) - used)
    if not rows:
        examples = (
            f" (labels name e.g. {', '.join(map(repr, unmatched[:3]))}; the store has e.g. " if unmatched else " ("
        )
        raise ImgsentError(
            "no labelled image found in the store: do the label file's names match the image ids?"
            f"{examples}{', '.join(map(repr, ids[:3]))})"
        )
    if unmatched:
        ambiguous = sum(1 for key in unmatched if is_bare_name(key) and names[key] > 1)
        why = (
            f"; {ambiguous} of them are file names that several images share (name those by id or path)"
            if ambiguous
            else ""
        )
        warnings.warn(
            f"{len(unmatched)} of {len(labels)} labels name no image of the store, e.g. "
            f"{', '.join(map(repr, unmatched[:3]))} (image ids look like {', '.join(map(repr, ids[:2]))}){why}",
            ImgsentWarning,
            stacklevel=3,
        )
    classes = sorted(set(y_names))
    if len(classes) < 2:
        raise ImgsentError(f"labels have a single class ({classes[0]!r}); need at least two")
    index = {c: k for k, c in enumerate(classes)}
    return LabelJoin(
        rows=np.asarray(rows, dtype=np.int64),
        y=np.asarray([index[c] for c in y_names], dtype=np.int64),
        classes=classes,
        counts=dict(Counter(y_names)),
        unlabelled_images=unlabelled,
        labels_without_image=len(unmatched),
        error_images=errors,
        unmatched_examples=unmatched[:5],
    )
