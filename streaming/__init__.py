"""eossl.streaming: augmented batches for pre-training and labelled patches for evaluation.

Augmented views from the WebDataset shards (NVIDIA DALI, GPU or CPU)::

    from eossl.streaming import LoaderConfig, SSLLoader, ViewConfig

    loader = SSLLoader("dataset", LoaderConfig(batch_size=64, views=ViewConfig(mode="pair")))
    batch = next(iter(loader))  # batch.views: S1 (64, 2, 224, 224) and S2 (64, 10, 224, 224) views

Labelled patches from the Zarr store (a map-style torch ``Dataset``)::

    from eossl.streaming import InputSpec, ZarrPatchDataset

    patches = ZarrPatchDataset("dataset", InputSpec(sensors=("s2",)), rows="test")
    item = patches[0]  # {"x": (10, 256, 256) standardised, "y": class index, "key", "row"}

``TorchGeoStyleDataset`` gives the same patches as torchgeo's sample dicts (``image``, ``label``, ``mask``).
"""

from __future__ import annotations

from eossl.exports import lazy_exports

# Public name -> the module that defines it. Imported on first use (PEP 562), so importing the package
# costs nothing (torch, DALI and zarr load with the first name that needs them).
_EXPORTS: dict[str, str] = {
    "Batch": "loader",
    "CorruptDataError": "loader",
    "LoaderConfig": "loader",
    "SSLLoader": "loader",
    "LABEL_SCHEMES": "zarr_dataset",
    "ZarrPatchDataset": "zarr_dataset",
    "resolve_rows": "zarr_dataset",
    "TorchGeoStyleDataset": "torchgeo_style",
    "S2_BAND_SETS": "inputs",
    "InputSpec": "inputs",
    "parse_sensors": "inputs",
    "MODES": "views",
    "ViewConfig": "views",
    "PRESETS": "augment",
    "AugmentConfig": "augment",
    "preset": "augment",
    "PlanConfig": "plan",
    "StorageOptions": "storage",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
