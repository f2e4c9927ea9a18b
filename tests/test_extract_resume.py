"""Resume after kill -9: a re-run completes the store so that every array equals an uninterrupted run's, byte for byte."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from morphcache.cli import main
from morphcache.testing.images import write_noise_pngs
from morphcache.testing.stores import store_arrays

ARGS = ["--teacher", "timm:vit_tiny_patch16_224", "--image-size", "32", "--views", "2", "--batch-size", "4", "--threads", "1",
        "--chunk-images", "1", "--dtype", "int8", "--seed", "3"]
N_IMAGES = 30


def write_images(folder: Path, n: int) -> Path:
    return write_noise_pngs(folder, n, seed=1, prefix="p")


def done_chunks(store: Path) -> int:
    """Chunks whose progress flag file exists (zarr v3 default chunk keys: progress/c/<i>). zarr writes each chunk
    file as ``<i>.<uuid>.partial`` and renames it, so a listing taken mid-write holds such names too: counting them
    made a CI run kill extract with only 2 chunks done."""
    d = store / "progress" / "c"
    return sum(name.isdigit() for name in os.listdir(d)) if d.is_dir() else 0


def arrays(path) -> dict:
    return store_arrays(path)


@pytest.mark.slow
def test_kill_9_then_rerun_equals_uninterrupted_run(tmp_path):
    data = write_images(tmp_path / "imgs", N_IMAGES)
    ref, killed = tmp_path / "ref", tmp_path / "killed"

    cmd = [sys.executable, "-m", "morphcache", "extract", "--data", str(data), "--out", str(killed), *ARGS]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    try:
        while done_chunks(killed) < 3 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert proc.poll() is None, f"extract ended before it could be killed: {proc.stderr.read().decode()[-500:]}"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL

    from morphcache.store.feature_store import FeatureStore

    partial = FeatureStore.open(killed)
    n_done = partial.n_chunks - len(partial.missing_chunks())
    assert 3 <= n_done < N_IMAGES, f"kill left {n_done} chunks done; the test needs a partial store"

    assert main(["extract", "--data", str(data), "--out", str(killed), *ARGS]) == 0  # resume
    assert main(["extract", "--data", str(data), "--out", str(ref), *ARGS]) == 0  # uninterrupted
    a, b = arrays(ref), arrays(killed)
    assert sorted(a) == sorted(b)
    assert {"tokens", "scales", "pooled", "views", "progress", "checksums", "images/status"} <= set(a)
    for name in a:
        assert a[name] == b[name], f"array {name} differs after resume"
    assert FeatureStore.open(killed).is_complete()
