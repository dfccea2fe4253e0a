"""``score``: images (or a feature store) in, one row per image with class probabilities out.

Images go through the same engine as ``extract`` (each decoded once, only the backbones the
model's feature recipe names), then the model's head. Output: a Parquet / CSV / JSON Lines file,
a stream on stdout (``--out -``), or, for big resumable jobs, a directory of Parquet shards with a
manifest (``--out DIR/``), written by the same sharded writer as feature stores.
"""

from __future__ import annotations

import errno
import hashlib
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from importlib import resources

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from .backbones import Backbone, BackboneSpec, create_backbone, fingerprints_match
from .decode import DEFAULT_MAX_PIXELS
from .engine import FeatureBatch, in_lanes
from .errors import ImgsentError
from .extraction import DEFAULT_ROWS_PER_SHARD, build_engine, resolve_inputs, run_sharded
from .features import KIND as FEATURES_KIND
from .features import StoreReader, describe_header_difference, feature_table, store_header
from .inputs import display_path
from .report import RunSummary
from .shards import ShardedWriter, list_store
from .training import SentimentModel, head_precision, load_model

FORMATS = ("parquet", "csv", "jsonl")
SCORES_KIND = "scores"
DEFAULT_MODEL = "default"


def default_model_path() -> str:
    """Where the packaged default polarity model lives."""
    return str(resources.files("imgsent") / "default_model")


def resolve_model(model: str | None) -> SentimentModel:
    """``None``/``default``: the packaged model; else a bundle directory."""
    path = default_model_path() if model in (None, DEFAULT_MODEL) else model
    return load_model(path)


def _weights_for(model: SentimentModel, weights: Sequence[str]) -> dict[str, str]:
    """``--weights FILE`` (one-backbone models) or ``--weights KEY=FILE`` -> {key: file}."""
    keys = [k for k, _ in model.blocks]
    out: dict[str, str] = {}
    for w in weights:
        key, sep, path = w.partition("=")
        if sep and key in keys:
            out[key] = path
        elif len(keys) == 1:
            out[keys[0]] = w
        else:
            raise ImgsentError(
                f"this model has {len(keys)} backbones: give --weights KEY=FILE with KEY one of {', '.join(keys)}"
            )
    return out


def model_backbones(model: SentimentModel, weights: Sequence[str] = ()) -> list[Backbone]:
    """Build exactly the backbones the model's recipe names, and check their weights' fingerprints.

    Weights, in order: ``weights`` (``--weights``), the file named in the recipe if it exists
    here, then the backbone's own resolution (imgsent's cache, environment, download).
    """
    given = _weights_for(model, weights)
    recipes = {r["key"]: r for r in model.recipes}
    out = []
    for key, _dim in model.blocks:
        recipe = recipes.get(key)
        if recipe is None:
            raise ImgsentError(f"model recipe has no backbone entry for block {key}")
        spec = BackboneSpec.parse(recipe.get("spec", key))
        path = given.get(key) or (spec.weights if spec.weights and os.path.isfile(spec.weights) else None)
        spec_str = key + (f"@{path}" if path else "")
        # A model trained on random (seeded, test-only) backbone weights gets them again.
        random_weights = bool(recipe.get("fingerprint", {}).get("random")) and not path
        bb = create_backbone(spec_str, random_weights=random_weights)
        if not fingerprints_match(recipe.get("fingerprint", {}), bb.fingerprint):
            raise ImgsentError(
                f"weights for {key}{' (' + path + ')' if path else ''} are not the ones this model was trained on "
                f"(their probe features differ); point --weights at the right file"
            )
        out.append(bb)
    return out


def model_identity(model: SentimentModel, path: str | None) -> tuple[str, str]:
    name = os.path.basename(os.path.normpath(path)) if path not in (None, DEFAULT_MODEL) else "imgsent-default"
    h = hashlib.sha256()
    for k, v in sorted(model.head.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().contiguous().numpy().tobytes())
    return name, h.hexdigest()[:12]


