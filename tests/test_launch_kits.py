"""Cluster launch kits: the rendered SLURM script and Kubernetes Job run for real (per-node commands,
pre-emption, requeue, resume), and ``eossl mlflow serve``.

SLURM itself cannot run here: ``srun`` and ``scontrol`` are small stand-ins on PATH that do what SLURM
does for this script (start one task per node with SLURM_NODEID set, pass signals on, list host names,
record a requeue). Everything else is the real script, ``node.sh``, accelerate and training.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from eossl.launch.cli import main
from eossl.launch.cluster import ClusterJob, render_k8s, render_slurm
from eossl.launch.site import K8sSite, SiteConfig, SlurmSite

from conftest import REPO, TINY_MOCO, cli_set, history_steps, run_cli, training_env
from servers import free_port

BIN = Path(sys.executable).parent

SRUN = r"""#!/usr/bin/env bash
# stand-in for srun --ntasks-per-node=1: one task per node, signals passed on to the tasks
while [[ "$1" == --* ]]; do shift; done
pids=()
trap 'kill -USR1 "${pids[@]}" 2>/dev/null' USR1 TERM
for ((i = 0; i < SLURM_NNODES; i++)); do SLURM_NODEID=$i SLURM_PROCID=$i "$@" & pids+=($!); done
status=0
for p in "${pids[@]}"; do
  while true; do wait "$p" && s=0 || s=$?; kill -0 "$p" 2>/dev/null || break; done
  (( s != 0 )) && status=$s
done
exit $status
"""

SCONTROL = r"""#!/usr/bin/env bash
# stand-in for scontrol: 'show hostnames' and 'requeue JOBID'
case "$1" in
  show) printf '%s\n' $STUB_HOSTS ;;
  requeue) echo "$2" >> "$STUB_REQUEUES" ;;
  *) exit 1 ;;
