"""eossl: data streaming and self-supervised pre-training on multi-sensor satellite imagery (SEN12MS).

The stages are subpackages, each exporting what a script or notebook needs (``__all__``):

- ``eossl.ingest``: GeoTIFF triplets -> WebDataset shards + Zarr store (``IngestConfig``, ``run_ingest``,
  ``verify``, ``write_sample_data``).
- ``eossl.streaming``: augmented batches for pre-training (``SSLLoader``, ``LoaderConfig``, ``ViewConfig``)
  and labelled patches for evaluation (``ZarrPatchDataset``, ``TorchGeoStyleDataset``, ``InputSpec``).
- ``eossl.train``: pre-training (``TrainConfig``, ``load_config``, ``train``).
- ``eossl.eval``: classification and segmentation grids, and backbones from runs (``build_eval_encoder``).

``import eossl`` imports none of them (so ``eossl --help`` stays instant); ``eossl.streaming`` and the
others load on first use, and their heavy modules (torch, DALI, zarr) only when a name that needs them is
used.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from pkgutil import extend_path
from typing import Any

# The stage folders are installed into this package from the repository's top level (pyproject's
# package-dir); extending the path also finds them when this folder is imported from a checkout while
# eossl itself is installed elsewhere.
__path__ = extend_path(__path__, __name__)

try:
    __version__ = version("eossl")
except PackageNotFoundError:  # imported from a checkout that was never installed
    __version__ = "unknown"

STAGES = ("ingest", "streaming", "train", "eval", "launch")

__all__ = ["STAGES", "__version__", *STAGES]


def __getattr__(name: str) -> Any:
    if name in STAGES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(STAGES))
