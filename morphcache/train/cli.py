"""``morphcache train``: pretrain a ViT student from a feature store (DALI-fed), resumable.

Every :class:`~morphcache.schemas.RunConfig` field is an option; the resolved config is saved as
``RUN_DIR/config.json``. Heavy imports (torch, DALI, timm) happen inside the command.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

_OBJ = "dtm | tokenwise | mae | lut | mae+dtm"


def train_command(
    store: Annotated[Path, typer.Option("--store", help="feature store written by `morphcache extract`")],
    out: Annotated[Path, typer.Option("--out", help="run directory (config, metrics, checkpoints)")],
    model: Annotated[str, typer.Option(help="timm ViT student, e.g. vit_tiny_patch16 or vit_small_patch16_224")] = "vit_tiny_patch16_224",
    objective: Annotated[str, typer.Option(help=_OBJ)] = "dtm",
    epochs: Annotated[int, typer.Option(help="epochs (one view per image per epoch)")] = 1,
    batch_size: Annotated[int, typer.Option("--batch-size", help="rows per micro-batch per process")] = 32,
    accum_steps: Annotated[int, typer.Option("--accum-steps", help="micro-batches per optimizer step")] = 1,
    base_lr: Annotated[float, typer.Option("--base-lr", help="lr at batch 2048, scaled by sqrt(batch/2048)")] = 1.5e-3,
    min_lr: Annotated[float, typer.Option("--min-lr", help="final lr of the cosine schedule")] = 1e-5,
    weight_decay: Annotated[float, typer.Option("--weight-decay")] = 0.05,
    warmup_steps: Annotated[int, typer.Option("--warmup-steps", help="linear warmup, optimizer steps")] = 0,
    clip_grad: Annotated[float, typer.Option("--clip-grad", help="max gradient norm; 0 disables clipping")] = 3.0,
    layer_scale: Annotated[float, typer.Option("--layer-scale", help="ViT layer scale init; 0 disables")] = 0.1,
    drop_path: Annotated[float, typer.Option("--drop-path")] = 0.0,
    mask_patches: Annotated[int, typer.Option("--mask-patches", help="masked patches at 14x14, scaled to the grid")] = 75,
    mask_min_block: Annotated[int, typer.Option("--mask-min-block", help="smallest mask block, patches")] = 16,
    mask_aspect: Annotated[tuple[float, float], typer.Option("--mask-aspect", help="block aspect range MIN MAX")] = (0.3, 1 / 0.3),
    dtm_max_merge: Annotated[Optional[int], typer.Option("--dtm-max-merge", help="DTM N: tokens to merge sampled in [0, N] (default: all tokens of the grid; released 196 at 14x14)")] = None,
    dtm_max_iters: Annotated[int, typer.Option("--dtm-max-iters", help="DTM K: iterations sampled in [1, K]")] = 14,
    dtm_cases: Annotated[int, typer.Option("--dtm-cases", help="DTM L: morphing cases per step")] = 2,
    dtm_merge_rule: Annotated[str, typer.Option("--dtm-merge-rule", help="released (ceil(n/k) per iteration, as naver-ai/dtm) | exact (n in total)")] = "released",
    dtm_protect_top_left: Annotated[bool, typer.Option("--dtm-protect-top-left/--dtm-merge-top-left", help="never merge the top-left patch (naver-ai/dtm's behaviour, for exact parity)")] = False,
    loss: Annotated[str, typer.Option(help="smooth_l1 | cosine | l2")] = "smooth_l1",
    smooth_l1_beta: Annotated[float, typer.Option("--smooth-l1-beta")] = 2.0,
    target_norm: Annotated[str, typer.Option("--target-norm", help="layernorm (per-token, no affine) | none")] = "none",
    mae_weight: Annotated[float, typer.Option("--mae-weight")] = 1.0,
    unmasked_weight: Annotated[float, typer.Option("--unmasked-weight", help="LUT weight of the unmasked-token loss")] = 0.25,
    ema_momentum: Annotated[tuple[float, float], typer.Option("--ema-momentum", help="LUT EMA momentum START END")] = (0.996, 1.0),
    teacher_online: Annotated[bool, typer.Option("--teacher-online", help="run the teacher live instead of reading the cache")] = False,
    loader: Annotated[str, typer.Option(help="dali | torch (PIL fallback, pixels within measured tolerance)")] = "dali",
    workers: Annotated[int, typer.Option(help="loader worker processes")] = 2,
    precision: Annotated[str, typer.Option(help="bf16 (autocast) | fp32")] = "bf16",
    seed: Annotated[int, typer.Option()] = 0,
    checkpoint_every: Annotated[int, typer.Option("--checkpoint-every", help="steps between checkpoints; 0 = end only")] = 0,
    allow_partial: Annotated[bool, typer.Option("--allow-partial", help="train on the finished chunks of an incomplete store")] = False,
    max_steps: Annotated[Optional[int], typer.Option("--max-steps", help="stop after this many optimizer steps (schedule unchanged)")] = None,
    views_used: Annotated[Optional[int], typer.Option("--views-used", help="train on the first N stored views of each image (default: all)")] = None,
    view_order: Annotated[str, typer.Option("--view-order", help="random (a random used view per image per epoch) | epoch (view e mod N in epoch e)")] = "random",
    resume: Annotated[bool, typer.Option("--resume", help="continue the run in --out from its checkpoint")] = False,
    img_size: Annotated[Optional[int], typer.Option("--img-size", help="student input side; default grid x patch")] = None,
    image_root: Annotated[Optional[Path], typer.Option("--image-root", help="where the store's images live now (default: as recorded)")] = None,
    teacher_weights: Annotated[Optional[Path], typer.Option("--teacher-weights", help="--teacher-online: where the store's teacher weights live now (default: as recorded; checked against the recorded sha256)")] = None,
    tensorboard: Annotated[bool, typer.Option("--tensorboard/--no-tensorboard")] = True,
    threads: Annotated[Optional[int], typer.Option("--threads", help="torch CPU threads (default: torch's)")] = None,
) -> int:
    """Pretrain a ViT student on cached teacher tokens (DTM, token-wise, MAE, LUT, MAE+DTM)."""
    import json
    import os

    from pydantic import ValidationError

    from morphcache.errors import ConfigError
    from morphcache.schemas import RunConfig

    try:
        config = RunConfig(
            store=str(store), model=model, objective=objective, epochs=epochs, batch_size=batch_size,
            accum_steps=accum_steps, base_lr=base_lr, min_lr=min_lr, weight_decay=weight_decay,
            warmup_steps=warmup_steps, clip_grad=clip_grad or None, layer_scale=layer_scale, drop_path=drop_path,
            mask_patches=mask_patches, mask_min_block=mask_min_block, mask_aspect=tuple(mask_aspect),
            dtm_max_merge=dtm_max_merge, dtm_max_iters=dtm_max_iters, dtm_cases=dtm_cases,
            dtm_merge_rule=dtm_merge_rule, dtm_protect_top_left=dtm_protect_top_left, loss=loss,
            smooth_l1_beta=smooth_l1_beta, target_norm=target_norm, mae_weight=mae_weight, unmasked_weight=unmasked_weight,
            ema_momentum=tuple(ema_momentum), teacher_online=teacher_online, loader=loader, workers=workers,
            precision=precision, seed=seed, checkpoint_every=checkpoint_every, allow_partial=allow_partial,
            max_steps=max_steps, views_used=views_used, view_order=view_order,
        )
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"]) or "option"
        raise ConfigError(f"--{field.replace('_', '-')}: {err['msg']} (got {err.get('input')!r})") from None

    import torch

    from morphcache.train.loop import run_training

    if threads:
        torch.set_num_threads(threads)
    summary = run_training(config, out, resume=resume, img_size=img_size,
                           image_root=str(image_root) if image_root else None, tensorboard=tensorboard,
                           teacher_weights=str(teacher_weights) if teacher_weights else None)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun only rank 0 reports
        typer.echo(json.dumps({k: summary[k] for k in ("steps", "final_step", "images", "wall_seconds",
                                                       "images_per_s", "final_loss")}))
    return 0
