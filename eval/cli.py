"""Command-line arguments of ``eossl eval classify``, ``eossl eval segment`` and ``eossl eval report``.

A grid's settings come from its config dataclass (``eval/config.py``), whose defaults are the only
defaults: a flag is passed on only when typed, and its help shows the dataclass default. Each grid also
takes ``--config FILE`` and ``--set key=value`` as ``eossl train`` does; the sources apply in the order
dataclass defaults <- FILE <- --set <- flags, so a typed flag always wins.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from eossl.train.overrides import add_set_argument

from .config import PRECISIONS, ClassifyConfig, GridConfig, SegmentConfig, field_default

__all__ = ["add_attention_arguments", "add_eval_arguments"]

_ORDER = (
    "Settings apply in this order, later winning: the defaults shown, --config FILE, --set KEY=VALUE, "
    "then the flags given here."
)


def _csv(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())


def _seeds(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in _csv(text))


def _shown(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    return "none" if value is None else str(value)


class _GridFlags:
    """Adds a grid's flags: each one sets a config key, passes nothing unless typed, and says its default."""

    def __init__(self, parser: argparse.ArgumentParser, config: type[GridConfig], set_example: str) -> None:
        self.parser, self.config, self.keys = parser, config, []
        parser.add_argument("--dataset", required=True, help="dataset folder or URL with data.zarr")
        parser.add_argument("--out", required=True, help="output folder")
        parser.add_argument("--config", help="YAML file of config values (sections or dotted keys)")
        add_set_argument(
            parser, f"set any config field, e.g. {set_example} (a short key names the one field it can mean)"
        )

    def add(self, flag: str, key: str, text: str, show_default: bool = True, **kwargs: Any) -> None:
        """``flag`` sets config ``key``; its help is ``text`` plus the dataclass default."""
        if show_default:
            text = f"{text} (default: {_shown(field_default(self.config, key))})"
        if kwargs.get("action") != "store_const":
            kwargs.setdefault("metavar", flag.lstrip("-").upper().replace("-", "_"))
        self.parser.add_argument(flag, dest=key, default=argparse.SUPPRESS, help=text, **kwargs)
        self.keys.append(key)

    def common(self, protocol_help: str, seeds_help: str) -> None:
        """The flags of every grid's shared fields (``GridConfig``)."""
        self.add(
            "--checkpoint",
            "checkpoints",
            "pre-training run folder (its final backbone, else its latest checkpoint), one checkpoint "
            "RUN/checkpoints/step-N, timm:NAME (timm's weights from the local cache) or a weights file "
            "FILE@INPUT[@ARCH] (INPUT: ssl4eo_s2, ssl4eo_s1 or rgb); repeat for several (default: none)",
            show_default=False,
            action="append",
            metavar="RUN_DIR",
        )
        self.add("--inputs", "inputs", "table columns (s1,s2,s1s2)", type=_csv)
        self.add("--s2-bands", "s2_bands", "land (10), all (13), rgb or a comma list")
        self.add("--budget", "budget", "labels per cell: a budget written by ingest, or 'all'")
        self.add("--protocol", "protocol", protocol_help, choices=self.config.PROTOCOLS, metavar=None)
        self.add("--seeds", "seeds", seeds_help, type=_seeds)
        self.add(
            "--init",
            "inits",
            "rows: random, checkpoint, checkpoint-random-adapter, checkpoint-backbone-only",
            type=_csv,
        )
        self.add(
            "--precision", "precision", "autocast precision (accelerate)", choices=PRECISIONS, metavar=None
        )
        self.add("--experiment", "experiment", "MLflow experiment")

    def done(self, handler) -> None:
        self.parser.set_defaults(handler=handler, config_flags=tuple(self.keys))


def _grid_config(config: type[GridConfig], args: argparse.Namespace) -> GridConfig:
    """The config of a grid command: defaults <- --config FILE <- --set <- the flags typed."""
    from .config import load_grid_config

    flags = {k: getattr(args, k) for k in args.config_flags if hasattr(args, k)}
    required = {"dataset": args.dataset, "out": args.out}
    return load_grid_config(config, required, args.config, args.overrides, flags)


def _print_result(result: dict) -> None:
    print(result["results_md"].read_text())
    print(
        f"results: {result['results_csv']} and {result['results_md']}; MLflow parent run "
        f"{result['mlflow_parent_run_id']}"
    )


