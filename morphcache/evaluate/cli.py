"""``morphcache eval knn|linear|frozen|finetune|transfer|segment`` and ``morphcache report``.

Each eval command loads a backbone (``--checkpoint``: a training checkpoint, ``teacher:NAME`` or
``random:MODEL``) and a dataset SPEC, runs the protocol, appends one JSON line per result to ``--results``
(default: ``eval.jsonl`` in the checkpoint's run directory, or in the current directory for reference models) and
prints a one-line summary. Heavy imports happen inside the functions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

eval_app = typer.Typer(no_args_is_help=True, help="Evaluate a checkpoint or a reference model.")

_CKPT = typer.Option("--checkpoint", "-c", help="checkpoint .pt, checkpoint:PATH, teacher:NAME or random:MODEL")
_DATA = typer.Option("--dataset", "-d", help="fashion-mnist[:DIR] | digits | cifar10:DIR | cifar100:DIR | "
                                            "folder:DIR, optionally ?train=N&test=M&seed=S")
_RESULTS = typer.Option("--results", help="JSON-lines file to append to (default: RUN_DIR/eval.jsonl)")
_SIZE = typer.Option("--img-size", help="input side in pixels (default: the model's)")
_BATCH = typer.Option("--batch-size", help="images per forward pass")
_PREC = typer.Option("--precision", help="auto (bf16 on a GPU that has it, fp32 on CPU), fp32 or bf16 (autocast)")
_DEVICE = typer.Option("--device", help="auto (CUDA when available), cpu, cuda or cuda:N")
_POOL = typer.Option("--pooling", help="cls, mean or cls+mean")
_THREADS = typer.Option("--threads", help="torch CPU threads (0 = torch default)")


def default_results_path(spec: str) -> Path:
    """``eval.jsonl`` in the run directory of a checkpoint (the nearest of its parent / grandparent holding
    ``config.json`` or ``metrics.jsonl``, else its parent); ``./eval.jsonl`` for teacher / random specs."""
    kind, sep, arg = spec.partition(":")
    if sep and kind in ("teacher", "random"):
        return Path("eval.jsonl")
    path = Path(arg if (sep and kind == "checkpoint") else spec).expanduser()
    for d in (path.parent, path.parent.parent):
        if (d / "config.json").is_file() or (d / "metrics.jsonl").is_file():
            return d / "eval.jsonl"
    return path.parent / "eval.jsonl"


def _run(protocols: list[str], checkpoint: str, dataset: str, results: Optional[Path], img_size: Optional[int],
         batch_size: int, precision: str, pooling: str, threads: int, to: Optional[str] = None,
         include_source: bool = True, device: str = "auto", **configs) -> int:
    import dataclasses

    import torch

    from morphcache.device import describe, resolve_device, resolve_precision

    from morphcache.evaluate.backbones import load_backbone
    from morphcache.evaluate.datasets import load_dataset
    from morphcache.evaluate.results import EvalSettings, append_result, format_row, run_protocols
    from morphcache.evaluate.transfer import run_transfer

    if threads > 0:
        torch.set_num_threads(threads)
    chosen_device = resolve_device(device)
    chosen_precision = resolve_precision(precision, chosen_device, allowed=("fp32", "bf16"))
    typer.echo(f"eval: {describe(chosen_device, chosen_precision, device, precision)}")
    if "finetune" in configs:
        configs["finetune"] = dataclasses.replace(configs["finetune"], precision=chosen_precision)
    backbone = load_backbone(checkpoint, img_size, pooling).to(chosen_device)
    settings = EvalSettings(batch_size=batch_size, precision=chosen_precision, device=chosen_device, **configs)
    if to is None:
        rows = run_protocols(protocols, backbone, load_dataset(dataset, backbone.img_size), settings)
    else:
        rows = run_transfer(backbone, dataset, to, protocols, settings, include_source)
    path = results or default_results_path(checkpoint)
    for row in rows:
        append_result(path, row)
        typer.echo(format_row(row))
    typer.echo(f"appended {len(rows)} row(s) to {path}")
    return 0


@eval_app.command("knn")
def knn_command(
    checkpoint: Annotated[str, _CKPT], dataset: Annotated[str, _DATA],
    results: Annotated[Optional[Path], _RESULTS] = None, img_size: Annotated[Optional[int], _SIZE] = None,
    batch_size: Annotated[int, _BATCH] = 64, precision: Annotated[str, _PREC] = "auto", device: Annotated[str, _DEVICE] = "auto",
    pooling: Annotated[str, _POOL] = "cls+mean", threads: Annotated[int, _THREADS] = 0,
    k: Annotated[int, typer.Option(help="neighbours")] = 20,
    temperature: Annotated[float, typer.Option(help="vote weight exp(sim / T)")] = 0.07,
) -> int:
    """Weighted k-NN on frozen features (cosine, k 20, T 0.07)."""
    from morphcache.evaluate.knn import KnnConfig

    return _run(["knn"], checkpoint, dataset, results, img_size, batch_size, precision, pooling, threads, device=device,
                knn=KnnConfig(k=k, temperature=temperature))


@eval_app.command("linear")
def linear_command(
    checkpoint: Annotated[str, _CKPT], dataset: Annotated[str, _DATA],
    results: Annotated[Optional[Path], _RESULTS] = None, img_size: Annotated[Optional[int], _SIZE] = None,
    batch_size: Annotated[int, _BATCH] = 64, precision: Annotated[str, _PREC] = "auto", device: Annotated[str, _DEVICE] = "auto",
    pooling: Annotated[str, _POOL] = "cls+mean", threads: Annotated[int, _THREADS] = 0,
    epochs: Annotated[int, typer.Option(help="probe epochs over the cached features")] = 50,
    lr: Annotated[float, typer.Option(help="probe learning rate")] = 3e-3,
    optimizer: Annotated[str, typer.Option(help="adamw or sgd")] = "adamw",
    seed: Annotated[int, typer.Option()] = 0,
) -> int:
    """Linear probe on frozen features (BatchNorm without affine + linear, as MAE)."""
    from morphcache.evaluate.linear_probe import LinearProbeConfig

    return _run(["linear"], checkpoint, dataset, results, img_size, batch_size, precision, pooling, threads, device=device,
                linear=LinearProbeConfig(epochs=epochs, lr=lr, optimizer=optimizer, seed=seed))


@eval_app.command("frozen")
def frozen_command(
    checkpoint: Annotated[str, _CKPT], dataset: Annotated[str, _DATA],
    results: Annotated[Optional[Path], _RESULTS] = None, img_size: Annotated[Optional[int], _SIZE] = None,
    batch_size: Annotated[int, _BATCH] = 64, precision: Annotated[str, _PREC] = "auto", device: Annotated[str, _DEVICE] = "auto",
    pooling: Annotated[str, _POOL] = "cls+mean", threads: Annotated[int, _THREADS] = 0,
    k: Annotated[int, typer.Option(help="k-NN neighbours")] = 20,
    temperature: Annotated[float, typer.Option(help="k-NN vote weight exp(sim / T)")] = 0.07,
    epochs: Annotated[int, typer.Option(help="linear-probe epochs over the cached features")] = 50,
    lr: Annotated[float, typer.Option(help="linear-probe learning rate")] = 3e-3,
    seed: Annotated[int, typer.Option()] = 0,
) -> int:
    """k-NN and linear probe on one pass of frozen features (the backbone runs once for both)."""
    from morphcache.evaluate.knn import KnnConfig
    from morphcache.evaluate.linear_probe import LinearProbeConfig

    return _run(["knn", "linear"], checkpoint, dataset, results, img_size, batch_size, precision, pooling, threads, device=device,
                knn=KnnConfig(k=k, temperature=temperature), linear=LinearProbeConfig(epochs=epochs, lr=lr, seed=seed))


@eval_app.command("finetune")
def finetune_command(
    checkpoint: Annotated[str, _CKPT], dataset: Annotated[str, _DATA],
    results: Annotated[Optional[Path], _RESULTS] = None, img_size: Annotated[Optional[int], _SIZE] = None,
    batch_size: Annotated[int, _BATCH] = 32, precision: Annotated[str, _PREC] = "auto", device: Annotated[str, _DEVICE] = "auto",
    pooling: Annotated[str, _POOL] = "mean", threads: Annotated[int, _THREADS] = 0,
    epochs: Annotated[int, typer.Option()] = 1,
    lr: Annotated[float, typer.Option(help="peak learning rate of the head; block i gets lr * decay^(L+1-i)")] = 5e-4,
    layer_decay: Annotated[float, typer.Option(help="layer-wise lr decay (1 = off)")] = 0.75,
    drop_path: Annotated[float, typer.Option(help="stochastic depth of the last block")] = 0.1,
    max_steps: Annotated[Optional[int], typer.Option(help="stop after this many steps")] = None,
    hflip: Annotated[float, typer.Option(help="horizontal-flip probability (0 for digits / text)")] = 0.5,
    seed: Annotated[int, typer.Option()] = 0,
) -> int:
    """Full fine-tuning (layer-wise lr decay, drop path), then test accuracy."""
    from morphcache.evaluate.finetune import FinetuneConfig

    cfg = FinetuneConfig(epochs=epochs, batch_size=batch_size, lr=lr, layer_decay=layer_decay, drop_path=drop_path,
                         max_steps=max_steps, hflip=hflip, precision=precision, seed=seed)
    return _run(["finetune"], checkpoint, dataset, results, img_size, batch_size, precision, pooling, threads, device=device,
                finetune=cfg)


@eval_app.command("transfer")
def transfer_command(
    checkpoint: Annotated[str, _CKPT], dataset: Annotated[str, _DATA],
    to: Annotated[str, typer.Option("--to", help="the second (target) dataset SPEC")],
    protocols: Annotated[str, typer.Option(help="comma-separated: knn, linear, finetune")] = "knn,linear",
    source: Annotated[bool, typer.Option("--source/--no-source", help="also evaluate on --dataset")] = True,
    results: Annotated[Optional[Path], _RESULTS] = None, img_size: Annotated[Optional[int], _SIZE] = None,
    batch_size: Annotated[int, _BATCH] = 64, precision: Annotated[str, _PREC] = "auto", device: Annotated[str, _DEVICE] = "auto",
    pooling: Annotated[str, _POOL] = "cls+mean", threads: Annotated[int, _THREADS] = 0,
    max_steps: Annotated[Optional[int], typer.Option(help="fine-tuning steps cap")] = None,
) -> int:
    """The same protocols on a second dataset (--to); its rows record transfer_from = --dataset."""
    from morphcache.evaluate.finetune import FinetuneConfig

    names = [p.strip() for p in protocols.split(",") if p.strip()]
    return _run(names, checkpoint, dataset, results, img_size, batch_size, precision, pooling, threads, device=device, to=to,
                include_source=source, finetune=FinetuneConfig(max_steps=max_steps, precision=precision))


@eval_app.command("segment")
def segment_command(
    checkpoint: Annotated[str, _CKPT],
    dataset: Annotated[str, typer.Option("--dataset", "-d", help="ade20k:DIR | seg-folder:DIR, optionally "
                                         "?train=N&test=M&seed=S (seg-folder also &ignore=I)")],
    results: Annotated[Optional[Path], _RESULTS] = None, img_size: Annotated[Optional[int], _SIZE] = None,
    batch_size: Annotated[int, _BATCH] = 16, precision: Annotated[str, _PREC] = "auto",
    device: Annotated[str, _DEVICE] = "auto", threads: Annotated[int, _THREADS] = 0,
    layers: Annotated[int, typer.Option(help="concatenate the patch tokens of the last N blocks")] = 1,
    batchnorm: Annotated[bool, typer.Option("--batchnorm/--no-batchnorm", help="BatchNorm before the head")] = True,
    label_size: Annotated[Optional[int], typer.Option(help="side of the label maps scored (default: --img-size)")]
    = None,
    epochs: Annotated[int, typer.Option(help="probe epochs over the cached tokens")] = 20,
    lr: Annotated[float, typer.Option(help="probe learning rate (AdamW, cosine)")] = 1e-3,
    examples: Annotated[int, typer.Option(help="validation images kept for the report's figure")] = 4,
    seed: Annotated[int, typer.Option()] = 0,
) -> int:
    """Linear segmentation probe on frozen patch tokens (resized evaluation): mIoU, pixel accuracy, per-class IoU."""
    import torch

    from morphcache.device import describe, resolve_device, resolve_precision
    from morphcache.evaluate.backbones import load_backbone
    from morphcache.evaluate.results import append_result, format_row
    from morphcache.evaluate.seg_datasets import load_seg_dataset
    from morphcache.evaluate.segmentation import SegProbeConfig, save_examples, segmentation_evaluate

    if threads > 0:
        torch.set_num_threads(threads)
    cfg = SegProbeConfig(layers=layers, batchnorm=batchnorm, epochs=epochs, batch_size=batch_size, lr=lr,
                         label_size=label_size, seed=seed, n_examples=examples)
    data = load_seg_dataset(dataset)  # before the model: a wrong option or folder fails fast
    chosen_device = resolve_device(device)
    chosen_precision = resolve_precision(precision, chosen_device, allowed=("fp32", "bf16"))
    typer.echo(f"eval: {describe(chosen_device, chosen_precision, device, precision)}")
    backbone = load_backbone(checkpoint, img_size).to(chosen_device)
    row, shown = segmentation_evaluate(backbone, data, cfg, batch_size, chosen_precision, device=chosen_device)
    path = results or default_results_path(checkpoint)
    if examples > 0:
        save_examples(path, row, shown)
    append_result(path, row)
    typer.echo(format_row(row))
    typer.echo(f"appended 1 row to {path}")
    return 0


def report_command(
    run_dirs: Annotated[list[Path], typer.Argument(help="run directories (metrics.jsonl, eval.jsonl, config.json)")],
    out: Annotated[Path, typer.Option("--out", "-o", help="output directory for report.md and PNGs")] = Path("report"),
    results: Annotated[Optional[list[Path]], typer.Option("--results", help="extra results files")] = None,
    images: Annotated[int, typer.Option("--images", help="images in the token PCA maps")] = 4,
) -> int:
    """Write a Markdown + PNG report: loss curves, accuracy table, token PCA maps."""
    from morphcache.evaluate.report import write_report

    md = write_report(run_dirs, out, results or (), images)
    typer.echo(str(md))
    return 0
