"""Progress reporting: items/s and ETA, as rich bars on a terminal and plain lines when piped; the rate counts only
this process's work (a resumed run must not count the steps done before the resume)."""

from __future__ import annotations

import io
import sys
import time

from morphcache.progress import progress_bar


class FakeClock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_plain_lines_show_rate_eta_and_fields(monkeypatch):
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    with progress_bar(total=4, description="extract", unit="views", log_every=0.0) as bar:
        for _ in range(4):
            bar.advance(1, loss=0.25)
    lines = err.getvalue().strip().splitlines()
    assert len(lines) == 4
    assert lines[-1].startswith("[extract] 4/4 views ") and "views/s" in lines[-1] and "eta 0s" in lines[-1]
    assert "loss=0.25" in lines[-1]
    assert bar.completed == 4 and bar.rate > 0


def test_resumed_bar_starts_at_initial(monkeypatch):
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    with progress_bar(total=10, description="train", unit="steps", initial=6) as bar:
        bar.advance(2)
    assert bar.completed == 8


def test_resumed_rate_and_eta_count_only_this_process(monkeypatch):
    """Before: 500 steps done before a resume, then 10 steps at 1 step/s showed "51.0 steps/s eta 10s"."""
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    clock = FakeClock()
    monkeypatch.setattr(time, "monotonic", clock)  # whatever clock the bar reads
    monkeypatch.setattr(time, "perf_counter", clock)
    with progress_bar(total=1000, description="train", unit="steps", initial=500, log_every=10.0) as bar:
        for _ in range(10):
            clock.t += 1.0
            bar.advance(1)
    assert bar.completed == 510
    assert abs(bar.rate - 1.0) < 1e-9 and abs(bar.eta - 490.0) < 1e-6
    assert err.getvalue().strip().splitlines() == ["[train] 510/1000 steps 1.0 steps/s eta 490s"]


def test_first_line_before_two_samples_uses_elapsed_time_of_this_process():
    clock = FakeClock()
    with progress_bar(total=100, description="x", unit="it", initial=50, clock=clock, live=False) as bar:
        clock.t += 4.0
        bar.advance(2)
        assert bar.rate == 0.5 and bar.eta == 96.0


def test_plain_lines_every_tenth_or_every_interval(monkeypatch):
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    clock = FakeClock()
    with progress_bar(total=100, description="extract", unit="views", log_every=10.0, clock=clock, live=False) as bar:
        for _ in range(100):  # fast work: one line per tenth of the total
            clock.t += 0.1
            bar.advance(1)
    lines = err.getvalue().strip().splitlines()
    assert [line.split()[1] for line in lines] == [f"{k}/100" for k in range(10, 101, 10)]
    assert all(" 10.0 views/s " in line for line in lines[1:])
    err.truncate(0), err.seek(0)
    with progress_bar(total=None, description="scan", unit="files", log_every=10.0, clock=clock, live=False) as bar:
        for _ in range(25):  # no total: one line every 10 s
            clock.t += 1.0
            bar.advance(1)
    assert [line.split()[1] for line in err.getvalue().strip().splitlines()] == ["10", "20"]


def test_live_bar_shows_this_process_rate(monkeypatch):
    """The rich bar (terminal mode) reads the same task: the resumed bar shows 1.0 steps/s, not 51."""
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    clock = FakeClock()
    with progress_bar(total=1000, description="train", unit="steps", initial=500, clock=clock, live=True) as bar:
        for _ in range(10):
            clock.t += 1.0
            bar.advance(1)
    out = err.getvalue()
    assert "510/1000" in out and "1.0 steps/s" in out and "51.0" not in out
