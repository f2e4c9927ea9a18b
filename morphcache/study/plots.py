"""PNG plots of the study summary (:func:`morphcache.study.report.summarize`); each returns its path, or None
when nothing it shows has finished yet."""

from __future__ import annotations

from pathlib import Path

METRICS = (("knn_top1", "k-NN top-1 %"), ("linear_top1", "linear probe top-1 %"))


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _err(d: dict) -> float:
    return d["half_width"] if d.get("half_width") is not None else 0.0


def plot_accuracy_vs_views(summary: dict, png: Path) -> Path | None:
    """Q1: accuracy vs cached views V (mean, 95% interval bars) with the live teacher as a band and the
    random-weight student as a dashed line."""
    q1 = summary.get("q1")
    if not q1:
        return None
    settings = summary["settings"]
    cached = [settings[r["setting"]] for r in q1["caches"]]
    live = settings.get(q1["live"], {})
    if not cached and "knn_top1" not in live:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, (m, name) in zip(axes, METRICS):
        xs = [s["setting"]["views_used"] for s in cached]
        if xs:
            ax.errorbar(xs, [s[m]["mean"] for s in cached], yerr=[_err(s[m]) for s in cached], marker="o",
                        capsize=4, label="cache (int8)")
            ax.set_xscale("log", base=2)
            ax.set_xticks(xs, [str(x) for x in xs])
        if m in live:
            d = live[m]
            ax.axhline(d["mean"], color="C1", label="live teacher, fresh view per epoch")
            ax.axhspan(d["mean"] - _err(d), d["mean"] + _err(d), color="C1", alpha=0.2)
        if summary.get("random"):
            ax.axhline(summary["random"][m], color="gray", ls="--", label="random-weight student")
        ax.set_xlabel("views per image in the cache (V)")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    n = summary["study"]["sizes"]
    fig.suptitle(f"Q1: DTM students, {n['images']} images, {n['epochs']} epochs; mean and 95% interval over seeds")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def plot_wall_time(summary: dict, png: Path) -> Path | None:
    """Training wall time per setting (mean, 95% interval), plus each cache's extraction share (Q1)."""
    done = [(k, s) for k, s in summary["settings"].items() if "train_seconds" in s]
    if not done:
        return None
    q1 = {r["setting"]: r for r in (summary.get("q1") or {}).get("caches", [])}
    plt = _plt()
    fig, ax = plt.subplots(figsize=(10, 0.45 * len(done) + 1.5))
    ys = range(len(done))
    train = [s["train_seconds"]["mean"] for _, s in done]
    ax.barh(ys, train, xerr=[_err(s["train_seconds"]) for _, s in done], capsize=3, label="training")
    extra = [q1[k]["extract_seconds"] or 0.0 if k in q1 else 0.0 for k, _ in done]
    ax.barh(ys, extra, left=train, color="C2", alpha=0.6, label="extraction share (V views per image)")
    ax.set_yticks(list(ys), [s["label"] for _, s in done], fontsize=8)
    return _save_barh(plt, fig, ax, "wall seconds", png)


def _save_barh(plt, fig, ax, xlabel: str, png: Path) -> Path:
    """Label the x axis, add the legend and grid of a horizontal chart, write ``png`` and close the figure."""
    ax.set_xlabel(xlabel)
    ax.legend(fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def plot_differences(summary: dict, png: Path) -> Path | None:
    """Every paired comparison: mean difference and 95% interval, in points, per protocol."""
    rows = [c for c in summary["comparisons"] if "knn_top1" in c]
    if not rows:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(9, 0.5 * len(rows) + 1.5))
    for j, (m, name) in enumerate(METRICS):
        ys = [i + (j - 0.5) * 0.3 for i in range(len(rows))]
        ax.errorbar([c[m]["mean"] for c in rows], ys, xerr=[_err(c[m]) for c in rows], fmt="o", capsize=3,
                    label=name)
    ax.axvline(0.0, color="k", lw=0.8)
    ax.set_yticks(range(len(rows)), [f"{c['question']}: {c['name']} (n={c['knn_top1']['n']})" for c in rows],
                  fontsize=8)
    return _save_barh(plt, fig, ax, "paired difference, points (same seeds)", png)
