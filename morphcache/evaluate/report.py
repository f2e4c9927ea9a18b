"""``morphcache report``: one Markdown page with PNG figures across pretraining runs.

Per run directory (each piece is optional; a missing one is noted, never fatal):

- ``metrics.jsonl`` (lines with ``step``, ``loss``, optionally ``lr``, ``epoch``) -> ``loss_curves.png``;
- ``eval.jsonl`` (rows from :mod:`morphcache.evaluate.results`), plus any extra results files -> an accuracy
  table (latest top-1 per backbone x protocol x dataset; mIoU for ``segment`` rows, in columns of their own
  beside k-NN and linear) and ``accuracy.png``;
- ``segment`` rows with saved examples (:func:`morphcache.evaluate.segmentation.save_examples`) ->
  ``segment_<backbone>__<dataset>.png``: a few validation images, their ground truth and the probe's prediction;
- ``config.json`` naming a ``store`` plus a checkpoint (``*.pt``) in the run directory -> ``tokens_<run>.png``:
  for the first few images, view 0 rendered by the training renderer (exactly the pixels the student trained on),
  the teacher's cached tokens and the student's tokens of that view, each mapped to RGB by their first 3 principal
  components.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Sequence

import numpy as np

from morphcache.errors import MorphcacheError
from morphcache.evaluate.results import load_results


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def load_metrics(run_dir: Path) -> list[dict]:
    """Rows of ``run_dir/metrics.jsonl`` that have numeric ``step`` and ``loss``."""
    return [r for r in load_results(run_dir / "metrics.jsonl")
            if isinstance(r.get("step"), (int, float)) and isinstance(r.get("loss"), (int, float))]


def plot_loss_curves(curves: dict[str, list[dict]], out: Path) -> Path | None:
    """Loss (and lr when logged) against step, one line per run; None when no run logged a loss."""
    curves = {k: v for k, v in curves.items() if v}
    if not curves:
        return None
    plt = _plt()
    has_lr = any(isinstance(r.get("lr"), (int, float)) for rows in curves.values() for r in rows)
    fig, axes = plt.subplots(1, 2 if has_lr else 1, figsize=(11 if has_lr else 6, 4), squeeze=False)
    for label, rows in curves.items():
        steps = np.array([r["step"] for r in rows], dtype=float)
        loss = np.array([r["loss"] for r in rows], dtype=float)
        line, = axes[0, 0].plot(steps, loss, alpha=0.35, lw=1)
        if len(loss) >= 10:  # an exponential moving average makes noisy curves comparable
            ema, acc = np.empty_like(loss), loss[0]
            for i, v in enumerate(loss):
                acc = 0.9 * acc + 0.1 * v
                ema[i] = acc
            axes[0, 0].plot(steps, ema, color=line.get_color(), lw=1.5, label=label)
        else:
            line.set_label(label)
            line.set_alpha(1.0)
        if has_lr:
            lr_rows = [r for r in rows if isinstance(r.get("lr"), (int, float))]
            axes[0, 1].plot([r["step"] for r in lr_rows], [r["lr"] for r in lr_rows], label=label)
    axes[0, 0].set(xlabel="step", ylabel="loss", title="training loss")
    axes[0, 0].legend(fontsize=8)
    if has_lr:
        axes[0, 1].set(xlabel="step", ylabel="lr", title="learning rate")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _score(row: dict) -> tuple[str, object]:
    """(metric name, value) shown for a row: ``miou`` for segment rows, ``top1`` otherwise."""
    key = "miou" if row.get("protocol") == "segment" else "top1"
    return key, (row.get("metrics") or {}).get(key)


def _row_label(row: dict) -> str:
    return f"{row['_run']}: {row.get('backbone')}" if row.get("_run") else str(row.get("backbone"))


def accuracy_table(rows: list[dict]) -> tuple[list[str], list[str], dict[tuple[str, str], float]]:
    """(row labels, column labels, {(row, col): top1 or mIoU}) keeping the latest row per cell. Row label: ``run``
    (when the row came from a run directory) and backbone; column: ``protocol dataset[ <- source]``, with
    `` (mIoU)`` appended for segment rows."""
    cells: dict[tuple[str, str], tuple[str, float]] = {}
    row_labels: list[str] = []
    col_labels: list[str] = []
    for r in rows:
        key, top1 = _score(r)
        if not isinstance(top1, (int, float)) or "protocol" not in r:
            continue
        name = _row_label(r)
        col = f"{r['protocol']} {r.get('dataset')}" + (f" <- {r['transfer_from']}" if r.get("transfer_from") else "")
        col += " (mIoU)" if key == "miou" else ""
        stamp = str(r.get("timestamp", ""))
        if (name, col) not in cells or stamp >= cells[(name, col)][0]:
            cells[(name, col)] = (stamp, float(top1))
        row_labels += [name] if name not in row_labels else []
        col_labels += [col] if col not in col_labels else []
    return row_labels, col_labels, {k: v for k, (_, v) in cells.items()}


def markdown_table(row_labels, col_labels, cells) -> str:
    head = "| model | " + " | ".join(col_labels) + " |\n|---|" + "---:|" * len(col_labels) + "\n"
    body = "".join("| " + r + " | " + " | ".join(f"{cells[(r, c)]:.2f}" if (r, c) in cells else "-"
                                                  for c in col_labels) + " |\n" for r in row_labels)
    return head + body


def plot_accuracy(row_labels, col_labels, cells, out: Path) -> Path:
    """Grouped bars: one group per column (protocol x dataset), one bar per model."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(col_labels) * max(1, len(row_labels)) ** 0.5), 4))
    width = 0.8 / max(1, len(row_labels))
    x = np.arange(len(col_labels))
    for i, r in enumerate(row_labels):
        vals = [cells.get((r, c), np.nan) for c in col_labels]
        ax.bar(x + (i - (len(row_labels) - 1) / 2) * width, vals, width, label=r)
    ax.set_xticks(x, col_labels, rotation=15, ha="right", fontsize=8)
    ax.set(ylabel="top-1 accuracy / mIoU (%)", ylim=(0, 100), title="evaluation")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def pca_grid_rgb(tokens: np.ndarray) -> np.ndarray:
    """tokens ``(N, T, D)`` on a square grid -> RGB ``(N, h, w, 3)`` in [0, 1]: the first 3 principal components,
    fitted jointly over all N images (so colours are comparable across images), min-max scaled per component."""
    from morphcache.extract.show import pca_rgb

    n, t, _ = tokens.shape
    side = int(round(t ** 0.5))
    if side * side != t:
        raise MorphcacheError(f"cannot draw {t} tokens as a square grid")
    return pca_rgb(tokens).reshape(n, side, side, 3)


