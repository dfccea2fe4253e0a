"""Decoding processes without torch: what the torch engine's DataLoader workers do, for the engine
that runs without torch (:mod:`imgsent.ortengine`).

:func:`decoded_batches` hands whole batches to ``workers`` forked processes, a few batches ahead,
and yields them in order. A process that dies (a decoder segfault, an OOM kill) does not end the
run: the batches it may have held are decoded again one image at a time in a process of their own
(:func:`decode_isolated`, which the torch engine uses too), and an image that kills that process as
well becomes an error row. ``workers=0`` decodes here, in the caller's thread.
"""

from __future__ import annotations

import os
import sys
from collections import deque
from collections.abc import Callable, Iterator, Sequence

from .decode import DecodedImage
from .inputs import ImageRef

PREFETCH = 4  # batches each decoding process works ahead


def default_workers(cuda: bool = False, cores: int | None = None) -> int:
    """Decoding processes: one per core beyond the first (the main process runs the models); on a
    CPU at most 8 (the models need the cores too), on a GPU host every core but one (decoding is
    what feeds the card). ``cores``: the cores the engine may use (default: this process's)."""
    cores = available_cores() if cores is None else cores
    cap = 64 if cuda else 8
    return max(1, min(cap, cores - 1)) if cores > 1 else 0


def available_cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _single_threaded() -> None:
    torch = sys.modules.get("torch")  # loaded when the torch engine forked this process
    if torch is not None:
        torch.set_num_threads(1)


def _serially(decode: Callable[[int], DecodedImage], indices: list[int], conn) -> None:
    _single_threaded()
    for i in indices:
        conn.send(decode(i))
    conn.close()


def decode_isolated(
    decode: Callable[[int], DecodedImage], refs: Sequence[ImageRef], indices: list[int]
) -> list[DecodedImage]:
    """``decode(i)`` for each of ``indices``, one by one in a forked process; an image during which
    that process dies is reported as an error (``refs[i]`` names it) and a process restarted for
    the rest."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    results: list[DecodedImage] = []
    todo = list(indices)
    while todo:
        recv, send = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_serially, args=(decode, todo, send), daemon=True)
        proc.start()
        send.close()
        got = 0
        try:
            while got < len(todo):
                results.append(recv.recv())
                got += 1
        except EOFError:
            proc.join()
            reason = f"the decoding process died on this image twice (exit code {proc.exitcode})"
            results.append(DecodedImage.failed(refs[todo[got]], reason))
            got += 1
        finally:
            recv.close()
            proc.join(timeout=5)
        todo = todo[got:]
    return results


_job: Callable | None = None  # the decode function of the pool's processes (set before they fork)


def _decode_batch(indices: list[int]) -> list[DecodedImage]:
    return _job(indices)


def decoded_batches(
    decode_batch: Callable[[list[int]], list[DecodedImage]],
    decode_one: Callable[[int], DecodedImage],
    refs: Sequence[ImageRef],
    batches: list[list[int]],
    workers: int,
    prefetch: int = PREFETCH,
) -> Iterator[list[DecodedImage]]:
    """``decode_batch(indices)`` of each of ``batches``, in order, in ``workers`` processes (see the
    module docstring); ``decode_one(i)`` decodes one image where a process died."""
    if workers <= 0:
        yield from map(decode_batch, batches)
        return
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    global _job
    _job = decode_batch  # the forked processes inherit it
    done = 0
    while done < len(batches):
        pool = ProcessPoolExecutor(workers, mp_context=mp.get_context("fork"), initializer=_single_threaded)
        pending: deque = deque()
        todo = iter(range(done, len(batches)))
        try:
            for k in todo:
                pending.append(pool.submit(_decode_batch, batches[k]))
                if len(pending) >= workers * prefetch:
                    break
            while pending:
                items = pending.popleft().result()
                done += 1
                yield items
                nxt = next(todo, None)
                if nxt is not None:
                    pending.append(pool.submit(_decode_batch, batches[nxt]))
        except BrokenProcessPool:
            # a decoding process died: the batches it may have held, image by image, each in a process
            in_flight = batches[done : done + len(pending) + 1]
            pool.shutdown(wait=False, cancel_futures=True)
            for indices in in_flight:
                done += 1
                yield decode_isolated(decode_one, refs, indices)
            continue
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        break
