"""Where the objectives' masks come from: the loop's per-micro-batch ``default_rng((seed, g, rank))``, and nothing else.

- DTM / token-wise block masks are pinned (a hash of the masks the student sees in a short run, recorded on the
  code before the masks moved to the step rng): a change there would silently change the DTM study's runs.
- MAE / LUT masks are a function of the seed: a resumed run equals the uninterrupted one, and two runs with the
  same seed are identical.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from morphcache.errors import ConfigError
from morphcache.schemas import RunConfig
from morphcache.testing.teacher_stores import build_teacher_store
from morphcache.train.loop import run_training

#: sha256 of the 4 block masks (B 4, grid 4x4) of the run in :func:`test_dtm_and_tokenwise_masks_are_pinned`,
#: recorded with the code of 69be519 (masks drawn by the loop before objectives took the step rng).
PINNED_MASKS = "4b7aab004295d9d7f234378ba2f101c7cf43dd80248bec17026e55dcc686b7de"


@pytest.fixture(scope="module")
def store_path(tmp_path_factory) -> Path:
    torch.set_num_threads(1)
    return build_teacher_store(tmp_path_factory.mktemp("rng"), n_images=12, views=2, chunk_images=4).path


def _config(store_path: Path, **kw) -> RunConfig:
    base = dict(store=str(store_path), model="vit_tiny_patch16", batch_size=4, mask_min_block=4, dtm_max_merge=8,
                dtm_max_iters=3, workers=0, loader="torch", base_lr=0.05, warmup_steps=2, precision="fp32")
    base.update(kw)
    return RunConfig(**base)


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def _weights(run: Path) -> dict:
    return torch.load(run / "checkpoint.pt", weights_only=True)["model"]


@pytest.mark.parametrize("objective", ["dtm", "tokenwise"])
def test_dtm_and_tokenwise_masks_are_pinned(store_path, tmp_path, monkeypatch, objective):
    from morphcache.train import student as student_mod
    from morphcache.train.masking import build_block_mask_generator

    seen = []
    forward = student_mod.MIMStudent.forward

    def recording_forward(self, images, mask=None, *args, **kwargs):
        seen.append(mask.detach().cpu().numpy().copy())
        return forward(self, images, mask, *args, **kwargs)

    monkeypatch.setattr(student_mod.MIMStudent, "forward", recording_forward)
    cfg = _config(store_path, objective=objective, epochs=2, max_steps=4, accum_steps=2, drop_path=0.1)
    run_training(cfg, tmp_path / objective, tensorboard=False, show_progress=False)
    assert len(seen) == 4
    assert hashlib.sha256(np.stack(seen).tobytes()).hexdigest() == PINNED_MASKS
    # ... which are exactly the first draws of default_rng((seed, global micro-batch, rank 0))
    masker = build_block_mask_generator(cfg, (4, 4))
    for g, mask in enumerate(seen):
        assert np.array_equal(mask, masker.batch(4, np.random.default_rng((cfg.seed, g, 0))).numpy())


@pytest.mark.parametrize("objective", ["mae", "lut"])
def test_mae_and_lut_resume_exactly_and_repeat_for_a_seed(store_path, tmp_path, objective):
    from morphcache.schemas.specs import RUN_PRESETS

    cfg = _config(store_path, objective=objective, epochs=2, accum_steps=1, **RUN_PRESETS["cpu-small"])
    straight = run_training(cfg.model_copy(update={"max_steps": 4}), tmp_path / "a", tensorboard=False,
                            show_progress=False)
    run_training(cfg.model_copy(update={"max_steps": 2}), tmp_path / "b", tensorboard=False, show_progress=False)
    resumed = run_training(cfg.model_copy(update={"max_steps": 4}), tmp_path / "b", resume=True, tensorboard=False,
                           show_progress=False)
    assert straight["final_step"] == resumed["final_step"] == 4 and resumed["first_step"] == 2
    assert _losses(tmp_path / "b") == _losses(tmp_path / "a")
    wa, wb = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # the checkpoint holds no mask generator state: masks are a function of (seed, micro-batch, rank)
    assert torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)["generators"] == {}
    run_training(cfg.model_copy(update={"max_steps": 2}), tmp_path / "c", tensorboard=False, show_progress=False)
    assert _losses(tmp_path / "c") == _losses(tmp_path / "a")[:2]
    run_training(cfg.model_copy(update={"max_steps": 2, "seed": 1}), tmp_path / "d", tensorboard=False,
                 show_progress=False)
    assert _losses(tmp_path / "d") != _losses(tmp_path / "a")[:2]


def _objective(name: str):
    from morphcache.train.objectives import build_objective
    from morphcache.train.student import create_student

    cfg = RunConfig(store="s", objective=name, mask_min_block=2, dtm_max_merge=8, dtm_max_iters=3, decoder_dim=32,
                    decoder_depth=1, decoder_heads=4, proj_hidden=32)
    torch.manual_seed(0)
    return build_objective(name, cfg, create_student("vit_tiny_patch16", 32, 8, patch_size=8), 8, (4, 4))


@pytest.mark.parametrize("name", ["dtm", "tokenwise", "mae", "mae+dtm", "lut"])
def test_objectives_draw_masks_from_the_batch_rng_only(name):
    obj = _objective(name)
    assert not any(isinstance(v, torch.Generator) for v in vars(obj).values())  # no private mask generator
    gen = torch.Generator().manual_seed(3)
    batch = {"images": torch.randn(4, 3, 32, 32, generator=gen), "images2": torch.randn(4, 3, 32, 32, generator=gen),
             "targets": torch.randn(4, 16, 8, generator=gen)}

    def loss(seed):
        dtm = getattr(obj, "dtm", None)
        if dtm is not None:
            dtm.generator.manual_seed(0)  # the same morphing cases for every call
        with torch.no_grad():
            return float(obj({**batch, "rng": np.random.default_rng(seed)})[0])

    obj.eval()  # no dropout / BatchNorm updates between the calls
    assert loss(5) == loss(5)
    assert loss(5) != loss(6)
    with pytest.raises(ConfigError, match="rng"):
        obj(batch)


def test_a_checkpoint_with_the_retired_objective_generator_still_restores():
    from morphcache.train.checkpoint import generator_states, set_generator_states

    obj = _objective("dtm")
    states = generator_states(obj)
    assert list(states) == ["dtm.generator"]
    old = {**states, "generator": torch.Generator().manual_seed(7926).get_state()}  # as main wrote them
    set_generator_states(obj, old)
    with pytest.raises(Exception, match="generators"):
        set_generator_states(obj, {**states, "other": states["dtm.generator"]})
