"""Training objectives behind one interface: ``build_objective(name, config, student, target_dim, grid)``.

An :class:`Objective` is an ``nn.Module`` owning every trainable part (student, MAE decoder, LUT heads) and, for
LUT, the EMA teacher. ``objective(batch) -> (loss scalar tensor, metrics dict[str, float])`` with ``batch`` a dict:

- ``images`` (B, 3, S, S) float, normalised student input (required);
- ``rng``: the step's ``numpy.random.Generator`` (required by every built-in objective). The training loop makes
  one per micro-batch, ``numpy.random.default_rng((config.seed, g, rank))`` with ``g`` the global micro-batch
  index (``step * accum_steps + micro``), so a micro-batch's masks depend on nothing else: not on earlier steps,
  not on a resume. It is the only source of the objectives' masks: DTM / token-wise draw their BEiT block masks
  from it (``masker.batch(B, rng)``, the first draw), MAE / mae+dtm their random keep sets
  (:func:`morphcache.train.mae.random_masking`) and LUT its two disjoint keep sets
  (:func:`morphcache.train.lut.disjoint_keep_sets`). Objectives hold no mask generator of their own;
- ``targets`` (B, T, D) cached teacher tokens (dtm, tokenwise, mae+dtm; absent for mae / lut);
- ``images2`` (B, 3, S, S) second view of the same images (lut only);
- ``mask`` (B, T) bool, optional: a caller-chosen block mask (dtm, tokenwise) used instead of drawing one from
  ``rng`` (benchmarks and tests that pin masks). MAE-based objectives ignore it: they draw 75% random masks and
  drop the masked tokens from the encoder, which a BEiT block mask (38%) is not made for.

The one other random draw is DTM's morphing case (n, k) per step (dtm and mae+dtm): it comes from the
:class:`~morphcache.train.losses.dtm_loss.DTMLoss`'s own ``torch.Generator`` seeded with ``config.seed``, which the
checkpoint saves and restores (and :func:`~morphcache.train.checkpoint.reseed_generators` gives each DDP rank its
own stream); it stays there so that DTM runs keep drawing exactly the cases they always drew. Dropout / drop-path
use torch's global RNG (checkpointed too).

Names: ``dtm`` (DTM distillation, L morphing cases), ``tokenwise`` (DTM with n = 0), ``mae``, ``lut``, and
``mae+dtm``: MAE plus DTM distillation predicted from the *decoder*. The encoder never sees masked tokens, so a
head on encoder tokens could only predict the ~25% visible targets, where the student already sees the pixels
and distillation is easiest; a linear head on the decoder features (which hold a mask token at every dropped
position) predicts targets at all T positions, so DTM's matching and loss run on the full grid exactly as in
the ``dtm`` objective, and the decoder becomes a feature predictor as in MIM-distillation decoders.
total = mae_weight * L_MAE + L_DTM.

The training loop: ``optimizer = AdamW(objective.param_groups(weight_decay))``; after each optimizer step call
``objective.after_step(step, total_steps)`` (EMA update for LUT, no-op otherwise); checkpoint
``objective.model.state_dict()`` as ``"model"`` (see :mod:`morphcache.train.student`) and
``objective.state_dict()`` to resume.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from morphcache import registries
from morphcache.errors import ConfigError
from morphcache.train.losses.dtm_loss import DTMLoss, standardize_tokens
from morphcache.train.losses.mae_loss import mae_loss, pixel_targets
from morphcache.train.losses.tokenwise_loss import tokenwise_loss
from morphcache.train.lut import LUTLearner
from morphcache.train.mae import MAEModel
from morphcache.train.masking import build_block_mask_generator
from morphcache.train.student import MIMStudent

OBJECTIVES = ("dtm", "tokenwise", "mae", "lut", "mae+dtm")
_NO_DECAY_NAMES = ("pos_embed", "cls_token", "reg_token", "mask_token", "decoder_mask_token",
                   "relative_position_bias_table")


class Objective(nn.Module):
    """Base class: ``model`` (has ``.backbone``), ``forward(batch) -> (loss, metrics)``, ``after_step``.

    An objective says what it needs from the training loop, so the loop never tests objective names:
    ``needs_targets`` (the batch carries ``targets (B, T, D)``: cached, or from ``--teacher-online``),
    ``needs_second_view`` (``images2``: a second view of each image), and :meth:`after_step` (e.g. an EMA teacher
    update). Every batch from the loop carries ``rng``, the micro-batch's ``numpy.random.Generator``: an
    objective draws all its per-step randomness (masks) from it (:meth:`step_rng`), never from a generator of its
    own, so a run is reproducible and resumable from the seed alone. New objectives register a factory
    ``(config, student, target_dim) -> Objective`` with ``@morphcache.registries.objectives.register(NAME)``.
    """

    name: str = ""
    needs_targets: bool = False
    needs_second_view: bool = False
    masker = None  # a BlockMaskGenerator for objectives that draw BEiT block masks

    def __init__(self, model: nn.Module | None = None) -> None:
        super().__init__()
        if model is not None:
            self.model = model

    def after_step(self, step: int, total_steps: int) -> None:
        """Called after every optimizer step (0-based ``step``)."""

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def param_groups(self, weight_decay: float) -> list[dict]:
        """AdamW groups: no weight decay on biases, norms (1-D) and position / class / mask tokens (the releases'
        rule: 1-D parameters and the model's ``no_weight_decay`` names)."""
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            leaf = name.rsplit(".", 1)[-1]
            (no_decay if p.ndim <= 1 or leaf in _NO_DECAY_NAMES else decay).append(p)
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]

    @staticmethod
    def _require(batch: dict, key: str, name: str) -> torch.Tensor:
        if key not in batch or batch[key] is None:
            raise ConfigError(f"objective '{name}' needs batch['{key}']; the loader did not provide it")
        return batch[key]

    def step_rng(self, batch: dict) -> np.random.Generator:
        """``batch["rng"]``, the step's numpy generator (see the module docstring).

        Raises:
            ConfigError: the batch has no ``rng`` or it is not a ``numpy.random.Generator``.
        """
        rng = batch.get("rng")
        if not isinstance(rng, np.random.Generator):
            raise ConfigError(f"objective '{self.name}' needs batch['rng'], the step's numpy.random.Generator "
                              f"(got {type(rng).__name__}); run_training passes default_rng((seed, micro-batch, rank))")
        return rng


