"""The types that flow between stages, and the engine contract. Torch-free, so that readers of a
store (``features.load``), writers and heads' users never import the engine.

* :class:`FeatureBatch`: rows for a batch of images, in input order, with features per backbone.
* :class:`Blocks`: the layout of a concatenated feature matrix (one block of columns per backbone).
* :class:`Engine`: what ``extract`` and ``score`` need of a distributor (local or Ray).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np

FAILING_VIEW = 8  # a backbone that fails on each of the first this many images it gets stops the run

if TYPE_CHECKING:
    from .inputs import ImageRef


@dataclass
class FeatureBatch:
    """Rows for a batch of images, in input order. ``features[key]`` has one row per image;
    rows of error images are NaN (and written as nulls). ``meta``: each image's kept fields
    (:attr:`~imgsent.inputs.ImageRef.meta`, JSON text or ""), or empty when none were kept."""

    ids: list[str]
    paths: list[str]
    status: list[str]
    error: list[str | None]
    width: list[int | None]
    height: list[int | None]
    features: dict[str, np.ndarray] = field(default_factory=dict)
    meta: list[str] = field(default_factory=list)
    # how to read each image when ``path`` is not the file (:attr:`~imgsent.inputs.ImageRef.source`:
    # a tar member, a Parquet cell, a URL), or empty when no image of the batch has one
    sources: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def ok_mask(self) -> np.ndarray:
        return np.asarray([s == "ok" for s in self.status], dtype=bool)

    def slice(self, start: int, stop: int) -> FeatureBatch:
        """Rows ``start:stop`` (the same type, every per-row field cut alike)."""
        cut = {name: getattr(self, name)[start:stop] for name in ("ids", "paths", "status", "error", "width", "height")}
        cut["features"] = {k: v[start:stop] for k, v in self.features.items()}
        cut["meta"] = self.meta[start:stop]
        cut["sources"] = self.sources[start:stop]
        return replace(self, **cut)


@dataclass(frozen=True)
class Blocks:
    """The column layout of a feature matrix: ``(key, dim)`` per backbone, in column order."""

    items: tuple[tuple[str, int], ...]

    @classmethod
    def of(cls, blocks: Sequence[tuple[str, int]]) -> Blocks:
        return cls(tuple((str(k), int(d)) for k, d in blocks))

    @property
    def keys(self) -> list[str]:
        return [k for k, _ in self.items]

    @property
    def dims(self) -> list[int]:
        return [d for _, d in self.items]

    @property
    def width(self) -> int:
        return sum(self.dims)

    def slices(self) -> dict[str, slice]:
        """Each key's columns in the concatenated matrix."""
        out, start = {}, 0
        for k, d in self.items:
            out[k] = slice(start, start + d)
            start += d
        return out

    def columns(self, keys: Sequence[str]) -> np.ndarray:
        """Column indices of ``keys``' blocks, in that order; ``KeyError`` names a missing key."""
        s = self.slices()
        return np.concatenate([np.arange(s[k].start, s[k].stop) for k in keys]) if keys else np.arange(0)

    def select(self, keys: Sequence[str]) -> Blocks:
        d = dict(self.items)
        return Blocks(tuple((k, d[k]) for k in keys))

    def __iter__(self):
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)


@runtime_checkable
class Engine(Protocol):
    """A distributor of the feature work: the local :class:`~imgsent.engine.FeatureEngine` or the
    Ray one (:class:`~imgsent.distributed.RayEngine`).

    ``keys``: the feature columns it produces (one per backbone, in order). ``numerics``: what it
    computes them in (fp32, tf32, bf16, fp16; see :mod:`imgsent.precision`). ``decoder``: the JPEG
    decoder of ``decode="device"`` (:data:`imgsent.devicedecode.BACKENDS`), else None.
    ``runtime_record()``: the backbones it runs on ONNX Runtime (``{key: "onnx"}``, for store headers).
    ``run(refs, groups)``: yields batches covering ``refs`` exactly once, in order; no batch
    straddles two consecutive ``groups`` (output shards), so a resumed run computes the same
    numbers. Bad images are rows with ``status="error"``, never exceptions. An engine may also offer
    ``write_shards`` (Ray): then it writes directory outputs' shards itself and ``jobs.run_job`` only
    lists them (see :meth:`imgsent.distributed.RayEngine.write_shards`).
    """

    @property
    def keys(self) -> list[str]: ...

    numerics: str
    decoder: str | None

    def runtime_record(self) -> dict[str, str]: ...

    def run(self, refs: Sequence[ImageRef], groups: Sequence[int] | None = None) -> Iterator[FeatureBatch]: ...


