"""Finding inputs: turn what the user named (dirs, files, @lists, stdin) into image references.

Every image gets a stable ``id``: the path relative to the directory it was found under (for a
directory input) or the path exactly as given (files, lists, stdin). The order is deterministic
(sorted ids, ties broken by path), so shard boundaries and resume are stable.
"""

from __future__ import annotations

import hashlib
import os
import sys
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import IO

from .errors import ImgsentError, ImgsentWarning

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"})


@dataclass(frozen=True, order=True)
class ImageRef:
    """One input image: ``id`` (stable name used in every output) and ``path`` (where to read it)."""

    id: str
    path: str


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


def walk_directory(root: str, include_hidden: bool = False, id_prefix: str = "") -> Iterator[ImageRef]:
    """Yield image files under ``root`` recursively, following directory symlinks at most once.

    A directory reached twice through symlinks (a loop, or two links to one place) is walked once.
    Every directory is walked, whatever its name (``holiday.jpg/`` too): a directory is never a row.
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
        stack.extend(sorted(subdirs, reverse=True))


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


def _refs_from_listed(paths: Iterable[str]) -> Iterator[ImageRef]:
    for p in paths:
        if os.path.isdir(p):
            yield from walk_directory(p, id_prefix=p.rstrip("/") + "/")
        else:
            yield ImageRef(id=display_path(p), path=p)


def find_images(
    inputs: Sequence[str],
    *,
    null: bool = False,
    include_hidden: bool = False,
    stdin: IO[bytes] | None = None,
) -> list[ImageRef]:
    """Resolve user inputs into a sorted, de-duplicated list of :class:`ImageRef`.

    ``inputs`` items: a directory (walked), an image file, ``@list.txt`` (one path per line, or
    NUL-separated with ``null``), or ``-`` (the same from stdin). A path named in ``inputs`` that
    does not exist, and a missing ``@list`` file, are mistakes: :class:`ImgsentError`. Paths read
    from a list or stdin that do not exist are kept: they become error rows downstream (a file can
    vanish between listing and reading). A directory with no image under it gives an
    :class:`~imgsent.errors.ImgsentWarning`, as ``find`` gives no output: not an error.
    """
    if not inputs:
        raise ImgsentError("no input given: name a directory, image files, @list.txt or - for stdin")
    refs: list[ImageRef] = []
    for item in inputs:
        if item == "-":
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
            found = list(walk_directory(item, include_hidden=include_hidden, id_prefix=prefix))
            if not found:
                warnings.warn(
                    f"no image files under {display_path(item)} (extensions: {', '.join(sorted(IMAGE_EXTENSIONS))})",
                    ImgsentWarning,
                    stacklevel=2,
                )
            refs.extend(found)
        elif not os.path.lexists(item):
            raise ImgsentError(f"input {display_path(item)!r} does not exist (no such file or directory)")
        else:
            refs.append(ImageRef(id=display_path(item), path=item))
    return sorted(set(refs))


def shard_of(image_id: str, count: int) -> int:
    """Stable shard number of an id: the same on every machine and Python run."""
    digest = hashlib.blake2b(image_id.encode("utf-8", errors="surrogateescape"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % count


def select_shard(refs: Sequence[ImageRef], shard: tuple[int, int] | None) -> list[ImageRef]:
    if shard is None:
        return list(refs)
    index, count = shard
    return [r for r in refs if shard_of(r.id, count) == index]
