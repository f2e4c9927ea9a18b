"""Refuse runs that cannot be right before any work starts: wrong grid, wrong width, partial store, foreign run dir.

Every check raises :class:`~morphcache.errors.ConfigError` (or :class:`~morphcache.errors.StoreError`) with one line
naming the differing field and what to do.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from morphcache.errors import ConfigError, StoreError
from morphcache.geometry import check_patch_multiple
from morphcache.schemas import RunConfig, StoreSpec

#: RunConfig fields that may change between a run and its ``--resume`` without changing the result.
RESUMABLE_FIELDS = frozenset({"max_steps", "workers", "checkpoint_every"})


def student_patch_size(model_name: str) -> int:
    """Patch side of a timm ViT name (``vit_small_patch16_224`` -> 16), read from the model when not in the name."""
    from morphcache.train.student import create_backbone, resolve_model_name

    name = resolve_model_name(model_name)
    match = re.search(r"patch(\d+)", name)
    if match:
        return int(match.group(1))
    return int(create_backbone(name, 224).patch_embed.patch_size[0])


def resolve_student_size(spec: StoreSpec, patch_size: int, img_size: int | None = None) -> int:
    """The student's input side: the teacher grid times the student's patch (or ``img_size``, checked to fit).

    A patch-14 teacher at 224 px has a 16x16 grid; a patch-16 student then reads the same crops at 256 px.
    """
    gh, gw = spec.teacher.grid
    if gh != gw:
        raise ConfigError(f"store teacher grid {gh}x{gw} is not square; the student needs a square grid")
    want = gh * patch_size
    if img_size is None:
        return want
    note = f" (the store's {gh}x{gw} teacher grid needs --img-size {want})"
    if check_patch_multiple(img_size, patch_size, option="--img-size", model="the student", note=note) != gh:
        raise ConfigError(
            f"grid mismatch: img_size={img_size} gives the student a {img_size // patch_size}x{img_size // patch_size} "
            f"grid but the store's teacher grid is {gh}x{gw} ({spec.teacher.image_size}px / patch "
            f"{spec.teacher.patch_size}); use --img-size {want}"
        )
    return img_size


def check_student_grid(spec: StoreSpec, student_grid: tuple[int, int]) -> None:
    """The student's patch grid must equal the teacher's (targets are per grid token)."""
    if tuple(student_grid) != tuple(spec.teacher.grid):
        raise ConfigError(f"grid mismatch: student grid {tuple(student_grid)} != store teacher grid "
                          f"{spec.teacher.grid}; pick --img-size = grid x student patch")


def check_target_width(spec: StoreSpec, target_dim: int, source: str) -> None:
    """``target_dim`` (from a checkpoint or an online teacher) must equal the store's token width."""
    if int(target_dim) != spec.dim:
        raise ConfigError(f"teacher width mismatch: {source} has target width {target_dim} but the store's "
                          f"teacher.dim is {spec.dim}; use the store this run was made with")


def check_store_complete(store, allow_partial: bool) -> None:
    """Refuse a store with unfinished chunks unless ``allow_partial``; refuse one with nothing servable."""
    missing = store.missing_chunks()
    if missing and not allow_partial:
        shown = ", ".join(str(c) for c in missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise StoreError(f"{store.path}: store is incomplete ({len(missing)} of {store.n_chunks} chunks missing: "
                         f"{shown}); re-run the extraction to finish it, or pass --allow-partial")
    if len(store.ok_rows()) == 0:
        raise StoreError(f"{store.path}: no servable rows (no finished chunk with ok images); run the extraction")


def check_online_teacher(spec: StoreSpec, teacher_spec) -> None:
    """The live teacher must be the one the store was made with (same architecture, weights, size, width)."""
    diff = spec.teacher.differences(teacher_spec)
    if diff:
        raise ConfigError(f"--teacher-online: the loaded teacher differs from the store's teacher in "
                          f"{', '.join('teacher.' + d for d in diff)}; check the weights path in the store spec")


def _config_diff(old: dict, new: dict) -> list[str]:
    """Fields whose values differ. A field the older run's config.json lacks (added by a later morphcache) counts
    as its default, and ``schema_version`` is the file's format, not a setting of the run."""
    defaults = {name: field.get_default(call_default_factory=True) for name, field in RunConfig.model_fields.items()
                if not field.is_required()}
    defaults = RunConfig.model_construct(**defaults).model_dump(mode="json")
    old = {**defaults, **old}
    return sorted(k for k in set(old) | set(new) if k != "schema_version" and old.get(k) != new.get(k))


def check_run_dir(out_dir: Path, config: RunConfig, resume: bool) -> bool:
    """Validate ``out_dir`` for this run; returns True when a checkpoint will be resumed.

    - no ``config.json``: a new run (``--resume`` is refused: nothing to resume);
    - ``config.json`` differs from ``config`` (other than :data:`RESUMABLE_FIELDS` on resume): refused;
    - same config with a checkpoint and no ``--resume``: refused (it would overwrite the run);
    - same config without a checkpoint: started again from scratch.
    """
    cfg_path = out_dir / "config.json"
    ckpt = out_dir / "checkpoint.pt"
    if not cfg_path.is_file():
        if resume:
            raise ConfigError(f"{out_dir}: --resume given but the run directory has no config.json; drop --resume")
        if out_dir.exists() and any(out_dir.iterdir()):
            raise ConfigError(f"{out_dir}: exists, is not empty and is not a run directory; choose another --out")
        return False
    try:
        old = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{cfg_path}: unreadable ({type(exc).__name__}); choose another --out") from None
    new = config.model_dump(mode="json")
    diff = _config_diff(old, new)
    if resume:
        diff = [d for d in diff if d not in RESUMABLE_FIELDS]
    if diff:
        raise ConfigError(f"{out_dir}: holds a run with a different config ({', '.join(diff)} differ); "
                          f"{'resume with the same options' if resume else 'choose another --out'}")
    if resume:
        if not ckpt.is_file():
            raise ConfigError(f"{out_dir}: --resume given but there is no checkpoint.pt yet; drop --resume to restart")
        return True
    if ckpt.is_file():
        raise ConfigError(f"{out_dir}: already holds a checkpoint of this run; pass --resume to continue it "
                          "or choose another --out")
    logged = _logged_steps(out_dir / "metrics.jsonl")
    if logged:  # an interrupted run that never reached a checkpoint: say so rather than truncate it silently
        print(f"train: {out_dir} holds {logged} logged steps of this run but no checkpoint.pt to resume from; "
              "restarting from step 1 (metrics.jsonl is rewritten; --checkpoint-every N saves one every N steps)",
              file=sys.stderr)
    return False


def _logged_steps(path: Path) -> int:
    try:
        return sum(1 for line in path.read_text().splitlines() if line.strip())
    except OSError:
        return 0
