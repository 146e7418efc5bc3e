"""Command-line arguments of ``eossl study`` and ``eossl study report``."""

from __future__ import annotations

import argparse
import sys

from eossl.train.overrides import add_set_argument

from ..cluster_cli import add_cluster_options, cluster_job

__all__ = ["add_study_arguments", "study_report_parser"]


def add_study_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        required=True,
        help="study file (YAML: name, data, out, train, grid, lr, eval) or the name of a packaged study "
        "(demo_batch_epochs, moco_batch_epochs)",
    )
    add_set_argument(
        p, "override a study field by dotted key, e.g. --set grid.epochs=[1,2] --set train.size=64"
    )
    p.add_argument(
        "--cell", action="append", default=[], help="run only this cell (repeatable; default: every cell)"
    )
    p.add_argument(
        "--list", action="store_true", help="print the cells and their training commands, run nothing"
    )
    p.add_argument(
        "--emit",
        choices=["slurm", "k8s"],
        help="write one cluster job per cell instead of running (default: run here)",
    )
    p.add_argument("--jobs-dir", help="where --emit writes the jobs (default STUDY_OUT/jobs)")
    add_cluster_options(p)
    p.set_defaults(handler=_run_study)


def _run_study(args) -> int:
    import shlex
    from pathlib import Path

    from .config import load_study
    from .run import emit_cluster_jobs, run_study, train_command

    cfg = load_study(args.config, dict(args.overrides))
    cells = cfg.cells()
    for name in args.cell:
        cfg.cell(name)  # an unknown --cell names the cells there are
    for cell in cells:  # every cell's training config resolves before a folder, run or job is made
        cfg.train_config(cell)
    if args.list:
        for cell in cells:
            print(f"{cell.name}: eossl train {shlex.join(train_command(cfg, cell))}")
            resolved = " ".join(f"{k}={v}" for k, v in cfg.resolved_values(cell).items())
            print(f"  resolved: {resolved}")
        return 0
    if not args.emit:  # a cluster job may see another file system: the dataset is checked where it runs
        _check_dataset(cfg)
    if args.emit:
        jobs_dir = args.jobs_dir or str(Path(cfg.out) / "jobs")
        jobs = emit_cluster_jobs(cfg, args.emit, jobs_dir, cluster_job(args, (cfg.method,)))
        submit = "sbatch" if args.emit == "slurm" else "kubectl apply -f"
        for path in jobs:
            print(f"{submit} {path}")
        print(
            f"{len(jobs)} job(s); when they are done: "
            f"eossl study report --config {Path(cfg.out) / 'study.yaml'}"
        )
        return 0
    result = run_study(cfg, tuple(args.cell))
    print(result["results_md"].read_text())
    for path in result["figures"]:
        print(f"figure: {path}")
    state = "finished" if result["finished"] else "not finished (run the same command again to continue)"
    print(f"study {cfg.name} {state}; MLflow parent run {result['parent_run_id']}")
    for name, error in result["failed"].items():
        print(f"eossl study: cell {name} failed: {error}", file=sys.stderr)
    return 1 if result["failed"] else 0


def _check_dataset(cfg) -> None:
    """The dataset exists, is finished, and has the evaluation's budget: before hours of training."""
    from eossl.eval.preflight import check_budget
    from eossl.ingest.integrity import read_manifest
    from eossl.ingest.storage import DatasetRoot

    root = DatasetRoot(cfg.data)
    read_manifest(root)
    check_budget(cfg.eval.budget, tuple(cfg.eval.seeds), root)


def study_report_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="eossl study report", description="Rebuild a study's table and plots from its MLflow runs."
    )
    p.add_argument("--config", help="the study file (finds the parent run in STUDY_OUT/study.json)")
    add_set_argument(p)
    p.add_argument("--parent", help="instead of --config: the study's MLflow parent run id")
    p.add_argument("--tracking-uri", help="with --parent (default: MLFLOW_TRACKING_URI)")
    p.add_argument("--out", help="folder for results.csv/.md and the plots (default: STUDY_OUT)")
    p.set_defaults(handler=_run_study_report, command="study report")
    return p


def _run_study_report(args) -> int:
    import json
    import os
    from pathlib import Path

    from .config import PlotSpec, load_study
    from .report import write_report

    if args.config:
        cfg = load_study(args.config, dict(args.overrides))
        state_path = Path(cfg.out) / "study.json"
        if not state_path.exists():
            raise FileNotFoundError(
                f"{state_path}: the study has not started (run eossl study --config first)"
            )
        state = json.loads(state_path.read_text())
        uri, parent, plot, out = state["tracking_uri"], state["parent_run_id"], cfg.plot, args.out or cfg.out
    elif args.parent:
        uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            raise ValueError("--parent needs --tracking-uri or MLFLOW_TRACKING_URI")
        parent, plot, out = args.parent, PlotSpec(), args.out or "."
    else:
        raise ValueError("give --config STUDY.yaml or --parent RUN_ID")
    result = write_report(uri, parent, Path(out), plot)
    print(result["results_md"].read_text())
    for path in result["figures"]:
        print(f"figure: {path}")
    return 0
