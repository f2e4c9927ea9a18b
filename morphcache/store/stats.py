"""``store stats``: token statistics of a store, computed out of core with dask (one task per work chunk).

Only servable rows count (complete chunks, images with status ok). Definitions, for tokens ``x`` (T, D) of one
view laid on the ``h x w`` patch grid, ``cos(i, j)`` the cosine similarity of tokens ``i`` and ``j``:

- ``channel_mean[d]``, ``channel_std[d]``: mean and population standard deviation of channel ``d`` over all tokens.
- ``norm_hist``: histogram of token L2 norms, ``bins`` equal bins over ``[0, max norm]``.
- ``neighbour_cosine``: mean ``cos(i, j)`` over all 4-neighbour pairs (horizontal and vertical grid neighbours,
  each unordered pair once).
- ``cosine_by_distance[d]``: mean ``cos(i, j)`` over pairs ``i != j`` of one view whose Euclidean grid distance
  rounds to ``d`` (d = 1, 2, ...); ``random_pair_cosine`` is the mean over all pairs ``i != j``.
- Spatial consistency (``knn_adjacent_fraction``): for every token ``i``, take its ``k`` most similar other tokens
  of the same view (by cosine); the statistic is the fraction of them that are spatially adjacent to ``i`` (8-
  neighbourhood, Chebyshev distance 1), averaged over tokens and views. ``knn_adjacent_chance`` is the same
  fraction for ``k`` tokens drawn at random (mean over ``i`` of ``|adj(i)| / (T - 1)``); a spatially consistent
  teacher scores well above chance, a teacher with noisy, context-mixed tokens near it.

The last two are our reading of the pilot study of DTM (Kim, Heo, Han, ICLR 2025), which argues that teacher
targets are spatially inconsistent even between neighbouring tokens; the paper's exact measurement may differ.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from morphcache.errors import StoreError
from morphcache.store.feature_store import FeatureStore


def grid_geometry(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """(T, T) integer rounded Euclidean distance between grid positions, and (T, T) bool 8-adjacency."""
    r, c = np.divmod(np.arange(h * w), w)
    dr = np.abs(r[:, None] - r[None, :])
    dc = np.abs(c[:, None] - c[None, :])
    dist = np.rint(np.sqrt(dr**2 + dc**2)).astype(np.int64)
    adjacent = np.maximum(dr, dc) == 1
    return dist, adjacent


def block_stats(tokens: np.ndarray, mask: np.ndarray, grid: tuple[int, int], k: int) -> dict:
    """Partial sums for one block: tokens (n, T, D) float, mask (n,) bool of rows to use."""
    x = np.asarray(tokens, dtype=np.float32)[np.asarray(mask, dtype=bool)]
    n, T, D = x.shape
    h, w = grid
    dist, adjacent = grid_geometry(h, w)
    n_bins = int(dist.max()) + 1
    out = {"n_tokens": n * T, "sum": x.sum(axis=(0, 1), dtype=np.float64),
           "sumsq": np.square(x).sum(axis=(0, 1), dtype=np.float64)}
    norms = np.linalg.norm(x, axis=-1)
    out["norm_max"] = float(norms.max()) if n else 0.0
    out["norm_sum"] = float(norms.sum(dtype=np.float64))
    xn = x / np.maximum(norms, 1e-12)[..., None]
    g = xn.reshape(n, h, w, D)
    horiz = np.einsum("nhwd,nhwd->nhw", g[:, :, 1:], g[:, :, :-1])
    vert = np.einsum("nhwd,nhwd->nhw", g[:, 1:], g[:, :-1])
    out["nb_sum"] = float(horiz.sum(dtype=np.float64) + vert.sum(dtype=np.float64))
    out["nb_count"] = horiz.size + vert.size
    gram = np.matmul(xn, xn.transpose(0, 2, 1))  # (n, T, T)
    out["dist_sum"] = np.bincount(dist.ravel(), weights=gram.sum(axis=0, dtype=np.float64).ravel(), minlength=n_bins)
    out["dist_count"] = np.bincount(dist.ravel(), minlength=n_bins).astype(np.float64) * n
    kk = min(k, T - 1)
    if n and kk > 0:
        idx = np.arange(T)
        gram[:, idx, idx] = -np.inf
        top = np.argpartition(-gram, kk - 1, axis=-1)[..., :kk]  # (n, T, kk)
        out["knn_adj"] = float(adjacent[idx[None, :, None], top].sum(dtype=np.float64))
    else:
        out["knn_adj"] = 0.0
    out["knn_count"] = float(n * T * kk)
    return out


def merge(parts: list[dict]) -> dict:
    """Sum partial results (``norm_max`` is maxed)."""
    total: dict = {}
    for p in parts:
        for key, val in p.items():
            if key not in total:
                total[key] = val
            elif key == "norm_max":
                total[key] = max(total[key], val)
            else:
                total[key] = total[key] + val
    return total


def block_hist(tokens: np.ndarray, mask: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Histogram counts (bins,) of token norms of the masked rows of one block."""
    x = np.asarray(tokens, dtype=np.float32)[np.asarray(mask, dtype=bool)]
    return np.histogram(np.linalg.norm(x, axis=-1), bins=edges)[0]


