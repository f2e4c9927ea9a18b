"""The masked-image-modeling student: a timm ViT or BEiT with a mask token and a linear head to the target width.

Students are timm ``VisionTransformer`` (``vit_*``) or timm ``Beit`` (``beit_*``, ``beitv2_*``: relative position
bias, q/v bias only, layer scale), the release's student family. BEiT students are built as naver-ai/dtm builds
its student (``run_pretrain_dtm.py`` defaults): a relative position bias in every block plus one shared across
blocks, no absolute position embedding, and a final LayerNorm on every token (timm ``global_pool="token"``).
BEiT students serve the dtm / tokenwise objectives; MAE-based objectives drop tokens, which a relative position
bias over the full grid does not allow, so they need a ViT.

``MIMStudent.forward(x (B,3,S,S), mask (B,T) bool | None) -> (B,T,D)``: patch embeddings at masked positions
are replaced by one learnable mask token (trunc-normal, std 0.02) *before* the position embedding is added (as
BEiT), the sequence runs through the ViT blocks and the final LayerNorm, and a linear head maps each patch token
(CLS / register tokens dropped) to the target width D. ``forward_features(x) -> (B, 1+T, width)`` is timm's own
``forward_features`` of the backbone (no masking), which evaluation uses.

The helpers :func:`create_backbone`, :func:`embed_patches` and :func:`run_blocks` are shared with the MAE model
(:mod:`morphcache.train.mae`), which drops tokens instead of replacing them.

Training checkpoint format (written by the training loop, read by :func:`load_student_backbone`)::

    torch.save({
        "model": model.state_dict(),      # MIMStudent / MAEModel state: keys "backbone.<timm key>", plus
                                          # "mask_token", "head.*", "decoder*"... (only "backbone.*" is read
                                          # back here); a plain timm state dict (no prefix) is accepted too
        "config": run_config.model_dump(mode="json"),   # RunConfig; "model" names the timm architecture
        "target_dim": int,                # D of the head
        "img_size": int,                  # student input side S in pixels
        "mean": [r, g, b], "std": [r, g, b],            # input normalisation the student was trained with
        ...                               # anything else (step, epoch, optimizer, objective) is passed through
    }, path)

:func:`student_backbone_state` gives the plain timm state dict of a student's backbone (no prefix).
"""

from __future__ import annotations

import os

import timm
import torch
from torch import nn

from morphcache.errors import ConfigError, MorphcacheError
from morphcache.geometry import check_patch_multiple

REQUIRED_CHECKPOINT_KEYS = ("model", "config", "target_dim", "img_size", "mean", "std")


def is_beit(backbone: nn.Module) -> bool:
    """True for a timm ``Beit`` backbone (relative position bias, blocks take ``shared_rel_pos_bias``)."""
    from timm.models.beit import Beit

    return isinstance(backbone, Beit)


def resolve_model_name(name: str) -> str:
    """A timm ViT / BEiT name, accepting short aliases: ``vit_tiny_patch16`` -> ``vit_tiny_patch16_224``."""
    for candidate in (name, f"{name}_224"):
        if timm.is_model(candidate):
            return candidate
    raise ConfigError(f"unknown student model '{name}'; use a timm ViT name such as vit_small_patch16_224")


def create_backbone(
    model_name: str,
    img_size: int,
    layer_scale: float | None = 0.1,
    drop_path: float = 0.0,
    patch_size: int | None = None,
) -> nn.Module:
    """A randomly initialised timm ``VisionTransformer`` or ``Beit`` without classifier (``num_classes=0``).

    ``layer_scale`` is timm's ``init_values`` (``None`` or <= 0 disables layer scale). BEiT names get the
    release's relative position biases (per block and shared) and a final LayerNorm on every token.
    Raises ConfigError for an unknown or unsupported architecture.
    """
    kwargs = dict(pretrained=False, img_size=img_size, drop_path_rate=drop_path, num_classes=0)
    kwargs["init_values"] = layer_scale if layer_scale and layer_scale > 0 else None
    if patch_size is not None:
        kwargs["patch_size"] = patch_size
    name = resolve_model_name(model_name)
    if name.startswith(("beit_", "beitv2_")):
        kwargs.update(global_pool="token", use_rel_pos_bias=True, use_shared_rel_pos_bias=True, use_abs_pos_emb=False)
    elif name.startswith("beit"):
        raise ConfigError(f"student '{name}' is not supported; use a beit_* / beitv2_* or vit_* model")
    try:
        model = timm.create_model(name, **kwargs)
    except (TypeError, ValueError, AssertionError) as exc:
        raise ConfigError(f"cannot build student '{name}' at img_size={img_size}: {exc}") from exc
    for attr in ("patch_embed", "blocks", "norm", "pos_embed"):
        if not hasattr(model, attr):
            raise ConfigError(f"student '{name}' is not a plain timm ViT / BEiT (no '{attr}'); pick a vit_* or beit_*")
    if getattr(model, "dynamic_img_size", False):
        raise ConfigError(f"student '{name}' uses dynamic_img_size, which the MIM student does not support")
    check_patch_multiple(img_size, model.patch_embed.patch_size[0], option="--img-size", model=name)
    return model


