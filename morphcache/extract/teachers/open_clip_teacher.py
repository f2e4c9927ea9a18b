"""open_clip CLIP image towers as token teachers (the design's main teacher).

``model.visual.output_tokens = True`` makes the vision tower return ``(pooled, tokens)``: ``tokens (B, T, width)``
are the grid tokens after the final LayerNorm (``ln_post``), ``pooled (B, embed_dim)`` is the projected CLS
embedding, identical to ``model.encode_image`` without normalization. With ``projected=True`` (the default, and
``morphcache extract``'s for open_clip teachers) the tokens are multiplied by the same visual projection
``encode_image`` applies to the CLS token (ViT-B/16: 768 -> 512), as naver-ai/dtm's target
``encode_image(x, return_all_tokens=True) @ visual.proj``; ``projected=False`` keeps the tower width.

Only local weight files are accepted: open_clip's pretrained tags (``openai``, ``laion2b_...``) would download
from a model hub, and this machine has no network.
"""

from __future__ import annotations

import os

import torch

from morphcache.errors import ConfigError
from morphcache.extract.teachers.base import Precision, Teacher, check_precision, file_sha256
from morphcache.geometry import check_patch_multiple
from morphcache.schemas import CLIP_MEAN, CLIP_STD, TeacherSpec


def _check_weights(arch: str, pretrained: str | None) -> None:
    import open_clip

    if arch.startswith(("hf-hub:", "local-dir:")):
        raise ConfigError(f"open_clip model {arch!r}: hub/dir schemas are not supported; "
                          "pass an architecture name such as ViT-B-16 and a local weights file")
    if arch not in open_clip.list_models():
        raise ConfigError(f"unknown open_clip architecture {arch!r}; see open_clip.list_models()")
    if pretrained is None or os.path.isfile(pretrained):
        return
    if pretrained in open_clip.list_pretrained_tags_by_model(arch):
        raise ConfigError(f"open_clip pretrained tag {pretrained!r} would download weights, but there is "
                          "no network; pass a local weights file (open_clip:ARCH:/path/to/weights.bin)")
    raise ConfigError(f"open_clip weights file {pretrained!r} not found; no network; pass a local weights file")


class OpenClipTeacher(Teacher):
    """Tokens and pooled embedding of an open_clip ``VisionTransformer`` (``self.model`` is ``clip.visual``)."""

    def __init__(self, spec: TeacherSpec, visual: torch.nn.Module, device: str | torch.device = "cpu",
                 precision: Precision = "fp32") -> None:
        visual.output_tokens = True
        super().__init__(spec, visual, device=device, precision=precision)

    def _features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pooled, tokens = self.model(x)  # (B, Dp), (B, T, width) after ln_post
        if self.spec.projected:
            tokens = tokens @ self.model.proj.to(tokens.dtype)  # (B, T, embed_dim)
        return tokens, pooled


def load_open_clip_teacher(arch: str, pretrained: str | None = None, image_size: int | None = None,
                           projected: bool = True, device: str | torch.device = "cpu",
                           precision: Precision = "fp32") -> OpenClipTeacher:
    """Build an open_clip image tower teacher.

    Args:
        arch: open_clip architecture name, e.g. ``"ViT-B-16"``.
        pretrained: a local weights file (``.bin``/``.pt``/``.safetensors``) or ``None`` for random weights.
        image_size: input side; ``None`` keeps the architecture's (position embeddings are resized otherwise).
        projected: pass tokens through the visual projection (``D = embed_dim`` instead of the width); default
            True, DTM's target.
    """
    import open_clip
    from open_clip.transformer import VisionTransformer

    check_precision(precision, torch.device(device))
    _check_weights(arch, pretrained)
    kwargs = {"force_image_size": image_size} if image_size else {}
    try:
        clip = open_clip.create_model(arch, pretrained=pretrained, device="cpu", **kwargs)
    except (RuntimeError, KeyError, ValueError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"cannot load open_clip {arch} weights from {pretrained}: {first}") from e
    visual = clip.visual
    if not isinstance(visual, VisionTransformer) or getattr(visual, "attn_pool", None) is not None:
        raise ConfigError(f"open_clip architecture {arch!r} has no plain ViT image tower; "
                          "use a ViT-* architecture as the teacher")
    if visual.pool_type == "none":
        raise ConfigError(f"open_clip architecture {arch!r} has no pooled embedding (pool_type 'none')")
    if projected and visual.proj is None:
        raise ConfigError(f"open_clip architecture {arch!r} has no visual projection; pass --unprojected")
    side, patch = visual.image_size[0], visual.patch_size[0]
    if visual.image_size[0] != visual.image_size[1] or visual.patch_size[0] != visual.patch_size[1]:
        raise ConfigError(f"open_clip architecture {arch!r} is not square; only square inputs are supported")
    check_patch_multiple(side, patch, option="--image-size", model=f"open_clip:{arch}")
    width = visual.conv1.out_channels
    pooled_dim = visual.proj.shape[1] if visual.proj is not None else width
    pp = open_clip.get_model_preprocess_cfg(clip)
    spec = TeacherSpec(
        kind="open_clip", name=arch, pretrained=pretrained,
        weights_sha256=file_sha256(pretrained) if pretrained else None,
        projected=projected, image_size=side, patch_size=patch,
        dim=pooled_dim if projected else width, pooled_dim=pooled_dim,
        mean=tuple(float(v) for v in pp.get("mean", CLIP_MEAN)),
        std=tuple(float(v) for v in pp.get("std", CLIP_STD)),
    )
    # only the image tower is kept: the text tower is freed with ``clip`` when this function returns
    return OpenClipTeacher(spec, visual, device=device, precision=precision)
