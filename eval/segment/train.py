"""Training a segmentation head (and, fine-tuning, the encoder) and predicting hold-out maps.

One loop for both protocols; what differs is the model (``heads.build_segmenter``: frozen or not, linear
head or decoder). Per step, in order: learning rate from the cosine schedule precomputed for the run ->
joint augmentation of input and target -> autocast forward -> class-weighted cross-entropy (ignore index
255) -> backward -> AdamW step.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn

from eossl.streaming.torch_workers import torch_loader
from eossl.train.progress import Countdown, log_line
from eossl.train.schedules import cosine_schedule

from ..config import SegTrainConfig
from .data import IGNORE_INDEX
from .heads import Segmenter

__all__ = ["SegTrainConfig", "augment_pair", "predict", "train_segmenter"]


def augment_pair(
    x: torch.Tensor, y: torch.Tensor, gen: torch.Generator, crop: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """One random crop, flips and 90-degree rotation for inputs (B, C, H, W) and targets (B, H, W) alike."""
    h, w = x.shape[-2:]
    if 0 < crop < min(h, w):
        i = int(torch.randint(0, h - crop + 1, (1,), generator=gen))
        j = int(torch.randint(0, w - crop + 1, (1,), generator=gen))
        x, y = x[..., i : i + crop, j : j + crop], y[..., i : i + crop, j : j + crop]
    if torch.rand(1, generator=gen) < 0.5:
        x, y = x.flip(-1), y.flip(-1)
    if torch.rand(1, generator=gen) < 0.5:
        x, y = x.flip(-2), y.flip(-2)
    k = int(torch.randint(0, 4, (1,), generator=gen))
    return torch.rot90(x, k, dims=(-2, -1)), torch.rot90(y, k, dims=(-2, -1))


def train_segmenter(
    model: Segmenter | nn.Module,
    train_set,
    weights: np.ndarray,
    cfg: SegTrainConfig,
    seed: int,
    acc: Accelerator,
) -> list[float]:
    """Train ``model`` (``forward(x) -> (B, K, H, W)`` logits) in place; returns the per-step losses.

    Parameters under ``model.encoder`` train at ``lr * backbone_lr_scale``, all others at ``lr``; frozen
    parameters (``requires_grad`` False) are not optimised.
    """
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    device = acc.device
    model.to(device)
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in params if not n.startswith("encoder.")], "scale": 1.0}]
    enc = [p for n, p in params if n.startswith("encoder.")]
    if enc:
        groups.append({"params": enc, "scale": cfg.backbone_lr_scale})
    opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    loader = torch_loader(
        train_set,
        batch_size=cfg.batch_size,
        workers=cfg.workers,
        shuffle=True,
        generator=gen,
        drop_last=len(train_set) > cfg.batch_size,
    )
    schedule = cosine_schedule(cfg.lr, 0.0, cfg.epochs * len(loader))  # the training loop's schedule
    class_w = torch.as_tensor(weights, dtype=torch.float32, device=device)
    losses, step = [], 0
    countdown = Countdown(cfg.epochs)
    for epoch in range(cfg.epochs):
        model.train()
        first = len(losses)
        for batch in loader:
            for g in opt.param_groups:
                g["lr"] = float(schedule[step]) * g["scale"]
            x, y = augment_pair(batch["x"], batch["y"], gen, cfg.crop)
            x, y = x.to(device), y.to(device)
            with acc.autocast():
                logits = model(x).float()
            # logits: (B, K, h, w); y: (B, h, w) class indices or IGNORE_INDEX
            loss = F.cross_entropy(logits, y, weight=class_w, ignore_index=IGNORE_INDEX)
            if not torch.isfinite(loss):  # a crop with only ignored pixels: nothing to learn from
                step += 1
                continue
            opt.zero_grad(set_to_none=True)
            acc.backward(loss)
            opt.step()
            losses.append(loss.item())
            step += 1
        countdown.advance()
        if acc.is_main_process:
            epoch_losses = losses[first:]
            log_line(
                f"  segmenter seed {seed} epoch {epoch + 1}/{cfg.epochs}: loss "
                f"{np.mean(epoch_losses) if epoch_losses else float('nan'):.4f}, ETA {countdown.eta()}"
            )
    model.eval()
    return losses


@torch.no_grad()
def predict(
    model: Segmenter | nn.Module, dataset, batch_size: int, acc: Accelerator, workers: int = 0
) -> Iterator[tuple[dict, np.ndarray]]:
    """Yield (item without x, predicted class map (H, W) uint8) for every patch, in dataset order."""
    model.eval().to(acc.device)
    for batch in torch_loader(dataset, batch_size=batch_size, workers=workers, shuffle=False):
        with acc.autocast():
            pred = model(batch["x"].to(acc.device)).float().argmax(1).to(torch.uint8).cpu().numpy()
        for i in range(len(pred)):
            yield {k: v[i] for k, v in batch.items() if k != "x"}, pred[i]
