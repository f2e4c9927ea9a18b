"""The pretraining driver: store + student + objective + loader -> AdamW steps, checkpoints, metrics.

``run_training(config, out_dir, resume=False, img_size=None) -> summary dict``. One optimizer step consumes
``accum_steps`` micro-batches of ``batch_size`` rows per rank; the lr is ``base_lr * sqrt(global_batch / 2048)``
(global batch = batch x accum x world size) with warmup then cosine to ``min_lr`` over
``epochs x steps_per_epoch`` optimizer steps. ``max_steps`` only stops the run early (it does not shorten the
schedule), so a run stopped at step k and resumed continues exactly as the uninterrupted run.

Determinism: the row order is a function of (seed, epoch) and the micro-batch index; masks come from
``default_rng((seed, micro_batch, rank))``; the torch / numpy / python RNGs and the objective's generators are
checkpointed and restored after everything is built, right before the first resumed step.

Outputs in ``out_dir`` (rank 0 only): ``config.json`` (the resolved RunConfig), ``metrics.jsonl`` (one JSON line
per optimizer step: step, epoch, loss, lr, images_per_s, grad_norm, data_s, objective metrics), ``tb/``
(TensorBoard), ``checkpoint.pt`` (+ ``checkpoint_step{N}.pt`` every ``checkpoint_every`` steps), ``summary.json``.
DDP: under torchrun (``WORLD_SIZE`` > 1) the process group uses gloo on CPU and nccl on GPU, the objective (which
owns the student) is wrapped in ``DistributedDataParallel`` and the loader is sharded by rank.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from morphcache.errors import ConfigError
from morphcache.schemas import RunConfig
from morphcache.train import guards
from morphcache.train.checkpoint import (
    generator_states, load_checkpoint, reseed_generators, save_checkpoint, set_generator_states, set_rng_state,
)
from morphcache.train.loader import RenderSpec
from morphcache.train.sampler import EpochSampler
from morphcache.train.schedule import WarmupCosine, scaled_lr

TARGET_OBJECTIVES = ("dtm", "tokenwise", "mae+dtm")
MASK_OBJECTIVES = ("dtm", "tokenwise")


def _init_distributed() -> tuple[int, int, torch.device]:
    """(rank, world_size, device); initializes the process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    if world <= 1:
        return 0, 1, torch.device("cuda" if cuda else "cpu")
    import torch.distributed as dist

    local = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    if cuda:
        torch.cuda.set_device(local)
    return dist.get_rank(), dist.get_world_size(), torch.device(f"cuda:{local}" if cuda else "cpu")


def _split_model_state(objective) -> tuple[dict, dict, str]:
    """(model state, the objective's other state, prefix of the model inside the objective)."""
    model = objective.model
    prefix = next(name for name, mod in objective.named_modules() if mod is model)
    full = objective.state_dict()
    extras = {k: v for k, v in full.items() if not k.startswith(prefix + ".")}
    return model.state_dict(), extras, prefix


