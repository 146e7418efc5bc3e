"""Stopping a run cleanly: pre-emption signals, Ctrl-C, and one training process group per run folder.

SIGTERM or SIGUSR1 (what SLURM and Kubernetes send before they stop a job) sets a flag; at the next step
boundary every rank agrees on it (one all-reduce), the run checkpoints and training raises
:class:`Preempted`. Running the same command again resumes exactly there (launch/slurm requeues). Ctrl-C
(SIGINT) does the same, so an interactive stop loses no steps; a second Ctrl-C stops at once.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO

from .lease import Lease, LeaseHeld

__all__ = [
    "DATA_UNAVAILABLE_EXIT_CODE",
    "EXIT_FILE_ENV",
    "PREEMPTED_EXIT_CODE",
    "STOP_SIGNALS",
    "DataUnavailable",
    "Preempted",
    "RunDirLock",
    "StopRequest",
    "lock_run_dir",
    "record_exit_code",
]

# SIGTERM/SIGUSR1: pre-emption (SLURM, Kubernetes, studies); SIGINT: Ctrl-C, which a terminal sends to the
# whole process group, so every rank and reader worker gets it too.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: "try again"; launch kits and studies resume on it
# The data could not be read (storage outage after its retries, a dead reader worker): the run checkpointed
# at the last step boundary. Kits requeue a bounded number of times (an outage may outlast the job).
DATA_UNAVAILABLE_EXIT_CODE = 76
# A file the training process writes its exit code into: ``accelerate launch`` (torch elastic) turns every
# failed rank into exit code 1, so kits and studies set this to learn why the ranks stopped.
EXIT_FILE_ENV = "EOSSL_EXIT_CODE_FILE"


class Preempted(RuntimeError):
    """The run stopped on a pre-emption signal after writing a checkpoint; rerun the command to resume."""

    def __init__(self, step: int, signum: int, run_dir: Path):
        super().__init__(
            f"stopped by {signal.Signals(signum).name} at step {step} after a checkpoint in "
            f"{run_dir / 'checkpoints'}; run the same command again to resume"
        )
        self.step, self.signum = step, signum


class DataUnavailable(RuntimeError):
    """The loader could not deliver a batch; the run checkpointed at the last completed step first.

    Nothing since that step is lost: the model and optimiser are consistent at a step boundary, and
    running the same command again (once storage is back) resumes exactly there.
    """

    def __init__(self, step: int, run_dir: Path, cause: BaseException):
        super().__init__(
            f"the training data could not be read at step {step}: {cause}; checkpointed in "
            f"{run_dir / 'checkpoints'}: run the same command again to resume once the data is readable"
        )
        self.step = step


def record_exit_code(code: int) -> None:
    """Write ``code`` to the file named by ``EOSSL_EXIT_CODE_FILE`` (if set), for the kit that launched
    the ranks: the launcher's own exit code says only that a rank failed."""
    path = os.environ.get(EXIT_FILE_ENV)
    if path:
        with suppress(OSError):
            Path(path).write_text(f"{code}\n")


class StopRequest:
    """The stop signal this process received (``signum``, 0 for none), acted on at the next step boundary.

    A second Ctrl-C raises ``KeyboardInterrupt`` at once: the user asked twice, so no checkpoint is waited
    for. It counts only from ``REPEAT_AFTER_S`` after the first: one Ctrl-C reaches a rank twice under
    ``accelerate launch`` (from the terminal to the process group, and forwarded by the launcher's agent).
    Other signals in between (a study's SIGUSR1) do not reset it.

    Args:
        rank: the process's rank, named in the message.
        clock: seconds of a monotonic clock (tests pass a fake one instead of waiting).
    """

    REPEAT_AFTER_S = 1.0

    def __init__(self, rank: int = 0, clock: Callable[[], float] = time.monotonic):
        self.rank = rank
        self.clock = clock
        self.signum = 0
        self.first_interrupt: float | None = None

    def __call__(self, signum: int, _frame=None) -> None:
        if signum == signal.SIGINT:
            now = self.clock()
            if self.first_interrupt is None:
                self.first_interrupt = now
            elif now - self.first_interrupt >= self.REPEAT_AFTER_S:
                raise KeyboardInterrupt
        # Recorded before the message: a second signal (a study's SIGUSR1 right after a forwarded Ctrl-C)
        # can run its handler inside this one's print, and must find the request already taken.
        first, self.signum = not self.signum, signum
        if first:
            again = " (Ctrl-C again to stop without it)" if signum == signal.SIGINT else ""
            print(
                f"rank {self.rank}: {signal.Signals(signum).name} received: checkpointing at the next step "
                f"boundary{again}",
                flush=True,
            )

    @contextmanager
    def installed(self) -> Iterator[StopRequest]:
        """Handle ``STOP_SIGNALS`` inside the block (main thread only: Python delivers signals there)."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {s: signal.signal(s, self) for s in STOP_SIGNALS}
        try:
            yield self
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)


class RunDirLock:
    """What :func:`lock_run_dir` holds: the folder's ``flock`` and its lease; ``close()`` releases both."""

    def __init__(self, file: IO, lease: Lease):
        self.file, self.lease = file, lease

    def close(self) -> None:
        self.lease.release()
        self.file.close()


def lock_run_dir(run_dir: Path) -> RunDirLock | None:
    """One training process group per run folder: a second one (a stale study re-run, a duplicate job)
    would interleave checkpoints. Global rank 0 holds an exclusive ``flock`` (the OS drops it when the
    process dies) and, because a network file system may keep ``flock`` node-local, a lease with a
    heartbeat (:mod:`eossl.train.lease`) that a duplicate job on another node sees. Close the returned
    lock to release both. Other ranks get None."""
    import fcntl

    if int(os.environ.get("RANK", "0")) != 0:
        return None
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = open(run_dir / ".train.lock", "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.close()
        raise RuntimeError(
            f"{run_dir}: another process is training into this run folder (lock "
            f"{run_dir / '.train.lock'}); stop it first, or use another --out"
        ) from None
    try:
        lease = Lease(run_dir / ".train.lease", what=f"training into {run_dir}").acquire()
    except LeaseHeld as e:
        lock.close()
        raise RuntimeError(
            f"{run_dir}: another process is training into this run folder: {e}; stop it first, "
            "or use another --out"
        ) from None
    return RunDirLock(lock, lease)
