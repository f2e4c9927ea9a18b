"""Patch-grid geometry shared by every teacher and the student: an input side must be a whole number of patches.

A ViT's patch embedding (a convolution with kernel = stride = patch) silently drops the right and bottom
``size % patch`` pixels, so a 100 px input to a patch-16 model gives a 6x6 grid covering only the top-left 96 px
of each view, while the student is later rendered over the whole crop. Every model input size goes through
:func:`check_patch_multiple` before the model is used.
"""

from __future__ import annotations

from morphcache.errors import ConfigError


def nearest_patch_multiples(size: int, patch: int) -> tuple[int, ...]:
    """The whole-patch sizes closest to ``size`` below and above (one value when ``size`` is under one patch).

    ``nearest_patch_multiples(100, 16) == (96, 112)``; ``nearest_patch_multiples(10, 16) == (16,)``.
    """
    below = (size // patch) * patch
    return (below, below + patch) if below >= patch else (patch,)


def check_patch_multiple(size: int, patch: int, *, option: str, model: str, note: str = "") -> int:
    """Return the grid side ``size // patch``; refuse a ``size`` that is not a positive multiple of ``patch``.

    Args:
        size: input side in pixels (square inputs).
        patch: the model's patch side in pixels.
        option: the command-line option the size came from (``--image-size``, ``--img-size``), named in the error.
        model: the model, named in the error (``timm:vit_tiny_patch16_224``).
        note: appended to the error (e.g. which of the valid sizes a store's grid needs).

    Raises:
        ConfigError: one line naming the size, the patch and the nearest valid sizes.
    """
    size, patch = int(size), int(patch)
    if size >= patch > 0 and size % patch == 0:
        return size // patch
    valid = " or ".join(str(s) for s in nearest_patch_multiples(max(size, 0), patch))
    covered = (max(size, 0) // patch) * patch
    raise ConfigError(f"{option} {size} is not a whole number of {model}'s {patch}-pixel patches (its tokens would "
                      f"cover only {covered} of {size} pixels); use {option} {valid}{note}")
