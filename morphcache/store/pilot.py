"""``store pilot``: the DTM paper's pilot study on a user's own store, out of core with dask.

DTM (Kim, Heo, Han, ICLR 2025) argues that teacher tokens are spatially inconsistent, so that regressing each
token on its own target is noisy, and that morphing (replacing tokens by the means of groups of similar tokens)
denoises the targets. Whether that can matter for a store depends on how much morphing changes its targets.
For the servable rows of a store (or a seeded random subset of ``rows`` of them) this module computes:

- ``cosine_by_distance[d]`` and ``neighbour_cosine``: token cosine by rounded grid distance and over 4-neighbour
  pairs (the definitions and code of :mod:`morphcache.store.stats`);
- ``removed_share``: the share of within-image token variance that DTM morphing removes at the configured (n, k)
  distribution. For one view's tokens ``x (T, D)`` and groups from
  :func:`morphcache.train.dtm.dtm_membership` (per-iteration counts from
  :func:`morphcache.train.dtm.merge_schedule`), morphing ``m = morph(x, groups)`` is an orthogonal projection onto
  group-constant token sequences, which contain the constant ones, so
  ``sum_t |x_t - mean(x)|^2 = sum_t |m_t - mean(x)|^2 + sum_t |x_t - m_t|^2``; the removed share is
  ``sum |x - m|^2 / sum |x - mean(x)|^2`` summed over rows. ``cases`` morphing cases (n uniform in [0, N], k in
  [1, K], :func:`morphcache.train.dtm.sample_morph_cases` from ``seed``) are drawn once and applied to every row;
  each case's share and their mean are reported;
- for stores whose images all have labels: token-level classification (each token labelled with its image's
  class, the analogue of the paper's Figure 1): the weighted k-NN classifier of :mod:`morphcache.evaluate.knn`
  over the single raw tokens of view 0 of half of ``classify_images`` images classifies the single tokens of the
  other half, raw and morphed (each case); reported as accuracy and correct tokens per image of T.

Outputs ``pilot.json`` and ``pilot.png`` and one sentence (``verdict``) on whether DTM is likely to change the
targets much (removed share below 10%: little; 10-25%: moderately; above: substantially).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from morphcache.errors import ConfigError, StoreError

LITTLE, SUBSTANTIAL = 0.10, 0.25


def _run_default(name: str):
    from morphcache.schemas import RunConfig

    return RunConfig.model_fields[name].default


@dataclass(frozen=True)
class PilotConfig:
    """The (n, k) distribution (RunConfig's dtm_* fields; ``max_merge`` None = T) and the pilot's sample sizes."""

    max_merge: int | None = None
    max_iters: int = 14
    rule: str = "released"
    protect_top_left: bool = False
    cases: int = 8
    seed: int = 0
    rows: int | None = None  # None: every servable row
    classify_images: int = 256

    @classmethod
    def defaults(cls, **overrides) -> "PilotConfig":
        """RunConfig's DTM defaults, with ``overrides`` (None values ignored)."""
        base = {"max_merge": _run_default("dtm_max_merge"), "max_iters": _run_default("dtm_max_iters"),
                "rule": _run_default("dtm_merge_rule"), "protect_top_left": _run_default("dtm_protect_top_left")}
        base.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**base)

    @classmethod
    def from_run(cls, path: str | Path, **overrides) -> "PilotConfig":
        """The DTM settings of a training run's ``config.json`` (a RunConfig), with ``overrides``.

        Raises:
            ConfigError: the file cannot be read or is not a valid RunConfig.
        """
        from pydantic import ValidationError

        from morphcache.schemas import RunConfig

        p = Path(path)
        if p.is_dir():
            p = p / "config.json"
        try:
            cfg = RunConfig.model_validate_json(p.read_text())
        except OSError as exc:
            raise ConfigError(f"--run-config {p}: cannot read it ({exc.strerror}); pass a run directory or its "
                              "config.json") from None
        except ValidationError as exc:
            raise ConfigError(f"--run-config {p}: not a RunConfig ({exc.errors()[0]['msg']})") from None
        base = {"max_merge": cfg.dtm_max_merge, "max_iters": cfg.dtm_max_iters, "rule": cfg.dtm_merge_rule,
                "protect_top_left": cfg.dtm_protect_top_left, "seed": cfg.seed}
        base.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**base)

    def to_dict(self) -> dict:
        return asdict(self)


def morph_cases(cfg: PilotConfig, n_tokens: int) -> list[dict]:
    """The sampled cases ``[{n, k, schedule}]`` (schedule: tokens merged per iteration)."""
    import torch

    from morphcache.train.dtm import merge_schedule, sample_morph_cases

    budget = n_tokens if cfg.max_merge is None else int(cfg.max_merge)
    if cfg.cases < 1:
        raise ConfigError(f"--cases {cfg.cases} must be >= 1")
    cases = sample_morph_cases(torch.Generator().manual_seed(cfg.seed), [(budget, cfg.max_iters)] * cfg.cases)
    return [{"n": n, "k": k, "schedule": merge_schedule(n_tokens, n, k, cfg.rule, budget, cfg.protect_top_left)}
            for n, k in cases]


