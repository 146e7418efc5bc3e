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
    "sample-data": _Mount("write a synthetic SEN12MS-layout tree of complete triplets",
                          "eossl.ingest.cli:add_sample_data_arguments"),
    "ingest": _Mount("SEN12MS GeoTIFFs -> WebDataset shards + Zarr store (+ 'ingest merge')",
                     "eossl.ingest.cli:add_ingest_arguments"),
    "verify": _Mount("re-check a dataset: checksums, counts, shards vs Zarr",
                     "eossl.ingest.cli:add_verify_arguments"),
    "train": _Mount("self-supervised pre-training (MoCo-v2, DINO); also via "
                    "'accelerate launch -m eossl.train'", "eossl.train.cli:add_train_arguments",
                    handler="eossl.train.cli:run_train",
                    description="Pre-train on an eossl dataset. Multi-process: accelerate launch [flags] -m "
                    "eossl.train moco --data D --out RUN (configs in launch/accelerate/)."),
    "eval": _Mount("evaluation: scene classification and land-cover segmentation grids, result tables",
                   "eossl.eval.cli:add_eval_arguments"),
    "attention": _Mount("ViT (DINO) attention maps, token-embedding maps and their mIoU with land cover",
                        "eossl.eval.cli:add_attention_arguments",
                        description="Per patch: the input (S1 false colour, S2 true colour, land cover), "
                        "the last-layer CLS attention of every head, thresholded masks, token PCA and "
                        "k-means maps, and the matched mIoU of masks and clusters against the land-cover "
                        "map."),
    "study": _Mount("scaling study: a grid of pre-training runs, each evaluated (also: study report)",
                    "eossl.launch.study.cli:add_study_arguments",
                    description="Run a grid (batch size x epochs x any config field) of pre-training runs, "
                    "each followed by its evaluation, as MLflow runs nested under one parent; re-run to "
                    "resume. 'eossl study report --config FILE' rebuilds the table and plots from MLflow."),
    "kit": _Mount("render the SLURM script or Kubernetes manifest of a multi-node training run",
                  "eossl.launch.cluster_cli:add_kit_arguments",
                  description="Render launch/kits/ for N nodes: each node runs launch/kits/node.sh "
                  "(accelerate launch for that node; pre-emption safe). Train arguments after --."),
    "mlflow": _Mount("MLflow tracking server (eossl mlflow serve)",
                     "eossl.launch.mlflow_server:add_mlflow_arguments"),
}

# Two-word commands with a parser of their own (a source folder named "merge" is then "./merge").
_OWN_PARSERS = {
    ("ingest", "merge"): "eossl.ingest.cli:ingest_merge_parser",
    ("study", "report"): "eossl.launch.study.cli:study_report_parser",
}


def _load(target: str):
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def _add_bench(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks (results in docs/BENCHMARKS.md)")
    bsub = p.add_subparsers(dest="bench", required=True, metavar="{ingest,encoding,loader,train}")
    bi = bsub.add_parser("ingest", help="ingest patches/s and MB/s against bare rasterio reads")
    bi.add_argument("--source", help="SEN12MS tree (default: synthetic sample data)")
    bi.add_argument("--patches", type=int, default=48, help="synthetic patches when no --source (48)")
    bi.add_argument("--workers", type=int, default=1)
    bi.add_argument("--repeat", type=int, default=3, help="runs per measurement; the median is reported")
    bi.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    bi.set_defaults(handler=_run_bench_ingest)
    be = bsub.add_parser("encoding", help="bytes/sample and decode MB/s per core of shard encodings")
    be.add_argument("--source", help="SEN12MS tree (default: the real patches shipped with eossl)")
    be.add_argument("--json", action="store_true")
    be.set_defaults(handler=_run_bench_encoding)
    bl = bsub.add_parser("loader", help="streaming loader samples/s vs rasterio GeoTIFFs + torch DataLoader")
    bl.add_argument("--source", help="SEN12MS GeoTIFF tree the dataset was ingested from")
    bl.add_argument("--dataset", help="dataset of the same patches (default: 64 synthetic patches, temp folder)")
    bl.add_argument("--patches", type=int, default=64, help="synthetic patches when no --source/--dataset (64)")
    bl.add_argument("--max-samples", type=int, default=256,
                    help="bench the first N samples of the dataset, a few shards (256; 0: all)")
    bl.add_argument("--s3-source", help="the GeoTIFF tree on S3 (s3://...; endpoint from AWS_ENDPOINT_URL)")
    bl.add_argument("--s3-dataset", help="the dataset on S3 (with --s3-source): both sides are also timed from S3")
    bl.add_argument("--local-s3", action="store_true",
                    help="start a local S3-compatible server (moto, test extra), upload both and time them from it")
    bl.add_argument("--workers", type=int, default=2, help="reader processes on both sides (2)")
    bl.add_argument("--batch-size", type=int, default=32)
    bl.add_argument("--samples", type=int, default=512, help="samples timed per run (at least two epochs)")
    bl.add_argument("--repeat", type=int, default=3, help="alternating runs per side; medians reported")
    bl.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    bl.set_defaults(handler=_run_bench_loader)
    _add_bench_train(bsub)


def _add_bench_train(bsub) -> None:
    bt = bsub.add_parser("train", help="training samples/s fed by the streaming loader vs synthetic on-device data")
    bt.add_argument("--data", help="dataset (default: a synthetic 64-patch dataset in a temp folder)")
    bt.add_argument("--method", default="moco", choices=["moco", "dino"])
    bt.add_argument("--steps", type=int, default=30, help="optimiser steps per side (first 20%% are warm-up)")
    bt.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="config overrides (default on CPU: resnet18, batch 16, 96 px; on GPU: resnet50, "
                    "bf16, batch 64, 224 px, DALI on the GPU)")
    bt.add_argument("--json", action="store_true")
    bt.set_defaults(handler=_run_bench_train)


