"""MAE around the student's timm ViT: random masking with masked tokens dropped, and a light decoder.

``MAEModel(backbone, ...)`` (backbone from :func:`morphcache.train.student.create_backbone`):

- ``encode(x (B,3,S,S), keep_idx (B,K)) -> (B, P+K, width)``: only the kept patches (plus CLS) enter the encoder;
- ``decode(latent, keep_idx) -> (B, T, decoder_dim)``: project to the decoder width, put a learnable decoder mask
  token at every dropped position, add fixed 2-D sin-cos position embeddings, run ``decoder_depth`` timm blocks;
- ``forward(x, keep_idx) -> MAEOutput`` with ``pixels (B, T, p*p*3)`` (pixel head) and, when ``target_dim`` is set,
  ``targets (B, T, target_dim)``: a second linear head on the decoder features that predicts teacher tokens at
  every grid position (used by the ``mae+dtm`` objective, see :mod:`morphcache.train.objectives`).

This class's defaults (75% masking, decoder width 256, depth 2, 8 heads) are the ``cpu-small`` preset's; training
runs take their sizes from :class:`~morphcache.schemas.specs.RunConfig`, whose defaults are naver-ai/lut's
(decoder 512 wide, 8 blocks, 16 heads). The loss (normalised pixels, masked patches only) is
:func:`morphcache.train.losses.mae_loss.mae_loss`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from timm.models.vision_transformer import Block

from morphcache.errors import ConfigError
from morphcache.train.student import (
    BackboneGrid, backbone_grid, backbone_patch_size, embed_patches, is_beit, run_blocks,
)


def sincos_2d(dim: int, grid: tuple[int, int]) -> torch.Tensor:
    """Fixed 2-D sin-cos position table (1, h*w, dim), row-major; dim must be a multiple of 4."""
    if dim % 4:
        raise ConfigError(f"MAE decoder width {dim} must be a multiple of 4")
    h, w = grid
    omega = 1.0 / (10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4)))
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    parts = []
    for coord in (ys.reshape(-1), xs.reshape(-1)):
        angles = coord[:, None] * omega[None, :]
        parts += [angles.sin(), angles.cos()]
    return torch.cat(parts, dim=1).float().unsqueeze(0)


def random_scores(rng: np.random.Generator, batch: int, num_tokens: int) -> torch.Tensor:
    """``torch.float64 (B, T)`` uniform [0, 1) scores from the numpy generator ``rng`` (CPU), whose per-row argsort
    is a uniformly random permutation of the T positions. The one source of MAE / LUT random masks: the training
    loop's per-micro-batch generator (see :mod:`morphcache.train.objectives`)."""
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"random masking draws from a numpy.random.Generator, got {type(rng).__name__}")
    return torch.from_numpy(rng.random((int(batch), int(num_tokens))))


