"""The feature store: Parquet shards of per-image features, and loading them as one matrix.

Columns: ``id``, ``path``, ``status`` (``ok``/``error``), ``error`` (reason or null), ``width``,
``height``, and one ``fixed_size_list<float32|float16>[dim]`` column per backbone, named by its key
(``torchvision:mobilenet_v2``...); null on error rows. The manifest header records each backbone's
recipe (spec, dim, preprocessing, weights fingerprint), the dtype and test-time augmentation.
The store directory reads as one Parquet dataset as-is (pandas, pyarrow, polars, DuckDB): every
file in it that is not data starts with ``_`` or ``.``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .batches import Blocks, Engine, FeatureBatch
from .errors import ImgsentError
from .inputs import ImageRef, display_path
from .options import FEATURE_DTYPES
from .shards import ShardedWriter, StoreListing, begun, list_store
from .specs import normalize_key, normalized_recipe

if TYPE_CHECKING:
    from .backbones import Backbone
    from .options import RunOptions

KIND = "features"
DTYPES = dict(zip(FEATURE_DTYPES, (pa.float32(), pa.float16())))
BASE_COLUMNS = ("id", "path", "status", "error", "width", "height")
SOURCE_COLUMN = "source"  # stores and score outputs of runs with tar, Parquet or URL inputs


def store_header(
    recipes: list[dict],
    dtype: str,
    tta: str,
    numerics: str = "fp32",
    decode: str = "workers",
    decoder: str | None = None,
    runtimes: dict[str, str] | None = None,
) -> dict:
    """What a store's features are: backbone recipes, stored dtype, TTA, the numerics they were
    computed in, where JPEGs were decoded and by which decoder, and the backbones that ran on ONNX
    Runtime (each recorded only when not the default, fp32, workers, torchvision (the one decoder
    before imgsent 0.7) and torch, so older stores keep their header)."""
    if dtype not in DTYPES:
        raise ImgsentError(f"dtype must be float32 or float16, got {dtype!r}")
    header = {"backbones": recipes, "dtype": dtype, "tta": tta}
    if numerics != "fp32":
        header["numerics"] = numerics
    if decode != "workers":
        header["decode"] = decode
    if decode == "device" and decoder not in (None, "torchvision"):
        header["decoder"] = decoder
    if runtimes:
        header["runtimes"] = dict(runtimes)
    return header


def describe_header_difference(old: dict, new: dict) -> str:
    old_keys = [b.get("key") for b in old.get("backbones", [])]
    new_keys = [b.get("key") for b in new.get("backbones", [])]
    if old_keys != new_keys:
        return f"it has backbones {old_keys}, this run asks for {new_keys}"
    for o, n in zip(old.get("backbones", []), new.get("backbones", [])):
        for field in ("dim", "preprocess", "fingerprint"):
            if o.get(field) != n.get(field):
                return f"backbone {n.get('key')} differs in {field}"
    for field, default in (
        ("dtype", None),
        ("tta", None),
        ("numerics", "fp32"),
        ("decode", "workers"),
        ("decoder", "torchvision"),
        ("runtimes", {}),
    ):
        if field == "runtimes" and old.get(field, default) != new.get(field, default):
            was, now = old.get(field, {}), new.get(field, {})

            def on(record: dict) -> str:
                return f"ONNX Runtime for {', '.join(record)}" if record else "torch for every backbone"

            return f"it was made with {on(was)}, this run uses {on(now)} (choose with --runtime)"
        if old.get(field, default) != new.get(field, default):
            how = {"decoder": " (choose with IMGSENT_DEVICE_DECODER)", "runtimes": " (choose with --runtime)"}.get(
                field, ""
            )
            return f"it has {field}={old.get(field, default)!r}, this run computes {new.get(field, default)!r}{how}"
    return "settings differ"


def source_array(sources: list[str], n: int) -> pa.Array:
    """The ``source`` column of ``n`` rows: each image's source, null where it has none."""
    return pa.array([s or None for s in sources] if sources else [None] * n, pa.string())


def base_arrays(ids, paths, status, error, width, height) -> list[pa.Array]:
    return [
        pa.array(ids, pa.string()),
        pa.array(paths, pa.string()),
        pa.array(status, pa.string()),
        pa.array(error, pa.string()),
        pa.array(width, pa.int32()),
        pa.array(height, pa.int32()),
    ]


def feature_type(dtype: str, dim: int) -> pa.DataType:
    """``fixed_size_list<item: float32 not null>[dim]``: items are never null (a bad image nulls the
    whole list), and saying so lets Parquet readers skip per-value null bookkeeping (~30 % faster)."""
    return pa.list_(pa.field("item", DTYPES[dtype], nullable=False), dim)


