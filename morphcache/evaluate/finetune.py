"""Full fine-tuning of a backbone on a labelled dataset (BEiT / MAE recipe, CPU-sized defaults).

Model: backbone pooled features ``(B, F)`` -> ``LayerNorm`` (MAE's ``fc_norm``) -> ``Linear`` to the classes.
Optimisation: AdamW with layer-wise lr decay (timm's ``param_groups_layer_decay`` on timm models: block ``i`` of
``L`` gets ``lr * decay ** (L + 1 - i)``; the new head gets ``lr``), weight decay on matrices only, drop path
rising linearly over the blocks, label smoothing, linear warmup then cosine decay. Augmentation: random resized
crop (scale 0.35-1) and horizontal flip, applied to uint8 images before normalisation. The backbone is copied,
so the caller's model is untouched.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from morphcache.errors import ConfigError
from morphcache.evaluate.features import autocast_context, map_batches, prepare_images
from morphcache.evaluate.knn import topk_accuracy
from morphcache.evaluate.settings import FinetuneConfig
from morphcache.progress import progress_bar
from morphcache.train.schedule import lr_at


class Classifier(nn.Module):
    """``x (B, 3, S, S) -> logits (B, C)``: backbone features, LayerNorm, linear head."""

    def __init__(self, backbone: nn.Module, in_features: int, n_classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.fc_norm = nn.LayerNorm(in_features)
        self.head = nn.Linear(in_features, n_classes)
        nn.init.trunc_normal_(self.head.weight, std=2e-5)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.fc_norm(self.backbone(x)))


def set_drop_path(module: nn.Module, rate: float) -> bool:
    """Set stochastic depth on a timm ViT's ``blocks`` (rate rising linearly to ``rate``); False if unsupported."""
    from timm.layers import DropPath

    blocks = getattr(module, "blocks", None)
    if blocks is None or not all(hasattr(b, "drop_path1") for b in blocks):
        return False
    n = len(blocks)
    for i, block in enumerate(blocks):
        r = rate * i / max(n - 1, 1)
        for name in ("drop_path1", "drop_path2"):
            if hasattr(block, name):
                setattr(block, name, DropPath(r) if r > 0 else nn.Identity())
    return True


def param_groups(model: Classifier, config: FinetuneConfig) -> tuple[list[dict], bool]:
    """AdamW parameter groups with ``lr_scale``; second value says whether layer decay was applied."""
    groups: list[dict] = []
    inner = model.backbone.module
    layered = hasattr(inner, "group_matcher") and config.layer_decay < 1.0
    if layered:
        from timm.optim import param_groups_layer_decay

        groups = param_groups_layer_decay(inner, weight_decay=config.weight_decay, layer_decay=config.layer_decay,
                                          no_weight_decay_list=tuple(getattr(inner, "no_weight_decay", set)()))
    else:
        params = [p for p in inner.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.ndim > 1], "weight_decay": config.weight_decay, "lr_scale": 1.0},
                  {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0, "lr_scale": 1.0}]
    groups.append({"params": list(model.head.parameters()) + list(model.fc_norm.parameters()),
                   "weight_decay": 0.0, "lr_scale": 1.0})
    return [g for g in groups if g["params"]], layered


def augment_batch(images: np.ndarray, size: int, config: FinetuneConfig, rng: np.random.Generator) -> np.ndarray:
    """uint8 ``(B, H, W, 3)`` -> uint8 ``(B, size, size, 3)``: random resized crop (aspect 3/4-4/3) and flip."""
    out = np.empty((len(images), size, size, 3), dtype=np.uint8)
    h, w = images.shape[1:3]
    for i, img in enumerate(images):
        area = h * w * rng.uniform(config.crop_scale, 1.0)
        ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        ch = int(min(h, max(1, round(math.sqrt(area / ratio)))))
        cw = int(min(w, max(1, round(math.sqrt(area * ratio)))))
        top, left = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        crop = torch.from_numpy(np.ascontiguousarray(img[top:top + ch, left:left + cw])).permute(2, 0, 1)[None]
        crop = F.interpolate(crop.float(), size=(size, size), mode="bilinear", align_corners=False,
                             antialias=ch > size or cw > size)
        crop = crop[0].permute(1, 2, 0).round().clamp(0, 255).byte().numpy()
        out[i] = crop[:, ::-1] if rng.random() < config.hflip else crop
    return out


@dataclass
class FinetuneResult:
    """``metrics`` (JSON-able), the fine-tuned ``model`` (:class:`Classifier`) and the per-step ``losses``."""

    metrics: dict
    model: Classifier
    losses: list[float]


def finetune(backbone, data, config: FinetuneConfig = FinetuneConfig(), device: str = "cpu",
             eval_batch_size: int = 64) -> FinetuneResult:
    """Fine-tune a copy of ``backbone`` on ``data.train_*``, evaluate on ``data.test_*``.

    Metrics: ``top1`` (and ``top5`` with > 5 classes) in percent, ``steps``, ``first_loss``, ``train_loss`` (mean
    of the last 10 steps), ``layer_decay_applied``, ``drop_path_applied``.

    Raises:
        ConfigError: non-positive epochs, batch size or lr.
    """
    if config.epochs <= 0 or config.batch_size <= 0 or config.lr <= 0:
        raise ConfigError(f"fine-tuning needs positive epochs, batch size and lr, got {config}")
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    net = copy.deepcopy(backbone)
    drop_applied = set_drop_path(net.module, config.drop_path) if config.drop_path > 0 else False
    for p in net.module.parameters():
        p.requires_grad_(True)
    with torch.no_grad():
        probe = prepare_images(data.train_images[:2], net.img_size, net.mean, net.std)
        width = net.eval()(probe).shape[1]
    model = Classifier(net, width, data.n_classes).to(device)
    groups, layered = param_groups(model, config)
    opt = torch.optim.AdamW(groups, lr=config.lr)
    n = len(data.train_images)
    batch = min(config.batch_size, n)
    steps_per_epoch = max(1, n // batch)
    total = steps_per_epoch * config.epochs
    if config.max_steps is not None:
        total = max(1, min(total, config.max_steps))
    warmup = int(total * config.warmup_fraction)
    labels = torch.as_tensor(np.asarray(data.train_labels), dtype=torch.long)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    losses: list[float] = []
    model.train()
    with progress_bar(total=total, description="finetune", unit="steps") as bar:
        step = 0
        while step < total:
            order = rng.permutation(n)
            for i in range(steps_per_epoch):
                if step >= total:
                    break
                idx = np.sort(order[i * batch:(i + 1) * batch])
                lr = lr_at(step, total, config.lr, config.min_lr, warmup)
                for g in opt.param_groups:
                    g["lr"] = lr * g.get("lr_scale", 1.0)
                x = prepare_images(augment_batch(data.train_images[idx], net.img_size, config, rng),
                                   net.img_size, net.mean, net.std).to(device)
                with autocast_context(config.precision, device):
                    loss = loss_fn(model(x).float(), labels[idx].to(device))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(loss.item())
                step += 1
                bar.advance(1, loss=f"{losses[-1]:.3f}")
    model.eval()
    logits = map_batches(model, data.test_images, net.img_size, net.mean, net.std, eval_batch_size,
                         config.precision, "finetune eval", device)
    metrics = topk_accuracy(logits, data.test_labels)
    metrics.update(steps=len(losses), first_loss=losses[0], train_loss=float(np.mean(losses[-10:])),
                   layer_decay_applied=layered, drop_path_applied=drop_applied)
    return FinetuneResult(metrics, model, losses)

