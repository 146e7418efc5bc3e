"""The registry of self-supervised methods: a name -> the :class:`~eossl.train.method.SSLMethod` subclass.

Entries name the class as ``"module:Class"`` and are imported on first use, so the command line and the
config validation list method names without importing torch. A new method is one module with its
``SSLMethod`` subclass plus one line here; the method's config section (if it has one) is the
``TrainConfig`` field of the same name.

A method's recipe (its ``config_defaults``) is declared here too, in ``CONFIG_DEFAULTS``, and the class
attribute is that same mapping: resolving a config (``eossl kit``, ``eossl study --list``, a job file's
check) then needs no torch, which takes seconds to import, more on a cluster's network file system. A
method registered without an entry there is imported for its class attribute.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .method import SSLMethod

__all__ = ["CONFIG_DEFAULTS", "METHODS", "config_defaults", "get_method", "method_names"]

METHODS: dict[str, str] = {
    "moco": "eossl.train.moco:MoCo",
    "dino": "eossl.train.dino:DINO",
}

# Dotted config keys -> values applied over the dataclass defaults (which are MoCo's recipe).
CONFIG_DEFAULTS: dict[str, Mapping[str, Any]] = {
    "moco": MappingProxyType({}),
    # DINO's ViT-S/16 recipe on S1.
    "dino": MappingProxyType(
        {
            "backbone.name": "vit_small_patch16_224",
            "optim.name": "adamw",
            "optim.lr": 0.0005,
            "optim.lr_scaling": "linear",
            "optim.base_batch": 256,
            "optim.weight_decay": 0.04,
            "optim.warmup_epochs": 10,
            "optim.min_lr": 1e-6,
            "optim.clip_grad": 3.0,
            "loader.mode": "multicrop",
            "loader.sensors": "s1",
            "epochs": 100,
            "channels_last": False,
        }
    ),
}


def method_names() -> tuple[str, ...]:
    """Every registered method name, in registry order."""
    return tuple(METHODS)


def get_method(name: str) -> type[SSLMethod]:
    """The method class registered under ``name``."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(METHODS)}")
    module, _, attr = METHODS[name].partition(":")
    return getattr(importlib.import_module(module), attr)


def config_defaults(name: str) -> Mapping[str, Any]:
    """The method's ``config_defaults`` without importing it when ``CONFIG_DEFAULTS`` declares them."""
    if name in CONFIG_DEFAULTS:
        return CONFIG_DEFAULTS[name]
    return get_method(name).config_defaults
