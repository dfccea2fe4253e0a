"""Sharded Parquet output: the one writer behind feature stores and score directories.

A store is a directory holding ``part-*.parquet`` shards of a bounded number of rows and a
manifest (``_manifest.parquet``) listing the finished ones. Shards are written to a temporary file, flushed and renamed,
and only then entered in the manifest (itself replaced atomically), so a crash at any moment leaves
either a finished shard or nothing; a partial file is never listed. Rerunning the same job skips the
shards the manifest lists (their ids are checked) and does the rest.

Jobs split with ``--shard I/N`` write ``_manifest.shard-I-of-N.parquet`` and ``part-I-of-N-*.parquet``
side by side in one directory; readers take every manifest they find.
A lock file keeps two processes from writing the same manifest; a dead writer's lock is taken over.

The directory reads as one Parquet dataset in pandas, pyarrow, polars and DuckDB. A manifest is
itself a Parquet file, in the manner of Parquet's ``_common_metadata``: zero rows with the shards'
schema, the manifest as JSON in its key-value metadata. Readers that follow the Hive/Spark
convention (pandas, pyarrow) skip it for its leading ``_``; readers that take every ``*.parquet``
file (polars, DuckDB) read its zero rows. Locks and temporary files (only while a writer runs)
start with ``.``. Stores written by imgsent 0.1.0 have ``manifest*.json``: they are still read,
and a writer resuming one replaces it with the new manifest.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import socket
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from . import __version__
from .atomicio import TMP_PREFIX, atomic_path, commit, discard, temp_path
from .errors import ImgsentError, one_line

FORMAT = "imgsent-store"
FORMAT_VERSION = 1


def _tag(shard: tuple[int, int] | None) -> str:
    return "" if shard is None else f"shard-{shard[0]}-of-{shard[1]}"


MANIFEST_PREFIX, MANIFEST_EXT = "_manifest", ".parquet"
OLD_MANIFEST_PREFIX, OLD_MANIFEST_EXT = "manifest", ".json"  # imgsent 0.1.0
MANIFEST_KEY = b"imgsent_manifest"


def manifest_name(shard: tuple[int, int] | None, prefix: str = MANIFEST_PREFIX, ext: str = MANIFEST_EXT) -> str:
    return f"{prefix}{ext}" if shard is None else f"{prefix}.{_tag(shard)}{ext}"


def part_name(shard: tuple[int, int] | None, index: int) -> str:
    return f"part-{index:05d}.parquet" if shard is None else f"part-{_tag(shard)}-{index:05d}.parquet"


def _part_glob(shard: tuple[int, int] | None) -> str:
    return "part-[0-9]*.parquet" if shard is None else f"part-{_tag(shard)}-*.parquet"


def ids_digest(ids: list[str]) -> str:
    h = hashlib.sha256()
    for i in ids:
        h.update(i.encode("utf-8", errors="surrogateescape"))
        h.update(b"\0")
    return h.hexdigest()


WRITTEN_HERE = {"outputs": 0, "shards": 0}  # outputs opened and shards finished by this process (for messages)
ROW_GROUP_ROWS = 1024  # rows per Parquet row group in every shard: the unit readers work in
VISIBLE_WAIT_S = 30.0  # how long a shard a worker finished may take to appear here (network filesystems)


def parquet_options(schema: pa.Schema) -> dict:
    """Text columns compress well; float features barely do and would cost a decode on every read."""
    text = [f.name for f in schema if not pa.types.is_fixed_size_list(f.type)]
    return {
        "compression": {f.name: ("zstd" if f.name in text else "none") for f in schema},
        "use_dictionary": text,
    }


@dataclass(frozen=True)
class ShardTarget:
    """Where one job's shard files go (``directory``, the job's ``--shard``): all a process needs
    to write finished shards of that job, on this machine or on a worker of a cluster that sees
    the same filesystem. Picklable; no lock, no manifest: :class:`ShardedWriter` (one process, the
    job's only one) lists what the targets finished."""

    directory: str
    shard: tuple[int, int] | None = None

    def open(self, chunk: Chunk) -> ShardFile:
        return ShardFile(self, chunk)

    def write_error(self, name: str, exc: OSError) -> ImgsentError:
        return ImgsentError(
            f"cannot write {name} in {self.directory}: {exc.strerror or exc}; finished shards are kept, "
            f"rerun the same command to resume"
        )


class ShardFile:
    """One shard being written, by whichever process runs its chunk: tables are appended to a
    temporary file (so a shard never has to sit in memory whole); :meth:`finish` renames it into
    place and returns its manifest entry, which the job's :class:`ShardedWriter` lists
    (:meth:`ShardedWriter.record_finished`)."""

    def __init__(self, target: ShardTarget, chunk: Chunk):
        self.target, self.chunk = target, chunk
        self.name = part_name(target.shard, chunk.index)
        self.path = os.path.join(target.directory, self.name)
        self.tmp = temp_path(self.path, prefix=f"{TMP_PREFIX}{self.name}.")
        self._pq: pq.ParquetWriter | None = None
        self._held: list[pa.Table] = []  # rows waiting for a full row group
        self.ids: list[str] = []
        self.schema: pa.Schema | None = None

    def append(self, table: pa.Table) -> None:
        """Add rows; they reach the file in row groups of :data:`ROW_GROUP_ROWS` (the last one
        shorter), whatever the sizes appended, so readers can split a shard into equal parts."""
        self.ids.extend(table.column("id").to_pylist())
        self._held.append(table)
        if sum(t.num_rows for t in self._held) >= ROW_GROUP_ROWS:
            self._flush(final=False)

    def _flush(self, final: bool) -> None:
        rows = pa.concat_tables(self._held) if len(self._held) > 1 else self._held[0]
        full = rows.num_rows if final else rows.num_rows - rows.num_rows % ROW_GROUP_ROWS
        try:
            if self._pq is None:
                self._pq = pq.ParquetWriter(self.tmp, rows.schema, **parquet_options(rows.schema))
                self.schema = rows.schema
            if full:
                self._pq.write_table(rows.slice(0, full), row_group_size=ROW_GROUP_ROWS)
        except OSError as exc:
            self.abort()
            raise self.target.write_error(self.name, exc) from None
        self._held = [rows.slice(full)] if full < rows.num_rows else []

    def finish(self, **extra: int) -> dict:
        """Finish the file (flushed, renamed into place) and return its manifest entry; ``extra``
        counts (errors=...) go into the entry too."""
        if self._held:
            self._flush(final=True)
        try:
            if self._pq is not None:
                self._pq.close()
                self._pq = None
            commit(self.tmp, self.path)
        except OSError as exc:
            self.abort()
            raise self.target.write_error(self.name, exc) from None
        entry = {
            "index": self.chunk.index,
            "file": self.name,
            "rows": len(self.ids),
            "ids_sha256": ids_digest(self.ids),
        }
        return {**entry, **extra}

    def abort(self) -> None:
        try:
            if self._pq is not None:
                self._pq.close()
        except Exception:
            pass
        self._pq = None
        self._held = []
        discard(self.tmp)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class _Lock:
    def __init__(self, path: str):
        self.path = path
        self.held = False

    def acquire(self) -> None:
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    with open(self.path) as fh:
                        other = json.load(fh)
                except (OSError, ValueError):
                    other = {}
                same_host = other.get("host") == me["host"]
                pid = other.get("pid")
                if same_host and isinstance(pid, int) and not _pid_alive(pid):
                    try:
                        os.unlink(self.path)  # the writer died: its lock is stale
                    except FileNotFoundError:
                        pass
                    continue
                if not other:  # a lock being written this instant, or garbage: give it a moment
                    time.sleep(0.2)
                    if os.path.exists(self.path):
                        try:
                            with open(self.path) as fh:
                                json.load(fh)
                        except ValueError:
                            os.unlink(self.path)
                            continue
                    continue
                raise ImgsentError(
                    f"another imgsent process (pid {pid} on {other.get('host')}) is writing "
                    f"{os.path.dirname(self.path)}; wait for it to finish, or delete {self.path} if it is gone"
                ) from None
            with os.fdopen(fd, "w") as fh:
                json.dump(me, fh)
            self.held = True
            return
        raise ImgsentError(f"cannot take the lock {self.path}")

    def release(self) -> None:
        if self.held:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            self.held = False


@dataclass
class Chunk:
    index: int
    start: int
    stop: int


@dataclass(frozen=True)
class WorkItem:
    """One chunk of a job and the outputs (their positions in the job's list) that lack its shard."""

    chunk: Chunk
    lacking: tuple[int, ...]


def plan_job(
    ids: list[str], writers: list[ShardedWriter], rows_per_shard: int, every: bool = False
) -> tuple[list[WorkItem], list[Chunk]]:
    """The one plan of a job over ``writers`` (each says which chunks it already holds:
    :meth:`ShardedWriter.settle`): (work items: each chunk some writer lacks, or every chunk with
    ``every`` or no writer; the chunks every writer already has). Both distributors run these items
    through :func:`write_chunk`: the local loop (:func:`imgsent.jobs.run_job`) and Ray's workers."""
    chunks = plan_chunks(len(ids), writers[0].rows_per_shard if writers else rows_per_shard)
    held_by = [w.settle(chunks, ids) for w in writers]
    items, skipped = [], []
    for c in chunks:
        lacking = tuple(k for k, held in enumerate(held_by) if c.index not in held)
        if lacking or every or not writers:
            items.append(WorkItem(c, lacking))
        else:
            skipped.append(c)
    return items, skipped


Output = tuple[ShardTarget, Callable[[object], pa.Table]]  # where a job's shards go, and batch -> its rows


def write_chunk(batches: Iterable, item: WorkItem, outputs: Sequence[Output]) -> dict:
    """The work of one item, wherever it runs (the local loop, a Ray worker): the engine's
    ``batches`` of its chunk's rows become its shard in each output it lacks (``item.lacking``:
    positions in ``outputs``), finished files; returns ``{index, entries, schemas, errors}`` (an
    entry and schema per lacking output, in order) for the job's writers to list
    (:meth:`ShardedWriter.record_finished`). On any failure no file of the chunk is left half
    written."""
    chunk = item.chunk
    files = [(outputs[k][0].open(chunk), outputs[k][1]) for k in item.lacking]
    rows = errors = 0
    try:
        for batch in batches:
            for f, to_table in files:
                f.append(to_table(batch))
            rows += len(batch)
            errors += int((~batch.ok_mask).sum())
        if rows != chunk.stop - chunk.start:
            raise RuntimeError(f"the engine returned {rows} rows for shard {chunk.index} of {chunk.stop - chunk.start}")
        entries = [f.finish(errors=errors) for f, _ in files]
    except BaseException:
        for f, _ in files:
            f.abort()
        raise
    return {"index": chunk.index, "entries": entries, "schemas": [f.schema for f, _ in files], "errors": errors}


def plan_chunks(n_rows: int, rows_per_shard: int) -> list[Chunk]:
    """Consecutive row ranges of at most ``rows_per_shard``: shard k holds rows [k*S, (k+1)*S)."""
    return [
        Chunk(i, start, min(start + rows_per_shard, n_rows)) for i, start in enumerate(range(0, n_rows, rows_per_shard))
    ]


class ShardedWriter:
    """Write one job's rows as shards of ``rows_per_shard`` into ``directory``, resumably.

    ``header`` describes what the rows are (backbones, model...). A directory whose manifest has
    another kind or header is refused, naming ``describe_difference(old, new)``, unless
    ``overwrite``, which removes that job's old shards first. Use as a context manager.
    """

    def __init__(
        self,
        directory: str,
        *,
        kind: str,
        header: dict,
        shard: tuple[int, int] | None = None,
        overwrite: bool = False,
        rows_per_shard: int = 10_000,
        describe_difference: Callable[[dict, dict], str] | None = None,
    ):
        if rows_per_shard < 1:
            raise ImgsentError(f"rows per shard must be >= 1, got {rows_per_shard}")
        self.directory = directory
        self.kind = kind
        self.header = header
        self.shard = shard
        self.overwrite = overwrite
        self.rows_per_shard = rows_per_shard
        self.describe_difference = describe_difference
        self.manifest_path = os.path.join(directory, manifest_name(shard))
        self._old_manifest_path = os.path.join(directory, manifest_name(shard, OLD_MANIFEST_PREFIX, OLD_MANIFEST_EXT))
        self._lock = _Lock(os.path.join(directory, f".{manifest_name(shard)}.lock"))
        self.schema: pa.Schema | None = None  # the shards' schema (the manifest file has it too)
        self.done: dict[int, dict] = {}

    def __enter__(self) -> ShardedWriter:
        if os.path.exists(self.directory) and not os.path.isdir(self.directory):
            raise ImgsentError(f"output {self.directory} exists and is not a directory")
        try:
            os.makedirs(self.directory, exist_ok=True)
            probe = os.path.join(self.directory, ".imgsent-write-test")
            with open(probe, "w"):
                pass
            os.unlink(probe)
        except OSError as exc:
            raise ImgsentError(f"cannot write to {self.directory}: {exc.strerror}") from None
        self._lock.acquire()
        try:
            self._load_existing()
        except BaseException:
            self._lock.release()
            raise
        WRITTEN_HERE["outputs"] += 1
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is not None:  # interrupted: no partial file of ours may stay behind
            self._clean_orphans()
        self._lock.release()

    def _load_existing(self) -> None:
        self._clean_orphans()
        path = self.manifest_path
        if not os.path.exists(path) and os.path.exists(self._old_manifest_path):
            path = self._old_manifest_path  # a 0.1.0 store: resumed, its manifest renamed on the next write
        if not os.path.exists(path):
            return
        try:
            old = read_manifest(path)
        except ImgsentError:
            if not self.overwrite:
                raise
            old = None
        if old is not None and not self.overwrite:
            if old["kind"] != self.kind:
                raise ImgsentError(
                    f"{self.directory} holds {old['kind']}, not {self.kind}; use --overwrite or another output"
                )
            if old["header"] != self.header:
                why = self.describe_difference(old["header"], self.header) if self.describe_difference else ""
                raise ImgsentError(
                    f"{self.directory} was made with different settings{': ' + why if why else ''}; "
                    f"use --overwrite to replace it, or another output"
                )
            self.schema = old.get("schema")
            if old.get("rows_per_shard") == self.rows_per_shard:
                for entry in old["shards"]:
                    if os.path.isfile(os.path.join(self.directory, entry["file"])):
                        self.done[int(entry["index"])] = entry
            return
        for entry in (old or {}).get("shards", []):
            try:
                os.unlink(os.path.join(self.directory, entry["file"]))
            except (FileNotFoundError, KeyError, TypeError):
                pass
        os.unlink(path)

    def _clean_orphans(self) -> None:
        # Only this job's leftovers: other jobs (--shard) may be writing beside us.
        # A process killed mid-write leaves a part's or the manifest's temporary file.
        here = glob.escape(self.directory)
        patterns = (_part_glob(self.shard), glob.escape(manifest_name(self.shard)))
        for pattern in patterns:
            for tmp in glob.glob(os.path.join(here, TMP_PREFIX + pattern + ".*")):
                try:
                    os.unlink(tmp)
                except OSError:
                    pass

    def plan(self, ids: list[str]) -> tuple[list[Chunk], int]:
        """Split ``ids`` (the job's full, ordered list) into chunks; return (pending chunks, rows
        done). See :meth:`settle`."""
        chunks = plan_chunks(len(ids), self.rows_per_shard)
        held = self.settle(chunks, ids)
        return [c for c in chunks if c.index not in held], sum(self.done[i]["rows"] for i in held)

    def settle(self, chunks: list[Chunk], ids: list[str]) -> set[int]:
        """The chunks of this plan (``chunks`` of ``ids``, the job's full, ordered list) whose shard
        this output already holds: a finished shard counts only if it holds exactly the ids its
        chunk should hold now. The entries of every other shard are dropped here, once (they are
        written again or, by :meth:`finish`, removed)."""
        valid = {}
        for c in chunks:
            entry = self.done.get(c.index)
            if (
                entry
                and entry.get("rows") == c.stop - c.start
                and entry.get("ids_sha256") == ids_digest(ids[c.start : c.stop])
            ):
                valid[c.index] = entry
        self.done = valid
        self._total_chunks = len(chunks)
        return set(valid)

    @property
    def target(self) -> ShardTarget:
        """Where this job's shard files go, for processes that write them elsewhere (Ray workers);
        their entries come back to :meth:`record`."""
        return ShardTarget(self.directory, self.shard)

    def write(self, chunk: Chunk, table: pa.Table, **extra: int) -> None:
        """Write ``table`` as the whole shard of ``chunk``, here."""
        f = self.target.open(chunk)
        f.append(table)
        self.record(chunk.index, f.finish(**extra), f.schema)

    def record(self, index: int, entry: dict, schema: pa.Schema | None = None) -> None:
        """List a finished shard (``entry`` from :meth:`ShardFile.finish`; ``schema``: its file's)."""
        self.schema = self.schema or schema
        self.done[index] = entry
        try:
            self._write_manifest(complete=False)
        except OSError as exc:
            raise self.write_error("manifest.json", exc) from None
        WRITTEN_HERE["shards"] += 1

    def record_finished(self, index: int, entry: dict, schema: pa.Schema | None = None) -> None:
        """:meth:`record` a shard a job's chunk writer finished (:func:`imgsent.jobs.write_chunk`,
        here or in a Ray worker, maybe on another machine), once this process sees its file: a worker
        writing to a disk of its own would otherwise give a manifest listing files that are not here.
        Waits up to :data:`VISIBLE_WAIT_S` (a network filesystem may show another client's new file
        a moment late)."""
        path = os.path.join(self.directory, entry["file"])
        deadline = time.monotonic() + VISIBLE_WAIT_S
        while not os.path.isfile(path):
            if time.monotonic() > deadline:
                raise ImgsentError(
                    f"a worker finished {entry['file']} but this machine does not see it in {self.directory} after "
                    f"{VISIBLE_WAIT_S:.0f} s: the output must be on a filesystem every node shares (NFS, Lustre, a "
                    f"mounted bucket), at the same path"
                )
            time.sleep(0.2)
        self.record(index, entry, schema)

    def write_error(self, name: str, exc: OSError) -> ImgsentError:
        return self.target.write_error(name, exc)

    def finish(self) -> None:
        """Every shard is done: the manifest says so; files of this job it does not list (a
        worker's unfinished temporary file, a shard of an older plan) are removed."""
        self._clean_orphans()
        for stale in glob.glob(os.path.join(glob.escape(self.directory), _part_glob(self.shard))):
            name = os.path.basename(stale)
            if name not in {e["file"] for e in self.done.values()}:
                os.unlink(stale)
        self._write_manifest(complete=True)

    def _write_manifest(self, complete: bool) -> None:
        shards = [self.done[i] for i in sorted(self.done)]
        if self.schema is None and shards:  # a 0.1.0 store resumed with nothing left to write
            self.schema = pq.read_schema(os.path.join(self.directory, shards[0]["file"])).remove_metadata()
        write_manifest(
            self.manifest_path,
            self.schema,
            {
                "format": FORMAT,
                "format_version": FORMAT_VERSION,
                "kind": self.kind,
                "imgsent_version": __version__,
                "job_shard": list(self.shard) if self.shard else None,
                "rows_per_shard": self.rows_per_shard,
                "complete": complete and len(shards) == getattr(self, "_total_chunks", len(shards)),
                "rows": sum(s["rows"] for s in shards),
                "header": self.header,
                "shards": shards,
            },
        )
        discard(self._old_manifest_path)


def write_manifest(path: str, schema: pa.Schema | None, manifest: dict) -> None:
    """A manifest file: zero rows of the shards' ``schema``, ``manifest`` as JSON in its metadata."""
    schema = schema if schema is not None else pa.schema([])
    meta = {MANIFEST_KEY: json.dumps(manifest, indent=1).encode()}
    with atomic_path(path) as tmp:
        pq.write_table(schema.with_metadata(meta).empty_table(), tmp)


def read_manifest(path: str) -> dict:
    """Read and check one manifest (``_manifest*.parquet``, or 0.1.0's ``manifest*.json``); a
    malformed one raises :class:`ImgsentError` naming the problem. ``schema`` is the shards' schema
    (None for 0.1.0 manifests)."""
    schema = None
    try:
        if path.endswith(OLD_MANIFEST_EXT):
            with open(path) as fh:
                m = json.load(fh)
        else:
            schema = pq.read_schema(path)
            raw = (schema.metadata or {}).get(MANIFEST_KEY)
            if raw is None:
                raise ImgsentError(f"{path} is not an imgsent manifest")
            m = json.loads(raw)
            schema = schema.remove_metadata()
    except OSError as exc:
        raise ImgsentError(f"cannot read {path}: {exc.strerror or exc}") from None
    except (ValueError, pa.ArrowException) as exc:
        raise ImgsentError(f"{path} is not a valid manifest ({one_line(exc, 120)})") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise ImgsentError(f"{path} is not an imgsent manifest")
    if not isinstance(m.get("format_version"), int) or m["format_version"] > FORMAT_VERSION:
        raise ImgsentError(
            f"{path} has format version {m.get('format_version')!r}; this imgsent reads up to {FORMAT_VERSION}"
        )
    for key, typ in (("kind", str), ("header", dict), ("shards", list)):
        if not isinstance(m.get(key), typ):
            raise ImgsentError(f"{path}: field {key!r} is missing or not a {typ.__name__}")
    for entry in m["shards"]:
        ok = (
            isinstance(entry, dict)
            and isinstance(entry.get("file"), str)
            and os.path.basename(entry["file"]) == entry["file"]
            and entry["file"].endswith(".parquet")
            and isinstance(entry.get("rows"), int)
            and entry["rows"] >= 0
            and isinstance(entry.get("index"), int)
        )
        if not ok:
            raise ImgsentError(f"{path}: a shard entry is malformed: {str(entry)[:120]}")
    m["schema"] = schema
    return m


@dataclass
class StoreListing:
    kind: str
    header: dict
    files: list[str]
    complete: bool
    rows: int
    jobs: int = 1  # manifests (``--shard I/N`` jobs) whose shards are listed


def manifest_paths(directory: str) -> list[str]:
    """Every job's manifest in ``directory``; a job's 0.1.0 name only where it has no new one."""
    found: dict[str, str] = {}
    for prefix, ext in ((OLD_MANIFEST_PREFIX, OLD_MANIFEST_EXT), (MANIFEST_PREFIX, MANIFEST_EXT)):  # new names win
        for p in glob.glob(os.path.join(glob.escape(directory), f"{prefix}*{ext}")):
            job = os.path.basename(p)[len(prefix) : -len(ext)]
            if job == "" or job.startswith(".shard-"):
                found[job] = p
    return sorted(found.values())


def begun(directory: str | None) -> dict | None:
    """The manifest of the sharded output begun at ``directory`` (its header, shards' schema), or None."""
    for path in manifest_paths(directory) if directory and os.path.isdir(directory) else []:
        try:
            return read_manifest(path)
        except Exception:
            continue
    return None


def list_store(directory: str, kind: str | None = None) -> StoreListing:
    """Every finished shard of every job's manifest in ``directory`` (headers must agree)."""
    if not os.path.isdir(directory):
        raise ImgsentError(f"{directory} is not a directory (expected an imgsent store)")
    paths = manifest_paths(directory)
    if not paths:
        raise ImgsentError(f"{directory} has no _manifest.parquet: not an imgsent store (or nothing finished yet)")
    manifests = [read_manifest(p) for p in paths]
    first = manifests[0]
    for p, m in zip(paths[1:], manifests[1:]):
        if m["kind"] != first["kind"] or m["header"] != first["header"]:
            raise ImgsentError(f"{p} does not match {paths[0]}: the jobs of this store used different settings")
    if kind is not None and first["kind"] != kind:
        raise ImgsentError(f"{directory} holds {first['kind']}, not {kind}")
    files = []
    for m in manifests:
        for entry in sorted(m["shards"], key=lambda e: e["index"]):
            f = os.path.join(directory, entry["file"])
            if not os.path.isfile(f):
                raise ImgsentError(f"{directory}: shard {entry['file']} is listed but missing")
            files.append(f)
    return StoreListing(
        kind=first["kind"],
        header=first["header"],
        files=files,
        complete=all(bool(m.get("complete")) for m in manifests),
        rows=sum(int(e["rows"]) for m in manifests for e in m["shards"]),
        jobs=sum(1 for m in manifests if m["shards"]),
    )
