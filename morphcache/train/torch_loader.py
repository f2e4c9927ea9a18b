"""The torch DataLoader fallback of the training loader, for machines without DALI.

It serves the SAME micro-batches as :class:`~morphcache.train.loader.DaliTrainLoader`: the same
:class:`~morphcache.train.sampler.EpochSampler` rows, the same :class:`~morphcache.train.loader.ViewSource` (bytes
from ``load_canonical_bytes`` + stored ViewParams) and the same :class:`~morphcache.train.targets.TargetPrefetcher`,
so rows and targets are identical. Pixels come from the PIL renderer
(:func:`~morphcache.extract.render_pil.render_pil`), which copies DALI's maths but is not bit-exact: the difference
is measured (:mod:`morphcache.extract.render_fidelity`, and ``tests/test_train_loader.py``), not assumed. Use the
DALI loader when the student must see exactly the pixels the teacher saw.

Rendering runs in ``workers`` DataLoader processes (0 = in the main process).
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from morphcache import registries
from morphcache.errors import reraise_from_worker
from morphcache.train.loader import Batch, RenderSpec, ViewSource
from morphcache.train.sampler import EpochSampler
from morphcache.train.targets import TargetPrefetcher


class _ViewDataset(torch.utils.data.Dataset):
    """Map-style dataset over global sample ids: ``ds[g] -> dict`` of rendered views (3, S, S) and row ids."""

    def __init__(self, source: ViewSource, render: RenderSpec) -> None:
        self.source, self.render = source, render

    def __len__(self) -> int:  # endless stream; DataLoader only needs the batch sampler
        return 2**62

    def _draw(self, encoded: bytes, params: np.ndarray, size: int) -> torch.Tensor:
        from morphcache.extract.render_pil import render_pil

        r = self.render
        return render_pil([encoded], params[None].astype(np.float32), size, r.mean, r.std, r.view_interpolation)[0]

    def __getitem__(self, global_sample: int) -> dict:
        out = self.source.sample(int(global_sample))
        encoded = out[0].tobytes()
        item = {"images": self._draw(encoded, out[1], self.render.img_size), "rows": torch.from_numpy(out[2])}
        if self.render.teacher_size is not None:
            item["teacher_images"] = self._draw(encoded, out[1], self.render.teacher_size)
        if self.render.second_view:
            item["images2"] = self._draw(encoded, out[3], self.render.img_size)
            item["rows2"] = torch.from_numpy(out[4])
        return item


class _StepBatches:
    """Batch sampler: micro-batch ``g`` is the global samples ``[g*B, (g+1)*B)``, from ``start`` on, endless."""

    def __init__(self, start: int, batch_size: int) -> None:
        self.start, self.batch_size = int(start), int(batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        g = self.start
        while True:
            yield list(range(g * self.batch_size, (g + 1) * self.batch_size))
            g += 1


class TorchTrainLoader:
    """Endless iterator of :class:`Batch` from micro-batch ``start_step`` on (same arguments as the DALI loader)."""

    def __init__(self, store, sampler: EpochSampler, render: RenderSpec, start_step: int = 0, workers: int = 2,
                 threads: int = 1, read_targets: bool = True, image_root: str | None = None,
                 prefetch: int = 2, start_method: str = "spawn", target_device: str | None = None) -> None:
        del threads  # DALI-only knob; accepted so both loaders share one signature
        self.sampler, self.render, self.start_step = sampler, render, int(start_step)
        source = ViewSource(str(store.path), sampler, image_root, start_step=0,
                            lut_size=render.img_size if render.lut_views else None)
        kwargs = {}
        if workers > 0:
            kwargs = {"prefetch_factor": max(1, prefetch), "multiprocessing_context": start_method,
                      "persistent_workers": False}
        self._loader = torch.utils.data.DataLoader(
            _ViewDataset(source, render), batch_sampler=_StepBatches(start_step, sampler.batch_size),
            num_workers=workers, **kwargs,
        )
        self.targets = TargetPrefetcher(store, sampler, prefetch, device=target_device) if read_targets else None

    def __iter__(self) -> Iterator[Batch]:
        step = self.start_step
        items = iter(self._loader)
        while True:
            try:
                item = next(items)
            except StopIteration:
                return
            except Exception as exc:  # a worker's MorphcacheError comes back wrapped with its traceback
                reraise_from_worker(exc)
            rows = item["rows"].reshape(-1).long()
            batch = Batch(images=item["images"], targets=None, rows=rows,
                          images2=item.get("images2"), teacher_images=item.get("teacher_images"))
            if "rows2" in item:
                batch.rows2 = item["rows2"].reshape(-1).long()
            if self.targets is not None:
                batch.targets = self.targets.get(step, rows.numpy())
            yield batch
            step += 1

    def close(self) -> None:
        if self.targets is not None:
            self.targets.close()
        self._loader = None


@registries.loaders.register("torch")
def _torch_loader(store, sampler: EpochSampler, render: RenderSpec, **kwargs) -> "TorchTrainLoader":
    """The PIL-rendered torch DataLoader (no DALI needed; pixels within the measured tolerance of DALI's)."""
    return TorchTrainLoader(store, sampler, render, **kwargs)


@registries.loaders.register("dali")
def _dali_loader(store, sampler: EpochSampler, render: RenderSpec, **kwargs):
    """The DALI pipeline loader (the renderer extraction used)."""
    from morphcache.train.loader import DaliTrainLoader

    return DaliTrainLoader(store, sampler, render, **kwargs)


def make_loader(kind: str, store, sampler: EpochSampler, render: RenderSpec, **kwargs):
    """The registered training loader ``kind`` (``dali``, ``torch``, or one a plug-in registered with
    ``@morphcache.registries.loaders.register``). Every loader takes ``(store, sampler, render, start_step=,
    workers=, read_targets=, image_root=, target_device=)`` and is iterable over
    :class:`~morphcache.train.loader.Batch` with ``close()``.

    Raises:
        ConfigError: no loader is registered under ``kind``.
    """
    return registries.lookup(registries.loaders, kind)(store, sampler, render, **kwargs)
