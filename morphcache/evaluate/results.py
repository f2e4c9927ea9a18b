"""Run evaluation protocols and record each result as one JSON line.

A row: ``protocol`` (a name registered in :data:`morphcache.registries.protocols`: knn / linear / finetune /
segment built in, see :mod:`morphcache.evaluate.protocols`),
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
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable

from morphcache import registries
from morphcache.errors import ConfigError, MorphcacheError
from morphcache.evaluate.settings import EvalSettings


def append_result(path: str | os.PathLike, row: dict) -> dict:
    """Append ``row`` as one JSON line to ``path`` (created with its parents); adds ``timestamp`` and
    ``morphcache_version`` when absent. Returns the row as written.

    Raises:
        MorphcacheError: the results file cannot be written (the message names it).
    """
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


def load_results(path: str | os.PathLike) -> list[dict]:
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


def run_protocols(protocols: Iterable[str], backbone, data, settings: EvalSettings | None = None,
                  transfer_from: str | None = None, artifacts: dict | None = None) -> list[dict]:
    """Run each protocol, looked up by name in :data:`morphcache.registries.protocols` (see
    :mod:`morphcache.evaluate.protocols`), on ``data`` (a :class:`~morphcache.evaluate.datasets.DatasetSplits`, or
    a :class:`~morphcache.evaluate.seg_datasets.SegDataset` for ``segment``); frozen features are extracted once
    and shared by k-NN and the linear probe. Returns the rows (not yet written); each protocol's
    ``ProtocolResult.artifacts`` go to ``artifacts[name]`` when a dict is passed.

    Raises:
        ConfigError: no protocol, a name that is not registered (the message lists what is), data of the wrong
            kind for a protocol, or a protocol that does not return a ProtocolResult.
    """
    from morphcache.evaluate.protocols import ProtocolResult  # also registers the built-in protocols

    settings = settings or EvalSettings()
    protocols = list(protocols)
    if not protocols:
        raise ConfigError(f"no protocol given; registered: {', '.join(registries.names(registries.protocols))}")
    functions = [registries.lookup(registries.protocols, p) for p in protocols]  # every name checked up front
    skipped = data.skipped_line() if hasattr(data, "skipped_line") else None
    if skipped:  # files of a folder: dataset that were left out, named once before the protocols run
        print(f"morphcache: {skipped}", file=sys.stderr)
    shared: dict = {}
    rows = []
    for protocol, run in zip(protocols, functions):
        start = time.perf_counter()
        result = run(backbone, data, settings, shared)
        if not isinstance(result, ProtocolResult):
            raise ConfigError(f"protocol {protocol!r} returned {type(result).__name__}, not a ProtocolResult; see "
                              "morphcache.evaluate.protocols")
        row = {"protocol": protocol, "dataset": data.name, "backbone": backbone.spec,
               "backbone_info": backbone.describe(), "config": result.config, "metrics": result.metrics,
               "seconds": round(time.perf_counter() - start, 3)}
        if transfer_from is not None:
            row["transfer_from"] = transfer_from
        if artifacts is not None:
            artifacts[protocol] = result.artifacts
        rows.append(row)
    return rows


def format_row(row: dict) -> str:
    """One line for the terminal: ``knn digits random:vit_tiny top1=42.00 top5=80.00``."""
    metrics = row.get("metrics", {})
    shown = " ".join(f"{k}={metrics[k]:.2f}" for k in ("top1", "top5", "miou", "pixel_acc")
                     if isinstance(metrics.get(k), (int, float)))
    via = f" (transfer from {row['transfer_from']})" if row.get("transfer_from") else ""
    return f"{row.get('protocol')} {row.get('dataset')}{via} {row.get('backbone')}: {shown}"
