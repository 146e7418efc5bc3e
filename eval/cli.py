"""Command-line arguments of ``eossl eval classify``, ``eossl eval segment`` and ``eossl eval report``."""

from __future__ import annotations

import argparse
import sys

__all__ = ["add_eval_arguments"]


def _csv(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())


def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="eval_command", required=True, metavar="{classify,segment,report}")
    c = sub.add_parser("classify", help="scene classification grid: methods x inputs -> results.csv/.md + MLflow",
                       description="Train a classifier per (method, input) cell on a label budget and score it on "
                       "the scene-level hold-out split. Rows: random init and the given pre-training runs.")
    c.add_argument("--checkpoint", action="append", default=[], metavar="RUN_DIR",
                   help="pre-training run folder (repeat for several methods)")
    c.add_argument("--dataset", required=True, help="dataset folder or URL with data.zarr")
    c.add_argument("--inputs", type=_csv, default=("s1", "s2", "s1s2"), help="table columns (s1,s2,s1s2)")
    c.add_argument("--s2-bands", default="land", help="land (10, default), all (13), rgb or a comma list")
    c.add_argument("--budget", default="1024", help="labels per cell: a budget written by ingest, or 'all'")
    c.add_argument("--protocol", default="linear", choices=["linear", "finetune", "knn"])
    c.add_argument("--seeds", type=lambda t: tuple(int(v) for v in _csv(t)), default=(0,),
                   help="seeds (budget subset and classifier init per seed), e.g. 0,1,2")
    c.add_argument("--label", default="igbp_simple", choices=["igbp_simple", "igbp"])
    c.add_argument("--multilabel", action="store_true", help="multi-label targets (default: single-label)")
    c.add_argument("--init", type=_csv, default=("random", "checkpoint"),
                   help="rows: random, checkpoint, checkpoint-random-adapter, checkpoint-backbone-only")
    c.add_argument("--random-backbone", help="timm model of the random init (default: the checkpoint's)")
    c.add_argument("--metric", help="headline metric (default overall_accuracy; map for multi-label)")
    c.add_argument("--epochs", type=int, help="fine-tuning epochs (default 10)")
    c.add_argument("--batch-size", type=int, default=32)
    c.add_argument("--workers", type=int, default=0, help="DataLoader workers reading the Zarr store")
    c.add_argument("--precision", default="no", choices=["no", "bf16"], help="autocast precision (accelerate)")
    c.add_argument("--experiment", default="eossl-eval", help="MLflow experiment")
    c.add_argument("--out", required=True, help="output folder")
    c.set_defaults(handler=_run_classify)
    _add_segment(sub)
    r = sub.add_parser("report", help="rebuild the results table from MLflow runs, without retraining")
    r.add_argument("--parent", help="MLflow run id of an 'eval classify' grid (default: every cell of --experiment)")
    r.add_argument("--experiment", default="eossl-eval")
    r.add_argument("--tracking-uri", help="default: MLFLOW_TRACKING_URI")
    r.add_argument("--out", required=True, help="folder for results.csv/.md")
    r.set_defaults(handler=_run_report)


def _run_classify(args) -> int:
    from dataclasses import replace

    from .classify import ClassifyConfig, run_classification
    from .probes import ProbeConfig

    probe = ProbeConfig(batch_size=args.batch_size, workers=args.workers)
    if args.epochs is not None:
        probe = replace(probe, finetune_epochs=args.epochs)
    cfg = ClassifyConfig(dataset=args.dataset, out=args.out, checkpoints=tuple(args.checkpoint), inputs=args.inputs,
                         s2_bands=args.s2_bands, budget=args.budget, protocol=args.protocol, seeds=args.seeds,
                         label=args.label, multilabel=args.multilabel, inits=args.init,
                         random_backbone=args.random_backbone, metric=args.metric, probe=probe,
                         precision=args.precision, experiment=args.experiment)
    result = run_classification(cfg, tuple(["eossl", *sys.argv[1:]]))
    print(result["results_md"].read_text())
    print(f"results: {result['results_csv']} and {result['results_md']}; MLflow parent run "
          f"{result['mlflow_parent_run_id']}")
    return 0


