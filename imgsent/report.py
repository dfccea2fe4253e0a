"""Progress and run summaries, on stderr only (stdout may carry data).

On a terminal: a rich progress bar. Otherwise (Slurm, nohup, ``2> log``): a plain line every
``IMGSENT_PROGRESS_EVERY`` seconds (default 30) with done/total, images/s, errors and ETA, and no
control codes.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from dataclasses import asdict, dataclass, field

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

stderr_console = Console(stderr=True, width=None if sys.stderr.isatty() else 160)  # resolves sys.stderr when writing


@dataclass
class RunSummary:
    """What a run did: counts, time and rate (``resumed`` rows were already done by an earlier run)."""

    output: str
    total: int = 0
    ok: int = 0
    errors: int = 0
    resumed: int = 0
    elapsed_s: float = 0.0
    labels: dict[str, int] = field(default_factory=dict)
    details: dict[str, str] = field(default_factory=dict)  # model, weights... (printed as is)
    first_error: str | None = None  # the first error row's reason this run met (None: none, or resumed ones only)

    @property
    def images_per_s(self) -> float:
        done = self.total - self.resumed
        return done / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["images_per_s"] = round(self.images_per_s, 2)
        return d

    def print(self, title: str) -> None:
        t = Table(title=title, show_header=False, title_justify="left")
        t.add_column()
        t.add_column(max_width=SUMMARY_WIDTH, overflow="fold")  # long weight paths wrap, not the whole log line
        t.add_row("output", self.output)
        for k, v in self.details.items():
            t.add_row(k, v)
        t.add_row("images", str(self.total))
        t.add_row("ok", str(self.ok))
        t.add_row("errors", f"[red]{self.errors}[/red]" if self.errors else "0")
        if self.resumed:
            t.add_row("resumed (already done)", str(self.resumed))
        for label, n in sorted(self.labels.items()):
            t.add_row(f"label {label}", str(n))
        t.add_row("elapsed", f"{self.elapsed_s:.1f} s")
        t.add_row("rate", f"{self.images_per_s:.1f} images/s")
        stderr_console.print(t)


SUMMARY_WIDTH = 76  # the value column of a run summary, in characters (the table stays within 100)
PROGRESS_ENV = "IMGSENT_PROGRESS_EVERY"
DEFAULT_PROGRESS_EVERY = 30.0


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def progress_interval() -> float:
    """Seconds between plain progress lines: ``$IMGSENT_PROGRESS_EVERY``, else 30."""
    try:
        return max(0.0, float(os.environ.get(PROGRESS_ENV, DEFAULT_PROGRESS_EVERY)))
    except ValueError:
        return DEFAULT_PROGRESS_EVERY


class _Ticker:
    """Prints ``line()`` on stderr every ``every`` seconds from a thread of its own, until stopped
    (plain progress lines in logs: they come on time however long the work between them takes)."""

    def __init__(self, line, every: float):
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(line, every), name="imgsent-progress", daemon=True)
        self._thread.start()

    def _run(self, line, every: float) -> None:
        while not self._stop.wait(every):
            print(line(), file=sys.stderr, flush=True)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


class _ErrorsColumn(ProgressColumn):
    """ "N errors", red only when N > 0."""

    def render(self, task) -> Text:
        n = task.fields.get("errors", 0)
        return Text(f"{n} errors", style="red" if n else "dim")


class RunProgress:
    """Progress of a run with images/s, ETA and an error count, on stderr: a rich bar on a
    terminal, plain lines every :func:`progress_interval` seconds otherwise (from a timer, so they
    come on time however long a batch takes; with an interval of 0, after every batch), after a
    first line saying what started (``detail``: what runs over the images); silent when
    ``enabled`` is False."""

    def __init__(self, total: int, description: str, enabled: bool = True, plain: bool | None = None, detail: str = ""):
        self.enabled = enabled
        self.detail = detail  # what runs over the images (backbones), for the first line
        self.errors = 0
        self.total, self.description = total, description
        self.start = time.perf_counter()
        self.done = self.skipped = 0
        self._progress = None
        self._plain = enabled and (not sys.stderr.isatty() if plain is None else plain)
        self._every = progress_interval()
        self._ticker: _Ticker | None = None
        if enabled and not self._plain:
            self._progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[rate]:.1f} img/s"),
                _ErrorsColumn(),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=stderr_console,
                transient=False,
            )
            self._task = self._progress.add_task(description, total=total, rate=0.0, errors=0)

    def __enter__(self) -> RunProgress:
        if self._progress is not None:
            self._progress.start()
        if self._plain:  # a log: say at once what started, before the first batch comes back
            what = f"; {self.detail}" if self.detail else ""
            print(f"{self.description}: started on {self.total} images{what}", file=sys.stderr, flush=True)
        if self._plain and self._every > 0:
            self._ticker = _Ticker(self.line, self._every)
        return self

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.stop()
        if self._ticker is not None:
            self._ticker.stop()

    def advance(self, n: int, errors: int = 0, resumed: bool = False) -> None:
        """``n`` more rows done (``resumed``: done by an earlier run, not counted in the rate)."""
        self.errors += errors
        self.done += n
        self.skipped += n if resumed else 0
        if self._plain and self._every == 0:
            print(self.line(), file=sys.stderr, flush=True)
        if self._progress is not None:
            task = self._progress.tasks[0]
            done = task.completed + n
            rate = done / max(time.perf_counter() - self.start, 1e-9)
            self._progress.update(self._task, advance=n, rate=rate, errors=self.errors)

    def line(self, now: float | None = None) -> str:
        """One plain progress line: done/total, images/s (this run's), errors, ETA."""
        elapsed = max((now or time.perf_counter()) - self.start, 1e-9)
        rate = (self.done - self.skipped) / elapsed
        left = self.total - self.done
        eta = _duration(left / rate) if rate > 0 else "unknown"
        share = 100 * self.done / self.total if self.total else 100.0
        return (
            f"{self.description}: {self.done}/{self.total} ({share:.1f}%), {rate:.1f} images/s, "
            f"{self.errors} errors, elapsed {_duration(elapsed)}, ETA {eta}"
        )


class FitProgress:
    """Progress of head training (``train``, ``evaluate``): which fit of how many and which epoch.
    On a terminal each fit's epochs show as a bar (see ``training._EpochBar``); in logs, a first
    line, then a plain line every :func:`progress_interval` seconds from a timer, as for images."""

    def __init__(self, description: str, fits: int, start_line: str, enabled: bool = True):
        self.description, self.fits, self.start_line = description, fits, start_line
        self.enabled = enabled
        self.plain = enabled and not sys.stderr.isatty()
        self.fit, self.what, self.epoch, self.epochs = 0, "", 0, 0
        self.start = time.perf_counter()
        self._ticker: _Ticker | None = None

    def __enter__(self) -> FitProgress:
        if self.plain:
            print(f"{self.description}: started: {self.start_line}", file=sys.stderr, flush=True)
            if progress_interval() > 0:
                self._ticker = _Ticker(self.line, progress_interval())
        return self

    def __exit__(self, *exc) -> None:
        if self._ticker is not None:
            self._ticker.stop()

    def next_fit(self, what: str) -> str:
        """A new fit begins (``what`` it is); returns the label of its epoch bar."""
        self.fit += 1
        self.what, self.epoch = what, 0
        return f"fit {self.fit}/{self.fits} {what}"

    def at_epoch(self, epoch: int, epochs: int) -> None:
        self.epoch, self.epochs = epoch, epochs

    def line(self) -> str:
        elapsed = time.perf_counter() - self.start
        if self.fit == 0:
            return f"{self.description}: preparing the first fit, {elapsed:.0f} s"
        return (
            f"{self.description}: fit {self.fit} of {self.fits} ({self.what}), epoch {self.epoch} of {self.epochs}, "
            f"{elapsed:.0f} s"
        )