def morph_tokens(x: np.ndarray, schedule: list[int], protect_top_left: bool) -> np.ndarray:
    """``x (B, T, D)`` float32 -> morphed ``(B, T, D)`` float32 (every token replaced by its group's mean)."""
    import torch

    from morphcache.train.dtm import dtm_membership, morph

    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    return morph(t, dtm_membership(t, schedule, protect_top_left)).numpy()


def block_pilot(tokens: np.ndarray, mask: np.ndarray, grid: tuple[int, int], cases: list[dict],
                protect_top_left: bool) -> dict:
    """Partial sums of one block ``tokens (n, T, D)`` for the rows in ``mask (n,)``: the cosine sums of
    :func:`morphcache.store.stats.block_stats`, ``within`` (sum of |x - mean(x)|^2) and ``removed (C,)``."""
    from morphcache.store.stats import block_stats

    x = np.asarray(tokens, dtype=np.float32)[np.asarray(mask, dtype=bool)]
    part = block_stats(x, np.ones(len(x), dtype=bool), grid, k=1)
    out = {key: part[key] for key in ("dist_sum", "dist_count", "nb_sum", "nb_count")}
    out["rows"] = len(x)
    out["within"] = float(np.square(x - x.mean(axis=1, keepdims=True), dtype=np.float64).sum())
    out["removed"] = np.array([float(np.square(x - morph_tokens(x, c["schedule"], protect_top_left),
                                               dtype=np.float64).sum()) for c in cases])
    return out


def _row_mask(store, rows: int | None, seed: int) -> np.ndarray:
    ok = store.ok_rows()
    if ok.size == 0:
        raise StoreError(f"{store.path}: no servable rows yet; run extract first")
    if rows is not None:
        if rows <= 0:
            raise ConfigError(f"--rows {rows} must be positive")
        if rows < ok.size:
            ok = np.random.default_rng(seed).choice(ok, size=rows, replace=False)
    mask = np.zeros(store.n_rows, dtype=bool)
    mask[ok] = True
    return mask


def token_classification(store, cfg: PilotConfig, cases: list[dict]) -> dict | None:
    """Figure-1 analogue (module doc); None when some servable image has no label or fewer than 2 classes."""
    import torch

    from morphcache.evaluate.knn import KnnConfig, knn_scores, topk_accuracy

    images = store.ok_images()
    labels = np.asarray(store.image_table().label)[images]
    if images.size < 4 or (labels < 0).any() or np.unique(labels).size < 2:
        return None
    rng = np.random.default_rng(cfg.seed)
    pick = rng.permutation(images.size)[: min(cfg.classify_images, images.size)]
    half = len(pick) // 2
    tr, te = np.sort(pick[:half]), np.sort(pick[half:])
    V = store.spec.views_per_image
    T = store.spec.n_tokens
    n_classes = int(labels.max()) + 1
    knn = KnnConfig()

    def tokens(idx):  # view 0 of each image
        return store.read_tokens_numpy(images[idx] * V).astype(np.float32), labels[idx]

    x_tr, y_tr = tokens(tr)
    x_te, y_te = tokens(te)
    train = torch.from_numpy(x_tr.reshape(-1, x_tr.shape[-1]))
    train_labels = torch.from_numpy(np.repeat(y_tr, T).astype(np.int64))
    y_tok = np.repeat(y_te, T)

    def accuracy(x):
        scores = knn_scores(train, train_labels, torch.from_numpy(x.reshape(-1, x.shape[-1])), n_classes, knn.k,
                            knn.temperature, knn.chunk_size)
        return topk_accuracy(scores, y_tok, ks=(1,))["top1"]

    raw = accuracy(x_te)
    morphed = [accuracy(morph_tokens(x_te, c["schedule"], cfg.protect_top_left)) for c in cases]
    return {"train_images": int(len(tr)), "test_images": int(len(te)), "tokens_per_image": T,
            "classifier": f"weighted k-NN on single raw train tokens (cosine, k {knn.k}, T {knn.temperature})",
            "raw_top1": raw, "morphed_top1": float(np.mean(morphed)), "morphed_top1_per_case": morphed,
            "raw_correct_tokens_per_image": raw / 100.0 * T,
            "morphed_correct_tokens_per_image": float(np.mean(morphed)) / 100.0 * T}


def verdict(share: float, neighbour_cos: float | None, cfg: PilotConfig, n_tokens: int) -> str:
    """One sentence on whether DTM is likely to change the targets much."""
    n = n_tokens if cfg.max_merge is None else cfg.max_merge
    how = ("unlikely to change these targets much" if share < LITTLE else
           "likely to change these targets moderately" if share < SUBSTANTIAL else
           "likely to change these targets substantially")
    cos = f"; neighbour-token cosine is {neighbour_cos:.2f} (the DTM paper's premise is about 0.5)" if neighbour_cos is not None else ""
    return (f"DTM is {how}: morphing with n in [0, {n}] and k in [1, {cfg.max_iters}] removes {100 * share:.1f}% "
            f"of the within-image token variance{cos}.")


