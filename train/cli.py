"""Command-line arguments of ``eossl train METHOD`` (also ``python -m eossl.train METHOD``).

The command passes on only what the user typed: a flag not given is absent (``argparse.SUPPRESS``), so
every default comes from the config (dataclass defaults, then the method's, then ``--config``).
"""

from __future__ import annotations

import argparse

from .methods import method_names
from .overrides import parse_assignment

# Flags that set the config field of the same name.
_CONFIG_FLAGS = ("data", "out", "max_steps", "seed")

__all__ = ["add_train_arguments", "run_train"]


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "method",
        nargs="?",
        choices=method_names(),
        help="self-supervised method (may be left out when --config sets 'method')",
    )
    p.add_argument("--data", help="dataset folder or URL written by 'eossl ingest' (required to train)")
    p.add_argument(
        "--out", help="run folder: checkpoints, config.yaml, local MLflow store (required to train)"
    )
    p.add_argument(
        "--config",
        help="YAML file of config values (sections or dotted keys), or a recipe name: "
        "moco_sen12ms, dino_sar, ... (launch/recipes/)",
    )
    p.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved configuration (every key: value, default, meaning) and exit",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        type=parse_assignment,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any config field, e.g. --set backbone=resnet18 --set queue_size=64",
    )
    p.add_argument(
        "--max-steps",
        type=int,
        default=argparse.SUPPRESS,
        help="stop after this many optimiser steps (total, across resumes; default: the config's "
        "max_steps, 0 = the whole run)",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=argparse.SUPPRESS,
        help="seed of data order, augmentation and initialisation (default: the config's seed)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from RUN_DIR's last checkpoint (also the default when one exists)",
    )
    p.add_argument(
        "--fresh", action="store_true", help="ignore checkpoints in RUN_DIR (refused if any exist)"
    )


def run_train(args) -> int:
    from pathlib import Path

    from .checkpoint import latest_checkpoint
    from .config import describe, load_config, method_defaults

    overrides = dict(args.overrides)
    overrides.update(
        {key: getattr(args, key) for key in _CONFIG_FLAGS if getattr(args, key, None) is not None}
    )
    if args.print_config:
        cfg = load_config(args.method, args.config, overrides, require_paths=False)
        print(describe(cfg, method_defaults(cfg.method)), end="")
        return 0
    if not (args.data and args.out):
        raise ValueError("--data and --out are required to train (only --print-config goes without)")
    from .loop import train
    from .preemption import PREEMPTED_EXIT_CODE, Preempted

    cfg = load_config(args.method, args.config, overrides)
    has_ckpt = latest_checkpoint(Path(cfg.out)) is not None
    if args.fresh and has_ckpt:
        raise ValueError(f"{cfg.out} already holds checkpoints: use another --out, or --resume")
    if args.resume and not has_ckpt:
        print(f"no checkpoint in {cfg.out}: starting a new run")
    try:
        result = train(cfg, resume=not args.fresh)
    except Preempted as exc:
        print(f"pre-empted: {exc}", flush=True)
        return PREEMPTED_EXIT_CODE
    if result.backbone_dir is not None:
        print(f"run: {result.run_dir}  steps: {result.steps}  final loss: {result.final_loss:.4f}")
        print(f"mlflow run: {result.mlflow_run_id}")
        print(
            f"backbone: {result.backbone_dir}/backbone.safetensors "
            f"(model card: {result.backbone_dir}/README.md)"
        )
    return 0
