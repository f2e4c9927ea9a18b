"""The settings of the evaluation protocols (pydantic models): the one definition of each knob, its default,
description and allowed range.

Each protocol module re-exports its model (``morphcache.evaluate.knn.KnnConfig`` and so on);
:class:`EvalSettings` bundles them with the feature batch, precision and device for
:func:`morphcache.evaluate.results.run_protocols`. ``model_dump()`` of a protocol's model is what its result rows
record under ``config`` (the same keys and values as before these were pydantic models). The ``morphcache eval``
commands copy their protocol options from these fields (:mod:`morphcache.evaluate.config`). This module imports
only pydantic, so the CLI can build its options without torch. Invalid values raise
:class:`pydantic.ValidationError` (a ``ValueError``); :func:`morphcache.config_cli.validate_config` turns it into
one line naming the field, the value and the rule.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class KnnConfig(BaseModel):
    """Settings of the k-NN protocol; ``model_dump()`` is what a result row's ``config`` records."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    k: int = Field(default=20, gt=0, description="neighbours (clipped to the training-set size)")
    temperature: float = Field(default=0.07, gt=0, description="vote weight exp(sim / T)")
    chunk_size: int = Field(default=1024, gt=0, description="test samples scored per matrix product (memory only)")


class LinearProbeConfig(BaseModel):
    """Settings of the linear probe; ``model_dump()`` is what a result row's ``config`` records."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    epochs: int = Field(default=50, gt=0, description="probe epochs over the cached features")
    batch_size: int = Field(default=128, gt=0, description="probe mini-batch, samples")
    lr: float = Field(default=3e-3, gt=0, description="probe peak learning rate (cosine decay per step)")
    weight_decay: float = Field(default=0.0, ge=0, description="probe weight decay")
    optimizer: Literal["adamw", "sgd"] = Field(default="adamw", description="adamw, or sgd with momentum 0.9")
    seed: int = Field(default=0, description="seed of the probe init and the batch order")


class FinetuneConfig(BaseModel):
    """Settings of full fine-tuning (see module doc); ``model_dump()`` is what a result row's ``config`` records."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    epochs: int = Field(default=1, gt=0, description="passes over the training split")
    batch_size: int = Field(default=32, gt=0, description="images per step")
    lr: float = Field(default=5e-4, gt=0, description="peak learning rate of the head; block i gets "
                      "lr * decay^(L+1-i)")
    min_lr: float = Field(default=1e-6, ge=0, description="final learning rate of the cosine decay")
    weight_decay: float = Field(default=0.05, ge=0, description="AdamW weight decay (matrices only)")
    layer_decay: float = Field(default=0.75, gt=0, le=1, description="layer-wise lr decay (1 = off)")
    drop_path: float = Field(default=0.1, ge=0, lt=1, description="stochastic depth of the last block")
    label_smoothing: float = Field(default=0.1, ge=0, lt=1, description="cross-entropy label smoothing")
    warmup_fraction: float = Field(default=0.1, ge=0, lt=1, description="fraction of the steps in linear warmup")
    crop_scale: float = Field(default=0.35, gt=0, le=1, description="smallest area fraction of the random crop")
    hflip: float = Field(default=0.5, ge=0, le=1, description="horizontal-flip probability (0 for digits / text)")
    max_steps: int | None = Field(default=None, ge=1, description="stop after this many steps (None: all epochs)")
    precision: Literal["fp32", "bf16"] = Field(default="fp32", description="autocast precision of the steps")
    seed: int = Field(default=0, description="seed of the head init, batch order and augmentation")


class SegProbeConfig(BaseModel):
    """Settings of the segmentation probe (see module doc); ``model_dump()`` is what a result row's ``config``
    records (with ``label_size`` resolved)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    layers: int = Field(default=1, ge=1, description="concatenate the patch tokens of the last N blocks")
    batchnorm: bool = Field(default=True, description="BatchNorm (no affine) before the head")
    epochs: int = Field(default=20, gt=0, description="probe epochs over the cached tokens")
    batch_size: int = Field(default=16, gt=0, description="images per probe step (and per feature batch)")
    lr: float = Field(default=1e-3, gt=0, description="probe learning rate (AdamW, cosine)")
    weight_decay: float = Field(default=1e-4, ge=0, description="probe weight decay")
    optimizer: Literal["adamw", "sgd"] = Field(default="adamw", description="adamw, or sgd with momentum 0.9")
    label_size: int | None = Field(default=None, gt=0, description="side of the label maps scored, pixels "
                                   "(default: the backbone's input side)")
    seed: int = Field(default=0, description="seed of the probe init and the batch order")
    n_examples: int = Field(default=4, ge=0, json_schema_extra={"cli_flags": "--examples"},
                            description="validation images kept for the report's figure")


class EvalSettings(BaseModel):
    """Everything a protocol run needs besides the backbone and the data: each built-in protocol's settings, the
    feature batch, the (resolved) precision and the device."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    knn: KnnConfig = Field(default_factory=KnnConfig, description="k-NN settings")
    linear: LinearProbeConfig = Field(default_factory=LinearProbeConfig, description="linear-probe settings")
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig, description="fine-tuning settings")
    segment: SegProbeConfig = Field(default_factory=SegProbeConfig, description="segmentation-probe settings")
    batch_size: int = Field(default=64, gt=0, description="images per forward pass of the frozen backbone")
    precision: Literal["fp32", "bf16"] = Field(default="fp32", description="autocast precision (resolved)")
    device: str = Field(default="cpu", description="torch device the backbone is on, e.g. cpu or cuda:0")
