"""``morphcache store info | verify | stats | skipped | pilot`` (``replay-check`` and ``show`` are added by
``morphcache.cli``).

Exit codes: 0 success, 1 ``verify`` found bad chunks, 2 bad input (one line naming the path and the problem,
raised as :class:`morphcache.errors.StoreError` and printed by ``morphcache.cli.main``). None of these
commands modifies the store. Heavy imports (zarr, dask, matplotlib) happen inside the commands.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

app = typer.Typer(no_args_is_help=True)

StorePath = Annotated[Path, typer.Argument(help="the store directory (zarr v3 group written by extract)")]


@app.command("info")
def info_command(
    path: StorePath,
    as_json: Annotated[bool, typer.Option("--json", help="print machine-readable JSON")] = False,
) -> int:
    """Spec, fill progress, image statuses, size on disk and bytes per view."""
    from morphcache.store.feature_store import FeatureStore
    from morphcache.store.info import format_info, store_info

    info = store_info(FeatureStore.open(path, "r"))
    typer.echo(json.dumps(info, indent=1) if as_json else format_info(info))
    return 0


@app.command("skipped")
def skipped_command(
    path: StorePath,
    csv_path: Annotated[Optional[Path], typer.Option("--csv", help="write the list to this CSV file instead of stdout")] = None,
) -> int:
    """Every image extraction skipped, with its reason, as CSV: image, path (relative to the dataset root), file,
    status, reason."""
    from morphcache.errors import ConfigError
    from morphcache.store.feature_store import FeatureStore
    from morphcache.store.skipped import skipped_csv, skipped_images

    skipped = skipped_images(FeatureStore.open(path, "r"))
    text = skipped_csv(skipped)
    if csv_path is None:
        typer.echo(text, nl=False)
    else:
        try:
            csv_path.write_text(text, encoding="utf-8", newline="")
        except OSError as e:
            raise ConfigError(f"--csv {csv_path}: cannot write ({e.strerror or type(e).__name__}); pass a writable file path") from None
        typer.echo(f"{path}: {len(skipped)} skipped images written to {csv_path}")
    return 0


@app.command("verify")
def verify_command(
    path: StorePath,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress output")] = False,
) -> int:
    """Check every chunk: written, checksum matches, no NaN/inf, no pending image. Exit 1 listing bad chunks."""
    from morphcache.store.feature_store import FeatureStore
    from morphcache.store.verify import verify_store

    store = FeatureStore.open(path, "r")
    report = verify_store(store, show_progress=not quiet)
    if report.ok:
        typer.echo(f"{path}: ok, {store.n_chunks} chunks verified")
        return 0
    for line in report.lines():
        typer.echo(f"{path}: {line}")
    typer.echo(f"{path}: {len(report.problems)} of {store.n_chunks} chunks bad")
    return 1


@app.command("stats")
def stats_command(
    path: StorePath,
    out: Annotated[Optional[Path], typer.Option("--out", help="output directory (default: ./<store name>-stats)")] = None,
    dask_address: Annotated[Optional[str], typer.Option("--dask", help="'local' for an embedded LocalCluster or a scheduler address; default: threads")] = None,
    workers: Annotated[int, typer.Option(help="threads for the local scheduler")] = 2,
    k: Annotated[int, typer.Option("--k", help="neighbours for the spatial-consistency statistic")] = 8,
    bins: Annotated[int, typer.Option(help="token-norm histogram bins")] = 64,
) -> int:
    """Per-channel mean/std, token-norm histogram, neighbour cosine and spatial consistency (stats.json + PNG)."""
    from morphcache.errors import StoreError
    from morphcache.store.feature_store import FeatureStore
    from morphcache.store.stats import run_stats

    store = FeatureStore.open(path, "r")
    if store.ok_rows().size == 0:
        raise StoreError(f"{path}: no servable rows yet (0 of {store.n_chunks} chunks complete with ok images); run extract first")
    out_dir = out if out is not None else Path.cwd() / f"{Path(path).resolve().name}-stats"
    json_path, png_path = run_stats(store, out_dir, dask_address=dask_address, workers=workers, k=k, bins=bins)
    stats = json.loads(json_path.read_text())
    typer.echo(f"rows {stats['rows']}  4-neighbour cosine {stats['neighbour_cosine']:.4f}  "
               f"top-{stats['knn_k']} adjacent {stats['knn_adjacent_fraction']:.4f} (chance {stats['knn_adjacent_chance']:.4f})")
    typer.echo(f"wrote {json_path} and {png_path}")
    return 0


@app.command("pilot")
def pilot_command(
    path: StorePath,
    out: Annotated[Optional[Path], typer.Option("--out", help="output directory (default: ./<store name>-pilot)")] = None,
    run_config: Annotated[Optional[Path], typer.Option("--run-config", help="take the DTM settings (N, K, merge rule, seed) from a training run's directory or config.json")] = None,
    max_merge: Annotated[Optional[int], typer.Option("--max-merge", help="DTM N (default: the run's, else every token of the grid)")] = None,
    max_iters: Annotated[Optional[int], typer.Option("--max-iters", help="DTM K (default: the run's, else training's default)")] = None,
    merge_rule: Annotated[Optional[str], typer.Option("--merge-rule", help="released | exact (default: the run's, else training's default)")] = None,
    cases: Annotated[int, typer.Option(help="morphing cases sampled from the (n, k) distribution")] = 8,
    rows: Annotated[Optional[int], typer.Option(help="a seeded random subset of this many servable rows (default: all)")] = None,
    classify_images: Annotated[int, typer.Option("--classify-images", help="labelled images for the token-classification test (half train, half test)")] = 256,
    seed: Annotated[Optional[int], typer.Option(help="seed of the cases and subsets (default: the run's, else 0)")] = None,
    dask_address: Annotated[Optional[str], typer.Option("--dask", help="'local' for an embedded LocalCluster or a scheduler address; default: threads")] = None,
    workers: Annotated[int, typer.Option(help="threads for the local scheduler")] = 2,
) -> int:
    """DTM's pilot on this store: neighbour cosine by grid distance, variance DTM removes, token classification."""
    from morphcache.store.feature_store import FeatureStore
    from morphcache.store.pilot import PilotConfig, run_pilot

    overrides = dict(max_merge=max_merge, max_iters=max_iters, rule=merge_rule, cases=cases, rows=rows,
                     classify_images=classify_images, seed=seed)
    cfg = PilotConfig.from_run(run_config, **overrides) if run_config else PilotConfig.defaults(**overrides)
    store = FeatureStore.open(path, "r")
    out_dir = out if out is not None else Path.cwd() / f"{Path(path).resolve().name}-pilot"
    json_path, png_path, pilot = run_pilot(store, out_dir, cfg, dask_address=dask_address, workers=workers)
    typer.echo(f"rows {pilot['rows']}  neighbour cosine {pilot['neighbour_cosine']:.4f}  "
               f"variance removed by DTM {100 * pilot['removed_share']:.1f}%")
    cls = pilot["token_classification"]
    if cls:
        typer.echo(f"token classification: {cls['raw_correct_tokens_per_image']:.1f} raw vs "
                   f"{cls['morphed_correct_tokens_per_image']:.1f} morphed correct tokens of {cls['tokens_per_image']}")
    typer.echo(pilot["verdict"])
    typer.echo(f"wrote {json_path} and {png_path}")
    return 0
