"""A lease file with a heartbeat: one process per folder, across the nodes of a cluster.

``flock`` keeps a second process off a run folder or a study cell on one machine, but on a cluster's
network file system it may be node-local (a job requeued onto another node does not see the first one's
lock) or emulated with its own failure modes. A lease is a small JSON file (host, pid, time, token) that
its holder rewrites every ``refresh_s`` seconds from a daemon thread, so any node can tell a live holder
from a dead one by reading a file:

- no lease, or our own: take it;
- the holder is a dead process on this host, or its last heartbeat is older than ``timeout_s``: stale,
  taken over (and said so);
- otherwise the lease is fresh: a holder on this host whose process is alive is refused at once; one on
  another host is watched until its heartbeat moves (alive: refused, naming the holder and the lease's
  age) or ``timeout_s`` passes without one (it died without releasing, e.g. a node failure: taken over).
  Watching instead of refusing at once lets a job requeued after a hard kill start without waiting for
  a person, and it bounds the wait.

Ages compare the holder's clock with ours, so nodes' clocks must agree to well within ``timeout_s`` (NTP
does). Two processes taking over the same stale lease at the same moment are told apart by re-reading the
file after writing it; this narrows the window but does not close it on a file system without atomic
create, which is why the lease is detection of a duplicate job, not a distributed mutex.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

__all__ = ["LEASE_REFRESH_S", "LEASE_TIMEOUT_S", "Holder", "Lease", "LeaseHeld"]

LEASE_REFRESH_S = 15.0  # heartbeat period: a file rewrite, negligible next to a training step
LEASE_TIMEOUT_S = 120.0  # no heartbeat for this long: the holder is dead (several missed heartbeats)


@dataclass(frozen=True)
class Holder:
    """Who holds a lease: host name, process id, last heartbeat (seconds, the holder's clock), token, what
    it does, and the process's start time (clock ticks since boot; "" where /proc is missing)."""

    host: str
    pid: int
    time: float
    token: str
    what: str = ""
    started: str = ""

    def __str__(self) -> str:
        return f"pid {self.pid} on {self.host}"


class LeaseHeld(RuntimeError):
    """Another live process holds the lease."""

    def __init__(self, path: Path, holder: Holder, age: float):
        doing = f"; {holder.what}" if holder.what else ""
        super().__init__(f"{path}: held by {holder} (last heartbeat {age:.0f} s ago{doing})")
        self.holder, self.age = holder, age


def _started(pid: int) -> str:
    """The start time of ``pid`` in clock ticks since boot (Linux), "" when unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[-1].split()[19]  # field 22, counted after the command name


def _alive(holder: Holder) -> bool:
    """Whether the holder's process still runs on this host. The start time tells a recreated container
    (same host name, the pid now another process's) from the holder."""
    try:
        os.kill(holder.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process
    return not holder.started or _started(holder.pid) in ("", holder.started)


class Lease:
    """The lease at ``path``; ``acquire()`` it (or use ``with``), ``release()`` it when done.

    Args:
        path: the lease file (next to what it guards: ``RUN_DIR/.train.lease``).
        what: what the holder does, shown to a refused process.
        timeout_s: a heartbeat older than this is stale.
        refresh_s: heartbeat period (well under ``timeout_s``).
        clock: wall-clock seconds (compared across hosts); tests pass a fake one.
        sleep: waits while watching another holder's heartbeat; tests pass one that advances the fake clock.
        host, pid: this process's identity (tests stand in for another node).
    """

    def __init__(
        self,
        path: str | Path,
        what: str = "",
        timeout_s: float = LEASE_TIMEOUT_S,
        refresh_s: float = LEASE_REFRESH_S,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
        host: str | None = None,
        pid: int | None = None,
    ):
        if not 0 < refresh_s < timeout_s:
            raise ValueError(f"lease refresh_s ({refresh_s}) must be > 0 and below timeout_s ({timeout_s})")
        self.path = Path(path)
        self.what, self.timeout_s, self.refresh_s = what, timeout_s, refresh_s
        self.clock, self.sleep = clock, sleep
        self.host = host or socket.gethostname()
        self.pid = os.getpid() if pid is None else pid
        self.token = uuid.uuid4().hex
        self._started = _started(self.pid) if pid is None else ""
        self.lost: Holder | None = None  # set when another process took the lease over from us
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def read(self) -> Holder | None:
        """The current holder; None when there is no lease. An unreadable lease reads as infinitely old."""
        try:
            data = json.loads(self.path.read_text())
            return Holder(
                str(data["host"]),
                int(data["pid"]),
                float(data["time"]),
                str(data["token"]),
                str(data.get("what", "")),
                str(data.get("started", "")),
            )
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError):
            return Holder("?", -1, float("-inf"), "unreadable")

    def _mine(self) -> Holder:
        return Holder(self.host, self.pid, self.clock(), self.token, self.what, self._started)

    def _write(self, exclusive: bool) -> bool:
        """Write our lease; ``exclusive``: only if there is none (hard link: atomic on NFS too)."""
        tmp = self.path.with_name(f"{self.path.name}.{self.token}.tmp")
        tmp.write_text(json.dumps(asdict(self._mine())))
        try:
            if not exclusive:
                os.replace(tmp, self.path)
                return True
            try:
                os.link(tmp, self.path)
            except FileExistsError:
                return False
            return True
        finally:
            tmp.unlink(missing_ok=True)

    def acquire(self) -> Lease:
        """Take the lease, or raise :class:`LeaseHeld` (see the module docstring for the rules)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        start, first = self.clock(), self.read()
        while True:
            holder = self.read()
            if holder is None:
                if self._write(exclusive=True):
                    break
                continue
            age = self.clock() - holder.time
            if (holder.host, holder.pid) == (self.host, self.pid) or self._stale(holder, age, start):
                self._write(exclusive=False)
                self.sleep(min(1.0, self.refresh_s))  # then check that no one else took it over meanwhile
                now = self.read()
                if now is not None and now.token != self.token:
                    raise LeaseHeld(self.path, now, self.clock() - now.time)
                break
            if holder.host == self.host or holder != first:  # alive: same host, or its heartbeat moved
                raise LeaseHeld(self.path, holder, age)
            self.sleep(self.refresh_s)
        self._thread = threading.Thread(target=self._beat, name=f"lease {self.path}", daemon=True)
        self._thread.start()
        return self

    def _stale(self, holder: Holder, age: float, start: float) -> bool:
        if holder.host == self.host and not _alive(holder):
            reason = "its process has exited"
        elif age > self.timeout_s:
            reason = f"no heartbeat for {age:.0f} s"
        elif self.clock() - start >= self.timeout_s:
            reason = f"its heartbeat did not move for {self.clock() - start:.0f} s"
        else:
            return False
        if holder.token != self.token:
            print(f"{self.path}: taking over the lease of {holder}: {reason}", file=sys.stderr, flush=True)
        return True

    def heartbeat(self) -> None:
        """Refresh the lease's time; if another process took it over, stop and record it in ``lost``."""
        holder = self.read()
        if holder is not None and holder.token != self.token:
            self.lost = holder
            self._stop.set()
            print(f"{self.path}: the lease was taken over by {holder}", file=sys.stderr, flush=True)
            return
        self._write(exclusive=False)

    def _beat(self) -> None:
        while not self._stop.wait(self.refresh_s):
            try:
                self.heartbeat()
            except OSError as e:  # a file-system hiccup: the next heartbeat tries again
                print(f"{self.path}: heartbeat failed ({e})", file=sys.stderr, flush=True)

    def release(self) -> None:
        """Stop the heartbeat and remove the lease if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        holder = self.read()
        if holder is not None and holder.token == self.token:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> Lease:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