class ScoreTableBuilder:
    """Turns features (or error rows) into score rows for one model."""

    def __init__(self, model: SentimentModel, model_name: str, model_version: str, threshold: float | None,
                 precision: str = "fp32"):  # fmt: skip
        if threshold is not None:
            if len(model.classes) != 2:
                raise ImgsentError("--threshold applies to two-class models only")
            if not 0 <= threshold <= 1:
                raise ImgsentError(f"--threshold must be in [0, 1], got {threshold}")
        self.model = model
        self.name, self.version = model_name, model_version
        self.threshold = threshold
        self.precision = precision
        self.pos = model.classes.index(model.positive_class) if model.positive_class else None

    def table(self, ids, paths, status, error, X: np.ndarray | None, ok: np.ndarray, proba=None) -> pa.Table:
        """Score rows. ``ids``...``error``: lists or Arrow string arrays; ``X``: features of every row
        (whatever sits in rows that are not ``ok`` is ignored), or ``proba`` (n, C) when the head
        already ran (Ray actors)."""
        n, classes = len(ok), self.model.classes
        if proba is None and ok.any():
            proba = self.model.predict_proba(X, self.precision)
            proba[~ok] = np.nan
        elif proba is None:
            proba = np.full((n, len(classes)), np.nan, dtype=np.float32)
        if self.threshold is not None:
            other = 1 - (self.pos if self.pos is not None else 1)
            positive = self.pos if self.pos is not None else 1
            pred = np.where(proba[:, positive] >= self.threshold, positive, other)
        else:
            pred = np.nan_to_num(proba, nan=-1).argmax(1)
        score = proba[:, self.pos] if self.pos is not None else proba[np.arange(n), pred]
        mask = ~ok
        arrays = [c if isinstance(c, pa.Array) else pa.array(c, pa.string()) for c in (ids, paths, status, error)]
        names = ["id", "path", "status", "error", "label", "score"]
        arrays += [
            pc.take(pa.array(classes, pa.string()), pa.array(pred, pa.int32(), mask=mask)),
            pa.array(score, pa.float32(), mask=mask),
        ]
        for c, name in enumerate(classes):
            arrays.append(pa.array(proba[:, c], pa.float32(), mask=mask))
            names.append(f"p_{name}")
        arrays += [pa.repeat(pa.scalar(self.name, pa.string()), n), pa.repeat(pa.scalar(self.version, pa.string()), n)]
        names += ["model", "model_version"]
        return pa.Table.from_arrays(arrays, names=names)

    def from_batch(self, batch: FeatureBatch) -> pa.Table:
        ok = batch.ok_mask
        X = None
        if batch.proba is None and ok.any():
            X = np.concatenate([batch.features[k] for k, _ in self.model.blocks], axis=1)
        paths = [display_path(p) for p in batch.paths]
        return self.table(batch.ids, paths, batch.status, batch.error, X, ok, proba=batch.proba)


# --- sinks: where score rows go -------------------------------------------------------------------


