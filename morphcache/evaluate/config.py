"""One pydantic model per ``morphcache eval`` command: the single definition of its options and of ``--config``.

Each command's options are generated from its model (:func:`morphcache.config_cli.options_from_model`), as
``train``'s are from :class:`~morphcache.schemas.RunConfig`: ``--config eval.yaml`` (YAML or JSON) sets any field,
explicit flags override the file, and an unknown key or an invalid value is one line naming it (exit 2).

The fields are not written twice: the common ones (backbone, results file, batch, precision, device, threads) live
in :class:`EvalOptions` / :class:`ClassifyOptions`, and a command's protocol fields are *copied* from the
protocol's own settings model (:class:`~morphcache.evaluate.knn.KnnConfig`,
:class:`~morphcache.evaluate.linear_probe.LinearProbeConfig`, :class:`~morphcache.evaluate.finetune.FinetuneConfig`,
:class:`~morphcache.evaluate.segmentation.SegProbeConfig`) with their descriptions, defaults and constraints
(:func:`command_model`). :meth:`EvalOptions.settings` turns a command's values back into the
:class:`~morphcache.evaluate.results.EvalSettings` the library runs with.

A run writes its resolved config (precision and device resolved, the results path filled in) beside the results
file as ``<results stem>.<command>.config.json`` (:func:`write_resolved_config`), so
``morphcache eval knn --config RUN_DIR/eval.knn.config.json`` repeats it.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, create_model, field_validator

from morphcache import registries
from morphcache.errors import ConfigError, MorphcacheError
from morphcache.evaluate import datasets as _datasets
from morphcache.evaluate import protocols as _protocols  # noqa: F401  (registers the built-in protocols)
from morphcache.evaluate import seg_datasets as _seg_datasets  # noqa: F401  (registers ade20k, seg-folder)
from morphcache.evaluate.settings import EvalSettings, FinetuneConfig, KnnConfig, LinearProbeConfig, SegProbeConfig

_DATASET_SYNTAX = "KIND[:ARG][?train=N&test=M&seed=S]"


def default_results_path(spec: str) -> Path:
    """``eval.jsonl`` in the run directory of a checkpoint (the nearest of its parent / grandparent holding
    ``config.json`` or ``metrics.jsonl``, else its parent); ``./eval.jsonl`` for teacher / random specs."""
    kind, sep, arg = spec.partition(":")
    if sep and kind in ("teacher", "random"):
        return Path("eval.jsonl")
    path = Path(arg if (sep and kind == "checkpoint") else spec).expanduser()
    for d in (path.parent, path.parent.parent):
        if (d / "config.json").is_file() or (d / "metrics.jsonl").is_file():
            return d / "eval.jsonl"
    return path.parent / "eval.jsonl"


def check_dataset_spec(spec: str) -> str:
    """``spec`` unchanged when its kind is registered in :data:`morphcache.registries.datasets`.

    Raises:
        ValueError: an unregistered kind; the message lists what is registered (pydantic turns it into the
            field's one-line error).
    """
    try:
        registries.lookup(registries.datasets, _datasets.dataset_kind(spec))
    except ConfigError as exc:
        raise ValueError(str(exc)) from None
    return spec


#: A dataset SPEC whose kind is registered (checked when the options are validated, before anything loads).
DatasetSpec = Annotated[str, AfterValidator(check_dataset_spec)]


class EvalOptions(BaseModel):
    """Options every ``morphcache eval`` command takes. ``PARTS`` (set by :func:`command_model`) maps a protocol's
    :class:`~morphcache.evaluate.results.EvalSettings` field to its settings model and the fields of this command
    that fill it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    COMMAND: ClassVar[str] = ""
    PROTOCOLS: ClassVar[tuple[str, ...]] = ()
    PARTS: ClassVar[dict[str, tuple[type[BaseModel], tuple[str, ...]]]] = {}

    checkpoint: str = Field(description="checkpoint .pt, checkpoint:PATH, teacher:NAME or random:MODEL",
                            json_schema_extra={"cli_flags": ["--checkpoint", "-c"]})
    results: str | None = Field(default=None, description="JSON-lines file to append to (default: RUN_DIR/eval.jsonl "
                                "or ./eval.jsonl); the resolved config is written beside it")
    img_size: int | None = Field(default=None, gt=0, description="input side in pixels (default: the model's)")
    batch_size: int = Field(default=64, gt=0, description="images per forward pass")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        default="auto", description="auto (bf16 on a GPU that has it, fp32 on CPU), fp32 or bf16 (autocast)")
    device: str = Field(default="auto", description="auto (CUDA when available), cpu, cuda or cuda:N")
    threads: int = Field(default=0, ge=0, description="torch CPU threads (0 = torch default)")

    def results_path(self) -> Path:
        """``results``, or :func:`default_results_path` of the checkpoint."""
        return Path(self.results).expanduser() if self.results else default_results_path(self.checkpoint)

    def protocol_config(self, part: str, **resolved: Any) -> BaseModel:
        """The settings model of ``part`` (e.g. ``"knn"``) from this command's fields plus ``resolved`` values;
        fields the command does not expose keep the model's defaults."""
        model, names = self.PARTS[part]
        return model(**{n: getattr(self, n) for n in names}, **resolved)

    def settings(self, precision: str, device: str) -> EvalSettings:
        """The :class:`~morphcache.evaluate.settings.EvalSettings` of this command at the resolved ``precision``
        (``fp32`` / ``bf16``) and ``device``."""
        parts = {p: self.protocol_config(p, **({"precision": precision} if "precision" in model.model_fields else {}))
                 for p, (model, _) in self.PARTS.items()}
        return EvalSettings(batch_size=self.batch_size, precision=precision, device=device, **parts)


