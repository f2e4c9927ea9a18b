"""The pretraining engine: store + student + objective + loader -> AdamW steps, checkpoints, metrics.

Three pieces, as MAE's ``engine_pretrain`` and open_clip's training driver separate them:
:func:`build_train_state` sets everything up (student, objective, optimiser and schedule, sampler, loader, online
teacher, DDP, resume) into a :class:`TrainState`; :func:`train_step` runs one optimiser step; save and restore live
in :mod:`morphcache.train.checkpoint`. :func:`run_training` drives them and writes the run directory.
``run_training(config, out_dir, resume=False, img_size=None) -> summary dict``. One optimizer step consumes
``accum_steps`` micro-batches of ``batch_size`` rows per rank; the lr is ``base_lr * sqrt(global_batch / 2048)``
(global batch = batch x accum x world size) with warmup then cosine to ``min_lr`` over
``epochs x steps_per_epoch`` optimizer steps. ``max_steps`` only stops the run early (it does not shorten the
schedule), so a run stopped at step k and resumed continues exactly as the uninterrupted run.

Determinism: the row order is a function of (seed, epoch) and the micro-batch index. Every micro-batch's inputs
carry ``rng = numpy.random.default_rng((seed, g, rank))`` (``g = step * accum_steps + micro``, the global
micro-batch index): the objective draws all its masks from it -- BEiT block masks (dtm, tokenwise), MAE random
keep sets (mae, mae+dtm), LUT's disjoint keep sets -- so masks are a function of (seed, g, rank) alone and need no
checkpointed state. What is checkpointed and restored (after everything is built, right before the first resumed
step): the torch / numpy / python global RNGs (dropout, drop-path) and the ``torch.Generator`` objects the
objective holds (DTM's morphing-case sampler, see :mod:`morphcache.train.objectives`).

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
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from morphcache.errors import ConfigError
from morphcache.schemas import RunConfig
from morphcache.train import guards
from morphcache.train.checkpoint import reseed_generators, restore_train_state, save_train_state, set_rng_state
from morphcache.train.loader import LoaderOptions
from morphcache.train.sampler import EpochSampler
from morphcache.train.schedule import build_optimizer, scaled_lr



def _init_distributed(device: str | None = None) -> tuple[int, int, torch.device]:
    """(rank, world_size, device); initializes the process group under torchrun.

    ``device``: a resolved ``--device`` (:func:`morphcache.device.resolve_device`); None = CUDA when available.
    Under torchrun a CUDA run uses ``cuda:LOCAL_RANK`` (:func:`morphcache.device.local_rank_device`)."""
    from morphcache.device import local_rank_device

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    cuda = str(device).startswith("cuda")
    if world <= 1:
        return 0, 1, torch.device(device)
    import torch.distributed as dist

    if cuda:
        device = local_rank_device()
        torch.cuda.set_device(torch.device(device))
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    return dist.get_rank(), dist.get_world_size(), torch.device(device)


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


@dataclass
class TrainState:
    """Everything a run holds between optimiser steps. ``objective`` owns the student; ``model`` is what the step
    calls (``objective`` itself, or its DistributedDataParallel wrapper). ``step`` counts optimiser steps done."""

    config: RunConfig
    out_dir: Path
    rank: int
    world: int
    device: torch.device
    spec: Any  # StoreSpec
    side: int
    objective: Any  # Objective
    model: Any
    optimizer: torch.optim.Optimizer
    schedule: Any  # WarmupCosine
    sampler: EpochSampler
    loader: Any
    teacher: Any = None  # OnlineTeacher for --teacher-online
    total_steps: int = 0
    stop: int = 0
    step: int = 0
    autocast: Any = field(default_factory=contextlib.nullcontext)
    target_transform: Callable | None = None

    @property
    def target_dim(self) -> int:
        return self.spec.dim


def build_train_state(config: RunConfig, out_dir: str | os.PathLike, resume: bool = False, img_size: int | None = None,
                      image_root: str | None = None, teacher_weights: str | None = None,
                      device: str | None = None) -> tuple[TrainState, dict | None]:
    """Set up a run (see :func:`run_training` for the arguments); returns the state and, when resuming, the loaded
    checkpoint (its RNG state is restored by the caller right before the first step).

    Raises:
        ConfigError: a student that does not fit the store, a run directory of another config, bad options
            (``--teacher-online`` with an objective without targets, fewer micro-batches per epoch than
            ``accum_steps``, an unknown objective or loader), a checkpoint of another run (see
            :func:`~morphcache.train.checkpoint.restore_train_state`).
        StoreNotFoundError: no store at ``config.store``.
        StoreError: an unusable store (see :meth:`FeatureStore.open`), an incomplete one without
            ``allow_partial``, or one with no servable rows.
        MorphcacheError: ``resume`` with a missing or unreadable ``checkpoint.pt``.
    """
    from morphcache.device import resolve_precision
    from morphcache.store.feature_store import FeatureStore
    from morphcache.train.objectives import build_objective
    from morphcache.train.student import create_student
    from morphcache.train.torch_loader import build_loader

    out_dir = Path(out_dir)
    rank, world, device = _init_distributed(device)
    if config.precision == "auto":
        config = config.model_copy(update={"precision": resolve_precision("auto", str(device), ("bf16", "fp32"))})
    store = FeatureStore.open(config.store)
    spec = store.spec
    guards.check_store_complete(store, config.allow_partial)
    patch = guards.student_patch_size(config.model)
    side = guards.resolve_student_size(spec, patch, img_size)
    resuming = guards.check_run_dir(out_dir, config, resume)

    torch.manual_seed(config.seed)
    student = create_student(config.model, side, spec.dim, config.layer_scale, config.drop_path, patch_size=patch)
    guards.check_student_grid(spec, student.grid)
    objective = build_objective(config.objective, config, student, spec.dim, spec.teacher.grid).to(device)
    if config.teacher_online and not objective.needs_targets:
        raise ConfigError(f"--teacher-online has no effect with objective '{config.objective}' (it uses no targets)")
    if world > 1:
        reseed_generators(objective, config.seed, rank)

    sampler = EpochSampler(store.ok_rows(), spec.views_per_image, config.batch_size, config.seed, rank, world,
                           second_view=objective.needs_second_view, views_used=config.views_used,
                           view_order=config.view_order)
    steps_per_epoch = sampler.steps_per_epoch // config.accum_steps
    if steps_per_epoch == 0:
        raise ConfigError(f"an epoch has {sampler.steps_per_epoch} micro-batches, fewer than accum_steps "
                          f"{config.accum_steps}; lower --accum-steps or --batch-size")
    total_steps = config.epochs * steps_per_epoch
    stop = min(total_steps, config.max_steps) if config.max_steps else total_steps
    global_batch = config.batch_size * config.accum_steps * world
    optimizer, schedule = build_optimizer(objective, config, scaled_lr(config.base_lr, global_batch), total_steps)
    state = TrainState(config=config, out_dir=out_dir, rank=rank, world=world, device=device, spec=spec, side=side,
                       objective=objective, model=objective, optimizer=optimizer, schedule=schedule, sampler=sampler,
                       loader=None, total_steps=total_steps, stop=stop)
    ckpt = restore_train_state(state, out_dir / "checkpoint.pt") if resuming else None

    if config.teacher_online:
        from morphcache.train.online_teacher import OnlineTeacher

        # the precision the store's targets were made in (schema-1 stores did not record it: the run's)
        state.teacher = OnlineTeacher(spec, device, precision=spec.teacher.precision or config.precision,
                                      weights=teacher_weights)
    options = LoaderOptions.for_run(config, store, sampler, side,
                                    teacher_size=state.teacher.size if state.teacher else None,
                                    start_step=state.step * config.accum_steps,
                                    read_targets=objective.needs_targets and state.teacher is None,
                                    image_root=image_root, target_device=str(device) if device.type == "cuda" else None)
    state.loader = build_loader(config.loader, options)
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        if device.type == "cuda":  # LUT's BatchNorms see the global batch (SyncBatchNorm runs on GPUs only)
            state.objective = objective = torch.nn.SyncBatchNorm.convert_sync_batchnorm(objective)
        state.model = DistributedDataParallel(objective, device_ids=[device.index] if device.type == "cuda" else None)
    if config.precision == "bf16":
        state.autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return state, ckpt


def train_step(state: TrainState, batches) -> dict:
    """One optimiser step over ``accum_steps`` micro-batches from the iterator ``batches``; advances ``state.step``
    and returns the step's metrics record (step, epoch, lr, images_per_s, step_s, data_s, grad_norm, loss, ...)."""
    config, objective = state.config, state.objective
    t0 = time.perf_counter()
    lr = state.schedule.apply()
    state.optimizer.zero_grad(set_to_none=True)
    micro_metrics, data_s = [], 0.0
    for micro in range(config.accum_steps):
        g = state.step * config.accum_steps + micro
        td = time.perf_counter()
        batch = next(batches)
        if state.teacher is not None:
            state.teacher.fill_targets(batch)
        if state.target_transform is not None and batch.targets is not None:
            batch.targets = state.target_transform(batch.targets, batch.rows)
        data_s += time.perf_counter() - td
        inputs = {"images": batch.images.to(state.device, non_blocking=True)}
        if batch.targets is not None:
            inputs["targets"] = batch.targets.to(state.device, non_blocking=True)
        if batch.images2 is not None:
            inputs["images2"] = batch.images2.to(state.device, non_blocking=True)
        inputs["rng"] = np.random.default_rng((config.seed, g, state.rank))  # the objective's masks come from it
        last_micro = micro == config.accum_steps - 1
        sync = state.model.no_sync() if state.world > 1 and not last_micro else contextlib.nullcontext()
        with sync:
            with state.autocast:
                loss, m = state.model(inputs)
            (loss / config.accum_steps).backward()
        micro_metrics.append(m)
    grad_norm = None
    if config.clip_grad:
        grad_norm = float(torch.nn.utils.clip_grad_norm_(objective.trainable_parameters(), config.clip_grad))
    state.optimizer.step()
    objective.after_step(state.step, state.total_steps)
    state.schedule.advance()
    state.step += 1
    n_img = config.batch_size * config.accum_steps * state.world
    dt = time.perf_counter() - t0
    last = _mean_metrics(micro_metrics)
    if state.world > 1:
        import torch.distributed as dist

        t = torch.tensor([last["loss"]], dtype=torch.float64)
        dist.all_reduce(t)
        last["loss"] = float(t) / state.world
    return {"step": state.step, "epoch": state.sampler.position(state.step * config.accum_steps - 1)[0], "lr": lr,
            "images_per_s": n_img / dt, "step_s": dt, "data_s": data_s, "grad_norm": grad_norm, **last}


