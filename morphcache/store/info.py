"""``store info``: what a store holds, how far it is filled and what it costs on disk.

:func:`store_info` returns a JSON-ready dict; :func:`format_info` renders it for a terminal.
"""

from __future__ import annotations

import json
from dataclasses import asdict

import numpy as np

from morphcache.schemas import N_VIEW_PARAMS
from morphcache.store.feature_store import FeatureStore, ShardRowReader, stored_bytes
from morphcache.store.image_table import STATUS_REASONS
from morphcache.store.quantize import bytes_per_view
from morphcache.store.skipped import SkippedImage, skipped_images, skipped_lines


def _array_names(store: FeatureStore) -> list[str]:
    names = ["tokens", "scales", "pooled", "views", "images", "progress", "checksums"]
    return [n for n in names if (store.path / n).exists()]


def store_info(store: FeatureStore) -> dict:
    """Spec, fill progress, image status counts, every skipped image (``skipped``: image id, path relative to the
    dataset root, file, status code, reason; see :mod:`morphcache.store.skipped`), bytes on disk (total, per
    array) and bytes per view."""
    spec = store.spec
    progress = store.progress()
    status = store.image_status()
    done_chunks = int(np.count_nonzero(progress == 1))
    written_rows = int(sum(b - a for a, b in (store.chunk_row_range(c) for c in np.flatnonzero(progress == 1))))
    per_array = {name: stored_bytes(store.path, [name]) for name in _array_names(store)}
    total = stored_bytes(store.path)
    data_bytes = sum(per_array.get(n, 0) for n in ("tokens", "scales", "pooled", "views"))
    codes, counts = np.unique(status, return_counts=True)
    reader = ShardRowReader.for_array(store.path / "tokens")
    return {
        "path": str(store.path),
        "schema_version": spec.schema_version,
        "spec": json.loads(spec.model_dump_json()),
        "shape": {"images": spec.n_images, "views_per_image": spec.views_per_image, "rows": spec.n_rows,
                  "tokens": spec.n_tokens, "grid": list(spec.teacher.grid), "dim": spec.dim,
                  "pooled_dim": spec.teacher.pooled_dim, "view_params": N_VIEW_PARAMS},
        "storage": {"dtype": spec.dtype, "quantization": spec.quantization, "chunk_images": spec.chunk_images,
                    "chunk_rows": spec.chunk_rows, "compression": ("zstd" if reader and reader.blosc else
                                                                   "none" if reader else "other")},
        "progress": {"chunks_done": done_chunks, "chunks_total": spec.n_chunks,
                     "fraction": done_chunks / spec.n_chunks if spec.n_chunks else 1.0,
                     "rows_written": written_rows, "rows_servable": int(store.ok_rows().size),
                     "missing_chunks": store.missing_chunks()[:50]},
        "images": {STATUS_REASONS.get(int(c), f"status {int(c)}"): int(n) for c, n in zip(codes, counts)},
        "skipped": [asdict(s) for s in skipped_images(store)],
        "disk": {"total_bytes": total, "per_array_bytes": per_array,
                 "bytes_per_view_on_disk": data_bytes / written_rows if written_rows else None,
                 "bytes_per_view_uncompressed": bytes_per_view(spec.dtype, spec.n_tokens, spec.dim,
                                                               spec.teacher.pooled_dim, N_VIEW_PARAMS)},
    }


def _size(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)  # pragma: no cover


def format_info(info: dict) -> str:
    """Human-readable multi-line summary of :func:`store_info`."""
    s, sh, st, pr, dk = info["spec"], info["shape"], info["storage"], info["progress"], info["disk"]
    t = s["teacher"]
    lines = [
        f"store       {info['path']} (schema v{info['schema_version']}, morphcache {s.get('package_version') or '?'}, created {s.get('created')})",
        f"teacher     {t['kind']}:{t['name']} pretrained={t.get('pretrained')} {t['image_size']}px patch {t['patch_size']}"
        f" projected={t.get('projected')} precision={t.get('precision') or 'unrecorded'}"
        f" sha256={(t.get('weights_sha256') or 'none')[:12]}",
        f"rows        {sh['rows']} = {sh['images']} images x {sh['views_per_image']} views; tokens {sh['tokens']}"
        f" ({sh['grid'][0]}x{sh['grid'][1]}) x {sh['dim']}; pooled {sh['pooled_dim']}",
        f"storage     {st['dtype']} ({st['quantization']}), compression {st['compression']},"
        f" {st['chunk_images']} images / {st['chunk_rows']} rows per chunk",
        f"augment     seed {s['seed']} {json.dumps(s['augment'], separators=(',', ':'))}",
        f"progress    {pr['chunks_done']}/{pr['chunks_total']} chunks ({100 * pr['fraction']:.1f}%),"
        f" {pr['rows_written']} rows written, {pr['rows_servable']} servable",
        "images      " + ", ".join(f"{k}: {v}" for k, v in info["images"].items()),
        f"disk        {_size(dk['total_bytes'])} total; " + ", ".join(f"{k} {_size(v)}" for k, v in dk["per_array_bytes"].items()),
        f"per view    {_size(dk['bytes_per_view_on_disk'])} on disk, {_size(dk['bytes_per_view_uncompressed'])} uncompressed",
    ]
    if info["skipped"]:
        lines.append(f"skipped     {len(info['skipped'])} images in finished chunks")
        lines += skipped_lines([SkippedImage(**s) for s in info["skipped"]], info["path"])
    if pr["missing_chunks"]:
        lines.append("missing     chunks " + ", ".join(map(str, pr["missing_chunks"])) + (" ..." if pr["chunks_total"] - pr["chunks_done"] > 50 else ""))
    return "\n".join(lines)
