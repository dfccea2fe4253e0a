"""Finding inputs: turn what the user named (dirs, files, @lists, stdin) into image references.

Every image gets a stable ``id``: the path relative to the directory it was found under (for a
directory input) or the path exactly as given (files, lists, stdin). The order is deterministic
(sorted ids, ties broken by path), so shard boundaries and resume are stable.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING

from .errors import ImgsentError, ImgsentWarning, one_line

if TYPE_CHECKING:
    from .options import RunOptions

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"})
TAR_EXTENSION = ".tar"  # WebDataset / img2dataset shards: read member by member, by offset
PARQUET_EXTENSION = ".parquet"  # image bytes in a column (--image-column)
ARROW_EXTENSION = ".arrow"  # the same in an Arrow IPC file (Hugging Face's save_to_disk)
TABLE_EXTENSIONS = (PARQUET_EXTENSION, ARROW_EXTENSION)
URL_PREFIXES = ("http://", "https://")  # downloaded by the decoding processes (imgsent.sources)


@dataclass(frozen=True, order=True)
class ImageRef:
    """One input image: ``id`` (stable name used in every output), ``path`` (where it is, as the
    outputs show it) and ``source`` (how to read it when it is not the file ``path``: a tar member
    or a Parquet cell, see :mod:`imgsent.sources`)."""

    id: str
    path: str
    source: str = ""
    meta: str = ""  # fields kept for the outputs (--keep-columns), as a JSON object; "" = none


def display_path(path: str) -> str:
    """A path as valid UTF-8 text: bytes that are not UTF-8 (kept by Python as surrogate escapes)
    are written as backslash escapes, so ids and path columns always store and print."""
    try:
        path.encode("utf-8")
        return path
    except UnicodeEncodeError:
        return path.encode("utf-8", errors="surrogateescape").decode("utf-8", errors="backslashreplace")


def is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def walk_directory(
    root: str, include_hidden: bool = False, id_prefix: str = "", keep: Sequence[str] = ()
) -> Iterator[ImageRef]:
    """Yield image files under ``root`` recursively, following directory symlinks at most once.

    A directory reached twice through symlinks (a loop, or two links to one place) is walked once.
    Every directory is walked, whatever its name (``holiday.jpg/`` too): a directory is never a row.
    A ``.tar`` file met on the way is a shard: its image members are yielded (:func:`tar_members`).
    Other entries whose extension looks like an image are yielded even if they turn out not to be
    images (dangling links, FIFOs, text): the decoder reports them as error rows, so nothing named
    like an image disappears silently.
    """
    seen: set[tuple[int, int]] = set()
    stack = [root]
    while stack:
        current = stack.pop()
        try:
            st = os.stat(current)
        except OSError:
            continue
        key = (st.st_dev, st.st_ino)
        if key in seen:
            continue
        seen.add(key)
        try:
            entries = list(os.scandir(current))
        except OSError:
            continue
        subdirs = []
        for entry in entries:
            if not include_hidden and _is_hidden(entry.name):
                continue
            try:
                is_dir = entry.is_dir(follow_symlinks=True)
            except OSError:
                is_dir = False
            if is_dir:
                subdirs.append(entry.path)
            elif is_image_name(entry.name):
                rel = os.path.relpath(entry.path, root)
                yield ImageRef(id=display_path(id_prefix + rel.replace(os.sep, "/")), path=entry.path)
            elif entry.name.lower().endswith(TAR_EXTENSION):
                yield from tar_members(entry.path, id_prefix + _tar_label(entry.path, root), keep)
        stack.extend(sorted(subdirs, reverse=True))


def _tar_label(path: str, root: str | None) -> str:
    """A tar shard's part of its members' ids: its path relative to the walked directory (or as
    given), without ``.tar``."""
    rel = os.path.relpath(path, root) if root else path
    return display_path(rel[: -len(TAR_EXTENSION)].replace(os.sep, "/"))


def tar_members(path: str, label: str, keep: Sequence[str] = ()) -> Iterator[ImageRef]:
    """One reference per image member of the tar shard ``path`` (by extension, as files are), id
    ``LABEL/KEY`` (the member's name without its extension, as WebDataset keys samples), read later
    by offset (:mod:`imgsent.sources`). Members that cannot be images are rows with their reason,
    never skipped silently nor read: a name leaving the archive (``../x.jpg``, ``/etc/x.jpg``), a
    link or device. A second member with the same key gets ``#2`` (then ``#3``...). A tar cut short
    keeps the members before the cut (the one cut becomes an error row when read); a file that is
    not a tar at all is one error row. ``keep``: fields of each sample's ``KEY.json`` (and ``txt``
    for ``KEY.txt``) to carry into ``meta`` (``*``: all of them)."""
    fields: dict[str, dict] | None = {} if keep else None
    found = list(_tar_members(path, label, fields, keep))  # one pass: image members, and the fields kept
    for key, ref in found:
        yield ImageRef(ref.id, ref.path, ref.source, json.dumps(fields.get(key, {}))) if keep else ref


def _sample_fields(tar, member, ext: str, keep: Sequence[str]) -> dict:
    """The fields of a ``KEY.json`` (or ``txt`` of a ``KEY.txt``) member that ``keep`` names."""
    if not member.isreg() or member.size > 1 << 20:
        return {}
    raw = tar.extractfile(member).read().decode("utf-8", errors="replace")
    if ext == ".txt":
        fields = {"txt": raw}
    else:
        try:
            fields = json.loads(raw)
        except ValueError:
            return {}
    if not isinstance(fields, dict):
        return {}
    return {k: v for k, v in fields.items() if "*" in keep or k in keep}


def _tar_members(
    path: str, label: str, fields: dict[str, dict] | None = None, keep: Sequence[str] = ()
) -> Iterator[tuple[str, ImageRef]]:
    """(sample key, reference) per image member (see :func:`tar_members`); with ``fields``, the
    ``keep`` fields of each sample's ``KEY.json`` / ``KEY.txt`` are gathered into it on the way."""
    import tarfile

    from .sources import open_binary, tar_source

    seen: dict[str, int] = {}
    try:
        with open_binary(path) as fh, tarfile.open(fileobj=fh, mode="r:") as tar:
            while True:
                try:
                    member = tar.next()
                except tarfile.ReadError as exc:  # a damaged or truncated header: the rest is unreadable
                    warnings.warn(
                        f"{display_path(path)} ends early or has a damaged header ({exc}): read up to there",
                        ImgsentWarning,
                        stacklevel=4,
                    )
                    return
                if member is None:
                    return
                name = member.name
                while name.startswith("./"):  # tar -C DIR . writes ./a.jpg
                    name = name[2:]
                if not is_image_name(name):
                    stem, ext = os.path.splitext(name)
                    if fields is not None and ext.lower() in (".json", ".txt"):
                        fields.setdefault(display_path(stem), {}).update(_sample_fields(tar, member, ext.lower(), keep))
                    continue
                key = display_path(os.path.splitext(name)[0])
                seen[key] = seen.get(key, 0) + 1
                rid = f"{label}/{key}" + (f"#{seen[key]}" if seen[key] > 1 else "")
                where = f"{display_path(path)}/{display_path(name)}"
                parts = name.replace("\\", "/").split("/")
                if name.startswith("/") or ".." in parts:
                    source = json.dumps(["refused", f"tar member name {name!r} leaves the archive"])
                elif not member.isreg():
                    kind = "a link" if member.issym() or member.islnk() else "a device or special file"
                    source = json.dumps(["refused", f"tar member is {kind}, not a file"])
                else:
                    source = tar_source(_location(path), member.offset_data, member.size)
                yield key, ImageRef(rid, where, source)
    except (tarfile.ReadError, EOFError, OSError) as exc:
        if not seen:
            reason = f"not a readable uncompressed tar file ({one_line(exc, 120)})"
            yield "", ImageRef(f"{label}/", display_path(path), json.dumps(["refused", reason]))


