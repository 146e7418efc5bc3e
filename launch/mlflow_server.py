"""``eossl mlflow serve``: the tracking server a team (or one study) points ``MLFLOW_TRACKING_URI`` at.

A thin wrapper over ``mlflow server`` with the settings that work here: a SQLite backend and a proxied
artifact root in one folder (``--artifacts-destination``: clients upload artifacts through the server,
so they need no access to the artifact store), the job-execution feature off (it needs extra services),
one worker. For a shared server: ``--host 0.0.0.0``, a database backend (``--backend-store-uri
postgresql://...``) and an object-store artifact root (``--artifacts-destination s3://bucket/mlflow``,
credentials from the server's AWS environment). See docs/SCALING.md.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from eossl.ingest.cli import default_of, given, shown

__all__ = ["ServerConfig", "add_mlflow_arguments", "serve", "server_command"]


@dataclass(frozen=True)
class ServerConfig:
    """One tracking server (``eossl mlflow serve`` flags; the defaults here are the command's)."""

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
    return [
        mlflow,
        "server",
        "--backend-store-uri",
        backend,
        "--artifacts-destination",
        artifacts,
        "--host",
        cfg.host,
        "--port",
        str(cfg.port),
        "--workers",
        str(cfg.workers),
    ]


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
                raise RuntimeError(
                    f"mlflow server exited with code {proc.returncode} before answering at {cfg.uri}"
                )
            if time.monotonic() > deadline:
                os.killpg(proc.pid, signal.SIGTERM)
                raise RuntimeError(
                    f"mlflow server did not answer at {cfg.uri}/health within {cfg.start_timeout_s} s"
                )
            time.sleep(0.2)
        print(
            f"MLflow server ready; point runs at it with:\n  export MLFLOW_TRACKING_URI={cfg.uri}", flush=True
        )
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


# flag dest -> ServerConfig field
_SERVE_FIELDS = {
    "dir": "folder",
    "host": "host",
    "port": "port",
    "backend_store_uri": "backend_store_uri",
    "artifacts_destination": "artifacts_destination",
    "workers": "workers",
}


def add_mlflow_arguments(p: argparse.ArgumentParser) -> None:
    """``eossl mlflow serve``: flags not given keep :class:`ServerConfig`'s defaults (shown in ``--help``)."""

    def default(name: str) -> str:
        return shown(default_of(ServerConfig, name))

    suppress = argparse.SUPPRESS
    sub = p.add_subparsers(dest="mlflow_command", required=True, metavar="{serve}")
    s = sub.add_parser(
        "serve",
        help="an MLflow tracking server with a SQLite store and an artifact root",
        description="Start mlflow server for a team or a study: runs reach it with "
        "MLFLOW_TRACKING_URI=http://HOST:PORT. Stops on Ctrl-C / SIGTERM.",
    )
    s.add_argument(
        "--dir", default=suppress, help=f"folder of mlflow.db and artifacts/ (default {default('folder')})"
    )
    s.add_argument(
        "--host",
        default=suppress,
        help=f"127.0.0.1 (this machine) or 0.0.0.0 (a shared server; default {default('host')})",
    )
    s.add_argument("--port", type=int, default=suppress, help=f"(default {default('port')})")
    s.add_argument(
        "--backend-store-uri",
        default=suppress,
        help="instead of DIR/mlflow.db, e.g. postgresql://... for a shared server",
    )
    s.add_argument(
        "--artifacts-destination", default=suppress, help="instead of DIR/artifacts, e.g. s3://bucket/mlflow"
    )
    s.add_argument("--workers", type=int, default=suppress, help=f"(default {default('workers')})")
    s.set_defaults(handler=_run_mlflow_serve)


def _run_mlflow_serve(args: argparse.Namespace) -> int:
    return serve(ServerConfig(**given(args, _SERVE_FIELDS)))
