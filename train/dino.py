"""DINO as a method object: student and EMA teacher (backbone + DINO head), multi-crop, the centred loss.

``DINOLoss`` owns its ``center`` buffer (saved in checkpoints); the teacher temperature, the EMA momentum
and the weight decay come from schedules the loop indexes by global step and hands in through
``set_step`` and ``after_step``; the epochs of the frozen last layer come from
``dino.freeze_last_layer_epochs`` when the method is built. As for every method, the state updates
(teacher EMA, center EMA) happen in ``after_step``, after the optimiser step; the center uses the teacher
outputs of every rank (all-reduce).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from eossl.streaming.inputs import InputSpec
from eossl.streaming.views import ViewConfig

from .backbones import Encoder, build_encoder
from .config import TrainConfig
from .distributed import is_dist
from .method import ClipFn, SSLMethod
from .methods import CONFIG_DEFAULTS
from .schedules import cosine_schedule

__all__ = ["DINO", "DINOHead", "DINOLoss", "build_dino", "dino_schedules", "dino_views"]


class DINOHead(nn.Module):
    """MLP (nlayers, GELU) -> L2-normalised bottleneck -> weight-normalised linear layer to K prototypes."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        hidden: int = 2048,
        bottleneck: int = 256,
        nlayers: int = 3,
        norm_last_layer: bool = True,
    ):
        super().__init__()
        layers: list[nn.Module] = []
        dims = [in_dim] + [hidden] * (max(nlayers, 1) - 1) + [bottleneck]
        for i in range(len(dims) - 1):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < len(dims) - 2:
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        for m in self.mlp.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = weight_norm(nn.Linear(bottleneck, out_dim, bias=False))
        with torch.no_grad():
            self.last_layer.parametrizations.weight.original0.fill_(1.0)  # the norm g
        if norm_last_layer:
            self.last_layer.parametrizations.weight.original0.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(self.mlp(x), dim=-1, p=2)
        return self.last_layer(x)


