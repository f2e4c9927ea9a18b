"""``--teacher-online``: run the store's teacher live on every batch instead of reading cached targets.

This is the baseline the cache is measured against (``benchmarks/bench_train.py``), and a check of the cache: the
loader renders each view twice from the same crop, at the student's size and at the teacher's size
(``RenderSpec.teacher_size``), and :meth:`OnlineTeacher.fill_targets` replaces ``Batch.targets`` by the teacher's
tokens of the teacher-size rendering. On the same views these equal the stored targets up to the store's
quantization (int8 absmax: half a step per value) and the batch-size dependence of CPU matmul rounding.

The teacher is rebuilt from the store's :class:`~morphcache.schemas.TeacherSpec` (same architecture, the same local
weights file, checked by sha256; random-weight teachers use extraction's fixed init seed), and must match it.
"""

from __future__ import annotations

import torch

from morphcache.train.guards import check_online_teacher
from morphcache.train.loader import Batch


class OnlineTeacher:
    """The store's teacher, live. ``size`` is its input side; :meth:`fill_targets` computes ``Batch.targets``."""

    def __init__(self, store_spec, device: str | torch.device = "cpu", precision: str = "fp32",
                 weights: str | None = None) -> None:
        from morphcache.extract.engine import load_store_teacher

        self.teacher = load_store_teacher(store_spec.teacher, device=str(device), precision=precision, weights=weights)
        check_online_teacher(store_spec, self.teacher.spec)
        self.size = int(store_spec.teacher.image_size)
        self.mean = tuple(store_spec.teacher.mean)
        self.std = tuple(store_spec.teacher.std)

    def targets(self, teacher_images: torch.Tensor) -> torch.Tensor:
        """(B, 3, St, St) normalized teacher-size views -> tokens (B, T, D) float32 (no gradient)."""
        tokens, _ = self.teacher.forward_tokens(teacher_images)
        return tokens

    def fill_targets(self, batch: Batch) -> Batch:
        """Set ``batch.targets`` from ``batch.teacher_images`` (which is then dropped); returns ``batch``."""
        if batch.teacher_images is None:
            raise ValueError("batch has no teacher_images; build the loader with RenderSpec(teacher_size=...)")
        batch.targets = self.targets(batch.teacher_images)
        batch.teacher_images = None
        return batch