def _format_of(out: str, fmt: str | None) -> str:
    if fmt is not None:
        if fmt not in FORMATS:
            raise ImgsentError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
        return fmt
    if out == "-":
        return "jsonl"
    ext = os.path.splitext(out)[1].lower()
    return {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl"}.get(ext, "parquet")


class FileSink:
    """One output file, written to a temporary name and renamed on success; or stdout (``-``)."""

    def __init__(self, out: str, fmt: str):
        if fmt == "parquet" and out == "-":
            raise ImgsentError("--out - streams jsonl or csv; use --format jsonl or csv")
        self.out, self.fmt = out, fmt
        self._pq = None
        self._header_done = False
        if out == "-":
            self._fh = sys.stdout.buffer
            self._tmp = None
        else:
            directory = os.path.dirname(os.path.abspath(out))
            if not os.path.isdir(directory):
                raise ImgsentError(f"output directory {directory} does not exist")
            try:
                fd, self._tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(out)}.", suffix=".tmp")
            except OSError as exc:
                raise ImgsentError(f"cannot write to {directory}: {exc.strerror}") from None
            self._fh = os.fdopen(fd, "wb")

    def write(self, table: pa.Table) -> None:
        try:
            self._write(table)
        except OSError as exc:
            if exc.errno == errno.EPIPE or "Broken pipe" in str(exc):
                raise BrokenPipeError(errno.EPIPE, "output closed") from None  # `| head`: end quietly
            raise ImgsentError(f"cannot write {self.out}: {exc}") from None

    def _write(self, table: pa.Table) -> None:
        if self.fmt == "parquet":
            import pyarrow.parquet as pq

            if self._pq is None:
                self._pq = pq.ParquetWriter(self._fh, table.schema, compression="zstd")
            self._pq.write_table(table)
        elif self.fmt == "csv":
            import pyarrow.csv as pacsv

            pacsv.write_csv(table, self._fh, pacsv.WriteOptions(include_header=not self._header_done))
            self._header_done = True
        else:
            import polars as pl

            pl.from_arrow(table).write_ndjson(self._fh)
        if self._tmp is None:
            self._fh.flush()

    def close(self, ok: bool = True) -> None:
        if self._pq is not None:
            self._pq.close()
        if self._tmp is None:
            try:
                self._fh.flush()
            except OSError:
                pass  # a closed pipe: nothing left to say
            return
        self._fh.close()
        if ok:
            os.replace(self._tmp, self.out)
        elif os.path.exists(self._tmp):
            os.unlink(self._tmp)


def _is_dir_output(out: str) -> bool:
    return out.endswith(("/", os.sep)) or os.path.isdir(out)


def score(
    inputs: Sequence[str] = (),
    out: str = "-",
    *,
    model: str | None = None,
    features: str | None = None,
    weights: Sequence[str] = (),
    fmt: str | None = None,
    threshold: float | None = None,
    device: str = "auto",
    precision: str = "auto",
    batch_size: int = 64,
    workers: int | None = None,
    shard: str | tuple[int, int] | None = None,
    overwrite: bool = False,
    rows_per_shard: int = DEFAULT_ROWS_PER_SHARD,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    keep_features: str | None = None,
    null: bool = False,
    include_hidden: bool = False,
    compile: bool = False,
    progress: bool = False,
    stdin=None,
    engine: str = "local",
    ray_address: str | None = None,
    ray_workers: int | None = None,
    gpus_per_worker: float = 0.0,
) -> RunSummary:
    """Score images named by ``inputs`` (or an existing feature store ``features``) with ``model``
    (default: the packaged polarity model). ``out``: a file (.parquet/.csv/.jsonl), ``-`` for
    stdout, or ``DIR/`` for resumable Parquet shards. Every input appears exactly once."""
    if bool(inputs) == bool(features):
        raise ImgsentError("give either images to score or --features STORE, not both (and not neither)")
    sentiment = resolve_model(model)
    builder = ScoreTableBuilder(sentiment, *model_identity(sentiment, model), threshold, head_precision(precision))
    if features:
        return _score_store(features, out, sentiment, builder, fmt)

    refs, shard_t = resolve_inputs(inputs, null=null, include_hidden=include_hidden, stdin=stdin, shard=shard)
    backbones = model_backbones(sentiment, weights)
    tta = sentiment.feature_header.get("tta", "none")
    model_path = default_model_path() if model in (None, DEFAULT_MODEL) else model
    engine = build_engine(backbones, engine=engine, ray_address=ray_address, ray_workers=ray_workers,
                          gpus_per_worker=gpus_per_worker, head_path=model_path, device=device, precision=precision, batch_size=batch_size,
                          workers=workers, compile=compile, tta=tta, max_pixels=max_pixels)  # fmt: skip
    outputs = []
    if keep_features:
        feature_writer = ShardedWriter(
            keep_features, kind=FEATURES_KIND, header=store_header([b.recipe() for b in backbones], "float32", tta),
            shard=shard_t, overwrite=overwrite, rows_per_shard=rows_per_shard, describe_difference=describe_header_difference,
        )  # fmt: skip
        outputs.append((feature_writer, feature_table))

    if _is_dir_output(out):
        directory = out.rstrip("/") or "/"
        header = {"model": builder.name, "model_version": builder.version, "classes": sentiment.classes,
                  "threshold": threshold}  # fmt: skip
        writer = ShardedWriter(directory, kind=SCORES_KIND, header=header, shard=shard_t,
                               overwrite=overwrite, rows_per_shard=rows_per_shard)  # fmt: skip
        summary = run_sharded(engine, refs, [(writer, builder.from_batch), *outputs], progress=progress,
                              description="score", output_name=out)  # fmt: skip
        summary.labels = _count_labels(writer)
        return summary

    # One file or stdout: rows stream out batch by batch; the file appears (renamed) when complete.
    sink = FileSink(out, _format_of(out, fmt))
    labels: dict[str, int] = {}

    def emit(batch: FeatureBatch) -> None:
        table = builder.from_batch(batch)
        sink.write(table)
        _add_counts(labels, table)

    try:
        summary = run_sharded(engine, refs, outputs, progress=progress, description="score", output_name=out,
                              rows_per_shard=rows_per_shard, stream=emit)  # fmt: skip
    except BaseException:
        sink.close(ok=False)
        raise
    sink.close(ok=True)
    summary.labels = labels
    return summary


