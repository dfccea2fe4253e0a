"""``extract``: images in, a feature store out (inputs -> decode -> backbones -> engine -> store)."""

from __future__ import annotations

import collections
import contextlib
import os
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import pyarrow as pa

from .batches import Engine, FeatureBatch
from .features import DTYPES, KIND, SOURCE_COLUMN, describe_header_difference, feature_table, store_header
from .inputs import ImageRef, find_images, select_shard
from .options import RunOptions, check_choice
from .report import RunProgress, RunSummary
from .shards import ShardedWriter, WorkItem, plan_job

if TYPE_CHECKING:
    from .backbones import Backbone


def load_backbones(specs: Sequence[str], *, random_weights: bool = False, int8: bool = False) -> list[Backbone]:
    """Create every backbone named by ``specs`` (spec strings or preset names); ``int8``: quantized
    where it can be (see :mod:`imgsent.quantized`)."""
    from .backbones import create_backbone, expand_presets

    return [create_backbone(s, random_weights=random_weights, int8=int8) for s in expand_presets(list(specs))]


def build_engine(models: Sequence[Backbone], options: RunOptions) -> Engine:
    """The distributor of the shard work that ``options.engine`` names: the local
    :class:`~imgsent.engine.FeatureEngine`, or Ray (imported only when asked for)."""
    if options.engine == "ray":
        from .distributed import RayEngine

        return RayEngine(models, options)
    from .engine import FeatureEngine

    return FeatureEngine(models, options)


def resolve_inputs(inputs: Sequence[str], options: RunOptions, *, stdin=None) -> list[ImageRef]:
    """The job's image references: everything ``inputs`` names, then this job's ``options.shard``."""
    refs = find_images(
        inputs,
        null=options.null,
        include_hidden=options.include_hidden,
        stdin=stdin,
        image_column=options.image_column,
        id_column=options.id_column,
        keep_columns=options.keep_columns,
    )
    return select_shard(refs, options.shard)


class _WriterThread:
    """Runs the shard writing (Arrow tables, Parquet encoding, fsync and rename at each commit) on
    one thread of its own, in order, at most ``depth`` batches behind the loop that feeds the engine,
    so that the main thread goes back to the engine (and the GPU) at once. An error in a write comes
    out of the next ``submit`` or of ``drain``; leaving the context after an error waits for the
    write in progress (so that unfinished shards are aborted after it, never under it)."""

    def __init__(self, depth: int = 2):
        from concurrent.futures import ThreadPoolExecutor

        self.pool = ThreadPoolExecutor(1, thread_name_prefix="imgsent-writer")
        self.pending: collections.deque = collections.deque()
        self.depth = depth

    def __enter__(self) -> _WriterThread:
        return self

    def submit(self, fn: Callable, *args) -> None:
        while self.pending and (self.pending[0].done() or len(self.pending) >= self.depth):
            self.pending.popleft().result()  # raises what the write raised
        self.pending.append(self.pool.submit(fn, *args))

    def drain(self) -> None:
        while self.pending:
            self.pending.popleft().result()

    def __exit__(self, exc_type, *exc) -> None:
        for f in self.pending:
            f.cancel()
        self.pool.shutdown(wait=True)  # the write in progress ends before anything is aborted


