"""``extract``: images in, a feature store out (inputs -> decode -> backbones -> engine -> store)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence

import pyarrow as pa

from .backbones import Backbone, create_backbone, expand_presets
from .decode import DEFAULT_MAX_PIXELS
from .engine import FeatureBatch, FeatureEngine
from .features import (
    KIND,
    concat_batches,
    describe_header_difference,
    feature_table,
    slice_batch,
    store_header,
)
from .inputs import ImageRef, find_images, parse_shard, select_shard
from .report import RunProgress, RunSummary
from .shards import Chunk, ShardedWriter

DEFAULT_ROWS_PER_SHARD = 10_000


def load_backbones(specs: Sequence[str], *, random_weights: bool = False) -> list[Backbone]:
    """Create every backbone named by ``specs`` (spec strings or preset names)."""
    return [create_backbone(s, random_weights=random_weights) for s in expand_presets(list(specs))]


def chunked(batches: Iterator[FeatureBatch], chunks: Sequence[Chunk]) -> Iterator[tuple[Chunk, FeatureBatch]]:
    """Regroup a stream of batches (covering ``chunks`` back to back) into one batch per chunk."""
    pending: list[FeatureBatch] = []
    have = 0
    it = iter(chunks)
    chunk = next(it, None)
    for batch in batches:
        pending.append(batch)
        have += len(batch)
        while chunk is not None and have >= chunk.stop - chunk.start:
            merged = concat_batches(pending)
            size = chunk.stop - chunk.start
            yield chunk, slice_batch(merged, 0, size)
            rest = slice_batch(merged, size, len(merged))
            pending, have = ([rest], len(rest)) if len(rest) else ([], 0)
            chunk = next(it, None)


def run_sharded(
    engine: FeatureEngine,
    refs: Sequence[ImageRef],
    writer: ShardedWriter,
    to_table: Callable[[FeatureBatch], pa.Table],
    *,
    progress: bool,
    description: str,
    on_chunk: Callable[[FeatureBatch], None] | None = None,
) -> RunSummary:
    """Run ``engine`` over the chunks of ``refs`` the writer still needs, one shard per chunk."""
    start = time.perf_counter()
    summary = RunSummary(output=writer.directory, total=len(refs))
    with writer:
        pending, done_rows = writer.plan([r.id for r in refs])
        summary.resumed = done_rows
        for entry in writer.done.values():
            summary.errors += int(entry.get("errors", 0))
        todo = [r for c in pending for r in refs[c.start : c.stop]]
        with RunProgress(len(refs), description, enabled=progress) as bar:
            bar.advance(done_rows, sum(int(e.get("errors", 0)) for e in writer.done.values()))
            for chunk, batch in chunked(engine.run(todo), pending):
                n_err = int((~batch.ok_mask).sum())
                if on_chunk is not None:
                    on_chunk(batch)
                writer.write(chunk, to_table(batch), errors=n_err)
                summary.errors += n_err
                bar.advance(len(batch), n_err)
        writer.finish()
    summary.ok = summary.total - summary.errors
    summary.elapsed_s = time.perf_counter() - start
    return summary


def extract(
    inputs: Sequence[str],
    out: str,
    *,
    backbones: Sequence[str] = ("default",),
    random_weights: bool = False,
    device: str = "auto",
    precision: str = "auto",
    batch_size: int = 64,
    workers: int | None = None,
    tta: str = "none",
    dtype: str = "float32",
    shard: str | tuple[int, int] | None = None,
    overwrite: bool = False,
    rows_per_shard: int = DEFAULT_ROWS_PER_SHARD,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    null: bool = False,
    include_hidden: bool = False,
    compile: bool = False,
    progress: bool = False,
    stdin=None,
) -> RunSummary:
    """Extract features of every image named by ``inputs`` into the feature store ``out``.

    ``inputs``: directories, image files, ``@list.txt`` or ``-`` (stdin); see
    :func:`imgsent.inputs.find_images`. ``backbones``: spec strings or presets (see
    :mod:`imgsent.backbones`). Re-running on an interrupted store resumes it. Returns a
    :class:`~imgsent.report.RunSummary`. Raises :class:`~imgsent.errors.ImgsentError` for bad
    arguments; bad images become error rows.
    """
    shard_t = parse_shard(shard) if isinstance(shard, str) or shard is None else shard
    refs = select_shard(find_images(inputs, null=null, include_hidden=include_hidden, stdin=stdin), shard_t)
    models = load_backbones(backbones, random_weights=random_weights)
    engine = FeatureEngine(
        models,
        device=device,
        precision=precision,
        batch_size=batch_size,
        workers=workers,
        compile=compile,
        tta=tta,
        max_pixels=max_pixels,
    )
    header = store_header([b.recipe() for b in models], dtype, tta)
    writer = ShardedWriter(
        out,
        kind=KIND,
        header=header,
        shard=shard_t,
        overwrite=overwrite,
        rows_per_shard=rows_per_shard,
        describe_difference=describe_header_difference,
    )
    return run_sharded(
        engine, refs, writer, lambda b: feature_table(b, dtype), progress=progress, description="extract"
    )
