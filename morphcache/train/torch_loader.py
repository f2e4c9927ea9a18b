"""The torch DataLoader fallback of the training loader, for machines without DALI.

It serves the SAME micro-batches as :class:`~morphcache.train.loader.DaliTrainLoader`: the same
:class:`~morphcache.train.sampler.EpochSampler` rows, the same :class:`~morphcache.train.loader.ViewSource` (bytes
from ``load_canonical_bytes`` + stored ViewParams) and the same :class:`~morphcache.train.targets.TargetPrefetcher`,
so rows and targets are identical. Pixels come from the PIL renderer
(:func:`~morphcache.extract.render_pil.render_pil`), which copies DALI's maths but is not bit-exact: the difference
is measured (:mod:`morphcache.extract.render_fidelity`, and ``tests/test_train_loader.py``), not assumed. Use the
DALI loader when the student must see exactly the pixels the teacher saw.

Rendering runs in ``workers`` DataLoader processes (0 = in the main process). Both loaders take one
:class:`~morphcache.train.loader.LoaderOptions` and implement :class:`~morphcache.train.loader.TrainLoader`.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from morphcache import registries
from morphcache.errors import ConfigError, reraise_from_worker
from morphcache.train.loader import Batch, LoaderOptions, RenderSpec, TrainLoader, ViewSource
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
    """Endless iterator of :class:`Batch` from micro-batch ``options.start_step`` on (a
    :class:`~morphcache.train.loader.TrainLoader`, the same :class:`~morphcache.train.loader.LoaderOptions` as the
    DALI loader; ``threads`` is DALI-only and ignored here).

    Raises:
        ConfigError: ``options`` is not a :class:`~morphcache.train.loader.LoaderOptions`.
    """

    def __init__(self, options: LoaderOptions) -> None:
        if not isinstance(options, LoaderOptions):
            raise ConfigError(f"TorchTrainLoader takes one LoaderOptions, got {type(options).__name__}")
        self.options = options
        store, sampler, render, workers = options.store, options.sampler, options.render, options.workers
        self.sampler, self.render, self.start_step = sampler, render, int(options.start_step)
        source = ViewSource(str(store.path), sampler, options.image_root, start_step=0, lut_size=options.lut_size)
        kwargs = {}
        if workers > 0:
            kwargs = {"prefetch_factor": max(1, options.prefetch), "multiprocessing_context": options.start_method,
                      "persistent_workers": False}
        self._loader = torch.utils.data.DataLoader(
            _ViewDataset(source, render), batch_sampler=_StepBatches(self.start_step, sampler.batch_size),
            num_workers=workers, **kwargs,
        )
        self.targets = (TargetPrefetcher(store, sampler, options.prefetch, device=options.target_device)
                        if options.read_targets else None)

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
def _torch_loader(options: LoaderOptions) -> TorchTrainLoader:
    """The PIL-rendered torch DataLoader (no DALI needed; pixels within the measured tolerance of DALI's)."""
    return TorchTrainLoader(options)


@registries.loaders.register("dali")
def _dali_loader(options: LoaderOptions) -> TrainLoader:
    """The DALI pipeline loader (the renderer extraction used)."""
    from morphcache.train.loader import DaliTrainLoader

    return DaliTrainLoader(options)


def build_loader(kind: str, options: LoaderOptions) -> TrainLoader:
    """The registered training loader ``kind`` (``dali``, ``torch``, or one a plug-in registered with
    ``@morphcache.registries.loaders.register``) built from ``options``. A registered loader is a function
    ``(options: LoaderOptions) -> TrainLoader`` (see :class:`~morphcache.train.loader.TrainLoader`); a new one
    should pass :class:`morphcache.testing.contracts.TrainLoaderContract`, which ``tests/test_loader_contract.py``
    runs against every registered name.

    Raises:
        ConfigError: no loader is registered under ``kind``, or ``options`` is not a ``LoaderOptions``.
    """
    if not isinstance(options, LoaderOptions):
        raise ConfigError(f"build_loader takes one LoaderOptions, got {type(options).__name__}")
    return registries.lookup(registries.loaders, kind)(options)
