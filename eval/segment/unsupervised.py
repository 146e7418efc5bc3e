"""The '(no labels)' rows of the segmentation table: what a pre-trained ViT's maps give without any label.

For each ViT checkpoint and input, the token k-means and thresholded-attention agreement of
``eossl attention`` (Hungarian-matched to the simplified IGBP map) is averaged over the first hold-out
patches and reported as extra rows beside the trained ones. A backbone without patch tokens gets rows
that say so.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from eossl.streaming.inputs import InputSpec
from eossl.train.export import read_model_card
from eossl.train.vit import is_vit

from ..config import SegmentConfig
from ..grid import ExtraCell, GridRow
from ..models import NotApplicable, build_eval_encoder
from .data import SegmentationPatches, label_scheme

__all__ = ["UNSUPERVISED_ROWS", "unsupervised_cells"]

UNSUPERVISED_ROWS = (
    ("kmeans_miou", "token k-means"),
    ("attention_best_head_miou", "attention mask, best head"),
    ("kmeans_input_baseline_miou", "input k-means baseline"),
)


def _has_tokens(run_dir: str) -> bool:
    """Whether a run's backbone is a ViT (attention maps and patch tokens), from the weights as loaded."""
    channels = read_model_card(run_dir)["inputs"]["view0"]["channels"]
    ev = build_eval_encoder("checkpoint", channels, np.zeros(len(channels)), np.ones(len(channels)), run_dir)
    return is_vit(ev.encoder.backbone)


def _scores(cfg: SegmentConfig, run_dir: str, column: str, folder: Path) -> dict:
    """Means of the attention agreement scores over the first hold-out patches of a ViT run."""
    from ..attention import attention_figures

    spec = InputSpec.parse(column, cfg.s2_bands)
    test = SegmentationPatches(cfg.dataset, spec, "test", label_scheme("igbp_simple"))
    keys = [str(k) for k in test.keys[: cfg.attention_patches]]
    if not keys:
        raise NotApplicable("no hold-out patch with land cover")
    build_eval_encoder(
        "checkpoint", spec.channel_names, test.mean, test.std, run_dir
    )  # NotApplicable: no layout
    res = attention_figures(run_dir, cfg.dataset, keys, str(folder / "attention"), inputs=column, draw=False)
    return res["summary"]


def unsupervised_cells(cfg: SegmentConfig, rows: list[GridRow], folder_of) -> list[ExtraCell]:
    """The '(no labels)' cells of every plain-checkpoint row and input (``folder_of(row, column)``: where)."""
    cells = []
    for row in rows:
        if row.init != "checkpoint":
            continue
        tokens = _has_tokens(row.run_dir)
        for column in cfg.inputs:
            summary, note = None, f"n/a: {row.backbone} has no attention maps or patch tokens"
            if tokens:
                try:
                    summary, note = _scores(cfg, row.run_dir, column, folder_of(row, column)), ""
                except NotApplicable as exc:
                    note = str(exc)
            for key, label in UNSUPERVISED_ROWS:
                if not tokens and key == "kmeans_input_baseline_miou":  # the ViT token grid's baseline
                    continue
                value = summary.get(key) if summary else None
                cell = {
                    "method": f"{row.name}: {label} (no labels)",
                    "input": column,
                    "metric": "miou",
                    "init": "unsupervised",
                    "checkpoint": row.run_dir,
                    "backbone": row.backbone,
                    "mean": value,
                    "std": None,
                    "n": summary["patches_with_lc"] if summary else 0,
                    "note": note,
                }
                cells.append(
                    ExtraCell(
                        cell,
                        {"miou_mean": value, "seeds": 1} if value is not None else {},
                        {
                            "method": cell["method"],
                            "input": column,
                            "checkpoint": row.run_dir or "",
                            "patches": cell["n"],
                        },
                    )
                )
    return cells
