"""Encoders: a timm backbone (``num_classes=0``: pooled features) behind an input adapter.

timm is used instead of hand-written networks because every CNN and ViT it has adapts its first layer to
any channel count (``in_chans``) and exposes pooled features the same way, so the study's comparisons
(native channels vs a 1x1 adapter vs zero padding) are a config switch, and the saved backbone loads with
``timm.create_model(name, in_chans=C)`` in other code.
"""

from __future__ import annotations

import timm
import torch
from torch import nn

from .config import BackboneConfig

__all__ = ["ChannelAdapter", "Encoder", "build_encoder"]


class ChannelAdapter(nn.Module):
    """1x1 conv + BN + ReLU: C sensor channels -> ``out`` channels an RGB-shaped backbone expects."""

    def __init__(self, in_channels: int, out_channels: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))

    def freeze(self) -> None:
        """Fix weights *and* BN statistics (eval mode is re-applied by Encoder.train)."""
        for p in self.parameters():
            p.requires_grad_(False)
        self.frozen = True


class Encoder(nn.Module):
    """Adapter(s) + backbone. ``forward(x, sensor)`` picks the adapter of ``sensor`` in multi-sensor setups.

    Attributes:
        adapters: sensor name -> adapter module ('conv1x1'); empty for 'native' and 'zeropad'.
        backbone: the timm model returning pooled features.
        feature_dim: size of the pooled features.
        in_chans: channels the backbone's first layer takes.
    """

    def __init__(self, cfg: BackboneConfig, channels: dict[str, int], **timm_kwargs):
        super().__init__()
        self.cfg = cfg
        self.channels = dict(channels)
        self.adapters = nn.ModuleDict()
        if cfg.adapter == "native":
            if len(set(channels.values())) != 1:
                raise ValueError(
                    f"adapter 'native' needs one channel count, got {channels}: use 'conv1x1' (one adapter "
                    "per sensor) or 'zeropad' for sensor pairs"
                )
            in_chans = next(iter(channels.values()))
        elif cfg.adapter == "zeropad":
            if max(channels.values()) > cfg.pad_channels:
                raise ValueError(f"zeropad to {cfg.pad_channels} channels cannot hold inputs of {channels}")
            in_chans = cfg.pad_channels
        else:
            in_chans = cfg.adapter_channels
            for sensor, c in channels.items():
                self.adapters[sensor] = ChannelAdapter(c, cfg.adapter_channels)
            if cfg.adapter_mode == "frozen":
                for adapter in self.adapters.values():
                    adapter.freeze()
        self.in_chans = in_chans
        try:
            self.backbone = timm.create_model(
                cfg.name, pretrained=False, num_classes=0, in_chans=in_chans, **timm_kwargs
            )
        except RuntimeError as exc:  # timm's "Unknown model"
            raise ValueError(f"backbone {cfg.name!r}: {exc}") from exc
        self.feature_dim = self.backbone.num_features
        # What a user needs besides in_chans to rebuild the backbone (recorded in the model card).
        self.timm_kwargs = {k: v for k, v in timm_kwargs.items() if k == "dynamic_img_size"}

    def train(self, mode: bool = True) -> Encoder:
        super().train(mode)
        for adapter in self.adapters.values():  # frozen adapters keep their BN statistics
            if getattr(adapter, "frozen", False):
                adapter.eval()
        return self

    def adapt(self, x: torch.Tensor, sensor: str | None = None) -> torch.Tensor:
        if self.cfg.adapter == "conv1x1":
            key = sensor if sensor is not None else next(iter(self.adapters))
            return self.adapters[key](x)
        if self.cfg.adapter == "zeropad" and x.shape[1] < self.in_chans:
            pad = x.new_zeros(x.shape[0], self.in_chans - x.shape[1], *x.shape[2:])
            return torch.cat([x, pad], dim=1).contiguous(memory_format=torch.channels_last)
        return x

    def forward(self, x: torch.Tensor, sensor: str | None = None) -> torch.Tensor:
        return self.backbone(self.adapt(x, sensor))


def build_encoder(cfg: BackboneConfig, channels: dict[str, int], **timm_kwargs) -> Encoder:
    """Encoder for inputs with ``channels`` (sensor or view name -> channel count); extra timm arguments
    (``dynamic_img_size`` for ViTs fed multi-crop views, ``drop_path_rate``) go to ``timm.create_model``."""
    return Encoder(cfg, channels, **timm_kwargs)
