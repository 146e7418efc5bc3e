"""The ``eossl`` command: one entry point, one subcommand per stage.

Handlers import their stage lazily so ``eossl --help`` stays instant and a stage's heavy dependencies
(torch, DALI) load only when that stage runs. Exit codes: 0 done, 1 could not complete, 2 bad usage.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

__all__ = ["build_parser", "main"]


def _csv(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())


def _csv_int(text: str) -> tuple[int, ...]:
    return tuple(int(t) for t in _csv(text))


def _add_sample_data(sub) -> None:
    p = sub.add_parser("sample-data", help="write a synthetic SEN12MS-layout tree of complete triplets",
                       description="Synthetic s1/s2/lc triplets calibrated on real SEN12MS patches, with one "
                       "land-cover map behind all three sensors (so classes are learnable from either).")
    p.add_argument("dir", help="output folder (created)")
    p.add_argument("--patches", type=int, default=32, help="number of patch triplets (default 32)")
    p.add_argument("--seed", type=int, default=0, help="random seed; same seed, same bytes")
    p.add_argument("--patches-per-scene", type=int, default=4, help="patches cut from each scene (default 4)")
    p.set_defaults(handler=_run_sample_data)


def _run_sample_data(args) -> int:
    from eossl.ingest.sample_data import write_sample_data

    files = write_sample_data(args.dir, args.patches, args.seed, patches_per_scene=args.patches_per_scene)
    print(f"wrote {len(files)} GeoTIFFs ({args.patches} patches) to {args.dir}")
    return 0


def _add_ingest(sub) -> None:
    p = sub.add_parser(
        "ingest", help="SEN12MS GeoTIFFs -> WebDataset shards + Zarr store (+ 'ingest merge')",
        description="Ingest a SEN12MS tree (local folder or URL such as s3://bucket/sen12ms/) into DATASET "
        "(folder or URL). Re-running the same command resumes. 'eossl ingest merge DATASET' finishes a "
        "dataset written by --part runs. Exit 0 when the run completed, also with rejected inputs.",
    )
    p.add_argument("source", help="SEN12MS root: ROIs*_<season>/{s1,s2,lc}_<scene>/*.tif")
    p.add_argument("dataset", help="output dataset folder or URL")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="parallel processes (GeoTIFF decoding is CPU bound: about one per core)")
    p.add_argument("--part", default="0/1", help="i/N: ingest a deterministic 1/N of the units (then merge)")
    p.add_argument("--formats", type=_csv, default=("wds", "zarr"), help="wds,zarr (default both)")
    p.add_argument("--shard-size", default="256MB",
                   help="target tar shard size (default 256MB; 100-500MB suits object stores)")
    p.add_argument("--zarr-shard-samples", type=int, default=64, help="samples per Zarr shard file")
    p.add_argument("--required", type=_csv, default=("s1", "s2"),
                   help="modalities a patch must have (default s1,s2; lc optional: no lc = no labels)")
    p.add_argument("--max-s1-invalid", type=float, default=0.01,
                   help="reject a patch with more than this fraction of invalid S1 pixels in one band: "
                   "NaN/Inf/nodata or outside [-60, 40] dB (0.01)")
    p.add_argument("--max-s2-invalid", type=float, default=0.01,
                   help="reject a patch with more than this fraction of invalid S2 pixels in one band: "
                   "0 (nodata) or above 20000, incl. 65535 saturated (0.01)")
    p.add_argument("--max-lc-invalid", type=float, default=0.01,
                   help="reject a patch with more than this fraction of LC codes outside a layer's legend (0.01)")
    p.add_argument("--multilabel-threshold", type=float, default=0.1,
                   help="area fraction for a class to count in multi-label targets (0.1, as SEN12MS)")
    p.add_argument("--holdout-scenes", help="file with one test scene per line (e.g. ROIs1158_spring_1)")
    p.add_argument("--holdout-fraction", type=float, default=0.1, help="share of scenes held out (0.1)")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the scene split")
    p.add_argument("--budgets", type=_csv_int, default=(64, 256, 1024), help="label budgets (64,256,1024)")
    p.add_argument("--budget-seeds", type=_csv_int, default=(0, 1, 2), help="seeds per budget (0,1,2)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(handler=_run_ingest)



def _merge_parser() -> argparse.ArgumentParser:
    m = argparse.ArgumentParser(prog="eossl ingest merge",
                                description="Finish a dataset written by 'eossl ingest --part i/N' runs: "
                                "checks every part is done, then writes rejects, subsets, Zarr and manifest.")
    m.add_argument("dataset", help="the DATASET all parts wrote into")
    m.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    m.set_defaults(handler=_run_merge, command="ingest merge")
    return m


def _ingest_config(args):
    from eossl.ingest.config import IngestConfig, SplitOptions, parse_part, parse_size
    from eossl.ingest.read import ReadOptions

    holdout = None
    if args.holdout_scenes:
        with open(args.holdout_scenes) as f:
            holdout = tuple(line.strip() for line in f if line.strip() and not line.startswith("#"))
    return IngestConfig(
        source=args.source,
        dataset=args.dataset,
        formats=args.formats,
        workers=args.workers,
        part=parse_part(args.part),
        shard_bytes=parse_size(args.shard_size),
        zarr_shard_samples=args.zarr_shard_samples,
        read=ReadOptions(required=args.required, max_s1_invalid_fraction=args.max_s1_invalid,
                         max_s2_invalid_fraction=args.max_s2_invalid, max_lc_invalid_fraction=args.max_lc_invalid,
                         multilabel_threshold=args.multilabel_threshold),
        split=SplitOptions(holdout_fraction=args.holdout_fraction, seed=args.split_seed, holdout_scenes=holdout,
                           budgets=args.budgets, budget_seeds=args.budget_seeds),
        progress=not args.no_progress,
        command=tuple(["eossl", *sys.argv[1:]]),
    )


def _run_ingest(args) -> int:
    from eossl.ingest.writer import run_ingest

    summary = run_ingest(_ingest_config(args))
    print(summary.line())
    if summary.complete:
        print(f"dataset: {args.dataset} (manifest.json, rejects.jsonl, shards/, data.zarr)")
    return 0


def _run_merge(args) -> int:
    from eossl.ingest.finalize import merge

    manifest = merge(args.dataset, args.workers, tuple(["eossl", *sys.argv[1:]]))
    c = manifest["counts"]
    print(f"merge complete: {c['patches_found']} patches found, {c['samples_written']} written, "
          f"{c['rejected']} rejected -> {args.dataset}")
    return 0


def _add_verify(sub) -> None:
    p = sub.add_parser("verify", help="re-check a dataset: checksums, counts, shards vs Zarr")
    p.add_argument("dataset", help="dataset folder or URL")
    p.add_argument("--deep", action="store_true", help="also compare every array in the shards with Zarr")
    p.set_defaults(handler=_run_verify)


def _run_verify(args) -> int:
    from eossl.ingest.verify import verify

    problems = verify(args.dataset, deep=args.deep)
    for p in problems:
        print(f"FAIL {p}")
    print(f"verify {'failed' if problems else 'ok'}: {args.dataset}" + (f" ({len(problems)} problems)" if problems else ""))
    return 1 if problems else 0


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


def _add_train(sub) -> None:
    from eossl.train.cli import add_train_arguments, run_train

    p = sub.add_parser("train", help="self-supervised pre-training (MoCo-v2, DINO); also via 'accelerate launch -m eossl.train'",
                       description="Pre-train on an eossl dataset. Multi-process: accelerate launch [flags] -m "
                       "eossl.train moco --data D --out RUN (configs in launch/accelerate/).")
    add_train_arguments(p)
    p.set_defaults(handler=run_train)


def _add_eval(sub) -> None:
    from eossl.eval.cli import add_eval_arguments

    p = sub.add_parser("eval", help="evaluation: scene classification and land-cover segmentation grids, result tables")
    add_eval_arguments(p)


def _add_attention(sub) -> None:
    from eossl.eval.cli import add_attention_arguments

    p = sub.add_parser("attention", help="ViT (DINO) attention maps, token-embedding maps and their mIoU with land cover",
                       description="Per patch: the input (S1 false colour, S2 true colour, land cover), the last-layer "
                       "CLS attention of every head, thresholded masks, token PCA and k-means maps, and the "
                       "matched mIoU of masks and clusters against the land-cover map.")
    add_attention_arguments(p)


def _add_study(sub) -> None:
    from .study_cli import add_kit_arguments, add_mlflow_arguments, add_study_arguments

    p = sub.add_parser("study", help="scaling study: a grid of pre-training runs, each evaluated (also: study report)",
                       description="Run a grid (batch size x epochs x any config field) of pre-training runs, each "
                       "followed by its evaluation, as MLflow runs nested under one parent; re-run to resume. "
                       "'eossl study report --config FILE' rebuilds the table and plots from MLflow.")
    add_study_arguments(p)
    k = sub.add_parser("kit", help="render the SLURM script or Kubernetes manifest of a multi-node training run",
                       description="Render launch/kits/ for N nodes: each node runs launch/kits/node.sh "
                       "(accelerate launch for that node; pre-emption safe). Train arguments after --.")
    add_kit_arguments(k)
    m = sub.add_parser("mlflow", help="MLflow tracking server (eossl mlflow serve)")
    add_mlflow_arguments(m)


def build_parser() -> argparse.ArgumentParser:
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
    _add_sample_data(sub)
    _add_ingest(sub)
    _add_verify(sub)
    _add_train(sub)
    _add_eval(sub)
    _add_attention(sub)
    _add_study(sub)
    _add_bench(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:2] == ["ingest", "merge"]:  # its own parser (a source folder named merge: ./merge)
        args = _merge_parser().parse_args(argv[2:])
    elif argv[:2] == ["study", "report"]:
        from .study_cli import study_report_parser

        args = study_report_parser().parse_args(argv[2:])
    elif argv[:1] == ["kit"] and "--" in argv:  # everything after -- belongs to eossl.train
        cut = argv.index("--")
        args = build_parser().parse_args(argv[:cut])
        args.train_args = tuple(argv[cut + 1:])
    else:
        args = build_parser().parse_args(argv)
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