def backbone_grid(backbone: nn.Module) -> tuple[int, int]:
    h, w = backbone.patch_embed.grid_size
    return int(h), int(w)


def backbone_patch_size(backbone: nn.Module) -> int:
    return int(backbone.patch_embed.patch_size[0])


def embed_patches(backbone: nn.Module, tokens: torch.Tensor, keep_idx: torch.Tensor | None = None) -> torch.Tensor:
    """Add position embeddings to patch tokens and prepend the prefix (CLS / register) tokens.

    Args:
        tokens: (B, T', C) patch embeddings; T' = T, or the kept subset when ``keep_idx`` is given.
        keep_idx: (B, T') long grid positions of ``tokens`` (MAE), or ``None`` when all T are present in order.
    Returns: (B, P + T', C) with P = ``backbone.num_prefix_tokens``.
    """
    b = tokens.shape[0]
    n_prefix = backbone.num_prefix_tokens
    pos = backbone.pos_embed  # None for BEiT with relative position bias only
    pos_prefix_len = 0 if getattr(backbone, "no_embed_class", False) else n_prefix
    x = tokens
    if pos is not None:
        patch_pos = pos[:, pos_prefix_len:]
        if keep_idx is not None:
            idx = keep_idx.unsqueeze(-1).expand(-1, -1, patch_pos.shape[-1])
            patch_pos = torch.gather(patch_pos.expand(b, -1, -1), 1, idx)
        x = tokens + patch_pos
    prefix = []
    if backbone.cls_token is not None:
        prefix.append(backbone.cls_token.expand(b, -1, -1))
    if getattr(backbone, "reg_token", None) is not None:
        prefix.append(backbone.reg_token.expand(b, -1, -1))
    if prefix:
        prefix_t = torch.cat(prefix, dim=1)
        if pos is not None and pos_prefix_len:
            prefix_t = prefix_t + pos[:, :pos_prefix_len]
        x = torch.cat([prefix_t.to(x.dtype), x], dim=1)
    return backbone.pos_drop(x)


def run_blocks(backbone: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """norm_pre -> transformer blocks (gradient checkpointing honoured) -> final norm. (B, L, C) -> (B, L, C).

    BEiT blocks receive the shared relative position bias, as timm's ``Beit.forward_features`` does.
    """
    if is_beit(backbone):
        rel = backbone.rel_pos_bias() if backbone.rel_pos_bias is not None else None
        checkpointing = getattr(backbone, "grad_checkpointing", False) and torch.is_grad_enabled()
        for blk in backbone.blocks:
            if checkpointing:
                from torch.utils.checkpoint import checkpoint

                x = checkpoint(blk, x, shared_rel_pos_bias=rel, use_reentrant=False)
            else:
                x = blk(x, shared_rel_pos_bias=rel)
        return backbone.norm(x)
    x = backbone.norm_pre(x)
    if getattr(backbone, "grad_checkpointing", False) and torch.is_grad_enabled():
        from timm.models import checkpoint_seq

        x = checkpoint_seq(backbone.blocks, x)
    else:
        x = backbone.blocks(x)
    return backbone.norm(x)


class BackboneGrid:
    """Mixin for modules holding a timm ViT as ``self.backbone``: its token grid and token count T."""

    backbone: nn.Module

    @property
    def grid(self) -> tuple[int, int]:
        return backbone_grid(self.backbone)

    @property
    def num_tokens(self) -> int:
        h, w = self.grid
        return h * w


class MIMStudent(BackboneGrid, nn.Module):
    """timm ViT / BEiT + learnable mask token + linear head to ``target_dim`` (see module docstring)."""

    def __init__(self, backbone: nn.Module, target_dim: int) -> None:
        super().__init__()
        if target_dim <= 0:
            raise ConfigError(f"target_dim={target_dim} must be positive (the store's token width D)")
        self.backbone = backbone
        width = backbone.embed_dim
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.head = nn.Linear(width, target_dim)
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)
        self.target_dim = int(target_dim)

    @property
    def width(self) -> int:
        return int(self.backbone.embed_dim)

    def encode(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B,3,S,S), mask (B,T) bool -> final-norm tokens (B, P+T, width), masked patches replaced."""
        tokens = self.backbone.patch_embed(x)
        if mask is not None:
            if mask.shape != tokens.shape[:2]:
                raise ConfigError(f"mask shape {tuple(mask.shape)} does not match the token grid {tokens.shape[:2]}")
            w = mask.to(device=tokens.device).unsqueeze(-1).to(tokens.dtype)
            tokens = tokens * (1 - w) + self.mask_token.to(tokens.dtype) * w
        return run_blocks(self.backbone, embed_patches(self.backbone, tokens))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B,3,S,S), mask (B,T) bool | None -> predictions (B, T, target_dim)."""
        feats = self.encode(x, mask)
        return self.head(feats[:, self.backbone.num_prefix_tokens :])

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """timm semantics: (B,3,S,S) -> (B, P+T, width) after the final norm, no masking."""
        return self.backbone.forward_features(x)


