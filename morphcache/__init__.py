"""morphcache: pay for the teacher once, pretrain many times.

Stages (each a subpackage): ``schemas`` (typed, versioned metadata), ``store`` (the zarr v3 feature store),
``extract`` (teacher tokens over replayable augmented views), ``train`` (DALI-fed DTM / MAE / LUT
pretraining from cached targets) and ``evaluate`` (k-NN, linear probe, fine-tuning, transfer, reports).
Heavy dependencies (torch, DALI, open_clip, timm, dask) are imported lazily by the modules that need them.
"""

__version__ = "0.1.0"

from morphcache.errors import MorphcacheError  # noqa: E402

__all__ = ["MorphcacheError", "__version__"]