def parquet_rows(
    path: str, label: str | None, image_column: str, id_column: str | None, keep: Sequence[str] = ()
) -> Iterator[ImageRef]:
    """One reference per row of the Parquet file ``path``: the image in ``image_column`` (binary,
    or a ``{bytes, path}`` struct), id from ``id_column`` (default: the row number in the file),
    prefixed ``LABEL/`` when several files are read. A column missing, or of a type that cannot hold
    image bytes, is a mistake: one :class:`~imgsent.errors.ImgsentError` line."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from .sources import arrow_source, open_binary, parquet_source, read_arrow_table

    arrow = path.lower().endswith(ARROW_EXTENSION)
    try:
        if arrow:
            table = read_arrow_table(path)
            schema, groups = table.schema, [table.num_rows]
            read = table.select
        else:
            pf = pq.ParquetFile(open_binary(path))
            schema = pf.schema_arrow
            groups = [pf.metadata.row_group(rg).num_rows for rg in range(pf.metadata.num_row_groups)]

            def read(columns):
                return pf.read(columns=columns)
    except ImgsentError:
        raise
    except Exception as exc:
        raise ImgsentError(
            f"cannot read {'Arrow' if arrow else 'Parquet'} file {display_path(path)}: {one_line(exc, 160)}"
        ) from None
    names = schema.names
    if image_column not in names:
        raise ImgsentError(
            f"{display_path(path)} has no column {image_column!r} for --image-column (columns: {', '.join(names[:12])})"
        )
    kind = schema.field(image_column).type
    binary = pa.types.is_binary(kind) or pa.types.is_large_binary(kind) or pa.types.is_string(kind)
    struct = pa.types.is_struct(kind) and kind.get_field_index("bytes") >= 0
    if not (binary or struct or pa.types.is_large_string(kind)):
        raise ImgsentError(
            f"column {image_column!r} of {display_path(path)} is {kind}, not image bytes (binary, or a struct with bytes)"
        )
    if id_column is not None and id_column not in names:
        raise ImgsentError(f"{display_path(path)} has no column {id_column!r} for --id-column")
    ids = read([id_column]).column(0).to_pylist() if id_column else None
    kept = [c for c in names if c != image_column and ("*" in keep or c in keep)]
    missing = [c for c in keep if c != "*" and c not in names]
    if missing:
        raise ImgsentError(f"{display_path(path)} has no column {missing[0]!r} for --keep-columns")
    values = read(kept).to_pylist() if kept else None
    where = _location(path)
    row = 0
    for rg, size in enumerate(groups):
        for index in range(size):
            base = str(row) if ids is None or ids[row] is None else str(ids[row])
            rid = f"{label}/{base}" if label else base
            meta = json.dumps(values[row], default=str) if values is not None else ""
            if arrow:
                source = arrow_source(where, image_column, row)
            else:
                source = parquet_source(where, image_column, rg, index)
            yield ImageRef(display_path(rid), f"{display_path(path)}#{row}", source, meta)
            row += 1


def _location(path: str) -> str:
    """Where a decoding process (here or on another node) reads ``path`` from."""
    from .sources import is_remote

    return path if is_remote(path) else os.path.abspath(path)


def _remote_refs(item: str, keep: Sequence[str], image_column: str | None) -> list[ImageRef]:
    """References for a remote path (``s3://``, ``gs://``, ``hf://``...: fsspec): a folder's image
    files, tar shards (and with ``image_column``, Parquet / Arrow files), or one such file."""
    from .sources import remote_fs, remote_source

    fs, inner = remote_fs(item)
    try:
        if not fs.exists(inner):
            raise ImgsentError(f"input {item!r} does not exist")
        folder = fs.isdir(inner)
        files = sorted(fs.find(inner)) if folder else [inner]
    except ImgsentError:
        raise
    except Exception as exc:
        raise ImgsentError(f"cannot list {item}: {type(exc).__name__}: {one_line(exc, 160)}") from None
    root = inner.rstrip("/") if folder else inner.rsplit("/", 1)[0]
    refs: list[ImageRef] = []
    for f in files:
        url = fs.unstrip_protocol(f)
        rel = f[len(root) :].lstrip("/") if f.startswith(root) else f
        low = f.lower()
        if image_column is not None:
            if low.endswith(TABLE_EXTENSIONS):
                label = rel.rsplit(".", 1)[0] if folder else None
                refs.extend(parquet_rows(url, label, image_column, None, keep))
        elif is_image_name(f):
            refs.append(ImageRef(id=rel, path=url, source=remote_source(url)))
        elif low.endswith(TAR_EXTENSION):
            refs.extend(tar_members(url, rel[: -len(TAR_EXTENSION)], keep))
    return refs


def expand_braces(item: str) -> list[str]:
    """``shards/{00000..00099}.tar`` -> the 100 names (zero padding kept), ``{a,b}`` -> both; as a
    shell does, for inputs given quoted (or from a list). Nested braces expand left to right."""
    import re

    m = re.search(r"\{([^{}]*)\}", item)
    if m is None:
        return [item]
    body, head, tail = m.group(1), item[: m.start()], item[m.end() :]
    rng = re.fullmatch(r"(-?\d+)\.\.(-?\d+)", body)
    if rng:
        a, b = rng.group(1), rng.group(2)
        width = len(a) if a.startswith("0") or b.startswith("0") else 0
        lo, hi = int(a), int(b)
        step = 1 if hi >= lo else -1
        options = [str(k).zfill(width) for k in range(lo, hi + step, step)]
    elif "," in body:
        options = body.split(",")
    else:
        return [item]
    return [out for o in options for out in expand_braces(head + o + tail)]


def _read_list(stream: IO[str] | IO[bytes], null: bool) -> Iterator[str]:
    data = stream.read()
    if isinstance(data, bytes):
        data = data.decode("utf-8", errors="surrogateescape")
    parts = data.split("\0") if null else data.splitlines()
    for part in parts:
        if null:
            if part:
                yield part
        else:
            part = part.strip()
            if part and not part.startswith("#"):
                yield part


def _is_remote(path: str) -> bool:
    from .sources import is_remote

    return is_remote(path)


def _url_ref(url: str) -> ImageRef:
    from .sources import url_source

    return ImageRef(id=url, path=url, source=url_source(url))


def _refs_from_listed(paths: Iterable[str]) -> Iterator[ImageRef]:
    for p in paths:
        if p.startswith(URL_PREFIXES):
            yield _url_ref(p)
        elif os.path.isdir(p):
            yield from walk_directory(p, id_prefix=p.rstrip("/") + "/")
        elif p.lower().endswith(TAR_EXTENSION) and os.path.isfile(p):
            yield from tar_members(p, _tar_label(p, None))
        else:
            yield ImageRef(id=display_path(p), path=p)


def _parquet_files(item: str, include_hidden: bool) -> list[str]:
    """``item`` itself, or the Parquet files under the directory ``item`` (a dataset), sorted."""
    if not os.path.isdir(item):
        return [item]
    found = []
    for base, dirs, files in os.walk(item):
        dirs[:] = sorted(d for d in dirs if include_hidden or not _is_hidden(d))
        found += [os.path.join(base, f) for f in files if f.lower().endswith(TABLE_EXTENSIONS) and not _is_hidden(f)]
    return sorted(found)


def find_images(
    inputs: Sequence[str],
    *,
    null: bool = False,
    include_hidden: bool = False,
    stdin: IO[bytes] | None = None,
    image_column: str | None = None,
    id_column: str | None = None,
    keep_columns: Sequence[str] = (),
) -> list[ImageRef]:
    """Resolve user inputs into a sorted, de-duplicated list of :class:`ImageRef`.

    ``inputs`` items: a directory (walked; tar shards in it read member by member), an image file,
    a ``.tar`` shard (:func:`tar_members`), ``@list.txt`` (one path per line, or NUL-separated with
    ``null``), or ``-`` (the same from stdin); a name that does not exist is brace-expanded first
    (``shards/{00000..00099}.tar``). With ``image_column``: Parquet files or folders of them, one
    reference per row (:func:`parquet_rows`), in file order. A path named in ``inputs`` that
    does not exist, and a missing ``@list`` file, are mistakes: :class:`ImgsentError`. Paths read
    from a list or stdin that do not exist are kept: they become error rows downstream (a file can
    vanish between listing and reading). A directory with no image under it gives an
    :class:`~imgsent.errors.ImgsentWarning`, as ``find`` gives no output: not an error.
    """
    if not inputs:
        raise ImgsentError("no input given: name a directory, image files, @list.txt or - for stdin")
    keep = tuple(keep_columns)
    if image_column is not None:
        return _find_parquet_rows(inputs, image_column, id_column, include_hidden, keep)
    if id_column is not None:
        raise ImgsentError("--id-column names the id column of Parquet inputs: give --image-column too")
    refs: list[ImageRef] = []
    expanded = [e for item in inputs for e in (expand_braces(item) if not os.path.lexists(item) else [item])]
    for item in expanded:
        if item.startswith(URL_PREFIXES):
            refs.append(_url_ref(item))
        elif _is_remote(item):
            refs.extend(_remote_refs(item, keep, None))
        elif item == "-":
            stream = stdin if stdin is not None else sys.stdin.buffer
            refs.extend(_refs_from_listed(_read_list(stream, null)))
        elif item.startswith("@") and len(item) > 1:
            try:
                with open(item[1:], "rb") as fh:
                    refs.extend(_refs_from_listed(_read_list(fh, null)))
            except OSError as exc:
                raise ImgsentError(f"cannot read input list {item[1:]!r}: {exc.strerror}") from None
        elif os.path.isdir(item):
            # One directory: ids are relative to it. Several inputs: ids keep the directory as
            # given, so two folders holding "a.jpg" never collide.
            prefix = "" if len(inputs) == 1 else item.rstrip("/") + "/"
            found = list(walk_directory(item, include_hidden=include_hidden, id_prefix=prefix, keep=keep))
            if not found:
                warnings.warn(
                    f"no image files under {display_path(item)} (extensions: {', '.join(sorted(IMAGE_EXTENSIONS))})",
                    ImgsentWarning,
                    stacklevel=2,
                )
            refs.extend(found)
        elif not os.path.lexists(item):
            raise ImgsentError(f"input {display_path(item)!r} does not exist (no such file or directory)")
        elif item.lower().endswith(TAR_EXTENSION) and os.path.isfile(item):
            label = _tar_label(os.path.basename(item), None) if len(expanded) == 1 else _tar_label(item, None)
            refs.extend(tar_members(item, label, keep))
        elif item.lower().endswith(TABLE_EXTENSIONS):
            raise ImgsentError(
                f"{display_path(item)} is a Parquet / Arrow file: give --image-column NAME, the column holding the "
                f"images"
            )
        else:
            refs.append(ImageRef(id=display_path(item), path=item))
    return sorted(set(refs))


def _find_parquet_rows(
    inputs: Sequence[str], image_column: str, id_column: str | None, include_hidden: bool, keep: Sequence[str]
) -> list[ImageRef]:
    files, refs = [], []
    for item in inputs:
        for name in expand_braces(item) if not os.path.lexists(item) else [item]:
            if _is_remote(name):
                refs.extend(_remote_refs(name, keep, image_column))
                continue
            if not os.path.exists(name):
                raise ImgsentError(f"input {display_path(name)!r} does not exist (no such file or directory)")
            files += _parquet_files(name, include_hidden)
    if not files and not refs:
        raise ImgsentError(
            f"no Parquet or Arrow file under {', '.join(map(display_path, inputs))} (--image-column reads them)"
        )
    several = len(files) > 1
    common = os.path.commonpath([os.path.abspath(f) for f in files]) if several else None
    for f in files:
        label = None
        if several:
            rel = os.path.relpath(os.path.abspath(f), common if os.path.isdir(common) else os.path.dirname(common))
            label = os.path.splitext(rel)[0].replace(os.sep, "/")
        refs.extend(parquet_rows(f, label, image_column, id_column, keep))
    ids = [r.id for r in refs]
    if len(set(ids)) != len(ids):
        dup = next(i for i, n in Counter(ids).items() if n > 1)
        raise ImgsentError(f"--id-column {id_column!r} repeats the id {dup!r}: ids must be unique")
    return refs  # in file order (files sorted, rows as stored): a batch reads one row group


def shard_of(image_id: str, count: int) -> int:
    """Stable shard number of an id: the same on every machine and Python run."""
    digest = hashlib.blake2b(image_id.encode("utf-8", errors="surrogateescape"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % count


def select_shard(refs: Sequence[ImageRef], shard: tuple[int, int] | None) -> list[ImageRef]:
    if shard is None:
        return list(refs)
    index, count = shard
    return [r for r in refs if shard_of(r.id, count) == index]


def resolve_inputs(inputs: Sequence[str], options: RunOptions, *, stdin=None) -> list[ImageRef]:
    """The job's image references: everything ``inputs`` names (as ``options`` says to read it),
    then this job's ``options.shard``."""
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