class _ShardSinks:
    """Routes a stream of batches into the shards of the work ``items``, in order: each batch's rows are
    appended to every writer that lacks the current chunk, which is committed once full."""

    def __init__(self, outputs, items: Sequence[WorkItem]):
        self.outputs = outputs
        self.items = iter(items)
        self.item = next(self.items, None)
        self.chunk = self.item.chunk if self.item else None
        self.files: list = []
        self.filled = self.errors = 0

    def __enter__(self) -> _ShardSinks:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        for f, _ in self.files:  # an unfinished shard never becomes visible
            f.abort()

    def add(self, batch: FeatureBatch, n_err: int) -> None:
        start = 0
        while start < len(batch):
            if self.chunk is None:
                raise RuntimeError("the engine returned more rows than were planned")
            size = self.chunk.stop - self.chunk.start
            take = min(len(batch) - start, size - self.filled)
            part = batch if take == len(batch) else batch.slice(start, start + take)
            if not self.files:
                self.files = [
                    (self.outputs[k][0].open_shard(self.chunk), self.outputs[k][1]) for k in self.item.lacking
                ]
            for f, to_table in self.files:
                f.append(to_table(part))
            self.errors += n_err if take == len(batch) else int((~part.ok_mask).sum())
            self.filled += take
            start += take
            if self.filled == size:
                for f, _ in self.files:
                    f.commit(errors=self.errors)
                self.files, self.filled, self.errors = [], 0, 0
                self.item = next(self.items, None)
                self.chunk = self.item.chunk if self.item else None


def run_sharded(
    engine: Engine,
    refs: Sequence[ImageRef],
    outputs: Sequence[tuple[ShardedWriter, Callable[[FeatureBatch], pa.Table]]],
    options: RunOptions,
    description: str,
    output_name: str,
    *,
    stream: Callable[[FeatureBatch], None] | None = None,
) -> RunSummary:
    """Run ``engine`` over ``refs`` chunk by chunk; each chunk becomes one shard in every writer of
    ``outputs`` (``writer, batch -> table``) that lacks it. ``stream`` (if given) sees every batch
    as it comes, so then every chunk is run. Chunks every writer already has are skipped (resume).
    """
    start = time.perf_counter()
    summary = RunSummary(output=output_name, total=len(refs))
    ids = [r.id for r in refs]
    with contextlib.ExitStack() as stack:
        for writer, _ in outputs:
            stack.enter_context(writer)
        writers = [w for w, _ in outputs]
        items, skipped = plan_job(ids, writers, options.rows_per_shard, every=stream is not None)
        todo = [it.chunk for it in items]
        first = writers[0] if writers else None
        skipped_errors = sum(int(first.done[c.index].get("errors", 0)) for c in skipped) if first else 0
        summary.resumed = sum(c.stop - c.start for c in skipped)
        summary.errors = skipped_errors
        sinks = stack.enter_context(_ShardSinks(outputs, items))
        writing = stack.enter_context(_WriterThread())  # left first: its write ends before sinks abort

        detail = f"backbones {', '.join(engine.keys)}"
        with RunProgress(len(refs), description, enabled=options.progress, detail=detail) as bar:
            bar.advance(summary.resumed, skipped_errors, resumed=True)
            if stream is None and outputs and hasattr(engine, "write_shards"):  # the workers write (Ray)
                summary.details.update(_workers_write(engine, refs, items, outputs, summary, bar))
            else:
                todo_refs = [r for c in todo for r in refs[c.start : c.stop]]
                for batch in engine.run(todo_refs, groups=[c.stop - c.start for c in todo]):
                    if stream is not None:
                        stream(batch)
                    n_err = int((~batch.ok_mask).sum())
                    summary.errors += n_err
                    if n_err and summary.first_error is None:
                        summary.first_error = next(e for e, ok in zip(batch.error, batch.ok_mask) if not ok)
                    writing.submit(sinks.add, batch, n_err)
                    bar.advance(len(batch), n_err)
                writing.drain()
        for writer, _ in outputs:
            writer.finish()
    summary.details.update(getattr(engine, "run_details", dict)())
    summary.ok = summary.total - summary.errors
    summary.elapsed_s = time.perf_counter() - start
    return summary


def _workers_write(engine, refs, items: list[WorkItem], outputs, summary: RunSummary, bar) -> dict:
    """The work ``items`` written by the engine's own workers (``engine.write_shards``); here only
    their manifest entries are listed and the progress counted."""
    by_index = {it.chunk.index: it for it in items}

    def done(result: dict, reported: int) -> None:
        index = result["index"]
        item = by_index[index]
        writers = [outputs[k][0] for k in item.lacking]
        for writer, entry, schema in zip(writers, result["entries"], result["schemas"]):
            writer.record_from_worker(index, entry, schema)
        summary.errors += result["errors"]
        bar.advance(item.chunk.stop - item.chunk.start - reported, result["errors"])

    targets = [(w.target, to_table) for w, to_table in outputs]
    return engine.write_shards(refs, items, targets, done, bar.advance)


