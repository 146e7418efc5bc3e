"""Faults injected for real, and what eossl does about them: a full disk while checkpointing, a checkpoint
that would run code, a stalled S3 server, storage lost mid-run, a killed reader worker, a moved run folder.

Each test names the behaviour it checks in docs/RELIABILITY.md.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from eossl.train.checkpoint import (
    CheckpointError,
    fresh_staging_dir,
    load_tensor_file,
    save_tensor_file,
    write_json_atomic,
)

from conftest import TINY_MOCO, cli_set, history_steps, training_env

# ---------------------------------------------------------------------------------------------------------
# Helpers


@contextmanager
def small_filesystem(path: Path, size: str):
    """A real filesystem of ``size`` (a tmpfs mount) at ``path``: writes past it fail with ENOSPC."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small filesystem needs root")
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
    )
    if proc.returncode != 0:
        pytest.skip(f"mount refused here: {proc.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _grow(path: Path, size: str) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(path)], check=True)


class _Executes:
    """A pickle payload that creates a file when unpickled (what a malicious checkpoint would do)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@contextmanager
def stalled_server():
    """A TCP server that accepts connections and never answers (an S3 endpoint that hangs)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept():
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
                held.append(conn)  # kept open, never read from nor written to
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(5)
        for conn in held:
            conn.close()
        listener.close()


# ---------------------------------------------------------------------------------------------------------
# Checkpoint files


def test_unsafe_checkpoint_is_refused_naming_the_file(tmp_path):
    marker = tmp_path / "code-ran"
    bad = tmp_path / "model.pt"
    torch.save({"weights": torch.zeros(2), "payload": _Executes(marker)}, bad)
    with pytest.raises(CheckpointError, match=r"model\.pt: refused as unsafe") as info:
        load_tensor_file(bad)
    assert str(bad) in str(info.value)
    assert "weights_only=False" not in str(info.value)  # never the advice to load it anyway
    assert not marker.exists()  # and nothing ran
    save_tensor_file({"weights": torch.ones(2)}, tmp_path / "good.pt")
    assert torch.equal(load_tensor_file(tmp_path / "good.pt")["weights"], torch.ones(2))


def test_full_disk_names_the_file_and_leaves_no_partial_file(tmp_path):
    with small_filesystem(tmp_path / "small", "1m") as small:
        target = small / "model.pt"
        with pytest.raises(OSError, match=r"model\.pt: not written: disk full") as info:
            save_tensor_file({"w": torch.zeros(1_000_000)}, target)  # 4 MB into 1 MB
        assert str(target) in str(info.value)
        with pytest.raises(OSError, match=r"trainer\.json: not written: disk full"):
            write_json_atomic(small / "trainer.json", {"x": "y" * 2_000_000})
        assert sorted(p.name for p in small.iterdir()) == []  # no partial or temporary file
        save_tensor_file({"w": torch.zeros(10)}, target)  # small files still fit
        assert sorted(p.name for p in small.iterdir()) == ["model.pt"]


def test_staging_leftovers_are_never_published(tmp_path):
    staging = fresh_staging_dir(tmp_path, 4)
    (staging / ".model.pt.tmp-123").write_bytes(b"partial")  # what a failed write used to leave
    (staging / "model.pt").write_bytes(b"half")
    staging = fresh_staging_dir(tmp_path, 4)
    assert list(staging.iterdir()) == []


# ---------------------------------------------------------------------------------------------------------
# Object storage that stops answering


def test_stalled_s3_server_fails_naming_the_object(monkeypatch):
    from eossl.streaming.storage import ShardReader, StorageError, StorageOptions

    with stalled_server() as endpoint:
        for key, value in {
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        }.items():
            monkeypatch.setenv(key, value)
        shards = [{"path": "shards/shard-000000.tar", "bytes": 4096}]
        reader = ShardReader(
            "s3://stalled/ds", shards, StorageOptions(timeout_s=0.5, retries=1, backoff_s=0.01)
        )
        with pytest.raises(StorageError, match=r"s3://stalled/ds/shards/shard-000000\.tar: .*2 attempts"):
            reader.read(0, 0, 1024)


# ---------------------------------------------------------------------------------------------------------
# Training runs that fail: recorded as failures, nothing lost, resumed exactly


def _train_cmd(data, out: Path, steps: int, **extra) -> list[str]:
    values = {**TINY_MOCO, "log_every": "1", "moco.momentum": "0.9", "ckpt_every": "0", **extra}
    command = ["train", "moco", "--data", str(data), "--out", str(out), "--max-steps", str(steps)]
    return [sys.executable, "-m", "eossl.launch", *command, "--seed", "1", *cli_set(values)]


def _env(tmp_path: Path, **extra) -> dict:
    return {**training_env(), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", **extra}


def _train(data, out: Path, steps: int, env: dict, **extra) -> subprocess.CompletedProcess:
    """Train in the run folder's parent: without MLFLOW_TRACKING_URI the store is ./mlflow.db there."""
    out.parent.mkdir(parents=True, exist_ok=True)
    return subprocess.run(
        _train_cmd(data, out, steps, **extra),
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
        cwd=out.parent,
    )


def _train_here(data, out: Path, steps: int, tracking_uri: str | None, **extra) -> int:
    """The same training command in this process, which has imported torch already (a command would import
    it again): for the runs whose own process is not what a test checks. Without ``tracking_uri`` the store
    is ./mlflow.db in the run folder's parent, as for ``_train``."""
    from eossl.launch.cli import main

    out.parent.mkdir(parents=True, exist_ok=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(out.parent)
        if tracking_uri:
            mp.setenv("MLFLOW_TRACKING_URI", tracking_uri)
        else:
            mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        return main(_train_cmd(data, out, steps, **extra)[3:])


def _mlflow_runs(tmp_path: Path) -> list:
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    return client.search_runs([client.get_experiment_by_name("eossl").experiment_id])


def _losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run / "history.jsonl").read_text().splitlines())}


