"""Progress for long work, built on ``rich.progress``: a live bar on a terminal, plain periodic lines otherwise.

Usage::

    with progress_bar(total=n_steps, description="train", unit="steps", initial=resumed_step) as bar:
        bar.advance(1, loss=0.25)

Rate and ETA come from rich's :class:`rich.progress.Task` (``speed``: items advanced over the samples of the last
``speed_estimate_period`` seconds; ``time_remaining``: remaining items / speed), so they count only the work this
process did: ``initial`` (work finished before a resume) moves the count and the bar but never the rate. When
stderr is not a terminal (CI, cluster logs, ``2> file``) no live bar is drawn; instead a line
``[description] done/total unit R unit/s eta Ss fields`` is printed every ``log_every`` seconds, whenever another
tenth of the total is done, and at the end.
"""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from typing import Callable, Iterator

#: Seconds of recent samples the rate is estimated from (rich's ``speed_estimate_period``).
RATE_WINDOW_S = 30.0


class ProgressBar:
    """Handle returned by :func:`progress_bar`: :meth:`advance` it by the work just done.

    ``completed`` counts items including ``initial``; ``rate`` (items/s) and ``eta`` (s) count only this process's
    work (None until two advances are seen).
    """

    def __init__(self, progress, task_id, total: int | None, description: str, unit: str, log_every: float,
                 plain: bool, clock: Callable[[], float]):
        self._progress = progress
        self._task_id = task_id
        self.total = total
        self.description = description
        self.unit = unit
        self._plain = plain
        self._clock = clock
        self._log_every = log_every
        self._initial = int(progress.tasks[task_id].completed)
        self._last_log = clock()
        self._next_tenth = self._tenth_after(self.completed)

    @property
    def _task(self):
        return self._progress.tasks[self._task_id]

    @property
    def completed(self) -> int:
        return int(self._task.completed)

    @property
    def rate(self) -> float | None:
        """Items per second over the recent work of this process: rich's task speed, or before rich has two
        samples, the items advanced so far over the time since the bar started (``initial`` excluded)."""
        task = self._task
        speed = task.finished_speed or task.speed
        if speed is None and task.elapsed and task.completed > self._initial:
            speed = (task.completed - self._initial) / task.elapsed
        return speed

    @property
    def eta(self) -> float | None:
        """Seconds left at :attr:`rate` (None when unknown or without a total)."""
        rate = self.rate
        return max(0.0, self.total - self.completed) / rate if (self.total and rate) else None

    def _tenth_after(self, done: int) -> int | None:
        if not self.total:
            return None
        return (done * 10 // self.total + 1) * self.total / 10

    def advance(self, n: int = 1, **fields: object) -> None:
        """Count ``n`` more items done; ``fields`` (e.g. ``loss=0.25``) are shown after the rate."""
        info = " ".join(f"{k}={v}" for k, v in fields.items())
        self._progress.update(self._task_id, advance=n, info=info)
        if not self._plain:
            return
        now, done = self._clock(), self.completed
        finished = bool(self.total) and done >= self.total
        tenth = self._next_tenth is not None and done >= self._next_tenth
        if finished or tenth or now - self._last_log >= self._log_every:
            self._last_log = now
            self._next_tenth = self._tenth_after(done)
            print(self.line(info), file=sys.stderr, flush=True)

    def line(self, info: str = "") -> str:
        """The plain progress line: ``[description] done/total unit R unit/s eta Ss info``."""
        rate, eta = self.rate, self.eta
        of = f"/{self.total}" if self.total else ""
        speed = f"{rate:.1f}" if rate is not None else "-"
        left = "0s" if self.total and self.completed >= self.total else (f"{eta:.0f}s" if eta is not None else "-")
        return f"[{self.description}] {self.completed}{of} {self.unit} {speed} {self.unit}/s eta {left} {info}".rstrip()


def _columns(unit: str):
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        ProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from rich.text import Text

    class RateColumn(ProgressColumn):
        """``12.3 unit/s`` from the task's speed (this process's work only)."""

        def render(self, task) -> Text:  # noqa: D401 - rich API
            speed = task.finished_speed or task.speed
            return Text(f"{speed:.1f} {unit}/s" if speed else f"- {unit}/s")

    return (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), RateColumn(),
            TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[info]}"))


@contextmanager
def progress_bar(
    total: int | None,
    description: str,
    unit: str = "items",
    initial: int = 0,
    log_every: float = 10.0,
    *,
    clock: Callable[[], float] | None = None,
    live: bool | None = None,
) -> Iterator[ProgressBar]:
    """A progress display for ``total`` items of which ``initial`` are already done (a resumed run).

    ``live``: draw a rich bar (default: when stderr is a terminal), else print plain lines (see the module
    docstring). ``clock``: seconds, monotonic (default :func:`time.monotonic`; tests pass a fake clock).
    """
    from rich.console import Console
    from rich.progress import Progress

    clock = clock or time.monotonic
    live = sys.stderr.isatty() if live is None else live
    progress = Progress(*_columns(unit), console=Console(file=sys.stderr) if live else None, transient=False,
                        get_time=clock, speed_estimate_period=RATE_WINDOW_S, disable=not live)
    with progress:
        task_id = progress.add_task(description, total=total, completed=initial, info="")
        yield ProgressBar(progress, task_id, total, description, unit, log_every, plain=not live, clock=clock)


def map_with_progress(fn, items, workers: int, show: bool, description: str, unit: str) -> list:
    """``[fn(x) for x in items]`` in order, on a pool of ``workers`` threads (for I/O-bound work such as hashing
    files), with a progress bar of ``len(items)`` when ``show``."""
    from concurrent.futures import ThreadPoolExecutor

    items = list(items)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = pool.map(fn, items)
        if not show:
            return list(results)
        out = []
        with progress_bar(total=len(items), description=description, unit=unit) as bar:
            for r in results:
                out.append(r)
                bar.advance(1)
        return out
