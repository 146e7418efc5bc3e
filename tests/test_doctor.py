"""``eossl doctor`` on this machine: the real command in a subprocess against a real moto S3 server and a
real sqlite MLflow store; the bare-GPU-image path with DALI, MLflow, zarr, rasterio and webdataset made
unimportable; and failing checks that must turn the exit code to 1 and be named."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from eossl.launch.doctor.environment import cache_check, dali_driver_check, s3_check
from eossl.launch.doctor.report import FAIL, NOT_APPLICABLE, NOT_AVAILABLE, PASS

from conftest import REPO, run_cli, training_env
from servers import free_port, moto_s3_server

# A secret no other output would contain by chance: the report must never show it.
SECRET = "doctor-secret-Zq81xVb"
BLOCKED = ("nvidia.dali", "mlflow", "zarr", "rasterio", "webdataset")


@pytest.fixture(scope="module")
def s3(module_tmp):
    with moto_s3_server(module_tmp("moto-doctor")) as endpoint:
        yield endpoint


def _env(tmp_path: Path, endpoint: str | None = None, **extra: str) -> dict:
    env = {k: v for k, v in training_env().items() if not k.startswith("AWS_")}
    env.update(
        {"AWS_CONFIG_FILE": str(tmp_path / "none"), "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none")}
    )
    if endpoint:
        env.update(
            AWS_ACCESS_KEY_ID="doctor-key",
            AWS_SECRET_ACCESS_KEY=SECRET,
            AWS_DEFAULT_REGION="us-east-1",
            AWS_ENDPOINT_URL=endpoint,
        )
    return {**env, **extra}


def _doctor(tmp_path: Path, env: dict, *args: str) -> tuple[int, dict, str]:
    proc = run_cli("doctor", "--json", "--cache", str(tmp_path), *args, check=False, env=env, timeout=600)
    report = json.loads(proc.stdout)
    return proc.returncode, report, proc.stdout + proc.stderr


def _statuses(report: dict) -> dict[str, str]:
    return {c["name"]: c["status"] for c in report["checks"]}


@pytest.mark.slow
def test_doctor_passes_on_this_machine(tmp_path, s3):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    rc, report, output = _doctor(tmp_path, _env(tmp_path, s3, MLFLOW_TRACKING_URI=uri))
    status = _statuses(report)
    assert rc == 0 and report["ok"] and report["failed"] == [], output
    assert status["dali_cpu"] == PASS and status["train_cpu_no"] == PASS
    assert status["mlflow"] == PASS and status["cache"] == PASS
    s3_row = next(c for c in report["checks"] if c["name"] == "s3")
    assert s3_row["status"] == PASS and s3_row["values"]["credentials_source"] == "environment"
    assert s3_row["values"]["endpoint"] == s3
    assert SECRET not in output
    if not torch.cuda.is_available():
        for name in ("gpus", "dali_gpu", "autocast_losses_bf16", "throughput", "compile", "nccl"):
            assert status[name] == NOT_APPLICABLE, name
    train = next(c for c in report["checks"] if c["name"] == "train_cpu_no")
    assert len(train["values"]["losses"]) == 3


@pytest.mark.slow
def test_gpu_check_on_a_bare_torch_python(tmp_path):
    """``make gpu-check`` where DALI, MLflow, zarr, rasterio and webdataset are missing (the bare GPU
    image): the doctor's torch-side checks still run and pass, those packages are 'not available', the
    parts that need them are skipped with the reason, and one JSON file holds it all."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import sys\n" + "".join(f"sys.modules[{m!r}] = None\n" for m in BLOCKED)
    )
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = _env(tmp_path, PYTHONPATH=str(site), MLFLOW_TRACKING_URI=uri)
    out = tmp_path / "gpu-check.json"
    make = [f"PY={sys.executable}", f"GPU_CHECK={out}", f"GPU_PATH={tmp_path / 'path'}"]
    proc = subprocess.run(
        ["make", "-s", "gpu-check", *make], cwd=REPO, env=env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(out.read_text())
    parts = result["parts"]
    assert result["ok"] and parts["doctor"]["rc"] == 0, parts["doctor"]["output_tail"]
    report = parts["doctor"]["result"]
    status = _statuses(report)
    assert report["failed"] == [] and status["train_cpu_no"] == PASS and status["cache"] == PASS
    assert status["dali_cpu"] == NOT_AVAILABLE and status["mlflow"] == NOT_AVAILABLE
    assert not (tmp_path / "mlflow.db").exists()  # MLflow really was not there to create it
    assert "rasterio" in parts["pytest_gpu"]["skipped"]
    assert (
        "nvidia.dali" in parts["bench_train"]["skipped"] and "nvidia.dali" in parts["bench_loader"]["skipped"]
    )


@pytest.mark.slow
def test_failing_checks_exit_1_and_are_named(tmp_path):
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    env = _env(tmp_path, dead)
    proc = run_cli(
        "doctor",
        "--s3-endpoint",
        dead,
        "--cache",
        str(tmp_path / "no-such-cache"),
        "--timeout-s",
        "3",
        check=False,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "FAILED: s3, cache"
    assert SECRET not in proc.stdout + proc.stderr


def test_cache_check_refuses_a_missing_folder_and_too_little_space(tmp_path):
    assert cache_check(str(tmp_path / "absent"), 1.0).status == FAIL
    assert "does not exist" in cache_check(str(tmp_path / "absent"), 1.0).detail
    assert cache_check(str(tmp_path), 0.0).status == PASS
    huge = cache_check(str(tmp_path), 1e9)  # an exabyte: more than any disk here has free
    assert huge.status == FAIL and huge.values["free_bytes"] < huge.values["min_free_bytes"]


def test_s3_check_names_the_credentials_source_not_the_secret(s3, tmp_path, monkeypatch):
    for k, v in _env(tmp_path, s3).items():
        if k.startswith("AWS_"):
            monkeypatch.setenv(k, v)
    check = s3_check(None, 5.0)
    assert check.status == PASS and check.values["credentials_source"] == "environment"
    assert SECRET not in json.dumps(check.values) + check.detail
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    assert s3_check(None, 2.0).status == FAIL


@pytest.mark.parametrize(("driver_cuda", "status"), [("12.4", FAIL), ("13.0", PASS)])
def test_dali_build_against_the_drivers_cuda(tmp_path, monkeypatch, driver_cuda, status):
    """This machine has DALI for CUDA 13 and no driver: an nvidia-smi that prints a driver's header (its
    real format) stands in for the driver, the one part a CPU machine cannot have."""
    smi = tmp_path / "nvidia-smi"
    smi.write_text(
        f"#!/bin/sh\necho '| NVIDIA-SMI 550.54  Driver Version: 550.54  CUDA Version: {driver_cuda} |'\n"
    )
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    check = dali_driver_check()
    assert check.status == status and check.values["driver_cuda"] == driver_cuda, check
    assert check.values["dali_cuda_major"] == [13]


def test_doctor_help_shows_defaults_and_imports_no_torch():
    script = (
        "import contextlib, io, sys\n"
        "from eossl.launch.cli import build_parser, main\n"
        "out = io.StringIO()\n"
        "with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):\n"
        "    main(['doctor', '--help'])\n"
        "assert 'torch' not in sys.modules\n"
        "args = build_parser(['doctor']).parse_args(['doctor', '--steps', '2'])\n"
        "print(sorted(vars(args)))\n"
        "print(out.getvalue())\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    given, _, text = proc.stdout.partition("\n")
    text = " ".join(text.split())  # argparse wraps lines
    assert given == "['command', 'handler', 'json', 'steps']"  # untyped flags keep the dataclass defaults
    for flag, default in (("--method", "moco"), ("--precision", "no"), ("--min-free-gb", "1.0")):
        assert flag in text and f"(default: {default})" in text
