"""``eossl mlflow serve``: the tracking server a team (or one study) points ``MLFLOW_TRACKING_URI`` at.

A thin wrapper over ``mlflow server`` with the settings that work here: a SQLite backend and a proxied
artifact root in one folder (``--artifacts-destination``: clients upload artifacts through the server,
so they need no access to the artifact store), the job-execution feature off (it needs extra services),
one worker. For a shared server: ``--host 0.0.0.0``, a database backend (``--backend-store-uri
postgresql://...``) and an object-store artifact root (``--artifacts-destination s3://bucket/mlflow``,
credentials from the server's AWS environment). See docs/SCALING.md.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

__all__ = ["ServerConfig", "serve", "server_command"]


@dataclass(frozen=True)
class ServerConfig:
    folder: str = "mlflow-server"
    host: str = "127.0.0.1"
    port: int = 5000
    backend_store_uri: str | None = None
    artifacts_destination: str | None = None
    workers: int = 1
    start_timeout_s: float = 120.0

    @property
    def uri(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host
        return f"http://{host}:{self.port}"


def server_command(cfg: ServerConfig) -> list[str]:
    folder = Path(cfg.folder).resolve()
    backend = cfg.backend_store_uri or f"sqlite:///{folder / 'mlflow.db'}"
    artifacts = cfg.artifacts_destination or str(folder / "artifacts")
    mlflow = str(Path(sys.executable).with_name("mlflow"))
    return [mlflow, "server", "--backend-store-uri", backend, "--artifacts-destination", artifacts,
            "--host", cfg.host, "--port", str(cfg.port), "--workers", str(cfg.workers)]


def _healthy(uri: str) -> bool:
    try:
        with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def serve(cfg: ServerConfig) -> int:
    """Run the server in the foreground until it exits or this process gets SIGINT/SIGTERM."""
    Path(cfg.folder).mkdir(parents=True, exist_ok=True)
    if _healthy(cfg.uri):
        raise RuntimeError(f"something already answers at {cfg.uri}: choose another --port")
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = subprocess.Popen(server_command(cfg), env=env, start_new_session=True)
    stopping = {"signal": 0}

    def stop(signum, _frame):
        stopping["signal"] = signum
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # the server and its gunicorn/uvicorn workers

    previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        deadline = time.monotonic() + cfg.start_timeout_s
        while not _healthy(cfg.uri):
            if proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited with code {proc.returncode} before answering at {cfg.uri}")
            if time.monotonic() > deadline:
                os.killpg(proc.pid, signal.SIGTERM)
                raise RuntimeError(f"mlflow server did not answer at {cfg.uri}/health within {cfg.start_timeout_s} s")
            time.sleep(0.2)
        print(f"MLflow server ready; point runs at it with:\n  export MLFLOW_TRACKING_URI={cfg.uri}", flush=True)
        try:
            code = proc.wait()
        except KeyboardInterrupt:
            code = 0
        if stopping["signal"]:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
            return 0
        return code
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
