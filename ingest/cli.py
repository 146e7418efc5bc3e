"""Command-line arguments of ``eossl sample-data``, ``eossl ingest`` (and ``ingest merge``), ``eossl verify``.

A flag the user did not give is not passed on: the dataclass (or function) default is the only default,
and ``--help`` reads it from there (:func:`default_of`) instead of restating it. The module imports only
the standard library at the top, so mounting these commands costs nothing until one of them runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import sys
from collections.abc import Mapping
from typing import Any

__all__ = [
    "add_ingest_arguments",
    "add_sample_data_arguments",
    "add_verify_arguments",
    "default_of",
    "given",
    "ingest_merge_parser",
    "shown",
]


def default_of(owner: Any, path: str) -> Any:
    """The default of a dataclass field (``read.required`` walks nested dataclass fields) or of a parameter.

    Used by help texts, so that a default is written once, where the setting is declared.
    """
    name, _, rest = path.partition(".")
    if dataclasses.is_dataclass(owner):
        f = {f.name: f for f in dataclasses.fields(owner)}[name]
        value = f.default_factory() if f.default is dataclasses.MISSING else f.default
    else:
        value = inspect.signature(owner).parameters[name].default
    return default_of(type(value), rest) if rest else value


def shown(value: Any) -> str:
    """A default as the command line spells it: tuples comma-separated (``64,256,1024``)."""
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


def given(args: argparse.Namespace, fields: Mapping[str, str]) -> dict[str, Any]:
    """``{field: value}`` for the flags (``{flag dest: field}``) the user gave.

    Flags declared with ``default=SUPPRESS`` are absent from ``args`` unless given, so the dataclass
    defaults apply to the others.
    """
    values = vars(args)
    return {field: values[dest] for dest, field in fields.items() if dest in values}


def _csv(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())


def _csv_int(text: str) -> tuple[int, ...]:
    return tuple(int(t) for t in _csv(text))


def _megabytes(n_bytes: int) -> str:
    return f"{n_bytes / 10**6:g}MB"


def add_sample_data_arguments(p: argparse.ArgumentParser) -> None:
    from .sample_data import write_sample_data

    p.description = (
        "Synthetic s1/s2/lc triplets calibrated on real SEN12MS patches, with one land-cover "
        "map behind all three sensors (so classes are learnable from either)."
    )
    p.add_argument("dir", help="output folder (created)")

    def default(name: str) -> str:
        return shown(default_of(write_sample_data, name))

    p.add_argument(
        "--patches",
        type=int,
        default=argparse.SUPPRESS,
        help=f"number of patch triplets (default {default('patches')})",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=argparse.SUPPRESS,
        help=f"random seed; same seed, same bytes (default {default('seed')})",
    )
    p.add_argument(
        "--layout",
        choices=("sen12ms", "bigearthnet-mm", "bigearthnet-v2", "ssl4eo-s12"),
        default="sen12ms",
        help="source layout to write: SEN12MS triplets, BigEarthNet-MM S1/S2 patch folders, reBEN "
        "(BigEarthNet v2.0: patch folders + metadata.parquet) or SSL4EO-S12 locations (--patches locations "
        "x 4 seasons) (default sen12ms)",
    )
    p.add_argument(
        "--patches-per-scene",
        type=int,
        default=argparse.SUPPRESS,
        help=f"patches cut from each scene (default {default('patches_per_scene')})",
    )
    p.set_defaults(handler=_run_sample_data)


def _run_sample_data(args: argparse.Namespace) -> int:
    from .sample_data import write_sample_data

    if args.layout == "bigearthnet-mm":
        from .sample_sources import write_bigearthnet_sample

        options = given(
            args, {"patches": "patches", "seed": "seed", "patches_per_scene": "patches_per_product"}
        )
        files = write_bigearthnet_sample(args.dir, **options)
        print(f"wrote {len(files)} files (BigEarthNet-MM S1/S2 patch folders) to {args.dir}")
        return 0
    if args.layout == "bigearthnet-v2":
        from .sample_sources import write_reben_sample

        options = given(
            args, {"patches": "patches", "seed": "seed", "patches_per_scene": "patches_per_product"}
        )
        try:
            import pyarrow.parquet  # noqa: F401 - whether the tables can be parquet, as reBEN ships them
        except ImportError:
            options["table_format"] = "csv"
        files = write_reben_sample(args.dir, **options)
        tables = ", ".join(p.name for p in files if not p.name.endswith(".tif"))
        print(f"wrote {len(files)} files (reBEN S1/S2 patch folders and {tables}) to {args.dir}")
        return 0
    if args.layout == "ssl4eo-s12":
        from .sample_sources import write_ssl4eo_sample

        options = given(args, {"patches": "locations", "seed": "seed"})
        files = write_ssl4eo_sample(args.dir, **options)
        print(f"wrote {len(files)} GeoTIFFs (SSL4EO-S12 s1/, s2c/, s2a/) to {args.dir}")
        return 0
    options = given(args, {"patches": "patches", "seed": "seed", "patches_per_scene": "patches_per_scene"})
    files = write_sample_data(args.dir, **options)
    print(f"wrote {len(files)} GeoTIFFs ({len(files) // 3} patches) to {args.dir}")  # s1, s2, lc per patch
    return 0


# flag dest -> field, for IngestConfig and its read/split sections (--part and --shard-size are parsed)
_INGEST_FIELDS = {
    "workers": "workers",
    "formats": "formats",
    "zarr_shard_samples": "zarr_shard_samples",
    "source_format": "source_format",
}
_READ_FIELDS = {
    "required": "required",
    "max_s1_invalid": "max_s1_invalid_fraction",
    "max_s2_invalid": "max_s2_invalid_fraction",
    "max_lc_invalid": "max_lc_invalid_fraction",
    "multilabel_threshold": "multilabel_threshold",
}
_SPLIT_FIELDS = {
    "holdout_fraction": "holdout_fraction",
    "split_seed": "seed",
    "budgets": "budgets",
    "budget_seeds": "budget_seeds",
    "split_lists": "split_lists",
}


def add_ingest_arguments(p: argparse.ArgumentParser) -> None:
    from .config import IngestConfig

    def default(path: str) -> str:
        return shown(default_of(IngestConfig, path))

    i, n = default_of(IngestConfig, "part")
    p.description = (
        "Ingest a SEN12MS tree (local folder or URL such as s3://bucket/sen12ms/) into DATASET "
        "(folder or URL). Re-running the same command resumes. 'eossl ingest merge DATASET' "
        "finishes a dataset written by --part runs. Exit 0 when the run completed, also with "
        "rejected inputs."
    )
    from .sources import FORMAT_CHOICES

    p.add_argument(
        "source",
        help="source tree: SEN12MS (ROIs*_<season>/{s1,s2,lc}_<scene>/*.tif), BigEarthNet-MM, reBEN "
        "(BigEarthNet v2.0, with its metadata.parquet at the top) or SSL4EO-S12",
    )
    p.add_argument("dataset", help="output dataset folder or URL")
    p.add_argument(
        "--source-format",
        choices=FORMAT_CHOICES,
        default=argparse.SUPPRESS,
        help="layout of SOURCE; ssl4eo-s12 reads its L1C product, ssl4eo-s12-l2a its L2A one (default: "
        "detected from the tree; an ambiguous tree is refused)",
    )
    p.add_argument(
        "--reject-list",
        action="append",
        default=argparse.SUPPRESS,
        metavar="FILE",
        help="file naming samples to reject (first column, one per line), e.g. BigEarthNet's "
        "patches_with_seasonal_snow.csv and patches_with_cloud_and_shadow.csv; repeatable (default: none)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=argparse.SUPPRESS,
        help="parallel processes (GeoTIFF decoding is CPU bound: about one per core; "
        f"default {default('workers')})",
    )
    p.add_argument(
        "--part",
        default=argparse.SUPPRESS,
        help=f"i/N: ingest a deterministic 1/N of the units (then merge; default {i}/{n})",
    )
    p.add_argument(
        "--formats",
        type=_csv,
        default=argparse.SUPPRESS,
        help=f"wds, zarr or both (default {default('formats')})",
    )
    shard_size = _megabytes(default_of(IngestConfig, "shard_bytes"))
    p.add_argument(
        "--shard-size",
        default=argparse.SUPPRESS,
        help=f"target tar shard size (default {shard_size}; 100-500MB suits object stores)",
    )
    p.add_argument(
        "--zarr-shard-samples",
        type=int,
        default=argparse.SUPPRESS,
        help=f"samples per Zarr shard file (default {default('zarr_shard_samples')})",
    )
    p.add_argument(
        "--required",
        type=_csv,
        default=argparse.SUPPRESS,
        help=f"modalities a patch must have (default {default('read.required')}; lc optional: "
        "no lc = no labels)",
    )
    p.add_argument(
        "--max-s1-invalid",
        type=float,
        default=argparse.SUPPRESS,
        help="reject a patch with more than this fraction of invalid S1 pixels in one band: "
        f"NaN/Inf/nodata or outside [-60, 40] dB (default {default('read.max_s1_invalid_fraction')})",
    )
    p.add_argument(
        "--max-s2-invalid",
        type=float,
        default=argparse.SUPPRESS,
        help="reject a patch with more than this fraction of invalid S2 pixels in one band: 0 "
        f"(nodata) or above 20000, incl. 65535 saturated (default {default('read.max_s2_invalid_fraction')})",
    )
    p.add_argument(
        "--max-lc-invalid",
        type=float,
        default=argparse.SUPPRESS,
        help="reject a patch with more than this fraction of LC codes outside a layer's legend "
        f"(default {default('read.max_lc_invalid_fraction')})",
    )
    p.add_argument(
        "--multilabel-threshold",
        type=float,
        default=argparse.SUPPRESS,
        help="area fraction for a class to count in multi-label targets "
        f"(default {default('read.multilabel_threshold')}, as SEN12MS)",
    )
    p.add_argument(
        "--holdout-scenes",
        help="file with one test scene per line: the published SEN12MS_holdOutScenes.txt "
        "(ROIs1158_spring/s1_63) or ROIs1158_spring_63; '#' comments and blank lines are skipped "
        "(default: none, a --holdout-fraction of the scenes drawn with --split-seed)",
    )
    p.add_argument(
        "--split-lists",
        default=argparse.SUPPRESS,
        help="folder (or URL) with the published patch-level train_list and test_list (.txt or .pkl); "
        "each patch goes to the split its list names, unlisted patches to train",
    )
    p.add_argument(
        "--holdout-fraction",
        type=float,
        default=argparse.SUPPRESS,
        help=f"share of scenes held out (default {default('split.holdout_fraction')})",
    )
    p.add_argument(
        "--split-seed",
        type=int,
        default=argparse.SUPPRESS,
        help=f"seed of the scene split (default {default('split.seed')})",
    )
    p.add_argument(
        "--budgets",
        type=_csv_int,
        default=argparse.SUPPRESS,
        help=f"label budgets (default {default('split.budgets')})",
    )
    p.add_argument(
        "--budget-seeds",
        type=_csv_int,
        default=argparse.SUPPRESS,
        help=f"seeds per budget (default {default('split.budget_seeds')})",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(handler=_run_ingest)


def _ingest_config(args: argparse.Namespace):
    from .config import IngestConfig, SplitOptions, parse_part, parse_size
    from .read import ReadOptions

    options = given(args, _INGEST_FIELDS)
    if "part" in vars(args):
        options["part"] = parse_part(args.part)
    if "shard_size" in vars(args):
        options["shard_bytes"] = parse_size(args.shard_size)
    if "reject_list" in vars(args):
        options["reject_lists"] = tuple(args.reject_list)
    split = given(args, _SPLIT_FIELDS)
    if args.holdout_scenes:
        from .splits import read_scene_list

        with open(args.holdout_scenes, encoding="utf-8") as f:
            split["holdout_scenes"] = read_scene_list(f.read(), args.holdout_scenes)
    return IngestConfig(
        source=args.source,
        dataset=args.dataset,
        **options,
        read=ReadOptions(**given(args, _READ_FIELDS)),
        split=SplitOptions(**split),
        progress=not args.no_progress,
        command=tuple(["eossl", *sys.argv[1:]]),
    )


def _run_ingest(args: argparse.Namespace) -> int:
    from .writer import run_ingest

    summary = run_ingest(_ingest_config(args))
    print(summary.line())
    if summary.complete:
        print(f"dataset: {args.dataset} (manifest.json, rejects.jsonl, shards/, data.zarr)")
    return 0


def ingest_merge_parser() -> argparse.ArgumentParser:
    """``eossl ingest merge``: its own parser, so a source folder named ``merge`` is still ``./merge``."""
    from .config import default_workers

    m = argparse.ArgumentParser(
        prog="eossl ingest merge",
        description="Finish a dataset written by 'eossl ingest --part i/N' runs: "
        "checks every part is done, then writes rejects, subsets, Zarr and manifest.",
    )
    m.add_argument("dataset", help="the DATASET all parts wrote into")
    m.add_argument(
        "--workers",
        type=int,
        default=argparse.SUPPRESS,
        help=f"parallel processes (default {default_workers()})",
    )
    m.set_defaults(handler=_run_merge, command="ingest merge")
    return m


def _run_merge(args: argparse.Namespace) -> int:
    from .finalize import merge

    command = tuple(["eossl", *sys.argv[1:]])
    manifest = merge(args.dataset, command=command, **given(args, {"workers": "workers"}))
    c = manifest["counts"]
    print(
        f"merge complete: {c['patches_found']} patches found, {c['samples_written']} written, "
        f"{c['rejected']} rejected -> {args.dataset}"
    )
    return 0


def add_verify_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dataset", help="dataset folder or URL")
    p.add_argument("--deep", action="store_true", help="also compare every array in the shards with Zarr")
    p.add_argument(
        "--workers",
        type=int,
        default=argparse.SUPPRESS,
        help="shards checked in parallel, one process each; each shard is read once (default 1)",
    )
    p.set_defaults(handler=_run_verify)


def _run_verify(args: argparse.Namespace) -> int:
    from .format import MANIFEST
    from .integrity import DatasetMissingError, missing_dataset_reason
    from .storage import DatasetRoot
    from .verify import verify

    root = DatasetRoot(args.dataset)
    if not root.exists(MANIFEST):  # not a dataset at all (exit 2), as opposed to a damaged one (exit 1)
        raise DatasetMissingError(missing_dataset_reason(root))
    if getattr(args, "workers", 1) < 1:
        raise ValueError(f"--workers must be >= 1, got {args.workers}")
    problems = verify(
        args.dataset, deep=args.deep, **({"workers": args.workers} if "workers" in args else {})
    )
    for p in problems:
        print(f"FAIL {p}")
    counted = f" ({len(problems)} problems)" if problems else ""
    print(f"verify {'failed' if problems else 'ok'}: {args.dataset}{counted}")
    return 1 if problems else 0