def random_masking(
    batch: int, num_tokens: int, mask_ratio: float, rng: np.random.Generator, device=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Uniform random masking: ``(keep_idx (B, K) long sorted, mask (B, T) bool True = masked)``.

    K = round(T * (1 - mask_ratio)), at least 1. The scores come from the numpy generator ``rng`` on the CPU
    (:func:`random_scores`; reproducible on any device) and the results are moved to ``device``.
    """
    if not 0.0 <= mask_ratio < 1.0:
        raise ConfigError(f"mask_ratio={mask_ratio} must lie in [0, 1)")
    n_keep = max(1, int(round(num_tokens * (1.0 - mask_ratio))))
    noise = random_scores(rng, batch, num_tokens)
    keep = noise.argsort(dim=1)[:, :n_keep].sort(dim=1).values
    return keep.to(device), keep_to_mask(keep, num_tokens).to(device)


def keep_to_mask(keep_idx: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """(B, K) kept positions -> (B, T) bool mask, True where the token is NOT kept."""
    mask = torch.ones(keep_idx.shape[0], num_tokens, dtype=torch.bool, device=keep_idx.device)
    return mask.scatter(1, keep_idx, False)


@dataclass
class MAEOutput:
    pixels: torch.Tensor  # (B, T, p*p*3)
    features: torch.Tensor  # (B, T, decoder_dim)
    latent: torch.Tensor  # (B, P+K, width) encoder output after the final norm
    targets: torch.Tensor | None = None  # (B, T, target_dim) when the model has a target head


class MAEModel(BackboneGrid, nn.Module):
    """Masked autoencoder: the timm ViT encoder on kept patches + a light transformer decoder (module docstring)."""

    def __init__(
        self,
        backbone: nn.Module,
        decoder_dim: int = 256,
        decoder_depth: int = 2,
        decoder_heads: int = 8,
        mask_ratio: float = 0.75,
        norm_pix: bool = True,
        target_dim: int | None = None,
    ) -> None:
        super().__init__()
        if decoder_depth < 1 or decoder_dim % decoder_heads:
            raise ConfigError(
                f"MAE decoder depth={decoder_depth}, width={decoder_dim}, heads={decoder_heads}: "
                "need depth >= 1 and width divisible by heads"
            )
        if is_beit(backbone):
            raise ConfigError("MAE-based objectives (mae, lut, mae+dtm) drop masked tokens, which a BEiT student's "
                              "relative position bias over the full grid does not allow; use a vit_* student")
        self.backbone = backbone
        self.mask_ratio = float(mask_ratio)
        self.norm_pix = bool(norm_pix)
        self.patch_size = backbone_patch_size(backbone)
        in_chans = backbone.patch_embed.proj.in_channels
        self.decoder_embed = nn.Linear(backbone.embed_dim, decoder_dim)
        self.decoder_mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.register_buffer("decoder_pos", sincos_2d(decoder_dim, backbone_grid(backbone)), persistent=False)
        self.decoder_blocks = nn.Sequential(
            *[
                Block(decoder_dim, decoder_heads, mlp_ratio=4.0, qkv_bias=True, norm_layer=nn.LayerNorm)
                for _ in range(decoder_depth)
            ]
        )
        self.decoder_norm = nn.LayerNorm(decoder_dim)
        self.pixel_head = nn.Linear(decoder_dim, self.patch_size * self.patch_size * in_chans)
        self.target_head = nn.Linear(decoder_dim, target_dim) if target_dim else None
        nn.init.normal_(self.decoder_mask_token, std=0.02)
        for module in [self.decoder_embed, self.decoder_blocks, self.decoder_norm, self.pixel_head, self.target_head]:
            if module is not None:
                module.apply(_init_decoder)

    def encode(self, x: torch.Tensor, keep_idx: torch.Tensor) -> torch.Tensor:
        """(B,3,S,S), keep_idx (B,K) -> (B, P+K, width): encoder over the kept patches only."""
        tokens = self.backbone.patch_embed(x)
        idx = keep_idx.to(tokens.device).unsqueeze(-1).expand(-1, -1, tokens.shape[-1])
        kept = torch.gather(tokens, 1, idx)
        return run_blocks(self.backbone, embed_patches(self.backbone, kept, keep_idx.to(tokens.device)))

    def visible_patch_tokens(self, latent: torch.Tensor) -> torch.Tensor:
        """(B, P+K, width) -> (B, K, width): drop the prefix (CLS / register) tokens."""
        return latent[:, self.backbone.num_prefix_tokens :]

    def decode(self, latent: torch.Tensor, keep_idx: torch.Tensor) -> torch.Tensor:
        """(B, P+K, width), keep_idx (B, K) -> decoder features (B, T, decoder_dim) at every grid position."""
        n_prefix = self.backbone.num_prefix_tokens
        y = self.decoder_embed(latent)
        prefix, visible = y[:, :n_prefix], y[:, n_prefix:]
        b, _, c = visible.shape
        full = self.decoder_mask_token.to(visible.dtype).expand(b, self.num_tokens, c)
        full = torch.scatter(full, 1, keep_idx.unsqueeze(-1).expand(-1, -1, c), visible)
        full = full + self.decoder_pos.to(full.dtype)
        out = self.decoder_norm(self.decoder_blocks(torch.cat([prefix, full], dim=1)))
        return out[:, n_prefix:]

    def forward(self, x: torch.Tensor, keep_idx: torch.Tensor) -> MAEOutput:
        latent = self.encode(x, keep_idx)
        features = self.decode(latent, keep_idx.to(latent.device))
        targets = self.target_head(features) if self.target_head is not None else None
        return MAEOutput(pixels=self.pixel_head(features), features=features, latent=latent, targets=targets)

    def sample_keep(self, batch: int, rng: np.random.Generator, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Random ``mask_ratio`` masking for a batch from the numpy generator ``rng``:
        (keep_idx (B, K) long, mask (B, T) bool, True = masked)."""
        return random_masking(batch, self.num_tokens, self.mask_ratio, rng, device)


def _init_decoder(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