class _Metrics:
    """metrics.jsonl + TensorBoard, rank 0 only."""

    def __init__(self, out_dir: Path, enabled: bool, resume_step: int | None, tensorboard: bool) -> None:
        self.enabled = enabled
        self.path = out_dir / "metrics.jsonl"
        self.writer = None
        if not enabled:
            return
        kept = []
        if resume_step is not None and self.path.is_file():  # drop steps redone after the checkpoint
            kept = [ln for ln in self.path.read_text().splitlines() if ln and json.loads(ln)["step"] <= resume_step]
        self.path.write_text("".join(ln + "\n" for ln in kept))
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(out_dir / "tb"))

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and v is not None:
                    self.writer.add_scalar(f"train/{k}", v, record["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _mean_metrics(items: list[dict]) -> dict:
    keys = set().union(*items) if items else set()
    return {k: float(np.mean([m[k] for m in items if k in m])) for k in sorted(keys)}


def run_training(config: RunConfig, out_dir: str | os.PathLike, resume: bool = False, img_size: int | None = None,
                 image_root: str | None = None, tensorboard: bool = True, show_progress: bool = True,
                 teacher_weights: str | None = None, target_transform=None) -> dict:
    """Train as ``config`` says, writing into ``out_dir``; returns the summary (also ``summary.json``).

    ``target_transform``: optional ``(targets (B, T, D) float32, rows (B,) int64) -> targets`` applied to every
    micro-batch's targets after they are read (or computed by the online teacher); for controlled studies such as
    :class:`morphcache.study.noise.TokenNoise`, never set by the ``train`` command.
    """
    from morphcache.progress import progress_bar
    from morphcache.store.feature_store import FeatureStore
    from morphcache.train.masking import block_mask_generator_from_config
    from morphcache.train.objectives import build_objective
    from morphcache.train.student import create_student
    from morphcache.train.torch_loader import make_loader

    t_setup = time.perf_counter()
    out_dir = Path(out_dir)
    rank, world, device = _init_distributed()
    store = FeatureStore.open(config.store)
    spec = store.spec
    guards.check_store_complete(store, config.allow_partial)
    patch = guards.student_patch_size(config.model)
    side = guards.resolve_student_size(spec, patch, img_size)
    resuming = guards.check_run_dir(out_dir, config, resume)
    if config.objective in ("mae", "lut") and config.teacher_online:
        raise ConfigError(f"--teacher-online has no effect with objective '{config.objective}' (it uses no targets)")

    torch.manual_seed(config.seed)
    target_dim = spec.dim
    student = create_student(config.model, side, target_dim, config.layer_scale, config.drop_path, patch_size=patch)
    guards.check_student_grid(spec, student.grid)
    objective = build_objective(config.objective, config, student, target_dim, spec.teacher.grid).to(device)
    if world > 1:
        reseed_generators(objective, config.seed, rank)
    optimizer = torch.optim.AdamW(objective.param_groups(config.weight_decay), lr=config.base_lr, betas=(0.9, 0.999))

    sampler = EpochSampler(store.ok_rows(), spec.views_per_image, config.batch_size, config.seed, rank, world,
                           second_view=config.objective == "lut", views_used=config.views_used,
                           view_order=config.view_order)
    steps_per_epoch = sampler.steps_per_epoch // config.accum_steps
    if steps_per_epoch == 0:
        raise ConfigError(f"an epoch has {sampler.steps_per_epoch} micro-batches, fewer than accum_steps "
                          f"{config.accum_steps}; lower --accum-steps or --batch-size")
    total_steps = config.epochs * steps_per_epoch
    stop = min(total_steps, config.max_steps) if config.max_steps else total_steps
    global_batch = config.batch_size * config.accum_steps * world
    schedule = WarmupCosine(optimizer, scaled_lr(config.base_lr, global_batch), config.min_lr,
                            config.warmup_steps, total_steps)

    step, ckpt = 0, None
    if resuming:
        ckpt = load_checkpoint(out_dir / "checkpoint.pt")
        if ckpt.get("sampler") != sampler.state_dict():
            raise ConfigError(f"{out_dir}: the checkpoint's row order {ckpt.get('sampler')} differs from this run's "
                              f"{sampler.state_dict()} (world size or store changed); resume with the same setup")
        if ckpt.get("store_spec") != spec.identity():
            raise ConfigError(f"{out_dir}: the checkpoint was trained on another store; pass --store {config.store} "
                              "as it was made")
        guards.check_target_width(spec, ckpt["target_dim"], f"checkpoint {out_dir / 'checkpoint.pt'}")
        objective.model.load_state_dict(ckpt["model"])
        missing, unexpected = objective.load_state_dict(ckpt["objective"], strict=False)
        prefix = _split_model_state(objective)[2]
        if unexpected or any(not k.startswith(prefix + ".") for k in missing):
            raise ConfigError(f"{out_dir}: checkpoint objective state does not fit '{config.objective}'")
        optimizer.load_state_dict(ckpt["optimizer"])
        schedule.load_state_dict(ckpt["schedule"])
        set_generator_states(objective, ckpt["generators"])
        step = int(ckpt["step"])

    teacher = None
    if config.teacher_online:
        from morphcache.train.online_teacher import OnlineTeacher

        # the precision the store's targets were made in (schema-1 stores did not record it: the run's)
        teacher = OnlineTeacher(spec, device, precision=spec.teacher.precision or config.precision,
                                weights=teacher_weights)
    render = RenderSpec(side, tuple(spec.teacher.mean), tuple(spec.teacher.std), spec.augment.interpolation,
                        teacher_size=teacher.size if teacher else None, second_view=config.objective == "lut")
    loader = make_loader(config.loader, store, sampler, render, start_step=step * config.accum_steps,
                         workers=config.workers, read_targets=config.objective in TARGET_OBJECTIVES and teacher is None,
                         image_root=image_root)
    masker = block_mask_generator_from_config(config, student.grid) if config.objective in MASK_OBJECTIVES else None
    model = objective
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        if device.type == "cuda":  # LUT's BatchNorms see the global batch (SyncBatchNorm runs on GPUs only)
            objective = torch.nn.SyncBatchNorm.convert_sync_batchnorm(objective)
        model = DistributedDataParallel(objective, device_ids=[device.index] if device.type == "cuda" else None)

    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(config.model_dump_json(indent=2) + "\n")
    metrics = _Metrics(out_dir, rank == 0, step if resuming else None, tensorboard)
    autocast = (torch.autocast(device_type=device.type, dtype=torch.bfloat16) if config.precision == "bf16"
                else contextlib.nullcontext())

    def save(path_names: list[str]) -> None:
        if rank != 0:
            return
        model_state, extras, _ = _split_model_state(objective)
        payload = {
            "model": model_state, "config": config.model_dump(mode="json"), "target_dim": target_dim,
            "img_size": side, "mean": list(spec.teacher.mean), "std": list(spec.teacher.std),
            "objective": extras, "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
            "generators": generator_states(objective), "step": step, "micro_step": step * config.accum_steps,
            "epoch": sampler.position(step * config.accum_steps)[0], "sampler": sampler.state_dict(),
            "store_spec": spec.identity(),
        }
        first = save_checkpoint(out_dir / path_names[0], payload)
        for name in path_names[1:]:  # the same bytes under another name: serialize once, copy atomically
            tmp = out_dir / (name + ".tmp")
            shutil.copyfile(first, tmp)
            os.replace(tmp, out_dir / name)

    it = iter(loader)
    if ckpt is not None:
        set_rng_state(ckpt["rng"])  # after everything that draws random numbers while being built
    setup_s = time.perf_counter() - t_setup
    start_step, images, last = step, 0, {}
    t_run = time.perf_counter()
    try:
        with progress_bar(total=stop, description="train", unit="steps", initial=step) as bar:
            while step < stop:
                t0 = time.perf_counter()
                lr = schedule.apply()
                optimizer.zero_grad(set_to_none=True)
                micro_metrics, data_s = [], 0.0
                for micro in range(config.accum_steps):
                    g = step * config.accum_steps + micro
                    td = time.perf_counter()
                    batch = next(it)
                    if teacher is not None:
                        teacher.fill_targets(batch)
                    if target_transform is not None and batch.targets is not None:
                        batch.targets = target_transform(batch.targets, batch.rows)
                    data_s += time.perf_counter() - td
                    inputs = {"images": batch.images.to(device, non_blocking=True)}
                    if batch.targets is not None:
                        inputs["targets"] = batch.targets.to(device, non_blocking=True)
                    if batch.images2 is not None:
                        inputs["images2"] = batch.images2.to(device, non_blocking=True)
                    if masker is not None:
                        inputs["mask"] = masker.batch(len(batch.rows), np.random.default_rng((config.seed, g, rank)))
                    sync = model.no_sync() if world > 1 and micro < config.accum_steps - 1 else contextlib.nullcontext()
                    with sync:
                        with autocast:
                            loss, m = model(inputs)
                        (loss / config.accum_steps).backward()
                    micro_metrics.append(m)
                grad_norm = None
                if config.clip_grad:
                    grad_norm = float(torch.nn.utils.clip_grad_norm_(objective.trainable_parameters(), config.clip_grad))
                optimizer.step()
                objective.after_step(step, total_steps)
                schedule.advance()
                step += 1
                n_img = config.batch_size * config.accum_steps * world
                images += n_img
                dt = time.perf_counter() - t0
                last = _mean_metrics(micro_metrics)
                if world > 1:
                    import torch.distributed as dist

                    t = torch.tensor([last["loss"]], dtype=torch.float64)
                    dist.all_reduce(t)
                    last["loss"] = float(t) / world
                record = {"step": step, "epoch": sampler.position(step * config.accum_steps - 1)[0], "lr": lr,
                          "images_per_s": n_img / dt, "step_s": dt, "data_s": data_s, "grad_norm": grad_norm, **last}
                metrics.log(record)
                if show_progress and rank == 0:
                    bar.advance(1, loss=f"{last['loss']:.4f}", img_s=f"{n_img / dt:.1f}")
                if config.checkpoint_every and step % config.checkpoint_every == 0 and step < stop:
                    save(["checkpoint.pt", f"checkpoint_step{step}.pt"])
        wall = time.perf_counter() - t_run
        save(["checkpoint.pt"])
    finally:
        metrics.close()
        loader.close()
    summary = {
        "steps": step - start_step, "first_step": start_step, "final_step": step, "total_steps": total_steps,
        "images": images, "wall_seconds": wall, "images_per_s": images / wall if wall > 0 else 0.0,
        "setup_seconds": setup_s, "final_loss": last.get("loss"), "img_size": side, "world_size": world,
        "objective": config.objective, "loader": config.loader, "teacher_online": config.teacher_online,
    }
    if rank == 0:
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
