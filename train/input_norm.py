"""The encoder's input normalisation: the dataset's standardisation, or the one starting weights expect.

The loader always standardises with the dataset's statistics (augmentation offsets and the zero of absent
channels are defined in those units). When the starting weights expect another normalisation
(torchgeo's Sentinel-2 weights divide reflectance by 10,000), a fixed per-channel affine maps the
dataset-standardised views to it before the encoder, so the network sees what it was trained on
(``backbone.normalisation``: auto, weights or dataset). A run records it in ``starting_weights.json``,
so its checkpoints are exported with it and a resumed run uses it without the weights file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .config import NORMALISATIONS
from .weights import StartingWeights

__all__ = [
    "NORMALISATIONS",
    "STARTING_WEIGHTS",
    "InputNorm",
    "input_norm",
    "save_input_norm",
    "saved_input_norm",
]

STARTING_WEIGHTS = "starting_weights.json"  # in the run folder: what the run started from, the input norm


@dataclass
class InputNorm:
    """Per view: the normalisation the encoder's input has, and the affine from the dataset's to it.

    Attributes:
        channels: per view, its channel names.
        mean, std: per view, per channel, in stored units: ``x_model = (v - mean) / std``.
        source: per view, per channel: 'weights' or 'dataset'.
        scale, shift: per view, per channel: ``x_model = x_dataset * scale + shift``.
        choice: the ``backbone.normalisation`` value and what it resolved to.
    """

    channels: list[list[str]]
    mean: list[list[float]]
    std: list[list[float]]
    source: list[list[str]]
    scale: list[list[float]]
    shift: list[list[float]]
    choice: str

    @property
    def identity(self) -> bool:
        return all(s == "dataset" for view in self.source for s in view)

    def apply(self, views: list[torch.Tensor]) -> list[torch.Tensor]:
        """Dataset-standardised (B, C, H, W) views -> the encoder's normalisation (a no-op when identity)."""
        if self.identity:
            return views
        out = []
        for v, x in enumerate(views):
            scale = torch.as_tensor(self.scale[v], dtype=x.dtype, device=x.device)[None, :, None, None]
            shift = torch.as_tensor(self.shift[v], dtype=x.dtype, device=x.device)[None, :, None, None]
            out.append(x * scale + shift)
        return out

    def to_json(self) -> dict:
        return {
            k: getattr(self, k) for k in ("channels", "mean", "std", "source", "scale", "shift", "choice")
        }


def input_norm(
    view_channels: list[list[str]],
    dataset_stats: list[tuple[np.ndarray, np.ndarray]],
    normalisation: str,
    weights: StartingWeights | None,
) -> InputNorm:
    """The encoder's input normalisation per view (see the module docstring).

    Args:
        view_channels: each view's channel names.
        dataset_stats: each view's (mean, std) from the dataset manifest.
        normalisation: 'auto' (the weights' when they declare one, else the dataset's), 'weights' or
            'dataset'.
        weights: the starting weights, or None.

    Raises:
        ValueError: an unknown choice, or 'weights' with weights that declare no normalisation.
    """
    if normalisation not in NORMALISATIONS:
        raise ValueError(f"backbone.normalisation must be one of {NORMALISATIONS}, got {normalisation!r}")
    declared = weights.stats if weights is not None else {}
    if normalisation == "weights" and not declared:
        what = f"{weights.source} ({weights.input_name})" if weights is not None else "no backbone.weights"
        raise ValueError(
            f"backbone.normalisation=weights, but {what} declare no normalisation: use auto or dataset"
        )
    use = declared if normalisation in ("auto", "weights") else {}
    choice = f"{normalisation}: " + (
        "the weights' where they name the channel, else the dataset's" if use else "the dataset's"
    )
    norm = InputNorm([], [], [], [], [], [], choice)
    for names, (dm, ds) in zip(view_channels, dataset_stats, strict=True):
        mean, std, source, scale, shift = [], [], [], [], []
        for c, m_d, s_d in zip(names, dm.tolist(), ds.tolist(), strict=True):
            if c in use:
                m_w, s_w = use[c]
                mean.append(m_w), std.append(s_w), source.append("weights")
                # x_w = (v - m_w) / s_w with v = x_d * s_d + m_d
                scale.append(s_d / s_w), shift.append((m_d - m_w) / s_w)
            else:
                mean.append(m_d), std.append(s_d), source.append("dataset")
                scale.append(1.0), shift.append(0.0)
        for target, values in zip(
            (norm.channels, norm.mean, norm.std, norm.source, norm.scale, norm.shift),
            (list(names), mean, std, source, scale, shift),
            strict=True,
        ):
            target.append(values)
    return norm


def saved_input_norm(run_dir: str | Path) -> tuple[InputNorm | None, dict | None]:
    """The input normalisation and starting-weights report a run recorded (None, None when it has none)."""
    path = Path(run_dir) / STARTING_WEIGHTS
    if not path.is_file():
        return None, None
    saved = json.loads(path.read_text())
    return InputNorm(**saved["input_norm"]), saved.get("starting_weights")


def save_input_norm(run_dir: str | Path, norm: InputNorm, report: dict | None) -> None:
    """Write what :func:`saved_input_norm` reads (a checkpoint's export needs it when the run is gone)."""
    path = Path(run_dir) / STARTING_WEIGHTS
    path.write_text(json.dumps({"input_norm": norm.to_json(), "starting_weights": report}, indent=1))
