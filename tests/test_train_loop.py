"""The training driver: it learns, it resumes exactly, every objective runs, the online teacher matches the cache.

The store is a real extraction (``morphcache.testing.teacher_stores.build_teacher_store``): targets are a tiny timm
teacher's tokens of the rendered views, a learnable function of the student's pixels.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from morphcache.cli import main
from morphcache.schemas import RunConfig
from morphcache.train.loop import run_training
from morphcache.testing.teacher_stores import build_teacher_store


@pytest.fixture(scope="module")
def store_path(tmp_path_factory) -> Path:
    torch.set_num_threads(1)
    return build_teacher_store(tmp_path_factory.mktemp("loop"), n_images=12, views=2, chunk_images=4).path


def _losses(run: Path, key: str = "loss") -> np.ndarray:
    return np.array([json.loads(line)[key] for line in (run / "metrics.jsonl").read_text().splitlines()])


def _config(store_path: Path, **kw) -> RunConfig:
    base = dict(store=str(store_path), model="vit_tiny_patch16", batch_size=4, mask_min_block=4, dtm_max_merge=8,
                dtm_max_iters=3, workers=1, base_lr=0.05, warmup_steps=2)
    base.update(kw)
    return RunConfig(**base)


def test_lr_schedule_scales_warms_up_and_decays():
    from morphcache.train.schedule import lr_at, scaled_lr

    assert scaled_lr(1.5e-3, 2048) == pytest.approx(1.5e-3) and scaled_lr(1.5e-3, 512) == pytest.approx(7.5e-4)
    lrs = [lr_at(s, total_steps=10, peak_lr=1.0, min_lr=0.1, warmup_steps=4) for s in range(11)]
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])  # linear warmup reaches the peak
    assert lrs[4] == pytest.approx(1.0) and lrs[10] == pytest.approx(0.1) and lrs[7] == pytest.approx(0.55)
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))  # cosine decay is monotone


def test_cli_pretraining_lowers_the_loss_and_writes_the_run(store_path, tmp_path):
    run = tmp_path / "run"
    code = main(["train", "--store", str(store_path), "--model", "vit_tiny_patch16", "--objective", "tokenwise",
                 "--epochs", "8", "--batch-size", "4", "--out", str(run), "--workers", "1", "--base-lr", "0.05",
                 "--warmup-steps", "2", "--mask-min-block", "4", "--loss", "l2", "--checkpoint-every", "10"])
    assert code == 0
    losses = _losses(run)
    assert len(losses) == 24 and np.all(np.isfinite(losses))  # 12 images / batch 4 = 3 steps x 8 epochs
    assert losses[-4:].mean() < 0.6 * losses[:4].mean(), losses
    saved = RunConfig.model_validate_json((run / "config.json").read_text())
    assert saved.objective == "tokenwise" and saved.loss == "l2" and saved.epochs == 8
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 24 and summary["images"] == 96 and summary["images_per_s"] > 0
    assert (run / "checkpoint_step10.pt").is_file() and (run / "checkpoint_step20.pt").is_file()
    assert any((run / "tb").iterdir())
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records[2:4]] == [0, 1] and records[0]["lr"] < records[1]["lr"]  # warmup
    # stage 3 reads the checkpoint back as a plain timm backbone
    from morphcache.train.student import load_student_backbone

    backbone, info = load_student_backbone(run / "checkpoint.pt")
    assert info["img_size"] == 64 and info["grid"] == (4, 4) and info["target_dim"] == 64
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 24 and ckpt["micro_step"] == 24


def test_resumed_run_matches_the_uninterrupted_run(store_path, tmp_path):
    cfg = _config(store_path, objective="dtm", epochs=3, drop_path=0.1, accum_steps=1)
    straight = run_training(cfg.model_copy(update={"max_steps": 6}), tmp_path / "a", tensorboard=False)
    run_training(cfg.model_copy(update={"max_steps": 3}), tmp_path / "b", tensorboard=False)
    resumed = run_training(cfg.model_copy(update={"max_steps": 6}), tmp_path / "b", resume=True, tensorboard=False)
    assert straight["final_step"] == resumed["final_step"] == 6 and resumed["first_step"] == 3
    a, b = _losses(tmp_path / "a"), _losses(tmp_path / "b")
    assert len(a) == len(b) == 6
    np.testing.assert_allclose(b, a, rtol=0, atol=1e-6)
    np.testing.assert_allclose(_losses(tmp_path / "b", "lr"), _losses(tmp_path / "a", "lr"), rtol=1e-12)
    wa = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)["model"]
    wb = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.parametrize("objective", ["mae", "lut", "mae+dtm"])
def test_every_objective_trains_from_the_store(store_path, tmp_path, objective):
    from morphcache.schemas.specs import RUN_PRESETS

    cfg = _config(store_path, objective=objective, epochs=1, max_steps=2, accum_steps=1, loader="torch", workers=0,
                  precision="fp32", **RUN_PRESETS["cpu-small"])
    summary = run_training(cfg, tmp_path / objective, tensorboard=False)
    records = [json.loads(line) for line in (tmp_path / objective / "metrics.jsonl").read_text().splitlines()]
    assert summary["steps"] == 2 and len(records) == 2
    assert all(np.isfinite(r["loss"]) and r["grad_norm"] > 0 for r in records)
    if objective == "mae+dtm":
        assert {"mae", "dtm"} <= set(records[0])  # both terms of the sum are logged


def test_gradient_accumulation_counts_micro_batches(store_path, tmp_path):
    cfg = _config(store_path, objective="tokenwise", epochs=2, accum_steps=3, loader="torch", workers=0)
    summary = run_training(cfg, tmp_path / "acc", tensorboard=False)
    assert summary["steps"] == 2 and summary["images"] == 2 * 3 * 4  # 3 micro-batches per step, one step/epoch
    ckpt = torch.load(tmp_path / "acc" / "checkpoint.pt", weights_only=True)
    assert ckpt["micro_step"] == 6 and ckpt["epoch"] == 2


def test_online_teacher_run_follows_the_cached_run(store_path, tmp_path):
    """Same seed, same views: live targets equal the cache up to int8 quantization, so the losses agree closely."""
    cfg = _config(store_path, objective="tokenwise", epochs=1, max_steps=2, precision="fp32")
    cached = run_training(cfg, tmp_path / "cached", tensorboard=False)
    online = run_training(cfg.model_copy(update={"teacher_online": True}), tmp_path / "online", tensorboard=False)
    assert online["teacher_online"] and not cached["teacher_online"]
    a, b = _losses(tmp_path / "cached"), _losses(tmp_path / "online")
    np.testing.assert_allclose(b, a, rtol=2e-2)
    assert not np.array_equal(a, b)  # the live teacher really ran (no quantization)


def test_optimizer_knobs_reach_the_optimizer_and_the_loss():
    """--adam-betas, --adam-eps and --weight-decay-end change the parameters after a few steps, so the loss."""
    from morphcache.train.objectives import build_objective
    from morphcache.train.schedule import build_optimizer, weight_decay_at
    from morphcache.train.student import create_student

    def loss_after_steps(**fields):
        cfg = RunConfig(store="s", objective="tokenwise", mask_min_block=2, **fields)
        torch.manual_seed(0)
        obj = build_objective("tokenwise", cfg, create_student("vit_tiny_patch16", 32, 8, patch_size=8), 8, (4, 4))
        optimizer, schedule = build_optimizer(obj, cfg, 1e-2, total_steps=4)
        gen = torch.Generator().manual_seed(1)
        batch = {"images": torch.randn(4, 3, 32, 32, generator=gen), "targets": torch.randn(4, 16, 8, generator=gen),
                 "mask": torch.zeros(4, 16, dtype=torch.bool)}
        for _ in range(3):
            schedule.apply()
            loss, _ = obj(batch)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.advance()
        assert optimizer.defaults["betas"] == cfg.effective_betas() and optimizer.defaults["eps"] == cfg.adam_eps
        with torch.no_grad():
            return float(obj(batch)[0]), optimizer

    base, opt = loss_after_steps()
    assert opt.param_groups[0]["weight_decay"] == 0.05 and opt.param_groups[1]["weight_decay"] == 0.0
    for fields in (dict(adam_betas=(0.9, 0.95)), dict(adam_eps=1e-3), dict(weight_decay_end=5.0)):
        other, opt = loss_after_steps(**fields)
        assert other != pytest.approx(base, rel=1e-7), fields
    # cosine weight decay on the decaying group only (naver-ai/dtm wd schedule); step 2 of 4 was the last applied
    assert opt.param_groups[0]["weight_decay"] == pytest.approx(weight_decay_at(2, 4, 0.05, 5.0))
    assert opt.param_groups[1]["weight_decay"] == 0.0
    assert RunConfig(store="s", objective="lut").effective_betas() == (0.9, 0.95)
    assert RunConfig(store="s").effective_betas() == (0.9, 0.999)


def test_print_config_shows_the_effective_hyper_parameters(store_path, capsys):
    code = main(["train", "--store", str(store_path), "--model", "vit_tiny_patch16", "--objective", "lut",
                 "--preset", "cpu-small", "--decoder-depth", "3", "--print-config"])
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["decoder_depth"] == 3 and printed["decoder_dim"] == 256 and printed["proj_hidden"] == 2048
    eff = printed["effective"]
    assert eff["adam_betas"] == [0.9, 0.95] and eff["grid"] == [4, 4] and eff["mask_num_masked"] == 6
    assert eff["dtm_case_ranges"] == [[16, 14], [16, 14]] and eff["proj_dim"] == 256


def test_an_objective_registered_in_a_test_trains_through_the_engine(store_path, tmp_path, monkeypatch):
    """A new objective is one factory plus a decorator: no existing module is edited. It declares what it needs
    (targets, here), and the engine provides exactly that plus the step's generator ``rng``, from which it draws
    its block mask."""
    import catalogue

    from morphcache import registries
    from morphcache.train.masking import build_block_mask_generator
    from morphcache.train.objectives import Objective

    monkeypatch.setattr(catalogue, "REGISTRY", dict(catalogue.REGISTRY))  # the registration ends with the test
    seen = []

    class MaskedL2(Objective):
        """Plain L2 to the cached targets on the masked positions only."""

        name = "masked_l2"
        needs_targets = True

        def __init__(self, config, student):
            super().__init__(student)
            self.masker = build_block_mask_generator(config, student.grid)

        def forward(self, batch):
            seen.append(sorted(k for k, v in batch.items() if v is not None))
            mask = self.masker.batch(batch["images"].shape[0], self.step_rng(batch))
            pred = self.model(batch["images"], mask)
            mask = mask.to(pred.device)
            loss = ((pred - batch["targets"]) ** 2).mean(-1)[mask].mean()
            return loss, {"loss": float(loss.detach())}

    @registries.objectives.register("masked_l2")
    def build_masked_l2(config, student, target_dim):
        return MaskedL2(config, student)

    cfg = _config(store_path, objective="masked_l2", epochs=1, max_steps=3, loader="torch", workers=0, precision="fp32")
    summary = run_training(cfg, tmp_path / "toy", tensorboard=False)
    assert summary["steps"] == 3 and summary["objective"] == "masked_l2"
    assert seen and all(keys == ["images", "rng", "targets"] for keys in seen)
    assert np.isfinite(_losses(tmp_path / "toy")).all()


def test_resuming_a_finished_run_trains_nothing_and_keeps_its_summary(store_path, tmp_path, capsys):
    """`train --resume` on a finished run overwrote summary.json with a summary of zero steps and a null final loss
    (newcomer check, session 5)."""
    cfg = _config(store_path, objective="tokenwise", max_steps=2)
    first = run_training(cfg, tmp_path / "run", tensorboard=False, show_progress=False)
    files = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir() if p.is_file()}
    capsys.readouterr()
    again = run_training(cfg, tmp_path / "run", resume=True, tensorboard=False, show_progress=False)
    assert again["steps"] == first["steps"] == 2 and again["final_loss"] == first["final_loss"] is not None
    assert {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir() if p.is_file()} == files
    assert "already finished at step 2 of 2; nothing to do" in capsys.readouterr().err
