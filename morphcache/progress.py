"""Progress bars for long work: items/s and ETA on a terminal, periodic one-line logs otherwise.

Usage::

    with progress_bar(total=n_views, description="extract", unit="views") as bar:
        bar.advance(batch_size)
"""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from typing import Iterator


class _Bar:
    def __init__(self, progress, task, total: int | None, description: str, unit: str, log_every: float):
        self._progress = progress
        self._task = task
        self.total = total
        self.description = description
        self.unit = unit
        self.completed = 0
        self.start = time.perf_counter()
        self._last_log = self.start
        self._log_every = log_every

    @property
    def rate(self) -> float:
        """Items per second since the bar started."""
        elapsed = time.perf_counter() - self.start
        return self.completed / elapsed if elapsed > 0 else 0.0

    def advance(self, n: int = 1, **fields: object) -> None:
        self.completed += n
        if self._progress is not None:
            info = " ".join(f"{k}={v}" for k, v in fields.items())
            self._progress.update(self._task, advance=n, info=info)
            return
        now = time.perf_counter()
        if now - self._last_log >= self._log_every or (self.total and self.completed >= self.total):
            self._last_log = now
            rate = self.rate
            eta = (self.total - self.completed) / rate if (self.total and rate > 0) else float("nan")
            extra = " ".join(f"{k}={v}" for k, v in fields.items())
            of = f"/{self.total}" if self.total else ""
            print(
                f"[{self.description}] {self.completed}{of} {self.unit} {rate:.1f} {self.unit}/s eta {eta:.0f}s {extra}",
                file=sys.stderr,
                flush=True,
            )


def _rate_column_class():
    from rich.progress import ProgressColumn
    from rich.text import Text

    class RateColumn(ProgressColumn):
        def __init__(self, unit: str):
            super().__init__()
            self.unit = unit

        def render(self, task):  # noqa: D401 - rich API
            speed = task.finished_speed or task.speed
            return Text(f"{speed:.1f} {self.unit}/s" if speed else f"- {self.unit}/s")

    return RateColumn


def _RateColumn(unit: str):  # noqa: N802 - behaves like a class
    return _rate_column_class()(unit)


@contextmanager
def progress_bar(
    total: int | None, description: str, unit: str = "items", initial: int = 0, log_every: float = 10.0
) -> Iterator[_Bar]:
    """A progress bar showing count, items/s and ETA (rich on a TTY, plain log lines when piped)."""
    if sys.stderr.isatty():
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        columns = (
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            _RateColumn(unit),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"),
        )
        with Progress(*columns, transient=False) as progress:
            task = progress.add_task(description, total=total, completed=initial, info="")
            bar = _Bar(progress, task, total, description, unit, log_every)
            bar.completed = initial
            yield bar
    else:
        bar = _Bar(None, None, total, description, unit, log_every)
        bar.completed = initial
        yield bar
