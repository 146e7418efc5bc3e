"""The lease with a heartbeat that makes a duplicate job on another node visible (train/lease.py).

Holders are real processes; another node is stood in for by a different ``host`` name on the same file.
Waiting is done on a fake clock, so nothing here depends on how fast the machine is.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from eossl.train.lease import Lease, LeaseHeld
from eossl.train.preemption import lock_run_dir

HOLDER = textwrap.dedent(
    """
    import sys
    from eossl.train.lease import Lease
    lease = Lease(sys.argv[1], what="training into /runs/x", host=sys.argv[2], refresh_s=0.05, timeout_s=600)
    lease.acquire()
    print("HELD", flush=True)
    sys.stdin.readline()  # hold until the test says so
    lease.release()
    """
)

CONTENDER = textwrap.dedent(
    """
    import sys
    from eossl.train.lease import Lease, LeaseHeld
    try:
        Lease(sys.argv[1], host=sys.argv[2], refresh_s=0.05, timeout_s=600).acquire().release()
    except LeaseHeld as e:
        print(e, flush=True)
        sys.exit(3)
    print("ACQUIRED", flush=True)
    """
)


def _start_holder(path: Path, host: str) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(path), host],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "HELD"
    return proc


def _contend(path: Path, host: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", CONTENDER, str(path), host], capture_output=True, text=True, timeout=120
    )


class FakeClock:
    def __init__(self, now: float = 1000.0):
        self.now = now
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def _write_lease(path: Path, host: str, pid: int, at: float, token: str = "theirs") -> None:
    path.write_text(json.dumps({"host": host, "pid": pid, "time": at, "token": token, "what": "x"}))


@pytest.mark.parametrize("other_host", [False, True], ids=["same-host", "other-host"])
def test_second_process_refuses_while_the_first_holds_the_lease(tmp_path, other_host):
    lease = tmp_path / ".train.lease"
    holder = _start_holder(lease, "node-a")
    try:
        # Another node waits for the holder's heartbeat to move; the same node sees the live pid at once.
        refused = _contend(lease, "node-b" if other_host else "node-a")
        assert refused.returncode == 3, refused.stdout + refused.stderr
        assert f"held by pid {holder.pid} on node-a" in refused.stdout
        assert "last heartbeat" in refused.stdout and "training into /runs/x" in refused.stdout
        assert json.loads(lease.read_text())["pid"] == holder.pid  # the refused process changed nothing
    finally:
        holder.communicate("release\n", timeout=60)
    assert holder.returncode == 0 and not lease.exists()
    assert _contend(lease, "node-b").stdout.strip() == "ACQUIRED"


def test_lease_of_a_killed_process_on_this_host_is_taken_over_at_once(tmp_path):
    lease = tmp_path / ".train.lease"
    holder = _start_holder(lease, "node-a")
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=60)
    assert json.loads(lease.read_text())["pid"] == holder.pid  # left behind
    taken = _contend(lease, "node-a")
    assert taken.stdout.strip() == "ACQUIRED", taken.stdout + taken.stderr
    assert f"taking over the lease of pid {holder.pid} on node-a: its process has exited" in taken.stderr


def test_lease_of_a_recreated_container_is_taken_over(tmp_path, capsys):
    """A pod recreated on Kubernetes keeps its host name; the pid in the lease may now be another process."""
    path = tmp_path / ".train.lease"
    clock = FakeClock()
    other = os.getppid()  # alive, but not the process that wrote the lease: its start time differs
    path.write_text(
        json.dumps({"host": "pod-0", "pid": other, "time": clock.now, "token": "t", "started": "1"})
    )
    lease = Lease(path, host="pod-0", clock=clock, sleep=clock.sleep)
    lease.acquire().release()
    assert f"taking over the lease of pid {other} on pod-0: its process has exited" in capsys.readouterr().err


def test_stale_lease_from_another_node_is_taken_over(tmp_path, capsys):
    path = tmp_path / ".cell.lease"
    clock = FakeClock()
    _write_lease(path, "node-a", 4242, at=clock.now - 121)  # last heartbeat older than the timeout
    lease = Lease(path, host="node-b", timeout_s=120, refresh_s=15, clock=clock, sleep=clock.sleep)
    lease.acquire()
    try:
        held = json.loads(path.read_text())
        assert (held["host"], held["token"]) == ("node-b", lease.token)
        assert (
            "taking over the lease of pid 4242 on node-a: no heartbeat for 121 s" in capsys.readouterr().err
        )
    finally:
        lease.release()
    assert not path.exists()


def test_fresh_lease_on_another_node_is_watched_until_its_heartbeat_stops_or_moves(tmp_path, capsys):
    path = tmp_path / ".train.lease"
    # A holder that died without releasing (node failure): its heartbeat never moves -> taken over after
    # the timeout, measured on our clock.
    clock = FakeClock()
    _write_lease(path, "node-a", 4242, at=clock.now - 5)
    lease = Lease(path, host="node-b", timeout_s=120, refresh_s=15, clock=clock, sleep=clock.sleep)
    lease.acquire().release()
    assert sum(clock.slept) >= 115
    assert "taking over the lease of pid 4242 on node-a: no heartbeat for 125 s" in capsys.readouterr().err
    # The same with the holder's clock a minute ahead of ours: its ages read negative, and what tells is
    # that its heartbeat did not move while we watched for the timeout.
    clock = FakeClock()
    _write_lease(path, "node-a", 4242, at=clock.now + 60)
    lease = Lease(path, host="node-b", timeout_s=120, refresh_s=15, clock=clock, sleep=clock.sleep)
    lease.acquire().release()
    assert sum(clock.slept) >= 120
    assert "its heartbeat did not move for 120 s" in capsys.readouterr().err

    # A live holder: its heartbeat moves while we watch -> refused, with the holder and the lease's age.
    clock = FakeClock()
    _write_lease(path, "node-a", 4242, at=clock.now - 5)

    def holder_beats(seconds: float) -> None:
        clock.sleep(seconds)
        _write_lease(path, "node-a", 4242, at=clock.now - 2)

    lease = Lease(path, host="node-b", timeout_s=120, refresh_s=15, clock=clock, sleep=holder_beats)
    with pytest.raises(LeaseHeld, match=r"held by pid 4242 on node-a \(last heartbeat 2 s ago") as e:
        lease.acquire()
    assert e.value.holder.host == "node-a" and json.loads(path.read_text())["token"] == "theirs"


def test_heartbeat_refreshes_and_notices_a_takeover(tmp_path):
    path = tmp_path / ".train.lease"
    clock = FakeClock()
    lease = Lease(path, host="node-a", timeout_s=120, refresh_s=15, clock=clock, sleep=clock.sleep)
    lease.acquire()
    try:
        clock.now += 15
        lease.heartbeat()
        assert json.loads(path.read_text())["time"] == clock.now
        _write_lease(path, "node-b", 7, at=clock.now)  # taken over while we were unreachable
        lease.heartbeat()
        assert lease.lost is not None and lease.lost.host == "node-b"
        assert json.loads(path.read_text())["host"] == "node-b"  # not overwritten
    finally:
        lease.release()
    assert path.exists()  # not ours any more: left to its holder


def test_run_folder_lock_refuses_while_another_process_holds_the_lease(tmp_path, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    holder = _start_holder(run_dir / ".train.lease", os.uname().nodename)
    try:
        with pytest.raises(RuntimeError, match=f"training into this run folder: .*held by pid {holder.pid}"):
            lock_run_dir(run_dir)
    finally:
        holder.communicate("release\n", timeout=60)
    lock = lock_run_dir(run_dir)
    assert json.loads((run_dir / ".train.lease").read_text())["pid"] == os.getpid()
    lock.close()
    assert not (run_dir / ".train.lease").exists()


def test_lease_settings_are_checked():
    with pytest.raises(ValueError, match="refresh_s"):
        Lease("x", timeout_s=10, refresh_s=10)


@pytest.mark.slow
def test_a_study_cell_leased_by_another_process_is_skipped(dataset, tmp_path):
    """No flock here (as for a job on another node): the lease alone keeps the cell from running twice."""
    from test_study import _study_file

    from conftest import run_cli

    out = tmp_path / "study"
    study = _study_file(tmp_path, str(dataset), out, grid={"batch_size": [4]})  # checked before any cell
    cell = out / "cells" / "batch_size-4"
    cell.mkdir(parents=True)
    holder = _start_holder(cell / ".cell.lease", os.uname().nodename)
    try:
        proc = run_cli("study", "--config", str(study), "--cell", "batch_size-4", timeout=120)
    finally:
        holder.communicate("release\n", timeout=60)
    assert (
        f"batch_size-4: being run by another process ({cell / '.cell.lease'}: held by pid {holder.pid}"
        in (proc.stdout)
    )
    assert not (cell / "run").exists() and not (cell / "train.log").exists()