def _add_counts(counts: dict[str, int], table: pa.Table) -> None:
    for entry in pc.value_counts(table.column("label").drop_null()).to_pylist():
        counts[entry["values"]] = counts.get(entry["values"], 0) + entry["counts"]


def _count_labels(writer: ShardedWriter) -> dict[str, int]:
    import polars as pl

    files = [os.path.join(writer.directory, e["file"]) for e in writer.done.values()]
    if not files:
        return {}
    df = pl.scan_parquet(files).group_by("label").len().collect()
    return {str(r["label"]): int(r["len"]) for r in df.iter_rows(named=True) if r["label"] is not None}


def _score_store(
    store: str, out: str, model: SentimentModel, builder: ScoreTableBuilder, fmt: str | None
) -> RunSummary:
    """Stream a store through the head, one row group at a time on every core (each thread reads
    a part and scores it), reading only the blocks the head needs. Rows come out sorted by id: as read for a
    one-job store; a job array's interleaved shards are sorted at the end (score rows only)."""
    start = time.perf_counter()
    if _is_dir_output(out):
        raise ImgsentError("scoring a store writes one file (or stdout); give --out FILE.parquet|.csv|.jsonl or -")
    model.check_recipe(
        list_store(store, kind=FEATURES_KIND).header, what=f"store {store}"
    )  # before any block is looked up
    reader = StoreReader(store, [k for k, _ in model.blocks])
    summary = RunSummary(output=out)
    sink = FileSink(out, _format_of(out, fmt))
    held: list[pa.Table] = []

    def score_part(part) -> tuple[pa.Table, int]:
        chunk = reader.read(part)
        c = chunk.columns
        return builder.table(c["id"], c["path"], c["status"], c["error"], chunk.X, chunk.ok), int((~chunk.ok).sum())

    try:
        for table, errors in in_lanes(score_part, reader.parts, torch.get_num_threads()):
            summary.total += table.num_rows
            summary.errors += errors
            _add_counts(summary.labels, table)
            if reader.in_id_order:
                sink.write(table)
            else:
                held.append(table)
        if held:
            sink.write(pa.concat_tables(held).sort_by("id"))
    except BaseException:
        sink.close(ok=False)
        raise
    sink.close(ok=True)
    summary.ok = summary.total - summary.errors
    summary.elapsed_s = time.perf_counter() - start
    return summary
