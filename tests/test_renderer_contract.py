"""Every view renderer (extraction's ``--renderer`` choices) passes the renderer contract
(morphcache.testing.contracts.RendererContract)."""

from __future__ import annotations

import pytest

from morphcache.extract.renderers import RENDERERS, build_renderer, dali_available, renderer_placement
from morphcache.testing.contracts import RendererContract


class TestRenderer(RendererContract):
    """The contract for every name in ``RENDERERS`` (on the CPU: ``dali`` places on the teacher's device)."""

    @pytest.fixture(scope="class", params=RENDERERS)
    @classmethod
    def make(cls, request):
        name = request.param
        if renderer_placement(name)[0] == "dali" and not dali_available():
            pytest.skip(f"renderer {name!r} needs NVIDIA DALI, which is not importable here")
        return lambda size, mean, std, interpolation, batch_size: build_renderer(
            name, size, mean, std, interpolation, batch_size, 1)
