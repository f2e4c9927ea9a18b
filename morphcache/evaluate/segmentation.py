"""Linear semantic-segmentation probe on frozen patch tokens, scored by mIoU (DTM's ADE20K transfer, as a probe).

Protocol (the linear head of DINOv2's segmentation evaluation, without its multi-scale / sliding-window test):

1. **Resized evaluation at a stated resolution.** Every image is resized, aspect ratio not kept, to the backbone's
   input side S (``--img-size``; bicubic, antialiased) and its mask to the label side L (``--label-size``, default
   S; nearest neighbour). Metrics are computed on these L x L label maps, not on the original-resolution masks, so
   compare backbones at the same L. (Sliding-window evaluation at 512 px, as mmsegmentation's ADE20K configs, costs
   several forward passes per image and is not offered.)
2. **Frozen features.** The backbone runs once per image (no augmentation); the patch tokens of its last block, or
   of its last ``layers`` blocks concatenated (:meth:`~morphcache.evaluate.backbones.Backbone.layer_tokens`), are
   kept as float16 ``(N, T, D')`` on the CPU: about ``N * T * D' * 2`` bytes (ADE20K's 20 210 training images at
   224 px with ViT-S: 4 GB), so subsample big sets with ``?train=N``.
3. **Linear head.** Tokens on their ``h x w`` grid -> optional ``BatchNorm2d`` without affine (feature
   standardization, as the MAE linear probe) -> a 1x1 convolution (one linear classifier per patch) -> logits
   upsampled bilinearly to L x L -> cross-entropy that skips the ignore index. AdamW with cosine decay per step,
   as :mod:`morphcache.evaluate.linear_probe`.
4. **Metrics** (:func:`segmentation_metrics`) from a confusion matrix over all validation pixels that are not
   ignored: per-class IoU ``TP / (TP + FP + FN)``, mIoU (mean over classes that occur in the ground truth or the
   prediction, mmsegmentation's ``nanmean``), pixel accuracy ``sum TP / labelled pixels`` (mmseg's aAcc) and mean
   class accuracy (mAcc), all in percent.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from morphcache.errors import ConfigError, MorphcacheError
from morphcache.evaluate.features import autocast_context, prepare_images
from morphcache.evaluate.linear_probe import build_probe_optimizer
from morphcache.train.schedule import lr_at
from morphcache.evaluate.seg_datasets import SegDataset, SegSample, load_pair
from morphcache.evaluate.settings import SegProbeConfig
from morphcache.progress import progress_bar


class SegmentationProbe(nn.Module):
    """``(B, D, h, w)`` patch-token grid -> logits ``(B, C, L, L)``: [BatchNorm2d(affine=False)] + 1x1 conv, then
    bilinear upsampling (``align_corners=False``) to the label side L."""

    def __init__(self, in_channels: int, n_classes: int, batchnorm: bool = True) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(in_channels, affine=False, eps=1e-6) if batchnorm else nn.Identity()
        self.head = nn.Conv2d(in_channels, n_classes, kernel_size=1)
        nn.init.trunc_normal_(self.head.weight, std=0.01)
        nn.init.zeros_(self.head.bias)

    def forward(self, grid: torch.Tensor, label_size: int) -> torch.Tensor:
        logits = self.head(self.norm(grid))
        return F.interpolate(logits, size=(label_size, label_size), mode="bilinear", align_corners=False)


def token_grid(tokens: torch.Tensor) -> torch.Tensor:
    """Patch tokens ``(B, T, D)`` of a square grid -> ``float32 (B, D, h, w)`` with ``h = w = sqrt(T)``."""
    b, t, d = tokens.shape
    side = int(round(t ** 0.5))
    if side * side != t:
        raise ConfigError(f"{t} patch tokens do not form a square grid; the probe needs square inputs")
    return tokens.float().transpose(1, 2).reshape(b, d, side, side)


def confusion_matrix(pred: torch.Tensor | np.ndarray, target: torch.Tensor | np.ndarray, n_classes: int,
                     ignore_index: int) -> torch.Tensor:
    """``int64 (C, C)``: entry ``[t, p]`` counts pixels of true class t predicted as p; pixels whose target is
    ``ignore_index`` are skipped. ``pred`` and ``target`` are integer maps of the same shape; a target outside
    ``0..C-1`` (other than the ignore index) raises :class:`MorphcacheError`."""
    pred, target = torch.as_tensor(pred).reshape(-1).long(), torch.as_tensor(target).reshape(-1).long()
    if pred.shape != target.shape:
        raise MorphcacheError(f"prediction and target differ in size ({pred.numel()} vs {target.numel()} pixels)")
    keep = target != ignore_index
    pred, target = pred[keep], target[keep]
    if target.numel() and (int(target.min()) < 0 or int(target.max()) >= n_classes):
        raise MorphcacheError(f"target label outside 0..{n_classes - 1} (ignore index {ignore_index})")
    if pred.numel() and (int(pred.min()) < 0 or int(pred.max()) >= n_classes):
        raise MorphcacheError(f"predicted label outside 0..{n_classes - 1}")
    return torch.bincount(target * n_classes + pred, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def segmentation_metrics(cm: torch.Tensor | np.ndarray, classes: tuple[str, ...] | None = None) -> dict:
    """Percent ``miou``, ``pixel_acc``, ``macc`` and ``per_class_iou`` ({name: IoU or None}) of a confusion matrix
    (rows truth, columns prediction). A class absent from both truth and prediction has no IoU (None) and is left
    out of the mean; one that is only predicted has IoU 0 (mmsegmentation's convention). Raises
    :class:`MorphcacheError` when the matrix counts no pixel."""
    cm = torch.as_tensor(cm, dtype=torch.float64)
    total = float(cm.sum())
    if total == 0:
        raise MorphcacheError("no labelled validation pixel (every pixel is the ignore index); check the masks")
    tp = torch.diagonal(cm)
    gt, pr = cm.sum(1), cm.sum(0)
    union = gt + pr - tp
    iou = torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))
    acc = torch.where(gt > 0, tp / gt.clamp(min=1), torch.full_like(tp, float("nan")))
    names = classes or tuple(str(i) for i in range(len(tp)))
    return {
        "miou": 100.0 * float(torch.nanmean(iou)),
        "pixel_acc": 100.0 * float(tp.sum()) / total,
        "macc": 100.0 * float(torch.nanmean(acc)),
        "per_class_iou": {n: (None if torch.isnan(v) else round(100.0 * float(v), 4)) for n, v in zip(names, iou)},
    }


@dataclass
class SplitFeatures:
    """Frozen features of one split: ``tokens float16 (N, T, D')``, ``labels (N, L, L)`` (uint8 when every value
    fits, else int16; ignore index kept), and the first ``images`` uint8 ``(k, S, S, 3)`` as the model saw them."""

    tokens: torch.Tensor
    labels: torch.Tensor
    images: np.ndarray


@torch.no_grad()
def extract_split(backbone, samples: list[SegSample], dataset: SegDataset, layers: int, label_size: int,
                  batch_size: int = 16, precision: str = "fp32", device: str = "cpu", keep_images: int = 0,
                  split: str = "train") -> SplitFeatures:
    """Decode, resize and encode ``samples`` (the ``split`` of ``dataset``) batch by batch: only one batch of
    pixels is in memory at a time."""
    if batch_size <= 0:
        raise ConfigError(f"batch size must be positive, got {batch_size}")
    if not samples:
        raise MorphcacheError(f"{dataset.name}: the {split} split holds no image; check the dataset folder")
    fits8 = max(dataset.n_classes - 1, dataset.ignore_index) <= 255
    label_dtype = torch.uint8 if fits8 else torch.int16
    if max(dataset.n_classes - 1, dataset.ignore_index) > 32767:
        raise ConfigError(f"ignore index {dataset.ignore_index} does not fit int16; use a value below 32768")
    backbone.eval()
    tokens, labels, kept = [], [], []
    with progress_bar(total=len(samples), description=f"tokens {split}", unit="img") as bar:
        for start in range(0, len(samples), batch_size):
            pairs = [load_pair(s, dataset, backbone.img_size, label_size) for s in samples[start:start + batch_size]]
            images = np.stack([p[0] for p in pairs])
            x = prepare_images(images, backbone.img_size, backbone.mean, backbone.std).to(device)
            with autocast_context(precision, device):
                t = backbone.layer_tokens(x, layers)
            tokens.append(t.to("cpu", torch.float16))
            labels.append(torch.from_numpy(np.stack([p[1] for p in pairs])).to(label_dtype))
            if len(kept) * batch_size < keep_images:
                kept.append(images)
            bar.advance(len(pairs))
    shown = np.concatenate(kept)[:keep_images] if kept else np.zeros((0, backbone.img_size, backbone.img_size, 3),
                                                                       np.uint8)
    return SplitFeatures(torch.cat(tokens), torch.cat(labels), shown)


def train_segmentation_probe(tokens: torch.Tensor, labels: torch.Tensor, n_classes: int, ignore_index: int,
                             config: SegProbeConfig = SegProbeConfig(),
                             device: str = "cpu") -> tuple[SegmentationProbe, list[float]]:
    """Train the probe on cached ``tokens (N, T, D)`` and ``labels (N, L, L)``; returns (probe in eval mode, mean
    loss per epoch). The last partial batch of an epoch is dropped (BatchNorm statistics).

    Raises:
        ConfigError: token grids and label maps differ in number.
    """
    if len(tokens) != len(labels) or len(tokens) < 1:
        raise ConfigError(f"segmentation probe needs images with one label map each, got {len(tokens)} and "
                          f"{len(labels)}")
    gen = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
    probe = SegmentationProbe(tokens.shape[-1], n_classes, config.batchnorm).to(device)
    opt = build_probe_optimizer(probe.parameters(), config.optimizer, config.lr, config.weight_decay)
    batch = min(config.batch_size, len(tokens))
    steps_per_epoch = max(1, len(tokens) // batch)
    total = steps_per_epoch * config.epochs
    label_size = labels.shape[-1]
    loss_fn = nn.CrossEntropyLoss(ignore_index=ignore_index)
    losses: list[float] = []
    step = 0
    probe.train()
    for _ in range(config.epochs):
        order = torch.randperm(len(tokens), generator=gen)
        running, counted = 0.0, 0
        for i in range(steps_per_epoch):
            idx = order[i * batch:(i + 1) * batch]
            target = labels[idx].to(device, torch.long)
            for g in opt.param_groups:
                g["lr"] = lr_at(step, total, config.lr, 0.0, 0)
            step += 1
            if not bool((target != ignore_index).any()):
                continue  # nothing labelled in this batch: the mean loss would be NaN
            loss = loss_fn(probe(token_grid(tokens[idx].to(device)), label_size), target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            running += loss.item()
            counted += 1
        losses.append(running / max(1, counted))
    probe.eval()
    return probe, losses


@torch.no_grad()
def evaluate_probe(probe: SegmentationProbe, tokens: torch.Tensor, labels: torch.Tensor, n_classes: int,
                   ignore_index: int, batch_size: int = 16, keep: int = 0,
                   device: str = "cpu") -> tuple[torch.Tensor, np.ndarray]:
    """(confusion matrix ``int64 (C, C)`` over all validation pixels, predicted maps ``int16 (keep, L, L)`` of the
    first ``keep`` images)."""
    probe.eval()
    cm = torch.zeros(n_classes, n_classes, dtype=torch.int64)
    kept = []
    label_size = labels.shape[-1]
    for start in range(0, len(tokens), batch_size):
        logits = probe(token_grid(tokens[start:start + batch_size].to(device)), label_size)
        pred = logits.argmax(1).cpu()
        cm += confusion_matrix(pred, labels[start:start + batch_size].long(), n_classes, ignore_index)
        if start < keep:
            kept.append(pred[:keep - start].to(torch.int16).numpy())
    preds = np.concatenate(kept) if kept else np.zeros((0, label_size, label_size), np.int16)
    return cm, preds


def segmentation_evaluate(backbone, dataset: SegDataset, config: SegProbeConfig = SegProbeConfig(),
                          batch_size: int | None = None, precision: str = "fp32",
                          device: str = "cpu") -> tuple[dict, dict]:
    """Run the whole protocol on ``dataset``. Returns (result row without timestamp, examples) where examples holds
    ``images`` uint8 ``(k, S, S, 3)``, ``labels`` and ``preds`` int16 ``(k, L, L)``, ``classes`` and
    ``ignore_index`` for the report's figure. ``batch_size`` (default ``config.batch_size``) is the feature
    extraction batch."""
    start = time.perf_counter()
    label_size = backbone.img_size if config.label_size is None else config.label_size
    bs = batch_size or config.batch_size
    train = extract_split(backbone, dataset.train, dataset, config.layers, label_size, bs, precision, device,
                          split="train")
    val = extract_split(backbone, dataset.val, dataset, config.layers, label_size, bs, precision, device,
                        keep_images=config.n_examples, split="val")
    probe, losses = train_segmentation_probe(train.tokens, train.labels, dataset.n_classes, dataset.ignore_index,
                                             config, device)
    cm, preds = evaluate_probe(probe, val.tokens, val.labels, dataset.n_classes, dataset.ignore_index,
                               config.batch_size, config.n_examples, device)
    metrics = segmentation_metrics(cm, dataset.classes)
    metrics["train_loss"] = losses[-1]
    grid = int(round(train.tokens.shape[1] ** 0.5))
    cfg = {**config.model_dump(), "img_size": backbone.img_size, "label_size": label_size, "evaluation": "resized",
           "grid": grid, "feature_dim": int(train.tokens.shape[-1]), "precision": precision,
           "n_train": len(dataset.train), "n_test": len(dataset.val), "n_classes": dataset.n_classes,
           "ignore_index": dataset.ignore_index}
    row = {"protocol": "segment", "dataset": dataset.name, "backbone": backbone.spec,
           "backbone_info": backbone.describe(), "config": cfg, "metrics": metrics,
           "seconds": round(time.perf_counter() - start, 3)}
    examples = {"images": val.images, "labels": val.labels[:config.n_examples].to(torch.int16).numpy(),
                "preds": preds, "classes": np.asarray(dataset.classes, dtype=str),
                "ignore_index": np.int64(dataset.ignore_index)}
    return row, examples


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")[:80] or "x"


def save_examples(results_path: str | Path, row: dict, examples: dict) -> Path:
    """Write ``examples`` as ``segment_examples/<backbone>__<dataset>.npz`` beside the results file and record its
    path, relative to the results file's folder, as ``row["examples"]``. Returns the file written."""
    folder = Path(results_path).parent / "segment_examples"
    path = folder / f"{_slug(str(row['backbone']))}__{_slug(str(row['dataset']))}.npz"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(path, **examples)
    except OSError as exc:
        raise MorphcacheError(f"cannot write {path} ({exc.strerror}); pass a writable --results") from None
    row["examples"] = str(path.relative_to(Path(results_path).parent))
    return path


def load_examples(path: str | Path) -> dict:
    """The arrays written by :func:`save_examples` (no pickles)."""
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}