def class_colours(n_classes: int) -> np.ndarray:
    """``float (n_classes, 3)`` in [0, 1]: matplotlib's tab10 / tab20 for up to 10 / 20 classes, else seeded random
    colours."""
    if n_classes <= 20:
        import matplotlib

        name = "tab10" if n_classes <= 10 else "tab20"
        return np.asarray(matplotlib.colormaps[name].colors[:n_classes], dtype=np.float64)
    return np.random.default_rng(0).uniform(0.1, 1.0, (n_classes, 3))


def colour_labels(labels: np.ndarray, n_classes: int, ignore_index: int) -> np.ndarray:
    """Label maps ``(..., H, W)`` -> RGB ``(..., H, W, 3)`` in [0, 1]; ignored pixels black."""
    palette = np.concatenate([class_colours(n_classes), np.zeros((1, 3))])
    idx = np.where((labels >= 0) & (labels < n_classes), labels, n_classes)
    idx = np.where(labels == ignore_index, n_classes, idx)
    return palette[idx]


def segmentation_figure(row: dict, examples: dict, out: Path) -> Path:
    """One row per kept validation image: image | ground truth | prediction (ignored pixels black), plus a legend
    of the classes that appear."""
    plt = _plt()
    images, labels, preds = examples["images"], examples["labels"], examples["preds"]
    classes, ignore = [str(c) for c in examples["classes"]], int(examples["ignore_index"])
    n = len(images)
    fig, axes = plt.subplots(n, 3, figsize=(7.5, 2.5 * n + 0.6), squeeze=False)
    for i in range(n):
        for col, arr in enumerate((images[i], colour_labels(labels[i], len(classes), ignore),
                                   colour_labels(preds[i], len(classes), ignore))):
            axes[i, col].imshow(arr, interpolation="nearest")
            axes[i, col].axis("off")
    for col, title in enumerate(("image", "ground truth", "prediction")):
        axes[0, col].set_title(title, fontsize=9)
    present = sorted(set(np.unique(labels).tolist()) | set(np.unique(preds).tolist()))
    present = [c for c in present if 0 <= c < len(classes)][:20]
    colours = class_colours(len(classes))
    handles = [plt.Rectangle((0, 0), 1, 1, color=colours[c]) for c in present]
    fig.legend(handles, [classes[c] for c in present], loc="lower center", ncol=min(5, max(1, len(present))),
               fontsize=7, frameon=False)
    miou = (row.get("metrics") or {}).get("miou")
    fig.suptitle(f"{_row_label(row)} on {row.get('dataset')}" + (f": mIoU {miou:.1f}" if miou is not None else ""),
                 fontsize=9)
    fig.tight_layout(rect=(0, 0.06, 1, 0.97))
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def segmentation_section(rows: list[dict], out_dir: Path) -> list[str]:
    """Markdown lines with one figure per (model, dataset) of the latest segment rows that saved examples."""
    from morphcache.evaluate.segmentation import load_examples

    latest: dict[tuple[str, str], dict] = {}
    for r in rows:
        if r.get("protocol") == "segment" and r.get("examples") and r.get("_dir") is not None:
            key = (_row_label(r), str(r.get("dataset")))
            if key not in latest or str(r.get("timestamp", "")) >= str(latest[key].get("timestamp", "")):
                latest[key] = r
    lines: list[str] = []
    for (label, dataset), r in latest.items():
        path = Path(r["_dir"]) / r["examples"]
        name = "segment_" + re.sub(r"[^A-Za-z0-9._-]+", "_", f"{label}__{dataset}").strip("_")[:120] + ".png"
        try:
            png = segmentation_figure(r, load_examples(path), out_dir / name)
        except (OSError, KeyError, ValueError) as exc:
            lines.append(f"- {label} on {dataset}: figure skipped ({' '.join(str(exc).split())})")
            continue
        lines += [f"![segmentation {label} {dataset}]({png.name})", ""]
    return lines


