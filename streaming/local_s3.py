"""A local S3-compatible server (``moto_server``) on 127.0.0.1, for benchmarks and tests.

``eossl bench loader --local-s3`` and the test suite use it to run the S3 code paths against a real HTTP
endpoint in a separate process (boto3/s3fs, GDAL's ``/vsis3/`` and DALI talk to it exactly as they would to
S3) without credentials or network. moto ships with the ``test`` extra (``pip install -e '.[test]'``); it
keeps objects in memory, so it measures request handling on this machine, not an object store's latency.
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
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["aws_environment", "free_port", "moto_s3_server", "s3_env", "serve", "upload_files", "upload_tree"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def s3_env(endpoint: str) -> dict[str, str]:
    """The standard AWS variables pointing at a local endpoint (moto accepts any credentials)."""
    return {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint,
    }


def _exe(name: str) -> str:
    return shutil.which(name) or str(Path(sys.executable).with_name(name))


@contextmanager
def serve(
    cmd: list[str], health_url: str, log_path: Path, start_timeout: float = 60, env: dict | None = None
) -> Iterator[subprocess.Popen]:
    """Run a server process in its own session until the block ends; wait until ``health_url`` answers.

    The server runs in the log's folder, so files it writes into its working directory stay there.
    """
    log = open(log_path, "wb")
    try:
        proc = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=env,
            cwd=Path(log_path).parent,
        )
    except FileNotFoundError:
        log.close()
        raise RuntimeError(
            f"{cmd[0]} is not installed (moto_server comes with pip install -e '.[test]')"
        ) from None
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
                proc.wait(timeout=20)
        log.close()


@contextmanager
def moto_s3_server(log_dir: Path, port: int | None = None) -> Iterator[str]:
    """Start ``moto_server`` on 127.0.0.1:<port or a free one>; yield its endpoint URL; stop it."""
    port = port or free_port()
    endpoint = f"http://127.0.0.1:{port}"
    with serve(
        [_exe("moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        f"{endpoint}/moto-api/",
        Path(log_dir) / f"moto-{port}.log",
        start_timeout=30,
    ):
        yield endpoint


@contextmanager
def aws_environment(endpoint: str) -> Iterator[None]:
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


def _filesystem(url: str):
    import s3fs

    # No instance cache: s3fs would reuse a client bound to another endpoint.
    fs = s3fs.S3FileSystem(skip_instance_cache=True, endpoint_url=os.environ.get("AWS_ENDPOINT_URL"))
    bucket = url.removeprefix("s3://").split("/", 1)[0]
    if not fs.exists(bucket):
        fs.mkdir(bucket)
    return fs


def upload_tree(local: str | Path, url: str) -> None:
    """Copy a local folder to s3://bucket/prefix with s3fs (creating the bucket), endpoint from the
    environment."""
    _filesystem(url).put(str(local), url.removeprefix("s3://"), recursive=True)


def upload_files(local_root: str | Path, files: list[str | Path], url: str) -> None:
    """Copy some files of a local folder to s3://bucket/prefix, keeping their paths relative to the folder."""
    root = Path(local_root)
    relative = [Path(f).resolve().relative_to(root.resolve()).as_posix() for f in files]
    prefix = url.removeprefix("s3://").rstrip("/")
    _filesystem(url).put([str(root / r) for r in relative], [f"{prefix}/{r}" for r in relative])