def _run_bench_train(args) -> int:
    import tempfile

    import torch

    from eossl.ingest.bench import print_result
    from eossl.train.bench import bench_train

    gpu = torch.cuda.is_available()
    if args.method == "dino":  # ViT-S/16 multi-crop (2 x 224 + 6 x 96) on a GPU; a tiny ViT on CPU
        defaults = ({"backbone": "vit_small_patch16_224", "batch_size": "64", "precision": "bf16", "device": "gpu",
                     "workers": "4", "threads": "4", "split": "all"} if gpu else
                    {"backbone": "vit_tiny_patch16_224", "batch_size": "16", "size": "64", "local_size": "32",
                     "n_local": "4", "out_dim": "4096", "workers": "1", "threads": "2", "split": "all"})
    elif gpu:
        defaults = {"backbone": "resnet50", "batch_size": "64", "precision": "bf16", "size": "224",
                    "queue_size": "4096", "device": "gpu", "workers": "4", "threads": "4", "split": "all"}
    else:
        defaults = {"backbone": "resnet18", "batch_size": "16", "size": "96", "queue_size": "1024",
                    "hidden": "512", "workers": "1", "threads": "2", "split": "all"}
    overrides = {**defaults, **dict(o.split("=", 1) for o in args.overrides)}
    if args.data is not None:
        print_result(bench_train(args.data, args.method, args.steps, overrides), args.json)
        return 0
    from eossl.ingest.config import IngestConfig, SplitOptions
    from eossl.ingest.sample_data import write_sample_data
    from eossl.ingest.writer import run_ingest

    with tempfile.TemporaryDirectory(prefix="eossl-bench-data-") as tmp:  # removed afterwards, even on error
        write_sample_data(f"{tmp}/src", 64, seed=0)
        run_ingest(IngestConfig(source=f"{tmp}/src", dataset=f"{tmp}/ds", shard_bytes=32 * 2**20, progress=False,
                                split=SplitOptions(budgets=())))
        print_result(bench_train(f"{tmp}/ds", args.method, args.steps, overrides), args.json)
    return 0


def _run_bench_loader(args) -> int:
    from eossl.ingest.bench import print_result
    from eossl.streaming.bench import bench_loader

    result = bench_loader(args.source, args.dataset, workers=args.workers, batch_size=args.batch_size,
                          samples=args.samples, repeat=args.repeat, patches=args.patches,
                          max_samples=args.max_samples or None, s3_source=args.s3_source,
                          s3_dataset=args.s3_dataset, local_s3=args.local_s3)
    print_result(result, args.json)
    return 0


def _run_bench_ingest(args) -> int:
    from eossl.ingest.bench import bench_ingest, print_result

    print_result(bench_ingest(args.source, args.patches, args.workers, args.repeat), args.json)
    return 0


def _run_bench_encoding(args) -> int:
    from eossl.ingest.bench import bench_encoding, print_result

    print_result(bench_encoding(args.source), args.json)
    return 0


def build_parser(commands: Collection[str] | None = None) -> argparse.ArgumentParser:
    """The ``eossl`` parser. Only ``commands`` (None: all) get their arguments, which imports their stage;
    the others are listed by name and help line."""
    parser = argparse.ArgumentParser(
        prog="eossl",
        description="eossl: stream SEN12MS (Sentinel-1/2, MODIS land cover) for self-supervised pre-training.",
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
    _add_bench(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    own_parser = _OWN_PARSERS.get(tuple(argv[:2]))
    if own_parser:
        args = _load(own_parser)().parse_args(argv[2:])
    elif argv[:1] == ["kit"] and "--" in argv:  # everything after -- belongs to eossl.train
        cut = argv.index("--")
        args = build_parser(argv[:1]).parse_args(argv[:cut])
        args.train_args = tuple(argv[cut + 1:])
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
