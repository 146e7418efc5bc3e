"""Public names of a stage package, imported on first use (PEP 562).

Each stage's ``__init__`` maps its public names to the modules that define them and calls
:func:`lazy_exports`: importing the package then costs nothing (``eossl --help`` stays instant) and a
heavy module (torch, DALI, zarr) loads only when a name that needs it is used.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from typing import Any

__all__ = ["lazy_exports"]


def lazy_exports(
    package: str, exports: dict[str, str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The package's ``(__getattr__, __dir__)`` for ``exports`` (public name -> defining submodule).

    A name is imported from its submodule on first access and stored in the package, so later lookups do
    not come back here.
    """

    def __getattr__(name: str) -> Any:
        if name in exports:
            value = getattr(importlib.import_module(f".{exports[name]}", package), name)
            setattr(sys.modules[package], name, value)
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(exports))

    return __getattr__, __dir__
