"""The frozen-teacher interface shared by every teacher kind, plus small helpers (weight hashing, precision).

A :class:`Teacher` wraps a frozen ``torch.nn.Module`` (eval mode, ``requires_grad=False``) and its
:class:`~morphcache.schemas.TeacherSpec`. :meth:`Teacher.forward_tokens` maps normalized images
``float32 (B, 3, S, S)`` (``S == spec.image_size``, normalized with ``spec.mean``/``spec.std``) to

- ``tokens``: ``float32 (B, T, D)``, the grid (patch) tokens only, no CLS/register tokens, ``T = spec.n_tokens``,
  ``D = spec.dim``, in row-major grid order;
- ``pooled``: ``float32 (B, Dp)``, the model's pooled / CLS embedding, ``Dp = spec.pooled_dim``.

The forward runs under ``torch.no_grad()``, deliberately not ``torch.inference_mode()``: on this CPU, bf16
autocast inside inference mode measured about 10x slower.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from typing import Literal

import torch

from morphcache.errors import ConfigError, MorphcacheError
from morphcache.schemas import TeacherSpec

Precision = Literal["fp32", "bf16", "fp16"]
PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "fp16")

_HASH_CACHE: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes; memoized per process on (real path, size, mtime)."""
    real = os.path.realpath(path)
    st = os.stat(real)
    key = (real, st.st_size, st.st_mtime_ns)
    digest = _HASH_CACHE.get(key)
    if digest is None:
        with open(real, "rb") as f:
            digest = _HASH_CACHE[key] = hashlib.file_digest(f, "sha256").hexdigest()
    return digest


def check_precision(precision: str, device: torch.device) -> None:
    """Refuse unknown precisions and fp16 on CPU (CPU autocast is bf16 only here)."""
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown teacher precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    if precision == "fp16" and device.type == "cpu":
        raise ConfigError("teacher precision 'fp16' needs a GPU; use 'bf16' or 'fp32' on CPU")


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    """Put ``model`` in eval mode with every parameter frozen; returns it."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


class Teacher:
    """A frozen teacher: ``spec``, ``model``, ``device``, ``precision`` and :meth:`forward_tokens`.

    Subclasses implement :meth:`_features`, which returns the raw ``(tokens (B, T, D), pooled (B, Dp))`` of the
    model; this class handles devices, autocast, ``no_grad``, shape checks and the float32 cast.
    """

    def __init__(self, spec: TeacherSpec, model: torch.nn.Module, device: str | torch.device = "cpu",
                 precision: Precision = "fp32") -> None:
        self.device = torch.device(device)
        check_precision(precision, self.device)
        self.precision: Precision = precision
        self.spec = spec.model_copy(update={"precision": precision})  # recorded in the stores it writes
        self.model = freeze(model)
        self.model.to(self.device)

    def __repr__(self) -> str:
        s = self.spec
        return (f"{type(self).__name__}(kind={s.kind!r}, name={s.name!r}, image_size={s.image_size}, "
                f"tokens={s.n_tokens}x{s.dim}, pooled={s.pooled_dim}, device={self.device}, "
                f"precision={self.precision!r})")

    def to(self, device: str | torch.device) -> "Teacher":
        """Move the model to ``device`` (checks the precision is possible there); returns ``self``."""
        device = torch.device(device)
        check_precision(self.precision, device)
        self.model.to(device)
        self.device = device
        return self

    def _autocast(self):
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def _features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw model outputs ``(tokens (B, T, D), pooled (B, Dp))`` for ``x (B, 3, S, S)`` on ``self.device``."""
        raise NotImplementedError

    def forward_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher features of normalized images.

        Args:
            x: ``float32 (B, 3, S, S)``, ``S == spec.image_size``, normalized with ``spec.mean``/``spec.std``.

        Returns:
            ``(tokens float32 (B, T, D), pooled float32 (B, Dp))`` on ``self.device``.
        """
        s = self.spec.image_size
        if x.ndim != 4 or x.shape[1] != 3 or x.shape[2] != s or x.shape[3] != s:
            raise ConfigError(f"teacher {self.spec.name} expects images of shape (B, 3, {s}, {s}), "
                              f"got {tuple(x.shape)}; render views at the teacher's image size")
        x = x.to(self.device, dtype=torch.float32, non_blocking=True)
        with torch.no_grad(), self._autocast():
            tokens, pooled = self._features(x)
        want = (x.shape[0], self.spec.n_tokens, self.spec.dim)
        if tuple(tokens.shape) != want or tuple(pooled.shape) != (x.shape[0], self.spec.pooled_dim):
            raise MorphcacheError(f"teacher {self.spec.name} returned tokens {tuple(tokens.shape)} and pooled "
                                  f"{tuple(pooled.shape)}, expected {want} and (B, {self.spec.pooled_dim}); "
                                  "this architecture is not supported as a token teacher")
        return tokens.float(), pooled.float()
