"""Where an image's bytes come from: a file, a member of a tar shard, or a cell of a Parquet column.

An :class:`~imgsent.inputs.ImageRef` with an empty ``source`` is a file at ``path`` (decoded from
there). Otherwise ``source`` says, as a small JSON array, how to read it (found by
:mod:`imgsent.inputs`):

- ``["tar", TAR, OFFSET, SIZE]``: the member's bytes at OFFSET in the (uncompressed) tar file TAR,
  read by offset: nothing is unpacked (WebDataset / img2dataset shards);
- ``["parquet", FILE, COLUMN, ROW_GROUP, INDEX]``: row INDEX of row group ROW_GROUP of FILE,
  column COLUMN holding the image as binary or as a ``{bytes, path}`` struct (Hugging Face);
- ``["url", URL]``: an http(s) URL, downloaded by the decoding process (:func:`fetch_url`:
  pooled connections, connect/read timeouts, bounded retries with backoff on 429 and 5xx, a size
  cap, a user agent naming imgsent; sites that say ``X-Robots-Tag: noai`` are not used). A Parquet
  text cell holding an http(s) URL is downloaded the same way;
- ``["refused", REASON]``: an input the listing saw cannot be read (a tar member that is a link,
  or whose name leaves the archive): its row says REASON.

:func:`read_source` returns the bytes, or raises :class:`~imgsent.decode.DecodeError` with the
reason (the row then says why). Each decoding process keeps the last Parquet row group it read, so
a batch of consecutive rows reads its row group once.
"""

from __future__ import annotations

import json
import os
import threading

from .errors import one_line

MAX_MEMBER_BYTES = 256 * 2**20  # a tar member or Parquet cell larger than this is refused (an error row)

_held: dict[str, tuple] = {}  # per process: the last Parquet row group and Arrow table read, by kind
_held_lock = threading.Lock()  # the threads of read_sources share them


def not_found(path: str) -> str:
    """Why a listed file cannot be opened any more; a relative path says where it was looked for."""
    if os.path.isabs(path) or "://" in path:
        return "file not found (deleted or moved after listing?)"
    return f"file not found: {path} was read relative to the current directory {os.getcwd()} (run from elsewhere?)"


def _cached(kind: str, key: tuple, load):
    """``load()``, unless the last ``kind`` entry loaded in this process had ``key``."""
    with _held_lock:
        held = _held.get(kind)
        if held is not None and held[0] == key:
            return held[1]
        value = load()
        _held[kind] = (key, value)
        return value


def is_remote(path: str) -> bool:
    """A path another filesystem serves (``s3://``, ``gs://``, ``hf://``, ``memory://``...), read
    through fsspec with the backend the user installed (s3fs, gcsfs, huggingface_hub)."""
    scheme, sep, _ = path.partition("://")
    return bool(sep) and scheme.isidentifier() and scheme not in ("http", "https")


def open_binary(path: str):
    """A local file, or a remote one through fsspec (a missing backend: one line saying which)."""
    if not is_remote(path):
        return open(path, "rb")
    fs, inner = remote_fs(path)
    return fs.open(inner, "rb")


def remote_fs(path: str):
    """(fsspec filesystem, path within it) for a remote ``path``."""
    import fsspec

    from .errors import ImgsentError

    try:
        return fsspec.core.url_to_fs(path)
    except ImportError as exc:
        raise ImgsentError(f"reading {path} needs an fsspec backend: {exc}") from None
    except ValueError as exc:
        raise ImgsentError(f"cannot read {path}: {exc}") from None


class SourceError(Exception):
    """The bytes of one input cannot be read: the reason, in one line (becomes an error row)."""


def tar_source(tar: str, offset: int, size: int) -> str:
    return json.dumps(["tar", tar, offset, size])


def parquet_source(path: str, column: str, row_group: int, index: int) -> str:
    return json.dumps(["parquet", path, column, row_group, index])


def url_source(url: str) -> str:
    return json.dumps(["url", url])


def is_url(text: str) -> bool:
    return text.startswith(("http://", "https://"))