def _finished_run_summary(state: TrainState) -> dict:
    """A resumed run that has already reached its last step trains nothing and keeps its files (its
    ``summary.json`` was overwritten with a summary of zero steps); returns the run's summary."""
    state.loader.close()
    if state.rank == 0:
        print(f"train: {state.out_dir} already finished at step {state.step} of {state.stop}; nothing to do "
              "(raise --epochs or --max-steps to train further)", file=sys.stderr)
    path = state.out_dir / "summary.json"
    if path.is_file():
        return json.loads(path.read_text())
    return {"steps": 0, "first_step": state.step, "final_step": state.step, "total_steps": state.total_steps,
            "images": 0, "wall_seconds": 0.0, "images_per_s": 0.0, "final_loss": None}


def run_training(config: RunConfig, out_dir: str | os.PathLike, resume: bool = False, img_size: int | None = None,
                 image_root: str | None = None, tensorboard: bool = True, show_progress: bool = True,
                 teacher_weights: str | None = None, device: str | None = None, target_transform=None) -> dict:
    """Train as ``config`` says, writing into ``out_dir``; returns the summary (also ``summary.json``).
    ``device``: a resolved ``--device`` (None: CUDA when available, else CPU); ``config.precision`` ``auto`` is
    resolved for it (bf16 on a GPU that has it, fp32 on CPU) before the config is saved.
    ``target_transform``: optional ``(targets (B, T, D) float32, rows (B,) int64) -> targets`` applied to every
    micro-batch's targets after they are read (or computed by the online teacher); for controlled studies such as
    :class:`morphcache.study.noise.TokenNoise`, never set by the ``train`` command.

    Raises:
        ConfigError, StoreNotFoundError, StoreError, MorphcacheError: as :func:`build_train_state` (all raised
            before the first step).
        MorphcacheError: during training, a source image the loader re-renders that changed since extraction
            (content hash differs; :func:`~morphcache.extract.images.load_stored_image_bytes`)
            or no longer decodes (``BadImageError``).
    """
    from morphcache.progress import progress_bar

    t_setup = time.perf_counter()
    state, ckpt = build_train_state(config, out_dir, resume, img_size, image_root, teacher_weights, device)
    state.target_transform = target_transform
    config, out_dir = state.config, state.out_dir
    if ckpt is not None and state.step >= state.stop:
        return _finished_run_summary(state)
    if state.rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(config.model_dump_json(indent=2) + "\n")
    metrics = None
    start_step, images, last = state.step, 0, {}
    try:  # from here on the loader's worker processes are stopped however the run ends (error, Ctrl-C, SIGTERM)
        metrics = _Metrics(out_dir, state.rank == 0, state.step if ckpt is not None else None, tensorboard)
        it = iter(state.loader)
        if ckpt is not None:
            set_rng_state(ckpt["rng"])  # after everything that draws random numbers while being built
        setup_s = time.perf_counter() - t_setup
        t_run = time.perf_counter()
        with progress_bar(total=state.stop, description="train", unit="steps", initial=state.step) as bar:
            while state.step < state.stop:
                record = train_step(state, it)
                n_img = config.batch_size * config.accum_steps * state.world
                images += n_img
                last = {k: v for k, v in record.items() if k not in ("step", "epoch", "lr", "images_per_s", "step_s",
                                                                      "data_s", "grad_norm")}
                metrics.log(record)
                if show_progress and state.rank == 0:
                    bar.advance(1, loss=f"{record['loss']:.4f}", img_s=f"{record['images_per_s']:.1f}")
                step = state.step
                if config.checkpoint_every and step % config.checkpoint_every == 0 and step < state.stop:
                    save_train_state(state, ["checkpoint.pt", f"checkpoint_step{step}.pt"])
        wall = time.perf_counter() - t_run
        save_train_state(state, ["checkpoint.pt"])
    finally:
        if metrics is not None:
            metrics.close()
        state.loader.close()
    summary = {
        "steps": state.step - start_step, "first_step": start_step, "final_step": state.step,
        "total_steps": state.total_steps, "images": images, "wall_seconds": wall,
        "images_per_s": images / wall if wall > 0 else 0.0, "setup_seconds": setup_s, "final_loss": last.get("loss"),
        "img_size": state.side, "world_size": state.world, "objective": config.objective, "loader": config.loader,
        "teacher_online": config.teacher_online,
    }
    if state.rank == 0:
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
