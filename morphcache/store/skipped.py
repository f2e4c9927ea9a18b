"""Which images a store skipped, and why: one rule shared by ``extract``'s summary, ``store info`` and
``store skipped``.

An image is *skipped* when its chunk is finished and its status is a bad-image reason
(:data:`~morphcache.store.image_table.STATUS_REASONS` other than ok and pending); such images keep zero rows and
are never served. Images of unfinished chunks are not counted yet (a resumed run may still process them).
"""

from __future__ import annotations

import csv
import io
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from morphcache.store.image_table import STATUS_OK, STATUS_PENDING, STATUS_REASONS

#: Skipped images the end-of-run summary and ``store info`` name before pointing at the full list.
SHOWN = 5
CSV_COLUMNS = ("image", "path", "file", "status", "reason")


@dataclass(frozen=True)
class SkippedImage:
    """One skipped image: ``image`` id, ``path`` relative to the dataset root, ``file`` = root / path, the
    ``status`` code and its ``reason`` text."""

    image: int
    path: str
    file: str
    status: int
    reason: str


def skipped_images(store) -> list[SkippedImage]:
    """Every skipped image of ``store`` (a :class:`~morphcache.store.feature_store.FeatureStore`), in id order."""
    status = store.image_status()
    done = np.repeat(store.progress() == 1, store.spec.chunk_images)[: store.spec.n_images]
    ids = np.flatnonzero(done & (status != STATUS_OK) & (status != STATUS_PENDING))
    if ids.size == 0:
        return []
    paths = store.image_table().path
    root = Path(store.spec.dataset_root)
    return [SkippedImage(int(i), str(paths[i]), str(root / str(paths[i])), int(status[i]),
                         STATUS_REASONS.get(int(status[i]), f"status {int(status[i])}")) for i in ids]


def skipped_counts(skipped: list[SkippedImage]) -> dict[str, int]:
    """Reason -> number of skipped images."""
    counts: dict[str, int] = {}
    for s in skipped:
        counts[s.reason] = counts.get(s.reason, 0) + 1
    return counts


def skipped_lines(skipped: list[SkippedImage], store_path: str | Path, shown: int = SHOWN) -> list[str]:
    """Terminal lines: the first ``shown`` skipped files with reasons, then where the full list is."""
    if not skipped:
        return []
    lines = [f"  {s.path}: {s.reason}" for s in skipped[:shown]]
    more = f"{len(skipped) - shown} more; " if len(skipped) > shown else ""
    lines.append(f"  ({more}full list: morphcache store skipped {store_path} [--csv FILE], or store info --json)")
    return lines


def skipped_csv(skipped: list[SkippedImage]) -> str:
    """CSV text with a header row (:data:`CSV_COLUMNS`), one row per skipped image."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for s in skipped:
        writer.writerow(asdict(s))
    return buf.getvalue()
