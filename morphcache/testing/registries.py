"""Registering toy parts inside a test without leaking them into the next one.

:func:`scratch_registries` imports every module that registers built-in parts first, then restores
``catalogue.REGISTRY`` on exit. Importing the built-ins first matters: a module first imported inside the
block would register its parts into the state that is thrown away, and being already in ``sys.modules`` it would
never register them again (later tests then saw an empty teacher registry).
"""

from __future__ import annotations

import contextlib
import importlib
from typing import Iterator

import catalogue

#: Every morphcache module that registers built-in parts (checked by tests/test_architecture.py).
BUILTIN_MODULES = (
    "morphcache.extract.teachers.registry",
    "morphcache.train.objectives",
    "morphcache.train.torch_loader",
    "morphcache.train.losses.regression",
    "morphcache.evaluate.datasets",
    "morphcache.evaluate.seg_datasets",
    "morphcache.evaluate.protocols",
)


def import_builtins() -> None:
    """Import every module of :data:`BUILTIN_MODULES`, so all built-in parts are registered."""
    for name in BUILTIN_MODULES:
        importlib.import_module(name)


@contextlib.contextmanager
def scratch_registries() -> Iterator[None]:
    """Inside the block, registrations may be added freely; on exit the registries are exactly as before it
    (built-ins included)."""
    import_builtins()
    saved = dict(catalogue.REGISTRY)
    try:
        yield
    finally:
        catalogue.REGISTRY.clear()
        catalogue.REGISTRY.update(saved)
