"""Real local servers for tests: an S3-compatible endpoint (moto_server) started as a separate process.

Not an in-process mock: the product talks HTTP to it exactly as it would to S3, through boto3/s3fs,
GDAL or DALI, with credentials and the endpoint taken from the standard AWS variables.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def s3_env(endpoint: str) -> dict[str, str]:
    return {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint,
    }


@contextmanager
def serve(cmd: list[str], health_url: str, log_path: Path, start_timeout: float = 60, env: dict | None = None):
    """Run a server process in its own session until the block ends; wait until ``health_url`` answers."""
    log = open(log_path, "wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    try:
        deadline = time.monotonic() + start_timeout
        while True:
            try:
                urllib.request.urlopen(health_url, timeout=2)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{cmd[0]} did not start: see {log_path}") from None
                time.sleep(0.1)
        yield proc
    finally:
        if proc.poll() is None:  # SIGTERM to the session ends the server and its workers
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        log.close()


def _exe(name: str) -> str:
    return shutil.which(name) or str(Path(sys.executable).with_name(name))


@contextmanager
def moto_s3_server(log_dir: Path, port: int | None = None):
    """Start ``moto_server`` on 127.0.0.1:<port or a free one>; yield its endpoint URL; stop it."""
    port = port or free_port()
    endpoint = f"http://127.0.0.1:{port}"
    with serve([_exe("moto_server"), "-H", "127.0.0.1", "-p", str(port)], f"{endpoint}/moto-api/",
               log_dir / f"moto-{port}.log", start_timeout=30):
        yield endpoint


def upload_tree(local: Path, url: str) -> None:
    """Copy a local folder to s3://bucket/prefix with s3fs (creating the bucket)."""
    import s3fs

    # No instance cache: s3fs would reuse a client bound to another test's endpoint.
    fs = s3fs.S3FileSystem(skip_instance_cache=True, endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    bucket = url.removeprefix("s3://").split("/", 1)[0]
    if not fs.exists(bucket):
        fs.mkdir(bucket)
    fs.put(str(local), url.removeprefix("s3://"), recursive=True)


class TcpProxy:
    """A TCP forwarder 127.0.0.1:port -> target port, to cut a real server off the network and back.

    ``stop()`` closes the listener and every open connection (clients see refused/reset connections, as
    in an outage) while the server behind keeps its data; ``start()`` listens again on the same port.
    """

    def __init__(self, target_port: int, port: int | None = None):
        import threading

        self.target_port = target_port
        self.port = port or free_port()
        self._lock = threading.Lock()
        self._conns: list[socket.socket] = []
        self._listener: socket.socket | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        import threading

        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def stop(self) -> None:
        with self._lock:
            listener, self._listener = self._listener, None
            conns, self._conns = self._conns, []
        if listener is not None:
            listener.close()
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            c.close()

    def _accept(self, listener: socket.socket) -> None:
        import threading

        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(1 << 16):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


@contextmanager
def mlflow_server(workdir: Path):
    """A real MLflow tracking server (sqlite backend, proxied artifacts) on 127.0.0.1; yields its URI."""
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    cmd = [_exe("mlflow"), "server", "--backend-store-uri", f"sqlite:///{workdir / 'mlflow.db'}",
           "--artifacts-destination", str(workdir / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1"]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with serve(cmd, f"{uri}/health", workdir / f"mlflow-{port}.log", start_timeout=90, env=env):
        yield uri


@contextmanager
def aws_environment(endpoint: str):
    """Point the standard AWS variables at ``endpoint``; restore them (and s3fs's client cache) after."""
    import s3fs

    saved = {k: os.environ.get(k) for k in s3_env(endpoint)}
    os.environ.update(s3_env(endpoint))
    s3fs.S3FileSystem.clear_instance_cache()  # cached clients keep the endpoint they were made with
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        s3fs.S3FileSystem.clear_instance_cache()