def compute_stats(store: FeatureStore, k: int = 8, bins: int = 64) -> dict:
    """All statistics of the module docstring, computed with the current dask scheduler (set by the caller:
    ``dask.config.set(scheduler="threads")`` or a ``distributed.Client``).

    Raises:
        StoreError: the store has no servable rows (no finished chunk with ok images).
    """
    import dask

    spec = store.spec
    tok = store.to_dask()["tokens"]
    mask = np.zeros(store.n_rows, dtype=bool)
    mask[store.ok_rows()] = True
    bounds = np.cumsum((0,) + tuple(tok.chunks[0]))
    blocks = [(blk, mask[a:b]) for blk, a, b in zip(tok.to_delayed().ravel(), bounds[:-1], bounds[1:]) if mask[a:b].any()]
    if not blocks:
        raise StoreError(f"{store.path}: no servable rows (no finished chunk with ok images); run extract first")
    grid = spec.teacher.grid
    (tot,) = dask.compute(dask.delayed(merge)([dask.delayed(block_stats)(b, m, grid, k) for b, m in blocks]))
    edges = np.linspace(0.0, max(tot["norm_max"], 1e-12), bins + 1)
    (hist,) = dask.compute(dask.delayed(sum)([dask.delayed(block_hist)(b, m, edges) for b, m in blocks]))
    n = tot["n_tokens"]
    mean = tot["sum"] / n
    std = np.sqrt(np.maximum(tot["sumsq"] / n - mean**2, 0.0))
    _, adjacent = grid_geometry(*grid)
    T = spec.n_tokens
    with np.errstate(invalid="ignore", divide="ignore"):
        by_dist = tot["dist_sum"] / tot["dist_count"]
    off_diag = tot["dist_count"][1:].sum()
    return {
        "path": str(store.path),
        "rows": int(mask.sum()),
        "tokens": int(n),
        "grid": list(grid),
        "channel_mean": mean.tolist(),
        "channel_std": std.tolist(),
        "norm_mean": tot["norm_sum"] / n,
        "norm_hist": {"edges": edges.tolist(), "counts": np.asarray(hist).astype(int).tolist()},
        "neighbour_cosine": tot["nb_sum"] / tot["nb_count"] if tot["nb_count"] else None,
        "cosine_by_distance": {str(d): float(v) for d, v in enumerate(by_dist) if d > 0 and np.isfinite(v)},
        "random_pair_cosine": float(tot["dist_sum"][1:].sum() / off_diag) if off_diag else None,
        "knn_k": int(min(k, T - 1)),
        "knn_adjacent_fraction": tot["knn_adj"] / tot["knn_count"] if tot["knn_count"] else None,
        "knn_adjacent_chance": float(adjacent.sum() / (T * (T - 1))) if T > 1 else None,
    }


def plot_stats(stats: dict, png: Path) -> Path:
    """Four panels: channel mean/std, norm histogram, cosine vs grid distance, spatial-consistency summary."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(2, 2, figsize=(11, 8))
    mean, std = np.asarray(stats["channel_mean"]), np.asarray(stats["channel_std"])
    ch = np.arange(mean.size)
    ax[0, 0].fill_between(ch, mean - std, mean + std, alpha=0.3, label="mean ± std")
    ax[0, 0].plot(ch, mean, lw=0.8)
    ax[0, 0].set(title="per-channel mean ± std", xlabel="channel")
    ax[0, 0].legend()
    edges = np.asarray(stats["norm_hist"]["edges"])
    ax[0, 1].bar(edges[:-1], stats["norm_hist"]["counts"], width=np.diff(edges), align="edge")
    ax[0, 1].set(title=f"token L2 norm (mean {stats['norm_mean']:.3g})", xlabel="norm", ylabel="tokens")
    d = [int(k) for k in stats["cosine_by_distance"]]
    ax[1, 0].plot(d, list(stats["cosine_by_distance"].values()), "o-", label="pairs at distance d")
    if stats["random_pair_cosine"] is not None:
        ax[1, 0].axhline(stats["random_pair_cosine"], color="gray", ls="--", label="all pairs")
    ax[1, 0].set(title="mean cosine vs grid distance", xlabel="distance (patches)", ylabel="cosine")
    ax[1, 0].legend()
    ax[1, 1].axis("off")
    ax[1, 1].text(0.02, 0.95, "\n".join([
        f"rows: {stats['rows']}   tokens: {stats['tokens']}   grid: {stats['grid'][0]}x{stats['grid'][1]}",
        f"4-neighbour cosine: {stats['neighbour_cosine']:.4f}",
        f"top-{stats['knn_k']} similar tokens adjacent: {stats['knn_adjacent_fraction']:.4f}",
        f"  (chance {stats['knn_adjacent_chance']:.4f})",
    ]), va="top", family="monospace")
    fig.suptitle(Path(stats["path"]).name)
    fig.tight_layout()
    png = Path(png)
    fig.savefig(png, dpi=90)
    plt.close(fig)
    return png


def run_stats(store: FeatureStore, out_dir: Path, dask_address: str | None = None, workers: int = 2,
              k: int = 8, bins: int = 64) -> tuple[Path, Path]:
    """Compute, write ``out_dir/stats.json`` and ``out_dir/stats.png``. ``dask_address``: None = local threads
    scheduler, ``"local"`` = an embedded distributed LocalCluster, else a scheduler address.

    Raises:
        StoreError: the store has no servable rows (:func:`compute_stats`).
    """
    import dask

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if dask_address is None:
        with dask.config.set(scheduler="threads", num_workers=workers):
            stats = compute_stats(store, k=k, bins=bins)
    else:
        from distributed import Client, LocalCluster

        if dask_address == "local":
            with LocalCluster(n_workers=1, threads_per_worker=workers, processes=False, dashboard_address=None) as cluster, Client(cluster):
                stats = compute_stats(store, k=k, bins=bins)
        else:
            with Client(dask_address, timeout="10s"):
                stats = compute_stats(store, k=k, bins=bins)
        stats["dask"] = dask_address
    json_path = out_dir / "stats.json"
    json_path.write_text(json.dumps(stats, indent=1))
    return json_path, plot_stats(stats, out_dir / "stats.png")