def create_student(
    model_name: str,
    img_size: int,
    target_dim: int,
    layer_scale: float = 0.1,
    drop_path: float = 0.0,
    patch_size: int | None = None,
) -> MIMStudent:
    """A randomly initialised :class:`MIMStudent` (BEiT-style: layer scale 0.1 by default).

    Raises:
        ConfigError: an unknown or unsupported architecture (:func:`create_backbone`).
    """
    return MIMStudent(create_backbone(model_name, img_size, layer_scale, drop_path, patch_size), target_dim)


def student_backbone_state(student: nn.Module) -> dict[str, torch.Tensor]:
    """The plain timm state dict (no prefix) of ``student.backbone`` (MIMStudent or MAEModel)."""
    return {k: v.detach().clone() for k, v in student.backbone.state_dict().items()}


def _extract_backbone_state(state: dict, path: str) -> dict[str, torch.Tensor]:
    if any(k.startswith("backbone.") for k in state):
        return {k[len("backbone.") :]: v for k, v in state.items() if k.startswith("backbone.")}
    if "patch_embed.proj.weight" in state:
        return dict(state)
    raise MorphcacheError(f"checkpoint {path}: 'model' holds no ViT backbone weights; pass a morphcache training checkpoint")


def load_student_backbone(ckpt_path: str | os.PathLike) -> tuple[nn.Module, dict]:
    """Read a training checkpoint (format in the module docstring) and rebuild the plain timm backbone.

    Returns ``(backbone in eval mode on CPU, info)``; ``info`` holds every checkpoint key except ``model``, plus
    ``model_name``, ``patch_size``, ``grid`` and ``width``.

    Raises:
        MorphcacheError: no file at ``ckpt_path``, not a loadable torch checkpoint, not a dict, missing keys, no
            model name in its config, or no ViT backbone weights in ``model``.
    """
    path = os.fspath(ckpt_path)
    if not os.path.isfile(path):
        raise MorphcacheError(f"checkpoint {path} does not exist; pass a file written by 'morphcache train'")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling / zip errors: not a checkpoint we can read
        raise MorphcacheError(f"checkpoint {path} cannot be loaded ({type(exc).__name__}); is it a torch checkpoint?") from exc
    if not isinstance(ckpt, dict):
        raise MorphcacheError(f"checkpoint {path} is not a dict; pass a file written by 'morphcache train'")
    missing = [k for k in REQUIRED_CHECKPOINT_KEYS if k not in ckpt]
    if missing:
        raise MorphcacheError(f"checkpoint {path} lacks keys {missing}; pass a file written by 'morphcache train'")
    config = ckpt["config"]
    model_name = config.get("model") if isinstance(config, dict) else None
    if not model_name:
        raise MorphcacheError(f"checkpoint {path}: config has no 'model' name; the checkpoint is incomplete")
    state = _extract_backbone_state(ckpt["model"], path)
    patch_size = int(state["patch_embed.proj.weight"].shape[-1])
    has_layer_scale = any(k.endswith(("ls1.gamma", "gamma_1")) for k in state)  # timm ViT / BEiT layer scale
    layer_scale = (config.get("layer_scale") or 1.0) if has_layer_scale else None
    backbone = create_backbone(model_name, int(ckpt["img_size"]), layer_scale, 0.0, patch_size)
    try:
        backbone.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise MorphcacheError(f"checkpoint {path} does not fit '{model_name}': {first}") from exc
    backbone.eval()
    info = {k: v for k, v in ckpt.items() if k != "model"}
    info.update(
        model_name=resolve_model_name(model_name),
        patch_size=patch_size,
        grid=backbone_grid(backbone),
        width=int(backbone.embed_dim),
    )
    return backbone, info
