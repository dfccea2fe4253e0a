"""Atomic file writes: every file imgsent writes appears whole or not at all, with the umask's mode.

One helper serves shards, manifests, single-file score outputs, model bundles, reports and cached
weights: write to a temporary file beside the target, flush and fsync it, give it the permission
bits a plain ``open()`` would (``mkstemp`` makes 0600 files), then ``os.replace`` it into place.
On any failure the temporary file is removed and the target is left as it was.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from typing import IO

TMP_PREFIX = ".tmp-"  # names readers skip (Hive/Spark convention: '.' and '_' are not data)


def umask_mode() -> int:
    """The permission bits a plain ``open()`` would give a new file under the current umask."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def temp_path(path: str, prefix: str | None = None) -> str:
    """Create an empty temporary file beside ``path`` and return its name (the caller owns it)."""
    directory = os.path.dirname(os.path.abspath(path))
    name = prefix if prefix is not None else f"{TMP_PREFIX}{os.path.basename(path)}."
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=name, suffix=".tmp")
    os.close(fd)
    return tmp


def commit(tmp: str, path: str) -> None:
    """fsync ``tmp``, give it the umask's mode and rename it to ``path`` (atomic on one filesystem)."""
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.chmod(tmp, umask_mode())
    os.replace(tmp, path)


def discard(tmp: str | None) -> None:
    """Remove a temporary file if it is still there."""
    if tmp:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


@contextlib.contextmanager
def atomic_path(path: str, prefix: str | None = None) -> Iterator[str]:
    """``with atomic_path(p) as tmp: write(tmp)``: ``p`` appears when the block ends without error."""
    tmp = temp_path(path, prefix)
    try:
        yield tmp
        commit(tmp, path)
    except BaseException:
        discard(tmp)
        raise


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "wb", **kwargs) -> Iterator[IO]:
    """``with atomic_open(p, "w") as fh``: a file object whose contents replace ``p`` on success."""
    with atomic_path(path) as tmp, open(tmp, mode, **kwargs) as fh:
        yield fh


def write_json_atomic(path: str, obj: dict) -> None:
    with atomic_open(path, "w") as fh:
        json.dump(obj, fh, indent=1, sort_keys=False)


def write_text_atomic(path: str, text: str) -> None:
    with atomic_open(path, "w") as fh:
        fh.write(text)
