"""Segmentation heads on an evaluation encoder: a linear head on the last feature map, and light decoders.

Feature maps come from timm's ``forward_intermediates`` behind the encoder's adapter, so one path serves
ViTs (patch tokens after the final norm as a (D, H/p, W/p) map) and CNNs (the last four stages, strides
4 to 32 on a ResNet). Heads:

- ``LinearHead`` (the frozen-feature protocol): BatchNorm without affine parameters, then a 1x1 conv on
  the last map, logits upsampled bilinearly to the input. At inference BN is a fixed per-channel affine,
  so the head is a linear function of each token's features (the standardisation the linear probe of
  scene classification does, learnt from batch statistics).
- ``ProgressiveUpsamplingHead`` (ViT, after SETR-PUP): log2(patch) stages of 3x3 conv-BN-ReLU and x2
  bilinear upsampling, narrowing from ``width`` to ``width / 4``; then a 1x1 classifier.
- ``FPNHead`` (CNN): 1x1 laterals to ``width`` channels, a top-down path (x2 upsampling + add), a 3x3
  conv-BN-ReLU on the finest level (stride 4), a 1x1 classifier and bilinear upsampling to the input.
"""

from __future__ import annotations

import math

import timm
import torch
import torch.nn.functional as F
from torch import nn

from eossl.train.vit import is_vit

from ..models import EvalEncoder

__all__ = ["HEADS", "FPNHead", "LinearHead", "ProgressiveUpsamplingHead", "Segmenter", "build_segmenter"]

HEADS = ("linear", "decoder")


def _conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
    )


class LinearHead(nn.Module):
    def __init__(self, channels: int, n_classes: int):
        super().__init__()
        self.norm = nn.BatchNorm2d(channels, affine=False)
        self.classifier = nn.Conv2d(channels, n_classes, 1)

    def forward(self, feats: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        logits = self.classifier(self.norm(feats[-1]))  # (B, K, h, w)
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


class ProgressiveUpsamplingHead(nn.Module):
    def __init__(self, channels: int, n_classes: int, stride: int, width: int = 128):
        super().__init__()
        stages, cin = [], channels
        for i in range(max(int(math.log2(stride)), 1)):
            cout = max(width >> min(i, 2), 16)  # width, width/2, width/4, width/4, ...
            stages.append(_conv_bn_relu(cin, cout))
            cin = cout
        self.stages = nn.ModuleList(stages)
        self.classifier = nn.Conv2d(cin, n_classes, 1)

    def forward(self, feats: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        x = feats[-1]
        for stage in self.stages:
            x = F.interpolate(stage(x), scale_factor=2, mode="bilinear", align_corners=False)
        # x: (B, width/4, H, W) when the patch size is a power of two
        return F.interpolate(self.classifier(x), size=size, mode="bilinear", align_corners=False)


class FPNHead(nn.Module):
    def __init__(self, channels: list[int], n_classes: int, width: int = 128):
        super().__init__()
        self.laterals = nn.ModuleList(nn.Conv2d(c, width, 1) for c in channels)
        self.smooth = _conv_bn_relu(width, width)
        self.classifier = nn.Conv2d(width, n_classes, 1)

    def forward(self, feats: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        x = self.laterals[-1](feats[-1])
        for lateral, f in zip(self.laterals[-2::-1], feats[-2::-1], strict=True):  # coarse -> fine
            x = lateral(f) + F.interpolate(x, size=f.shape[-2:], mode="nearest")
        # x: (B, width, H/4, W/4) on a ResNet
        return F.interpolate(self.classifier(self.smooth(x)), size=size, mode="bilinear", align_corners=False)


def _dynamic_vit(ev: EvalEncoder) -> None:
    """A ViT built for one image size (random init, or a card without timm_kwargs) is rebuilt with
    ``dynamic_img_size=True`` and the same weights: position embeddings are then interpolated per forward
    from the stored ones, so 64 px training crops and 256 px evaluation patches share the weights
    losslessly."""
    backbone = ev.encoder.backbone
    if getattr(backbone, "dynamic_img_size", True):
        return
    name = backbone.pretrained_cfg.get("architecture") or ev.encoder.cfg.name
    rebuilt = timm.create_model(
        name,
        pretrained=False,
        num_classes=0,
        in_chans=ev.encoder.in_chans,
        dynamic_img_size=True,
        weight_init="skip",
    )  # weights are loaded next
    rebuilt.load_state_dict(backbone.state_dict())
    ev.encoder.backbone = rebuilt


class Segmenter(nn.Module):
    """Encoder + head: ``forward(x)`` with a dataset-standardised (B, C, H, W) input -> (B, K, H, W) logits.

    With ``frozen`` the encoder runs in eval mode under ``no_grad`` (BatchNorm statistics included) and
    its parameters do not require gradients; ``train()`` keeps it in eval mode.
    """

    def __init__(self, ev: EvalEncoder, head: nn.Module, frozen: bool):
        super().__init__()
        self.ev = ev
        self.encoder = ev.encoder
        self.head = head
        self.frozen = frozen
        backbone = ev.encoder.backbone
        if is_vit(backbone):
            self._indices: int | list[int] = 1
            self._kwargs = {"norm": True, "output_fmt": "NCHW"}
        else:
            n = len(backbone.feature_info)
            self._indices = list(range(max(n - 4, 0), n))
            self._kwargs = {}
        if frozen:
            for p in self.encoder.parameters():
                p.requires_grad_(False)
            self.encoder.eval()

    def train(self, mode: bool = True) -> Segmenter:
        super().train(mode)
        if self.frozen:
            self.encoder.eval()
        return self

    def feature_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        xin = self.encoder.adapt(self.ev.prepare(x), self.ev.sensor)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            return self.encoder.backbone.forward_intermediates(
                xin, indices=self._indices, intermediates_only=True, **self._kwargs
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.feature_maps(x), tuple(x.shape[-2:]))


def build_segmenter(ev: EvalEncoder, n_classes: int, head: str, frozen: bool, width: int = 128) -> Segmenter:
    """The model of one cell: ``head`` 'linear' (LinearHead) or 'decoder' (PUP on a ViT, FPN on a CNN)."""
    if head not in HEADS:
        raise ValueError(f"head must be one of {HEADS}, got {head!r}")
    backbone = ev.encoder.backbone
    vit = is_vit(backbone)
    if vit:
        _dynamic_vit(ev)
        backbone = ev.encoder.backbone
        channels, stride = [backbone.num_features], backbone.patch_embed.patch_size[0]
    else:
        info = backbone.feature_info[-4:]
        channels, stride = [f["num_chs"] for f in info], info[-1]["reduction"]
    if head == "linear":
        module: nn.Module = LinearHead(channels[-1], n_classes)
    elif vit:
        module = ProgressiveUpsamplingHead(channels[-1], n_classes, stride, width)
    else:
        module = FPNHead(channels, n_classes, width)
    return Segmenter(ev, module, frozen)
