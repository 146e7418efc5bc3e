"""Atomic, resumable checkpoints loadable without arbitrary unpickling.

Layout of ``RUN_DIR/checkpoints/step-NNNNNNN/``: ``model.pt`` (the method's state dict: encoders, heads,
queue, centers ...), ``optimizer.pt``, ``scaler.pt``, ``rng-rank{R}.pt`` (one per rank: Python, NumPy,
torch CPU and CUDA generators), ``trainer.json`` (step, epoch, loader position, MLflow run id, world size).
Everything is written into a temporary folder and renamed into place, then ``checkpoints/latest`` is
replaced atomically; a run killed at any moment resumes from the last complete checkpoint. Loading uses
``torch.load(weights_only=True)`` only: tensors, numbers, strings and containers, no code; a file that
holds anything else is refused as unsafe (:class:`CheckpointError` naming it), never loaded another way.

A write that fails (a full disk) removes its partial file and raises an ``OSError`` naming the file and
saying the disk is full; the staging folder is emptied before each checkpoint and removed when one fails,
so nothing a failed write left behind is ever published.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import random
import shutil
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "CheckpointError",
    "state_digest",
    "latest_checkpoint",
    "load_rng_state",
    "rng_state",
    "write_json_atomic",
]


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or incompatible with the run's configuration."""


_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def _write_atomic(path: Path, write: Callable[[object], None]) -> None:
    """``write(file)`` into a temporary file beside ``path``, then rename it into place.

    On failure the temporary file is removed; an ``OSError`` names ``path`` (Python's own message for a
    failed write names no file) and says so when the disk or quota is full.
    """
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException as exc:
        with suppress(OSError):
            tmp.unlink()
        cause = _os_error(exc)  # torch's writer may raise a RuntimeError on top of the failed write
        if cause is None:
            raise
        reason = "disk full (no space left on the device)" if cause.errno in _DISK_FULL else cause.strerror
        raise OSError(cause.errno, f"{path}: not written: {reason}; the partial file was removed") from exc


def _os_error(exc: BaseException | None) -> OSError | None:
    """The first ``OSError`` in an exception's chain (its causes and the exceptions it arose in)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, OSError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def write_json_atomic(path: Path, data: dict) -> None:
    text = json.dumps(data, indent=1, sort_keys=True).encode()
    _write_atomic(path, lambda f: f.write(text))


def save_tensor_file(obj, path: Path) -> None:
    # torch.save to an open file: a failed write raises the OSError (to a path it raises a bare
    # RuntimeError from its C++ writer, without the file or the errno).
    _write_atomic(path, lambda f: torch.save(obj, f))


def load_tensor_file(path: Path):
    """Tensors, numbers, strings and containers from ``path``; anything that would run code is refused."""
    if not path.exists():
        raise CheckpointError(f"{path} missing: incomplete checkpoint")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(
            f"{path}: refused as unsafe: it holds Python objects other than tensors, numbers and strings, "
            "which loading could run as code. eossl never writes such files: it was replaced or tampered "
            "with; do not load it, restore the checkpoint from a trusted copy or start a new run folder"
        ) from None


def rng_state() -> dict:
    """Every generator of this process, as weights_only-loadable values."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [
            kind,
            torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            int(pos),
            int(has_gauss),
            float(gauss),
        ],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def load_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, gauss_np = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss_np))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step-{step:07d}"


def latest_checkpoint(run_dir: Path) -> Path | None:
    pointer = run_dir / "checkpoints" / "latest"
    if not pointer.exists():
        return None
    path = run_dir / "checkpoints" / pointer.read_text().strip()
    if not (path / "trainer.json").exists():
        raise CheckpointError(f"{pointer} points at {path}, which is incomplete")
    return path


def staging_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f".staging-step-{step:07d}"


def fresh_staging_dir(run_dir: Path, step: int) -> Path:
    """An empty staging folder for ``step``: what an earlier failed write left there is removed first."""
    staging = staging_dir(run_dir, step)
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    return staging


def publish(run_dir: Path, step: int, keep: int) -> Path:
    """Move a fully written staging folder into place, point ``latest`` at it, prune old ones."""
    staging, final = staging_dir(run_dir, step), checkpoint_dir(run_dir, step)
    if final.exists():
        shutil.rmtree(final)
    os.replace(staging, final)
    pointer = run_dir / "checkpoints" / "latest"
    _write_atomic(pointer, lambda f: f.write(final.name.encode()))
    done = sorted(p for p in (run_dir / "checkpoints").glob("step-*") if p.is_dir())
    for old in done[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    for stale in (run_dir / "checkpoints").glob(".staging-*"):
        if stale != staging:
            shutil.rmtree(stale, ignore_errors=True)
    return final


def state_digest(module: torch.nn.Module, which: str = "state") -> str:
    """sha256 over names and bytes of a module's tensors: 'state' (everything), 'params' or 'buffers'.

    Under DDP parameters are equal on every rank after each step; BatchNorm running statistics are
    per-rank between forwards (DDP broadcasts rank 0's at the next forward), so compare 'params'.
    """
    items = {
        "state": module.state_dict().items,
        "params": module.named_parameters,
        "buffers": module.named_buffers,
    }[which]()
    h = hashlib.sha256()
    for name, t in sorted(items):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
