"""``morphcache store show``: rendered views beside a PCA-to-RGB map of their cached tokens.

For K servable rows (seeded sample), each view is re-rendered with the DALI renderer at the teacher's input size
(un-normalized back to [0, 1] RGB) and drawn next to its token map: the first 3 principal components over all shown
tokens (K * T of them, centred), each channel min-max scaled to [0, 1] over the shown tokens, laid out on the
teacher's patch grid. Similar colours = similar token directions, consistently across the panels.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def pca_rgb(tokens: np.ndarray) -> np.ndarray:
    """float (K, T, D) tokens -> float32 (K, T, 3) in [0, 1]: top-3 PCA over all K*T tokens, min-max per channel."""
    k, t, d = tokens.shape
    x = tokens.reshape(k * t, d).astype(np.float64)
    x = x - x.mean(axis=0, keepdims=True)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    comps = vt[:3]
    proj = x @ comps.T  # (K*T, <=3)
    if proj.shape[1] < 3:
        proj = np.concatenate([proj, np.zeros((proj.shape[0], 3 - proj.shape[1]))], axis=1)
    lo, hi = proj.min(axis=0), proj.max(axis=0)
    rgb = (proj - lo) / np.where(hi > lo, hi - lo, 1.0)
    return rgb.reshape(k, t, 3).astype(np.float32)


def show_store(store_path, rows: int = 8, out: str = "show.png", seed: int = 0) -> Path:
    """Draw ``rows`` views and their token PCA maps into the PNG ``out``; returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from morphcache.extract.replay import load_view_inputs, render_views, sample_rows
    from morphcache.store.feature_store import FeatureStore

    store = FeatureStore.open(store_path, mode="r")
    spec, t = store.spec, store.spec.teacher
    ids = sample_rows(store, rows, seed)
    encoded, params = load_view_inputs(store, ids)
    views = []
    for _, images in render_views(encoded, params, t.image_size, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0),
                                  spec.augment.interpolation, "dali", batch_size=min(16, len(ids))):
        views.append(images.clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy())  # (b, S, S, 3)
    pictures = np.concatenate(views)
    gh, gw = t.grid
    maps = pca_rgb(store.read_tokens_numpy(ids)).reshape(len(ids), gh, gw, 3)

    pairs_per_line = min(4, len(ids))
    lines = -(-len(ids) // pairs_per_line)
    fig, axes = plt.subplots(lines, 2 * pairs_per_line, figsize=(2.0 * 2 * pairs_per_line, 2.1 * lines),
                             squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for k, r in enumerate(ids.tolist()):
        line, col = divmod(k, pairs_per_line)
        a, b = axes[line][2 * col], axes[line][2 * col + 1]
        a.imshow(pictures[k])
        a.set_title(f"row {r} (img {r // spec.views_per_image})", fontsize=7)
        b.imshow(maps[k], interpolation="nearest")
        b.set_title(f"tokens PCA {gh}x{gw}", fontsize=7)
    fig.suptitle(f"{store.path.name}: {t.kind}:{t.name} {t.image_size}px, {spec.dtype}", fontsize=9)
    fig.tight_layout()
    out_path = Path(out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path
