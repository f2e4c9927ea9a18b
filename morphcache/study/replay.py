"""Replay a finished study's runs with the installed code: do its numbers still describe this version?

A study takes hours; the code goes on changing after it ran. :func:`replay_study` retrains the first ``steps``
steps of each finished run (``runs/<id>/result.json``) from its recorded config, with the same target transform
(Q4's :class:`~morphcache.study.noise.TokenNoise` from ``noise.json``), and compares the per-step training loss
with the run's own ``metrics.jsonl``. Training is deterministic for a config and seed on one machine (data order,
views, masks and DTM cases come from seeded generators; see ``morphcache.train.loop``), so a replay equal to the
recording shows that the installed code trains those runs exactly as the study did; any change of data order,
masks, rendering, targets, model or optimiser shows as a difference at some step.

Results go to ``OUT/replay.json``::

    {"steps": S, "all_identical": bool, "max_abs_diff": float,
     "runs": {run_id: {"recorded": [S losses], "replayed": [S losses], "max_abs_diff": float}}}

The replays train in a temporary folder that is deleted afterwards; the study folder gains only ``replay.json``.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Callable, Iterable

from morphcache.errors import ConfigError


def recorded_losses(run_dir: Path, steps: int) -> list[float]:
    """The first ``steps`` training losses of ``run_dir/metrics.jsonl`` (one per optimiser step)."""
    from morphcache.evaluate.report import load_metrics

    return [float(row["loss"]) for row in load_metrics(run_dir)[:steps]]


def finished_runs(out: Path) -> list[str]:
    """Ids of the runs under ``out/runs`` that have a ``result.json``, sorted."""
    runs = out / "runs"
    return sorted(p.name for p in runs.iterdir() if (p / "result.json").is_file()) if runs.is_dir() else []


def _run_config(out: Path, result: dict):
    from morphcache.schemas import RunConfig

    config = dict(result["config"])
    store = Path(config["store"])
    if not store.exists() and (out / "stores" / store.name).exists():  # the study folder was moved
        config["store"] = str(out / "stores" / store.name)
    return RunConfig.model_validate(config)


def _noise(out: Path):
    from morphcache.study.noise import TokenNoise

    rec = json.loads((out / "noise.json").read_text())
    return TokenNoise(rec["sigma"], rec["seed"])


def replay_run(out: Path, run_id: str, steps: int, scratch: Path) -> dict:
    """Retrain the first ``steps`` steps of ``out/runs/run_id`` in ``scratch``; returns its ``replay.json`` entry.

    Raises:
        ConfigError: the run has fewer than ``steps`` recorded steps.
        ConfigError, StoreNotFoundError, MorphcacheError: as :func:`morphcache.train.loop.run_training`.
    """
    from morphcache.study.runner import STUDENT_SIZE
    from morphcache.train.loop import run_training

    run_dir = out / "runs" / run_id
    result = json.loads((run_dir / "result.json").read_text())
    recorded = recorded_losses(run_dir, steps)
    if len(recorded) < steps:
        raise ConfigError(f"{run_dir / 'metrics.jsonl'}: {len(recorded)} recorded steps, fewer than --steps "
                          f"{steps}; pass a smaller --steps")
    config = _run_config(out, result).model_copy(update={"max_steps": steps})
    transform = _noise(out) if result["setting"].get("noise") else None
    run_training(config, scratch / run_id, img_size=STUDENT_SIZE, tensorboard=False, show_progress=False,
                 target_transform=transform)
    replayed = recorded_losses(scratch / run_id, steps)
    return {"recorded": recorded, "replayed": replayed,
            "max_abs_diff": max(abs(a - b) for a, b in zip(recorded, replayed))}


def replay_study(out: str | Path, steps: int = 6, run_ids: Iterable[str] | None = None,
                 log: Callable[[str], None] = lambda line: None) -> dict:
    """Replay ``run_ids`` (default: every finished run) of the study in ``out``; writes and returns ``replay.json``.

    Raises:
        ConfigError: ``steps`` < 1, no finished run, or a named run that has not finished.
        as :func:`replay_run`.
    """
    out = Path(out)
    if steps < 1:
        raise ConfigError(f"--steps {steps}: replay at least one step")
    done = finished_runs(out)
    if not done:
        raise ConfigError(f"{out}: no finished study run (runs/<id>/result.json); pass the --out of a study run")
    wanted = list(run_ids) if run_ids else done
    unknown = [r for r in wanted if r not in done]
    if unknown:
        raise ConfigError(f"--run {unknown[0]}: not a finished run of {out}; finished: {', '.join(done)}")
    runs = {}
    with tempfile.TemporaryDirectory(prefix="morphcache-replay-") as scratch:
        for i, run_id in enumerate(wanted, 1):
            log(f"replay: {i}/{len(wanted)} {run_id} ({steps} steps)")
            runs[run_id] = replay_run(out, run_id, steps, Path(scratch))
    worst = max(r["max_abs_diff"] for r in runs.values())
    record = {"steps": steps, "all_identical": worst == 0.0, "max_abs_diff": worst, "runs": runs}
    (out / "replay.json").write_text(json.dumps(record, indent=2) + "\n")
    return record
