"""timm ViTs (any model with ``forward_features``, ``patch_embed`` and ``num_prefix_tokens``) as token teachers.

``forward_features(x)`` returns ``(B, P + T, D)`` after the final norm, with ``P = num_prefix_tokens`` (CLS and
register tokens) first; the teacher drops those ``P`` tokens. The pooled embedding is
``forward_head(features, pre_logits=True)`` (the model's own global pool: CLS token or mean, with ``fc_norm`` when
the model has one). For timm's global-average-pool ViTs (``*_gap_*``) ``norm`` is the identity and the final
LayerNorm is ``fc_norm`` after pooling, so their tokens are the last block's un-normalized output.

Weights come only from local files (``.safetensors``, or ``.pth``/``.pt``/``.bin`` state dicts read with
``weights_only=True``), go through the model module's ``checkpoint_filter_fn`` (which e.g. resamples position
embeddings to ``image_size``) and are loaded strictly apart from the classifier head.
"""

from __future__ import annotations

import os
import sys

import torch

from morphcache.errors import ConfigError
from morphcache.extract.teachers.base import Precision, Teacher, check_precision, file_sha256
from morphcache.geometry import check_patch_multiple
from morphcache.schemas import IMAGENET_MEAN, IMAGENET_STD, TeacherSpec


class TimmTeacher(Teacher):
    """Grid tokens and pooled embedding of a timm ViT (``self.model``, built with ``num_classes=0``)."""

    def _features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.model.forward_features(x)  # (B, P + T, D) after the final norm
        pooled = self.model.forward_head(feats, pre_logits=True)  # (B, Dp)
        return feats[:, self.model.num_prefix_tokens:], pooled  # (B, T, D)


def timm_spec(model: torch.nn.Module, kind: str, name: str, pretrained: str | None,
              weights_sha256: str | None) -> TeacherSpec:
    """The :class:`TeacherSpec` of a timm ViT ``model`` (square input and patches only)."""
    pe = getattr(model, "patch_embed", None)
    if pe is None or not hasattr(model, "num_prefix_tokens") or not hasattr(model, "forward_features"):
        raise ConfigError(f"timm model {name!r} is not a ViT with patch_embed/num_prefix_tokens; "
                          "use a vit_* (or other plain ViT) architecture as the teacher")
    img, patch = tuple(pe.img_size or ()), tuple(pe.patch_size)
    if len(img) != 2 or img[0] != img[1] or patch[0] != patch[1]:
        raise ConfigError(f"timm model {name!r} has input {img} and patches {patch}; only square ones are supported")
    cfg = getattr(model, "pretrained_cfg", None) or {}
    dim = int(model.num_features)
    return TeacherSpec(
        kind=kind, name=name, pretrained=pretrained, weights_sha256=weights_sha256,
        image_size=int(img[0]), patch_size=int(patch[0]), dim=dim,
        pooled_dim=int(getattr(model, "head_hidden_size", None) or dim),
        mean=tuple(float(v) for v in cfg.get("mean", IMAGENET_MEAN)),
        std=tuple(float(v) for v in cfg.get("std", IMAGENET_STD)),
    )


def _load_weights(model: torch.nn.Module, name: str, path: str) -> None:
    """Load a local state dict strictly (timm's own pretrained path is lenient once the head is dropped).

    The file goes through the model module's ``checkpoint_filter_fn`` (key renames, position-table resampling),
    classifier weights are dropped (the teacher has no head), and any other missing or unexpected key is an error.
    """
    from timm.models import load_state_dict

    try:
        sd = load_state_dict(path)  # safetensors or torch.load(weights_only=True); unwraps state_dict/model keys
        filter_fn = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
        if filter_fn is not None:
            sd = filter_fn(sd, model)
    except Exception as e:  # unpickling / safetensors header / filter errors all mean "not this model's weights"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"cannot load timm {name} weights from {path}: {first}") from e
    heads = model.pretrained_cfg.get("classifier") or ()
    for head in (heads,) if isinstance(heads, str) else heads:
        sd = {k: v for k, v in sd.items() if not k.startswith(f"{head}.")}
    try:
        missing, unexpected = model.load_state_dict(sd, strict=False)
    except RuntimeError as e:  # shape mismatches
        first = str(e).strip().splitlines()[-1].strip()
        raise ConfigError(f"cannot load timm {name} weights from {path}: {first}") from e
    if missing or unexpected:
        raise ConfigError(f"timm weights {path} do not fit {name}: missing {missing[:3]}, unexpected "
                          f"{unexpected[:3]}; pass weights of this architecture")


def load_timm_teacher(name: str, pretrained: str | None = None, image_size: int | None = None,
                      projected: bool = False, device: str | torch.device = "cpu",
                      precision: Precision = "fp32") -> TimmTeacher:
    """Build a timm ViT teacher.

    Args:
        name: timm model name, e.g. ``"vit_small_patch16_224"``.
        pretrained: local state-dict file (``.safetensors`` / ``.pth``) or ``None`` for random weights.
        image_size: input side passed to timm as ``img_size``; ``None`` keeps the model default.
        projected: not meaningful for timm ViTs (refused when True).
    """
    import timm

    check_precision(precision, torch.device(device))
    if projected:
        raise ConfigError(f"timm teacher {name!r} has no projection; --projected applies to open_clip only")
    if name.startswith(("hf-hub:", "hf_hub:", "local-dir:")):
        raise ConfigError(f"timm model {name!r} would load from a hub; no network; pass a model name and a "
                          "local weights file (timm:NAME:/path/weights.safetensors)")
    if not timm.is_model(name):
        raise ConfigError(f"unknown timm model {name!r}; see timm.list_models()")
    if pretrained is not None and not os.path.isfile(pretrained):
        raise ConfigError(f"timm weights file {pretrained!r} not found; no network; pass a local weights file")
    kwargs: dict = {"num_classes": 0}
    if image_size:
        kwargs["img_size"] = image_size
    try:
        model = timm.create_model(name, pretrained=False, **kwargs)
    except TypeError as e:
        raise ConfigError(f"timm model {name!r} does not accept img_size={image_size}: {e}") from e
    pe = getattr(model, "patch_embed", None)
    if pe is not None and pe.img_size is not None:  # timm_spec refuses models without a patch grid
        check_patch_multiple(pe.img_size[0], pe.patch_size[0], option="--image-size", model=f"timm:{name}")
    if pretrained is not None:
        _load_weights(model, name, pretrained)
    spec = timm_spec(model, "timm", name, pretrained, file_sha256(pretrained) if pretrained else None)
    return TimmTeacher(spec, model, device=device, precision=precision)