def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="eval_command", required=True, metavar="{classify,segment,report}")
    _add_classify(sub)
    _add_segment(sub)
    r = sub.add_parser("report", help="rebuild the results table from MLflow runs, without retraining")
    r.add_argument(
        "--parent", help="MLflow run id of an 'eval classify' grid (default: every cell of --experiment)"
    )
    r.add_argument(
        "--experiment",
        default=field_default(GridConfig, "experiment"),
        help="MLflow experiment (default: %(default)s)",
    )
    r.add_argument("--tracking-uri", help="default: MLFLOW_TRACKING_URI")
    r.add_argument("--out", required=True, help="folder for results.csv/.md")
    r.set_defaults(handler=_run_report)


def _add_classify(sub) -> None:
    c = sub.add_parser(
        "classify",
        help="scene classification grid: methods x inputs -> results.csv/.md + MLflow",
        description="Train a classifier per (method, input) cell on a label budget and score it on "
        "the scene-level hold-out split. Rows: random init and the given pre-training runs.",
        epilog=_ORDER,
    )
    g = _GridFlags(c, ClassifyConfig, "--set budget=all --set finetune_lr=1e-4")
    g.common(
        "linear (frozen features), finetune (all layers) or knn (frozen features)",
        "seeds (budget subset and classifier init per seed), e.g. 0,1,2",
    )
    g.add(
        "--label",
        "label",
        "classes: igbp_simple (10) or igbp (17) for SEN12MS, bigearthnet19 (19, with --multilabel) for "
        "BigEarthNet-MM",
        choices=["igbp_simple", "igbp", "bigearthnet19"],
        metavar=None,
    )
    g.add("--multilabel", "multilabel", "multi-label targets", action="store_const", const=True)
    g.add(
        "--random-backbone",
        "random_backbone",
        "timm model of the random init (default: the checkpoint's)",
        show_default=False,
    )
    g.add(
        "--metric",
        "metric",
        "headline metric (default overall_accuracy; map for multi-label)",
        show_default=False,
    )
    g.add("--epochs", "probe.finetune_epochs", "fine-tuning epochs", type=int)
    g.add("--batch-size", "probe.batch_size", "images per batch (features and fine-tuning)", type=int)
    g.add("--workers", "probe.workers", "DataLoader workers reading the Zarr store", type=int)
    g.done(_run_classify)


def _run_classify(args) -> int:
    from .classify import run_classification

    _print_result(run_classification(_grid_config(ClassifyConfig, args), tuple(["eossl", *sys.argv[1:]])))
    return 0


def _add_segment(sub) -> None:
    from .segment.data import CLASS_WEIGHTINGS, SEG_LABELS

    s = sub.add_parser(
        "segment",
        help="land-cover segmentation grid: methods x inputs -> results.csv/.md + MLflow",
        description="Train a segmentation head per (method, input) cell on a label budget and score "
        "per-pixel land cover (mIoU, per-class IoU, pixel accuracy) on the scene-level hold-out "
        "split. Rows: a random init per architecture and the given pre-training runs; for ViT runs "
        "also the mIoU of their unsupervised token clusters and attention masks. At least one "
        "--checkpoint (or checkpoints in --config) is needed: it also fixes the random init's "
        "architecture.",
        epilog=_ORDER,
    )
    g = _GridFlags(s, SegmentConfig, "--set budget=all --set weight_decay=0")
    g.common(
        "linear: linear head on frozen features; finetune: light decoder, backbone trained",
        "seeds (budget subset and head init per seed), e.g. 0,1,2",
    )
    g.add("--label", "label", "per-pixel classes from the LC layer", choices=list(SEG_LABELS), metavar=None)
    g.add(
        "--frozen",
        "frozen",
        "with --protocol finetune: keep the backbone frozen",
        show_default=False,
        action="store_const",
        const=True,
    )
    g.add("--epochs", "train.epochs", "training epochs over the labelled patches", type=int)
    g.add("--lr", "train.lr", "AdamW learning rate of the head", type=float)
    g.add(
        "--backbone-lr-scale",
        "train.backbone_lr_scale",
        "finetune: a pre-trained backbone's lr relative to the head's (a random one trains at 1x)",
        type=float,
    )
    g.add(
        "--crop",
        "train.crop",
        "train on random crops of this size in px (0: whole patches); evaluation uses whole patches",
        type=int,
    )
    g.add(
        "--class-weights",
        "train.class_weighting",
        "class weighting of the cross-entropy from training pixel frequencies",
        choices=list(CLASS_WEIGHTINGS),
        metavar=None,
    )
    g.add("--batch-size", "train.batch_size", "patches (crops) per step", type=int)
    g.add("--workers", "train.workers", "DataLoader workers reading the Zarr store", type=int)
    g.add("--figures", "figures", "hold-out patches drawn per cell (input, prediction, reference)", type=int)
    g.add(
        "--write-maps",
        "write_maps",
        "write each hold-out prediction (first seed) as a GeoTIFF on the patch's grid, one VRT per scene",
        show_default=False,
        action="store_const",
        const=True,
    )
    g.add(
        "--attention-patches",
        "attention_patches",
        "hold-out patches scored with a ViT's token clusters and attention masks (0: skip)",
        type=int,
    )
    g.done(_run_segment)


