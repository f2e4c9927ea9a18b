"""``morphcache study run | report | replay``: the evidence study (see :mod:`morphcache.study.runner`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from morphcache.study.plan import StudySizes

study_app = typer.Typer(no_args_is_help=True, help="Cache vs live teacher, views per image, DTM vs token-wise, "
                        "int8 vs float16, DTM on spatially inconsistent targets.")
_D = StudySizes()
_OUT = typer.Option("--out", help="study directory (resumable: finished runs are kept)")


@study_app.command("run")
def run_command(
    out: Annotated[Path, _OUT],
    data: Annotated[Optional[Path], typer.Option("--data", help="image folder to pretrain on (default: Fashion-MNIST as in the demo)")] = None,
    eval_dataset: Annotated[Optional[str], typer.Option("--eval-dataset", help="labelled dataset SPEC for k-NN / probe (default: the demo data's)")] = None,
    images: Annotated[int, typer.Option(help="pretraining images")] = _D.images,
    views: Annotated[int, typer.Option(help="views per image in the store (serves V = 1, 2, 4, ..., views)")] = _D.views,
    epochs: Annotated[int, typer.Option(help="student epochs (at most --views: the live teacher needs a fresh view per epoch)")] = _D.epochs,
    batch_size: Annotated[int, typer.Option("--batch-size")] = _D.batch_size,
    q1_seeds: Annotated[int, typer.Option("--q1-seeds", help="seeds per Q1 setting (cache V, live teacher)")] = _D.q1_seeds,
    q2_seeds: Annotated[int, typer.Option("--q2-seeds", help="seeds per Q2 setting (DTM, token-wise)")] = _D.q2_seeds,
    q3_seeds: Annotated[int, typer.Option("--q3-seeds", help="seeds per Q3 setting (int8, float16)")] = _D.q3_seeds,
    q4_seeds: Annotated[int, typer.Option("--q4-seeds", help="seeds per Q4 setting (noisy targets)")] = _D.q4_seeds,
    q3_views: Annotated[int, typer.Option("--q3-views", help="views per image of Q3's float16 store (compared with the int8 store's first N views)")] = _D.q3_views,
    eval_train: Annotated[int, typer.Option("--eval-train", help="labelled train images the k-NN / probe fit on")] = _D.eval_train,
    eval_test: Annotated[int, typer.Option("--eval-test", help="labelled test images (10000: Fashion-MNIST's whole test set)")] = _D.eval_test,
    probe_epochs: Annotated[int, typer.Option("--probe-epochs", help="linear-probe epochs")] = _D.probe_epochs,
    noise_cosine: Annotated[float, typer.Option("--noise-cosine", help="Q4: neighbour-token cosine of the noisy targets")] = _D.noise_cosine,
    questions: Annotated[str, typer.Option(help="comma list of q1,q2,q3,q4")] = ",".join(_D.questions),
    teacher_eval: Annotated[bool, typer.Option("--teacher-eval/--no-teacher-eval", help="also evaluate the teacher (reference row, last)")] = True,
    loader: Annotated[str, typer.Option(help="dali | torch")] = "dali",
) -> int:
    """Run (or resume) the whole study into --out; summary.json, tables.md and PNGs are refreshed after each run."""
    from morphcache.study.runner import StudyRunner

    sizes = StudySizes(images=images, views=views, epochs=epochs, batch_size=batch_size, q1_seeds=q1_seeds,
                       q2_seeds=q2_seeds, q3_seeds=q3_seeds, q4_seeds=q4_seeds, q3_views=q3_views, eval_train=eval_train,
                       eval_test=eval_test, probe_epochs=probe_epochs, noise_cosine=noise_cosine,
                       questions=tuple(q.strip() for q in questions.split(",") if q.strip()))
    runner = StudyRunner(out, sizes, data=data, eval_dataset=eval_dataset, teacher_eval=teacher_eval, loader=loader,
                         log=lambda line: typer.echo(line, err=True))
    runner.run()
    typer.echo((out / "tables.md").read_text())
    return 0


@study_app.command("report")
def report_command(out: Annotated[Path, _OUT]) -> int:
    """Recompute summary.json, tables.md and the PNGs from the runs finished so far."""
    from morphcache.study.report import write_report

    summary = write_report(out)
    typer.echo((out / "tables.md").read_text())
    typer.echo(f"wrote {out / 'summary.json'} ({summary['finished_runs']} of {summary['planned_runs']} runs)")
    return 0


@study_app.command("replay")
def replay_command(
    out: Annotated[Path, typer.Option("--out", help="study directory holding finished runs (gains replay.json)")],
    steps: Annotated[int, typer.Option(help="training steps replayed per run")] = 6,
    run: Annotated[Optional[list[str]], typer.Option("--run", help="run id to replay (repeatable; default: every finished run)")] = None,
) -> int:
    """Retrain the first --steps steps of finished runs with the installed code and compare their losses with the
    recorded ones (replay.json); exit 1 when any step differs."""
    from morphcache.study.replay import replay_study

    record = replay_study(out, steps, run, log=lambda line: typer.echo(line, err=True))
    for run_id, r in record["runs"].items():
        typer.echo(f"{run_id}: max |loss difference| over {steps} steps {r['max_abs_diff']:.3g}")
    verdict = "identical to the recorded runs" if record["all_identical"] else "DIFFERENT from the recorded runs"
    typer.echo(f"wrote {out / 'replay.json'}: {len(record['runs'])} run(s) replayed, {verdict}")
    return 0 if record["all_identical"] else 1
