"""Loading an evaluation dataset by SPEC: the one place every built-in dataset loader is registered before a name
is looked up (as timm's ``create_model`` sits above the modules that register models).

A SPEC's kind (the text before ``:`` and ``?``) names a function in :data:`morphcache.registries.datasets`:
classification kinds from :mod:`morphcache.evaluate.datasets` (``fashion-mnist``, ``digits``, ``cifar10``,
``cifar100``, ``folder``), segmentation kinds from :mod:`morphcache.evaluate.seg_datasets` (``ade20k``,
``seg-folder``), and anything a user or plug-in registers.
"""

from __future__ import annotations

from morphcache import registries
from morphcache.errors import ConfigError
from morphcache.evaluate import seg_datasets as _seg_datasets  # noqa: F401  (registers ade20k, seg-folder)
from morphcache.evaluate.datasets import DatasetSplits, dataset_kind
from morphcache.evaluate.seg_datasets import SegDataset


def load_any_dataset(spec: str, image_size: int = 224):
    """The dataset of ``spec`` from the loader registered under its kind: a classification :class:`DatasetSplits`
    or a segmentation :class:`SegDataset`. ``image_size`` only matters for loaders that decode to a fixed side.

    Raises:
        ConfigError: nothing is registered under the kind (the message lists what is).
        MorphcacheError: the loader's own checks (missing folder, bad option, ...).
    """
    return registries.lookup(registries.datasets, dataset_kind(spec))(spec, image_size)


def load_dataset(spec: str, image_size: int = 224) -> DatasetSplits:
    """The classification dataset ``spec`` (forms: :mod:`morphcache.evaluate.datasets`).

    Raises:
        ConfigError: an unregistered kind (the message lists what is registered), or a segmentation dataset.
        MorphcacheError: the loader's own checks.
    """
    data = load_any_dataset(spec, image_size)
    if not isinstance(data, DatasetSplits):
        raise ConfigError(f"dataset {spec!r} is not a classification dataset ({type(data).__name__}); use it with "
                          "eval segment")
    return data


def load_seg_dataset(spec: str) -> SegDataset:
    """The image/mask pairs of the segmentation dataset ``spec`` (forms: :mod:`morphcache.evaluate.seg_datasets`);
    nothing is decoded yet.

    Raises:
        ConfigError: an unregistered kind (the message lists what is registered), or a classification dataset.
        MorphcacheError: a missing folder, an image without a mask, a missing class list or an unknown option.
    """
    data = load_any_dataset(spec)
    if not isinstance(data, SegDataset):
        raise ConfigError(f"dataset {spec!r} is not a segmentation dataset ({type(data).__name__}); pass "
                          "ade20k:DIR, seg-folder:DIR or another registered segmentation dataset")
    return data
