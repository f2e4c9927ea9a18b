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

What each registry holds (the signature a registered function must have):

- ``teachers``: ``(name, pretrained, image_size, projected, device, precision) -> Teacher``;
- ``objectives``: ``(config: RunConfig, student, target_dim) -> Objective``;
- ``losses``: ``(pred, target, *, beta) -> per-token loss float32 (B, T)`` from float32 ``(B, T, D)`` tensors
  (:mod:`morphcache.train.losses.regression`; chosen by ``RunConfig.loss``);
- ``datasets``: ``(spec: str, image_size: int) -> DatasetSplits | SegDataset``, keyed by the SPEC's kind (the
  text before ``:`` / ``?``; :mod:`morphcache.evaluate.datasets`, :mod:`morphcache.evaluate.seg_datasets`);
- ``loaders``: ``(store, sampler, render, start_step=, ...) -> batches`` (:mod:`morphcache.train.torch_loader`);
- ``protocols``: ``(backbone, data, settings: EvalSettings, shared: dict) -> ProtocolResult``
  (:mod:`morphcache.evaluate.protocols`; run by :func:`morphcache.evaluate.results.run_protocols`).
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

#: What one entry of each registry is called in error messages.
_SINGULAR = {"teachers": "teacher", "objectives": "objective", "losses": "loss", "datasets": "dataset",
             "loaders": "loader", "protocols": "protocol"}

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
    what = _SINGULAR.get(registry.namespace[-1], registry.namespace[-1])
    raise ConfigError(f"unknown {what} {name!r}; registered: {', '.join(names(registry)) or 'none'}")
