"""Training checkpoints that resume a run exactly, readable with ``torch.load(weights_only=True)``.

Format (a superset of the one documented in :mod:`morphcache.train.student`)::

    {
        "model": student (or MAE/LUT model) state_dict,
        "config": RunConfig.model_dump(mode="json"),
        "target_dim": int, "img_size": int, "mean": [3 floats], "std": [3 floats],
        "objective": objective state_dict (extra modules: MAE decoder, LUT projector / EMA teacher...) or {},
        "optimizer": AdamW state_dict,
        "schedule": WarmupCosine.state_dict() (plain types),
        "step": optimizer steps done, "micro_step": loader position (global micro-batch index),
        "epoch": epoch of the next micro-batch, "sampler": EpochSampler.state_dict(),
        "rng": {"torch": uint8 tensor, "numpy": {...tensors and ints}, "python": {...}},
        "store_spec": StoreSpec JSON dict,
    }

RNG states are converted to tensors and plain types because ``weights_only`` unpickling refuses numpy objects.
The file is written to ``path.tmp`` and renamed, so a crash never leaves a half-written checkpoint.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch

from morphcache.errors import MorphcacheError


def rng_state() -> dict:
    """torch, numpy-global and python-random states as tensors / plain types."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "python": {"version": int(version), "internal": torch.tensor(internal, dtype=torch.int64),
                   "gauss": None if gauss is None else float(gauss)},
    }


