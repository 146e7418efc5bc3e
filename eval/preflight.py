"""Everything a grid needs, checked before its first MLflow run, output file or trained cell.

A grid runs for minutes to hours; a wrong dataset path, a budget the dataset was not ingested with, an
input or label it cannot give, or a ``--checkpoint`` that is not a run must fail at once, not after the
random-init cells were trained. The checks read only small files (manifest, subsets, model cards,
``trainer.json``).
"""

from __future__ import annotations

import json

from .checkpoints import BackboneSource, checkpoint_source
from .config import ClassifyConfig, GridConfig

__all__ = ["check_budget", "check_grid_inputs"]


def check_budget(budget: str, seeds: tuple[int, ...], out) -> None:
    """Every ``budget_<B>_seed<S>`` subset the seeds need is in the dataset's subsets.json.

    Raises:
        ValueError: naming the missing subsets and the budgets and seeds the dataset has.
    """
    from eossl.ingest.format import SUBSETS

    if budget == "all":
        return
    if not out.exists(SUBSETS):
        raise ValueError(f"{out.path(SUBSETS)} not found: the dataset has no label budgets; use --budget all")
    budgets = json.loads(out.read_bytes(SUBSETS)).get("budgets", {})
    missing = [f"budget_{budget}_seed{s}" for s in seeds if f"budget_{budget}_seed{s}" not in budgets]
    if missing:
        have: dict[str, list[str]] = {}
        for name in budgets:  # budget_<B>_seed<S>
            b, _, s = name.removeprefix("budget_").partition("_seed")
            have.setdefault(b, []).append(s)
        offered = "; ".join(f"{b} (seeds {','.join(s)})" for b, s in have.items()) or "none"
        raise ValueError(
            f"--budget {budget} with --seeds {','.join(map(str, seeds))}: {', '.join(missing)} "
            f"not in {out.path(SUBSETS)}; this dataset has budgets {offered}, or use --budget all"
        )


def check_grid_inputs(cfg: GridConfig) -> list[BackboneSource]:
    """Check the dataset, budget, inputs, label and every ``--checkpoint`` of a grid; nothing is written.

    Returns:
        Where each checkpoint's backbone comes from, in ``cfg.checkpoints`` order.

    Raises:
        ValueError or FileNotFoundError: the first problem found, naming the file or flag and the reason.
    """
    from eossl.ingest.format import ZARR_DIR
    from eossl.ingest.integrity import read_manifest
    from eossl.ingest.storage import DatasetRoot
    from eossl.streaming.inputs import InputSpec, stored_s2_bands
    from eossl.streaming.zarr_dataset import LABEL_SCHEMES

    out = DatasetRoot(cfg.dataset)
    manifest = read_manifest(out)  # says whether the path is missing, a source tree or an unfinished ingest
    if not out.exists(f"{ZARR_DIR}/zarr.json"):
        raise ValueError(
            f"{out.path(ZARR_DIR)} not found: evaluation reads the Zarr store (ingest --formats zarr)"
        )
    source = manifest.get("source")
    if not isinstance(cfg, ClassifyConfig) and source is not None and "lc" not in source["modalities"]:
        raise ValueError(
            f"{cfg.dataset} is {source['title']}, which has no land-cover layer: segmentation evaluates on "
            "SEN12MS's per-pixel labels"
        )
    if isinstance(cfg, ClassifyConfig) and source is not None and source["format"] != "sen12ms":
        # Other sources carry their own label set (or none): say which, rather than fail on a missing array.
        schemes = list(source.get("label_schemes", {}))
        if not schemes:
            raise ValueError(f"{cfg.dataset} is {source['title']}, which has no labels: pre-training only")
        if cfg.label not in schemes:
            raise ValueError(f"{cfg.dataset} is {source['title']}: its labels are {', '.join(schemes)}")
        if not cfg.multilabel:
            raise ValueError(f"{source['title']} labels are multi-label: evaluate with --multilabel")
    check_budget(cfg.budget, cfg.seeds, out)
    for column in cfg.inputs:
        spec = InputSpec.parse(column, cfg.s2_bands)  # raises on an unknown input or band
        if "s2" in spec.sensors:
            spec.stored_index(stored_s2_bands(manifest))  # and on a band the dataset does not store
    # Scene labels here; a segmentation config checks its per-pixel labels when it is built.
    if isinstance(cfg, ClassifyConfig) and cfg.label not in LABEL_SCHEMES:
        raise ValueError(f"label must be one of {list(LABEL_SCHEMES)}, got {cfg.label!r}")
    return [checkpoint_source(c) for c in cfg.checkpoints]