def group_batches(n: int, groups: Sequence[int] | None, batch_size: int) -> list[list[int]]:
    """Batches (lists of positions) of at most ``batch_size`` over ``n`` references, none of which
    straddles two of ``groups`` (sizes of consecutive runs: output shards)."""
    sizes = list(groups) if groups else [n]
    if sum(sizes) != n:
        raise ValueError("groups must add up to the number of references")
    batches, start = [], 0
    for size in sizes:
        for s in range(start, start + size, batch_size):
            batches.append(list(range(s, min(s + batch_size, start + size))))
        start += size
    return batches


def mark_failed(batch: FeatureBatch, failed: dict[int, str]) -> FeatureBatch:
    """Rows ``failed`` names become error rows with their reason, every feature NaN."""
    for i, reason in failed.items():
        batch.status[i] = "error"
        batch.error[i] = reason
        for m in batch.features.values():
            m[i] = np.nan
    return batch


def flag_nonfinite(batch: FeatureBatch) -> FeatureBatch:
    """A good row whose features hold NaN or inf (an fp16 overflow, a broken model) becomes an
    error row saying so, never silently zeros or 3.4e38 in the store."""
    for key, mat in batch.features.items():
        bad = np.flatnonzero(~np.isfinite(mat).all(axis=1) & batch.ok_mask)
        reason = f"{key} gave non-finite features (NaN/inf); with fp16, try --precision fp32 or bf16"
        mark_failed(batch, dict.fromkeys(bad.tolist(), reason))
    return batch


def decoded_batch(items, features: dict[str, np.ndarray], failed: dict[int, str]) -> FeatureBatch:
    """The :class:`FeatureBatch` of decoded ``items`` (:class:`~imgsent.decode.DecodedImage`) and
    their ``features``; rows a backbone ``failed`` on, and non-finite rows, become error rows."""
    out = FeatureBatch(
        ids=[it.ref.id for it in items],
        paths=[it.ref.path for it in items],
        status=[it.status for it in items],
        error=[it.error for it in items],
        width=[it.width for it in items],
        height=[it.height for it in items],
        features=features,
        meta=[it.ref.meta for it in items] if any(it.ref.meta for it in items) else [],
        sources=[it.ref.source for it in items] if any(it.ref.source for it in items) else [],
    )
    return flag_nonfinite(mark_failed(out, failed))


class FailureCount:
    """Per backbone of an engine: the images it embedded and those it failed on, counted across
    lanes. A backbone that has failed on each of the first images of a run (``FAILING_VIEW``, or all
    of a shorter run) is broken, not the images: :meth:`add` stops the run with one line."""

    def __init__(self, backbones: int):
        import threading

        self._lock = threading.Lock()
        self._counts = [[0, 0] for _ in range(backbones)]
        self.stop_after = FAILING_VIEW

    def begin(self, images: int) -> None:
        """A run of ``images`` starts."""
        self.stop_after = min(FAILING_VIEW, images)

    def add(self, index: int, key: str, images: int, failed: dict[int, str]) -> None:
        """Backbone ``index`` (``key``) got ``images`` and ``failed`` on these (row -> reason)."""
        from .errors import ImgsentError

        with self._lock:
            done = self._counts[index]
            done[0] += images - len(failed)
            done[1] += len(failed)
            broken = done[0] == 0 and done[1] >= self.stop_after
            failures = done[1]
        if broken:
            raise ImgsentError(
                f"backbone {key} failed on each of the first {failures} images, so it cannot run here; stopped "
                f"(finished shards are kept). First error: {next(iter(failed.values())).split(': ', 1)[1]}"
            )

    def embed_or_retry(self, index: int, key: str, embed, pixels, nan_row, join):
        """``embed(pixels)`` for backbone ``index`` (``key``), and when it raises on the batch (but
        an :class:`~imgsent.errors.ImgsentError`, which stops the run), the batch again image by
        image: (features with ``nan_row()`` for the images it still fails on, {row: one-line
        reason}); ``join`` stacks the rows (``torch.cat``, ``np.concatenate``). Both engines' rule,
        counted here (:meth:`add`)."""
        from .errors import ImgsentError, last_line

        try:
            out, failed = embed(pixels), {}
        except ImgsentError:
            raise
        except Exception:
            rows, failed = [], {}
            for j in range(len(pixels)):
                try:
                    rows.append(embed(pixels[j : j + 1]))
                except ImgsentError:
                    raise
                except Exception as exc:
                    failed[j] = f"{key} failed on this image: {last_line(exc)}"
                    rows.append(nan_row())
            out = join(rows)
        self.add(index, key, len(pixels), failed)
        return out, failed
