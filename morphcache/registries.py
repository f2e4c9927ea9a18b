"""Registries of the parts a user can add without editing morphcache: teachers, objectives, losses, datasets,
loaders and evaluation protocols.

Each registry is a `catalogue <https://github.com/explosion/catalogue>`_ function registry (the one spaCy and
thinc use), so a part is one function plus a decorator, in the style of timm's ``register_model``::

    from morphcache.registries import teachers

    @teachers.register("my_teacher")
    def load_my_teacher(name, pretrained, image_size, projected, device, precision):
        ...  # return a morphcache.extract.teachers.Teacher

Installed packages can also register through entry points (group ``morphcache_teachers`` and so on), so a
plug-in package needs no import at all. :func:`lookup` resolves a name or alias with a one-line error listing
what is registered; :func:`names` lists a registry for ``--help`` texts.
"""

from __future__ import annotations

from typing import Any, Callable

import catalogue

from morphcache.errors import ConfigError

teachers = catalogue.create("morphcache", "teachers", entry_points=True)
objectives = catalogue.create("morphcache", "objectives", entry_points=True)
losses = catalogue.create("morphcache", "losses", entry_points=True)
datasets = catalogue.create("morphcache", "datasets", entry_points=True)
loaders = catalogue.create("morphcache", "loaders", entry_points=True)
protocols = catalogue.create("morphcache", "protocols", entry_points=True)

#: Alternative spellings accepted for a registered name, per registry: ``{registry namespace: {alias: name}}``.
_ALIASES: dict[tuple[str, ...], dict[str, str]] = {}


def add_aliases(registry: catalogue.Registry, aliases: dict[str, str]) -> None:
    """Accept each ``alias`` key as another spelling of the registered name it maps to."""
    _ALIASES.setdefault(tuple(registry.namespace), {}).update(aliases)


def names(registry: catalogue.Registry) -> list[str]:
    """The registered names of ``registry``, sorted (entry points of installed plug-ins included)."""
    return sorted(registry.get_all())


def canonical_name(registry: catalogue.Registry, name: str) -> str:
    """``name`` with a known alias replaced by the name it stands for (unknown names are returned as given)."""
    return _ALIASES.get(tuple(registry.namespace), {}).get(name, name)


def lookup(registry: catalogue.Registry, name: str) -> Callable[..., Any]:
    """The function registered under ``name`` (or an alias of it).

    Raises:
        ConfigError: nothing is registered under that name; the message lists what is.
    """
    key = canonical_name(registry, name)
    if key in registry:
        return registry.get(key)
    what = registry.namespace[-1][:-1]
    raise ConfigError(f"unknown {what} {name!r}; registered: {', '.join(names(registry)) or 'none'}")
