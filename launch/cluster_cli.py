"""Command-line arguments of ``eossl kit``, and the cluster options ``eossl study --emit`` shares with it.

Flags that the user does not give are not passed on: :class:`~eossl.launch.cluster.ClusterJob`'s and
:class:`~eossl.launch.site.SiteConfig`'s defaults are the only defaults, and ``--help`` reads them from
there. Site settings come from ``--site FILE``; the few site flags (``--partition``, ``--time``,
``--image``, ...) override the file for one job.
"""

from __future__ import annotations

import argparse
import sys

from eossl.ingest.cli import default_of, given, shown
from eossl.train.overrides import parse_assignment

from .cluster import ClusterJob
from .site import read_site

__all__ = ["add_cluster_options", "add_kit_arguments", "cluster_job"]

# flag dest -> ClusterJob field
_JOB_FIELDS = {
    name: name
    for name in (
        "nodes",
        "gpus_per_node",
        "accelerate_config",
        "repo",
        "env",
        "signal_seconds",
        "runs_claim",
    )
}
# flag dest -> site key (dotted); these override the site file
_SITE_FLAGS = {
    "partition": "slurm.partition",
    "account": "slurm.account",
    "qos": "slurm.qos",
    "time": "slurm.time",
    "cpus_per_task": "slurm.cpus_per_task",
    "image": "k8s.image",
}


def _default(name: str) -> str:
    return shown(default_of(ClusterJob, name))


def add_cluster_options(p: argparse.ArgumentParser) -> None:
    """The options of a multi-node job: nodes, processes, accelerate config, SLURM and Kubernetes settings."""
    suppress = argparse.SUPPRESS
    p.add_argument(
        "--nodes",
        type=int,
        default=suppress,
        help=f"nodes per job (one accelerate launch each; default {_default('nodes')})",
    )
    p.add_argument(
        "--gpus-per-node",
        type=int,
        default=suppress,
        help=f"processes per node (default {_default('gpus_per_node')})",
    )
    p.add_argument(
        "--accelerate-config",
        default=suppress,
        help=f"accelerate config, relative to the repository on the nodes "
        f"(default {_default('accelerate_config')})",
    )
    p.add_argument(
        "--repo",
        default=suppress,
        help=f"the eossl checkout on the nodes (image working dir; default {_default('repo')})",
    )
    p.add_argument(
        "--env",
        type=parse_assignment,
        action="append",
        default=suppress,
        metavar="KEY=VALUE",
        help="environment for every node (no secrets: those come from the cluster)",
    )
    p.add_argument(
        "--site",
        default=suppress,
        metavar="FILE",
        help="site file (YAML, sections slurm and k8s): partition, account, QoS, time limit, set-up command, "
        "extra #SBATCH lines; image, resources, node selector, tolerations, cache volume",
    )
    for flag in ("partition", "account", "qos"):
        p.add_argument(f"--{flag}", default=suppress, help=f"SLURM {flag} (overrides the site file)")
    p.add_argument(
        "--time",
        default=suppress,
        help=f"SLURM time limit (overrides the site file; default {_default('site.slurm.time')})",
    )
    p.add_argument(
        "--cpus-per-task",
        type=int,
        default=suppress,
        help=f"SLURM CPUs of each node's task (default {_default('site.slurm.cpus_per_task')})",
    )
    p.add_argument(
        "--signal-seconds",
        type=int,
        default=suppress,
        help="SLURM warning before the limit / Kubernetes grace period, to write a checkpoint "
        f"(default {_default('signal_seconds')})",
    )
    p.add_argument(
        "--image",
        default=suppress,
        help="Kubernetes container image with eossl in the --repo folder (overrides the site file): build "
        "it from docker/Dockerfile (docker build -f docker/Dockerfile -t REGISTRY/eossl:TAG .) and push it "
        f"where the cluster pulls from (a local build's name: default {_default('site.k8s.image')})",
    )
    p.add_argument(
        "--runs-claim",
        default=suppress,
        help=f"Kubernetes PersistentVolumeClaim of run folders (default {_default('runs_claim')})",
    )


def cluster_job(args: argparse.Namespace, train_args: tuple[str, ...], **fields: str) -> ClusterJob:
    """The job the cluster options describe, for ``train_args``; ``fields`` set further ClusterJob fields."""
    options = given(args, _JOB_FIELDS)
    if "env" in options:
        options["env"] = dict(options["env"])
    site = read_site(getattr(args, "site", None), given(args, _SITE_FLAGS))
    return ClusterJob(train_args=train_args, site=site, **options, **fields)


def add_kit_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("kind", choices=["slurm", "k8s"], help="SLURM batch script or Kubernetes manifest")
    p.add_argument(
        "--job-name",
        default=argparse.SUPPRESS,
        help=f"SLURM job / Kubernetes object name (default {_default('job_name')})",
    )
    p.add_argument(
        "--after-train",
        default=argparse.SUPPRESS,
        help="shell command run once on node 0 after training (default: none)",
    )
    p.add_argument("--out", help="file to write (default: standard output)")
    add_cluster_options(p)
    p.set_defaults(handler=_run_kit, train_args=())
    p.epilog = (
        "After --: the eossl.train arguments, e.g. -- moco --data s3://bucket/ds --out /runs/x "
        "--set epochs=100"
    )


def _run_kit(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .cluster import render_k8s, render_slurm

    if not args.train_args:
        raise ValueError(
            "give the training arguments after --, e.g. eossl kit slurm --nodes 2 -- moco --data D --out R"
        )
    from eossl.train.cli import resolve_train_args

    resolve_train_args(args.train_args)  # a misspelt key or bad value fails here, before a job file exists
    job = cluster_job(
        args, tuple(args.train_args), **given(args, {"job_name": "job_name", "after_train": "after_train"})
    )
    text = render_slurm(job) if args.kind == "slurm" else render_k8s(job)
    if args.out:
        Path(args.out).write_text(text)
        print(f"wrote {args.out}: {'sbatch' if args.kind == 'slurm' else 'kubectl apply -f'} {args.out}")
    else:
        sys.stdout.write(text)
    return 0
