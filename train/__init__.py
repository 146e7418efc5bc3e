"""eossl.train: self-supervised pre-training (MoCo, DINO) of a backbone on a dataset's shards.

From a script or notebook (the same run as ``eossl train``, settings as its ``--set`` keys)::

    from eossl.train import load_config, train

    cfg = load_config("moco", None, {"data": "dataset", "out": "runs/moco", "max_steps": 100})
    result = train(cfg)  # result.run_dir: checkpoints, history.jsonl, backbone/
"""

from __future__ import annotations

from eossl.exports import lazy_exports

# Public name -> the module that defines it. Imported on first use (PEP 562), so importing the package
# costs nothing (torch loads with the first name that needs it).
_EXPORTS: dict[str, str] = {
    "BackboneConfig": "config",
    "DataConfig": "config",
    "DinoConfig": "config",
    "MoCoConfig": "config",
    "OptimConfig": "config",
    "TrainConfig": "config",
    "load_config": "config",
    "method_defaults": "config",
    "recipe_names": "config",
    "RunResult": "loop",
    "train": "loop",
    "Encoder": "backbones",
    "build_encoder": "backbones",
    "get_method": "methods",
    "method_names": "methods",
    "read_model_card": "export",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
