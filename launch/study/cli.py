"""Command-line arguments of ``eossl study``, ``eossl study report``, ``eossl kit`` and ``eossl mlflow serve``."""

from __future__ import annotations

import argparse
import sys

from eossl.train.overrides import parse_assignment

__all__ = ["add_kit_arguments", "add_mlflow_arguments", "add_study_arguments", "study_report_parser"]




def _add_cluster_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nodes", type=int, default=1, help="nodes per job (one accelerate launch each)")
    p.add_argument("--gpus-per-node", type=int, default=8, help="processes per node")
    p.add_argument("--accelerate-config", default="launch/accelerate/multinode_8gpu.yaml",
                   help="accelerate config, relative to the repository on the nodes")
    p.add_argument("--repo", default="/opt/eossl", help="the eossl checkout on the nodes (image working dir)")
    p.add_argument("--env", type=parse_assignment, action="append", default=[], metavar="KEY=VALUE",
                   help="environment for every node (no secrets: those come from the cluster)")
    p.add_argument("--time", default="24:00:00", help="SLURM time limit")
    p.add_argument("--signal-seconds", type=int, default=180,
                   help="SLURM warning before the limit / Kubernetes grace period, to write a checkpoint")
    p.add_argument("--image", default="eossl:latest", help="Kubernetes container image")
    p.add_argument("--runs-claim", default="eossl-runs", help="Kubernetes PersistentVolumeClaim of run folders")


def _job_template(args, train_args: tuple[str, ...] = ("moco",)):
    from .cluster import ClusterJob

    return ClusterJob(train_args=train_args, nodes=args.nodes, gpus_per_node=args.gpus_per_node,
                      accelerate_config=args.accelerate_config, repo=args.repo, env=dict(args.env), time=args.time,
                      signal_seconds=args.signal_seconds, image=args.image, runs_claim=args.runs_claim)


def add_study_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="study file (YAML: name, data, out, train, grid, lr, eval)")
    p.add_argument("--set", dest="overrides", type=parse_assignment, action="append", default=[], metavar="KEY=VALUE",
                   help="override a study field by dotted key, e.g. --set grid.epochs=[1,2] --set train.size=64")
    p.add_argument("--cell", action="append", default=[], help="run only this cell (repeatable)")
    p.add_argument("--list", action="store_true", help="print the cells and their training commands, run nothing")
    p.add_argument("--emit", choices=["slurm", "k8s"], help="write one cluster job per cell instead of running")
    p.add_argument("--jobs-dir", help="where --emit writes the jobs (default STUDY_OUT/jobs)")
    _add_cluster_options(p)
    p.set_defaults(handler=_run_study)


def _run_study(args) -> int:
    import shlex
    from pathlib import Path

    from .study import emit_cluster_jobs, run_study, train_command
    from .study_config import load_study

    cfg = load_study(args.config, dict(args.overrides))
    if args.list:
        for cell in cfg.cells():
            print(f"{cell.name}: eossl train {shlex.join(train_command(cfg, cell))}")
        return 0
    if args.emit:
        jobs = emit_cluster_jobs(cfg, args.emit, args.jobs_dir or str(Path(cfg.out) / "jobs"), _job_template(args))
        submit = "sbatch" if args.emit == "slurm" else "kubectl apply -f"
        for path in jobs:
            print(f"{submit} {path}")
        print(f"{len(jobs)} job(s); when they are done: eossl study report --config {Path(cfg.out) / 'study.yaml'}")
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


def study_report_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="eossl study report",
                                description="Rebuild a study's table and plots from its MLflow runs.")
    p.add_argument("--config", help="the study file (finds the parent run in STUDY_OUT/study.json)")
    p.add_argument("--set", dest="overrides", type=parse_assignment, action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--parent", help="instead of --config: the study's MLflow parent run id")
    p.add_argument("--tracking-uri", help="with --parent (default: MLFLOW_TRACKING_URI)")
    p.add_argument("--out", help="folder for results.csv/.md and the plots (default: STUDY_OUT)")
    p.set_defaults(handler=_run_study_report, command="study report")
    return p


def _run_study_report(args) -> int:
    import json
    import os
    from pathlib import Path

    from .study_config import PlotSpec, load_study
    from .study_report import write_report

    if args.config:
        cfg = load_study(args.config, dict(args.overrides))
        state_path = Path(cfg.out) / "study.json"
        if not state_path.exists():
            raise FileNotFoundError(f"{state_path}: the study has not started (run eossl study --config first)")
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


def add_kit_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("kind", choices=["slurm", "k8s"], help="SLURM batch script or Kubernetes manifest")
    p.add_argument("--job-name", default="eossl-train")
    p.add_argument("--after-train", default="", help="shell command run once on node 0 after training")
    p.add_argument("--out", help="file to write (default: standard output)")
    _add_cluster_options(p)
    p.set_defaults(handler=_run_kit, train_args=())
    p.epilog = "After --: the eossl.train arguments, e.g. -- moco --data s3://bucket/ds --out /runs/x --set epochs=100"


def _run_kit(args) -> int:
    from dataclasses import replace
    from pathlib import Path

    from .cluster import render_k8s, render_slurm

    if not args.train_args:
        raise ValueError("give the training arguments after --, e.g. eossl kit slurm --nodes 2 -- moco --data D --out R")
    job = replace(_job_template(args, tuple(args.train_args)), job_name=args.job_name, after_train=args.after_train)
    text = render_slurm(job) if args.kind == "slurm" else render_k8s(job)
    if args.out:
        Path(args.out).write_text(text)
        print(f"wrote {args.out}: {'sbatch' if args.kind == 'slurm' else 'kubectl apply -f'} {args.out}")
    else:
        sys.stdout.write(text)
    return 0


def add_mlflow_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="mlflow_command", required=True, metavar="{serve}")
    s = sub.add_parser("serve", help="an MLflow tracking server with a SQLite store and an artifact root",
                       description="Start mlflow server for a team or a study: runs reach it with "
                       "MLFLOW_TRACKING_URI=http://HOST:PORT. Stops on Ctrl-C / SIGTERM.")
    s.add_argument("--dir", default="mlflow-server", help="folder of mlflow.db and artifacts/")
    s.add_argument("--host", default="127.0.0.1", help="127.0.0.1 (this machine) or 0.0.0.0 (a shared server)")
    s.add_argument("--port", type=int, default=5000)
    s.add_argument("--backend-store-uri", help="instead of DIR/mlflow.db, e.g. postgresql://... for a shared server")
    s.add_argument("--artifacts-destination", help="instead of DIR/artifacts, e.g. s3://bucket/mlflow")
    s.add_argument("--workers", type=int, default=1)
    s.set_defaults(handler=_run_mlflow_serve)


def _run_mlflow_serve(args) -> int:
    from .mlflow_server import ServerConfig, serve

    return serve(ServerConfig(folder=args.dir, host=args.host, port=args.port, backend_store_uri=args.backend_store_uri,
                              artifacts_destination=args.artifacts_destination, workers=args.workers))