def _latest(run: Path) -> str:
    return (run / "checkpoints" / "latest").read_text().strip()


STEPS = 9  # three epochs of the shared dataset at the tiny batch


@pytest.fixture(scope="module")
def reference(dataset, module_tmp) -> dict[int, float]:
    """Losses of a run that nothing interrupted (workers=0), for the resumed runs to match."""
    tmp = module_tmp("reference")
    assert _train_here(dataset, tmp / "run", STEPS, f"sqlite:///{tmp / 'mlflow.db'}") == 0
    return _losses(tmp / "run")


def _assert_exact(run: Path, reference: dict[int, float], steps: int = STEPS) -> None:
    got = _losses(run)
    assert sorted(got) == list(range(1, steps + 1))
    for step in range(1, steps + 1):
        assert got[step] == pytest.approx(reference[step], abs=1e-6), (step, got, reference)


@pytest.mark.slow
def test_full_disk_at_checkpoint_fails_clearly_recorded_failed_and_publishes_nothing(dataset, tmp_path):
    env = _env(tmp_path)
    with small_filesystem(tmp_path / "small", "4m") as small:
        run = small / "run"
        proc = _train(dataset, run, 4, env, ckpt_every="2")
        assert proc.returncode not in (0, 75, 76), proc.stderr[-3000:]
        assert "checkpoint of step 2 not written" in proc.stderr, proc.stderr[-3000:]
        assert f"{run}/checkpoints/.staging-step-0000002/model.pt: not written: disk full" in proc.stderr
        assert "inline_container" not in proc.stderr.splitlines()[-1]
        leftovers = [p.relative_to(run).as_posix() for p in (run / "checkpoints").rglob("*")]
        assert leftovers == []  # no partial file, no staging folder
        (failed,) = _mlflow_runs(tmp_path)
        assert failed.info.status == "FAILED"
        assert "disk full" in failed.data.tags["eossl.error"]

        _grow(small, "1g")  # space freed: the same command runs to the end (here: the failure was its own)
        assert _train_here(dataset, run, 4, env["MLFLOW_TRACKING_URI"], ckpt_every="2") == 0
        published = run / "checkpoints" / _latest(run)
        assert sorted(p.name for p in published.iterdir()) == [
            "model.pt",
            "optimizer.pt",
            "rng-rank0.pt",
            "trainer.json",
        ]
        statuses = sorted(r.info.status for r in _mlflow_runs(tmp_path))
        assert statuses == ["FAILED", "FINISHED"]


