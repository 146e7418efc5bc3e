"""A cluster site's own job settings, written once in a site file instead of edited into every job.

Partition, account, QoS, time limit, the set-up command (``module load ...``, environment activation) and
extra ``#SBATCH`` lines on SLURM; image, resources, node selector, tolerations and the shard-cache volume
on Kubernetes. They are the same for every job a team submits at one site, so ``eossl kit`` and
``eossl study --emit`` read them from ``--site site.yaml``::

    slurm:
      partition: gpu
      account: proj123
      qos: normal
      time: "48:00:00"
      setup: |
        module load cuda/12.4
        source /work/proj123/eossl-env/bin/activate
      extra_sbatch: ["--exclusive", "--mem=0"]
    k8s:
      image: registry.example.org/eossl:1.2
      cpu: "32"
      memory: 256Gi
      node_selector: {nvidia.com/gpu.product: NVIDIA-H100-80GB-HBM3}
      tolerations: [{key: nvidia.com/gpu, operator: Exists, effect: NoSchedule}]
      cache_claim: eossl-shard-cache

A key the dataclasses below do not have is refused with the closest valid keys and the file's name: a
misspelt ``partiton`` silently ignored would send the job to the default partition.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from eossl.train.overrides import apply_overrides

__all__ = ["K8sSite", "SiteConfig", "SlurmSite", "read_site"]


@dataclass
class SlurmSite:
    """SLURM settings of a site.

    Attributes:
        partition, account, qos: ``#SBATCH --partition/--account/--qos``; empty: the cluster's default.
        time: the job's time limit; pre-emption-safe jobs requeue at it, so a shorter limit that the
            scheduler starts sooner loses nothing but a restart.
        cpus_per_task: CPUs of the one task per node (its data-loader workers and DALI threads).
        extra_sbatch: further ``#SBATCH`` options, one per item (``--exclusive``, ``--constraint=a100``).
        setup: shell lines run before ``node.sh`` (``module load``, ``conda activate``, ``source venv``).
    """

    partition: str = ""
    account: str = ""
    qos: str = ""
    time: str = "24:00:00"
    cpus_per_task: int = 64
    extra_sbatch: tuple[str, ...] = ()
    setup: str = ""

    def __post_init__(self) -> None:
        if self.cpus_per_task < 1:
            raise ValueError(f"slurm.cpus_per_task must be >= 1, got {self.cpus_per_task}")
        for line in self.extra_sbatch:
            if not line.startswith("-") or "\n" in line:
                raise ValueError(f"slurm.extra_sbatch: {line!r} must be one sbatch option (--name=value)")

    def sbatch_lines(self) -> list[str]:
        """The ``#SBATCH`` options the site adds (without the prefix)."""
        named = [("partition", self.partition), ("account", self.account), ("qos", self.qos)]
        return [f"--{name}={value}" for name, value in named if value] + list(self.extra_sbatch)


@dataclass
class K8sSite:
    """Kubernetes settings of a site.

    Attributes:
        image: the container image (see the Dockerfile recipe); the eossl checkout is its working dir.
        cpu, memory: resource requests (and limits) of each pod, e.g. ``"32"`` and ``256Gi``; empty:
            none, which many clusters refuse or schedule as best effort.
        node_selector: node labels a pod requires (the GPU product, a node pool).
        tolerations: taints the pods tolerate (GPU nodes are often tainted), as Kubernetes writes them.
        cache_claim: a PersistentVolumeClaim for the shard cache (fast local or node-shared disk);
            empty: no cache volume. Train with ``--set loader.cache_dir=CACHE_MOUNT`` to use it.
        cache_mount: where the cache volume is mounted in the pods.
        setup: shell lines each pod runs before ``node.sh``.
    """

    image: str = "eossl:latest"
    cpu: str = ""
    memory: str = ""
    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: tuple[dict[str, Any], ...] = ()
    cache_claim: str = ""
    cache_mount: str = "/cache"
    setup: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.node_selector, dict):
            raise ValueError(f"k8s.node_selector must be a mapping of labels, got {self.node_selector!r}")
        self.node_selector = {str(k): str(v) for k, v in self.node_selector.items()}
        for toleration in self.tolerations:
            if not isinstance(toleration, dict):
                raise ValueError(f"k8s.tolerations: {toleration!r} must be a mapping (key, operator, ...)")


@dataclass
class SiteConfig:
    """The job settings of one cluster site (see the module docstring for a site file)."""

    slurm: SlurmSite = field(default_factory=SlurmSite)
    k8s: K8sSite = field(default_factory=K8sSite)


def _flatten(tree: dict[str, Any], path: Path) -> dict[str, Any]:
    """Site file -> dotted keys; only the sections are nested (node selectors and tolerations are values)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if key in ("slurm", "k8s"):
            if not isinstance(value, dict):
                raise ValueError(f"{path}: section {key} must be a mapping of settings")
            flat.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            flat[str(key)] = value
    return flat


def read_site(path: str | Path, overrides: dict[str, Any] | None = None) -> SiteConfig:
    """The site file at ``path`` (or the defaults for ``None``), then ``overrides`` (dotted keys) on top.

    Raises:
        ValueError: naming the file: unreadable, not YAML, not a mapping, an unknown key (with the closest
            valid ones) or a value of the wrong type.
    """
    site = SiteConfig()
    if path is not None:
        path = Path(path)
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except OSError as e:
            raise ValueError(f"{path}: cannot read the site file ({e.strerror or e})") from None
        except yaml.YAMLError as e:
            raise ValueError(f"{path}: not valid YAML ({e})") from None
        if not isinstance(tree, dict):
            raise ValueError(f"{path}: a site file is a mapping with sections slurm and k8s")
        try:
            apply_overrides(site, _flatten(tree, path))
        except ValueError as e:
            raise ValueError(f"{path}: {str(e).replace('config key', 'site key')}") from None
    return apply_overrides(site, overrides or {})
