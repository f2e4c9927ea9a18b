"""Contract test suites every implementation of an extension point must pass (in the style of zarr-python's
``StoreTests``). Subclass one in a test module under a ``Test*`` name, implement its factory, and pytest runs the
whole contract against your implementation::

    class TestMyTeacher(TeacherContract):
        def make_teacher(self, tmp_path):
            return load_teacher("my_kind", "my_arch", image_size=32)
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from morphcache.errors import ConfigError


class TeacherContract:
    """What extraction, replay and the online teacher rely on from any :class:`~morphcache.extract.teachers.Teacher`.

    Subclasses implement :meth:`make_teacher`; ``batch`` images of the teacher's input size are drawn per test.
    """

    batch = 3
    #: largest elementwise difference allowed between a sample's tokens alone and inside a batch (float32 run).
    batch_tolerance = 1e-4

    def make_teacher(self, tmp_path):
        raise NotImplementedError

    @pytest.fixture()
    def teacher(self, tmp_path):
        return self.make_teacher(tmp_path)

    def _images(self, teacher, n: int | None = None, seed: int = 0) -> torch.Tensor:
        s = teacher.spec.image_size
        return torch.randn(n or self.batch, 3, s, s, generator=torch.Generator().manual_seed(seed))

    def test_tokens_and_pooled_have_the_spec_shapes(self, teacher):
        spec = teacher.spec
        tokens, pooled = teacher.forward_tokens(self._images(teacher))
        side = spec.image_size // spec.patch_size
        assert spec.image_size % spec.patch_size == 0 and spec.n_tokens == side * side
        assert tuple(tokens.shape) == (self.batch, spec.n_tokens, spec.dim) and tokens.dtype == torch.float32
        assert tuple(pooled.shape) == (self.batch, spec.pooled_dim) and pooled.dtype == torch.float32
        assert torch.isfinite(tokens).all() and torch.isfinite(pooled).all()

    def test_is_frozen_and_in_eval_mode(self, teacher):
        assert not teacher.model.training
        assert not any(p.requires_grad for p in teacher.model.parameters())

    def test_a_sample_does_not_depend_on_its_batch(self, teacher):
        x = self._images(teacher)
        batched, _ = teacher.forward_tokens(x)
        alone, _ = teacher.forward_tokens(x[1:2])
        torch.testing.assert_close(alone[0], batched[1], atol=self.batch_tolerance, rtol=self.batch_tolerance)

    def test_spec_rebuilds_the_same_teacher(self, teacher):
        from morphcache import registries
        from morphcache.extract.teachers import load_teacher_from_spec
        from morphcache.schemas import TeacherSpec

        spec = TeacherSpec.model_validate_json(teacher.spec.model_dump_json())  # as stored and read back
        assert spec.kind in registries.names(registries.teachers)
        again = load_teacher_from_spec(spec, precision=teacher.precision)
        x = self._images(teacher, seed=1)
        np.testing.assert_array_equal(again.forward_tokens(x)[0].numpy(), teacher.forward_tokens(x)[0].numpy())

    def test_wrong_input_size_is_a_one_line_error(self, teacher):
        s = teacher.spec.image_size
        with pytest.raises(ConfigError, match="expects images of shape"):
            teacher.forward_tokens(torch.zeros(1, 3, s + teacher.spec.patch_size, s + teacher.spec.patch_size))
