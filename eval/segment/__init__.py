"""Land-cover segmentation (``eossl eval segment``): one task of the evaluation grid.

``task`` is the grid task (rows, the per-seed cell, the summary); ``data`` the per-pixel targets and the
patch dataset; ``heads`` the linear head and decoder; ``train`` the training loop and prediction;
``metrics`` the pixel confusion and IoU scores; ``figures`` the prediction figures and GeoTIFF maps;
``unsupervised`` the '(no labels)' rows of ViT runs. The runner is imported on first use, so reading the
config or the label tables does not load the model stack.
"""

from __future__ import annotations

from typing import Any

from ..config import SegmentConfig, SegTrainConfig

__all__ = ["SegTrainConfig", "SegmentConfig", "SegmentTask", "run_segmentation"]


def __getattr__(name: str) -> Any:
    if name in ("SegmentTask", "run_segmentation"):
        from . import task

        return getattr(task, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
