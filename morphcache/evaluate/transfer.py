"""Transfer: the same protocols on a second dataset.

A backbone is evaluated on the source dataset (the one it was pretrained on, or a reference task) and on a
target dataset with the same protocols and settings. Target rows carry ``transfer_from`` (the source SPEC) so
reports can set each target score beside its source score; ``gap`` rows are not written, the report derives them.
"""

from __future__ import annotations

from typing import Iterable

from morphcache.errors import ConfigError
from morphcache.evaluate.dataset_loading import load_dataset
from morphcache.evaluate.results import EvalSettings, run_protocols


def run_transfer(backbone, source: str, target: str, protocols: Iterable[str] = ("knn", "linear"),
                 settings: EvalSettings | None = None, include_source: bool = True) -> list[dict]:
    """Run ``protocols`` on ``target`` (rows with ``transfer_from=source``), and on ``source`` first when
    ``include_source``. ``source``/``target`` are dataset SPECs. Returns the rows (not yet written).

    Raises:
        ConfigError: the source and target datasets are the same; MorphcacheError / ConfigError from loading either.
    """
    if source == target:
        raise ConfigError(f"transfer needs two different datasets, got {source!r} twice; change --to")
    protocols = list(protocols)
    rows: list[dict] = []
    if include_source:
        rows += run_protocols(protocols, backbone, load_dataset(source, backbone.img_size), settings)
    target_data = load_dataset(target, backbone.img_size)
    rows += run_protocols(protocols, backbone, target_data, settings, transfer_from=source)
    return rows


def transfer_summary(rows: list[dict]) -> list[dict]:
    """Per protocol: ``{'protocol', 'source', 'target', 'source_top1', 'target_top1'}`` from run_transfer rows."""
    source_rows = {(r["protocol"], r["dataset"]): r for r in rows if not r.get("transfer_from")}
    out = []
    for r in rows:
        src = r.get("transfer_from")
        if not src:
            continue
        s = source_rows.get((r["protocol"], src))
        out.append({"protocol": r["protocol"], "source": src, "target": r["dataset"],
                    "source_top1": s["metrics"].get("top1") if s else None,
                    "target_top1": r["metrics"].get("top1")})
    return out
