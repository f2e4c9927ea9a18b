"""``morphcache train`` under torchrun: 2 CPU processes (gloo), real store, real DDP.

The store is a real extraction (``build_teacher_store``: PNGs -> DALI views -> tiny timm teacher -> int8 zarr),
12 images x 2 views. Each rank trains a ``vit_tiny_patch16`` student at 64 px (4x4 grid, the teacher's) on 2 rows
per micro-batch, so one optimizer step sees 4 rows; an epoch is 3 steps. The runs use token-wise distillation
with no mask patches in fp32: the step is then a deterministic function of the rows, so a 2-rank DDP run must
follow, step for step, a single-process run at batch 4 whose batches are the union of the two ranks' batches
(DDP averages equal-size per-rank gradients into the global-batch gradient). That comparison fails if the ranks
read the same rows, miss rows, drift apart, or resume at the wrong place.

Which rows each rank really consumed is recorded by ``morphcache/testing/ddp.py`` (it wraps the training loader of
``morphcache.cli.main``); the resumed run goes through the plain ``-m morphcache`` entry point.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from morphcache.cli import main
from morphcache.store.feature_store import FeatureStore
from morphcache.train.sampler import EpochSampler
from morphcache.testing.ddp import launch, read_rows
from morphcache.testing.teacher_stores import build_teacher_store

pytestmark = pytest.mark.slow

WORLD, BATCH, SEED = 2, 2, 0  # per-rank micro-batch; the single-process reference uses WORLD * BATCH
N_IMAGES, VIEWS = 12, 2  # -> 6 images per rank, 3 steps per epoch
EPOCHS, FIRST_STOP = 2, 3  # 6 steps in all; the first launch stops after epoch 0 (resume continues into epoch 1)
TOTAL = EPOCHS * (N_IMAGES // (WORLD * BATCH))
RUN_FILES = {"config.json", "metrics.jsonl", "checkpoint.pt", "summary.json"}


def _args(store: Path, out: Path, batch: int = BATCH, loader: str | None = "torch", workers: int = 0,
          max_steps: int = FIRST_STOP, resume: bool = False) -> list[str]:
    args = ["train", "--store", str(store), "--out", str(out), "--model", "vit_tiny_patch16",
            "--objective", "tokenwise", "--epochs", str(EPOCHS), "--batch-size", str(batch), "--base-lr", "0.05",
            "--warmup-steps", "1", "--mask-patches", "0", "--precision", "fp32", "--seed", str(SEED),
            "--workers", str(workers), "--max-steps", str(max_steps), "--no-tensorboard", "--threads", "1"]
    args += ["--loader", loader] if loader else []  # None: the default loader (DALI)
    return args + (["--resume"] if resume else [])


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _samplers(store: FeatureStore, world: int, batch: int) -> list[EpochSampler]:
    return [EpochSampler(store.ok_rows(), store.spec.views_per_image, batch, SEED, rank, world)
            for rank in range(world)]


def _check(proc, code: int = 0) -> None:
    assert proc.returncode == code, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}"


# ---------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def store(tmp_path_factory) -> FeatureStore:
    torch.set_num_threads(1)
    return build_teacher_store(tmp_path_factory.mktemp("ddp"), n_images=N_IMAGES, views=VIEWS, chunk_images=4)


@pytest.fixture(scope="module")
def reference(store, tmp_path_factory) -> Path:
    """Single process, batch WORLD * BATCH, all TOTAL steps, torch loader: what the DDP run must reproduce."""
    run = tmp_path_factory.mktemp("ref") / "run"
    assert main(_args(store.path, run, batch=WORLD * BATCH, max_steps=TOTAL)) == 0
    return run


@pytest.fixture(scope="module")
def ddp_run(store, tmp_path_factory) -> dict:
    """2-rank torchrun launch, torch loader in the main process, stopped after FIRST_STOP steps; rows recorded."""
    base = tmp_path_factory.mktemp("ddp_torch")
    run, rows = base / "run", base / "rows"
    proc = launch([str(rows), *_args(store.path, run)], WORLD, cwd=base, module="morphcache.testing.ddp")
    return {"proc": proc, "run": run, "rows": rows}


# ---------------------------------------------------------------- tests
def test_rank_shards_are_disjoint_and_together_make_the_global_batch(store):
    ranks = _samplers(store, WORLD, BATCH)
    (single,) = _samplers(store, 1, WORLD * BATCH)
    assert ranks[0].steps_per_epoch == single.steps_per_epoch == TOTAL // EPOCHS
    for g in range(TOTAL):
        r0, r1 = ranks[0].batch_rows(g), ranks[1].batch_rows(g)
        assert len(r0) == len(r1) == BATCH and not set(r0) & set(r1)
        assert sorted([*r0, *r1]) == sorted(single.batch_rows(g))
    assert ranks[0].state_dict()["world_size"] == WORLD != single.state_dict()["world_size"]


def test_ddp_run_writes_its_outputs_once_from_rank_zero(store, ddp_run):
    from morphcache.train.student import load_student_backbone

    _check(ddp_run["proc"])
    run = ddp_run["run"]
    assert {p.name for p in run.iterdir()} == RUN_FILES  # no leftover *.tmp from two writers, no tb/
    records = _records(run)
    assert [r["step"] for r in records] == list(range(1, FIRST_STOP + 1))  # one line per step, not one per rank
    assert [r["epoch"] for r in records] == [0] * FIRST_STOP
    assert all(np.isfinite(r["loss"]) and r["grad_norm"] > 0 for r in records)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == WORLD and summary["steps"] == FIRST_STOP
    assert summary["images"] == FIRST_STOP * BATCH * WORLD and summary["total_steps"] == TOTAL
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == ckpt["micro_step"] == FIRST_STOP and ckpt["epoch"] == 1
    assert ckpt["sampler"] == _samplers(store, WORLD, BATCH)[0].state_dict()
    assert ckpt["sampler"]["world_size"] == WORLD and ckpt["config"]["batch_size"] == BATCH
    backbone, info = load_student_backbone(run / "checkpoint.pt")
    assert info["img_size"] == 64 and info["grid"] == (4, 4) and info["target_dim"] == store.spec.dim
    feats = backbone.forward_features(torch.zeros(1, 3, 64, 64))
    assert feats.shape == (1, 17, 192) and torch.isfinite(feats).all()


def test_each_rank_trained_on_its_own_disjoint_shard(store, ddp_run):
    _check(ddp_run["proc"])
    seen = [read_rows(ddp_run["rows"], rank) for rank in range(WORLD)]
    expected = _samplers(store, WORLD, BATCH)
    for rank in range(WORLD):
        assert seen[rank] == [expected[rank].batch_rows(g).tolist() for g in range(FIRST_STOP)], rank
    for b0, b1 in zip(*seen):
        assert not set(b0) & set(b1)
    assert len({r for batches in seen for b in batches for r in b}) == FIRST_STOP * BATCH * WORLD


def test_resumed_ddp_run_follows_the_single_process_run_and_world_size_is_checked(store, ddp_run, reference,
                                                                                 tmp_path, capsys, monkeypatch):
    _check(ddp_run["proc"])
    run = tmp_path / "run"
    shutil.copytree(ddp_run["run"], run)
    first_ckpt = (run / "checkpoint.pt").read_bytes()

    # one process (this one, no torchrun) resuming the 2-rank run is refused before the run directory is touched
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    capsys.readouterr()
    assert main(_args(store.path, run, max_steps=TOTAL, resume=True)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("morphcache: error:") and "world size" in err[0], err
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before

    # the same world size continues to the end, through the plain `-m morphcache` entry point, now with a
    # DataLoader worker process per rank (workers may change on resume)
    _check(launch(_args(store.path, run, workers=1, max_steps=TOTAL, resume=True), WORLD, cwd=tmp_path))
    assert {p.name for p in run.iterdir()} == RUN_FILES
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == TOTAL and ckpt["epoch"] == EPOCHS and ckpt["sampler"]["world_size"] == WORLD
    assert (run / "checkpoint.pt").read_bytes() != first_ckpt
    summary = json.loads((run / "summary.json").read_text())
    assert summary["first_step"] == FIRST_STOP and summary["final_step"] == TOTAL and summary["world_size"] == WORLD

    ddp, ref = _records(run), _records(reference)
    assert [r["step"] for r in ddp] == [r["step"] for r in ref] == list(range(1, TOTAL + 1))
    assert [r["epoch"] for r in ddp] == [r["epoch"] for r in ref] == [0, 0, 0, 1, 1, 1]
    for key in ("loss", "lr", "grad_norm"):
        np.testing.assert_allclose([r[key] for r in ddp], [r[key] for r in ref], rtol=1e-4, err_msg=key)
    weights = ckpt["model"]
    ref_weights = torch.load(reference / "checkpoint.pt", weights_only=True)["model"]
    assert weights.keys() == ref_weights.keys()
    for k in weights:
        torch.testing.assert_close(weights[k], ref_weights[k], rtol=1e-4, atol=1e-5, msg=k)
    init_weights = torch.load(ddp_run["run"] / "checkpoint.pt", weights_only=True)["model"]
    assert any(not torch.equal(weights[k], init_weights[k]) for k in weights)  # the resumed steps did train


def test_dali_loader_shards_by_rank_under_ddp(store, ddp_run, tmp_path):
    """The default DALI loader with one external-source worker per rank: same shards, same losses (PIL vs DALI
    pixels differ by the measured rendering tolerance only)."""
    _check(ddp_run["proc"])
    run, rows = tmp_path / "run", tmp_path / "rows"
    args = _args(store.path, run, loader=None, workers=1)
    _check(launch([str(rows), *args], WORLD, cwd=tmp_path, module="morphcache.testing.ddp"))
    assert {p.name for p in run.iterdir()} == RUN_FILES
    assert json.loads((run / "config.json").read_text())["loader"] == "dali"
    expected = _samplers(store, WORLD, BATCH)
    for rank in range(WORLD):
        assert read_rows(rows, rank) == [expected[rank].batch_rows(g).tolist() for g in range(FIRST_STOP)], rank
    dali, torch_run = _records(run), _records(ddp_run["run"])
    assert [r["step"] for r in dali] == list(range(1, FIRST_STOP + 1))
    np.testing.assert_allclose([r["loss"] for r in dali], [r["loss"] for r in torch_run], rtol=2e-2)
    assert torch.load(run / "checkpoint.pt", weights_only=True)["sampler"]["world_size"] == WORLD
