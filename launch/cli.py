"""The ``eossl`` command: one entry point that mounts each stage's commands.

Every stage declares its own arguments and handlers (``eossl.ingest.cli``, ``eossl.train.cli``,
``eossl.eval.cli``, ``eossl.launch.study.cli``, ...); this module only lists them. A command's module is
imported only when that command runs, so ``eossl --help`` and ``eossl ingest ...`` never load torch or
DALI. Exit codes: 0 done, 1 could not complete, 2 bad usage.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Collection, Sequence
from dataclasses import dataclass

__all__ = ["build_parser", "main"]


@dataclass(frozen=True)
class _Mount:
    """A command: the line ``eossl --help`` lists, and where its arguments are declared.

    Attributes:
        help: the one-line summary in ``eossl --help``.
        arguments: ``module:function`` that adds the command's arguments (and usually its handler).
        description: the text above the command's own ``--help``, when the stage does not set one.
        handler: ``module:function`` that runs the command, when ``arguments`` does not set one.
    """

    help: str
    arguments: str
    description: str | None = None
    handler: str | None = None


_COMMANDS: dict[str, _Mount] = {
    "sample-data": _Mount(
        "write a synthetic SEN12MS-layout tree of complete triplets",
        "eossl.ingest.cli:add_sample_data_arguments",
    ),
    "ingest": _Mount(
        "SEN12MS GeoTIFFs -> WebDataset shards + Zarr store (+ 'ingest merge')",
        "eossl.ingest.cli:add_ingest_arguments",
    ),
    "verify": _Mount(
        "re-check a dataset: checksums, counts, shards vs Zarr", "eossl.ingest.cli:add_verify_arguments"
    ),
    "train": _Mount(
        "self-supervised pre-training (MoCo-v2, DINO); also via 'accelerate launch -m eossl.train'",
        "eossl.train.cli:add_train_arguments",
        handler="eossl.train.cli:run_train",
        description="Pre-train on an eossl dataset. Multi-process: accelerate launch [flags] -m "
        "eossl.train moco --data D --out RUN (configs in launch/accelerate/).",
    ),
    "eval": _Mount(
        "evaluation: scene classification and land-cover segmentation grids, result tables",
        "eossl.eval.cli:add_eval_arguments",
    ),
    "attention": _Mount(
        "ViT (DINO) attention maps, token-embedding maps and their mIoU with land cover",
        "eossl.eval.cli:add_attention_arguments",
        description="Per patch: the input (S1 false colour, S2 true colour, land cover), "
        "the last-layer CLS attention of every head, thresholded masks, token PCA and "
        "k-means maps, and the matched mIoU of masks and clusters against the land-cover "
        "map.",
    ),
    "study": _Mount(
        "scaling study: a grid of pre-training runs, each evaluated (also: study report)",
        "eossl.launch.study.cli:add_study_arguments",
        description="Run a grid (batch size x epochs x any config field) of pre-training runs, "
        "each followed by its evaluation, as MLflow runs nested under one parent; re-run to "
        "resume. 'eossl study report --config FILE' rebuilds the table and plots from MLflow.",
    ),
    "kit": _Mount(
        "render the SLURM script or Kubernetes manifest of a multi-node training run",
        "eossl.launch.cluster_cli:add_kit_arguments",
        description="Render launch/kits/ for N nodes: each node runs launch/kits/node.sh "
        "(accelerate launch for that node; pre-emption safe). Train arguments after --.",
    ),
    "bench": _Mount(
        "benchmarks (results in docs/BENCHMARKS.md)", "eossl.launch.bench.cli:add_bench_arguments"
    ),
    "doctor": _Mount(
        "check this machine before a run: versions, GPUs, DALI, training steps, S3, MLflow, cache",
        "eossl.launch.doctor:add_doctor_arguments",
    ),
    "mlflow": _Mount(
        "MLflow tracking server (eossl mlflow serve)", "eossl.launch.mlflow_server:add_mlflow_arguments"
    ),
}

# Two-word commands with a parser of their own (a source folder named "merge" is then "./merge").
_OWN_PARSERS = {
    ("ingest", "merge"): "eossl.ingest.cli:ingest_merge_parser",
    ("study", "report"): "eossl.launch.study.cli:study_report_parser",
}


def _load(target: str):
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def build_parser(commands: Collection[str] | None = None) -> argparse.ArgumentParser:
    """The ``eossl`` parser. Only ``commands`` (None: all) get their arguments, which imports their stage;
    the others are listed by name and help line."""
    parser = argparse.ArgumentParser(
        prog="eossl",
        description=(
            "eossl: stream SEN12MS (Sentinel-1/2, MODIS land cover) for self-supervised pre-training."
        ),
    )
    from importlib.metadata import PackageNotFoundError, version

    try:
        v = version("eossl")
    except PackageNotFoundError:
        v = "unknown"
    parser.add_argument("--version", action="version", version=f"eossl {v}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, mount in _COMMANDS.items():
        p = sub.add_parser(name, help=mount.help, description=mount.description)
        if commands is None or name in commands:
            _load(mount.arguments)(p)
            if mount.handler:
                p.set_defaults(handler=_load(mount.handler))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    own_parser = _OWN_PARSERS.get(tuple(argv[:2]))
    if own_parser:
        args = _load(own_parser)().parse_args(argv[2:])
    elif argv[:1] == ["kit"] and "--" in argv:  # everything after -- belongs to eossl.train
        cut = argv.index("--")
        args = build_parser(argv[:1]).parse_args(argv[:cut])
        args.train_args = tuple(argv[cut + 1 :])
    else:
        args = build_parser(argv[:1]).parse_args(argv)
    try:
        return args.handler(args)
    except (ValueError, FileNotFoundError, NotADirectoryError) as exc:
        print(f"eossl {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except (RuntimeError, FloatingPointError) as exc:  # IngestError, WriteError, diverged training
        print(f"eossl {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
