"""Validated, versioned metadata models (pydantic v2) with JSON round trip and JSON Schema export."""

from morphcache.schemas.specs import (
    CLIP_MEAN,
    CLIP_STD,
    IMAGENET_MEAN,
    EFFECT_FIELDS,
    IMAGENET_STD,
    N_RENDER_PARAMS,
    N_VIEW_PARAMS,
    RENDER_FIELDS,
    SCHEMA_VERSION,
    VIEW_FIELDS,
    AugmentSpec,
    RunConfig,
    StoreSpec,
    TeacherSpec,
    ViewParams,
    load_augment_spec,
)
from morphcache.schemas.versioning import load_versioned, migrate, register_migration

__all__ = [
    "AugmentSpec",
    "CLIP_MEAN",
    "CLIP_STD",
    "EFFECT_FIELDS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "N_RENDER_PARAMS",
    "N_VIEW_PARAMS",
    "RENDER_FIELDS",
    "RunConfig",
    "SCHEMA_VERSION",
    "StoreSpec",
    "TeacherSpec",
    "VIEW_FIELDS",
    "ViewParams",
    "load_augment_spec",
    "load_versioned",
    "migrate",
    "register_migration",
]
