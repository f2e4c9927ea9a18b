"""Training losses, one per file: token-wise regression, DTM (morphed), MAE pixels, LUT unmasked-token loss.

The per-token regression losses (``RunConfig.loss``) are registered in :data:`morphcache.registries.losses` by
:mod:`morphcache.train.losses.regression`.
"""

from morphcache.train.losses.dtm_loss import DTMLoss, dtm_loss, morphed_loss
from morphcache.train.losses.lut_loss import byol_loss, lut_total_loss
from morphcache.train.losses.mae_loss import mae_loss, patchify, pixel_targets
from morphcache.train.losses.regression import regression_loss, token_regression_loss
from morphcache.train.losses.tokenwise_loss import tokenwise_loss

__all__ = [
    "DTMLoss",
    "byol_loss",
    "dtm_loss",
    "lut_total_loss",
    "mae_loss",
    "morphed_loss",
    "patchify",
    "pixel_targets",
    "regression_loss",
    "token_regression_loss",
    "tokenwise_loss",
]
