"""``torch.utils.data.DataLoader`` with worker processes that cannot hang the caller.

Evaluation and the GeoTIFF baseline of ``eossl bench loader`` read through PyTorch's ``DataLoader``. Two
of its defaults turn a worker's failure into a wait for ever:

- A worker hands each batch's tensors to the main process as shared-memory file descriptors, sent over
  a Unix socket that ``multiprocessing`` creates in its temporary folder. A socket path is limited to 107
  bytes; under a long ``TMPDIR`` (a cluster job's scratch folder, a test's temporary folder) the worker's
  queue thread fails to send the batch, prints the error and drops the batch, and the main process waits
  for it without a timeout. :func:`worker_init` gives such a worker a temporary folder under ``/tmp``
  (or ``/var/tmp``) for its sockets, as Python 3.13's ``multiprocessing`` itself does. (Sharing tensors
  by file name instead is no way out: PyTorch's shared-memory manager also listens on a socket there.)
- ``timeout=0`` waits without a bound for every batch. :func:`torch_loader` gives each batch
  :data:`BATCH_TIMEOUT_S`, so a worker that dies or stalls ends the run with an error instead.
"""

from __future__ import annotations

import multiprocessing.process
import multiprocessing.util
import os
import tempfile
from collections.abc import Callable
from typing import Any

from torch.utils.data import DataLoader, Dataset

__all__ = ["BATCH_TIMEOUT_S", "SOCKET_PATH_LIMIT", "torch_loader", "worker_init", "worker_sockets_fit"]

BATCH_TIMEOUT_S = 600.0
"""The longest wait for one batch from the workers: far above any batch's reading time."""

SOCKET_PATH_LIMIT = 107
"""Bytes of a Unix socket's path on Linux (``sun_path`` holds 108 with the closing NUL)."""

LISTENER_NAME_BYTES = len("listener-") + 8  # multiprocessing.connection.arbitrary_address
SHORT_TEMP_BASES = ("/tmp", "/var/tmp", "/usr/tmp")


def worker_sockets_fit() -> bool:
    """Whether this process's ``multiprocessing`` sockets (``<temp folder>/listener-XXXXXXXX``) fit."""
    folder = multiprocessing.util.get_temp_dir()
    return len(os.fsencode(folder)) + 1 + LISTENER_NAME_BYTES <= SOCKET_PATH_LIMIT


def worker_init(_worker_id: int) -> None:
    """Move a worker's sockets to a short temporary folder when they would not fit (see the docstring)."""
    if worker_sockets_fit():
        return
    base = next((b for b in SHORT_TEMP_BASES if os.access(b, os.W_OK | os.X_OK)), None)
    if base is None:
        raise OSError(
            f"temporary folder {multiprocessing.util.get_temp_dir()} is too long for the Unix sockets of "
            f"DataLoader workers and none of {', '.join(SHORT_TEMP_BASES)} is writable: set a shorter TMPDIR"
        )
    tempfile.tempdir = base  # this worker's temporary files only
    # multiprocessing keeps its folder (made under the long TMPDIR, or inherited from the parent) here;
    # the next get_temp_dir() makes a new one under ``base`` and removes it when the worker exits
    multiprocessing.process.current_process()._config.pop("tempdir", None)


def _init_then(then: Callable[[int], None] | None) -> Callable[[int], None]:
    return worker_init if then is None else _Chained(then)


class _Chained:
    """:func:`worker_init`, then the caller's own ``worker_init_fn`` (a picklable object for spawn)."""

    def __init__(self, then: Callable[[int], None]):
        self.then = then

    def __call__(self, worker_id: int) -> None:
        worker_init(worker_id)
        self.then(worker_id)


def torch_loader(
    dataset: Dataset, *, workers: int = 0, worker_init_fn: Callable[[int], None] | None = None, **kwargs: Any
) -> DataLoader:
    """A ``DataLoader`` over ``dataset`` with ``workers`` processes; other arguments go to ``DataLoader``.

    With workers, each batch waits at most :data:`BATCH_TIMEOUT_S` and every worker runs
    :func:`worker_init` first.
    """
    if not workers:
        return DataLoader(dataset, num_workers=0, worker_init_fn=worker_init_fn, **kwargs)
    kwargs.setdefault("timeout", BATCH_TIMEOUT_S)
    return DataLoader(dataset, num_workers=workers, worker_init_fn=_init_then(worker_init_fn), **kwargs)