def _add_segment(sub) -> None:
    from .seg_data import CLASS_WEIGHTINGS, SEG_LABELS

    g = sub.add_parser("segment", help="land-cover segmentation grid: methods x inputs -> results.csv/.md + MLflow",
                       description="Train a segmentation head per (method, input) cell on a label budget and score "
                       "per-pixel land cover (mIoU, per-class IoU, pixel accuracy) on the scene-level hold-out "
                       "split. Rows: a random init per architecture and the given pre-training runs; for ViT runs "
                       "also the mIoU of their unsupervised token clusters and attention masks.")
    g.add_argument("--checkpoint", action="append", default=[], required=True, metavar="RUN_DIR",
                   help="pre-training run folder (repeat for several methods, e.g. a DINO ViT and a MoCo ResNet)")
    g.add_argument("--dataset", required=True, help="dataset folder or URL with data.zarr")
    g.add_argument("--inputs", type=_csv, default=("s1", "s2", "s1s2"), help="table columns (s1,s2,s1s2)")
    g.add_argument("--s2-bands", default="land", help="land (10, default), all (13), rgb or a comma list")
    g.add_argument("--budget", default="32", help="labelled patches per cell: a budget written by ingest, or 'all'")
    g.add_argument("--protocol", default="linear", choices=["linear", "finetune"],
                   help="linear: linear head on frozen features; finetune: light decoder, backbone trained")
    g.add_argument("--frozen", action="store_true", help="with --protocol finetune: keep the backbone frozen")
    g.add_argument("--seeds", type=lambda t: tuple(int(v) for v in _csv(t)), default=(0,),
                   help="seeds (budget subset and head init per seed), e.g. 0,1,2")
    g.add_argument("--label", default="igbp_simple", choices=list(SEG_LABELS),
                   help="per-pixel classes from the LC layer (default: simplified IGBP, 10 classes)")
    g.add_argument("--init", type=_csv, default=("random", "checkpoint"),
                   help="rows: random, checkpoint, checkpoint-random-adapter, checkpoint-backbone-only")
    g.add_argument("--epochs", type=int, default=20, help="training epochs over the labelled patches")
    g.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate of the head")
    g.add_argument("--backbone-lr-scale", type=float, default=0.1,
                   help="finetune: a pre-trained backbone's lr relative to the head's (a random one trains at 1x)")
    g.add_argument("--crop", type=int, default=0,
                   help="train on random crops of this size in px (0: whole patches); evaluation uses whole patches")
    g.add_argument("--class-weights", default="inverse_sqrt", choices=list(CLASS_WEIGHTINGS),
                   help="class weighting of the cross-entropy from training pixel frequencies")
    g.add_argument("--batch-size", type=int, default=16)
    g.add_argument("--workers", type=int, default=0, help="DataLoader workers reading the Zarr store")
    g.add_argument("--precision", default="no", choices=["no", "bf16"], help="autocast precision (accelerate)")
    g.add_argument("--figures", type=int, default=3, help="hold-out patches drawn per cell (input, prediction, reference)")
    g.add_argument("--write-maps", action="store_true",
                   help="write each hold-out prediction (first seed) as a GeoTIFF on the patch's grid")
    g.add_argument("--attention-patches", type=int, default=64,
                   help="hold-out patches scored with a ViT's token clusters and attention masks (0: skip)")
    g.add_argument("--experiment", default="eossl-eval", help="MLflow experiment")
    g.add_argument("--out", required=True, help="output folder")
    g.set_defaults(handler=_run_segment)


def _run_segment(args) -> int:
    from .seg_train import SegTrainConfig
    from .segment import SegmentConfig, run_segmentation

    train = SegTrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, crop=args.crop,
                           backbone_lr_scale=args.backbone_lr_scale,
                           class_weighting=args.class_weights, workers=args.workers)
    cfg = SegmentConfig(dataset=args.dataset, out=args.out, checkpoints=tuple(args.checkpoint), inputs=args.inputs,
                        s2_bands=args.s2_bands, budget=args.budget, protocol=args.protocol,
                        frozen=True if args.frozen else None, seeds=args.seeds, label=args.label, inits=args.init,
                        train=train, precision=args.precision, figures=args.figures, write_maps=args.write_maps,
                        attention_patches=args.attention_patches, experiment=args.experiment)
    result = run_segmentation(cfg, tuple(["eossl", *sys.argv[1:]]))
    print(result["results_md"].read_text())
    print(f"results: {result['results_csv']} and {result['results_md']}; MLflow parent run "
          f"{result['mlflow_parent_run_id']}")
    return 0


def _run_report(args) -> int:
    from pathlib import Path

    from .report import collect_from_mlflow, write_tables

    cells = collect_from_mlflow(args.tracking_uri, args.parent, args.experiment)
    if not cells:
        raise ValueError("no evaluation cells found in MLflow (check --parent / --experiment / the tracking URI)")
    metric = cells[0]["metric"]
    task = "land-cover segmentation" if metric == "miou" else "scene classification"
    _, md = write_tables(cells, Path(args.out), f"SEN12MS {task} (from MLflow), metric {metric}")
    print(md.read_text())
    return 0


def add_attention_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, metavar="RUN_DIR", help="a DINO (ViT) pre-training run folder")
    p.add_argument("--dataset", required=True, help="dataset folder or URL with data.zarr")
    p.add_argument("--keys", type=_csv, default=(), help="patch keys, e.g. ROIs1158_spring_1_p30,...")
    p.add_argument("--first", type=int, default=0,
                   help="instead of --keys: the first N hold-out patches that have land cover")
    p.add_argument("--out", required=True, help="folder for <key>.png, attention_metrics.json, summary.json")
    p.add_argument("--keep-mass", type=float, default=0.6, help="attention mass kept by the masks (0.6, as DINO)")
    p.add_argument("--clusters", type=int, default=6, help="k-means clusters of the patch tokens")
    p.add_argument("--inputs", help="input sensors (default: the run's view 0, e.g. s1)")
    p.add_argument("--mlflow-run", help="MLflow run id to log the figures to (tracking URI from MLFLOW_TRACKING_URI)")
    p.set_defaults(handler=_run_attention)


def _first_test_keys(dataset: str, n: int) -> list[str]:
    import zarr

    from eossl.ingest.format import ZARR_DIR
    from eossl.ingest.storage import Output

    group = zarr.open_group(Output(dataset).zarr_store(ZARR_DIR, read_only=True), mode="r")
    keys, split, has_lc = group["key"][:], group["split"][:], group["has_lc"][:]
    return [str(k) for k, s, lc in zip(keys, split, has_lc, strict=True) if str(s) == "test" and lc][:n]


def _run_attention(args) -> int:
    from .attention import attention_figures

    keys = list(args.keys) or (_first_test_keys(args.dataset, args.first) if args.first else [])
    if not keys:
        raise ValueError("give --keys K1,K2,... or --first N")
    result = attention_figures(args.checkpoint, args.dataset, keys, args.out, keep_mass=args.keep_mass,
                               n_clusters=args.clusters, inputs=args.inputs, mlflow_run_id=args.mlflow_run)
    for path in result["figures"]:
        print(f"figure: {path}")
    print(f"metrics: {args.out}/attention_metrics.json, summary: {args.out}/summary.json")
    return 0