def read_sources(sources: list[str], concurrency: int | None = None) -> list[bytes | SourceError | None]:
    """The bytes of many sources at once (URLs downloaded ``concurrency`` at a time: a batch waits
    for its slowest download, not for their sum); None for an empty source (a file, read later),
    a :class:`SourceError` for one that cannot be read."""

    def one(src: str):
        if not src:
            return None
        try:
            return read_source(src)
        except SourceError as exc:
            return exc

    remote = sum(1 for src in sources if src.startswith(('["url"', '["parquet"', '["arrow"')))  # cells may be URLs
    if remote < 2:
        return [one(src) for src in sources]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(min(concurrency or url_settings()["concurrency"], remote)) as pool:
        return list(pool.map(one, sources))


def read_source(source: str) -> bytes:
    """The bytes ``source`` names (see the module docstring)."""
    kind, *args = json.loads(source)
    if kind == "refused":  # found while listing: a tar member that is no file, a name leaving the archive
        raise SourceError(args[0])
    if kind == "tar":
        return _read_tar_member(*args)
    if kind == "parquet":
        return _read_parquet_cell(*args)
    if kind == "url":
        return fetch_url(args[0])
    if kind == "arrow":
        return _read_arrow_cell(*args)
    if kind == "remote":
        return _read_remote_file(args[0])
    raise SourceError(f"unknown source kind {kind!r}")


def remote_source(path: str) -> str:
    return json.dumps(["remote", path])


def arrow_source(path: str, column: str, row: int) -> str:
    return json.dumps(["arrow", path, column, row])


def _read_remote_file(path: str) -> bytes:
    try:
        fs, inner = remote_fs(path)
        size = fs.size(inner)
        if size is not None and size > MAX_MEMBER_BYTES:
            raise SourceError(f"file is {_size_text(size)}, over the {_size_text(MAX_MEMBER_BYTES)} limit")
        return fs.cat_file(inner)
    except SourceError:
        raise
    except FileNotFoundError:
        raise SourceError(not_found(path)) from None
    except Exception as exc:
        raise SourceError(f"cannot read {path}: {type(exc).__name__}: {one_line(exc, 160)}") from None


def read_arrow_table(path: str):
    """An Arrow IPC file (stream or file format, as Hugging Face's ``save_to_disk`` writes),
    memory-mapped when local."""
    import pyarrow as pa

    source = pa.memory_map(path) if not is_remote(path) else pa.BufferReader(open_binary(path).read())
    try:
        return pa.ipc.open_stream(source).read_all()
    except pa.ArrowInvalid:
        source.seek(0)
        return pa.ipc.open_file(source).read_all()


def _read_arrow_cell(path: str, column: str, row: int) -> bytes:
    def load():
        try:
            return read_arrow_table(path)
        except FileNotFoundError:
            raise SourceError(f"Arrow file {path} not found (deleted or moved after listing?)") from None
        except Exception as exc:
            raise SourceError(f"cannot read {path}: {one_line(exc, 160)}") from None

    table = _cached("arrow", (path, _mtime(path)), load)
    if row >= table.num_rows:
        raise SourceError(f"row {row} is gone: {path} changed after listing")
    return _cell_bytes(table.column(column).slice(row, 1).combine_chunks(), 0, column)


def _size_text(n: int) -> str:
    return f"{n / 2**30:.1f} GB" if n >= 2**30 else f"{n / 2**20:.0f} MB"


def _read_tar_member(tar: str, offset: int, size: int) -> bytes:
    if size > MAX_MEMBER_BYTES:
        raise SourceError(f"tar member is {_size_text(size)}, over the {_size_text(MAX_MEMBER_BYTES)} limit")
    try:
        with open_binary(tar) as fh:
            fh.seek(offset)
            data = fh.read(size)
    except FileNotFoundError:
        raise SourceError(f"tar file {tar} not found (deleted or moved after listing?)") from None
    except OSError as exc:
        raise SourceError(f"cannot read tar file {tar}: {exc.strerror or exc}") from None
    if len(data) < size:
        raise SourceError(f"tar member cut short ({len(data)} of {size} bytes): the tar file is truncated")
    return data


