"""The ``eossl bench ...`` subcommands: options read their defaults (and their help's) from ``configs``.

Handlers import the benches lazily: building the parser loads no torch, DALI or rasterio.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from .configs import IngestBenchConfig, LoaderBenchConfig, TrainBenchConfig

__all__ = ["add_bench_arguments"]


def _default(config: type, name: str) -> Any:
    """The dataclass default of field ``name``: the single source of a bench option's default."""
    return next(f.default for f in dataclasses.fields(config) if f.name == name)


def _option(parser: argparse.ArgumentParser, flag: str, config: type, text: str, **kwargs: Any) -> None:
    """``--flag`` with the default of the same-named field of ``config``, shown as "(default: X)"."""
    name = flag.removeprefix("--").replace("-", "_")
    default = _default(config, name)
    parser.add_argument(flag, default=default, help=f"{text} (default: {default})", **kwargs)


def _add_ingest(bsub) -> None:
    bi = bsub.add_parser("ingest", help="ingest patches/s and MB/s against bare rasterio reads")
    bi.add_argument("--source", help="SEN12MS tree (default: synthetic sample data)")
    _option(bi, "--patches", IngestBenchConfig, "synthetic patches when no --source", type=int)
    _option(bi, "--workers", IngestBenchConfig, "ingest processes", type=int)
    _option(bi, "--repeat", IngestBenchConfig, "runs per measurement; the median is reported", type=int)
    bi.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    bi.set_defaults(handler=_run_ingest)


def _add_encoding(bsub) -> None:
    be = bsub.add_parser("encoding", help="bytes/sample and decode MB/s per core of shard encodings")
    be.add_argument("--source", help="SEN12MS tree (default: the real patches shipped with eossl)")
    be.add_argument("--json", action="store_true")
    be.set_defaults(handler=_run_encoding)


def _add_loader(bsub) -> None:
    cfg = LoaderBenchConfig
    bl = bsub.add_parser("loader", help="streaming loader samples/s vs rasterio GeoTIFFs + torch DataLoader")
    bl.add_argument("--source", help="SEN12MS GeoTIFF tree the dataset was ingested from")
    bl.add_argument(
        "--dataset",
        help=f"dataset of the same patches (default: {_default(cfg, 'patches')} "
        "synthetic patches, temp folder)",
    )
    _option(bl, "--patches", cfg, "synthetic patches when no --source/--dataset", type=int)
    _option(
        bl, "--max-samples", cfg, "bench the first N samples of the dataset, a few shards; 0: all", type=int
    )
    bl.add_argument("--s3-source", help="the GeoTIFF tree on S3 (s3://...; endpoint from AWS_ENDPOINT_URL)")
    bl.add_argument(
        "--s3-dataset", help="the dataset on S3 (with --s3-source): both sides are also timed from S3"
    )
    bl.add_argument(
        "--local-s3",
        action="store_true",
        help="start a local S3-compatible server (moto, test extra), upload both and time them from it",
    )
    _option(
        bl,
        "--s3-latency-ms",
        cfg,
        "with --local-s3: delay of every request through a proxy in front of the server",
        type=float,
    )
    _option(bl, "--s3-bandwidth-mb-s", cfg, "with --local-s3: response rate per connection, MB/s", type=float)
    _option(bl, "--workers", cfg, "reader processes on both sides", type=int)
    _option(bl, "--batch-size", cfg, "samples per batch on both sides", type=int)
    _option(bl, "--samples", cfg, "samples timed per run (at least two epochs)", type=int)
    _option(bl, "--repeat", cfg, "alternating runs per side; medians reported", type=int)
    bl.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    bl.set_defaults(handler=_run_loader)


def _add_train(bsub) -> None:
    bt = bsub.add_parser(
        "train", help="training samples/s fed by the streaming loader vs synthetic on-device data"
    )
    bt.add_argument(
        "--data",
        help=f"dataset (default: a synthetic {_default(TrainBenchConfig, 'patches')}-patch "
        "dataset in a temp folder)",
    )
    from eossl.train.methods import METHODS  # names only: the classes load on first use

    _option(bt, "--method", TrainBenchConfig, "pre-training method", choices=list(METHODS))
    _option(bt, "--steps", TrainBenchConfig, "optimiser steps per side (first 20%% are warm-up)", type=int)
    bt.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config overrides (default on CPU: resnet18, batch 16, 96 px; on GPU: resnet50, "
        "bf16, batch 64, 224 px, DALI on the GPU)",
    )
    bt.add_argument("--json", action="store_true")
    bt.set_defaults(handler=_run_train)


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    """The ``eossl bench`` command's subcommands: ``{ingest,encoding,loader,train}``."""
    bsub = p.add_subparsers(dest="bench", required=True, metavar="{ingest,encoding,loader,train}")
    _add_ingest(bsub)
    _add_encoding(bsub)
    _add_loader(bsub)
    _add_train(bsub)


def _run_ingest(args) -> int:
    from .harness import print_result
    from .ingest import bench_ingest

    cfg = IngestBenchConfig(
        source=args.source, patches=args.patches, workers=args.workers, repeat=args.repeat
    )
    print_result(bench_ingest(cfg), args.json)
    return 0


def _run_encoding(args) -> int:
    from .encoding import bench_encoding
    from .harness import print_result

    print_result(bench_encoding(args.source), args.json)
    return 0


def _run_loader(args) -> int:
    from .harness import print_result
    from .loader import bench_loader

    cfg = LoaderBenchConfig(
        args.source,
        args.dataset,
        workers=args.workers,
        batch_size=args.batch_size,
        samples=args.samples,
        repeat=args.repeat,
        patches=args.patches,
        max_samples=args.max_samples or None,
        s3_source=args.s3_source,
        s3_dataset=args.s3_dataset,
        local_s3=args.local_s3,
        s3_latency_ms=args.s3_latency_ms,
        s3_bandwidth_mb_s=args.s3_bandwidth_mb_s,
    )
    print_result(bench_loader(cfg), args.json)
    return 0


def _run_train(args) -> int:
    from .harness import print_result
    from .train import bench_train_command

    cfg = TrainBenchConfig(data=args.data, method=args.method, steps=args.steps)
    print_result(bench_train_command(cfg, dict(o.split("=", 1) for o in args.overrides)), args.json)
    return 0
