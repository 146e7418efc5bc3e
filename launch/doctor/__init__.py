"""``eossl doctor``: is this machine ready for eossl? Run it on a login node and on a GPU node.

It checks what a run will need: the versions (torch, CUDA runtime and driver, NCCL, DALI's build,
accelerate, MLflow), the GPUs, a short DALI pipeline in each device mode the machine has, a few training
steps in the configured precision (and bf16 and fp16 on a GPU), CUDA-autocast numerics of the losses, the
compute-only throughput of the default recipes, torch.compile, one-process NCCL, the S3 endpoint and where
its credentials come from, the MLflow tracking URI, and free space in the shard cache folder.

Exit code 0 when every applicable check passes, 1 when one fails (named on the last line and in
``--json``'s ``failed``). Checks a machine cannot do (GPU checks on a login node) are 'not applicable';
checks whose package is not installed (DALI, MLflow, boto3) are 'not available' and do not fail.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from dataclasses import dataclass, fields

from .report import Report, run_check

__all__ = ["DoctorConfig", "add_doctor_arguments", "doctor", "run_doctor"]


@dataclass
class DoctorConfig:
    """What ``eossl doctor`` checks against.

    Attributes:
        method: the method whose training steps are smoked (moco or dino).
        precision: the precision of the training smoke: no, bf16 or fp16 (fp16 needs a GPU). A GPU also
            runs bf16 and fp16.
        steps: steps of each DALI pipeline and training smoke.
        throughput_steps: timed steps per recipe in the GPU throughput check.
        s3_endpoint: S3 endpoint URL to reach (default: AWS_ENDPOINT_URL; none and no credentials: the
            check is not applicable).
        tracking_uri: MLflow tracking URI to reach (default: MLFLOW_TRACKING_URI; none: not applicable).
        cache: the node's shard cache folder (train's ``storage.cache_dir``; default: the temp folder).
        min_free_gb: free space the cache folder must have.
        timeout_s: bound on each network check's wait.
    """

    method: str = "moco"
    precision: str = "no"
    steps: int = 3
    throughput_steps: int = 10
    s3_endpoint: str | None = None
    tracking_uri: str | None = None
    cache: str | None = None
    min_free_gb: float = 1.0
    timeout_s: float = 10.0


def doctor(cfg: DoctorConfig) -> Report:
    """Run every check in order; each check's error is its own failure, the others still run."""
    import torch

    from . import environment as env
    from . import torch_side as ts

    report = Report()
    cuda = torch.device("cuda", 0) if torch.cuda.is_available() else None
    device = cuda or torch.device("cpu")
    run_check(report, "versions", env.versions_check)
    run_check(report, "gpus", env.gpus_check)
    run_check(report, "dali_driver", env.dali_driver_check)
    for mode in ("cpu", "gpu"):
        run_check(report, f"dali_{mode}", lambda m=mode: env.dali_check(m, cfg.steps))
    precisions = [cfg.precision] + ([p for p in ("bf16", "fp16") if p != cfg.precision] if cuda else [])
    for p in precisions:
        run_check(
            report,
            f"train_{device.type}_{p}",
            lambda p=p: ts.train_check(cfg.method, {}, device, p, cfg.steps),
        )
    for p in ("bf16", "fp16"):
        run_check(report, f"autocast_losses_{p}", lambda p=p: ts.autocast_check(device, p))
    run_check(report, "throughput", lambda: ts.throughput_check(device, cfg.throughput_steps))
    run_check(report, "compile", lambda: ts.compile_check(device, cfg.steps))
    run_check(report, "nccl", lambda: ts.nccl_check(device))
    run_check(report, "s3", lambda: env.s3_check(cfg.s3_endpoint, cfg.timeout_s))
    run_check(report, "mlflow", lambda: env.mlflow_check(cfg.tracking_uri, cfg.timeout_s))
    cache = cfg.cache or tempfile.gettempdir()
    run_check(report, "cache", lambda: env.cache_check(cache, cfg.min_free_gb))
    return report


_HELP = {
    "method": "pre-training method of the training smoke",
    "precision": "precision of the training smoke (no, bf16, fp16)",
    "steps": "steps of each DALI pipeline and training smoke",
    "throughput_steps": "timed steps per recipe in the GPU throughput check",
    "s3_endpoint": "S3 endpoint to reach (default: AWS_ENDPOINT_URL)",
    "tracking_uri": "MLflow tracking URI to reach (default: MLFLOW_TRACKING_URI)",
    "cache": "shard cache folder whose free space is checked (default: the temp folder)",
    "min_free_gb": "free GiB the cache folder must have",
    "timeout_s": "seconds each network check may wait",
}


def add_doctor_arguments(p: argparse.ArgumentParser) -> None:
    """``eossl doctor``'s flags: one per DoctorConfig field; only typed flags override its defaults."""
    for f in fields(DoctorConfig):
        kind = {"int": int, "float": float}.get(str(f.type), str)
        extra = {"choices": ["moco", "dino"]} if f.name == "method" else {}
        if f.name == "precision":
            extra = {"choices": ["no", "bf16", "fp16"]}
        p.add_argument(
            f"--{f.name.replace('_', '-')}",
            type=kind,
            default=argparse.SUPPRESS,
            help=f"{_HELP[f.name]} (default: {f.default})",
            **extra,
        )
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(handler=run_doctor)


def run_doctor(args: argparse.Namespace) -> int:
    given = {f.name: getattr(args, f.name) for f in fields(DoctorConfig) if hasattr(args, f.name)}
    report = doctor(DoctorConfig(**given))
    print(json.dumps(report.as_dict(), indent=1) if args.json else report.text())
    return 1 if report.failed else 0