class ClassifyOptions(EvalOptions):
    """Options of the classification commands (knn, linear, frozen, finetune, transfer)."""

    dataset: DatasetSpec = Field(description=f"dataset SPEC {_DATASET_SYNTAX}, e.g. fashion-mnist[:DIR], digits, "
                         "cifar10:DIR, folder:DIR", json_schema_extra={"cli_flags": ["--dataset", "-d"],
                                                                        "cli_registry": "datasets"})
    pooling: Literal["cls", "mean", "cls+mean"] = Field(default="cls+mean", description="pooled feature of the "
                                                         "backbone")


class _TransferOptions(ClassifyOptions):
    to: DatasetSpec = Field(description="the second (target) dataset SPEC; its rows record transfer_from = --dataset",
                    json_schema_extra={"cli_flags": ["--to"], "cli_registry": "datasets"})
    protocols: list[str] = Field(default=["knn", "linear"], min_length=1, description="comma-separated protocols "
                                 "run on both datasets", json_schema_extra={"cli_type": "str",
                                                                            "cli_registry": "protocols"})
    source: bool = Field(default=True, description="also evaluate on --dataset",
                         json_schema_extra={"cli_flags": "--source/--no-source"})

    @field_validator("protocols", mode="before")
    @classmethod
    def _split(cls, value):
        if isinstance(value, str):
            return [p.strip() for p in value.split(",") if p.strip()]
        return value

    @field_validator("protocols")
    @classmethod
    def _registered(cls, value: list[str]) -> list[str]:
        for name in value:
            try:
                registries.lookup(registries.protocols, name)
            except ConfigError as exc:
                raise ValueError(str(exc)) from None
        return value


class _SegmentOptions(EvalOptions):
    dataset: DatasetSpec = Field(description=f"segmentation dataset SPEC {_DATASET_SYNTAX}: ade20k:DIR | seg-folder:DIR "
                         "(seg-folder also &ignore=I)", json_schema_extra={"cli_flags": ["--dataset", "-d"],
                                                                            "cli_registry": "datasets"})


def _copied(model: type[BaseModel], name: str, **default: Any) -> tuple[Any, Any]:
    """``(annotation, FieldInfo)`` of ``model.name`` for :func:`pydantic.create_model`, optionally with another
    default (``default=...``)."""
    info = copy.copy(model.model_fields[name])
    if "default" in default:
        info.default = default["default"]
    return info.annotation, info


