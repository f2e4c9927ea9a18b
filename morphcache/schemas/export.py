"""JSON Schema export of every versioned model (``morphcache schemas export DIR``)."""

from __future__ import annotations

import json
from pathlib import Path

from morphcache.schemas.specs import AugmentSpec, RunConfig, StoreSpec, TeacherSpec, ViewParams

EXPORTED = (StoreSpec, TeacherSpec, AugmentSpec, ViewParams, RunConfig)


def export_json_schemas(out_dir: str | Path) -> list[Path]:
    """Write ``<Model>.schema.json`` for each model into ``out_dir``; returns the written paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for model in EXPORTED:
        path = out / f"{model.__name__}.schema.json"
        path.write_text(json.dumps(model.model_json_schema(), indent=2, sort_keys=True) + "\n")
        written.append(path)
    return written
