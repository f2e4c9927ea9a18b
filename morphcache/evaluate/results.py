"""Run evaluation protocols and record each result as one JSON line.

A row: ``protocol`` (knn / linear / finetune, or ``segment`` from :mod:`morphcache.evaluate.segmentation`),
``dataset`` (the SPEC), ``backbone`` (the SPEC) and ``backbone_info``, ``config`` (protocol settings plus image
size, pooling, split sizes), ``metrics`` (percent ``top1``, ``top5``...; ``miou``, ``pixel_acc``... for segment),
optional ``transfer_from``, ``seconds``, ``timestamp`` (UTC ISO) and ``morphcache_version``. Files are appended
to, never rewritten.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable

from morphcache.errors import ConfigError, MorphcacheError
from morphcache.evaluate.finetune import FinetuneConfig, finetune
from morphcache.evaluate.knn import KnnConfig, knn_evaluate
from morphcache.evaluate.linear_probe import LinearProbeConfig, linear_probe_evaluate

PROTOCOLS: tuple[str, ...] = ("knn", "linear", "finetune")


@dataclass
class EvalSettings:
    """Everything a protocol run needs besides the backbone and the data."""

    knn: KnnConfig = field(default_factory=KnnConfig)
    linear: LinearProbeConfig = field(default_factory=LinearProbeConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    batch_size: int = 64
    precision: str = "fp32"
    device: str = "cpu"


def append_result(path: str | os.PathLike, row: dict) -> dict:
    """Append ``row`` as one JSON line to ``path`` (created with its parents); adds ``timestamp`` and
    ``morphcache_version`` when absent. Returns the row as written."""
    from morphcache import __version__

    row = dict(row)
    row.setdefault("timestamp", datetime.now(timezone.utc).isoformat(timespec="seconds"))
    row.setdefault("morphcache_version", __version__)
    line = json.dumps(row, sort_keys=True, default=_jsonable)
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as f:
            f.write(line + "\n")
    except OSError as exc:
        raise MorphcacheError(f"cannot append to results file {path} ({exc.strerror}); pass a writable --results") from None
    return row


def read_results(path: str | os.PathLike) -> list[dict]:
    """All JSON-object lines of a results file (blank or malformed lines are skipped); [] if it is missing."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict):
            rows.append(obj)
    return rows


def _jsonable(obj):
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, (set, tuple)):
        return list(obj)
    if isinstance(obj, Path):
        return str(obj)
    return str(obj)


def _base_config(backbone, data, settings: EvalSettings) -> dict:
    return {"img_size": backbone.img_size, "pooling": backbone.pooling, "batch_size": settings.batch_size,
            "precision": settings.precision, "n_train": int(len(data.train_labels)),
            "n_test": int(len(data.test_labels)), "n_classes": data.n_classes}


def run_protocols(protocols: Iterable[str], backbone, data, settings: EvalSettings | None = None,
                  transfer_from: str | None = None) -> list[dict]:
    """Run each protocol on ``data`` (a :class:`DatasetSplits`); frozen features are extracted once and shared by
    k-NN and the linear probe. Returns the rows (not yet written)."""
    from morphcache.evaluate.features import split_features

    settings = settings or EvalSettings()
    protocols = list(protocols)
    unknown = [p for p in protocols if p not in PROTOCOLS]
    if unknown or not protocols:
        raise ConfigError(f"unknown protocol(s) {unknown or protocols}; use {', '.join(PROTOCOLS)}")
    skipped = data.skipped_line() if hasattr(data, "skipped_line") else None
    if skipped:  # files of a folder: dataset that were left out, named once before the protocols run
        print(f"morphcache: {skipped}", file=sys.stderr)
    features = None
    rows = []
    for protocol in protocols:
        start = time.perf_counter()
        config = _base_config(backbone, data, settings)
        if protocol in ("knn", "linear"):
            if features is None:
                features = split_features(backbone, data, settings.batch_size, settings.precision, settings.device)
            train_f, test_f = features
            config["feature_dim"] = int(train_f.shape[1])
            if protocol == "knn":
                config.update(settings.knn.to_dict())
                metrics = knn_evaluate(train_f, data.train_labels, test_f, data.test_labels, data.n_classes,
                                       settings.knn)
            else:
                config.update(settings.linear.to_dict())
                metrics = linear_probe_evaluate(train_f, data.train_labels, test_f, data.test_labels,
                                                data.n_classes, settings.linear)
        else:
            config.update(settings.finetune.to_dict())
            metrics = finetune(backbone, data, settings.finetune, settings.device, settings.batch_size).metrics
        row = {"protocol": protocol, "dataset": data.name, "backbone": backbone.spec,
               "backbone_info": backbone.describe(), "config": config, "metrics": metrics,
               "seconds": round(time.perf_counter() - start, 3)}
        if transfer_from is not None:
            row["transfer_from"] = transfer_from
        rows.append(row)
    return rows


def format_row(row: dict) -> str:
    """One line for the terminal: ``knn digits random:vit_tiny top1=42.00 top5=80.00``."""
    metrics = row.get("metrics", {})
    shown = " ".join(f"{k}={metrics[k]:.2f}" for k in ("top1", "top5", "miou", "pixel_acc")
                     if isinstance(metrics.get(k), (int, float)))
    via = f" (transfer from {row['transfer_from']})" if row.get("transfer_from") else ""
    return f"{row.get('protocol')} {row.get('dataset')}{via} {row.get('backbone')}: {shown}"