def _row_group(path: str, column: str, row_group: int):
    """The column of one row group, as a pyarrow array; the last one read is kept (per process)."""
    import pyarrow.parquet as pq

    def load():
        try:
            with open_binary(path) as fh:
                table = pq.ParquetFile(fh).read_row_group(row_group, columns=[column])
        except FileNotFoundError:
            raise SourceError(f"Parquet file {path} not found (deleted or moved after listing?)") from None
        except Exception as exc:
            reason = one_line(exc, 160)
            raise SourceError(f"cannot read row group {row_group} of {path}: {reason}") from None
        return table.column(0).combine_chunks()

    return _cached("parquet", (path, column, row_group, _mtime(path)), load)


def _mtime(path: str) -> float:
    if is_remote(path):
        return -1.0
    try:
        return os.stat(path).st_mtime
    except OSError:
        return -1.0


def _read_parquet_cell(path: str, column: str, row_group: int, index: int) -> bytes:
    values = _row_group(path, column, row_group)
    if index >= len(values):
        raise SourceError(f"row {index} of row group {row_group} is gone: {path} changed after listing")
    return _cell_bytes(values, index, column)


def _cell_bytes(values, index: int, column: str) -> bytes:
    """An image cell's bytes: binary, a ``{bytes, path}`` struct, or a text http(s) URL (downloaded)."""
    import pyarrow as pa

    cell = values[index]
    if not cell.is_valid:
        raise SourceError(f"the {column!r} value of this row is null")
    if pa.types.is_struct(values.type):  # Hugging Face's Image feature: {bytes, path}
        item = cell.as_py()
        data = item.get("bytes")
        if data is None:
            where = item.get("path")
            raise SourceError(f"the {column!r} struct holds no bytes" + (f", only a path ({where})" if where else ""))
    else:
        data = cell.as_py()
    if isinstance(data, str) and is_url(data.strip()):
        return fetch_url(data.strip())
    if isinstance(data, str):
        raise SourceError(f"the {column!r} value is text, not image bytes nor an http(s) URL ({data[:60]!r})")
    if not isinstance(data, (bytes, bytearray)):
        raise SourceError(f"the {column!r} value is {type(data).__name__}, not image bytes")
    if len(data) > MAX_MEMBER_BYTES:
        raise SourceError(f"the image value is {_size_text(len(data))}, over the {_size_text(MAX_MEMBER_BYTES)} limit")
    return bytes(data)


# --- URLs ------------------------------------------------------------------------------------------

URL_ENV = {  # environment variables that tune downloads, and their defaults
    "concurrency": ("IMGSENT_URL_CONCURRENCY", 32),  # downloads in flight per decoding process
    "connect_timeout": ("IMGSENT_URL_CONNECT_TIMEOUT", 10.0),  # seconds
    "read_timeout": ("IMGSENT_URL_READ_TIMEOUT", 20.0),  # seconds without a byte
    "retries": ("IMGSENT_URL_RETRIES", 3),  # on 429, 5xx and connection errors, with backoff
    "max_bytes": ("IMGSENT_URL_MAX_BYTES", 32 * 2**20),  # a bigger response is refused
}
RETRY_STATUSES = (429, 500, 502, 503, 504)
BACKOFF = 0.5  # seconds, doubled each retry (and Retry-After, up to RETRY_AFTER_MAX, when the server says)
RETRY_AFTER_MAX = 30
MAX_REDIRECTS = 5
OPT_OUT = ("noai", "noimageai")  # X-Robots-Tag directives by which a site says: not for AI use
CHUNK = 64 * 1024


def url_settings() -> dict:
    out = {}
    for name, (env, default) in URL_ENV.items():
        raw = os.environ.get(env)
        try:
            value = type(default)(raw) if raw else default
        except ValueError:
            raise SourceError(f"{env}={raw!r} is not a number") from None
        out[name] = value
    return out


