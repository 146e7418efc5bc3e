"""Launch kits for clusters: render the SLURM batch script and the Kubernetes Job of one training run.

Both run ``launch/kits/node.sh`` once per node, the same per-node command the 127.0.0.1 tests start, so
what is tested locally (ranks, rendezvous address, world size, pre-emption) is what a cluster runs. The
templates live next to it (``kits/slurm.sbatch``, ``kits/k8s-job.yaml``); rendering only fills in
placeholders, so a rendered file reads like the template and can be edited by hand.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from .methods import method_names
from .site import SiteConfig

__all__ = ["KIT_DIR", "ClusterJob", "SiteConfig", "render_k8s", "render_slurm"]

KIT_DIR = Path(__file__).resolve().parent / "kits"
ACCELERATE_DIR = Path(__file__).resolve().parent / "accelerate"
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


@dataclass(frozen=True)
class ClusterJob:
    """One multi-node training run.

    Attributes:
        train_args: the arguments of ``eossl.train`` (``moco --data s3://b/ds --out /runs/x --set ...``).
        nodes: nodes (SLURM tasks / Kubernetes pods), one ``accelerate launch`` each.
        gpus_per_node: processes per node.
        job_name: SLURM job name / Kubernetes object name (lower-case DNS label).
        accelerate_config: config file, relative to the repository in the job's environment.
        repo: where the eossl checkout lives on the nodes (the image's working directory on Kubernetes).
        env: extra environment variables for every node (e.g. MLFLOW_TRACKING_URI; never secrets).
        after_train: a shell command run once, on node 0, after training succeeded (a study cell's eval).
        signal_seconds: warning before the limit (SLURM) / grace period (Kubernetes) to write a checkpoint.
        master_port: rendezvous port (Kubernetes; SLURM derives one from the job id).
        runs_claim, runs_mount: Kubernetes shared volume of run folders.
        site: the cluster's own settings (partition, account, time limit, image, ...), usually from
            ``--site site.yaml``: the same for every job of a site, so written once.
    """

    train_args: tuple[str, ...]
    nodes: int = 1
    gpus_per_node: int = 8
    job_name: str = "eossl-train"
    accelerate_config: str = "launch/accelerate/multinode_8gpu.yaml"
    repo: str = "/opt/eossl"
    env: dict[str, str] = field(default_factory=dict)
    after_train: str = ""
    signal_seconds: int = 180
    master_port: int = 29500
    log_dir: str = "logs"
    runs_claim: str = "eossl-runs"
    runs_mount: str = "/runs"
    site: SiteConfig = field(default_factory=SiteConfig)

    def __post_init__(self) -> None:
        if self.nodes < 1 or self.gpus_per_node < 1:
            raise ValueError(
                f"nodes and gpus_per_node must be >= 1, got {self.nodes} and {self.gpus_per_node}"
            )
        if not _NAME.match(self.job_name) or len(self.job_name) > 52:
            raise ValueError(
                f"job name {self.job_name!r} must be a lower-case DNS label (a-z, 0-9, '-'; <= 52)"
            )
        methods = method_names()
        if not self.train_args or self.train_args[0] not in methods:
            raise ValueError(
                f"train arguments must start with the method ({' or '.join(methods)}), "
                f"got {self.train_args[:1]}"
            )
        for key in self.env:
            if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", key):
                raise ValueError(f"bad environment variable name {key!r}")
            if any(word in key.upper() for word in ("SECRET", "PASSWORD", "TOKEN")):
                raise ValueError(
                    f"{key}: secrets come from the cluster (SLURM environment, "
                    "Kubernetes Secret), not from the rendered file"
                )


def _fill(template: str, values: dict[str, object]) -> str:
    for key, value in values.items():
        template = template.replace(f"@@{key}@@", str(value))
    left = re.findall(r"@@[A-Z_]+@@", template)
    if left:
        raise AssertionError(f"unfilled placeholders {sorted(set(left))}")
    return template


def _common(job: ClusterJob) -> dict[str, object]:
    return {
        "JOB_NAME": job.job_name,
        "NODES": job.nodes,
        "GPUS_PER_NODE": job.gpus_per_node,
        "ACCELERATE_CONFIG": job.accelerate_config,
        "REPO": job.repo,
        "SIGNAL_SECONDS": job.signal_seconds,
    }


def render_slurm(job: ClusterJob) -> str:
    """The sbatch script of ``job`` (submit with ``sbatch FILE``)."""
    exports = "\n".join(f"export {k}={shlex.quote(v)}" for k, v in sorted(job.env.items()))
    after = (
        f"# After training, once, on node 0 (this batch shell runs there).\n{job.after_train}\n"
        if job.after_train
        else ""
    )
    slurm = job.site.slurm
    return _fill(
        (KIT_DIR / "slurm.sbatch").read_text(),
        {
            **_common(job),
            "CPUS_PER_TASK": slurm.cpus_per_task,
            "TIME": slurm.time,
            "SITE_SBATCH": "".join(f"#SBATCH {line}\n" for line in slurm.sbatch_lines()),
            "LOG_DIR": job.log_dir,
            "SETUP": _setup_block(slurm.setup),
            "EXPORTS": exports,
            "TRAIN_ARGS": " ".join(shlex.quote(a) for a in job.train_args),
            "AFTER_TRAIN": after,
        },
    )


def _setup_block(setup: str) -> str:
    """The site's set-up command (module load, environment activation), run before node.sh starts."""
    if not setup:
        return ""
    return f"# Site set-up (the site file's setup), before node.sh.\n{setup.strip()}\n"


def pod_script(job: ClusterJob) -> str:
    """What each pod runs: node.sh as a child that receives the pod's SIGTERM, then the after-train step."""
    setup = job.site.k8s.setup.strip()
    lines = [
        *([setup] if setup else []),
        'export NODE_RANK="$JOB_COMPLETION_INDEX"',
        "launch/kits/node.sh " + " ".join(shlex.quote(a) for a in job.train_args) + " &",
        "node=$!",
        "trap 'kill -TERM $node' TERM",
        'while true; do wait "$node" && status=0 || status=$?; kill -0 "$node" 2>/dev/null || break; done',
    ]
    if job.after_train:
        lines.append(f'if [ "$status" = 0 ] && [ "$NODE_RANK" = 0 ]; then {job.after_train}; status=$?; fi')
    lines.append('exit "$status"')
    return "\n".join(lines)


def render_k8s(job: ClusterJob) -> str:
    """The Kubernetes manifest of ``job``: a headless Service and an Indexed Job (``kubectl apply -f``)."""
    script = pod_script(job)
    block = "|\n" + "\n".join(" " * 16 + line for line in script.splitlines())
    env = "\n".join(
        f"            - {{name: {k}, value: {json.dumps(v)}}}" for k, v in sorted(job.env.items())
    )
    k8s = job.site.k8s
    requests = {key: value for key, value in (("cpu", k8s.cpu), ("memory", k8s.memory)) if value}
    cache_mount, cache_volume = "", ""
    if k8s.cache_claim:
        cache_mount = f"\n            - {{name: cache, mountPath: {json.dumps(k8s.cache_mount)}}}"
        claim = f"{{claimName: {json.dumps(k8s.cache_claim)}}}"
        cache_volume = f"\n        - name: cache\n          persistentVolumeClaim: {claim}"
    return _fill(
        (KIT_DIR / "k8s-job.yaml").read_text(),
        {
            **_common(job),
            "MASTER_PORT": job.master_port,
            "IMAGE": k8s.image,
            "POD_SCRIPT": block,
            "ENV": env,
            "REQUESTS": json.dumps(requests),
            "LIMITS": json.dumps({**requests, "nvidia.com/gpu": job.gpus_per_node}),
            "NODE_SELECTOR": json.dumps(dict(k8s.node_selector)),
            "TOLERATIONS": json.dumps([dict(t) for t in k8s.tolerations]),
            "CACHE_MOUNT": cache_mount,
            "CACHE_VOLUME": cache_volume,
            "RUNS_CLAIM": job.runs_claim,
            "RUNS_MOUNT": job.runs_mount,
        },
    )
