"""Runs that cannot be right are refused before any work: grid, width, partial store, foreign run directory."""

from __future__ import annotations

import json

import pytest

from morphcache.cli import main
from morphcache.errors import ConfigError, StoreError
from morphcache.schemas import RunConfig
from morphcache.train import guards
from morphcache.testing.stores import make_spec, make_store


def test_student_size_follows_the_teacher_grid():
    spec = make_spec(T=16)  # 4x4 grid (teacher 16 px, patch 4)
    assert guards.resolve_student_size(spec, patch_size=16) == 64
    assert guards.resolve_student_size(spec, patch_size=14, img_size=56) == 56  # patch-14 reads the crop at 56 px
    with pytest.raises(ConfigError, match=r"grid mismatch.*3x3.*4x4.*--img-size 64"):
        guards.resolve_student_size(spec, patch_size=16, img_size=48)
    with pytest.raises(ConfigError, match=r"--img-size 60 is not a whole number of .*16-pixel patches.*use --img-size "
                                          r"48 or 64 \(the store's 4x4 teacher grid needs --img-size 64\)$"):
        guards.resolve_student_size(spec, patch_size=16, img_size=60)
    with pytest.raises(ConfigError, match="grid mismatch"):
        guards.check_student_grid(spec, (5, 5))
    guards.check_student_grid(spec, (4, 4))
    assert guards.student_patch_size("vit_tiny_patch16") == 16
    assert guards.student_patch_size("vit_small_patch14_dinov2") == 14


@pytest.mark.parametrize("size, patch, hint", [(100, 16, "96 or 112"), (10, 16, "16"), (127, 8, "120 or 128"),
                                               (0, 16, "16")])
def test_every_model_input_size_is_a_whole_number_of_patches(size, patch, hint):
    """One helper refuses every teacher and student size that is not whole patches (size, patch, nearest sizes)."""
    from morphcache.geometry import check_patch_multiple

    with pytest.raises(ConfigError, match=rf"^--x {size} is not a whole number of m's {patch}-pixel patches.*"
                                          rf"use --x {hint}$"):
        check_patch_multiple(size, patch, option="--x", model="m")
    assert check_patch_multiple(112, 16, option="--x", model="m") == 7


