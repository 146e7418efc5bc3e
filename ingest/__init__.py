"""eossl.ingest: SEN12MS GeoTIFF triplets -> WebDataset tar shards, a Zarr v3 store and a manifest.

The format is specified in docs/FORMAT.md and named once in ``format``. From a script or notebook::

    from eossl.ingest import IngestConfig, run_ingest, write_sample_data

    write_sample_data("sen12ms-sample", 24)  # or a real SEN12MS folder
    print(run_ingest(IngestConfig(source="sen12ms-sample", dataset="dataset")).line())

``eossl.ingest.verify.verify(DATASET)`` re-checks a finished dataset (its module shares its name, so it is
imported from there).
"""

from __future__ import annotations

from eossl.exports import lazy_exports

# Public name -> the module that defines it. Imported on first use (PEP 562), so importing the package
# costs nothing and ``eossl --help`` stays instant.
_EXPORTS: dict[str, str] = {
    "IngestConfig": "config",
    "SplitOptions": "config",
    "IngestError": "writer",
    "IngestSummary": "writer",
    "run_ingest": "writer",
    "merge": "finalize",
    "ReadOptions": "read",
    "write_sample_data": "sample_data",
    "REAL_PATCHES_DIR": "real_samples",
    "DatasetRoot": "storage",
    "DatasetCorruptError": "integrity",
    "DatasetMissingError": "integrity",
    "read_catalog": "integrity",
    "read_manifest": "integrity",
    "Catalog": "catalog",
    "webdataset_files": "dali_index",
    "FORMAT_VERSION": "format",
    "UnsupportedFormatError": "format",
    "IGBP_CLASSES": "bands",
    "IGBP_SIMPLE_CLASSES": "bands",
    "LC": "bands",
    "MODALITIES": "bands",
    "S1": "bands",
    "S2": "bands",
    "S2_LAND_BANDS": "bands",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
