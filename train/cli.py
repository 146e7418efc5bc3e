"""Command-line arguments of ``eossl train METHOD`` (also ``python -m eossl.train METHOD``).

The command passes on only what the user typed: a flag not given is absent (``argparse.SUPPRESS``), so
every default comes from the config (dataclass defaults, then the method's, then ``--config``).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from .methods import method_names
from .overrides import add_set_argument

# Flags that set the config field of the same name.
_CONFIG_FLAGS = ("data", "out", "max_steps", "seed")

__all__ = ["add_train_arguments", "check_training_data", "resolve_train_args", "run_train"]


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
    add_set_argument(p, "override any config field, e.g. --set backbone=resnet18 --set queue_size=64")
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


def check_training_data(data: str) -> None:
    """Refuse a path that is not a finished, readable dataset with shards before the run folder exists:
    says whether it does not exist, is a SEN12MS source tree or an unfinished ingest.

    Raises:
        FileNotFoundError: no manifest (with why) or no catalog (ingested without ``--formats wds``).
        ValueError: a corrupt manifest or a format version this code does not read.
    """
    from eossl.ingest.format import CATALOG
    from eossl.ingest.integrity import read_manifest
    from eossl.ingest.storage import DatasetRoot

    root = DatasetRoot(data)
    read_manifest(root)
    if not root.exists(CATALOG):
        raise FileNotFoundError(
            f"{root.path(CATALOG)} not found: training streams shards (ingest --formats wds)"
        )


def _remove_if_empty(run_dir, created: bool) -> None:
    """A start that failed before writing anything leaves no run folder behind (only its lock file)."""
    if created and run_dir.is_dir() and {p.name for p in run_dir.iterdir()} <= {".train.lock"}:
        for p in run_dir.iterdir():
            p.unlink()
        run_dir.rmdir()


def _config_of(args, config_file: str | None, require_paths: bool = True):
    from .config import load_config

    overrides = dict(args.overrides)
    overrides.update(
        {key: getattr(args, key) for key in _CONFIG_FLAGS if getattr(args, key, None) is not None}
    )
    return load_config(args.method, config_file, overrides, require_paths=require_paths)


def resolve_train_args(argv: Sequence[str]):
    """The full training config a ``eossl train`` argument list asks for, without starting anything: what
    a cluster job writer checks before it writes a job (a misspelt key fails here, not in the queue).

    A ``--config`` file that is not readable here (it may exist only on the cluster) is left out, with a
    warning; every ``--set`` key is still checked.

    Raises:
        ValueError: an unknown or ambiguous key, or a bad value (argument errors exit 2 through argparse).
    """
    import os
    import sys

    parser = argparse.ArgumentParser(prog="eossl train")
    add_train_arguments(parser)
    args = parser.parse_args(list(argv))
    config_file = args.config
    if config_file and not os.path.exists(config_file):
        print(f"warning: {config_file} is not readable here: checking the --set keys alone", file=sys.stderr)
        config_file = None
    return _config_of(args, config_file)


def run_train(args) -> int:
    from pathlib import Path

    from .checkpoint import latest_checkpoint

    if args.print_config:
        from .config import describe, method_defaults

        cfg = _config_of(args, args.config, require_paths=False)
        print(describe(cfg, method_defaults(cfg.method)), end="")
        return 0
    from .loop import train
    from .preemption import (
        DATA_UNAVAILABLE_EXIT_CODE,
        PREEMPTED_EXIT_CODE,
        DataUnavailable,
        Preempted,
        record_exit_code,
    )

    cfg = _config_of(args, args.config)
    check_training_data(cfg.data)
    has_ckpt = latest_checkpoint(Path(cfg.out)) is not None
    if args.fresh and has_ckpt:
        raise ValueError(f"{cfg.out} already holds checkpoints: use another --out, or --resume")
    if args.resume and not has_ckpt:
        print(f"no checkpoint in {cfg.out}: starting a new run")
    created = not Path(cfg.out).exists()
    try:
        result = train(cfg, resume=not args.fresh)
    except Preempted as exc:
        print(f"pre-empted: {exc}", flush=True)
        record_exit_code(PREEMPTED_EXIT_CODE)
        return PREEMPTED_EXIT_CODE
    except DataUnavailable as exc:
        print(f"stopped: {exc}", flush=True)
        record_exit_code(DATA_UNAVAILABLE_EXIT_CODE)
        return DATA_UNAVAILABLE_EXIT_CODE
    except BaseException:
        _remove_if_empty(Path(cfg.out), created)
        raise
    if result.backbone_dir is not None:
        print(f"run: {result.run_dir}  steps: {result.steps}  final loss: {result.final_loss:.4f}")
        print(f"mlflow run: {result.mlflow_run_id}")
        print(
            f"backbone: {result.backbone_dir}/backbone.safetensors "
            f"(model card: {result.backbone_dir}/README.md)"
        )
    return 0
