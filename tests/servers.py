"""Real local servers for tests: S3-compatible (moto_server, from eossl.streaming.local_s3), MLflow, a
cuttable proxy.

Not an in-process mock: the product talks HTTP to it exactly as it would to S3, through boto3/s3fs,
GDAL or DALI, with credentials and the endpoint taken from the standard AWS variables.
"""

from __future__ import annotations

import os
import socket
from contextlib import contextmanager
from pathlib import Path

from eossl.streaming.local_s3 import (  # noqa: F401  (re-exported for the tests)
    _exe,
    aws_environment,
    free_port,
    moto_s3_server,
    s3_env,
    serve,
    upload_tree,
)


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
            for pump, src, dst in self._pumps(client, upstream):
                threading.Thread(target=pump, args=(src, dst), daemon=True).start()

    def _pumps(self, client: socket.socket, upstream: socket.socket) -> list:
        """(pump, source, destination) per direction; a faulty proxy replaces one of them."""
        return [(self._pump, client, upstream), (self._pump, upstream, client)]

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
    cmd = [
        _exe("mlflow"),
        "server",
        "--backend-store-uri",
        f"sqlite:///{workdir / 'mlflow.db'}",
        "--artifacts-destination",
        str(workdir / "artifacts"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with serve(cmd, f"{uri}/health", workdir / f"mlflow-{port}.log", start_timeout=90, env=env):
        yield uri