esac
"""


@pytest.fixture
def slurm_stubs(tmp_path) -> Path:
    stubs = tmp_path / "stubs"
    stubs.mkdir()
    for name, text in (("srun", SRUN), ("scontrol", SCONTROL)):
        (stubs / name).write_text(text)
        (stubs / name).chmod(0o755)
    return stubs


def _slurm_env(stubs: Path, nodes: int, hosts: str, tmp_path: Path, **extra) -> dict:
    env = {k: v for k, v in training_env().items() if not k.startswith("SLURM_")}
    env.update(
        {
            "PATH": f"{stubs}:{BIN}:{env['PATH']}",
            "SLURM_JOB_ID": "4242",
            "SLURM_NNODES": str(nodes),
            "SLURM_JOB_NODELIST": "stub",
            "STUB_HOSTS": hosts,
            "STUB_REQUEUES": str(tmp_path / "requeues"),
            "EOSSL_REPO": str(REPO),
            **extra,
        }
    )
    return env


def _node_commands(text: str) -> dict[int, list[str]]:
    commands = {}
    for line in text.splitlines():
        m = re.match(r"node (\d+)/(\d+): (.*)", line)
        if m:
            commands[int(m.group(1))] = shlex.split(m.group(3))
    return commands


def _flag(cmd: list[str], name: str) -> str:
    return cmd[cmd.index(name) + 1]


def test_slurm_script_starts_one_accelerate_launch_per_node(slurm_stubs, tmp_path):
    job = ClusterJob(
        train_args=("moco", "--data", "s3://bucket/sen12ms", "--out", "/runs/a b"),
        nodes=3,
        gpus_per_node=8,
        job_name="study-cell",
        env={"MLFLOW_TRACKING_URI": "http://mlflow:5000"},
        after_train="echo AFTER-TRAIN on $(hostname)",
    )
    script = tmp_path / "job.sbatch"
    script.write_text(render_slurm(job))
    header = [line for line in script.read_text().splitlines() if line.startswith("#SBATCH")]
    assert "#SBATCH --nodes=3" in header and "#SBATCH --gpus-per-node=8" in header
    assert "#SBATCH --requeue" in header and "#SBATCH --signal=B:USR1@180" in header
    env = _slurm_env(slurm_stubs, 3, "gpu-a gpu-b gpu-c", tmp_path, EOSSL_DRY_RUN="1")
    proc = subprocess.run(["bash", str(script)], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    commands = _node_commands(proc.stdout)
    assert sorted(commands) == [0, 1, 2]
    for rank, cmd in commands.items():
        assert cmd[:2] == ["accelerate", "launch"]
        assert _flag(cmd, "--machine_rank") == str(rank)
        assert _flag(cmd, "--num_machines") == "3" and _flag(cmd, "--num_processes") == "24"
        assert _flag(cmd, "--main_process_ip") == "gpu-a"  # the first node of the allocation hosts c10d
        assert _flag(cmd, "--main_process_port") == str(20000 + 4242 % 20000)
        assert _flag(cmd, "--config_file") == "launch/accelerate/multinode_8gpu.yaml"
        assert cmd[cmd.index("-m") :][:3] == ["-m", "eossl.train", "moco"]
        assert "/runs/a b" in cmd  # arguments survive quoting
    assert proc.stdout.count("AFTER-TRAIN") == 1
    config = yaml.safe_load((REPO / "launch/accelerate/multinode_8gpu.yaml").read_text())
    assert config["rdzv_backend"] == "c10d" and config["mixed_precision"] == "bf16"


def test_kubernetes_job_runs_the_same_node_command_per_index(tmp_path):
    job = ClusterJob(
        train_args=("dino", "--data", "s3://bucket/sen12ms", "--out", "/runs/dino"),
        nodes=4,
        gpus_per_node=8,
        job_name="dino-vits",
        site=SiteConfig(k8s=K8sSite(image="registry/eossl:1.0")),
        env={"MLFLOW_TRACKING_URI": "http://mlflow.team:5000"},
        after_train="echo AFTER-TRAIN",
    )
    service, batch_job = yaml.safe_load_all(render_k8s(job))
    assert service["kind"] == "Service" and service["spec"]["clusterIP"] == "None"
    spec = batch_job["spec"]
    assert (spec["completionMode"], spec["completions"], spec["parallelism"]) == ("Indexed", 4, 4)
    # A pre-empted pod (exit 75) is retried without counting; one whose data was unreadable (76) counts.
    preempted, unreadable = spec["podFailurePolicy"]["rules"]
    assert preempted["action"] == "Ignore" and preempted["onExitCodes"]["values"] == [75]
    assert unreadable["action"] == "Count" and unreadable["onExitCodes"]["values"] == [76]
    pod = spec["template"]["spec"]
    assert pod["subdomain"] == service["metadata"]["name"] == "dino-vits"
    (container,) = pod["containers"]
    assert (
        container["resources"]["limits"]["nvidia.com/gpu"] == 8 and container["image"] == "registry/eossl:1.0"
    )
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["MASTER_ADDR"] == "dino-vits-0.dino-vits" and env["NNODES"] == "4"
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow.team:5000"
    assert {"secretRef", "configMapRef"} <= {k for e in container["envFrom"] for k in e}
    # Run each pod's command as the pod would (its env, its index), printing instead of launching.
    outputs = []
    for index in range(4):
        penv = {**os.environ, **env, "JOB_COMPLETION_INDEX": str(index), "EOSSL_DRY_RUN": "1"}
        proc = subprocess.run(
            [*container["command"], *container["args"]],
            capture_output=True,
            text=True,
            env=penv,
            cwd=REPO,
            timeout=60,
        )
        assert proc.returncode == 0, proc.stderr
        outputs.append(proc.stdout)
        (cmd,) = _node_commands(proc.stdout).values()
        assert _flag(cmd, "--machine_rank") == str(index) and _flag(cmd, "--num_processes") == "32"
        assert _flag(cmd, "--main_process_ip") == "dino-vits-0.dino-vits"
        assert _flag(cmd, "--main_process_port") == "29500"
    assert ["AFTER-TRAIN" in out for out in outputs] == [True, False, False, False]


def test_kit_cli_writes_the_files(tmp_path):
    run_cli(
        "kit",
        "slurm",
        "--nodes",
        "2",
        "--gpus-per-node",
        "4",
        "--out",
        str(tmp_path / "j.sbatch"),
        "--",
        "moco",
        "--data",
        "s3://b/ds",
        "--out",
        "/runs/x",
        "--set",
        "epochs=100",
    )
    text = (tmp_path / "j.sbatch").read_text()
    assert (
        "#SBATCH --nodes=2" in text
        and "train_args=(moco --data s3://b/ds --out /runs/x --set epochs=100)" in text
    )
    bad = run_cli(
        "kit",
        "k8s",
        "--env",
        "AWS_SECRET_ACCESS_KEY=x",
        "--",
        "moco",
        "--data",
        "d",
        "--out",
        "o",
        check=False,
    )
    assert bad.returncode == 2 and "secrets come from the cluster" in bad.stderr


TRAIN = cli_set(
    {
        **TINY_MOCO,
        "batch_size": "4",
        "size": "32",
        "log_every": "1",
        "ckpt_every": "0",
        "moco.momentum": "0.9",
    }
)


@pytest.mark.slow
def test_slurm_job_preempted_checkpoints_requeues_and_resumes(dataset, slurm_stubs, tmp_path):
    """SIGUSR1 to the batch script (what --signal=B:USR1@N sends) -> ranks checkpoint -> requeue -> resume."""
    run, steps = tmp_path / "run", 12  # the stop comes after step 3 and lands mid-run
    job = ClusterJob(
        train_args=("moco", "--data", str(dataset), "--out", str(run), "--max-steps", str(steps), *TRAIN),
        nodes=1,
        gpus_per_node=2,
        accelerate_config="launch/accelerate/cpu_multinode.yaml",
        after_train="echo TRAINING-DONE",
        log_dir=str(tmp_path),
    )
    script = tmp_path / "job.sbatch"
    script.write_text(render_slurm(job))
    env = _slurm_env(
        slurm_stubs,
        1,
        "127.0.0.1",
        tmp_path,
        MASTER_PORT=str(free_port()),
        MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}",  # not ./mlflow.db in the checkout
    )
    log = open(tmp_path / "first.log", "w")
    proc = subprocess.Popen(
        ["bash", str(script)], stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
    )
    deadline = time.monotonic() + 300
    while len(history_steps(run)) < 3:
        assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)
    try:
        assert proc.wait(timeout=120) == 0, (tmp_path / "first.log").read_text()[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
    first = (tmp_path / "first.log").read_text()
    assert (tmp_path / "requeues").read_text().split() == ["4242"], first[-3000:]
    done = history_steps(run)
    checkpoint_step = max(int(p.name.split("-")[1]) for p in (run / "checkpoints").glob("step-*"))
    assert checkpoint_step == done[-1] < steps, (checkpoint_step, done)  # nothing trained is lost
    assert not (run / "backbone").exists() and "TRAINING-DONE" not in first
    assert "SIGUSR1 received" in first

    # The requeued job: the same script, resumed from the checkpoint, to the end.
    again = subprocess.run(["bash", str(script)], capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    resumed = re.search(r"resumed from \S+step-(\d+)", again.stdout + again.stderr)
    assert resumed and int(resumed.group(1)) == checkpoint_step
    assert "TRAINING-DONE" in again.stdout
    assert history_steps(run) == list(range(1, steps + 1))
    ranks = [json.loads(p.read_text()) for p in sorted((run / "ranks").glob("rank-*.json"))]
    assert [r["world_size"] for r in ranks] == [2, 2] and ranks[0]["params_sha256"] == ranks[1][
        "params_sha256"
    ]
    assert (tmp_path / "requeues").read_text().split() == ["4242"]  # no second requeue


@pytest.mark.slow
def test_mlflow_serve_answers_and_stops_on_sigterm(tmp_path):
    import mlflow

    port = free_port()
    folder = tmp_path / "server"
    proc = subprocess.Popen(
        [sys.executable, "-m", "eossl.launch", "mlflow", "serve", "--dir", str(folder), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        uri = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"{uri}/health", timeout=2)
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
                time.sleep(0.2)
        client = mlflow.MlflowClient(uri)
        exp = client.create_experiment("team")
        run = client.create_run(exp)
        client.log_metric(run.info.run_id, "loss", 1.5)
        note = tmp_path / "note.txt"
        note.write_text("artifact through the server")
        client.log_artifact(run.info.run_id, str(note))
        assert client.get_run(run.info.run_id).data.metrics["loss"] == 1.5
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert f"export MLFLOW_TRACKING_URI=http://127.0.0.1:{port}" in out
    assert (folder / "mlflow.db").exists()
    assert [p.read_text() for p in (folder / "artifacts").rglob("note.txt")] == [
        "artifact through the server"
    ]
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)


@pytest.mark.slow
def test_study_emitted_as_slurm_jobs_trains_and_evaluates_a_cell(dataset, slurm_stubs, tmp_path, capsys):
    """``eossl study --emit slurm``: one job per cell; a job trains through the kit, then evaluates on node 0
    into the cell's MLflow run, which was created up front under the study's parent."""
    import mlflow

    out = tmp_path / "study"
    study = {
        "name": "emitted",
        "data": str(dataset),
        "out": str(out),
        "train": dict(a.split("=", 1) for a in TRAIN[1::2] if not a.startswith("split=")),
        "grid": {"batch_size": [4, 8], "epochs": [1]},
        "eval": {"protocols": ["knn"], "budget": "all", "inputs": ["s2"]},
    }
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(study))
    # Emitting and the report run in this process (the same entry point as the command): the jobs are the
    # processes that matter here.
    emit = ["study", "--config", str(tmp_path / "study.yaml"), "--emit", "slurm", "--nodes", "1"]
    emit += ["--gpus-per-node", "2", "--accelerate-config", "launch/accelerate/cpu_multinode.yaml"]
    assert main([*emit, "--repo", str(REPO), "--jobs-dir", str(tmp_path / "jobs")]) == 0
    jobs = sorted((tmp_path / "jobs").glob("*.sbatch"))
    assert [j.name for j in jobs] == ["batch_size-4_epochs-1.sbatch", "batch_size-8_epochs-1.sbatch"], (
        capsys.readouterr().out
    )
    cells = {p.parent.name: json.loads(p.read_text()) for p in (out / "cells").glob("*/cell.json")}
    text = jobs[1].read_text()
    assert f"export EOSSL_MLFLOW_RUN_ID={cells['batch_size-8_epochs-1']['run_id']}" in text
    assert "--cell batch_size-8_epochs-1" in text and "--set batch_size=8" in text

    env = _slurm_env(slurm_stubs, 1, "127.0.0.1", tmp_path, MASTER_PORT=str(free_port()))
    proc = subprocess.run(["bash", str(jobs[1])], capture_output=True, text=True, env=env, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    state = json.loads((out / "cells" / "batch_size-8_epochs-1" / "cell.json").read_text())
    assert (
        set(state["evaluated"]) == {"knn"} and state.get("train_attempts", 0) == 0
    )  # trained by the job, not the study
    client = mlflow.MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    cell_run = client.get_run(state["run_id"])
    assert cell_run.data.params["batch_size"] == "8" and cell_run.data.params["world_size"] == "2"
    assert "eval.knn.s2.overall_accuracy" in cell_run.data.metrics and cell_run.info.status == "FINISHED"
    parent = json.loads((out / "study.json").read_text())["parent_run_id"]
    assert cell_run.data.tags["mlflow.parentRunId"] == parent
    assert main(["study", "report", "--config", str(tmp_path / "study.yaml")]) == 0
    rows = (out / "results.csv").read_text().splitlines()
    assert len(rows) == 3 and "n/a" in rows[1] and "n/a" not in rows[2].split(",")[-2], (
        capsys.readouterr().out
    )


@pytest.mark.slow
def test_study_emitted_as_kubernetes_jobs(tmp_path):
    """``--emit k8s``: one Indexed Job per cell, each logging into its pre-created MLflow run and evaluating
    on index 0 with the study file written next to the results."""
    out = tmp_path / "study"
    study = {
        "name": "k8s",
        "data": "s3://bucket/sen12ms",
        "out": str(out),
        "grid": {"batch_size": [64, 128]},
        "eval": {"protocols": ["linear"], "budget": 1024, "inputs": ["s2"]},
    }
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(study))
    (tmp_path / "site.yaml").write_text(SITE)
    run_cli(
        "study",
        "--config",
        str(tmp_path / "study.yaml"),
        "--emit",
        "k8s",
        "--site",
        str(tmp_path / "site.yaml"),
        "--nodes",
        "2",
        "--image",
        "registry/eossl:1",
        "--jobs-dir",
        str(tmp_path / "jobs"),
    )
    jobs = sorted((tmp_path / "jobs").glob("*.yaml"))
    assert [j.name for j in jobs] == ["batch_size-128.yaml", "batch_size-64.yaml"]
    for path in jobs:
        cell = path.stem
        _, job = yaml.safe_load_all(path.read_text())
        assert job["metadata"]["name"] == f"k8s-{cell}".replace("_", "-")
        (container,) = job["spec"]["template"]["spec"]["containers"]
        assert container["image"] == "registry/eossl:1"  # the flag over the site file
        assert job["spec"]["template"]["spec"]["nodeSelector"]["pool"] == "train"  # from the site file
        env = {e["name"]: e["value"] for e in container["env"]}
        state = json.loads((out / "cells" / cell / "cell.json").read_text())
        assert env["EOSSL_MLFLOW_RUN_ID"] == state["run_id"] and env["MLFLOW_TRACKING_URI"].startswith(
            "sqlite:"
        )
        script = container["args"][0]
        assert f"--set batch_size={cell.split('-')[1]}" in script and f"--cell {cell}" in script
        assert f"--config {out / 'study.yaml'}" in script
    assert (out / "study.yaml").exists()


def test_node_script_refuses_a_rank_outside_the_run_and_a_missing_address():
    node = str(REPO / "launch/kits/node.sh")
    env = {**training_env(), "EOSSL_DRY_RUN": "1", "NNODES": "2"}
    outside = subprocess.run(
        [node, "moco"],
        capture_output=True,
        text=True,
        timeout=30,
        env={**env, "MASTER_ADDR": "n0", "NODE_RANK": "2"},
    )
    assert outside.returncode == 2 and "NODE_RANK=2 is outside 0..1" in outside.stderr
    no_address = subprocess.run(
        [node, "moco"],
        capture_output=True,
        text=True,
        timeout=30,
        env={k: v for k, v in env.items() if k != "MASTER_ADDR"},
    )
    assert no_address.returncode != 0 and "set MASTER_ADDR" in no_address.stderr


SITE = """
slurm:
  partition: gpu-long
  account: proj123
  qos: high
  time: "48:00:00"
  cpus_per_task: 32
  extra_sbatch: ["--exclusive", "--constraint=h100"]
  setup: |
    echo "SITE-SETUP ran${UNSET_BY_MODULE_SCRIPTS:-}"
