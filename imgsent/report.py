"""Progress bars and run summaries, on stderr only (stdout may carry data)."""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass, field

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

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
        t.add_row("output", self.output)
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


class RunProgress:
    """A rich progress bar with images/s, ETA and an error count; silent when ``enabled`` is False."""

    def __init__(self, total: int, description: str, enabled: bool = True):
        self.enabled = enabled
        self.errors = 0
        self.start = time.perf_counter()
        self._progress = None
        if enabled:
            self._progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[rate]:.1f} img/s"),
                TextColumn("[red]{task.fields[errors]} errors"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=stderr_console,
                transient=False,
            )
            self._task = self._progress.add_task(description, total=total, rate=0.0, errors=0)

    def __enter__(self) -> RunProgress:
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.stop()

    def advance(self, n: int, errors: int = 0) -> None:
        self.errors += errors
        if self._progress is not None:
            task = self._progress.tasks[0]
            done = task.completed + n
            rate = done / max(time.perf_counter() - self.start, 1e-9)
            self._progress.update(self._task, advance=n, rate=rate, errors=self.errors)
