"""The README's main job, in its fast mode: real images, the real offline teacher, every stage end to end.

Run twice, whatever this machine has installed: with Fashion-MNIST (skipped only where its folder is absent)
and with the setting pointed at an empty folder, as on a fresh machine without Debian's dataset-fashion-mnist.
"""

from __future__ import annotations

import json

import pytest

from morphcache.cli import main
from morphcache.evaluate.datasets import FASHION_MNIST_ENV, fashion_mnist_dir


@pytest.mark.slow
@pytest.mark.parametrize("data", ["fashion-mnist", "without-fashion-mnist"])
def test_demo_fast_runs_every_stage(tmp_path, monkeypatch, data):
    if data == "fashion-mnist" and not any(fashion_mnist_dir().glob("train-images-idx3-ubyte*")):
        pytest.skip(f"no Fashion-MNIST in {fashion_mnist_dir()} (install dataset-fashion-mnist or set {FASHION_MNIST_ENV})")
    if data == "without-fashion-mnist":
        (tmp_path / "empty").mkdir()
        monkeypatch.setenv(FASHION_MNIST_ENV, str(tmp_path / "empty"))
    out = tmp_path / "demo"
    assert main(["demo", "--fast", "--out", str(out)]) == 0
    summary = json.loads((out / "demo_summary.json").read_text())
    assert summary["data"]["eval"].startswith("fashion-mnist:" if data == "fashion-mnist" else "digits")
    stages = [s["stage"] for s in summary["stages"]]
    for expected in ("extract", "verify", "replay-check", "train tokenwise", "train dtm", "report"):
        assert expected in stages
    assert all(s.get("exit_code", 0) == 0 for s in summary["stages"])
    # four reference/student rows, each with k-NN and linear-probe accuracy
    assert len(summary["accuracy"]) == 4
    assert all(set(v) == {"knn", "linear"} for v in summary["accuracy"].values())
    assert summary["train"]["dtm"]["images"] > 0 and summary["extract_seconds"] > 0
    assert (out / "report" / "report.md").is_file()
    assert (out / "store_show.png").stat().st_size > 1000
    replay = json.loads((out / "replay_check.json").read_text())
    assert replay["passed"] is True
    # the store is complete and verifies clean; a second run resumes instead of redoing the work
    assert main(["store", "verify", str(out / "store.zarr")]) == 0
