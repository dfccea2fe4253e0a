"""The job runner: one plan, one chunk writer, two distributors.

A job is references in, rows out into sharded outputs (a feature store, score shards) and/or a
stream (one file, stdout). :func:`run_job` plans it once (:func:`imgsent.shards.plan_job`: the work
items, each a chunk and the outputs that lack its shard) and has each item written by
:func:`imgsent.shards.write_chunk`, run either here (:func:`_write_here`: the engine's one stream of
batches cut at the chunks' ends, written on a thread of its own) or by the engine's own workers
(``engine.write_shards``: Ray, each worker running the same function). Whoever wrote a chunk, its
entries are listed in the same way (:func:`_lister`), by this process only.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

import pyarrow as pa

from .batches import Engine, FeatureBatch
from .inputs import ImageRef
from .lanes import behind
from .report import RunProgress, RunSummary
from .shards import Chunk, ShardedWriter, WorkItem, plan_job, write_chunk

if TYPE_CHECKING:
    from .backbones import Backbone
    from .options import RunOptions

Outputs = Sequence[tuple[ShardedWriter, Callable[[FeatureBatch], pa.Table]]]  # writer, batch -> its rows


def build_engine(models: Sequence[Backbone], options: RunOptions) -> Engine:
    """The distributor of the shard work that ``options.engine`` names: the local
    :class:`~imgsent.engine.FeatureEngine`, or Ray (imported only when asked for)."""
    if options.engine == "ray":
        from .distributed import RayEngine

        return RayEngine(models, options)
    from .engine import FeatureEngine

    return FeatureEngine(models, options)


def run_job(
    engine: Engine,
    refs: Sequence[ImageRef],
    outputs: Outputs,
    options: RunOptions,
    description: str,
    output_name: str,
    *,
    stream: Callable[[FeatureBatch], None] | None = None,
) -> RunSummary:
    """Run ``engine`` over ``refs`` chunk by chunk; each chunk becomes one shard in every writer of
    ``outputs`` (``writer, batch -> table``) that lacks it. ``stream`` (if given) sees every batch
    as it comes, in order, on this thread, so then every chunk is run. Chunks every writer already
    has are skipped (resume)."""
    start = time.perf_counter()
    summary = RunSummary(output=output_name, total=len(refs))
    with contextlib.ExitStack() as stack:
        writers = [stack.enter_context(w) for w, _ in outputs]
        items, skipped = plan_job([r.id for r in refs], writers, options.rows_per_shard, every=stream is not None)
        summary.resumed = sum(c.stop - c.start for c in skipped)
        summary.errors = sum(int(writers[0].done[c.index].get("errors", 0)) for c in skipped) if writers else 0
        record = _lister(writers, items)
        targets = [(w.target, to_table) for w, to_table in outputs]
        detail = f"backbones {', '.join(engine.keys)}"
        with RunProgress(len(refs), description, enabled=options.progress, detail=detail) as bar:
            bar.advance(summary.resumed, summary.errors, resumed=True)
            if stream is None and outputs and hasattr(engine, "write_shards"):  # the workers write (Ray)
                chunks = {it.chunk.index: it.chunk for it in items}

                def done(result: dict, reported: int) -> None:  # a worker's finished chunk, its rows shown so far
                    record(result)
                    summary.errors += result["errors"]
                    chunk = chunks[result["index"]]
                    bar.advance(chunk.stop - chunk.start - reported, result["errors"])

                summary.details.update(engine.write_shards(refs, items, targets, done, bar.advance))
            else:
                for batch in _write_here(engine, refs, items, targets, record):
                    n_err = int((~batch.ok_mask).sum())
                    summary.errors += n_err
                    if n_err and summary.first_error is None:
                        summary.first_error = next(e for e, ok in zip(batch.error, batch.ok_mask) if not ok)
                    if stream is not None:
                        stream(batch)
                    bar.advance(len(batch), n_err)
        for writer in writers:
            writer.finish()
    summary.details.update(getattr(engine, "run_details", dict)())
    summary.ok = summary.total - summary.errors
    summary.elapsed_s = time.perf_counter() - start
    return summary


def _lister(writers: Sequence[ShardedWriter], items: Sequence[WorkItem]) -> Callable[[dict], None]:
    """How a finished chunk (:func:`~imgsent.shards.write_chunk`'s result, from here or from a
    worker) is listed: each entry in the manifest of the writer that lacked it."""
    lacking = {it.chunk.index: it.lacking for it in items}

    def record(result: dict) -> None:
        index = result["index"]
        for k, entry, schema in zip(lacking[index], result["entries"], result["schemas"]):
            writers[k].record_finished(index, entry, schema)

    return record


def _write_here(
    engine: Engine, refs: Sequence[ImageRef], items: Sequence[WorkItem], targets, record: Callable[[dict], None]
) -> Iterator[FeatureBatch]:
    """The local distributor: the engine run once over every item's rows (its pipeline never drains
    between shards), each batch yielded to the caller here and handed to a thread of its own that
    cuts the stream at the chunks' ends and writes each chunk (:func:`~imgsent.shards.write_chunk`:
    Parquet encoding, fsync and rename, off the thread that feeds the engine) and lists it."""
    sizes = [it.chunk.stop - it.chunk.start for it in items]

    def write_all(batches: Iterator[FeatureBatch]) -> None:
        for item in items:
            record(write_chunk(_chunk_rows(batches, item.chunk), item, targets))
        if next(batches, None) is not None:
            raise RuntimeError("the engine returned more rows than were planned")

    todo = [r for it in items for r in refs[it.chunk.start : it.chunk.stop]]
    with behind(write_all) as writing:
        for batch in engine.run(todo, groups=sizes):
            yield batch
            writing.put(batch)


def _chunk_rows(batches: Iterator[FeatureBatch], chunk: Chunk) -> Iterator[FeatureBatch]:
    """The batches of ``chunk``'s rows, taken from the front of one stream (no batch straddles two
    chunks: the engine contract)."""
    left = chunk.stop - chunk.start
    while left > 0:
        batch = next(batches, None)
        if batch is None:
            raise RuntimeError(f"the engine returned fewer rows than were planned (shard {chunk.index})")
        if len(batch) > left:
            raise RuntimeError(f"the engine returned a batch across the end of shard {chunk.index}")
        left -= len(batch)
        yield batch
