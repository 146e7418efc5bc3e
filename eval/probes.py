"""The three training regimes of an evaluation cell: linear probe, k-NN (``knn``), fine-tuning.

Linear probe and k-NN work on features extracted once (the backbone is frozen: features are cached and
the backbone's weights are checked unchanged afterwards). Fine-tuning trains every layer plus a linear
head. All return per-sample scores on the test set: class probabilities (single-label) or per-class
probabilities (multi-label).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn

from eossl.streaming.torch_workers import torch_loader
from eossl.train.progress import Countdown, log_line

from .config import ProbeConfig
from .knn import knn_scores
from .models import EvalEncoder

__all__ = ["ProbeConfig", "extract_features", "finetune", "knn_scores", "linear_probe"]


@torch.no_grad()
def extract_features(
    model: EvalEncoder, dataset, cfg: ProbeConfig, acc: Accelerator
) -> tuple[np.ndarray, np.ndarray]:
    """(features (N, D) float32, labels) of a dataset, in dataset order, backbone in eval mode."""
    model.encoder.eval().to(acc.device)
    feats, labels = [], []
    for batch in torch_loader(dataset, batch_size=cfg.batch_size, workers=cfg.workers, shuffle=False):
        with acc.autocast():
            feats.append(model.features(batch["x"].to(acc.device)).float().cpu())
        labels.append(batch["y"])
    return torch.cat(feats).numpy(), torch.cat(labels).numpy()


def _standardise(train: np.ndarray, test: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    mean, std = train.mean(0, keepdims=True), train.std(0, keepdims=True) + 1e-6
    return torch.from_numpy((train - mean) / std).float(), torch.from_numpy((test - mean) / std).float()


def linear_probe(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    n_classes: int,
    multilabel: bool,
    cfg: ProbeConfig,
    seed: int,
) -> np.ndarray:
    """Logistic regression (softmax or per-class sigmoid) on standardised features; returns test scores."""
    torch.manual_seed(seed)
    xtr, xte = _standardise(train_x, test_x)
    head = nn.Linear(xtr.shape[1], n_classes)
    ytr = torch.from_numpy(train_y)
    opt = torch.optim.LBFGS(
        head.parameters(), lr=1.0, max_iter=cfg.linear_epochs, history_size=20, line_search_fn="strong_wolfe"
    )

    def closure():
        opt.zero_grad()
        logits = head(xtr)
        loss = (
            F.binary_cross_entropy_with_logits(logits, ytr.float())
            if multilabel
            else F.cross_entropy(logits, ytr.long())
        )
        loss = loss + cfg.linear_weight_decay * head.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        logits = head(xte)
        return (torch.sigmoid(logits) if multilabel else torch.softmax(logits, dim=1)).numpy()


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Flips and 90-degree rotations per batch (overhead imagery has no canonical orientation)."""
    if torch.rand(1, generator=gen) < 0.5:
        x = x.flip(3)
    if torch.rand(1, generator=gen) < 0.5:
        x = x.flip(2)
    return torch.rot90(x, int(torch.randint(0, 4, (1,), generator=gen)), dims=(2, 3))


def finetune(
    model: EvalEncoder,
    train_set,
    test_set,
    n_classes: int,
    multilabel: bool,
    cfg: ProbeConfig,
    seed: int,
    acc: Accelerator,
) -> np.ndarray:
    """Train all layers and a linear head; returns test scores."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    device = acc.device
    enc = model.encoder.to(device)
    head = nn.Linear(enc.feature_dim, n_classes).to(device)
    params = [p for p in [*enc.parameters(), *head.parameters()] if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.finetune_lr, weight_decay=cfg.finetune_weight_decay)
    loader = torch_loader(
        train_set,
        batch_size=cfg.batch_size,
        workers=cfg.workers,
        shuffle=True,
        generator=gen,
        drop_last=len(train_set) > cfg.batch_size,
    )
    countdown = Countdown(cfg.finetune_epochs)
    for epoch in range(cfg.finetune_epochs):
        enc.train()
        losses = []
        for batch in loader:
            x = _augment(batch["x"].to(device), gen)
            y = batch["y"].to(device)
            with acc.autocast():
                logits = head(model.features(x)).float()
            loss = (
                F.binary_cross_entropy_with_logits(logits, y.float())
                if multilabel
                else F.cross_entropy(logits, y.long())
            )
            opt.zero_grad()
            acc.backward(loss)
            opt.step()
            losses.append(loss.item())
        countdown.advance()
        if acc.is_main_process:
            log_line(
                f"  fine-tune seed {seed} epoch {epoch + 1}/{cfg.finetune_epochs}: loss "
                f"{np.mean(losses) if losses else float('nan'):.4f}, ETA {countdown.eta()}"
            )
    enc.eval()
    scores = []
    with torch.no_grad():
        for batch in torch_loader(test_set, batch_size=cfg.batch_size, workers=cfg.workers):
            with acc.autocast():
                logits = head(model.features(batch["x"].to(device))).float()
            scores.append((torch.sigmoid(logits) if multilabel else torch.softmax(logits, 1)).cpu())
    return torch.cat(scores).numpy()
