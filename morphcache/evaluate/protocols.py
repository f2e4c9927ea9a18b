"""The evaluation protocols, registered in :data:`morphcache.registries.protocols`.

A protocol is one function plus a decorator; :func:`morphcache.evaluate.results.run_protocols` looks each name up
and turns its :class:`ProtocolResult` into a result row::

    @morphcache.registries.protocols.register("my_protocol")
    def my_protocol(backbone, data, settings, shared) -> ProtocolResult:
        ...  # return ProtocolResult(config={...}, metrics={"top1": ...})

Arguments: ``backbone`` (:class:`~morphcache.evaluate.backbones.Backbone`), ``data`` (a
:class:`~morphcache.evaluate.datasets.DatasetSplits`, or a :class:`~morphcache.evaluate.seg_datasets.SegDataset`
for ``segment``), ``settings`` (:class:`~morphcache.evaluate.results.EvalSettings`) and ``shared``, a dict that
lives for one ``run_protocols`` call (k-NN and the linear probe keep the frozen features there, so the backbone runs
once for both). Built in: ``knn``, ``linear``, ``finetune`` (classification) and ``segment`` (segmentation).
``transfer`` (the same protocols on a second dataset) and ``frozen`` (knn + linear) are ways of running these,
not protocols. Heavy imports (torch) happen inside the functions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from morphcache import registries
from morphcache.errors import ConfigError


@dataclass
class ProtocolResult:
    """What a protocol returns: ``config`` and ``metrics`` (JSON-able dicts, written to the row as they are) and
    ``artifacts`` (anything else for the caller, never written to the row: e.g. ``segment``'s example arrays)."""

    config: dict
    metrics: dict
    artifacts: dict[str, Any] = field(default_factory=dict)


def base_config(backbone, data, settings) -> dict:
    """The settings every classification row records: input side, pooling, batch, precision and split sizes."""
    return {"img_size": backbone.img_size, "pooling": backbone.pooling, "batch_size": settings.batch_size,
            "precision": settings.precision, "n_train": int(len(data.train_labels)),
            "n_test": int(len(data.test_labels)), "n_classes": data.n_classes}


def _classification(data, protocol: str) -> None:
    """Raises:
        ConfigError: ``data`` is not a labelled classification split (e.g. a segmentation dataset)."""
    from morphcache.evaluate.datasets import DatasetSplits

    if not isinstance(data, DatasetSplits):
        raise ConfigError(f"protocol {protocol!r} needs a classification dataset, got {type(data).__name__} "
                          f"{getattr(data, 'name', '')!r}; use eval segment for segmentation datasets")


def frozen_features(backbone, data, settings, shared: dict):
    """(train, test) pooled features ``float32 (N, F)``, extracted once per ``shared`` dict."""
    if "features" not in shared:
        from morphcache.evaluate.features import split_features

        shared["features"] = split_features(backbone, data, settings.batch_size, settings.precision, settings.device)
    return shared["features"]


@registries.protocols.register("knn")
def knn_protocol(backbone, data, settings, shared: dict) -> ProtocolResult:
    """Weighted k-NN on frozen features (:mod:`morphcache.evaluate.knn`, ``settings.knn``)."""
    from morphcache.evaluate.knn import knn_evaluate

    _classification(data, "knn")
    train_f, test_f = frozen_features(backbone, data, settings, shared)
    config = {**base_config(backbone, data, settings), "feature_dim": int(train_f.shape[1]),
              **settings.knn.model_dump()}
    metrics = knn_evaluate(train_f, data.train_labels, test_f, data.test_labels, data.n_classes, settings.knn)
    return ProtocolResult(config, metrics)


@registries.protocols.register("linear")
def linear_protocol(backbone, data, settings, shared: dict) -> ProtocolResult:
    """Linear probe on frozen features (:mod:`morphcache.evaluate.linear_probe`, ``settings.linear``)."""
    from morphcache.evaluate.linear_probe import linear_probe_evaluate

    _classification(data, "linear")
    train_f, test_f = frozen_features(backbone, data, settings, shared)
    config = {**base_config(backbone, data, settings), "feature_dim": int(train_f.shape[1]),
              **settings.linear.model_dump()}
    metrics = linear_probe_evaluate(train_f, data.train_labels, test_f, data.test_labels, data.n_classes,
                                    settings.linear)
    return ProtocolResult(config, metrics)


@registries.protocols.register("finetune")
def finetune_protocol(backbone, data, settings, shared: dict) -> ProtocolResult:
    """Full fine-tuning of a copy of the backbone (:mod:`morphcache.evaluate.finetune`, ``settings.finetune``)."""
    from morphcache.evaluate.finetune import finetune

    _classification(data, "finetune")
    config = {**base_config(backbone, data, settings), **settings.finetune.model_dump()}
    metrics = finetune(backbone, data, settings.finetune, settings.device, settings.batch_size).metrics
    return ProtocolResult(config, metrics)


@registries.protocols.register("segment")
def segment_protocol(backbone, data, settings, shared: dict) -> ProtocolResult:
    """Linear segmentation probe on frozen patch tokens (:mod:`morphcache.evaluate.segmentation`,
    ``settings.segment``); ``artifacts["examples"]`` holds the arrays for
    :func:`~morphcache.evaluate.segmentation.save_examples`."""
    from morphcache.evaluate.seg_datasets import SegDataset
    from morphcache.evaluate.segmentation import segmentation_evaluate

    if not isinstance(data, SegDataset):
        raise ConfigError(f"protocol 'segment' needs a segmentation dataset (ade20k:DIR | seg-folder:DIR), got "
                          f"{getattr(data, 'name', type(data).__name__)!r}")
    row, examples = segmentation_evaluate(backbone, data, settings.segment, settings.batch_size, settings.precision,
                                          settings.device)
    return ProtocolResult(row["config"], row["metrics"], {"examples": examples})