def _find_checkpoint(run_dir: Path) -> Path | None:
    for name in ("checkpoint.pt", "last.pt", "final.pt", "checkpoints/last.pt"):
        if (run_dir / name).is_file():
            return run_dir / name
    found = sorted(list(run_dir.glob("*.pt")) + list(run_dir.glob("*/*.pt")), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def token_maps(run_dir: Path, out: Path, n_images: int = 4) -> Path:
    """Draw view | teacher PCA | student PCA rows for the first ``n_images`` ok images of the run's store."""
    import torch

    from morphcache.evaluate.backbones import load_backbone
    from morphcache.extract.replay import load_view_inputs, render_views
    from morphcache.store.feature_store import FeatureStore

    config = json.loads((run_dir / "config.json").read_text())
    store_path = Path(config["store"]).expanduser()
    if not store_path.exists() and (run_dir / store_path).exists():
        store_path = run_dir / store_path
    store = FeatureStore.open(store_path)
    ckpt = _find_checkpoint(run_dir)
    if ckpt is None:
        raise MorphcacheError(f"{run_dir} has no *.pt checkpoint")
    images = store.ok_images()[:n_images]
    if len(images) == 0:
        raise MorphcacheError(f"store {store_path} has no finished images")
    rows = images * store.spec.views_per_image
    teacher_tokens = store.read_tokens_numpy(rows)
    student = load_backbone(str(ckpt))
    # The training renderer at the student's size, un-normalized (mean 0, std 1): the pixels the student saw.
    encoded, params = load_view_inputs(store, rows)
    pixels = torch.cat([x for _, x in render_views(encoded, params, student.img_size, (0.0, 0.0, 0.0),
                                                   (1.0, 1.0, 1.0), store.spec.augment.interpolation)])
    views = pixels.clamp(0, 1).permute(0, 2, 3, 1).numpy()
    mean = torch.tensor(student.mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(student.std, dtype=torch.float32).view(1, 3, 1, 1)
    with torch.no_grad():
        student.eval()
        student_tokens = student.tokens((pixels - mean) / std).numpy()
    maps = [("view", views), (f"teacher {store.spec.teacher.name}", pca_grid_rgb(teacher_tokens)),
            ("student", pca_grid_rgb(student_tokens))]
    plt = _plt()
    fig, axes = plt.subplots(len(images), 3, figsize=(7.5, 2.5 * len(images)), squeeze=False)
    for col, (title, arrs) in enumerate(maps):
        for i in range(len(images)):
            axes[i, col].imshow(arrs[i], interpolation="nearest")
            axes[i, col].axis("off")
        axes[0, col].set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def write_report(run_dirs: Sequence[str | Path], out_dir: str | Path, results_files: Sequence[str | Path] = (),
                 n_images: int = 4) -> Path:
    """Write ``out_dir/report.md`` and its PNGs for ``run_dirs``; returns the Markdown path.

    Raises:
        MorphcacheError: a run directory or results file that does not exist.
    """
    run_dirs = [Path(d) for d in run_dirs]
    missing = [str(d) for d in run_dirs if not d.is_dir()]
    if missing:
        raise MorphcacheError(f"run directory {missing[0]} does not exist; pass directories written by morphcache train")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    labels = _unique_labels(run_dirs)
    lines = ["# morphcache report", "", "Runs: " + ", ".join(f"`{d}`" for d in run_dirs), ""]

    lines += ["## Training loss", ""]
    curves = {labels[d]: load_metrics(d) for d in run_dirs}
    png = plot_loss_curves(curves, out_dir / "loss_curves.png")
    lines += [f"![loss curves]({png.name})" if png else "No run logged a loss (no metrics.jsonl).", ""]
    for d in run_dirs:
        rows = curves[labels[d]]
        if rows:
            lines.append(f"- {labels[d]}: {len(rows)} points, last step {rows[-1]['step']}, "
                         f"last loss {rows[-1]['loss']:.4f}")
    lines.append("")

    lines += ["## Accuracy (top-1 %; mIoU % for segment)", ""]
    rows = [dict(r, _run=labels[d], _dir=d) for d in run_dirs for r in load_results(d / "eval.jsonl")]
    for f in results_files:
        if not Path(f).is_file():
            raise MorphcacheError(f"results file {f} does not exist; pass a file written by morphcache eval")
        rows += [_attach_run(dict(r, _dir=Path(f).parent), labels) for r in load_results(f)]
    row_labels, col_labels, cells = accuracy_table(rows)
    if cells:
        lines += [markdown_table(row_labels, col_labels, cells), ""]
        lines += [f"![accuracy]({plot_accuracy(row_labels, col_labels, cells, out_dir / 'accuracy.png').name})", ""]
    else:
        lines += [no_eval_rows_message(run_dirs, results_files), ""]
    seg_lines = segmentation_section(rows, out_dir)
    if seg_lines:
        lines += ["## Semantic segmentation (linear probe)", "",
                  "Validation images resized as the probe saw them, ground truth and prediction (ignored pixels "
                  "black).", ""] + seg_lines

    lines += ["## Token PCA maps", ""]
    for d in run_dirs:
        if not (d / "config.json").is_file():
            lines.append(f"- {labels[d]}: skipped (no config.json)")
            continue
        try:
            png = token_maps(d, out_dir / f"tokens_{labels[d]}.png", n_images)
        except (MorphcacheError, OSError, KeyError, ValueError) as exc:
            lines.append(f"- {labels[d]}: skipped ({' '.join(str(exc).split())})")
            continue
        lines += [f"### {labels[d]}", "", "First 3 principal components of the patch tokens as RGB "
                  "(view 0 of each image, rendered as in training).", "", f"![token maps {labels[d]}]({png.name})"]
    lines.append("")
    md = out_dir / "report.md"
    md.write_text("\n".join(lines), encoding="utf-8")
    return md


def no_eval_rows_message(run_dirs: Sequence[Path], results_files: Sequence[str | Path] = ()) -> str:
    """Why the accuracy table is empty: the files that were searched, and how to add others."""
    searched = [f"`{Path(d) / 'eval.jsonl'}`" for d in run_dirs] + [f"`{f}`" for f in results_files]
    return (f"No evaluation rows found; searched {', '.join(searched) or 'no files'}. `morphcache eval` appends "
            "them to RUN_DIR/eval.jsonl for a checkpoint of that run; pass other results files with "
            "`--results FILE`.")


def _attach_run(row: dict, labels: dict[Path, str]) -> dict:
    """Label a results row whose backbone is a checkpoint inside one of the runs with that run's name."""
    spec = str(row.get("backbone", ""))
    path = spec.split(":", 1)[1] if spec.startswith("checkpoint:") else spec
    if not path.endswith(".pt"):
        return row
    parent = Path(path).resolve().parent
    for d, label in labels.items():
        if parent == d.resolve():
            return dict(row, _run=label, backbone=Path(path).name)
    return row


def _unique_labels(run_dirs: list[Path]) -> dict[Path, str]:
    labels: dict[Path, str] = {}
    for d in run_dirs:
        base, i = d.resolve().name or "run", 1
        label = base
        while label in labels.values():
            i += 1
            label = f"{base}-{i}"
        labels[d] = label
    return labels