def compute_pilot(store, cfg: PilotConfig) -> dict:
    """Everything of the module doc, with the current dask scheduler (see :func:`run_pilot`).

    Raises:
        StoreError: the store has no servable rows yet.
        ConfigError: ``cfg.cases`` or ``cfg.rows`` below 1.
    """
    import dask

    from morphcache.store.stats import merge

    spec = store.spec
    grid = spec.teacher.grid
    cases = morph_cases(cfg, spec.n_tokens)
    mask = _row_mask(store, cfg.rows, cfg.seed)
    tok = store.to_dask()["tokens"]
    bounds = np.cumsum((0,) + tuple(tok.chunks[0]))
    blocks = [(blk, mask[a:b]) for blk, a, b in zip(tok.to_delayed().ravel(), bounds[:-1], bounds[1:]) if mask[a:b].any()]
    parts = [dask.delayed(block_pilot)(b, m, grid, cases, cfg.protect_top_left) for b, m in blocks]
    (tot,) = dask.compute(dask.delayed(merge)(parts))
    with np.errstate(invalid="ignore", divide="ignore"):
        by_dist = tot["dist_sum"] / tot["dist_count"]
    within = tot["within"]
    per_case = (tot["removed"] / within).tolist() if within > 0 else [0.0] * len(cases)
    share = float(np.mean(per_case))
    nb = tot["nb_sum"] / tot["nb_count"] if tot["nb_count"] else None
    out = {
        "path": str(store.path), "rows": int(tot["rows"]), "grid": list(grid), "tokens": spec.n_tokens,
        "config": cfg.to_dict(), "cosine_by_distance": {str(d): float(v) for d, v in enumerate(by_dist)
                                                         if d > 0 and np.isfinite(v)},
        "neighbour_cosine": nb, "within_variance_sum": within,
        "cases": [{**c, "removed_share": s} for c, s in zip(cases, per_case)], "removed_share": share,
        "token_classification": token_classification(store, cfg, cases),
    }
    out["verdict"] = verdict(share, nb, cfg, spec.n_tokens)
    return out


def plot_pilot(pilot: dict, png: Path) -> Path:
    """Cosine vs grid distance, removed share per case vs n, and token accuracy raw vs morphed (labelled)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cls = pilot.get("token_classification")
    fig, axes = plt.subplots(1, 3 if cls else 2, figsize=(13 if cls else 9, 3.6))
    d = sorted(pilot["cosine_by_distance"], key=int)
    axes[0].plot([int(k) for k in d], [pilot["cosine_by_distance"][k] for k in d], marker="o")
    axes[0].axhline(0.5, color="gray", ls="--", lw=0.8, label="DTM paper's premise (~0.5)")
    axes[0].set_xlabel("grid distance (patches)")
    axes[0].set_ylabel("token cosine")
    axes[0].legend(fontsize=8)
    cases = pilot["cases"]
    axes[1].scatter([c["n"] for c in cases], [100 * c["removed_share"] for c in cases])
    axes[1].axhline(100 * pilot["removed_share"], color="C1", label=f"mean {100 * pilot['removed_share']:.1f}%")
    axes[1].set_xlabel("tokens merged n (per case)")
    axes[1].set_ylabel("within-image variance removed %")
    axes[1].legend(fontsize=8)
    if cls:
        axes[2].bar(["raw", "morphed"], [cls["raw_correct_tokens_per_image"], cls["morphed_correct_tokens_per_image"]])
        axes[2].set_ylabel(f"correct tokens per image (of {cls['tokens_per_image']})")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle(pilot["verdict"], fontsize=8, wrap=True)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def run_pilot(store, out_dir: str | Path, cfg: PilotConfig, dask_address: str | None = None,
              workers: int = 2) -> tuple[Path, Path, dict]:
    """Compute and write ``out_dir/pilot.json`` and ``out_dir/pilot.png``. ``dask_address``: None = local threads,
    ``"local"`` = an embedded distributed LocalCluster, else a scheduler address.

    Raises:
        StoreError, ConfigError: as :func:`compute_pilot`.
    """
    import dask

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if dask_address is None:
        with dask.config.set(scheduler="threads", num_workers=workers):
            pilot = compute_pilot(store, cfg)
    else:
        from distributed import Client, LocalCluster

        if dask_address == "local":
            with LocalCluster(n_workers=1, threads_per_worker=workers, processes=False, dashboard_address=None) as cluster, Client(cluster):
                pilot = compute_pilot(store, cfg)
        else:
            with Client(dask_address, timeout="10s"):
                pilot = compute_pilot(store, cfg)
        pilot["dask"] = dask_address
    json_path = out_dir / "pilot.json"
    json_path.write_text(json.dumps(pilot, indent=1) + "\n")
    return json_path, plot_pilot(pilot, out_dir / "pilot.png"), pilot