def normalize_targets(targets: torch.Tensor, mode: str) -> torch.Tensor:
    """(B, T, D) teacher tokens -> the tokens matching and morphing see: per-token LayerNorm without affine for
    ``layernorm``, unchanged otherwise (``morphed`` standardises after morphing, inside the DTM loss)."""
    if mode == "layernorm":
        return torch.nn.functional.layer_norm(targets.float(), targets.shape[-1:])
    return targets


def _check_targets(targets: torch.Tensor, num_tokens: int, target_dim: int, name: str) -> None:
    if targets.dim() != 3 or targets.shape[1] != num_tokens or targets.shape[2] != target_dim:
        raise ConfigError(
            f"objective '{name}': targets {tuple(targets.shape)} do not match the student's "
            f"(B, {num_tokens}, {target_dim}); check the store's grid and width"
        )


class DistillObjective(Objective):
    """dtm / tokenwise: block-masked student predicts the cached target tokens at all T positions. The block mask
    is ``batch["mask"]`` when given, else ``masker.batch(B, batch["rng"])`` (the first draw from the step's rng)."""

    needs_targets = True

    def __init__(self, name: str, config, student: MIMStudent, target_dim: int) -> None:
        super().__init__(student)
        self.name = name
        self.target_dim = target_dim
        self.kind, self.beta = config.loss, config.smooth_l1_beta
        self.target_norm = config.target_norm
        self.dtm = DTMLoss.from_config(config, n_tokens=student.num_tokens) if name == "dtm" else None
        self.masker = build_block_mask_generator(config, student.grid)

    def forward(self, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        images = self._require(batch, "images", self.name)
        targets = self._require(batch, "targets", self.name)
        _check_targets(targets, self.model.num_tokens, self.target_dim, self.name)
        targets = normalize_targets(targets, self.target_norm)
        mask = batch.get("mask")
        if mask is None:
            mask = self.masker.batch(images.shape[0], self.step_rng(batch))
        pred = self.model(images, mask.to(images.device))
        if self.dtm is None:
            if self.target_norm == "morphed":  # no merges: every token is its own morphed token
                targets = standardize_tokens(targets)
            loss = tokenwise_loss(pred, targets, self.kind, self.beta)
            return loss, {"loss": float(loss.detach())}
        loss, metrics = self.dtm(pred, targets)
        return loss, {"loss": float(loss.detach()), **metrics}


class MAEObjective(Objective):
    """mae and mae+dtm: 75% random masking drawn from ``batch["rng"]``, normalised-pixel reconstruction (+ DTM on
    decoder-predicted targets)."""

    def __init__(self, name: str, config, model: MAEModel, target_dim: int | None) -> None:
        super().__init__(model)
        self.name = name
        self.needs_targets = target_dim is not None  # mae+dtm distils the cached targets too
        self.target_dim = target_dim
        self.mae_weight = config.mae_weight
        self.target_norm = config.target_norm
        self.dtm = DTMLoss.from_config(config, n_tokens=model.backbone.patch_embed.num_patches) if name == "mae+dtm" else None

    def forward(self, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        images = self._require(batch, "images", self.name)
        keep, mask = self.model.sample_keep(images.shape[0], self.step_rng(batch), images.device)
        out = self.model(images, keep)
        l_mae = mae_loss(out.pixels, pixel_targets(images, self.model.patch_size, self.model.norm_pix), mask)
        if self.dtm is None:
            return l_mae, {"loss": float(l_mae.detach()), "mae": float(l_mae.detach())}
        targets = self._require(batch, "targets", self.name)
        _check_targets(targets, self.model.num_tokens, self.target_dim, self.name)
        l_dtm, metrics = self.dtm(out.targets, normalize_targets(targets, self.target_norm))
        loss = self.mae_weight * l_mae + l_dtm
        return loss, {"loss": float(loss.detach()), "mae": float(l_mae.detach()), "dtm": float(l_dtm.detach()), **metrics}


class LUTObjective(Objective):
    """lut: MAE + BYOL loss on unmasked tokens against an EMA teacher (see :mod:`morphcache.train.lut`); the two
    disjoint keep sets come from ``batch["rng"]``."""

    name = "lut"
    needs_second_view = True

    def __init__(self, config, learner: LUTLearner) -> None:
        super().__init__(None)
        self.learner = learner

    @property
    def model(self) -> MAEModel:
        return self.learner.model

    def forward(self, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        x1 = self._require(batch, "images", self.name)
        x2 = self._require(batch, "images2", self.name)
        loss, metrics = self.learner(x1, x2, self.step_rng(batch))
        return loss, {"loss": float(loss.detach()), **metrics}

    def after_step(self, step: int, total_steps: int) -> None:
        self.learner.update_teacher(step, total_steps)


def _backbone_of(student: nn.Module) -> nn.Module:
    if not hasattr(student, "backbone"):
        raise ConfigError(f"student {type(student).__name__} has no timm backbone; build it with create_student")
    return student.backbone


def build_objective(name: str, config, student: nn.Module, target_dim: int, grid: tuple[int, int]) -> Objective:
    """The objective ``name`` (a registered factory, :data:`OBJECTIVES` built in) around ``student`` (a
    :class:`MIMStudent`; MAE objectives reuse its backbone, or take an :class:`MAEModel` directly).

    ``grid`` is the store's token grid and must equal the student's. MAE / LUT sizes come from ``config``:
    ``decoder_dim`` / ``decoder_depth`` / ``decoder_heads`` (naver-ai/lut: 512, 8, 16), ``mask_ratio`` (0.75),
    ``norm_pix``, ``proj_hidden`` (4096) and ``proj_dim`` (None = the student's width).

    Raises:
        ConfigError: an unregistered name, a student whose grid or head width does not fit.
    """
    factory = registries.lookup(registries.objectives, name)
    backbone = _backbone_of(student)
    student_grid = tuple(int(g) for g in backbone.patch_embed.grid_size)
    if tuple(grid) != student_grid:
        raise ConfigError(
            f"student '{config.model}' has a {student_grid} token grid but the targets have {tuple(grid)}; "
            "change the student img_size or patch size"
        )
    objective = factory(config, student, target_dim)
    if not isinstance(objective, Objective):
        raise ConfigError(f"objective {name!r} built {type(objective).__name__}, not an Objective")
    return objective


def _distill(name: str, config, student: nn.Module, target_dim: int) -> Objective:
    if not isinstance(student, MIMStudent):
        raise ConfigError(f"objective '{name}' needs a MIMStudent (create_student), got {type(student).__name__}")
    if student.target_dim != target_dim:
        raise ConfigError(f"student head width {student.target_dim} != target width {target_dim}")
    return DistillObjective(name, config, student, target_dim)


def _mae_model(config, student: nn.Module, head_dim: int | None) -> MAEModel:
    if isinstance(student, MAEModel) and (student.target_head is not None) == (head_dim is not None):
        return student
    return MAEModel(_backbone_of(student), decoder_dim=config.decoder_dim, decoder_depth=config.decoder_depth,
                    decoder_heads=config.decoder_heads, mask_ratio=config.mask_ratio, norm_pix=config.norm_pix,
                    target_dim=head_dim)


@registries.objectives.register("dtm")
def _build_dtm(config, student, target_dim) -> Objective:
    """Dynamic Token Morphing (Kim et al., ICLR 2025; naver-ai/dtm) on block-masked predictions."""
    return _distill("dtm", config, student, target_dim)


@registries.objectives.register("tokenwise")
def _build_tokenwise(config, student, target_dim) -> Objective:
    """Token-wise distillation of the cached targets (DTM with no merges)."""
    return _distill("tokenwise", config, student, target_dim)


@registries.objectives.register("mae")
def _build_mae(config, student, target_dim) -> Objective:
    """MAE (He et al., CVPR 2022): random masking, normalised-pixel reconstruction."""
    return MAEObjective("mae", config, _mae_model(config, student, None), None)


@registries.objectives.register("mae+dtm")
def _build_mae_dtm(config, student, target_dim) -> Objective:
    """MAE plus DTM on decoder-predicted targets."""
    return MAEObjective("mae+dtm", config, _mae_model(config, student, target_dim), target_dim)


@registries.objectives.register("lut")
def _build_lut(config, student, target_dim) -> Objective:
    """LUT (Kim et al., ECCV 2024; naver-ai/lut): MAE + a BYOL loss on unmasked tokens against an EMA teacher."""
    learner = LUTLearner(_mae_model(config, student, None), proj_hidden=config.proj_hidden, proj_dim=config.proj_dim,
                         mae_weight=config.mae_weight, unmasked_weight=config.unmasked_weight,
                         momentum=tuple(config.ema_momentum))
    return LUTObjective(config, learner)
