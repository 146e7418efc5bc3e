"""A TCP proxy that gives a local S3 server an object store's latency (and optionally a bandwidth bound).

``eossl bench loader --local-s3 --s3-latency-ms 20`` puts it between both sides and ``moto_server``: on
127.0.0.1 a ranged GET answers in about a millisecond, which hides what a real object store charges per
request. Model: the first bytes of each request (HTTP/1.1 alternates requests and responses on a
connection) are held back ``latency_ms`` before they are forwarded; with ``bandwidth_mb_s`` each
connection's response bytes are paced to that rate. It runs as its own process (``proxy_process``), so
that pumping bytes never competes with the bench for its interpreter lock; its CPU counts for both sides.
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["proxy_process", "serve"]

CHUNK = 1 << 16


def _close(*socks: socket.socket) -> None:
    for s in socks:
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        s.close()


def _connection(client: socket.socket, target_port: int, latency_s: float, bytes_per_s: float | None):
    try:
        upstream = socket.create_connection(("127.0.0.1", target_port), timeout=30)
    except OSError:
        client.close()
        return
    upstream.settimeout(None)
    new_request = threading.Event()
    new_request.set()

    def requests() -> None:  # client -> server: delay the start of every request
        try:
            while data := client.recv(CHUNK):
                if new_request.is_set():
                    new_request.clear()
                    time.sleep(latency_s)
                upstream.sendall(data)
        except OSError:
            pass
        finally:
            _close(client, upstream)

    def responses() -> None:  # server -> client: paced to the bandwidth; a response ends a request
        try:
            while data := upstream.recv(CHUNK):
                new_request.set()
                client.sendall(data)
                if bytes_per_s:
                    time.sleep(len(data) / bytes_per_s)
        except OSError:
            pass
        finally:
            _close(client, upstream)

    threading.Thread(target=requests, daemon=True).start()
    threading.Thread(target=responses, daemon=True).start()


def serve(port: int, target_port: int, latency_ms: float, bandwidth_mb_s: float | None) -> None:
    """Listen on 127.0.0.1:``port`` and forward every connection to ``target_port`` (until killed)."""
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen(256)
    print("ready", flush=True)
    bytes_per_s = bandwidth_mb_s * 1e6 if bandwidth_mb_s else None
    while True:
        client, _ = listener.accept()
        _connection(client, target_port, latency_ms / 1000, bytes_per_s)


@contextmanager
def proxy_process(
    target_port: int, latency_ms: float, bandwidth_mb_s: float | None = None, timeout_s: float = 60.0
) -> Iterator[str]:
    """Run ``serve`` in a child process on a free port; yields its endpoint URL; stopped on exit."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", __name__, str(port), str(target_port), str(latency_ms)]
    if bandwidth_mb_s:
        cmd.append(str(bandwidth_mb_s))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        ready = threading.Event()
        threading.Thread(target=lambda: proc.stdout.readline() and ready.set(), daemon=True).start()
        if not ready.wait(timeout_s):
            raise RuntimeError(f"the latency proxy (port {port}) did not start within {timeout_s:.0f} s")
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.kill()
        proc.wait(timeout=timeout_s)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("port", type=int)
    parser.add_argument("target_port", type=int)
    parser.add_argument("latency_ms", type=float)
    parser.add_argument("bandwidth_mb_s", type=float, nargs="?")
    args = parser.parse_args()
    serve(args.port, args.target_port, args.latency_ms, args.bandwidth_mb_s)


if __name__ == "__main__":
    main()