def set_rng_state(state: dict) -> None:
    """Inverse of :func:`rng_state`."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["internal"].tolist()), p["gauss"]))


def _generators(module: torch.nn.Module) -> dict[str, torch.Generator]:
    """Every ``torch.Generator`` held by ``module``, its submodules, or plain helper objects they hold (e.g. a
    ``DTMLoss``), keyed by attribute path."""
    found: dict[str, torch.Generator] = {}
    for prefix, mod in module.named_modules():
        for key, value in vars(mod).items():
            name = f"{prefix}.{key}" if prefix else key
            if isinstance(value, torch.Generator):
                found[name] = value
            elif not isinstance(value, (torch.nn.Module, torch.Tensor)) and hasattr(value, "__dict__"):
                for sub, inner in vars(value).items():
                    if isinstance(inner, torch.Generator):
                        found[f"{name}.{sub}"] = inner
    return found


#: The objectives' own mask generator, removed when masks moved to the loop's per-step rng; checkpoints written
#: before that still list it. It no longer drives anything, so restoring such a checkpoint skips it.
_RETIRED_GENERATORS = ("generator",)


def generator_states(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """States of every generator of :func:`_generators` (today: DTM's morphing-case RNG; masks come from the
    loop's per-step numpy generator and need no state)."""
    return {name: gen.get_state() for name, gen in _generators(module).items()}


def set_generator_states(module: torch.nn.Module, states: dict[str, torch.Tensor]) -> None:
    """Inverse of :func:`generator_states`.

    Raises:
        MorphcacheError: the checkpoint's generators are not the module's (another objective); a retired
            objective mask generator (:data:`_RETIRED_GENERATORS`) in an older checkpoint is skipped.
    """
    current = _generators(module)
    states = {k: v for k, v in states.items() if k in current or k not in _RETIRED_GENERATORS}
    if set(current) != set(states):
        raise MorphcacheError(f"checkpoint generators {sorted(states)} do not match the objective's {sorted(current)}")
    for name, state in states.items():
        current[name].set_state(state)


def reseed_generators(module: torch.nn.Module, seed: int, rank: int) -> None:
    """Give rank ``rank`` its own streams (DDP ranks must not draw identical MAE masks)."""
    for i, (_, gen) in enumerate(sorted(_generators(module).items())):
        gen.manual_seed(int(seed) * 1_000_003 + rank * 7919 + i)


def save_checkpoint(path: str | os.PathLike, payload: dict) -> Path:
    """Write ``payload`` (plus the current RNG states) atomically to ``path``; returns the path.

    Raises:
        OSError: the folder cannot be created or written (no morphcache error: nothing the user passed is wrong
            in a way this function can name).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = dict(payload)
    data["rng"] = rng_state()
    tmp = path.with_name(path.name + ".tmp")
    torch.save(data, tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Read a checkpoint with ``weights_only=True`` (CPU tensors); one-line error if it is not one of ours.

    Raises:
        MorphcacheError: no file at ``path``, an unreadable file (not a torch zip, or unpickling refused), or a
            dict without the resumable keys (model, config, optimizer, schedule, step, micro_step, rng).
    """
    path = Path(path)
    if not path.is_file():
        raise MorphcacheError(f"{path}: no checkpoint to resume from; run without --resume to start the run")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # zip / unpickling errors
        raise MorphcacheError(f"{path}: unreadable checkpoint ({type(exc).__name__}); delete it or restore a backup") from None
    required = ("model", "config", "optimizer", "schedule", "step", "micro_step", "rng")
    missing = [k for k in required if not isinstance(data, dict) or k not in data]
    if missing:
        raise MorphcacheError(f"{path}: not a resumable morphcache checkpoint (missing {', '.join(missing)})")
    return data


def _split_model_state(objective) -> tuple[dict, dict, str]:
    """(model state, the objective's other state, prefix of the model inside the objective)."""
    model = objective.model
    prefix = next(name for name, mod in objective.named_modules() if mod is model)
    full = objective.state_dict()
    extras = {k: v for k, v in full.items() if not k.startswith(prefix + ".")}
    return model.state_dict(), extras, prefix


def save_train_state(state, names: list[str]) -> None:
    """Rank 0 writes ``state`` (a :class:`~morphcache.train.loop.TrainState`) as ``out_dir/names[0]`` and copies
    the same bytes to the other ``names`` (serialised once, each copy renamed into place).

    Raises:
        OSError: the run directory cannot be written (see :func:`save_checkpoint`).
    """
    import shutil

    if state.rank != 0:
        return
    config, spec = state.config, state.spec
    model_state, extras, _ = _split_model_state(state.objective)
    micro = state.step * config.accum_steps
    payload = {
        "model": model_state, "config": config.model_dump(mode="json"), "target_dim": state.target_dim,
        "img_size": state.side, "mean": list(spec.teacher.mean), "std": list(spec.teacher.std),
        "objective": extras, "optimizer": state.optimizer.state_dict(), "schedule": state.schedule.state_dict(),
        "generators": generator_states(state.objective), "step": state.step, "micro_step": micro,
        "epoch": state.sampler.position(micro)[0], "sampler": state.sampler.state_dict(),
        "store_spec": spec.identity(),
    }
    first = save_checkpoint(state.out_dir / names[0], payload)
    for name in names[1:]:
        tmp = state.out_dir / (name + ".tmp")
        shutil.copyfile(first, tmp)
        os.replace(tmp, state.out_dir / name)


def restore_train_state(state, path: str | os.PathLike) -> dict:
    """Load the checkpoint at ``path`` into ``state`` (model, objective extras, optimiser, schedule, generators,
    step) after checking it belongs to this run; returns it (the caller restores its ``rng`` right before the first
    step, after everything that draws random numbers while being built).

    Raises:
        MorphcacheError: not a resumable checkpoint (:func:`load_checkpoint`), or generators of another
            objective (:func:`set_generator_states`).
        ConfigError: another row order (world size, store), another store, another target width, or an
            objective state that does not fit ``config.objective``.
    """
    from morphcache.errors import ConfigError
    from morphcache.train import guards

    out_dir = Path(path).parent
    ckpt = load_checkpoint(path)
    config, objective = state.config, state.objective
    if ckpt.get("sampler") != state.sampler.state_dict():
        raise ConfigError(f"{out_dir}: the checkpoint's row order {ckpt.get('sampler')} differs from this run's "
                          f"{state.sampler.state_dict()} (world size or store changed); resume with the same setup")
    if ckpt.get("store_spec") != state.spec.identity():
        raise ConfigError(f"{out_dir}: the checkpoint was trained on another store; pass --store {config.store} "
                          "as it was made")
    guards.check_target_width(state.spec, ckpt["target_dim"], f"checkpoint {path}")
    objective.model.load_state_dict(ckpt["model"])
    missing, unexpected = objective.load_state_dict(ckpt["objective"], strict=False)
    prefix = _split_model_state(objective)[2]
    if unexpected or any(not k.startswith(prefix + ".") for k in missing):
        raise ConfigError(f"{out_dir}: checkpoint objective state does not fit '{config.objective}'")
    state.optimizer.load_state_dict(ckpt["optimizer"])
    state.schedule.load_state_dict(ckpt["schedule"])
    set_generator_states(objective, ckpt["generators"])
    state.step = int(ckpt["step"])
    return ckpt
