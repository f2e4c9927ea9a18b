"""Schema versions: refuse the unknown, migrate the old.

``load_versioned(StoreSpec, data, source=path)`` validates a JSON document. A document without
``schema_version`` or with a version newer than this package understands is refused with a message naming both
versions; an older version is upgraded one step at a time by the functions registered in :data:`MIGRATIONS`.
"""

from __future__ import annotations

from typing import Any, Callable, TypeVar

from pydantic import BaseModel, ValidationError

from morphcache.errors import StoreError
from morphcache.schemas.specs import SCHEMA_VERSION

M = TypeVar("M", bound=BaseModel)

#: ``MIGRATIONS[(model_name, v)]`` turns a version-``v`` dict into a version ``v + 1`` dict.
MIGRATIONS: dict[tuple[str, int], Callable[[dict[str, Any]], dict[str, Any]]] = {}


def register_migration(model_name: str, from_version: int):
    """Decorator: register the upgrade of ``model_name`` documents from ``from_version`` to the next."""

    def wrap(fn: Callable[[dict[str, Any]], dict[str, Any]]):
        MIGRATIONS[(model_name, from_version)] = fn
        return fn

    return wrap


def migrate(model_name: str, data: dict[str, Any], source: str = "document") -> dict[str, Any]:
    """Upgrade ``data`` to :data:`SCHEMA_VERSION`, or raise a one-line :class:`StoreError`."""
    version = data.get("schema_version")
    if not isinstance(version, int):
        raise StoreError(f"{source}: {model_name} has no integer schema_version (got {version!r}); not a morphcache document")
    if version > SCHEMA_VERSION:
        raise StoreError(
            f"{source}: {model_name} schema version {version} is newer than this morphcache understands "
            f"(version {SCHEMA_VERSION}); upgrade morphcache"
        )
    while version < SCHEMA_VERSION:
        step = MIGRATIONS.get((model_name, version))
        if step is None:
            raise StoreError(
                f"{source}: {model_name} schema version {version} cannot be migrated to version {SCHEMA_VERSION}; "
                "re-create it with this morphcache"
            )
        data = step(dict(data))
        version = data["schema_version"] = version + 1
    return data


def load_versioned(model: type[M], data: dict[str, Any], source: str = "document") -> M:
    """Migrate then validate ``data`` as ``model``; errors become one line naming ``source``.

    Raises:
        StoreError: ``data`` is not a dict, has no integer ``schema_version``, a version this package cannot
            migrate, or fields that fail validation.
    """
    if not isinstance(data, dict):
        raise StoreError(f"{source}: expected a JSON object for {model.__name__}, got {type(data).__name__}")
    data = migrate(model.__name__, data, source)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first["loc"]) or "<root>"
        raise StoreError(f"{source}: invalid {model.__name__}: {loc}: {first['msg']}") from None


# ------------------------------------------------------------------------------------------ registered migrations
@register_migration("StoreSpec", 1)
def _store_spec_1_to_2(doc: dict[str, Any]) -> dict[str, Any]:
    """Schema 2 adds ``teacher.precision``; schema-1 stores did not record it, so it stays None (unknown)."""
    return doc


@register_migration("StoreSpec", 2)
def _store_spec_2_to_3(doc: dict[str, Any]) -> dict[str, Any]:
    """Schema 3 adds ``image_source`` (tar shard input); every schema-2 store was extracted from loose files."""
    doc.setdefault("image_source", "files")
    return doc


@register_migration("RunConfig", 1)
def _run_config_1_to_2(doc: dict[str, Any]) -> dict[str, Any]:
    """RunConfig is unchanged in schema 2."""
    return doc


@register_migration("RunConfig", 2)
def _run_config_2_to_3(doc: dict[str, Any]) -> dict[str, Any]:
    """RunConfig is unchanged in schema 3."""
    return doc
