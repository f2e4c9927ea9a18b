"""Which renderer draws the views: DALI on the teacher's device, DALI on the CPU, or the PIL fallback.

One place decides it for extraction, replay and the benchmarks, so a store and its replay agree on names.
"""

from __future__ import annotations

from morphcache.errors import ConfigError


#: ``--renderer`` values: ``dali`` renders on the teacher's device (nvJPEG decode, GPU resize and colour ops when the
#: teacher runs on CUDA; CPU otherwise), ``dali-cpu`` always on the CPU, ``pil`` the PIL fallback (no DALI needed).
RENDERERS = ("dali", "dali-cpu", "pil")


def dali_available() -> bool:
    """Whether NVIDIA DALI can be imported here (without importing it)."""
    import importlib.util

    try:
        return importlib.util.find_spec("nvidia.dali") is not None
    except (ImportError, ValueError):
        return False


def renderer_placement(renderer: str, device: str = "cpu") -> tuple[str, str]:
    """(``"dali"`` | ``"pil"``, ``"cpu"`` | ``"gpu"``): which renderer runs where for ``--renderer`` on a teacher
    ``device``. Raises ConfigError for an unknown name."""
    if renderer not in RENDERERS:
        raise ConfigError(f"--renderer {renderer!r}: use one of {', '.join(RENDERERS)}")
    if renderer == "pil":
        return "pil", "cpu"
    return "dali", ("gpu" if renderer == "dali" and str(device).startswith("cuda") else "cpu")


def build_renderer(renderer: str, size: int, mean, std, interpolation: str, batch_size: int, workers: int,
                   device: str = "cpu"):
    """A renderer with ``render(encoded, params) -> [float32 (B, 3, size, size)]`` (on the GPU for DALI GPU),
    ``workers`` CPU threads; see :data:`RENDERERS`."""
    kind, where = renderer_placement(renderer, device)
    if kind == "pil":
        from morphcache.extract.render_pil import PilRenderer

        return PilRenderer(size, mean=mean, std=std, interpolation=interpolation, num_threads=workers)
    if not dali_available():
        raise ConfigError(f"--renderer {renderer}: NVIDIA DALI is not installed here; install nvidia-dali-cuda130 "
                          "or use --renderer pil")
    from morphcache.extract.render_dali import DaliRenderer

    index = None
    if where == "gpu":
        import torch

        index = torch.device(device).index
        index = torch.cuda.current_device() if index is None else index
    return DaliRenderer(sizes=(size,), mean=mean, std=std, interpolation=interpolation, batch_size=batch_size,
                        num_threads=max(1, workers), device=where, device_id=index)


def build_teacher_renderer(teacher_spec, augment, batch_size: int, workers: int, renderer: str = "dali", device: str = "cpu"):
    """The extraction renderer at the teacher's input size (one output), ``workers`` CPU threads."""
    return build_renderer(renderer, teacher_spec.image_size, teacher_spec.mean, teacher_spec.std,
                          augment.interpolation, batch_size, workers, device)
