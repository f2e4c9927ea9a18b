"""Device and precision resolution, defined once for extract, train, eval and ``store replay-check``.

- ``--device auto`` (the default): ``cuda`` when torch sees a CUDA device, else ``cpu``. ``cuda`` / ``cuda:N`` on a
  machine without CUDA is refused with one line (:class:`~morphcache.errors.ConfigError`, exit 2).
- ``--precision auto``: ``bf16`` on a CUDA device that supports it (Ampere and newer), ``fp16`` on older GPUs
  where fp16 is allowed, else ``fp32``; always ``fp32`` on CPU, so CPU results are the same as before ``auto``.
- One GPU per worker: :func:`assign_devices` maps worker processes to visible devices (round robin),
  :func:`visible_devices` reads ``CUDA_VISIBLE_DEVICES``, :func:`local_rank_device` picks the device of a
  torchrun process from ``LOCAL_RANK``. These are pure functions (unit-tested for 1, 2 and 8 devices).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

from morphcache.errors import ConfigError

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def cuda_available() -> bool:
    """Whether torch sees at least one CUDA device."""
    import torch

    return bool(torch.cuda.is_available())


def resolve_device(requested: str | None = "auto", flag: str = "--device") -> str:
    """``auto`` | ``cpu`` | ``cuda`` | ``cuda:N`` -> ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.

    Raises:
        ConfigError: an unknown value, or CUDA asked for on a machine where torch sees none (or fewer than N+1).
    """
    value = (requested or "auto").strip().lower()
    if value == "auto":
        return "cuda" if cuda_available() else "cpu"
    if value == "cpu":
        return "cpu"
    if value == "cuda" or value.startswith("cuda:"):
        index = value.partition(":")[2]
        if index and not index.isdigit():
            raise ConfigError(f"{flag} {requested!r}: write cuda or cuda:N (N a device index)")
        if not cuda_available():
            raise ConfigError(f"{flag} {requested}: torch sees no CUDA device on this machine; use --device cpu "
                              "(or auto) or run on a GPU node")
        import torch

        if index and int(index) >= torch.cuda.device_count():
            raise ConfigError(f"{flag} {requested}: only {torch.cuda.device_count()} CUDA device(s) are visible")
        return value
    raise ConfigError(f"{flag} {requested!r}: use auto, cpu, cuda or cuda:N")


def bf16_supported(device: str) -> bool:
    """Whether ``device`` runs bf16 matrix work natively (CUDA compute capability >= 8.0)."""
    if not str(device).startswith("cuda"):
        return False
    import torch

    return bool(torch.cuda.is_bf16_supported())


def resolve_precision(requested: str | None, device: str, allowed: Sequence[str] = ("fp32", "bf16", "fp16"),
                      flag: str = "--precision") -> str:
    """``auto`` or an explicit precision -> the one to run, for a resolved ``device``.

    ``auto``: ``bf16`` on a GPU that supports it, else ``fp16`` on a GPU when ``allowed`` has it, else ``fp32``
    (always ``fp32`` on CPU). Explicit values are checked against ``allowed``.

    Raises:
        ConfigError: a value not in ``allowed`` (plus ``auto``), or fp16 on CPU.
    """
    value = (requested or "auto").strip().lower()
    if value == "auto":
        if str(device).startswith("cuda"):
            if bf16_supported(device) and "bf16" in allowed:
                return "bf16"
            if "fp16" in allowed:
                return "fp16"
        return "fp32"
    if value not in allowed:
        raise ConfigError(f"{flag} {requested!r}: use auto or one of {', '.join(allowed)}")
    if value == "fp16" and not str(device).startswith("cuda"):
        raise ConfigError(f"{flag} fp16 needs a GPU (device is {device}); use bf16 or fp32 on CPU")
    return value


def describe(device: str, precision: str, requested_device: str | None = "auto",
             requested_precision: str | None = "auto") -> str:
    """One line naming the chosen device (and GPU model) and precision, marking what ``auto`` chose."""
    name = device
    if str(device).startswith("cuda"):
        import torch

        name = f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    d_auto = " (auto)" if (requested_device or "auto") == "auto" else ""
    p_auto = " (auto)" if (requested_precision or "auto") == "auto" else ""
    return f"device {name}{d_auto}, precision {precision}{p_auto}"


def visible_devices(env: Mapping[str, str] | None = None, count: int | None = None) -> list[str]:
    """The CUDA devices this process may hand out, as ``CUDA_VISIBLE_DEVICES`` entries (indices or UUIDs).

    ``CUDA_VISIBLE_DEVICES`` when set (an empty value means none), else ``0 .. count-1`` with ``count`` defaulting
    to ``torch.cuda.device_count()``.
    """
    env = os.environ if env is None else env
    text = env.get("CUDA_VISIBLE_DEVICES")
    if text is not None:
        return [d.strip() for d in text.split(",") if d.strip() and d.strip() != "-1"]
    if count is None:
        import torch

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return [str(i) for i in range(int(count))]


def assign_devices(n_workers: int | None, devices: Sequence[str]) -> list[str]:
    """The ``CUDA_VISIBLE_DEVICES`` value of each of ``n_workers`` worker processes (one device each).

    ``n_workers`` None: one worker per device. More workers than devices share devices round robin (worker
    ``i`` gets ``devices[i % len(devices)]``).

    Raises:
        ConfigError: no devices, or ``n_workers`` < 1.
    """
    if not devices:
        raise ConfigError("no CUDA device is visible to pin workers to (CUDA_VISIBLE_DEVICES is empty?)")
    n = len(devices) if n_workers is None else int(n_workers)
    if n < 1:
        raise ConfigError(f"--dask-workers {n_workers}: must be at least 1")
    return [str(devices[i % len(devices)]) for i in range(n)]


def local_rank_device(env: Mapping[str, str] | None = None, count: int | None = None) -> str:
    """The device of a process started by torchrun: ``cuda:LOCAL_RANK`` (modulo the visible device count), or
    ``cuda`` outside torchrun. ``count`` defaults to ``torch.cuda.device_count()``.

    Raises:
        ConfigError: ``LOCAL_RANK`` is not a non-negative integer, or no device is visible.
    """
    env = os.environ if env is None else env
    text = env.get("LOCAL_RANK")
    if text is None:
        return "cuda"
    if not text.strip().isdigit():
        raise ConfigError(f"LOCAL_RANK={text!r}: expected a non-negative integer (set by torchrun)")
    if count is None:
        import torch

        count = torch.cuda.device_count()
    if count < 1:
        raise ConfigError("LOCAL_RANK is set but no CUDA device is visible")
    return f"cuda:{int(text) % int(count)}"
