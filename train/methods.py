"""The registry of self-supervised methods: a name -> the :class:`~eossl.train.method.SSLMethod` subclass.

Entries name the class as ``"module:Class"`` and are imported on first use, so the command line and the
config validation list method names without importing torch. A new method is one module with its
``SSLMethod`` subclass plus one line here; the method's config section (if it has one) is the
``TrainConfig`` field of the same name.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .method import SSLMethod

__all__ = ["METHODS", "get_method", "method_names"]

METHODS: dict[str, str] = {
    "moco": "eossl.train.moco:MoCo",
    "dino": "eossl.train.dino:DINO",
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
