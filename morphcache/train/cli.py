"""``morphcache train``: pretrain a ViT student from a feature store (DALI-fed), resumable.

Every :class:`~morphcache.schemas.RunConfig` field is an option, generated from the field (one definition; see
:mod:`morphcache.config_cli`), and ``--config FILE`` sets any of them; the resolved config is saved as
``RUN_DIR/config.json`` and loads again with ``--config``. Heavy imports (torch, DALI, timm) happen inside the command.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from morphcache.config_cli import options_from_model
from morphcache.schemas import RunConfig

@options_from_model(RunConfig, exclude={"schema_version"})
def train_command(
    values: dict,
    out: Annotated[Optional[Path], typer.Option("--out", help="run directory (config, metrics, checkpoints)")] = None,
    print_config: Annotated[bool, typer.Option("--print-config", help="print every effective hyper-parameter as "
                                               "JSON and exit")] = False,
    device: Annotated[str, typer.Option(help="auto (CUDA when available; torchrun: cuda:LOCAL_RANK) | cpu | cuda | "
                                        "cuda:N")] = "auto",
    resume: Annotated[bool, typer.Option("--resume", help="continue the run in --out from its checkpoint")] = False,
    img_size: Annotated[Optional[int], typer.Option("--img-size", help="student input side; default grid x patch")] = None,
    image_root: Annotated[Optional[Path], typer.Option("--image-root", help="where the store's images live now "
                                                       "(default: as recorded)")] = None,
    teacher_weights: Annotated[Optional[Path], typer.Option("--teacher-weights", help="--teacher-online: where the "
                                                            "store's teacher weights live now (default: as recorded; "
                                                            "checked against the recorded sha256)")] = None,
    tensorboard: Annotated[bool, typer.Option("--tensorboard/--no-tensorboard")] = True,
    threads: Annotated[Optional[int], typer.Option("--threads", help="torch CPU threads (default: torch's)")] = None,
) -> int:
    """Pretrain a ViT student on cached teacher tokens (DTM, token-wise, MAE, LUT, MAE+DTM).

    Every hyper-parameter is a RunConfig field: a flag here, or a key of ``--config FILE`` (YAML/JSON, e.g. another
    run's config.json; flags win). The run directory keeps the resolved config.
    """
    import json
    import os

    from morphcache.config_cli import ConfigValues, validate_config
    from morphcache.device import describe, resolve_device, resolve_precision
    from morphcache.errors import ConfigError
    from morphcache.schemas.specs import RUN_PRESETS

    preset = values.get("preset", "release")
    if preset in RUN_PRESETS:  # a preset's sizes, unless set explicitly (flags or --config)
        values = (values.over(RUN_PRESETS[preset]) if isinstance(values, ConfigValues)
                  else {**RUN_PRESETS[preset], **values})
    requested = validate_config(RunConfig, values)
    chosen_device = resolve_device(device)
    precision = resolve_precision(requested.precision, chosen_device, allowed=("bf16", "fp32"))
    config = requested.model_copy(update={"precision": precision})
    if print_config:
        typer.echo(json.dumps(_effective_config(config, img_size), indent=2))
        return 0
    if int(os.environ.get("RANK", "0")) == 0:
        typer.echo(f"train: {describe(chosen_device, precision, device, requested.precision)}")
    if out is None:
        raise ConfigError("--out is required to train (only --print-config runs without it)")

    import torch

    from morphcache.train.loop import run_training

    if threads:
        torch.set_num_threads(threads)
    summary = run_training(config, out, resume=resume, img_size=img_size,
                           image_root=str(image_root) if image_root else None, tensorboard=tensorboard,
                           teacher_weights=str(teacher_weights) if teacher_weights else None, device=chosen_device)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun only rank 0 reports
        typer.echo(json.dumps({k: summary[k] for k in ("steps", "final_step", "images", "wall_seconds",
                                                       "images_per_s", "final_loss")}))
    return 0


def _effective_config(config, img_size: int | None) -> dict:
    """``config.effective`` at the store's grid and the student's width when they can be read (world size from
    ``WORLD_SIZE``); otherwise without the grid-dependent values, with a note saying why."""
    import os

    from morphcache.errors import MorphcacheError

    world = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        import torch

        from morphcache.store.feature_store import FeatureStore
        from morphcache.train import guards
        from morphcache.train.student import create_backbone

        spec = FeatureStore.open(config.store).spec
        patch = guards.student_patch_size(config.model)
        side = guards.resolve_student_size(spec, patch, img_size)
        with torch.device("meta"):
            width = int(create_backbone(config.model, side, None, 0.0, patch).embed_dim)
        return config.effective(spec.teacher.grid, width, world)
    except (MorphcacheError, OSError, ValueError) as exc:
        out = config.effective(None, None, world)
        out["effective"]["note"] = f"store not readable ({exc}); grid-dependent values omitted"
        return out