@pytest.mark.slow
@pytest.mark.timeout(1800)  # three training runs and an S3 server: a hang guard, not a speed bound
def test_storage_outage_checkpoints_exits_76_and_resumes_exactly(dataset, reference, tmp_path, monkeypatch):
    from eossl.train.preemption import DATA_UNAVAILABLE_EXIT_CODE

    from servers import TcpProxy, moto_s3_server, s3_env, upload_tree

    steps = STEPS
    (tmp_path / "moto").mkdir()
    with moto_s3_server(tmp_path / "moto") as server:
        env = {**_env(tmp_path), **s3_env(server)}
        for key, value in s3_env(server).items():
            monkeypatch.setenv(key, value)
        upload_tree(dataset, "s3://outage/ds")
        proxy = TcpProxy(int(server.rsplit(":", 1)[1]))
        proxy.start()
        env["AWS_ENDPOINT_URL"] = proxy.endpoint
        run = tmp_path / "run"
        storage = {"retries": "1", "timeout_s": "2"}
        try:
            proc = subprocess.Popen(
                _train_cmd("s3://outage/ds", run, steps, **storage),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                env=env,
            )
            deadline = time.monotonic() + 600
            while len(history_steps(run)) < 2:
                assert proc.poll() is None, proc.stdout.read()[-3000:]
                assert time.monotonic() < deadline
                time.sleep(0.05)
            proxy.stop()  # the object store is gone for good
            out, _ = proc.communicate(timeout=600)
            assert proc.returncode == DATA_UNAVAILABLE_EXIT_CODE, out[-3000:]
            done = history_steps(run)[-1]
            assert 2 <= done < steps
            assert f"the training data could not be read at step {done}" in out
            assert "s3://outage/ds/shards/" in out  # the object that failed is named
            assert _latest(run) == f"step-{done:07d}"  # checkpointed although ckpt_every=0
            (failed,) = _mlflow_runs(tmp_path)
            assert failed.info.status == "FAILED" and "could not be read" in failed.data.tags["eossl.error"]

            proxy.start()  # storage is back: the same command resumes exactly
            resumed = _train("s3://outage/ds", run, steps, env, **storage)
            assert resumed.returncode == 0, resumed.stderr[-3000:]
            assert f"resumed from {run}/checkpoints/step-{done:07d}" in resumed.stdout
        finally:
            proxy.stop()
    _assert_exact(run, reference)
    (finished,) = _mlflow_runs(tmp_path)  # the same MLflow run, reopened and finished
    assert finished.info.status == "FINISHED" and "eossl.error" not in finished.data.tags


# ---------------------------------------------------------------------------------------------------------
# Cluster kits: exit code 76 survives the launcher and is requeued a bounded number of times

FAILING_LAUNCHER = r"""#!/usr/bin/env bash
# stand-in for accelerate launch whose ranks stopped on unreadable data: they record 76, the launcher
# (torch elastic) reports a failed rank as 1
echo 76 > "$EOSSL_EXIT_CODE_FILE"
exit 1
"""

SRUN = r"""#!/usr/bin/env bash
while [[ "$1" == --* ]]; do shift; done
SLURM_NODEID=0 "$@"
"""

SCONTROL = r"""#!/usr/bin/env bash
case "$1" in
  show) echo 127.0.0.1 ;;
  requeue) echo "$2" >> "$STUB_REQUEUES" ;;
esac
"""


