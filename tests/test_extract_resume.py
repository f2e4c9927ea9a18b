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
from morphcache.testing.stores import done_chunk_files, store_arrays

ARGS = ["--teacher", "timm:vit_tiny_patch16_224", "--image-size", "32", "--views", "2", "--batch-size", "4", "--threads", "1",
        "--chunk-images", "1", "--dtype", "int8", "--seed", "3"]
N_IMAGES = 30


def write_images(folder: Path, n: int) -> Path:
    return write_noise_pngs(folder, n, seed=1, prefix="p")


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
        while done_chunk_files(killed) < 3 and proc.poll() is None and time.monotonic() < deadline:
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


def test_done_chunk_files_ignores_zarr_partial_writes(tmp_path):
    d = tmp_path / "progress" / "c"
    d.mkdir(parents=True)
    for name in ("0", "1", "2.5f0c.partial"):
        (d / name).write_bytes(b"\x01")
    assert done_chunk_files(tmp_path) == 2 and done_chunk_files(tmp_path / "nothing") == 0
