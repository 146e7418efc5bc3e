"""A timeout for DALI's waits on its reader worker processes: a watchdog that interrupts the wait when a
worker is gone.

DALI hands work to its reader processes through a shared queue whose ``put`` wakes an idle worker with a
``multiprocessing.Condition``; ``Condition.notify`` then waits, without a timeout, until the woken worker
acknowledges. A worker killed while it waited for work (out of memory, an operator's ``kill``) never does,
and the training process would hang there for ever, holding every other rank in its next collective.
DALI notices a dead worker only when it waits for a result, which it does not do when the results it
needs were already received (at an epoch's end once the whole epoch was read, or mid-epoch by chance).

:class:`WorkerWatch` is armed while the main thread is inside DALI (``next`` and ``reset`` of its
iterator). A daemon thread checks the worker processes twice a second (``/proc/PID/stat``: gone or a
zombie is dead); when one is dead it sends SIGUSR2 to the main thread, whose handler raises
:class:`WorkerGone`. The signal ends the blocked semaphore wait (``EINTR``), so the exception leaves DALI
and the loader reports the dead worker instead of hanging. Outside the main thread (no signal handler can
be installed there) only the checks between batches remain.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

__all__ = ["WorkerGone", "WorkerWatch", "dead_processes"]

WATCH_SIGNAL = signal.SIGUSR2
CHECK_EVERY_S = 0.5


class WorkerGone(RuntimeError):
    """A reader worker process died while DALI was waiting on it (raised in the main thread)."""


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` still runs: not gone, not a zombie (Linux ``/proc``, where DALI runs)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:  # gone (reaped)
        return False
    return stat.rsplit(")", 1)[-1].split()[0] not in ("Z", "X")  # the state follows the command name


def dead_processes(pids: list[int]) -> list[int]:
    return [pid for pid in pids if not process_alive(pid)]


class WorkerWatch:
    """Watch the processes ``pids()`` names while armed (see the module docstring).

    Use as a context manager around an epoch's iteration, and :meth:`armed` around each call into DALI.
    """

    def __init__(self, pids: Callable[[], list[int]]):
        self._pids = pids
        self._armed = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._previous = None
        self.dead: list[int] = []

    def __enter__(self) -> WorkerWatch:
        if threading.current_thread() is not threading.main_thread() or not self._pids():
            return self  # no handler can be installed off the main thread; nothing to watch without workers
        self._previous = signal.signal(WATCH_SIGNAL, self._on_signal)
        self._main = threading.main_thread().ident
        self._thread = threading.Thread(target=self._watch, name="eossl-worker-watch", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._thread is None:
            return
        self._armed = False
        self._stop.set()
        self._thread.join()
        self._thread = None
        signal.signal(WATCH_SIGNAL, self._previous)

    @contextlib.contextmanager
    def armed(self) -> Iterator[None]:
        """The main thread is inside DALI: a dead worker interrupts it with :class:`WorkerGone`."""
        self._armed = True
        try:
            yield
        finally:
            self._armed = False

    def _on_signal(self, signum, frame) -> None:
        if self._armed:  # else the call returned meanwhile: the check before the next call reports it
            self._armed = False
            raise WorkerGone(f"reader worker process(es) {', '.join(map(str, self.dead))} died")

    def _watch(self) -> None:
        while not self._stop.wait(CHECK_EVERY_S):
            if not self._armed:
                continue
            dead = dead_processes(self._pids())
            if dead and self._armed:
                self.dead = dead
                signal.pthread_kill(self._main, WATCH_SIGNAL)
                return
