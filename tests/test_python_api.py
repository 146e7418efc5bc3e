"""The Python API a notebook user finds: ``eossl.__version__``, each stage's ``__all__`` (lazy: importing
the packages loads no torch), the torchgeo-style sample dicts, and the example script run end to end."""

from __future__ import annotations

import importlib
import importlib.metadata
import runpy
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

import eossl
from eossl.ingest.bands import igbp_to_simple_lut
from eossl.streaming import InputSpec, TorchGeoStyleDataset, ZarrPatchDataset

REPO = Path(__file__).resolve().parents[1]


def test_version_is_the_installed_distributions():
    assert eossl.__version__ == importlib.metadata.version("eossl")


def test_importing_the_packages_loads_no_torch():
    code = (
        "import sys, eossl, eossl.ingest, eossl.streaming, eossl.train, eossl.eval\n"
        "names = [n for m in (eossl.ingest, eossl.streaming, eossl.train, eossl.eval) for n in m.__all__]\n"
        "assert len(names) > 40 and eossl.__version__\n"
        "assert 'torch' not in sys.modules, 'importing the stage packages loaded torch'\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_every_exported_name_resolves():
    for stage in ("ingest", "streaming", "train", "eval"):
        module = importlib.import_module(f"eossl.{stage}")
        assert module.__all__ and set(module.__all__) <= set(dir(module))
        for name in module.__all__:
            assert getattr(module, name) is not None, f"eossl.{stage}.{name}"
    assert eossl.streaming.SSLLoader.__module__ == "eossl.streaming.loader"


def test_torchgeo_style_samples_are_the_zarr_patches(dataset):
    samples = TorchGeoStyleDataset(str(dataset), InputSpec(sensors=("s2",)), rows="test", mask=True)
    patches = ZarrPatchDataset(str(dataset), InputSpec(sensors=("s2",)), rows="test", with_lc=True)
    assert len(samples) == len(patches) > 0 and samples.classes == patches.classes
    sample, item = samples[1], patches[1]
    assert set(sample) == {"image", "label", "mask", "key"}
    assert torch.equal(sample["image"], item["x"]) and int(sample["label"]) == int(item["y"])
    expected = igbp_to_simple_lut()[item["lc"][0].numpy()]
    assert sample["mask"].dtype == torch.int64 and np.array_equal(sample["mask"].numpy(), expected)
    flipped = TorchGeoStyleDataset(
        str(dataset),
        InputSpec(sensors=("s2",)),
        rows="test",
        transforms=lambda s: {**s, "image": -s["image"]},
    )
    assert torch.equal(flipped[1]["image"], -item["x"]) and "mask" not in flipped[1]


def test_the_example_runs_on_a_dataset(dataset, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["python_api.py", str(dataset)])
    runpy.run_path(str(REPO / "examples" / "python_api.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert f"eossl {eossl.__version__}" in out
    assert "views: [(4, 2, 224, 224), (4, 10, 224, 224)]" in out
    assert "x: (10, 256, 256) label:" in out and "image: (12, 256, 256)" in out and "mask: (256, 256)" in out
    assert "mean digital number:" in out


def test_the_eval_docstrings_feature_extractor(dataset):
    from eossl.eval import build_eval_encoder

    patches = ZarrPatchDataset(str(dataset), InputSpec(sensors=("s2",)), rows="test")
    model = build_eval_encoder(
        "random", patches.inputs.channel_names, patches.mean, patches.std, backbone="resnet18"
    )
    with torch.no_grad():
        features = model.features(patches[0]["x"][None])
    assert tuple(features.shape) == (1, 512)
