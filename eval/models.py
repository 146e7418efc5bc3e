"""Encoders for evaluation: random initialisation, or a pre-trained run's backbone (and adapter).

A pre-training run exports ``RUN_DIR/backbone/`` (weights + model card). The card says which channels,
in which order and with which normalisation each adapter key expects; an evaluation input is placed into
that layout (channels the model knows but the input lacks are zero, i.e. the band mean, as in the
partial-fusion training mode), so a fusion model is evaluated on S1 alone, S2 alone or both.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from eossl.train.backbones import Encoder, build_encoder
from eossl.train.config import BackboneConfig
from eossl.train.export import read_model_card

from .config import INITS

__all__ = ["INITS", "EvalEncoder", "build_eval_encoder"]


class NotApplicable(ValueError):
    """This (model, input) cell cannot be evaluated, with the reason for the results table."""


@dataclass
class EvalEncoder:
    """An encoder plus how to feed it an evaluation input.

    Attributes:
        encoder: the module (features out).
        sensor: adapter key to call the encoder with (None for native/zeropad).
        layout: channel names the encoder's input has, in order.
        index: for each layout channel, its index in the evaluation input, or -1 (filled with zero).
        renorm_scale, renorm_shift: per-layout-channel affine from the dataset's normalisation to the
            model card's (identity for random init or channels the card does not know).
    """

    encoder: Encoder
    sensor: str | None
    layout: list[str]
    index: np.ndarray
    renorm_scale: torch.Tensor
    renorm_shift: torch.Tensor

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_eval, H, W) dataset-normalised input -> the encoder's (B, C_layout, H, W) input."""
        idx = torch.as_tensor(self.index, device=x.device)
        out = torch.zeros(x.shape[0], len(self.layout), *x.shape[2:], dtype=x.dtype, device=x.device)
        have = idx >= 0
        out[:, have] = x[:, idx[have]]
        out = (
            out * self.renorm_scale.to(x.device)[None, :, None, None]
            + self.renorm_shift.to(x.device)[None, :, None, None]
        )
        out[:, ~have] = 0.0
        return out.contiguous(memory_format=torch.channels_last)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(self.prepare(x), self.sensor)


def _layouts(card: dict) -> dict[str | None, list[str]]:
    """Adapter key -> channel names, from a model card."""
    views = card["inputs"]
    adapter = card["adapter"]
    if adapter["type"] != "conv1x1":
        return {None: views["view0"]["channels"]}
    keys = list(adapter["channels"])
    if keys == ["s1", "s2"]:  # sensor pairs: view 0 is S1, view 1 is S2
        return {"s1": views["view0"]["channels"], "s2": views["view1"]["channels"]}
    return {keys[0]: views["view0"]["channels"]}


def _card_stats(card: dict) -> dict[str, tuple[float, float]]:
    stats = {}
    for view in card["inputs"].values():
        for name, m, s in zip(view["channels"], view["mean"], view["std"], strict=True):
            stats[name] = (m, s)
    return stats


def build_eval_encoder(
    init: str,
    channels: list[str],
    mean: np.ndarray,
    std: np.ndarray,
    run_dir: str | None = None,
    backbone: str = "resnet50",
) -> EvalEncoder:
    """The encoder of one evaluation cell.

    Args:
        init: one of INITS.
        channels: evaluation input channel names (InputSpec.channel_names).
        mean, std: the dataset normalisation of those channels (the input comes standardised with them).
        run_dir: pre-training run folder (for the checkpoint inits).
        backbone: timm model for ``random``.

    Raises:
        NotApplicable: the model has no input layout that holds these channels.
    """
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    ident = (torch.ones(len(channels)), torch.zeros(len(channels)))
    if init == "random":
        enc = build_encoder(BackboneConfig(name=backbone), {"input": len(channels)})
        return EvalEncoder(enc, None, list(channels), np.arange(len(channels)), *ident)
    if run_dir is None:
        raise ValueError(f"init {init!r} needs a pre-training run folder")
    folder = Path(run_dir) / "backbone"
    card = read_model_card(run_dir)
    layouts = _layouts(card)
    adapter = card["adapter"]
    if init == "checkpoint-backbone-only" and adapter["type"] == "conv1x1":
        layouts = {None: ["s2:B4", "s2:B3", "s2:B2"][: card["in_chans"]]}
        cfg = BackboneConfig(name=card["timm_model"], adapter="native")
        key_channels = {"input": card["in_chans"]}
    else:
        cfg = BackboneConfig(
            name=card["timm_model"],
            adapter=adapter["type"],
            adapter_mode="trainable",
            adapter_channels=adapter["out_channels"],
            pad_channels=card["in_chans"] if adapter["type"] == "zeropad" else 15,
        )
        key_channels = adapter["channels"]
    wanted = set(channels)
    fits = [k for k, names in layouts.items() if wanted <= set(names)]
    if not fits:
        raise NotApplicable(
            f"{card['timm_model']} from {run_dir} takes {sorted(layouts.items(), key=str)}; "
            f"no layout holds {channels}"
        )
    key = fits[0]
    layout = layouts[key]
    extra = {k: v for k, v in card.get("timm_kwargs", {}).items() if k not in ("in_chans", "num_classes")}
    enc = build_encoder(cfg, key_channels, **extra)  # e.g. dynamic_img_size for ViTs trained on multi-crop
    enc.backbone.load_state_dict(load_file(str(folder / "backbone.safetensors")))
    if adapter["type"] == "conv1x1" and init == "checkpoint":
        enc.adapters.load_state_dict(load_file(str(folder / "adapters.safetensors")))
    # init == checkpoint-random-adapter keeps the fresh adapter built above.
    index = np.array([channels.index(c) if c in channels else -1 for c in layout], dtype=np.int64)
    card_stats = _card_stats(card)
    scale, shift = torch.ones(len(layout)), torch.zeros(len(layout))
    for j, name in enumerate(layout):
        if name in channels and name in card_stats:
            i = channels.index(name)
            m_card, s_card = card_stats[name]
            # x_card = (v - m_card) / s_card with v = x * std + mean
            scale[j] = float(std[i]) / s_card
            shift[j] = (float(mean[i]) - m_card) / s_card
    return EvalEncoder(
        enc,
        key if adapter["type"] == "conv1x1" and init != "checkpoint-backbone-only" else None,
        list(layout),
        index,
        scale,
        shift,
    )
