"""The machine's side of ``eossl doctor``: versions, GPUs, a DALI pipeline, S3, MLflow, cache space.

Every optional package (DALI, boto3, MLflow) is imported inside its check, so a bare GPU image with only
torch still runs the rest and reports these as 'not available'. Credentials are reported by their
SOURCE (environment, shared credentials file, instance role), never by value.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from .report import FAIL, NOT_APPLICABLE, NOT_AVAILABLE, PASS, Check, missing

__all__ = [
    "cache_check",
    "dali_check",
    "dali_driver_check",
    "gpus_check",
    "mlflow_check",
    "s3_check",
    "versions_check",
]

# Distribution names whose versions the report lists (absent ones are listed as None).
_PACKAGES = ("torch", "torchvision", "timm", "accelerate", "mlflow", "boto3", "s3fs", "zarr", "rasterio")
_DALI_PACKAGES = ("nvidia-dali-cuda130", "nvidia-dali-cuda120", "nvidia-dali-cuda110")
# botocore's credential provider names -> the words a user looks for.
_SOURCES = {
    "env": "environment",
    "shared-credentials-file": "shared credentials file",
    "config-file": "config file",
    "iam-role": "instance role",
    "container-role": "container role",
    "assume-role": "assumed role",
    "assume-role-with-web-identity": "web identity",
    "sso": "sso",
}


def _dist_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def _driver_version() -> str | None:
    """The NVIDIA driver version from nvidia-smi (torch knows only the CUDA runtime it was built with)."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run(
            [exe, "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.splitlines()[0].strip() if out.returncode == 0 and out.stdout.strip() else None


def _driver_cuda() -> tuple[int, int] | None:
    """The newest CUDA version the installed driver supports ('CUDA Version: 13.0' in nvidia-smi)."""
    exe = shutil.which("nvidia-smi")
    try:
        out = subprocess.run([exe], capture_output=True, text=True, timeout=20).stdout if exe else ""
    except (OSError, subprocess.TimeoutExpired):
        return None
    found = re.search(r"CUDA Version:\s*(\d+)\.(\d+)", out)
    return (int(found.group(1)), int(found.group(2))) if found else None


def dali_driver_check() -> Check:
    """DALI's CUDA build (``nvidia-dali-cuda130``: CUDA 13) needs a driver that supports that CUDA major:
    the wheel installs everywhere and fails only when a GPU pipeline starts."""
    builds = [
        int(m.group(1)) // 10 for n in _DALI_PACKAGES if _dist_version(n) and (m := re.search(r"(\d+)$", n))
    ]
    if not builds:
        return Check("dali_driver", NOT_AVAILABLE, "no nvidia-dali-cudaXXX package installed")
    driver = _driver_cuda()
    if driver is None:
        return Check("dali_driver", NOT_APPLICABLE, "no NVIDIA driver (nvidia-smi) on this machine")
    values = {"dali_cuda_major": builds, "driver_cuda": f"{driver[0]}.{driver[1]}"}
    if max(builds) > driver[0]:
        detail = f"DALI built for CUDA {max(builds)} but the driver supports CUDA {values['driver_cuda']}"
        return Check("dali_driver", FAIL, detail + " (install the DALI extra of the driver's CUDA)", values)
    return Check(
        "dali_driver", PASS, f"DALI CUDA {max(builds)} <= driver CUDA {values['driver_cuda']}", values
    )


def versions_check() -> Check:
    """torch and its CUDA runtime, the driver, NCCL, DALI's build, and the libraries eossl runs with."""
    import torch

    values: dict = {name: _dist_version(name) for name in _PACKAGES}
    values["torch_cuda_runtime"] = torch.version.cuda
    values["cuda_driver"] = _driver_version()
    values["nccl"] = None
    if torch.cuda.is_available() and hasattr(torch.cuda, "nccl"):
        nccl = torch.cuda.nccl.version()  # a tuple in recent torch, an int (2708) in older ones
        values["nccl"] = ".".join(map(str, nccl)) if isinstance(nccl, tuple) else str(nccl)
    dali = {name: v for name in _DALI_PACKAGES if (v := _dist_version(name))}
    values["dali"] = dali or None
    detail = f"torch {values['torch']} (CUDA {values['torch_cuda_runtime']}), driver {values['cuda_driver']}"
    if dali:
        detail += ", DALI " + ", ".join(f"{k} {v}" for k, v in dali.items())
    return Check("versions", PASS, detail, values)


def gpus_check() -> Check:
    import torch

    if not torch.cuda.is_available():
        return Check("gpus", NOT_APPLICABLE, "no CUDA device visible to torch", {"count": 0})
    names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    memory = [torch.cuda.get_device_properties(i).total_memory for i in range(len(names))]
    return Check("gpus", PASS, f"{len(names)} x {names[0]}", {"names": names, "memory_bytes": memory})


def dali_check(device: str, steps: int) -> Check:
    """``steps`` iterations of a small DALI pipeline in ``device`` mode ('cpu' or 'gpu'): the ops the
    loader uses on 13-channel uint16 patches (crop, flip, per-channel normalisation)."""
    name = f"dali_{device}"
    if reason := missing("nvidia.dali"):
        return Check(name, NOT_AVAILABLE, reason)
    import numpy as np
    import torch
    from nvidia.dali import fn, pipeline_def, types

    if device == "gpu" and not torch.cuda.is_available():
        return Check(name, NOT_APPLICABLE, "no CUDA device")
    rng = np.random.default_rng(0)
    patches = [rng.integers(0, 10000, (64, 64, 13), dtype=np.uint16) for _ in range(4)]

    @pipeline_def(batch_size=4, num_threads=1, device_id=0 if device == "gpu" else None, seed=0)
    def pipe():
        data = fn.external_source(source=lambda: patches, layout="HWC", dtype=types.UINT16)
        data = data.gpu() if device == "gpu" else data
        data = fn.cast(data, dtype=types.FLOAT)
        return fn.crop_mirror_normalize(
            data, crop=(32, 32), mirror=fn.random.coin_flip(), mean=[1000.0] * 13, std=[500.0] * 13
        )

    p = pipe()
    p.build()
    for _ in range(steps):
        (out,) = p.run()
    shape = list(out.as_tensor().shape())
    if shape != [4, 13, 32, 32]:
        return Check(name, FAIL, f"DALI {device} pipeline gave shape {shape}, expected [4, 13, 32, 32]")
    return Check(name, PASS, f"{steps} batches of 4 x 13 x 32 x 32", {"steps": steps})


def _credential_source() -> str | None:
    import botocore.session

    creds = botocore.session.get_session().get_credentials()
    return None if creds is None else _SOURCES.get(creds.method, creds.method)


def s3_check(endpoint: str | None, timeout_s: float) -> Check:
    """The S3 endpoint (given, or AWS_ENDPOINT_URL) answers a bucket listing with the found credentials."""
    endpoint = endpoint or os.environ.get("AWS_ENDPOINT_URL")
    if reason := missing("boto3"):
        return Check("s3", NOT_AVAILABLE, reason)
    source = _credential_source()
    if endpoint is None and source is None:
        return Check("s3", NOT_APPLICABLE, "no endpoint (--s3-endpoint, AWS_ENDPOINT_URL) and no credentials")
    import boto3
    from botocore.config import Config

    values = {"endpoint": endpoint or "aws default", "credentials_source": source}
    config = Config(connect_timeout=timeout_s, read_timeout=timeout_s, retries={"max_attempts": 1})
    try:
        boto3.client("s3", endpoint_url=endpoint, config=config).list_buckets()
    except Exception as exc:  # noqa: BLE001  (any refusal is the finding; secrets are not in botocore's text)
        return Check("s3", FAIL, f"{values['endpoint']} unreachable: {type(exc).__name__}: {exc}", values)
    return Check("s3", PASS, f"{values['endpoint']} reachable; credentials from {source}", values)


def mlflow_check(uri: str | None, timeout_s: float) -> Check:
    """The tracking URI (given, or MLFLOW_TRACKING_URI) answers an experiment search."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        return Check("mlflow", NOT_APPLICABLE, "no tracking URI (--tracking-uri, MLFLOW_TRACKING_URI)")
    if reason := missing("mlflow"):
        return Check("mlflow", NOT_AVAILABLE, reason, {"uri": uri})
    # One bounded attempt instead of MLflow's default minutes of retries against a dead server.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(int(timeout_s)))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    from mlflow.tracking import MlflowClient

    try:
        MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
    except Exception as exc:  # noqa: BLE001
        return Check("mlflow", FAIL, f"{uri} unreachable: {type(exc).__name__}: {exc}"[:500], {"uri": uri})
    return Check("mlflow", PASS, f"{uri} reachable", {"uri": uri})


def cache_check(folder: str, min_free_gb: float) -> Check:
    """The shard cache folder exists, is writable and has ``min_free_gb`` free."""
    path = Path(folder)
    if not path.is_dir():
        return Check("cache", FAIL, f"cache folder {path} does not exist (create it or pass --cache)")
    if not os.access(path, os.W_OK):
        return Check("cache", FAIL, f"cache folder {path} is not writable")
    free = shutil.disk_usage(path).free
    values = {"folder": str(path.resolve()), "free_bytes": free, "min_free_bytes": int(min_free_gb * 2**30)}
    if free < values["min_free_bytes"]:
        return Check("cache", FAIL, f"{path}: {free / 2**30:.1f} GiB free < {min_free_gb} GiB", values)
    return Check("cache", PASS, f"{path}: {free / 2**30:.1f} GiB free", values)