def _stubs(tmp_path: Path) -> Path:
    stubs = tmp_path / "stubs"
    stubs.mkdir()
    for name, text in (("accelerate", FAILING_LAUNCHER), ("srun", SRUN), ("scontrol", SCONTROL)):
        (stubs / name).write_text(text)
        (stubs / name).chmod(0o755)
    return stubs


def test_node_script_exits_76_when_the_ranks_did_behind_the_launcher(tmp_path):
    from conftest import REPO

    stubs = _stubs(tmp_path)
    env = {**training_env(), "ACCELERATE": str(stubs / "accelerate"), "MASTER_ADDR": "127.0.0.1"}
    env.pop("EOSSL_EXIT_CODE_FILE", None)
    node = subprocess.run(
        ["bash", str(REPO / "launch/kits/node.sh"), "moco", "--data", "d", "--out", "o"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert node.returncode == 76, node.stderr
    assert "could not be read" in node.stderr


@pytest.mark.parametrize("restarts, requeued", [(0, True), (3, False)])
def test_slurm_job_requeues_on_76_a_bounded_number_of_times(tmp_path, restarts, requeued):
    from eossl.launch.cluster import ClusterJob, render_slurm

    from conftest import REPO

    stubs = _stubs(tmp_path)
    job = ClusterJob(train_args=("moco", "--data", "d", "--out", "o"), nodes=1, gpus_per_node=1)
    script = tmp_path / "job.sbatch"
    script.write_text(render_slurm(job))
    env = {
        **{k: v for k, v in training_env().items() if not k.startswith("SLURM_")},
        "PATH": f"{stubs}:{os.environ['PATH']}",
        "ACCELERATE": str(stubs / "accelerate"),
        "SLURM_JOB_ID": "77",
        "SLURM_NNODES": "1",
        "SLURM_JOB_NODELIST": "stub",
        "SLURM_RESTART_COUNT": str(restarts),
        "STUB_REQUEUES": str(tmp_path / "requeues"),
        "EOSSL_REPO": str(REPO),
        "TMPDIR": str(tmp_path),
    }
    proc = subprocess.run(["bash", str(script)], capture_output=True, text=True, env=env, timeout=60)
    if requeued:
        assert proc.returncode == 0, proc.stderr
        assert (tmp_path / "requeues").read_text().split() == ["77"]
        assert "requeue 1 of 3" in proc.stderr
    else:
        assert proc.returncode == 76, proc.stderr
        assert not (tmp_path / "requeues").exists()
        assert "still unavailable after 3 requeues" in proc.stderr
    assert not list(tmp_path.glob("eossl-exit-*"))  # the exit-code file is removed


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_killed_reader_worker_checkpoints_exits_76_and_resumes(dataset, tmp_path):
    """SIGKILL to the reader worker mid-epoch (batch 4: 6 steps per epoch, so DALI's prefetch has not read
    the whole epoch; the worker killed idle at the epoch's end is the next test)."""
    from eossl.train.preemption import DATA_UNAVAILABLE_EXIT_CODE

    run, env = tmp_path / "run", _env(tmp_path)
    proc = subprocess.Popen(
        _train_cmd(dataset, run, STEPS, workers="1", batch_size="4"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    out = _kill_reader_worker_after_step(proc, run, 1)
    assert proc.returncode == DATA_UNAVAILABLE_EXIT_CODE, out[-3000:]
    done = history_steps(run)[-1]
    assert done < 6  # stopped within the first epoch
    assert f"the training data could not be read at step {done}" in out
    assert "reader worker process" in out and "died" in out, out[-3000:]
    assert _latest(run) == f"step-{done:07d}"
    (failed,) = _mlflow_runs(tmp_path)
    assert failed.info.status == "FAILED"

    resumed = _train(dataset, run, STEPS, env, workers="1", batch_size="4")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"step-{done:07d}" in resumed.stdout
    assert history_steps(run) == list(range(1, STEPS + 1))  # exactness: the outage test, same path


def _kill_reader_worker_after_step(proc: subprocess.Popen, run: Path, step: int) -> str:
    """SIGKILL the training process's DALI reader worker once ``step`` is in history.jsonl; its output."""
    import psutil

    try:
        deadline = time.monotonic() + 600
        while len(history_steps(run)) < step:
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            assert time.monotonic() < deadline
            time.sleep(0.05)
        workers = [
            p
            for p in psutil.Process(proc.pid).children(recursive=True)
            if "spawn_main" in " ".join(p.cmdline())
        ]
        assert workers, "no reader worker process found"
        os.kill(workers[0].pid, signal.SIGKILL)
        out, _ = proc.communicate(timeout=300)  # a hang fails here instead of blocking the suite
    finally:
        if proc.poll() is None:
            proc.kill()
    return out


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_reader_worker_killed_idle_at_the_epoch_end_checkpoints_and_exits_76(dataset, tmp_path):
    """3 steps per epoch (batch 8): once step 2 is done DALI has read the whole epoch and its worker waits
    for work. Killed then, the worker would never acknowledge the next epoch's hand-over (a wait without
    timeout inside DALI) and the run would hang at the epoch's end. The loader finds it dead first: the run
    checkpoints its last completed step, exits 76, and the same command finishes it."""
    from eossl.train.preemption import DATA_UNAVAILABLE_EXIT_CODE

    run, env = tmp_path / "run", _env(tmp_path)
    proc = subprocess.Popen(
        _train_cmd(dataset, run, STEPS, workers="1"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    out = _kill_reader_worker_after_step(proc, run, 2)
    assert proc.returncode == DATA_UNAVAILABLE_EXIT_CODE, out[-3000:]
    done = history_steps(run)[-1]
    assert done in (2, 3)  # the kill lands before or during step 3, the epoch's last
    assert f"the training data could not be read at step {done}" in out, out[-3000:]
    assert re.search(r"reader worker process\(es\) \d+ died", out), out[-3000:]
    assert _latest(run) == f"step-{done:07d}"
    (failed,) = _mlflow_runs(tmp_path)
    assert failed.info.status == "FAILED"

    resumed = _train(dataset, run, STEPS, env, workers="1")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"step-{done:07d}" in resumed.stdout
    assert history_steps(run) == list(range(1, STEPS + 1))


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("readers", ["dali", "shared_memory"])
def test_the_watch_ends_dalis_wait_on_a_worker_that_died_idle(dataset, monkeypatch, readers):
    """With the checks between batches switched off, only the watchdog stands between a worker killed idle
    (the whole epoch read) and DALI's endless wait when the next epoch is handed over; the shared-memory
    readers' own wait names the dead worker the same way."""
    import psutil

    from eossl.streaming.inputs import InputSpec
    from eossl.streaming.loader import LoaderConfig, SSLLoader, StreamingError
    from eossl.streaming.plan import PlanConfig
    from eossl.streaming.views import ViewConfig

    monkeypatch.setattr(SSLLoader, "_check_workers", lambda self, epoch, where: None)
    views = ViewConfig(mode="single", inputs=InputSpec(sensors=("s2",)), size=32)
    cfg = LoaderConfig(batch_size=8, split="all", device="cpu", workers=1, num_threads=1, views=views)
    loader = SSLLoader(str(dataset), replace(cfg, plan=PlanConfig(seed=3, shuffle_buffer=4), readers=readers))
    assert len(loader) == 3
    batches = iter(loader)
    for _ in range(3):
        next(batches)
    time.sleep(2)  # the worker has nothing left to read: it waits for work
    workers = [p for p in psutil.Process().children(recursive=True) if "spawn_main" in " ".join(p.cmdline())]
    assert len(workers) == 1
    os.kill(workers[0].pid, signal.SIGKILL)
    time.sleep(1)
    with pytest.raises(
        StreamingError, match=rf"end of epoch 0: reader worker process\(es\) {workers[0].pid} died"
    ):
        next(batches)


@pytest.mark.slow
def test_run_folder_and_dataset_moved_between_runs_resume_exactly(dataset, reference, tmp_path):
    """The same dataset at another path and the run folder moved: a resume, not a refusal."""
    before, after = tmp_path / "cluster-a", tmp_path / "cluster-b"
    shutil.copytree(dataset, before / "data" / "ds")
    env = training_env()  # the store ./mlflow.db beside the runs (_train), moved with them
    # The first run in this process (what is moved is its folder, not its process); the resume is a command.
    assert _train_here(before / "data" / "ds", before / "runs" / "r", 4, None, ckpt_every="2") == 0
    shutil.move(before, after)
    again = _train(after / "data" / "ds", after / "runs" / "r", STEPS, env, ckpt_every="2")
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed from {after}/runs/r/checkpoints/step-0000004" in again.stdout
    _assert_exact(after / "runs" / "r", reference)
    assert not before.exists()  # nothing written to the old location


def test_resume_identity_is_the_dataset_content_not_its_location():
    from eossl.train.config import load_config
    from eossl.train.resume import config_digest

    a = load_config("moco", None, {"data": "/cluster-a/ds", "out": "/runs/a"})
    b = load_config("moco", None, {"data": "s3://bucket/ds", "out": "/scratch/moved"})
    assert config_digest(a, dataset_digest="d1") == config_digest(b, dataset_digest="d1")
    assert config_digest(a, dataset_digest="d1") != config_digest(a, dataset_digest="d2")


@pytest.mark.slow
def test_zarr_store_on_a_full_disk_fails_naming_the_store(synthetic_source, tmp_path):
    from eossl.ingest.config import IngestConfig
    from eossl.ingest.finalize import finalize
    from eossl.ingest.storage import DatasetRoot
    from eossl.ingest.writer import IngestError, run_ingest

    with small_filesystem(tmp_path / "small", "400m") as small:
        copy = small / "ds"
        for part in ((0, 2), (1, 2)):  # every unit written, not finalized: what finalize starts from
            run_ingest(IngestConfig(str(synthetic_source), str(copy), workers=1, part=part, progress=False))
        used = shutil.disk_usage(small).used
        _grow(small, f"{used // 1024 + 2048}k")  # 2 MB left: the Zarr store (~31 MB) does not fit
        with pytest.raises(IngestError, match=r"data\.zarr: writing the Zarr store failed: disk full"):
            finalize(DatasetRoot(str(copy)), workers=1, command=("ingest",))


def test_study_report_shows_a_failed_cell_with_its_error():
    from eossl.launch.study.report import _status

    assert _status("FINISHED", "") == "FINISHED"
    shown = _status("FAILED", "CheckpointError: /r/model.pt: not written: disk full | x\ntraceback")
    assert shown == "FAILED: CheckpointError: /r/model.pt: not written: disk full / x"


def test_a_moved_run_folder_keeps_its_artifacts_beside_its_store(tmp_path):
    import mlflow

    from eossl.train.tracking import artifact_root, local_tracking_uri, relocate_local_store

    before, after = tmp_path / "a" / "run", tmp_path / "b" / "run"
    before.mkdir(parents=True)
    uri = local_tracking_uri(before)
    client = mlflow.MlflowClient(uri)
    exp = client.create_experiment("eossl", artifact_location=artifact_root(uri))
    run_id = client.create_run(exp).info.run_id
    relocate_local_store(before / "mlflow.db")  # not moved: unchanged
    assert client.get_run(run_id).info.artifact_uri.startswith(f"{(before / 'mlartifacts').as_uri()}/")
    after.parent.mkdir()
    shutil.move(before, after)
    relocate_local_store(after / "mlflow.db")
    moved = mlflow.MlflowClient(local_tracking_uri(after))
    assert moved.get_run(run_id).info.artifact_uri == f"{(after / 'mlartifacts').as_uri()}/{run_id}/artifacts"
    assert moved.get_experiment(exp).artifact_location == (after / "mlartifacts").as_uri()
