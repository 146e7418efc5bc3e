"""Real multi-process training on CPU (gloo) through accelerate, and tracking against a real MLflow server."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, TINY_DINO, TINY_MOCO, cli_set, history_steps, training_env
from servers import free_port, mlflow_server

ACCELERATE = str(Path(sys.executable).with_name("accelerate"))


TRAIN_VALUES = {**TINY_MOCO, "batch_size": "4", "log_every": "1", "ckpt_every": "0", "moco.momentum": "0.9"}


def _train(dataset: Path, out: Path, steps: int = 3) -> list[str]:
    return [
        "-m",
        "eossl.train",
        "moco",
        "--data",
        str(dataset),
        "--out",
        str(out),
        "--max-steps",
        str(steps),
        *cli_set(TRAIN_VALUES),
    ]


def _ranks(run: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((run / "ranks").glob("rank-*.json"))]


@pytest.fixture(autouse=True)
def _processes_start_in_tmp(tmp_path, monkeypatch):
    """Training processes without MLFLOW_TRACKING_URI log to ./mlflow.db: here, not in the checkout."""
    monkeypatch.chdir(tmp_path)


@pytest.mark.slow
def test_two_processes_one_machine(dataset, tmp_path):
    run = tmp_path / "run"
    cmd = [
        ACCELERATE,
        "launch",
        "--config_file",
        str(REPO / "launch/accelerate/cpu_2proc.yaml"),
        "--main_process_port",
        str(free_port()),
        *_train(dataset, run),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=training_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = _ranks(run)
    assert [r["rank"] for r in ranks] == [0, 1] and {r["world_size"] for r in ranks} == {2}
    # Query and key encoders, heads, queue and pointer identical on both ranks.
    assert ranks[0]["params_sha256"] == ranks[1]["params_sha256"]
    assert ranks[0]["queue_sha256"] == ranks[1]["queue_sha256"]
    assert ranks[0]["step"] == 3
    params = (run / "config.yaml").read_text()
    assert "batch_size: 4" in params


@pytest.mark.slow
def test_two_nodes_on_localhost(dataset, tmp_path):
    """Two "nodes" on 127.0.0.1, each started by the launch kit's per-node script (as SLURM/Kubernetes do)."""
    run = tmp_path / "run"
    node_env = {
        **training_env(),
        "NNODES": "2",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "PROCS_PER_NODE": "1",
        "ACCELERATE_CONFIG": str(REPO / "launch/accelerate/cpu_multinode.yaml"),
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    }
    procs = []
    for node_rank in (0, 1):
        cmd = [str(REPO / "launch/kits/node.sh"), *_train(dataset, run)[2:]]  # node.sh adds -m eossl.train
        procs.append(
            subprocess.Popen(
                cmd,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env={**node_env, "NODE_RANK": str(node_rank)},
            )
        )
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
    ranks = _ranks(run)
    assert len(ranks) == 2 and {r["world_size"] for r in ranks} == {2}
    assert ranks[0]["params_sha256"] == ranks[1]["params_sha256"]
    assert ranks[0]["queue_sha256"] == ranks[1]["queue_sha256"]