def feature_table(batch: FeatureBatch, dtype: str = "float32", with_source: bool = False) -> pa.Table:
    """Arrow table for a :class:`FeatureBatch` (null feature lists on error rows); ``with_source``:
    a ``source`` column after the base ones (null where ``path`` is the file itself)."""
    arrays = base_arrays(
        batch.ids,
        [display_path(p) for p in batch.paths],
        batch.status,
        batch.error,
        batch.width,
        batch.height,
    )
    names = list(BASE_COLUMNS)
    if with_source:
        arrays.append(source_array(batch.sources, len(batch)))
        names.append(SOURCE_COLUMN)
    mask = pa.array(~batch.ok_mask)
    np_dtype = np.float16 if dtype == "float16" else np.float32
    for key, mat in batch.features.items():
        dim = mat.shape[1]
        values = pa.array(np.nan_to_num(mat, nan=0.0).astype(np_dtype, copy=False).reshape(-1))
        arr = pa.FixedSizeListArray.from_arrays(values, type=feature_type(dtype, dim), mask=mask)
        arrays.append(arr)
        names.append(key)
    return pa.Table.from_arrays(arrays, names=names)


@dataclass
class FeatureSet:
    """Features loaded from a store. ``X`` rows follow ``ids``; ``blocks`` lists (key, dim) in
    column order of ``X``; ``recipes`` the matching backbone recipes from the manifest."""

    ids: list[str]
    paths: list[str]
    sources: list[str]  # how to read each image when ``path`` is not the file ("": it is)
    status: list[str]
    error: list[str | None]
    X: np.ndarray
    blocks: list[tuple[str, int]]
    recipes: list[dict]
    header: dict

    @property
    def layout(self) -> Blocks:
        return Blocks.of(self.blocks)

    def matrix(self, keys: Sequence[str]) -> np.ndarray:
        """The columns of ``X`` for the blocks ``keys``, in that order (no copy when they are all,
        in order)."""
        if [k for k, _ in self.blocks] == list(keys):
            return self.X
        missing = [k for k in keys if k not in dict(self.blocks)]
        if missing:
            raise ImgsentError(f"features lack block {missing[0]!r} (have {', '.join(k for k, _ in self.blocks)})")
        return self.X[:, self.layout.columns(keys)]

    @property
    def ok(self) -> np.ndarray:
        return np.asarray([s == "ok" for s in self.status], dtype=bool)

    def __len__(self) -> int:
        return len(self.ids)


def with_sources(out: str | None, refs: Sequence[ImageRef], begun_there: dict | None = None) -> bool:
    """Whether rows written to ``out`` carry a ``source`` column (how to read an image that is no
    file: a tar member, a Parquet cell, a URL): as the output begun there has it (a store never
    changes its columns; ``begun_there``: its manifest, if already read), else when any of ``refs``
    has a source."""
    begun_there = begun_there if begun_there is not None else begun(out)
    if begun_there is not None and begun_there["shards"] and begun_there.get("schema") is not None:
        return SOURCE_COLUMN in begun_there["schema"].names
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
    :func:`imgsent.jobs.run_job` takes it; used by ``extract`` and by ``score --keep-features``.
    What ``engine`` computes in and which JPEG decoder it uses are recorded: a store never mixes two."""
    recipes = [b.recipe() for b in models]
    there = begun(out)  # a store this run resumes: its runtimes and columns stay as they were begun
    if options.runtime == "auto" and there is not None:
        record = dict(there["header"].get("runtimes", {}))
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
    with_source = with_sources(out, refs, there)
    return writer, lambda b: feature_table(b, dtype, with_source)


def open_store(store: str) -> StoreListing:
    """A feature store's listing, its header's recipes under today's keys (see :func:`normalized_recipe`)."""
    listing = list_store(store, kind=KIND)
    recipes = [normalized_recipe(r) for r in listing.header.get("backbones", [])]
    listing.header = {**listing.header, "backbones": recipes}
    return listing


def _select(store: str, backbones: Sequence[str] | None):
    """(listing, keys, recipes, blocks, Parquet column of each key) for ``backbones`` (default all)."""
    listing = open_store(store)
    recipes_all = listing.header["backbones"]
    by_key = {r["key"]: r for r in recipes_all}
    keys = [normalize_key(k) for k in backbones] if backbones else [r["key"] for r in recipes_all]
    unknown = [k for k in keys if k not in by_key]
    if unknown:
        raise ImgsentError(f"store {store} has no backbone {unknown[0]!r}; it has {', '.join(by_key)}")
    recipes = [by_key[k] for k in keys]
    columns = [by_key[k].get("column", k) for k in keys]
    return listing, keys, recipes, [(k, int(by_key[k]["dim"])) for k in keys], columns


def has_source_column(files: Sequence[str]) -> bool:
    """Whether a store's shards hold a ``source`` column (they all do, or none does)."""
    return bool(files) and SOURCE_COLUMN in pq.read_schema(files[0]).names


def block_matrix(col: pa.Array, dim: int) -> np.ndarray:
    """A fixed-size-list column as an (n, dim) float32 matrix: a read-only view of Arrow's buffer
    for float32 stores (rows of null lists hold placeholder values), a copy for float16."""
    values = col.values.slice(col.offset * dim, len(col) * dim)
    return values.to_numpy(zero_copy_only=False).reshape(len(col), dim).astype(np.float32, copy=False)