class DINOLoss(nn.Module):
    """Cross-entropy between the sharpened, centred teacher and the student over crop pairs.

    Every global teacher crop is compared with every student crop except the same view. The center is
    an EMA (``center_momentum``) of the mean teacher output over the global batch of all ranks.
    """

    def __init__(
        self,
        out_dim: int,
        n_crops: int,
        n_global: int,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
    ):
        super().__init__()
        self.n_crops, self.n_global = n_crops, n_global
        self.student_temp, self.center_momentum = student_temp, center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))
        self._pending: list[torch.Tensor] = []  # teacher outputs of the step, for the center update

    def forward(
        self, student_out: torch.Tensor, teacher_out: torch.Tensor, teacher_temp: float
    ) -> torch.Tensor:
        """student_out: (n_crops * B, K); teacher_out: (n_global * B, K) -> scalar loss.

        Computed in float32 with autocast off: under autocast the softmaxes are float32 already, but the
        scaling by the temperatures and the products would otherwise follow the inputs' dtype.
        """
        with torch.autocast(device_type=student_out.device.type, enabled=False):
            student = (student_out.float() / self.student_temp).chunk(self.n_crops)
            teacher_out = teacher_out.detach().float()
            teacher = self.teacher_probs(teacher_out, teacher_temp).chunk(self.n_global)
            total, terms = 0.0, 0
            for iq, q in enumerate(teacher):
                for v, s in enumerate(student):
                    if v == iq:
                        continue
                    total = total + torch.sum(-q * F.log_softmax(s, dim=-1), dim=-1).mean()
                    terms += 1
        self._pending.append(teacher_out)
        return total / terms

    def teacher_probs(self, teacher_out: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        """The centred, sharpened teacher distribution softmax((t - center) / teacher_temp)."""
        return F.softmax((teacher_out.float() - self.center) / teacher_temp, dim=-1)

    @torch.no_grad()
    def collapse_metrics(
        self, student_out: torch.Tensor, teacher_out: torch.Tensor, teacher_temp: float
    ) -> dict[str, torch.Tensor]:
        """What shows a collapse (DINO paper, "Avoiding collapse"): the entropy H(P_t) of the centred,
        sharpened teacher distribution and KL(P_t || P_s) over the loss's crop pairs. A uniform collapse has
        H = log K, a one-prototype collapse H = 0, and either has KL -> 0 (the student copies a constant
        teacher); a healthy run keeps H between the two and KL > 0. The cross-entropy loss is H + KL.
        """
        with torch.autocast(device_type=student_out.device.type, enabled=False):
            teacher = self.teacher_probs(teacher_out.detach(), teacher_temp).chunk(self.n_global)
            log_student = F.log_softmax(student_out.detach().float() / self.student_temp, -1).chunk(
                self.n_crops
            )
            entropies = [-(q * torch.log(q.clamp_min(1e-30))).sum(-1).mean() for q in teacher]
            kl = [
                (q * (torch.log(q.clamp_min(1e-30)) - ls)).sum(-1).mean()
                for iq, q in enumerate(teacher)
                for v, ls in enumerate(log_student)
                if v != iq
            ]
        return {
            "teacher_entropy": torch.stack(entropies).mean(),
            "teacher_student_kl": torch.stack(kl).mean(),
        }

    @torch.no_grad()
    def update_center(self) -> None:
        if not self._pending:
            return
        out = torch.cat(self._pending)
        self._pending.clear()
        total = out.sum(dim=0, keepdim=True)
        count = torch.tensor([out.shape[0]], dtype=total.dtype, device=total.device)
        if is_dist():
            torch.distributed.all_reduce(total)
            torch.distributed.all_reduce(count)
        self.center.mul_(self.center_momentum).add_(total / count, alpha=1 - self.center_momentum)


class _Branch(nn.Module):
    """Backbone + head over a list of crops, one backbone call per crop resolution (DINO's
    MultiCropWrapper)."""

    def __init__(self, encoder: nn.Module, head: DINOHead):
        super().__init__()
        self.encoder, self.head = encoder, head

    def forward(self, crops: list[torch.Tensor]) -> torch.Tensor:
        sizes = torch.tensor([c.shape[-1] for c in crops])
        ends = torch.cumsum(torch.unique_consecutive(sizes, return_counts=True)[1], 0).tolist()
        feats, start = [], 0
        for end in ends:
            feats.append(self.encoder(torch.cat(crops[start:end])))
            start = end
        return self.head(torch.cat(feats))


class DINO(SSLMethod):
    """Student and EMA teacher on multi-crop views; only the ``n_global`` first views reach the teacher."""

    # DINO's ViT-S/16 recipe on S1, declared in the registry so that configs resolve without torch.
    config_defaults: ClassVar[Mapping[str, Any]] = CONFIG_DEFAULTS["dino"]

    def __init__(self, encoder, cfg: TrainConfig, n_global: int, n_crops: int, teacher_encoder=None):
        """``teacher_encoder``: the same architecture as ``encoder`` built without drop-path (its weights
        are overwritten with the student's); None: a copy of ``encoder`` (right when it has no drop-path).
        """
        super().__init__()
        d = cfg.dino
        head = DINOHead(encoder.feature_dim, d.out_dim, d.hidden, d.bottleneck, d.nlayers, d.norm_last_layer)
        self.student = _Branch(encoder, head)
        # The teacher has no drop-path by construction, so it can stay in train mode like the student: its
        # BatchNorms (adapter, ResNet) normalise with batch statistics and update their running statistics
        # from the teacher's own passes (the EMA copies parameters only), as in DINO.
        teacher_encoder = copy.deepcopy(encoder) if teacher_encoder is None else teacher_encoder
        self.teacher = _Branch(teacher_encoder, copy.deepcopy(head))
        self.teacher.load_state_dict(self.student.state_dict())
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.loss_fn = DINOLoss(d.out_dim, n_crops, n_global, d.student_temp, d.center_momentum)
        self.n_global = n_global
        self.teacher_temp = d.teacher_temp
        self.freeze_last_layer_epochs = d.freeze_last_layer_epochs
        self.freeze_last_layer = False

    @classmethod
    def views(cls, cfg: TrainConfig) -> ViewConfig:
        return dino_views(cfg)

    @classmethod
    def build(cls, cfg: TrainConfig, channels: list[int], mode: str) -> DINO:
        return build_dino(cfg, channels, mode)

    @classmethod
    def schedules(cls, cfg: TrainConfig, total_steps: int, steps_per_epoch: int) -> dict[str, np.ndarray]:
        return dino_schedules(cfg, total_steps, steps_per_epoch)

    def compile_target(self) -> nn.Module:
        return self.student  # the teacher (exported) only follows it by EMA

    def param_groups(self) -> list[dict]:
        """Weights are decayed (on the schedule); biases and norm parameters are not (as in DINO)."""
        params = [p for p in self.student.parameters() if p.requires_grad]
        return [
            {"params": [p for p in params if p.ndim > 1]},
            {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0},
        ]

    def set_step(self, values: Mapping[str, float], epoch: int) -> None:
        self.teacher_temp = values["teacher_temp"]
        self.freeze_last_layer = epoch < self.freeze_last_layer_epochs

    def forward(self, views: list[torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        with torch.no_grad():
            teacher_out = self.teacher(views[: self.n_global])  # train mode: batch statistics
        student_out = self.student(views)
        loss = self.loss_fn(student_out, teacher_out, self.teacher_temp)
        # Centred and sharpened with the center the loss used (before this step's center update).
        logs = self.loss_fn.collapse_metrics(student_out, teacher_out, self.teacher_temp)
        return loss, logs

    def clip_gradients(self, clip: ClipFn, max_norm: float) -> None:
        """DINO's rule: the last layer's gradient is cancelled during the frozen epoch(s), then each
        parameter tensor's gradient is scaled to norm at most ``max_norm`` (``optim.clip_grad``, 3.0)
        separately, by min(1, max_norm / (norm + 1e-6)); 0 disables clipping. A global norm would shrink
        every update of a ViT-S by the norm of all its tensors together."""
        self.before_optimizer_step()
        if max_norm > 0:
            for p in self.student.parameters():
                if p.grad is not None:
                    clip([p], max_norm)

    def before_optimizer_step(self) -> None:
        """During the first epoch(s) the last layer is not updated (stabilises the start, as in DINO)."""
        if self.freeze_last_layer:
            for p in self.student.head.last_layer.parameters():
                p.grad = None

    @torch.no_grad()
    def after_step(self, values: Mapping[str, float]) -> None:
        """Teacher EMA (``values["momentum"]``), then the center EMA."""
        momentum = values["momentum"]
        for ps, pt in zip(self.student.parameters(), self.teacher.parameters(), strict=True):
            pt.mul_(momentum).add_(ps.detach(), alpha=1 - momentum)
        self.loss_fn.update_center()

    def discard_pending(self) -> None:
        self.loss_fn._pending.clear()

    def backbone(self):
        return self.teacher.encoder  # DINO evaluates the teacher


def dino_views(cfg: TrainConfig) -> ViewConfig:
    lc = cfg.loader
    inputs = InputSpec.parse(lc.sensors, lc.s2_bands)
    return ViewConfig(
        mode="multicrop",
        inputs=inputs,
        augment=lc.augment_config(),
        global_size=lc.size,
        n_local=lc.n_local,
        local_size=lc.local_size,
    )


def build_dino(cfg: TrainConfig, channels: list[int], mode: str) -> DINO:
    if mode != "multicrop":
        raise ValueError(f"DINO trains on multi-crop views; loader.mode is {mode!r}")
    student = _dino_encoder(cfg, channels[0], cfg.dino.drop_path)
    teacher = _dino_encoder(cfg, channels[0], 0.0)  # no drop-path: the teacher runs in train mode
    n_global = 2
    return DINO(student, cfg, n_global=n_global, n_crops=len(channels), teacher_encoder=teacher)


def _dino_encoder(cfg: TrainConfig, channels: int, drop_path: float) -> Encoder:
    """A ViT takes crops of every size (``dynamic_img_size``); a CNN (no such argument) takes any size."""
    try:
        return build_encoder(
            cfg.backbone, {"input": channels}, dynamic_img_size=True, drop_path_rate=drop_path
        )
    except TypeError:
        return build_encoder(cfg.backbone, {"input": channels}, drop_path_rate=drop_path)


def dino_schedules(cfg: TrainConfig, total_steps: int, steps_per_epoch: int) -> dict[str, np.ndarray]:
    d = cfg.dino
    warm = min(d.warmup_teacher_temp_epochs * steps_per_epoch, total_steps)
    temp = np.concatenate(
        [
            np.linspace(d.warmup_teacher_temp, d.teacher_temp, warm),
            np.full(total_steps - warm, d.teacher_temp),
        ]
    )
    return {
        "momentum": cosine_schedule(d.momentum_teacher, 1.0, total_steps),
        "teacher_temp": temp,
        "weight_decay": cosine_schedule(cfg.optim.weight_decay, d.weight_decay_end, total_steps),
    }