@pytest.mark.slow
def test_tracking_against_a_real_mlflow_server(dataset, tmp_path):
    import mlflow

    with mlflow_server(tmp_path) as uri:
        run = tmp_path / "run"
        env = {**training_env(), "MLFLOW_TRACKING_URI": uri}
        proc = subprocess.run(
            [sys.executable, *_train(dataset, run)], capture_output=True, text=True, timeout=600, env=env
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert not (run / "mlflow.db").exists()  # the server, not the local default, got the run
        client = mlflow.MlflowClient(uri)
        exp = client.get_experiment_by_name("eossl")
        (r,) = client.search_runs([exp.experiment_id])
        assert r.data.params["out"] == str(run) and r.data.params["backbone.name"] == "resnet18"
        assert r.data.params["effective_batch_size"] == "4" and r.data.params["world_size"] == "1"
        assert (
            r.data.tags["dataset_manifest_sha256"]
            == json.loads((dataset / "manifest.json").read_text())["manifest_sha256"]
        )
        assert "normalisation" in r.data.tags and "git_commit" in r.data.tags
        history = client.get_metric_history(r.info.run_id, "loss")
        assert [m.step for m in history] == [1, 2, 3]
        for name in ("lr", "samples_per_s", "data_wait_fraction", "memory_mb", "epoch"):
            assert client.get_metric_history(r.info.run_id, name), name
        artifacts = {a.path for a in client.list_artifacts(r.info.run_id)}
        assert {"config.yaml", "backbone"} <= artifacts
        backbone = {a.path for a in client.list_artifacts(r.info.run_id, "backbone")}
        assert {"backbone/backbone.safetensors", "backbone/model_card.json", "backbone/README.md"} <= backbone
        local = client.download_artifacts(r.info.run_id, "backbone/model_card.json", str(tmp_path))
        assert json.loads(Path(local).read_text())["timm_model"] == "resnet18"


@pytest.mark.slow
def test_dino_two_processes_same_launch_command(dataset, tmp_path):
    """DINO through the same accelerate launch kit: teacher, student and center equal on both ranks."""
    run = tmp_path / "dino"
    # The tiny DINO with drop-path at its default: the ranks must agree with it on.
    tiny = {k: v for k, v in TINY_DINO.items() if k != "dino.drop_path"}
    values = {**tiny, "batch_size": "4", "log_every": "1", "ckpt_every": "0"}
    cmd = [
        ACCELERATE,
        "launch",
        "--config_file",
        str(REPO / "launch/accelerate/cpu_2proc.yaml"),
        "--main_process_port",
        str(free_port()),
        "-m",
        "eossl.train",
        "dino",
        "--data",
        str(dataset),
        "--out",
        str(run),
        "--max-steps",
        "2",
        *cli_set(values),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=training_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = _ranks(run)
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert ranks[0]["params_sha256"] == ranks[1]["params_sha256"]
    assert ranks[0]["state_sha256"] == ranks[1]["state_sha256"]  # ViTs have no BN: buffers (center) agree too


@pytest.mark.slow
def test_elastic_resume_on_another_world_size_keeps_the_global_batch(dataset, tmp_path, monkeypatch):
    """Two ranks x 4 checkpoint at step 2; one rank x 8 resumes there (same global batch, same sample order);
    one rank x 4 is refused with the batch size that would work."""
    from eossl.train.checkpoint import CheckpointError
    from eossl.train.config import load_config
    from eossl.train.loop import train

    run = tmp_path / "run"
    two = [
        ACCELERATE,
        "launch",
        "--config_file",
        str(REPO / "launch/accelerate/cpu_2proc.yaml"),
        "--main_process_port",
        str(free_port()),
        *_train(dataset, run, steps=2),
    ]
    proc = subprocess.run(two, capture_output=True, text=True, timeout=600, env=training_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    trainer = json.loads((run / "checkpoints" / "step-0000002" / "trainer.json").read_text())
    assert trainer["world_size"] == 2 and trainer["global_batch"] == 8
    seen_before = trainer["loader"]

    # One rank x 4, refused in this process (a single rank needs no process of its own to be refused).
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    wrong = load_config(
        "moco", None, {**TRAIN_VALUES, "data": str(dataset), "out": str(run), "max_steps": "4"}
    )
    with pytest.raises(CheckpointError, match="--set batch_size=8"):
        train(wrong)
    assert history_steps(run) == [1, 2]  # nothing trained
    one = [sys.executable, *_train(dataset, run, steps=4), "--set", "batch_size=8"]
    proc = subprocess.run(one, capture_output=True, text=True, timeout=600, env=training_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stdout and "step-0000002" in proc.stdout
    assert history_steps(run) == [1, 2, 3, 4]
    after = json.loads((run / "checkpoints" / "step-0000004" / "trainer.json").read_text())
    assert after["world_size"] == 1 and after["global_batch"] == 8 and after["loader"] != seen_before


@pytest.mark.slow
def test_a_second_training_process_on_the_same_run_folder_is_refused(dataset, tmp_path):
    run = tmp_path / "run"
    first = subprocess.Popen(
        [sys.executable, *_train(dataset, run, steps=400)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=training_env(),
    )
    try:
        deadline = time.monotonic() + 120
        while not (run / "history.jsonl").exists():
            assert first.poll() is None and time.monotonic() < deadline, first.stdout.read()[-2000:]
            time.sleep(0.1)
        second = subprocess.run(
            [sys.executable, "-m", "eossl.launch", "train", *_train(dataset, run, steps=400)[2:]],
            capture_output=True,
            text=True,
            timeout=120,
            env=training_env(),
        )
        assert second.returncode == 1 and "another process is training into this run folder" in second.stderr
    finally:
        first.send_signal(signal.SIGTERM)  # a pre-emption: checkpoint and exit 75
        first.communicate(timeout=120)
    assert first.returncode == 75


def _local_mlflow_run(run: Path):
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{run.parent / 'mlflow.db'}")  # the store of the folder it ran in
    (only,) = client.search_runs([client.get_experiment_by_name("eossl").experiment_id])
    return only


def _wait_for_steps(proc: subprocess.Popen, run: Path, n: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while len(history_steps(run)) < n:
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()[-2000:]
        time.sleep(0.05)


@pytest.mark.slow
def test_ctrl_c_checkpoints_at_the_step_boundary_and_the_run_resumes(dataset, tmp_path):
    """SIGINT to the process group (what a terminal's Ctrl-C does: the reader workers get it too)."""
    run = tmp_path / "run"
    cmd = [sys.executable, *_train(dataset, run, steps=400)]
    first = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=training_env(),
        start_new_session=True,
    )
    try:
        _wait_for_steps(first, run, 2)
        os.killpg(first.pid, signal.SIGINT)
        out, _ = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    assert first.returncode == 75, out[-3000:]
    assert "SIGINT received: checkpointing at the next step boundary" in out
    stopped = history_steps(run)
    assert stopped == list(range(1, len(stopped) + 1))
    assert (run / "checkpoints" / f"step-{stopped[-1]:07d}").is_dir()  # the step it stopped at
    killed = _local_mlflow_run(run)  # not FINISHED, as MLflow's exit hook would have it
    assert killed.info.status == "KILLED" and "SIGINT" in killed.data.tags["eossl.error"]

    resumed = subprocess.run(
        [sys.executable, *_train(dataset, run, steps=len(stopped) + 2)],
        capture_output=True,
        text=True,
        timeout=600,
        env=training_env(),
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert history_steps(run) == list(range(1, len(stopped) + 3))
    after = _local_mlflow_run(run)  # the same MLflow run, reopened and finished
    assert after.info.run_id == killed.info.run_id
    assert after.info.status == "FINISHED" and "eossl.error" not in after.data.tags


@pytest.mark.slow
def test_a_dead_reader_worker_on_one_rank_checkpoints_every_rank_and_exits_76(dataset, tmp_path):
    """SIGKILL to one reader worker of one of two ranks: both ranks agree, checkpoint the same step and
    stop (no rank left waiting in a collective); the ranks' code 76 reaches the caller through
    EOSSL_EXIT_CODE_FILE although the launcher exits 1; the same command resumes."""
    import psutil

    run, exit_file = tmp_path / "run", tmp_path / "exit-code"

    def launch(steps: int) -> list[str]:
        config = str(REPO / "launch/accelerate/cpu_2proc.yaml")
        return [ACCELERATE, "launch", "--config_file", config, "--main_process_port", str(free_port())] + [
            *_train(dataset, run, steps=steps),
            *("--set", "workers=1", "--set", "batch_size=2"),  # 6 steps per epoch: killed mid-epoch
        ]

    env = {**training_env(), "EOSSL_EXIT_CODE_FILE": str(exit_file)}
    proc = subprocess.Popen(launch(400), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        _wait_for_steps(proc, run, 1, timeout=300)
        tree = psutil.Process(proc.pid).children(recursive=True)
        ranks = [p for p in tree if "eossl.train" in " ".join(p.cmdline())]
        rank1 = next(p for p in ranks if p.environ().get("RANK") == "1")
        workers = [p for p in rank1.children(recursive=True) if "spawn_main" in " ".join(p.cmdline())]
        assert workers, "no reader worker of rank 1 found"
        os.kill(workers[0].pid, signal.SIGKILL)
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0 and exit_file.read_text().strip() == "76", out[-3000:]
    assert "a reader worker process of rank 1 died" in out, out[-3000:]
    done = history_steps(run)[-1]
    assert (run / "checkpoints" / "latest").read_text().strip() == f"step-{done:07d}"
    trainer = json.loads((run / "checkpoints" / f"step-{done:07d}" / "trainer.json").read_text())
    position = trainer["loader"]["epoch"] * 6 + trainer["loader"]["step"]  # 6 steps per epoch here
    assert position == done  # the loader at the checkpointed step, not past it on the rank that read on
    resumed = subprocess.run(launch(done + 2), capture_output=True, text=True, timeout=600, env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert history_steps(run) == list(range(1, done + 3))