@dataclass
class FeatureChunk:
    """A run of consecutive rows of one shard, as read: ``columns`` holds the Arrow arrays ``id``,
    ``path``, ``status``, ``error``; ``X`` the features (columns follow the blocks asked for; rows
    that are not ``ok`` hold placeholders); ``ok`` which rows have features."""

    columns: dict[str, pa.Array]
    X: np.ndarray
    ok: np.ndarray

    def __len__(self) -> int:
        return len(self.ok)


class StoreReader:
    """Random access to a store by row group (every shard is written in row groups of
    ``shards.ROW_GROUP_ROWS`` rows): ``parts`` lists them as (file, row group) in manifest order
    (rows sorted by id within each job's shards); :meth:`read` turns one into a
    :class:`FeatureChunk`. Parts are independent, so several threads can read (and work on)
    different parts at once; Parquet decoding runs outside the GIL."""

    def __init__(self, store: str, backbones: Sequence[str] | None = None):
        self.listing, self.keys, self.recipes, self.blocks, self.columns = _select(store, backbones)
        self.parts = [(f, g) for f in self.listing.files for g in range(pq.ParquetFile(f).num_row_groups)]
        self.in_id_order = self.listing.jobs <= 1  # a job array's shards interleave
        self.with_source = has_source_column(self.listing.files)

    def read(self, part: tuple[str, int]) -> FeatureChunk:
        f, group = part
        base = list(BASE_COLUMNS[:4]) + ([SOURCE_COLUMN] if self.with_source else [])
        columns = base + self.columns
        t = pq.ParquetFile(f, memory_map=True).read_row_group(group, columns=columns, use_threads=False)
        t = t.combine_chunks()  # one chunk per column already: no copy
        mats = [block_matrix(t.column(c).chunk(0), d) for c, (_, d) in zip(self.columns, self.blocks)]
        X = mats[0] if len(mats) == 1 else np.concatenate(mats, axis=1)
        ok = np.asarray(pc.equal(t.column("status"), "ok").to_numpy(), dtype=bool)
        return FeatureChunk({c: t.column(c).chunk(0) for c in base}, X, ok)


def load(store: str, backbones: Sequence[str] | None = None, *, only_ok: bool = True) -> FeatureSet:
    """Load a store's features as one float32 matrix, rows sorted by id.

    ``backbones``: keys to load, in this order (default: all, in store order). With ``only_ok``
    (default) error rows are left out; otherwise they are rows of NaN. Shards from several
    ``--shard`` jobs are read together. Each shard's values are copied once, straight into the
    output matrix.
    """
    listing, keys, recipes, blocks, stored = _select(store, backbones)
    columns = Blocks.of(blocks).slices()

    with_source = has_source_column(listing.files)
    base = list(BASE_COLUMNS[:4]) + ([SOURCE_COLUMN] if with_source else [])
    tables = [pq.read_table(f, columns=base + stored) for f in listing.files]
    ids = [i for t in tables for i in t.column("id").to_pylist()]
    status = [s for t in tables for s in t.column("status").to_pylist()]
    keep = np.asarray([s == "ok" for s in status], dtype=bool) if only_ok else np.ones(len(ids), dtype=bool)
    kept_ids = [i for i, k in zip(ids, keep) if k] if only_ok else ids
    in_order = all(a <= b for a, b in zip(kept_ids, kept_ids[1:]))  # the usual case: skip the sort
    if in_order:
        order = np.arange(len(kept_ids))
    else:
        order = np.argsort(np.asarray(kept_ids, dtype=object), kind="stable")
    dest = np.empty(len(kept_ids), dtype=np.int64)
    dest[order] = np.arange(len(kept_ids))
    X = np.empty((len(kept_ids), Blocks.of(blocks).width), dtype=np.float32)

    row = 0  # position among all rows
    out_row = 0  # position among kept rows
    for t in tables:
        n = t.num_rows
        k = keep[row : row + n]
        m = int(k.sum())
        # Rows already in place: one contiguous block copy; otherwise scatter by destination.
        target = slice(out_row, out_row + m) if in_order else dest[out_row : out_row + m]
        for b, key in enumerate(keys):
            col = t.column(stored[b]).combine_chunks()
            mat = block_matrix(col, blocks[b][1])
            X[target, columns[key]] = mat if m == n else mat[k]
            if not only_ok and col.null_count:
                nulls = np.asarray(col.is_null().to_numpy(zero_copy_only=False))
                X[dest[out_row : out_row + n][nulls], columns[key]] = np.nan
        row += n
        out_row += m

    def pick(col: str) -> list:
        vals = [v for t in tables for v in t.column(col).to_pylist()]
        if only_ok:
            vals = [v for v, kk in zip(vals, keep) if kk]
        return vals if in_order else [vals[i] for i in order]

    return FeatureSet(
        ids=kept_ids if in_order else [kept_ids[i] for i in order],
        paths=pick("path"),
        sources=[s or "" for s in pick(SOURCE_COLUMN)] if with_source else [""] * len(kept_ids),
        status=pick("status"),
        error=pick("error"),
        X=X,
        blocks=blocks,
        recipes=recipes,
        header=listing.header,
    )
