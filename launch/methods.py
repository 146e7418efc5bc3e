"""The names of the training methods, read from the training registry when a launch setting is checked."""

from __future__ import annotations

__all__ = ["method_names"]


def method_names() -> list[str]:
    """``moco``, ``dino``, ...: whatever ``eossl.train.methods.METHODS`` registers.

    Imported on call, not at module load: the registry brings in torch, which ``eossl --help`` must not.
    """
    from eossl.train.methods import METHODS

    return list(METHODS)
