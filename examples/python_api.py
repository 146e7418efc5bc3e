"""eossl from Python, cell by cell (``# %%`` cells run as a notebook in VS Code, Jupyter via jupytext, or
as a plain script): a dataset, augmented batches for pre-training, labelled patches for evaluation, the
same patches as torchgeo-style dicts, and the Zarr store in xarray.

    python examples/python_api.py [DATASET]

Without DATASET it ingests 12 synthetic SEN12MS patches into a temporary folder first (a few seconds).
"""
# ruff: noqa: E402 - each cell imports what it uses, as a notebook does

# %% A dataset: the one given, or a small synthetic one
import sys
import tempfile
from pathlib import Path

import eossl

print("eossl", eossl.__version__)
if len(sys.argv) > 1:
    dataset = sys.argv[1]
else:
    from eossl.ingest import IngestConfig, run_ingest, write_sample_data

    work = Path(tempfile.mkdtemp(prefix="eossl-example-"))
    write_sample_data(work / "sen12ms", 12, patches_per_scene=4)
    cfg = IngestConfig(source=str(work / "sen12ms"), dataset=str(work / "dataset"), progress=False)
    print(run_ingest(cfg).line())
    dataset = cfg.dataset

# %% Augmented batches for pre-training: an S1 and an S2 view of each sample ("pair"; DALI, on the GPU
# when there is one)
from eossl.streaming import LoaderConfig, SSLLoader, ViewConfig

# workers=0 reads in this process: the quickest start in a notebook; keep the default on a real run.
loader = SSLLoader(dataset, LoaderConfig(batch_size=4, split="all", views=ViewConfig(mode="pair"), workers=0))
batch = next(iter(loader))
print("views:", [tuple(v.shape) for v in batch.views], "rows:", batch.rows.tolist())

# %% Labelled patches for evaluation: standardised S2 land bands and the simplified IGBP scene label
from eossl.streaming import InputSpec, ZarrPatchDataset

patches = ZarrPatchDataset(dataset, InputSpec(sensors=("s2",)), rows="test", label="igbp_simple")
item = patches[0]
print(patches)
print("x:", tuple(item["x"].shape), "label:", patches.classes[int(item["y"])], "key:", item["key"])

# %% The same patches as torchgeo's sample dicts, with a per-pixel land-cover mask
from eossl.streaming import TorchGeoStyleDataset

samples = TorchGeoStyleDataset(dataset, InputSpec(sensors=("s1", "s2")), rows="test", mask=True)
sample = samples[0]
print(
    "image:",
    tuple(sample["image"].shape),
    "label:",
    int(sample["label"]),
    "mask:",
    tuple(sample["mask"].shape),
)

# %% The Zarr store in xarray: select by band name and sample key
import xarray as xr

ds = xr.open_zarr(f"{dataset}/data.zarr")
red = ds.s2.sel(s2_band="B4", sample=item["key"])
print("B4 of", item["key"], "mean digital number:", float(red.mean()))
