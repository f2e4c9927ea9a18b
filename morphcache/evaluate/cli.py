"""``morphcache eval knn|linear|frozen|finetune|transfer|segment`` and ``morphcache report``.

Each eval command loads a backbone (``--checkpoint``: a training checkpoint, ``teacher:NAME`` or
``random:MODEL``) and a dataset SPEC, runs the protocol, appends one JSON line per result to ``--results``
(default: ``eval.jsonl`` in the checkpoint's run directory, or in the current directory for reference models),
keeps the resolved config beside it (``eval.<command>.config.json``, loadable with ``--config``) and prints a
one-line summary. The options of each command are generated from its model in :mod:`morphcache.evaluate.config`;
heavy imports (torch) happen inside the functions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from morphcache.config_cli import options_from_model
from morphcache.evaluate.config import EVAL_COMMANDS, EvalOptions

eval_app = typer.Typer(no_args_is_help=True, help="Evaluate a checkpoint or a reference model.")


def run_eval_command(model: type[EvalOptions], values: dict) -> int:
    """Validate ``values`` against ``model`` (an eval command's options), run its protocols, append the rows to
    the results file, keep the resolved config beside it and print one line per row.

    Raises:
        ConfigError: an invalid option (one line naming it).
        MorphcacheError: a missing checkpoint, dataset folder or unwritable results file.
    """
    import torch

    from morphcache.config_cli import validate_config
    from morphcache.device import describe, resolve_device, resolve_precision
    from morphcache.evaluate.backbones import load_backbone
    from morphcache.evaluate.config import write_resolved_config
    from morphcache.evaluate.dataset_loading import load_dataset, load_seg_dataset
    from morphcache.evaluate.results import append_result, format_row, run_protocols
    from morphcache.evaluate.segmentation import save_examples
    from morphcache.evaluate.transfer import run_transfer

    options = validate_config(model, values)
    segment = options.COMMAND == "segment"
    seg_data = load_seg_dataset(options.dataset) if segment else None  # before the model: fail fast
    if options.threads > 0:
        torch.set_num_threads(options.threads)
    device = resolve_device(options.device)
    precision = resolve_precision(options.precision, device, allowed=("fp32", "bf16"))
    path = options.results_path()
    resolved = options.model_copy(update={"precision": precision, "device": device, "results": str(path)})
    settings = resolved.settings(precision, device)
    pooling = {"pooling": options.pooling} if "pooling" in model.model_fields else {}
    backbone = load_backbone(options.checkpoint, options.img_size, **pooling).to(device)
    artifacts: dict = {}
    transfer = options.COMMAND == "transfer"
    data = None if transfer else seg_data if segment else load_dataset(options.dataset, backbone.img_size)
    # the device line comes after everything that can refuse bad input (checkpoint, dataset), so a refusal is the
    # command's only line
    typer.echo(f"eval: {describe(device, precision, options.device, options.precision)}")
    if transfer:
        rows = run_transfer(backbone, options.dataset, options.to, options.protocols, settings, options.source)
    else:
        rows = run_protocols(options.PROTOCOLS, backbone, data, settings, artifacts=artifacts)
    write_resolved_config(resolved, path)
    for row in rows:
        examples = artifacts.get(row["protocol"], {}).get("examples")
        if examples is not None and settings.segment.n_examples > 0:
            save_examples(path, row, examples)
        append_result(path, row)
        typer.echo(format_row(row))
    typer.echo(f"appended {len(rows)} row(s) to {path}")
    return 0


def _eval_command(model: type[EvalOptions]) -> None:
    """Register ``morphcache eval COMMAND`` with the options of ``model`` (see :mod:`morphcache.config_cli`)."""

    def command(values: dict) -> int:
        return run_eval_command(model, values)

    command.__doc__ = model.__doc__ + " Every option can also come from --config FILE (YAML/JSON; flags win); " \
        "the resolved config is kept beside the results file."
    command.__name__ = f"{model.COMMAND}_command"
    eval_app.command(model.COMMAND)(options_from_model(model)(command))


for _model in EVAL_COMMANDS.values():
    _eval_command(_model)


def report_command(
    run_dirs: Annotated[list[Path], typer.Argument(help="run directories (metrics.jsonl, eval.jsonl, config.json)")],
    out: Annotated[Path, typer.Option("--out", "-o", help="output directory for report.md and PNGs")] = Path("report"),
    results: Annotated[Optional[list[Path]], typer.Option("--results", help="extra results files")] = None,
    images: Annotated[int, typer.Option("--images", help="images in the token PCA maps")] = 4,
) -> int:
    """Write a Markdown + PNG report: loss curves, accuracy table, token PCA maps."""
    from morphcache.evaluate.report import write_report

    md = write_report(run_dirs, out, results or (), images)
    empty = [line for line in md.read_text(encoding="utf-8").splitlines() if line.startswith("No evaluation rows")]
    if empty:  # the accuracy table is empty: say where rows were looked for
        typer.echo(f"report: {empty[0].replace('`', '')}")
    typer.echo(str(md))
    return 0
