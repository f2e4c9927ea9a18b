"""Progress reporting: items/s and ETA, as rich bars on a terminal and plain lines when piped."""

from __future__ import annotations

import io
import sys

from morphcache.progress import progress_bar


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
