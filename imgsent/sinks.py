"""Where score rows go when they are not shards: one file (Parquet, CSV, TSV, JSON Lines), written
atomically, or a stream on stdout."""

from __future__ import annotations

import errno
import json
import os
import sys

import pyarrow as pa

from .atomicio import commit, discard, temp_path
from .errors import ImgsentError, OutputClosed
from .options import OUTPUT_FORMATS as FORMATS

SCORES_KIND = "scores"  # the kind of a directory of score shards (feature stores are "features")
EXTENSIONS = {
    ".parquet": "parquet",
    ".pq": "parquet",
    ".csv": "csv",
    ".tsv": "tsv",
    ".tab": "tsv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
}
METADATA_KEY = b"imgsent"  # Parquet file metadata: provenance as JSON
WRITING: set[str] = set()  # single-file outputs begun and not completed in this process (for the CLI's Ctrl-C line)


def format_of(out: str, fmt: str | None) -> str:
    """The output format: ``fmt`` if given, else from ``out``'s extension (jsonl on stdout)."""
    if fmt is not None:
        if fmt not in FORMATS:
            raise ImgsentError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
        return fmt
    if out == "-":
        return "jsonl"
    ext = os.path.splitext(out)[1].lower()
    if ext not in EXTENSIONS:
        raise ImgsentError(
            f"cannot tell the output format of {out!r} from its extension; use one of "
            f"{', '.join(sorted(EXTENSIONS))}, give the format (--format {'|'.join(FORMATS)}), "
            f"or end the name with / for a directory of shards"
        )
    return EXTENSIONS[ext]


def is_dir_output(out: str) -> bool:
    return out.endswith(("/", os.sep)) or os.path.isdir(out)


def made_by(out: str, fmt: str) -> dict | None:
    """What an existing output file says made it: a Parquet file's provenance, or the ``model`` and
    ``model_version`` of a CSV/TSV/JSON Lines file's first row; None when it is no imgsent output."""
    try:
        if fmt == "parquet":
            import pyarrow.parquet as pq

            meta = pq.read_schema(out).metadata or {}
            return json.loads(meta[METADATA_KEY]) if METADATA_KEY in meta else None
        with open(out, encoding="utf-8", newline="") as fh:
            if fmt == "jsonl":
                row = json.loads(fh.readline() or "null")
            else:
                import csv

                reader = csv.reader(fh, delimiter="\t" if fmt == "tsv" else ",")
                header, first = next(reader, []), next(reader, [])
                row = dict(zip(header, first))
    except Exception:  # unreadable, not UTF-8, not JSON, or (pyarrow's own errors) not Parquet
        return None
    if not isinstance(row, dict) or "model" not in row:
        return None
    return {"model": row.get("model"), "model_version": row.get("model_version")}


def check_replace(out: str, fmt: str, made: dict, overwrite: bool) -> None:
    """An existing output file is replaced by the same command (same model and version, same
    threshold), or with ``overwrite``; a file of another model, or not made by imgsent, is kept and
    the run refused with one line saying what differs."""
    if out == "-" or overwrite or not os.path.exists(out):
        return
    if os.path.isdir(out):
        return  # a directory output: the shard writer checks it
    old = made_by(out, fmt)
    if old is None:
        raise ImgsentError(f"{out} exists and is not a score file of imgsent; pass --overwrite to replace it")
    differs = [k for k in ("model", "model_version", "threshold") if k in old and old.get(k) != made.get(k)]
    if differs:
        said = ", ".join(f"{k} {old.get(k)!r} (this run: {made.get(k)!r})" for k in differs)
        raise ImgsentError(f"{out} holds scores made otherwise: {said}; pass --overwrite to replace it")


class FileSink:
    """One output file, written to a temporary name and renamed on success (mode from the umask);
    or stdout (``-``). ``metadata`` (Parquet only) is stored as the file's key-value metadata."""

    def __init__(self, out: str, fmt: str, metadata: dict | None = None):
        if fmt == "parquet" and out == "-":
            raise ImgsentError("a stream on stdout (out='-') is jsonl, csv or tsv, not parquet")
        self.out, self.fmt = out, fmt
        self.metadata = metadata or {}
        self._pq = None
        self._header_done = False
        self._tmp: str | None = None
        if out == "-":
            self._fh = sys.stdout.buffer
        else:
            directory = os.path.dirname(os.path.abspath(out))
            if not os.path.isdir(directory):
                raise ImgsentError(f"output directory {directory} does not exist")
            try:
                self._tmp = temp_path(out)
                self._fh = open(self._tmp, "wb")  # noqa: SIM115 (closed in close())
                WRITING.add(out)
            except OSError as exc:
                discard(self._tmp)
                raise ImgsentError(f"cannot write to {directory}: {exc.strerror}") from None

    def write(self, table: pa.Table) -> None:
        try:
            self._write(table)
        except OSError as exc:
            if exc.errno == errno.EPIPE or "Broken pipe" in str(exc):
                raise OutputClosed() from None
            raise ImgsentError(f"cannot write {self.out}: {exc.strerror or exc}") from None

    def _write(self, table: pa.Table) -> None:
        if self.fmt == "parquet":
            import pyarrow.parquet as pq

            if self._pq is None:
                schema = table.schema
                if self.metadata:
                    schema = schema.with_metadata({METADATA_KEY: json.dumps(self.metadata).encode()})
                self._pq = pq.ParquetWriter(self._fh, schema, compression="zstd")
            self._pq.write_table(table)
        elif self.fmt in ("csv", "tsv"):
            import pyarrow.csv as pacsv

            opts = pacsv.WriteOptions(
                include_header=not self._header_done, delimiter="\t" if self.fmt == "tsv" else ","
            )
            pacsv.write_csv(table, self._fh, opts)
            self._header_done = True
        else:
            import polars as pl

            pl.from_arrow(table).write_ndjson(self._fh)
        if self._tmp is None:
            self._fh.flush()

    def close(self, ok: bool = True) -> None:
        """Finish: on success the file appears under its name; otherwise nothing is left."""
        try:
            if self._pq is not None:
                self._pq.close()
        except OSError:
            ok = False
        if self._tmp is None:
            try:
                self._fh.flush()
            except OSError:
                pass  # a closed pipe: nothing left to say
            return
        self._fh.close()
        if ok:
            WRITING.discard(self.out)  # left there otherwise: the CLI's interrupted line names it
            try:
                commit(self._tmp, self.out)
            except OSError as exc:
                discard(self._tmp)
                raise ImgsentError(f"cannot write {self.out}: {exc.strerror or exc}") from None
        else:
            discard(self._tmp)
