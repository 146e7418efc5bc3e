"""eossl.eval: evaluation grids (scene classification, land-cover segmentation, attention figures).

A pre-trained backbone as a feature extractor for a notebook::

    from eossl.eval import build_eval_encoder
    from eossl.streaming import InputSpec, ZarrPatchDataset

    patches = ZarrPatchDataset("dataset", InputSpec(sensors=("s2",)), rows="test")
    model = build_eval_encoder("checkpoint", patches.inputs.channel_names, patches.mean, patches.std,
                               run_dir="runs/moco")
    features = model.features(patches[0]["x"][None])  # (1, num_features)

The grids are ``run_classification(ClassifyConfig(...))`` and ``run_segmentation(SegmentConfig(...))``,
the same as ``eossl eval classify|segment``.
"""

from __future__ import annotations

from eossl.exports import lazy_exports

# Public name -> the module that defines it. Imported on first use (PEP 562), so importing the package
# costs nothing (torch loads with the first name that needs it).
_EXPORTS: dict[str, str] = {
    "ClassifyConfig": "config",
    "GridConfig": "config",
    "ProbeConfig": "config",
    "SegTrainConfig": "config",
    "SegmentConfig": "config",
    "run_classification": "classify",
    "run_segmentation": "segment",
    "EvalEncoder": "models",
    "build_eval_encoder": "models",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
