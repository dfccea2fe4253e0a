"""Lanes: an ordered ``map`` over batches on several threads, torch single-threaded in each;
:func:`ahead`, one stage of a pipeline run on its own thread ahead of its consumer; and
:class:`behind`, the last stage (a consumer) run on its own thread behind its feeder."""

from __future__ import annotations

import contextlib
import queue
import sys
import threading
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor


def in_lanes(fn: Callable, items: Iterable, lanes: int) -> Iterator:
    """``map(fn, items)``, in order, on ``lanes`` threads at once with torch single-threaded in
    each (the process's thread count is restored afterwards). On a CPU this beats one lane with
    all cores (here +20 % for two convnets on 2 cores, 2x for the scoring head): no thread waits at
    an OpenMP barrier for a core that a decoding process took, and small batches do not scale
    across cores anyway. Torch and Parquet release the GIL. ``lanes=1``: plain, in this thread."""
    if lanes <= 1:
        yield from map(fn, items)
        return
    with torch_threads(1), ThreadPoolExecutor(lanes, thread_name_prefix="imgsent-lane") as pool:
        pending: deque = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= lanes:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


@contextlib.contextmanager
def torch_threads(n: int):
    """torch's intra-op thread count set to ``n`` for the block, then restored (nothing when
    this process has not imported torch: a run on ONNX Runtime alone never loads it)."""
    torch = sys.modules.get("torch")
    if torch is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


_memos = threading.local()


def remembered(name: str, key, compute: Callable, size: int):
    """``compute()``, remembered under ``key`` in this thread's memo ``name`` of at most ``size``
    entries (least recently used first out): what a detector does per image, once for all the
    views that read it on one lane."""
    memo = getattr(_memos, name, None)
    if memo is None:
        memo = OrderedDict()
        setattr(_memos, name, memo)
    found = memo.get(key)
    if found is None:
        found = memo[key] = compute()
        if len(memo) > size:
            memo.popitem(last=False)
    else:
        memo.move_to_end(key)
    return found


def forget(name: str) -> None:
    """Empty this thread's memo ``name`` (see :func:`remembered`)."""
    setattr(_memos, name, None)


_END = object()
JOIN_S = 60.0  # how long a stopped consumer waits for the stage to finish the item in its hands


def ahead(fn: Callable, items: Iterable, depth: int = 2, context: Callable | None = None) -> Iterator:
    """``map(fn, items)``, in order, with ``items`` consumed and ``fn`` run on one thread of its own,
    at most ``depth`` results ahead of the consumer: the two sides of a pipeline overlap (decoding
    the next batch on the GPU while the models run this one). ``context``: a context manager
    factory entered on that thread (a CUDA device and stream). An exception on that thread is
    raised here, where its item would have come; when the consumer stops early (an error, a
    break), the thread stops after the item in its hands and closes ``items``."""
    results: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(entry) -> bool:
        while not stop.is_set():
            try:
                results.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            with context() if context else contextlib.nullcontext():
                for item in items:
                    if stop.is_set() or not put((True, fn(item))):
                        return
        except BaseException as exc:  # handed to the consumer, raised there
            put((False, exc))
        finally:
            getattr(items, "close", lambda: None)()  # a generator's cleanup (decoding processes) runs here
            put(_END)

    thread = threading.Thread(target=produce, name="imgsent-stage", daemon=True)
    thread.start()
    try:
        while True:
            entry = results.get()
            if entry is _END:
                return
            ok, value = entry
            if not ok:
                raise value
            yield value
    finally:
        stop.set()
        with contextlib.suppress(queue.Empty):
            while True:
                results.get_nowait()
        thread.join(JOIN_S)


class Stopped(Exception):
    """Raised inside a :class:`behind` stage's ``consume`` when its feeder left with an error."""


class behind:  # noqa: N801  (used as a context manager, as ``ahead`` is used as an iterator)
    """The other end of a pipeline from :func:`ahead`: ``consume(items)`` runs on one thread of its
    own over the items :meth:`put` here, at most ``depth`` of them waiting (the writing of shards:
    Parquet encoding, fsync and rename, off the thread that feeds the engine and the GPU). An error
    there comes out of the next :meth:`put`, or out of the ``with`` block's end, which waits for
    ``consume`` to finish and keeps what it returned in ``result``. Leaving the block with an error
    stops ``consume`` at its next item (its iterator raises :class:`Stopped`) and waits for it, so
    that what it was writing is cleaned up by its own hands, never under them."""

    def __init__(self, consume: Callable[[Iterator], object], depth: int = 2, name: str = "imgsent-writer"):
        self.items: queue.Queue = queue.Queue(maxsize=depth)
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.result = None
        self.thread = threading.Thread(target=self._run, args=(consume,), name=name, daemon=True)

    def _fed(self) -> Iterator:
        while True:
            if self.stop.is_set():
                raise Stopped("the stage feeding this one stopped")
            try:
                item = self.items.get(timeout=0.1)
            except queue.Empty:
                continue
            if item is _END:
                return
            yield item

    def _run(self, consume: Callable[[Iterator], object]) -> None:
        try:
            self.result = consume(self._fed())
        except BaseException as exc:  # raised on the feeding thread
            self.error = exc

    def put(self, item) -> None:
        while True:
            if self.error is not None:
                raise self.error
            if not self.thread.is_alive():
                raise RuntimeError("the writing stage ended before its input did")
            try:
                self.items.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def __enter__(self) -> behind:
        self.thread.start()
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            while self.thread.is_alive():  # (a stage that returned before the end needs no end)
                try:
                    self.items.put(_END, timeout=0.1)
                    break
                except queue.Full:
                    continue
            self.thread.join()
            if self.error is not None:
                raise self.error
            return
        self.stop.set()
        self.thread.join(JOIN_S)
