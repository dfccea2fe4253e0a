"""``extract``: images in, a feature store out (inputs -> decode -> backbones -> engine -> store)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence

import pyarrow as pa

from .backbones import Backbone, create_backbone, expand_presets
from .decode import DEFAULT_MAX_PIXELS
from .engine import FeatureBatch, FeatureEngine
from .errors import ImgsentError
from .features import (
    KIND,
    describe_header_difference,
    feature_table,
    slice_batch,
    store_header,
)
from .inputs import ImageRef, find_images, parse_shard, select_shard
from .report import RunProgress, RunSummary
from .shards import Chunk, ShardedWriter, plan_chunks

DEFAULT_ROWS_PER_SHARD = 10_000


def load_backbones(specs: Sequence[str], *, random_weights: bool = False) -> list[Backbone]:
    """Create every backbone named by ``specs`` (spec strings or preset names)."""
    return [create_backbone(s, random_weights=random_weights) for s in expand_presets(list(specs))]


ENGINES = ("local", "ray")


def build_engine(
    models: Sequence[Backbone],
    *,
    engine: str = "local",
    ray_address: str | None = None,
    ray_workers: int | None = None,
    gpus_per_worker: float = 0.0,
    head_path: str | None = None,
    **kwargs,
):
    """The distributor of the shard work: the local :class:`FeatureEngine`, or Ray Data.

    ``kwargs`` are the engine settings (device, precision, batch_size, workers, compile, tta,
    max_pixels); the Ray engine imports Ray only when asked for, and also runs the model bundle at
    ``head_path`` in its actors (scoring)."""
    if engine == "local":
        return FeatureEngine(models, **kwargs)
    if engine == "ray":
        from .distributed import RayEngine

        kwargs.pop("workers", None)  # Ray schedules the decoding tasks itself
        return RayEngine(
            models,
            address=ray_address,
            workers=ray_workers,
            gpus_per_worker=gpus_per_worker,
            head_path=head_path,
            **kwargs,
        )
    raise ImgsentError(f"--engine must be one of {', '.join(ENGINES)}, got {engine!r}")


def resolve_inputs(
    inputs: Sequence[str], *, null: bool, include_hidden: bool, stdin, shard: str | tuple[int, int] | None
) -> tuple[list[ImageRef], tuple[int, int] | None]:
    """The job's image references (this ``--shard`` of them) and the parsed shard."""
    shard_t = parse_shard(shard) if isinstance(shard, str) or shard is None else shard
    return select_shard(find_images(inputs, null=null, include_hidden=include_hidden, stdin=stdin), shard_t), shard_t


class _ShardSinks:
    """Routes a stream of batches into the shards of ``chunks``, in order: each batch's rows are
    appended to every writer that lacks the current chunk, which is committed once full."""

    def __init__(self, outputs, pending_by_writer, chunks: Sequence[Chunk]):
        self.outputs, self.pending = outputs, pending_by_writer
        self.chunks = iter(chunks)
        self.chunk = next(self.chunks, None)
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
            part = batch if take == len(batch) else slice_batch(batch, start, start + take)
            if not self.files:
                self.files = [(w.open_shard(self.chunk), to_table)
                              for (w, to_table), p in zip(self.outputs, self.pending) if self.chunk.index in p]  # fmt: skip
            for f, to_table in self.files:
                f.append(to_table(part))
            self.errors += n_err if take == len(batch) else int((~part.ok_mask).sum())
            self.filled += take
            start += take
            if self.filled == size:
                for f, _ in self.files:
                    f.commit(errors=self.errors)
                self.files, self.filled, self.errors = [], 0, 0
                self.chunk = next(self.chunks, None)


def run_sharded(
    engine: FeatureEngine,
    refs: Sequence[ImageRef],
    outputs: Sequence[tuple[ShardedWriter, Callable[[FeatureBatch], pa.Table]]],
    *,
    progress: bool,
    description: str,
    output_name: str,
    rows_per_shard: int = DEFAULT_ROWS_PER_SHARD,
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
        pending_by_writer = []
        for writer, _ in outputs:
            stack.enter_context(writer)
            pending_by_writer.append({c.index for c in writer.plan(ids)[0]})
        chunks = plan_chunks(len(refs), outputs[0][0].rows_per_shard if outputs else rows_per_shard)
        todo = (
            chunks
            if stream is not None or not outputs
            else [c for c in chunks if any(c.index in p for p in pending_by_writer)]
        )
        todo_set = {c.index for c in todo}
        first = outputs[0][0] if outputs else None
        skipped_errors = (
            sum(int(first.done[c.index].get("errors", 0)) for c in chunks if c.index not in todo_set) if first else 0
        )
        summary.resumed = sum(c.stop - c.start for c in chunks if c.index not in todo_set)
        summary.errors = skipped_errors
        sinks = stack.enter_context(_ShardSinks(outputs, pending_by_writer, todo))

        with RunProgress(len(refs), description, enabled=progress) as bar:
            bar.advance(summary.resumed, skipped_errors)
            todo_refs = [r for c in todo for r in refs[c.start : c.stop]]
            batches = engine.run(todo_refs, groups=[c.stop - c.start for c in todo])
            for batch in batches:
                if stream is not None:
                    stream(batch)
                n_err = int((~batch.ok_mask).sum())
                summary.errors += n_err
                sinks.add(batch, n_err)
                bar.advance(len(batch), n_err)
        for writer, _ in outputs:
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
    engine: str = "local",
    ray_address: str | None = None,
    ray_workers: int | None = None,
    gpus_per_worker: float = 0.0,
) -> RunSummary:
    """Extract features of every image named by ``inputs`` into the feature store ``out``.

    ``inputs``: directories, image files, ``@list.txt`` or ``-`` (stdin); see
    :func:`imgsent.inputs.find_images`. ``backbones``: spec strings or presets (see
    :mod:`imgsent.backbones`). Re-running on an interrupted store resumes it. Returns a
    :class:`~imgsent.report.RunSummary`. Raises :class:`~imgsent.errors.ImgsentError` for bad
    arguments; bad images become error rows. ``engine="ray"`` runs the same work on Ray Data
    (``ray_address``, ``ray_workers`` actors, ``gpus_per_worker``); the store is the same.
    """
    refs, shard_t = resolve_inputs(inputs, null=null, include_hidden=include_hidden, stdin=stdin, shard=shard)
    models = load_backbones(backbones, random_weights=random_weights)
    engine = build_engine(
        models,
        engine=engine,
        ray_address=ray_address,
        ray_workers=ray_workers,
        gpus_per_worker=gpus_per_worker,
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
        engine,
        refs,
        [(writer, lambda b: feature_table(b, dtype))],
        progress=progress,
        description="extract",
        output_name=out,
    )