def _run_segment(args) -> int:
    from .segment import run_segmentation

    _print_result(run_segmentation(_grid_config(SegmentConfig, args), tuple(["eossl", *sys.argv[1:]])))
    return 0


def _run_report(args) -> int:
    from pathlib import Path

    from .report import collect_from_mlflow, write_tables

    cells = collect_from_mlflow(args.tracking_uri, args.parent, args.experiment)
    if not cells:
        raise ValueError(
            "no evaluation cells found in MLflow (check --parent / --experiment / the tracking URI)"
        )
    metric = cells[0]["metric"]
    task = "land-cover segmentation" if metric == "miou" else "scene classification"
    _, md = write_tables(cells, Path(args.out), f"SEN12MS {task} (from MLflow), metric {metric}")
    print(md.read_text())
    return 0


def add_attention_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--checkpoint",
        required=True,
        metavar="RUN_DIR",
        help="a DINO (ViT) pre-training run folder, or one of its checkpoints RUN/checkpoints/step-N",
    )
    p.add_argument("--dataset", required=True, help="dataset folder or URL with data.zarr")
    p.add_argument(
        "--keys",
        type=_csv,
        default=(),
        help="patch keys, e.g. ROIs1158_spring_1_p30,... (default: none; then --first)",
    )
    p.add_argument(
        "--first",
        type=int,
        default=0,
        help="instead of --keys: the first N hold-out patches that have land cover (default: %(default)s)",
    )
    p.add_argument("--out", required=True, help="folder for <key>.png, attention_metrics.json, summary.json")
    from .config import AttentionConfig  # light: dataclasses only

    keep_mass, clusters = AttentionConfig.keep_mass, AttentionConfig.n_clusters
    p.add_argument(
        "--keep-mass",
        type=float,
        default=keep_mass,
        help=f"attention mass kept by each head's mask (default: {keep_mass}, as in DINO)",
    )
    p.add_argument(
        "--clusters",
        type=int,
        default=clusters,
        help=f"k-means clusters of the patch tokens (default: {clusters})",
    )
    p.add_argument("--inputs", help="input sensors (default: the run's view 0, e.g. s1)")
    p.add_argument(
        "--mlflow-run",
        help="MLflow run id to log the figures to (tracking URI from MLFLOW_TRACKING_URI; default: none)",
    )
    p.set_defaults(handler=_run_attention)


def _first_test_keys(dataset: str, n: int) -> list[str]:
    import zarr

    from eossl.ingest.format import ZARR_DIR
    from eossl.ingest.storage import DatasetRoot

    group = zarr.open_group(DatasetRoot(dataset).zarr_store(ZARR_DIR, read_only=True), mode="r")
    keys, split, has_lc = group["key"][:], group["split"][:], group["has_lc"][:]
    return [str(k) for k, s, lc in zip(keys, split, has_lc, strict=True) if str(s) == "test" and lc][:n]


def _run_attention(args) -> int:
    from pathlib import Path

    from eossl.ingest.integrity import read_manifest
    from eossl.ingest.storage import DatasetRoot

    from .attention import attention_figures
    from .checkpoints import checkpoint_source, export_checkpoint

    read_manifest(DatasetRoot(args.dataset))  # says what the path is when it is not a dataset
    source = checkpoint_source(args.checkpoint)
    keys = list(args.keys) or (_first_test_keys(args.dataset, args.first) if args.first else [])
    if not keys:
        raise ValueError("give --keys K1,K2,... or --first N")
    result = attention_figures(
        str(export_checkpoint(source, Path(args.out), args.dataset)),
        args.dataset,
        keys,
        args.out,
        keep_mass=args.keep_mass,
        n_clusters=args.clusters,
        inputs=args.inputs,
        mlflow_run_id=args.mlflow_run,
    )
    for path in result["figures"]:
        print(f"figure: {path}")
    print(f"metrics: {args.out}/attention_metrics.json, summary: {args.out}/summary.json")
    return 0