def extract(
    inputs: Sequence[str],
    out: str,
    *,
    backbones: Sequence[str] = ("default",),
    random_weights: bool = False,
    dtype: str = "float32",
    options: RunOptions | None = None,
    stdin=None,
    **overrides,
) -> RunSummary:
    """Extract features of every image named by ``inputs`` into the feature store ``out``.

    ``inputs``: directories, image files, ``@list.txt`` or ``-`` (stdin); see
    :func:`imgsent.inputs.find_images`. ``backbones``: spec strings or presets (see
    :mod:`imgsent.backbones`). ``options``: a :class:`~imgsent.options.RunOptions`; keyword
    ``overrides`` replace its fields (``device="cpu"``, ``batch_size=32``, ``shard="0/4"``,
    ``engine="ray"``...). Re-running on an interrupted store resumes it. Returns a
    :class:`~imgsent.report.RunSummary`. Raises :class:`~imgsent.errors.ImgsentError` for bad
    arguments; bad images become error rows.
    """
    opts = RunOptions.build(options, **overrides)
    check_choice("dtype", dtype, tuple(DTYPES))
    refs = resolve_inputs(inputs, opts, stdin=stdin)
    models = load_backbones(backbones, random_weights=random_weights, int8=opts.precision == "int8")
    engine = build_engine(models, opts)
    output = store_writer(out, models, dtype, opts, engine, refs)
    return run_sharded(engine, refs, [output], opts, "extract", out)


def _begun(out: str | None) -> dict | None:
    """The manifest of the sharded output begun at ``out`` (its header, shards' schema), or None."""
    from .shards import manifest_paths, read_manifest

    for path in manifest_paths(out) if out and os.path.isdir(out) else []:
        try:
            return read_manifest(path)
        except Exception:
            continue
    return None


def with_sources(out: str | None, refs: Sequence[ImageRef], begun: dict | None = None) -> bool:
    """Whether rows written to ``out`` carry a ``source`` column (how to read an image that is no
    file: a tar member, a Parquet cell, a URL): as the output begun there has it (a store never
    changes its columns; ``begun``: its manifest, if already read), else when any of ``refs`` has
    a source."""
    begun = begun if begun is not None else _begun(out)
    if begun is not None and begun["shards"] and begun.get("schema") is not None:
        return SOURCE_COLUMN in begun["schema"].names
    return any(r.source for r in refs)


def store_writer(
    out: str,
    models: Sequence[Backbone],
    dtype: str,
    options: RunOptions,
    engine: Engine,
    refs: Sequence[ImageRef] = (),
) -> tuple[ShardedWriter, Callable[[FeatureBatch], pa.Table]]:
    """The writer of a feature store for ``models`` (and how a batch becomes its rows), as
    ``run_sharded`` takes it; used by ``extract`` and by ``score --keep-features``. What ``engine``
    computes in and which JPEG decoder it uses are recorded: a store never mixes two."""
    recipes = [b.recipe() for b in models]
    begun = _begun(out)  # a store this run resumes: its runtimes and columns stay as they were begun
    if options.runtime == "auto" and begun is not None:
        record = dict(begun["header"].get("runtimes", {}))
        if record != engine.runtime_record():
            engine.adopt_runtimes(record)
    header = store_header(
        recipes, dtype, options.tta, engine.numerics, options.decode, engine.decoder, engine.runtime_record()
    )
    writer = ShardedWriter(
        out,
        kind=KIND,
        header=header,
        shard=options.shard,
        overwrite=options.overwrite,
        rows_per_shard=options.rows_per_shard,
        describe_difference=describe_header_difference,
    )
    with_source = with_sources(out, refs, begun)
    return writer, lambda b: feature_table(b, dtype, with_source)
