"""Labelled patches as torchgeo's sample dicts (``image``, ``label``, ``mask``), for code written for it.

torchgeo's datasets (its SEN12MS and SSL4EO-S12 among them) return ``{"image": (C, H, W) float tensor,
"label": ..., "mask": (H, W) long tensor}`` and its trainers, transforms and plots take that dict. This
wrapper gives eossl's Zarr patches that shape, with everything ``ZarrPatchDataset`` guarantees (channel
order, standardisation with the dataset's statistics, incomplete samples left out and counted).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from eossl.ingest.bands import IGBP_SIMPLE_CLASSES, igbp_to_simple_lut

from .inputs import InputSpec
from .zarr_dataset import ZarrPatchDataset

__all__ = ["MASK_CLASSES", "TorchGeoStyleDataset"]

# Mask values: simplified IGBP code (1..10, names below in order); 0 where the IGBP layer has no class.
MASK_CLASSES = ("no data", *IGBP_SIMPLE_CLASSES)
_SIMPLE = igbp_to_simple_lut()


class TorchGeoStyleDataset(torch.utils.data.Dataset):
    """``ZarrPatchDataset`` items as ``{"image", "label", "mask", "key"}`` dicts.

    Args:
        dataset: dataset folder or URL (written by ``eossl ingest`` with the Zarr store).
        inputs: sensors and bands stacked into ``image`` (default: S1 then the 10 land S2 bands).
        rows: row indices, a subset name (``train``, ``test``, ``budget_64_seed0``) or None for all.
        label: scene label scheme (``igbp_simple``, ``igbp``) for ``label``, or None for no label.
        multilabel: ``label`` as a multi-hot float vector instead of a class index.
        mask: add ``mask``, the per-pixel simplified IGBP code from the LC layer (``MASK_CLASSES``; 0 = no
            data); patches without land cover are left out.
        transforms: applied to each sample dict, as torchgeo's ``transforms`` argument.
    """

    def __init__(
        self,
        dataset: str,
        inputs: InputSpec | None = None,
        rows: Sequence[int] | str | None = None,
        label: str | None = "igbp_simple",
        multilabel: bool = False,
        mask: bool = False,
        transforms: Callable[[dict], dict] | None = None,
    ):
        self.patches = ZarrPatchDataset(
            dataset, inputs or InputSpec(), rows=rows, label=label, multilabel=multilabel, with_lc=mask
        )
        self.mask = mask
        self.transforms = transforms

    def __len__(self) -> int:
        return len(self.patches)

    @property
    def classes(self) -> list[str]:
        """Names of ``label``'s classes (index i = class i)."""
        return self.patches.classes

    def __getitem__(self, index: int) -> dict:
        item = self.patches[index]
        sample = {"image": item["x"], "key": item["key"]}
        if "y" in item:
            sample["label"] = item["y"]
        if self.mask:
            igbp = item["lc"][0].numpy()  # (H, W) uint8 IGBP layer as stored
            sample["mask"] = torch.from_numpy(_SIMPLE[igbp].astype(np.int64))
        return self.transforms(sample) if self.transforms is not None else sample
