"""``score``: images (or a feature store) in, one row per image with class probabilities out.

Images go through the same engine as ``extract`` (each decoded once, only the backbones the
model's feature recipe names), then the model's head. Output: a Parquet / CSV / JSON Lines file,
a stream on stdout (``--out -``), or, for big resumable jobs, a directory of Parquet shards with a
manifest (``--out DIR/``), written by the same sharded writer as feature stores.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from . import __version__
from .batches import FeatureBatch
from .errors import ImgsentError, ImgsentWarning
from .features import SOURCE_COLUMN, StoreReader, open_store, source_array, store_writer, with_sources
from .inputs import display_path, resolve_inputs
from .jobs import build_engine, run_job
from .lanes import in_lanes
from .options import RunOptions, head_precision
from .report import RunSummary
from .shards import ShardedWriter
from .sinks import SCORES_KIND, FileSink, check_replace, format_of, is_dir_output

if TYPE_CHECKING:  # torch-free at import: a warm score on ONNX Runtime never loads torch (imgsent.ortengine)
    from .training import SentimentModel


class ScoreTableBuilder:
    """Turns features (or error rows) into score rows for one model."""

    def __init__(
        self,
        model: SentimentModel,
        model_name: str,
        model_version: str,
        threshold: float | None,
        precision: str = "fp32",
    ):
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
        self.device = None  # where the head runs (None: the CPU)
        self.kept_names: list[str] = []  # fields carried into the rows (keep_columns)
        self.with_source = False  # a source column: how to read each image that is no file (tar, Parquet, URL)
        # the head in numpy (imgsent.bundles.NumpyModel): what scores in float32 on the CPU, whichever
        # engine made the features (torch, ONNX Runtime, no torch at all) and for stores, so that the
        # same features always give the same probabilities; the torch head serves bf16 and GPUs
        self.numpy = model if not hasattr(model, "head") else None

    def keep(self, refs) -> None:
        """Carry the fields the references hold (``ImageRef.meta``) into every score row, as text
        columns (the same columns in every shard: every name any reference has; the values come
        with each batch, :attr:`~imgsent.batches.FeatureBatch.meta`); a name the score rows
        already have gets the prefix ``source_``."""
        import json

        names = dict.fromkeys(k for r in refs if r.meta for k in json.loads(r.meta))
        self.kept_names = list(names)

    def _kept_columns(self, meta: Sequence[str], n: int, names_taken: list[str]) -> tuple[list[pa.Array], list[str]]:
        import json

        fields = [json.loads(m) if m else {} for m in meta] if meta else [{}] * n
        arrays, names = [], []
        for name in self.kept_names:
            values = [f.get(name) for f in fields]
            values = [v if v is None or isinstance(v, str) else json.dumps(v) for v in values]
            arrays.append(pa.array(values, pa.string()))
            names.append(f"source_{name}" if name in names_taken else name)
        return arrays, names

    def provenance(self, recipes: list[dict]) -> dict:
        """What a single-file output records about how its scores were made."""
        return {
            "imgsent_version": __version__,
            "model": self.name,
            "model_version": self.version,
            "classes": self.model.classes,
            "threshold": self.threshold,
            "head_precision": self.precision,
            "backbones": [
                {"key": r["key"], "spec": r.get("spec"), "sha256": r.get("fingerprint", {}).get("sha256")}
                for r in recipes
            ],
        }

    def table(self, ids, paths, status, error, X: np.ndarray | None, ok: np.ndarray, meta=(), sources=None) -> pa.Table:
        """Score rows. ``ids``...``error``: lists or Arrow string arrays; ``X``: features of every row
        (whatever sits in rows that are not ``ok`` is ignored): the head runs here, for every engine
        and for stores; ``meta``: each row's kept fields (JSON text), if any; ``sources``:
        each row's source (a list, "" for none, or an Arrow string array), written as a ``source``
        column after ``model_version`` when the builder keeps one (``with_source``)."""
        n, classes = len(ok), self.model.classes
        if ok.any():
            on_cpu = self.device is None or getattr(self.device, "type", "cpu") == "cpu"
            head = self.numpy if self.numpy is not None and self.precision == "fp32" and on_cpu else self.model
            proba = head.predict_proba(X, self.precision, device=self.device)
            proba[~ok] = np.nan
        else:
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
        if self.with_source:
            arrays.append(sources if isinstance(sources, pa.Array) else source_array(list(sources or []), n))
            names.append(SOURCE_COLUMN)
        if self.kept_names:
            more, more_names = self._kept_columns(meta, n, names)
            arrays, names = arrays + more, names + more_names
        return pa.Table.from_arrays(arrays, names=names)

    def from_batch(self, batch: FeatureBatch) -> pa.Table:
        ok = batch.ok_mask
        X = None
        if ok.any():
            X = np.concatenate([batch.features[k] for k, _ in self.model.blocks], axis=1)
        paths = [display_path(p) for p in batch.paths]
        return self.table(batch.ids, paths, batch.status, batch.error, X, ok, meta=batch.meta, sources=batch.sources)


def _model_engine(sentiment, model: str | None, weights, models, opts: RunOptions):
    """(options, backbones, engine) that compute ``sentiment``'s features as its recipe says: its
    TTA, and (unless the user asks otherwise) the numerics its training features had."""
    from .engineplan import frozen_cpu_batch
    from .models import model_backbones, model_path, packaged_name

    precision = sentiment.numerics if opts.precision == "auto" else opts.precision
    opts = RunOptions.build(opts, tta=sentiment.feature_header.get("tta", "none"), precision=precision)
    bundle = None if packaged_name(model) else model_path(model)
    backbones = model_backbones(
        sentiment,
        weights,
        int8=precision == "int8",
        model_dir=bundle,
        models_dirs=models,
        frozen_batch=frozen_cpu_batch(opts),
    )
    return opts, backbones, build_engine(backbones, opts)


def extract_model_features(
    inputs: Sequence[str],
    out: str,
    *,
    model: str | None = None,
    weights: Sequence[str] = (),
    models: Sequence[str] = (),
    options: RunOptions | None = None,
    stdin=None,
    **overrides,
) -> RunSummary:
    """A feature store ``out`` (resumable) of exactly the backbones ``model`` needs, computed as
    ``score`` computes them: what ``imgsent label INPUT...`` serves from."""
    from .models import resolve_model

    opts = RunOptions.build(options, **overrides)
    sentiment = resolve_model(model)
    refs = resolve_inputs(inputs, opts, stdin=stdin)
    opts, backbones, engine = _model_engine(sentiment, model, weights, models, opts)
    output = store_writer(out, backbones, "float32", opts, engine, refs)
    return run_job(engine, refs, [output], opts, "extract", out)


def score(
    inputs: Sequence[str] = (),
    out: str = "-",
    *,
    model: str | None = None,
    features: str | None = None,
    weights: Sequence[str] = (),
    models: Sequence[str] = (),
    fmt: str | None = None,
    threshold: float | None = None,
    keep_features: str | None = None,
    options: RunOptions | None = None,
    stdin=None,
    **overrides,
) -> RunSummary:
    """Score images named by ``inputs`` (or an existing feature store ``features``) with ``model``
    (a bundle directory, or a packaged model's name: ``default``, ``mobilenet``). ``out``: a file
    (.parquet/.csv/.tsv/.jsonl), ``-`` for stdout, or ``DIR/`` for resumable Parquet shards. Every
    input appears exactly once. Files the model's backbones read (TorchScript modules, detectors,
    weights) are found by name and hash beside the bundle, in ``$IMGSENT_MODELS``, in ``models``
    (folders), then where they were when the model was trained.

    ``options``: a :class:`~imgsent.options.RunOptions`; keyword ``overrides`` replace its fields
    (``device="cpu"``, ``batch_size=32``, ``shard="0/4"``...). A job-array shard writes only into a
    directory (``out="DIR/"``), which every job of the array may share.
    """
    opts = RunOptions.build(options, **overrides)
    if bool(inputs) == bool(features):
        raise ImgsentError(
            "give either images to score or a feature store (--features STORE), not both (and not neither)"
        )
    dir_out = is_dir_output(out)
    if opts.shard is not None and not dir_out:
        i, n = opts.shard
        raise ImgsentError(
            f"shard {i}/{n} is one job of {n}: its rows cannot go to the single output {out!r}, which every other "
            f"job would overwrite; give a directory (ending in /) that all jobs share, e.g. {out.rsplit('.', 1)[0]}/"
        )
    fmt = None if dir_out else format_of(out, fmt)
    from .ortengine import light_engine

    light = None if features or keep_features or weights else light_engine(model, opts)
    if light is not None:  # every backbone on cached ONNX Runtime graphs: torch is never imported
        sentiment, light_run = light
        from .bundles import model_name

        identity = (model_name(model), sentiment.version())
    else:
        from .models import model_identity, resolve_model

        sentiment = resolve_model(model)
        identity = model_identity(sentiment, model)
    builder = ScoreTableBuilder(sentiment, *identity, threshold, head_precision(opts.precision))
    if builder.numpy is None:
        from .bundles import numpy_model

        builder.numpy = numpy_model(model)
    if not dir_out:
        made = {"model": builder.name, "model_version": builder.version, "threshold": threshold}
        check_replace(out, fmt, made, opts.overwrite)
    if features:
        accept = None if opts.precision == "auto" else opts.precision
        return _score_store(features, out, sentiment, builder, fmt, accept)

    refs = resolve_inputs(inputs, opts, stdin=stdin)
    builder.keep(refs)
    if opts.keep_columns and not builder.kept_names:
        warnings.warn(
            "--keep-columns found no fields: it reads tar shards' KEY.json / KEY.txt and Parquet columns",
            ImgsentWarning,
            stacklevel=2,
        )
    if light is not None:
        engine, recipes = light_run, sentiment.recipes
        weights_summary = "; ".join(f"{e['key']}: {e.get('weights_source', '?')}" for e in engine.entries)
    else:
        opts, backbones, engine = _model_engine(sentiment, model, weights, models, opts)
        _record_plan(engine, sentiment, builder, model)
        recipes = [b.recipe() for b in backbones]
        weights_summary = _weights_summary(backbones)
    builder.device = getattr(engine, "device", None)  # the local engine's card runs the head too
    outputs = [store_writer(keep_features, backbones, "float32", opts, engine, refs)] if keep_features else []
    builder.with_source = with_sources(out.rstrip("/") if dir_out else None, refs)
    summary_model = {"model": f"{builder.name} {builder.version}", "weights": weights_summary}

    if dir_out:
        header = {
            "model": builder.name,
            "model_version": builder.version,
            "classes": sentiment.classes,
            "threshold": threshold,
        }
        writer = ShardedWriter(
            out.rstrip("/") or "/",
            kind=SCORES_KIND,
            header=header,
            shard=opts.shard,
            overwrite=opts.overwrite,
            rows_per_shard=opts.rows_per_shard,
        )
        summary = run_job(engine, refs, [(writer, builder.from_batch), *outputs], opts, "score", out)
        summary.labels = _count_labels(writer)
        summary.details.update(summary_model)
        return summary

    # One file or stdout: rows stream out batch by batch; the file appears (renamed) when complete.
    sink = FileSink(out, fmt, metadata=builder.provenance(recipes))
    labels: dict[str, int] = {}

    def emit(batch: FeatureBatch) -> None:
        table = builder.from_batch(batch)
        sink.write(table)
        _add_counts(labels, table)

    try:
        summary = run_job(engine, refs, outputs, opts, "score", out, stream=emit)
    except BaseException:
        sink.close(ok=False)
        raise
    sink.close(ok=True)
    summary.labels = labels
    summary.details.update(summary_model)
    return summary


def _record_plan(engine, sentiment, builder: ScoreTableBuilder, model: str | None) -> None:
    """When every backbone of this CPU run is on ONNX Runtime, the plan that lets the next score of
    this model run without torch (:mod:`imgsent.ortengine`); nothing otherwise."""
    from .engine import FeatureEngine
    from .options import CPU_MODEL_BATCH

    if not isinstance(engine, FeatureEngine) or engine.numerics != "fp32" or engine.model_batch != CPU_MODEL_BATCH:
        return
    if engine.device.type != "cpu" or any(r != "onnx" for r in engine.runtimes):
        return
    from . import onnxrunner, ortengine

    tta = sentiment.feature_header.get("tta", "none")
    key = ortengine.plan_key(builder.name, builder.version, sentiment.blocks, sentiment.recipes, tta, CPU_MODEL_BATCH)
    if ortengine.read_plan(key) is not None:
        return
    entries = onnxrunner.plan_entries(engine.runners)
    if entries is not None and [e["key"] for e in entries] == [r["key"] for r in sentiment.recipes]:
        ortengine.write_plan(key, entries, tta, CPU_MODEL_BATCH)


def _weights_summary(backbones) -> str:
    return "; ".join(f"{b.key}: {b.weights_source}" for b in backbones)


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
    store: str, out: str, model: SentimentModel, builder: ScoreTableBuilder, fmt: str | None, accept: str | None
) -> RunSummary:
    """Stream a store through the head, one row group at a time on every core (each thread reads
    a part and scores it), reading only the blocks the head needs. Rows come out sorted by id: as read for a
    one-job store; a job array's interleaved shards are sorted at the end (score rows only)."""
    start = time.perf_counter()
    if fmt is None:
        raise ImgsentError(
            "scoring a store writes one file (or stdout); give out as FILE.parquet|.csv|.tsv|.jsonl or -"
        )
    header = open_store(store).header
    model.check_recipe(header, what=f"store {store}", accept_numerics=accept)  # before any block is looked up
    reader = StoreReader(store, [k for k, _ in model.blocks])
    builder.with_source = reader.with_source
    summary = RunSummary(output=out)
    summary.details["model"] = f"{builder.name} {builder.version}"
    recipes = [r for r in header.get("backbones", []) if r.get("key") in dict(model.blocks)]
    sink = FileSink(out, fmt, metadata={**builder.provenance(recipes), "store": os.path.abspath(store)})
    held: list[pa.Table] = []

    def score_part(part) -> tuple[pa.Table, int]:
        chunk = reader.read(part)
        c = chunk.columns
        table = builder.table(
            c["id"], c["path"], c["status"], c["error"], chunk.X, chunk.ok, sources=c.get(SOURCE_COLUMN)
        )
        return table, int((~chunk.ok).sum())

    try:
        import torch

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