def _pool():
    """One connection pool per process (pools are not shared across fork), made on first use."""
    import urllib3

    from . import __version__

    cfg = url_settings()
    held = getattr(_pool, "held", None)
    if held is not None and held[0] == os.getpid() and held[2] == cfg:  # settings changed: a new pool
        return held[1], held[2]
    retry = urllib3.Retry(
        total=cfg["retries"],
        connect=cfg["retries"],
        read=cfg["retries"],
        status=cfg["retries"],
        redirect=MAX_REDIRECTS,
        status_forcelist=RETRY_STATUSES,
        backoff_factor=BACKOFF,
        respect_retry_after_header=True,
        retry_after_max=RETRY_AFTER_MAX,
        raise_on_status=False,  # the last answer comes back: its status becomes the row's reason
    )
    pool = urllib3.PoolManager(
        num_pools=64,
        maxsize=cfg["concurrency"],
        retries=retry,
        timeout=urllib3.Timeout(connect=cfg["connect_timeout"], read=cfg["read_timeout"]),
        headers={"User-Agent": f"imgsent/{__version__} (image sentiment research; +https://pypi.org/project/imgsent/)"},
    )
    _pool.held = (os.getpid(), pool, cfg)
    return pool, cfg


def fetch_url(url: str) -> bytes:
    """The body of ``url``, or :class:`SourceError` with the reason: the HTTP status, too many
    redirects, a timeout, a body over the size cap or shorter than its Content-Length, or a site
    that opts out of AI use (``X-Robots-Tag: noai``)."""
    import urllib3

    pool, cfg = _pool()
    try:
        resp = pool.request("GET", url, preload_content=False, redirect=True)
    except urllib3.exceptions.MaxRetryError as exc:
        raise SourceError(_retry_reason(exc.reason, cfg)) from None
    except urllib3.exceptions.HTTPError as exc:
        raise SourceError(_retry_reason(exc, cfg)) from None
    except ValueError as exc:  # a malformed URL
        raise SourceError(f"bad URL: {exc}") from None
    try:
        if resp.status != 200:
            raise SourceError(f"HTTP {resp.status} {resp.reason or ''}".strip())
        robots = ",".join(resp.headers.getlist("X-Robots-Tag")).lower().replace(" ", "")
        said = [d for d in OPT_OUT if d in robots.split(",") or f":{d}" in robots]
        if said:
            raise SourceError(f"the site opts out of AI use (X-Robots-Tag: {said[0]}); not downloaded")
        declared = resp.headers.get("Content-Length")
        cap = cfg["max_bytes"]
        if declared and declared.isdigit() and int(declared) > cap:
            raise SourceError(f"response of {_size_text(int(declared))}, over the {_size_text(cap)} limit")
        body = bytearray()
        try:
            for chunk in resp.stream(CHUNK, decode_content=True):
                body += chunk
                if len(body) > cap:
                    raise SourceError(f"response over the {_size_text(cap)} limit")
        except urllib3.exceptions.ProtocolError as exc:  # the connection ended before Content-Length
            raise SourceError(
                f"the response ended early ({_short(exc)}): {len(body)} of {declared or '?'} bytes"
            ) from None
        except urllib3.exceptions.ReadTimeoutError:
            raise SourceError(f"no data for {cfg['read_timeout']:g} s (read timeout)") from None
        if declared and declared.isdigit() and len(body) < int(declared):
            raise SourceError(f"the response ended early: {len(body)} of {declared} bytes")
        return bytes(body)
    finally:
        resp.release_conn()


def _short(exc: BaseException) -> str:
    return one_line(exc, 120)


def _retry_reason(reason: BaseException | None, cfg: dict) -> str:
    import urllib3

    if isinstance(reason, urllib3.exceptions.ResponseError) and "redirect" in str(reason):
        return f"too many redirects (more than {MAX_REDIRECTS})"
    if isinstance(reason, urllib3.exceptions.ConnectTimeoutError):
        return f"could not connect within {cfg['connect_timeout']:g} s (connect timeout)"
    if isinstance(reason, urllib3.exceptions.ReadTimeoutError):
        return f"no data for {cfg['read_timeout']:g} s (read timeout)"
    if isinstance(reason, urllib3.exceptions.NewConnectionError):
        return f"cannot connect: {_short(reason)}"
    return f"download failed after {cfg['retries']} retries: {_short(reason) if reason else 'unknown error'}"
