"""eossl.train: self-supervised pre-training (MoCo, DINO) of a backbone on a dataset's shards.

From a script or notebook (the same run as ``eossl train``, settings as its ``--set`` keys)::

    from eossl.train import load_config, train

    cfg = load_config("moco", None, {"data": "dataset", "out": "runs/moco", "max_steps": 100})
    result = train(cfg)  # result.run_dir: checkpoints, history.jsonl, backbone/
"""

from __future__ import annotations

import importlib
from typing import Any

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


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