def command_model(command: str, base: type[EvalOptions], doc: str,
                  parts: dict[str, tuple[type[BaseModel], tuple[str, ...]]], protocols: tuple[str, ...] = (),
                  defaults: dict[str, Any] | None = None) -> type[EvalOptions]:
    """The options model of ``morphcache eval COMMAND``: ``base``'s fields (``defaults`` replacing some of their
    defaults) plus, per protocol part, the named fields copied from its settings model. A name that ``base``
    already has (e.g. ``batch_size`` for fine-tuning) is the base field, shared. ``protocols``: what the command
    runs (transfer takes them from its ``protocols`` field)."""
    fields: dict[str, Any] = {n: _copied(base, n, default=v) for n, v in (defaults or {}).items()}
    for model, names in parts.values():
        for name in names:
            if name not in base.model_fields and name not in fields:
                fields[name] = _copied(model, name)
    cls = create_model(f"{command.title()}EvalOptions", __base__=base, __doc__=doc, **fields)
    cls.COMMAND, cls.PARTS, cls.PROTOCOLS = command, parts, protocols
    return cls


_KNN = (KnnConfig, ("k", "temperature"))
_LINEAR = (LinearProbeConfig, ("epochs", "lr", "optimizer", "seed"))

KnnEvalOptions = command_model("knn", ClassifyOptions, "Weighted k-NN on frozen features (cosine, k 20, T 0.07).",
                               {"knn": _KNN}, ("knn",))
LinearEvalOptions = command_model("linear", ClassifyOptions, "Linear probe on frozen features (BatchNorm without "
                                  "affine + linear, as MAE).", {"linear": _LINEAR}, ("linear",))
FrozenEvalOptions = command_model("frozen", ClassifyOptions, "k-NN and linear probe on one pass of frozen features "
                                  "(the backbone runs once for both).", {"knn": _KNN, "linear": _LINEAR},
                                  ("knn", "linear"))
FinetuneEvalOptions = command_model(
    "finetune", ClassifyOptions, "Full fine-tuning (layer-wise lr decay, drop path), then test accuracy.",
    {"finetune": (FinetuneConfig, ("epochs", "batch_size", "lr", "layer_decay", "drop_path", "max_steps", "hflip",
                                   "seed"))}, ("finetune",), defaults={"batch_size": 32, "pooling": "mean"})
TransferEvalOptions = command_model(
    "transfer", _TransferOptions, "The same protocols on a second dataset (--to); its rows record transfer_from = "
    "--dataset.", {"finetune": (FinetuneConfig, ("max_steps",))})
SegmentEvalOptions = command_model(
    "segment", _SegmentOptions, "Linear segmentation probe on frozen patch tokens (resized evaluation): mIoU, pixel "
    "accuracy, per-class IoU.", {"segment": (SegProbeConfig, ("layers", "batchnorm", "label_size", "epochs",
                                                              "batch_size", "lr", "n_examples", "seed"))},
    ("segment",), defaults={"batch_size": 16})

#: The options model of each ``morphcache eval`` command.
EVAL_COMMANDS: dict[str, type[EvalOptions]] = {m.COMMAND: m for m in (
    KnnEvalOptions, LinearEvalOptions, FrozenEvalOptions, FinetuneEvalOptions, TransferEvalOptions, SegmentEvalOptions)}


def resolved_config_path(results: str | Path, command: str) -> Path:
    """Where a run of ``command`` that appends to ``results`` keeps its resolved config:
    ``<results folder>/<results stem>.<command>.config.json``."""
    results = Path(results)
    return results.parent / f"{results.stem}.{command}.config.json"


def write_resolved_config(options: EvalOptions, results: str | Path) -> Path:
    """Write ``options`` (every field, JSON) to :func:`resolved_config_path`; returns the path.

    Raises:
        MorphcacheError: the folder cannot be written.
    """
    path = resolved_config_path(results, options.COMMAND)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(options.model_dump(mode="json"), indent=2) + "\n", encoding="utf-8")
    except OSError as exc:
        raise MorphcacheError(f"cannot write {path} ({exc.strerror}); pass a writable --results") from None
    return path
