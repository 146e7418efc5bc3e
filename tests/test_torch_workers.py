"""DataLoader workers under a temporary folder too long for Unix sockets: batches arrive, nothing hangs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from eossl.streaming.torch_workers import SOCKET_PATH_LIMIT

SCRIPT = textwrap.dedent(
    """
    import sys, torch
    from torch.utils.data import DataLoader, TensorDataset
    from eossl.streaming.torch_workers import torch_loader, worker_sockets_fit

    data = TensorDataset(torch.arange(24, dtype=torch.float32).reshape(6, 4))
    if sys.argv[1] == "plain":
        loader = DataLoader(data, batch_size=2, num_workers=1, timeout=10)
    else:
        print("sockets fit:", worker_sockets_fit())
        loader = torch_loader(data, batch_size=2, workers=1)
    print("sum:", float(sum(batch[0].sum() for batch in loader)))
    """
)


def _run(kind: str, tmpdir: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", SCRIPT, kind],
        env={**os.environ, "TMPDIR": str(tmpdir)},
        capture_output=True,
        text=True,
        timeout=240,
    )


@pytest.fixture
def long_tmpdir(tmp_path: Path) -> Path:
    """A temporary folder whose sockets (``<folder>/pymp-XXXXXXXX/listener-XXXXXXXX``) cannot be bound."""
    folder = tmp_path / ("scratch-of-a-cluster-job-" + "x" * max(0, SOCKET_PATH_LIMIT - len(str(tmp_path))))
    folder.mkdir()
    return folder


def test_a_plain_dataloader_loses_its_batches_there(long_tmpdir):
    """The fault is real: PyTorch's own loader cannot send a batch and waits out its timeout."""
    proc = _run("plain", long_tmpdir)
    assert proc.returncode != 0
    assert "AF_UNIX path too long" in proc.stderr and "timed out" in proc.stderr


@pytest.fixture
def short_tmpdir() -> Iterator[Path]:
    """A usual temporary folder, short whatever TMPDIR the suite runs under."""
    folder = Path(tempfile.mkdtemp(prefix="eossl-", dir="/tmp"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def test_torch_loader_workers_deliver_every_batch_there(long_tmpdir, short_tmpdir):
    proc = _run("ours", long_tmpdir)
    assert proc.returncode == 0, proc.stderr
    assert "sockets fit: False" in proc.stdout and "sum: 276.0" in proc.stdout
    assert "AF_UNIX" not in proc.stderr
    short = _run("ours", short_tmpdir)  # and under a usual folder, the default sharing is kept
    assert short.returncode == 0 and "sockets fit: True" in short.stdout and "sum: 276.0" in short.stdout