k8s:
  image: registry.example.org/eossl:1.2
  cpu: "30"
  memory: 200Gi
  node_selector: {nvidia.com/gpu.product: NVIDIA-H100-80GB-HBM3, pool: train}
  tolerations: [{key: nvidia.com/gpu, operator: Exists, effect: NoSchedule}]
  cache_claim: shard-cache
  cache_mount: /cache
  setup: echo POD-SETUP
"""
KIT_TRAIN = ["--", "moco", "--data", "s3://b/ds", "--out", "/runs/x"]


def test_site_file_sets_the_slurm_header_and_runs_the_setup_before_node_sh(slurm_stubs, tmp_path):
    (tmp_path / "site.yaml").write_text(SITE)
    out = tmp_path / "j.sbatch"
    run_cli(
        "kit", "slurm", "--site", str(tmp_path / "site.yaml"), "--qos", "low", "--out", str(out), *KIT_TRAIN
    )
    header = [line for line in out.read_text().splitlines() if line.startswith("#SBATCH")]
    for line in (
        "--partition=gpu-long",
        "--account=proj123",
        "--qos=low",  # the flag overrides the file
        "--time=48:00:00",
        "--cpus-per-task=32",
        "--exclusive",
        "--constraint=h100",
        "--requeue",
    ):
        assert f"#SBATCH {line}" in header, line
    assert "#SBATCH --qos=high" not in header
    # sbatch reads #SBATCH lines only up to the first command: every one is in the leading block.
    lines = out.read_text().splitlines()
    first_command = next(i for i, line in enumerate(lines) if line and not line.startswith("#"))
    assert all(lines.index(h) < first_command for h in header)
    env = _slurm_env(slurm_stubs, 2, "gpu-a gpu-b", tmp_path, EOSSL_DRY_RUN="1")
    proc = subprocess.run(["bash", str(out)], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    printed = proc.stdout.splitlines()
    setup = printed.index("SITE-SETUP ran")  # ran under set +u: the unset variable did not stop it
    nodes = [i for i, line in enumerate(printed) if re.match(r"node \d+/2: ", line)]
    assert len(nodes) == 2 and setup < min(nodes)


def test_site_file_sets_the_kubernetes_pod(tmp_path):
    (tmp_path / "site.yaml").write_text(SITE)
    out = tmp_path / "j.yaml"
    run_cli(
        "kit",
        "k8s",
        "--site",
        str(tmp_path / "site.yaml"),
        "--gpus-per-node",
        "4",
        "--out",
        str(out),
        *KIT_TRAIN,
    )
    _, job = yaml.safe_load_all(out.read_text())
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == "registry.example.org/eossl:1.2"
    assert container["resources"]["requests"] == {"cpu": "30", "memory": "200Gi"}
    assert container["resources"]["limits"] == {"cpu": "30", "memory": "200Gi", "nvidia.com/gpu": 4}
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3", "pool": "train"}
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert {"name": "cache", "mountPath": "/cache"} in container["volumeMounts"]
    assert {"name": "cache", "persistentVolumeClaim": {"claimName": "shard-cache"}} in pod["volumes"]
    script = container["args"][0].splitlines()
    assert script[0] == "echo POD-SETUP" and any(line.startswith("launch/kits/node.sh") for line in script)
    # Without a site file: the defaults, no cache volume, no selector.
    _, plain = yaml.safe_load_all(render_k8s(ClusterJob(train_args=("moco",))))
    pod = plain["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {} and pod["tolerations"] == []
    assert [v["name"] for v in pod["volumes"]] == ["runs", "dshm"]
    assert pod["containers"][0]["image"] == SiteConfig().k8s.image


def test_site_file_with_an_unknown_key_is_refused_naming_the_file_and_the_closest_key(tmp_path):
    site = tmp_path / "site.yaml"
    site.write_text("slurm:\n  partiton: gpu\n")
    bad = run_cli("kit", "slurm", "--site", str(site), *KIT_TRAIN, check=False)
    assert bad.returncode == 2 and str(site) in bad.stderr and "slurm.partition" in bad.stderr
    site.write_text("slurm:\n  cpus_per_task: many\n")
    bad = run_cli("kit", "slurm", "--site", str(site), *KIT_TRAIN, check=False)
    assert bad.returncode == 2 and str(site) in bad.stderr and "slurm.cpus_per_task" in bad.stderr
    site.write_text("k8s:\n  tolerations: [gpu]\n")
    bad = run_cli("kit", "k8s", "--site", str(site), *KIT_TRAIN, check=False)
    assert bad.returncode == 2 and str(site) in bad.stderr and "k8s.tolerations" in bad.stderr
    job = ClusterJob(train_args=("moco",), site=SiteConfig(slurm=SlurmSite(extra_sbatch=("--mem=0",))))
    assert "#SBATCH --mem=0\n" in render_slurm(job) and "--partition" not in render_slurm(job)
