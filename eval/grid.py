"""What the classification and segmentation grids share: budget subsets, the scene hold-out, row names."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

__all__ = ["assert_scene_holdout", "row_name", "training_subset"]


def training_subset(budget: str, seed: int) -> str:
    """The rows a cell trains on: ingest's ``budget_<B>_seed<S>`` subset, or the whole training split."""
    return "train" if budget == "all" else f"budget_{budget}_seed{seed}"


def _scenes(keys: Iterable[str]) -> set[str]:
    return {str(k).rsplit("_p", 1)[0] for k in keys}  # ROIs1158_spring_1_p30 -> ROIs1158_spring_1 (PatchId.scene_id)


def assert_scene_holdout(train_keys: Iterable[str], test_keys: Iterable[str]) -> None:
    """Never expected (ingest splits by scene): guards against a mixed-up dataset."""
    leaked = _scenes(train_keys) & _scenes(test_keys)
    if leaked:
        raise AssertionError(f"hold-out scenes in the training rows: {sorted(leaked)[:5]}")


def row_name(run_dir: str, init: str) -> str:
    """A table row of a pre-training run: its folder name, with the init when it is not the plain checkpoint."""
    name = Path(run_dir).resolve().name
    return name if init == "checkpoint" else f"{name} ({init.removeprefix('checkpoint-')})"