def test_student_refuses_a_size_that_is_not_whole_patches(tmp_path, capsys):
    """The student's own builder (train, eval random:) and the train CLI refuse --img-size 100 with patch 16."""
    from morphcache.train.student import create_backbone

    with pytest.raises(ConfigError, match=r"--img-size 100 .*vit_tiny_patch16_224's 16-pixel patches.*96 or 112"):
        create_backbone("vit_tiny_patch16_224", 100)
    assert create_backbone("vit_tiny_patch16_224", 32).patch_embed.grid_size == (2, 2)
    make_store(tmp_path / "s", n_images=4, chunk_images=2)  # 4x4 teacher grid
    code = main(["train", "--store", str(tmp_path / "s"), "--out", str(tmp_path / "run"), "--batch-size", "2",
                 "--model", "vit_tiny_patch16_224", "--img-size", "100"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and not (tmp_path / "run").exists()
    assert "--img-size 100" in err and "16-pixel patches" in err and "96 or 112" in err and "--img-size 64" in err


def test_width_mismatch_names_the_field():
    spec = make_spec(D=32)
    guards.check_target_width(spec, 32, "checkpoint x")
    with pytest.raises(ConfigError, match=r"teacher width mismatch.*checkpoint x.*48.*teacher.dim is 32"):
        guards.check_target_width(spec, 48, "checkpoint x")
    other = spec.teacher.model_copy(update={"dim": 48})
    with pytest.raises(ConfigError, match="teacher.dim"):
        guards.check_online_teacher(spec, other)


def test_partial_store_refused_unless_allowed(tmp_path):
    store = make_store(tmp_path / "s", n_images=6, chunk_images=2, complete=False)
    with pytest.raises(StoreError, match=r"incomplete \(1 of 3 chunks missing: 2\).*--allow-partial"):
        guards.check_store_complete(store, allow_partial=False)
    guards.check_store_complete(store, allow_partial=True)
    assert store.ok_rows().max() < 8  # only the two finished chunks are served
    code = main(["train", "--store", str(tmp_path / "s"), "--out", str(tmp_path / "run"), "--batch-size", "2"])
    assert code == 2 and not (tmp_path / "run").exists()


def test_cli_refuses_grid_mismatch_before_training(tmp_path, capsys):
    make_store(tmp_path / "s", T=16)
    code = main(["train", "--store", str(tmp_path / "s"), "--out", str(tmp_path / "run"), "--model", "vit_tiny_patch16",
                 "--img-size", "32", "--batch-size", "2"])
    assert code == 2
    err = capsys.readouterr().err
    assert "grid mismatch" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_run_dir_guards(tmp_path):
    cfg = RunConfig(store="s", epochs=2)
    run = tmp_path / "run"
    assert guards.check_run_dir(run, cfg, resume=False) is False  # new run
    with pytest.raises(ConfigError, match="no config.json"):
        guards.check_run_dir(run, cfg, resume=True)
    run.mkdir()
    (run / "stray.txt").write_text("x")
    with pytest.raises(ConfigError, match="not a run directory"):
        guards.check_run_dir(run, cfg, resume=False)
    (run / "stray.txt").unlink()
    (run / "config.json").write_text(cfg.model_dump_json())
    assert guards.check_run_dir(run, cfg, resume=False) is False  # same config, nothing trained yet: restart
    with pytest.raises(ConfigError, match=r"different config \(batch_size, epochs differ\)"):
        guards.check_run_dir(run, cfg.model_copy(update={"epochs": 3, "batch_size": 8}), resume=False)
    with pytest.raises(ConfigError, match="no checkpoint.pt"):
        guards.check_run_dir(run, cfg, resume=True)
    (run / "checkpoint.pt").write_bytes(b"")
    with pytest.raises(ConfigError, match="pass --resume"):
        guards.check_run_dir(run, cfg, resume=False)
    # resuming may change where it stops and how many workers load, nothing that changes the result
    assert guards.check_run_dir(run, cfg.model_copy(update={"max_steps": 9, "workers": 0}), resume=True) is True
    with pytest.raises(ConfigError, match="seed differ"):
        guards.check_run_dir(run, cfg.model_copy(update={"seed": 1}), resume=True)
    assert json.loads((run / "config.json").read_text())["epochs"] == 2  # refusals never touch the run


def test_a_run_made_by_an_older_morphcache_still_resumes(tmp_path):
    """config.json of an older release lacks fields added since (they count as their defaults) and carries an
    older schema_version (the file's format, not a setting); a real difference is still refused."""
    import json

    from morphcache.errors import ConfigError
    from morphcache.schemas import RunConfig
    from morphcache.train.guards import check_run_dir

    config = RunConfig(store="s", precision="fp32")
    old = {k: v for k, v in config.model_dump(mode="json").items() if k not in ("views_used", "view_order")}
    old["schema_version"] = 2
    (tmp_path / "config.json").write_text(json.dumps(old))
    (tmp_path / "checkpoint.pt").write_bytes(b"x")
    assert check_run_dir(tmp_path, config, resume=True) is True
    with pytest.raises(ConfigError, match="seed"):
        check_run_dir(tmp_path, config.model_copy(update={"seed": 1}), resume=True)


def test_restarting_a_run_without_a_checkpoint_says_so(tmp_path, capsys):
    cfg = RunConfig(store="s", epochs=2)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(cfg.model_dump_json())
    assert guards.check_run_dir(run, cfg, resume=False) is False
    assert capsys.readouterr().err == ""  # nothing logged yet: nothing lost
    (run / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n')
    assert guards.check_run_dir(run, cfg, resume=False) is False
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "2 logged steps" in err[0] and "restarting from step 1" in err[0]
