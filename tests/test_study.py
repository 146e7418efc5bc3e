"""Scaling studies: the study file, and a real 2 x 2 study killed midway, re-run, and checked in MLflow."""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from eossl.launch.cli import main
from eossl.launch.study.config import load_study
from eossl.launch.study.run import train_command

from conftest import REPO, history_steps, run_cli, training_env

TINY_TRAIN = {
    "backbone": "resnet18",
    "size": 32,
    "queue_size": 32,
    "hidden": 64,
    "dim": 32,
    "workers": 0,
    "threads": 1,
    "device": "cpu",
    "log_every": 1,
    "ckpt_every": 1,
    "moco.momentum": 0.9,
}


def _study_file(tmp_path: Path, data: str, out: Path, **extra) -> Path:
    study = {
        "name": "bs-ep",
        "method": "moco",
        "data": data,
        "out": str(out),
        "train": TINY_TRAIN,
        "grid": {"batch_size": [4, 8], "epochs": [1, 3]},
        "lr": {"rule": "linear", "base_lr": 0.06, "base_batch": 8, "warmup_epochs": 1},
        "eval": {"protocols": ["linear"], "budget": 4, "inputs": ["s2"], "seeds": [0]},
        **extra,
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    return path


def test_study_file_cells_overrides_and_errors(tmp_path):
    path = _study_file(tmp_path, "ds", tmp_path / "out")
    cfg = load_study(path)
    assert [c.name for c in cfg.cells()] == [
        "batch_size-4_epochs-1",
        "batch_size-4_epochs-3",
        "batch_size-8_epochs-1",
        "batch_size-8_epochs-3",
    ]
    values = cfg.train_values(cfg.cells()[3])
    assert values["batch_size"] == 8 and values["epochs"] == 3 and values["optim.lr_scaling"] == "linear"
    assert (
        values["optim.lr"] == 0.06
        and values["optim.base_batch"] == 8
        and values["experiment"] == "eossl-study-bs-ep"
    )
    # --set: dotted keys, YAML values; any training field can be a grid axis.
    cfg2 = load_study(
        path,
        {"grid.epochs": "[2]", "grid.mode": "[single, fusion_all]", "eval.budget": "1024", "lr.rule": "sqrt"},
    )
    assert [c.name for c in cfg2.cells()] == [
        "batch_size-4_epochs-2_mode-single",
        "batch_size-4_epochs-2_mode-fusionall",
        "batch_size-8_epochs-2_mode-single",
        "batch_size-8_epochs-2_mode-fusionall",
    ]
    assert cfg2.eval.budget == "1024" and cfg2.lr.rule == "sqrt" and cfg2.digest() != cfg.digest()
    # Launching or plotting differently is not another study; what the cells compute is.
    assert (
        load_study(path, {"launch.accelerate_config": "x.yaml", "plot.x": "batch_size"}).digest()
        == cfg.digest()
    )
    # The effective study round-trips through the file cluster jobs re-read.
    (tmp_path / "again.yaml").write_text(cfg2.to_yaml())
    assert load_study(tmp_path / "again.yaml").digest() == cfg2.digest()
    with pytest.raises(ValueError, match="unknown keys"):
        load_study(path, {"grid_typo": "[1]"})
    with pytest.raises(ValueError, match="non-empty list"):
        load_study(path, {"grid.epochs": "[]"})
    with pytest.raises(ValueError, match="lr.rule"):
        load_study(path, {"lr.rule": "cubic"})
    cfg3 = load_study(path, {"grid": "{method: [moco, dino], batch_size: [8]}"})
    commands = [train_command(cfg3, c) for c in cfg3.cells()]
    assert [c[0] for c in commands] == ["moco", "dino"] and not any(
        "method=" in a for c in commands for a in c
    )
    with pytest.raises(ValueError, match="set by the study itself"):
        load_study(path, {"grid.out": "[a, b]"})


def test_study_keys_unknown_key_names_the_closest_and_methods_come_from_the_registry(tmp_path):
    from eossl.train.methods import METHODS

    path = _study_file(tmp_path, "ds", tmp_path / "out")
    with pytest.raises(ValueError, match=r"did you mean eval\.budget\?"):
        load_study(path, {"budget": "64"})  # a study field given without its section
    with pytest.raises(ValueError, match=r"eval: unknown keys \['budgt'\].*did you mean eval\.budget"):
        load_study(path, {"eval.budgt": "64"})
    with pytest.raises(ValueError, match="training config keys go under train: or grid:"):
        load_study(path, {"queue_size": "64"})
    with pytest.raises(ValueError, match=" or ".join(METHODS)):
        load_study(path, {"method": "simclr"})


def _study_here(monkeypatch, *args: str) -> int:
    """``eossl *args`` in this process, which has imported torch and MLflow already (a command would import
    them again), in the folder and environment that its process would have: for studies whose own process is
    not what a test checks. Their cells still train in processes of their own."""
    monkeypatch.chdir(REPO)
    for key in set(os.environ) - set(training_env()):
        monkeypatch.delenv(key)
    return main(list(args))


@pytest.mark.slow
def test_study_killed_midway_resumes_and_finishes_every_cell_once(dataset, tmp_path, capsys, monkeypatch):
    import mlflow

    out = tmp_path / "study"
    study = _study_file(tmp_path, str(dataset), out)
    cmd = [sys.executable, "-m", "eossl.launch", "study", "--config", str(study)]
    victim = out / "cells" / "batch_size-4_epochs-3" / "run"
    log = open(tmp_path / "first.log", "w")
    proc = subprocess.Popen(
        cmd, stdout=log, stderr=subprocess.STDOUT, env=training_env(), cwd=REPO, start_new_session=True
    )
    deadline = time.monotonic() + 400
    # Kill the study (and its training process) hard while the second cell is half-way through pre-training.
    while len(history_steps(victim)) < 4:
        assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "the second cell never started"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    log.close()
    assert not (victim / "backbone").exists(), "killed too late: the cell's training had finished"
    first = json.loads((out / "cells" / "batch_size-4_epochs-1" / "cell.json").read_text())
    assert "linear" in first["evaluated"]  # the first cell had finished before the kill

    capsys.readouterr()
    # The re-run, in this process: the kill ended the first study's process, not this one.
    code = _study_here(monkeypatch, *cmd[3:])
    rerun = capsys.readouterr()
    assert code == 0, rerun.out[-3000:] + rerun.err[-3000:]
    assert "batch_size-4_epochs-1: finished, skipped" in rerun.out

    cfg = load_study(study)
    attempts = {}
    for cell in cfg.cells():
        folder = out / "cells" / cell.name
        state = json.loads((folder / "cell.json").read_text())
        attempts[cell.name] = state["train_attempts"]
        assert set(state["evaluated"]) == {"linear"}
        steps = history_steps(folder / "run")
        assert steps == list(range(1, len(steps) + 1)) and steps, (
            f"{cell.name}: steps {steps[:5]}...{steps[-5:]}"
        )
    assert attempts == {
        "batch_size-4_epochs-1": 1,
        "batch_size-4_epochs-3": 2,
        "batch_size-8_epochs-1": 1,
        "batch_size-8_epochs-3": 1,
    }
    assert "resumed from" in (victim.parent / "train.log").read_text()

    # MLflow: one finished parent; one finished run per cell under it, holding training and evaluation;
    # one finished evaluation per cell nested under the cell.
    uri = f"sqlite:///{out.resolve() / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name("eossl-study-bs-ep")
    runs = client.search_runs([exp.experiment_id], max_results=500)
    parents = [r for r in runs if r.data.tags.get("eossl.study") and "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent_id = parents[0].info.run_id
    cells = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent_id]
    assert sorted(r.data.tags["eossl.study.cell"] for r in cells) == sorted(c.name for c in cfg.cells())
    for r in cells:
        assert r.info.status == "FINISHED"
        batch = int(r.data.params["batch_size"])
        assert math.isclose(float(r.data.params["lr_scaled"]), 0.06 * batch / 8)  # the declared linear rule
        assert 0.0 <= r.data.metrics["eval.linear.s2.overall_accuracy"] <= 1.0
        evals = [e for e in runs if e.data.tags.get("mlflow.parentRunId") == r.info.run_id]
        finished = [e for e in evals if e.info.status == "FINISHED"]
        assert len(finished) == 1 and finished[0].data.tags["eossl.study.eval"] == "linear"
        losses = client.get_metric_history(r.info.run_id, "loss")
        assert len({m.step for m in losses}) == int(r.data.params["total_steps"])

    # Table and plots, written and logged to the parent; the report command rebuilds the same table.
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(row["batch_size"], row["epochs"]) for row in rows] == [
        ("4", "1"),
        ("4", "3"),
        ("8", "1"),
        ("8", "3"),
    ]
    assert all(row["eval.linear.s2.overall_accuracy"] != "n/a" for row in rows)
    for png in ("score_vs_epochs.png", "loss_curves.png", "throughput_vs_batch.png"):
        assert (out / png).stat().st_size > 10_000, png
    logged = {a.path for a in client.list_artifacts(parent_id, "report")}
    assert {"report/results.csv", "report/score_vs_epochs.png", "report/loss_curves.png"} <= logged
    artifacts = out.resolve() / "mlartifacts"  # beside the study's database, not in the current directory
    assert exp.artifact_location == artifacts.as_uri()
    assert (artifacts / parent_id / "artifacts" / "report" / "results.csv").is_file()
    assert any(artifacts.glob("*/artifacts/backbone"))  # the cells' backbones, logged by their trainers
    # In this process: the report reads only the study's files and database (no process of its own needed).
    assert main(["study", "report", "--config", str(study), "--out", str(tmp_path / "report")]) == 0
    assert (tmp_path / "report" / "results.csv").read_text() == (out / "results.csv").read_text(), (
        capsys.readouterr().out
    )


@pytest.mark.slow
def test_a_failing_cell_is_reported_and_the_others_finish(dataset, tmp_path, capsys, monkeypatch):
    import mlflow

    out = tmp_path / "study"
    study = _study_file(
        # A model name is checked only when the model is built: the study starts, and that cell fails.
        tmp_path,
        str(dataset),
        out,
        grid={"batch_size": [8], "epochs": [1], "backbone": ["resnet18", "no_such_net"]},
    )
    data = yaml.safe_load(study.read_text())
    data["eval"] = {"protocols": ["knn"], "budget": "all", "inputs": ["s2"]}
    study.write_text(yaml.safe_dump(data))
    cmd = [sys.executable, "-m", "eossl.launch", "study", "--config", str(study)]
    first = subprocess.run(cmd, capture_output=True, text=True, env=training_env(), cwd=REPO, timeout=600)
    assert first.returncode == 1, first.stdout[-2000:] + first.stderr[-2000:]
    bad = out / "cells" / "backbone-nosuchnet_batch_size-8_epochs-1"
    assert (
        "cell backbone-nosuchnet_batch_size-8_epochs-1 failed" in first.stderr
        and str(bad / "train.log") in first.stderr
    )
    assert "Unknown model (no_such_net)" in first.stderr  # the log's tail says why
    good = json.loads((out / "cells" / "backbone-resnet18_batch_size-8_epochs-1" / "cell.json").read_text())
    assert set(good["evaluated"]) == {"knn"}
    state = json.loads((bad / "cell.json").read_text())
    assert "training failed" in state["error"] and "evaluated" not in state
    client = mlflow.MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    assert client.get_run(state["run_id"]).info.status == "FAILED"
    assert client.get_run(good["run_id"]).info.status == "FINISHED"
    rows = (out / "results.csv").read_text().splitlines()
    assert len(rows) == 3  # both cells in the table; the failed one without scores
    capsys.readouterr()
    code = _study_here(monkeypatch, *cmd[3:])  # the re-run, in this process: only the failed cell trains
    assert (
        code == 1 and "backbone-resnet18_batch_size-8_epochs-1: finished, skipped" in capsys.readouterr().out
    )


@pytest.mark.slow
@pytest.mark.parametrize("stop", ["sigterm", "ctrl_c"])
def test_a_stop_request_ends_an_accelerate_launched_cell_at_a_checkpoint(
    dataset, tmp_path, capsys, monkeypatch, stop
):
    """A study that starts cells with ``accelerate launch`` (two CPU ranks): SIGTERM to the study, or Ctrl-C
    (SIGINT to the whole process group, as a terminal sends it), reaches the ranks, which checkpoint and
    stop; nothing keeps running. After SIGTERM the re-run resumes the cell to the end: what is resumed is
    the same checkpoint whichever signal wrote it, so one re-run (a study and two more ranks) proves it."""
    import psutil

    out = tmp_path / "study"
    study = _study_file(
        tmp_path,
        str(dataset),
        out,
        grid={"batch_size": [4], "epochs": [3]},  # 9 steps: the stop (after step 2) lands mid-run
        launch={"accelerate_config": str(REPO / "launch/accelerate/cpu_2proc.yaml")},
    )
    data = yaml.safe_load(study.read_text())
    data["train"] = {**data["train"], "ckpt_every": 0, "split": "all"}
    data["eval"] = {"protocols": ["knn"], "budget": "all", "inputs": ["s2"]}
    study.write_text(yaml.safe_dump(data))
    cmd = [sys.executable, "-m", "eossl.launch", "study", "--config", str(study)]
    run = out / "cells" / "batch_size-4_epochs-3" / "run"
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=training_env(),
        cwd=REPO,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 300
        while len(history_steps(run)) < 2:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()[-3000:]
            time.sleep(0.05)
        family = psutil.Process(proc.pid).children(recursive=True)
        if stop == "sigterm":
            proc.send_signal(signal.SIGTERM)
        else:
            os.killpg(proc.pid, signal.SIGINT)
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 1 and "checkpointed and stopped" in output, output[-3000:]
    gone, alive = psutil.wait_procs(family, timeout=30)
    assert not alive, [p.cmdline() for p in alive]
    steps = history_steps(run)
    last = max(int(p.name.split("-")[1]) for p in (run / "checkpoints").glob("step-*"))
    assert last == steps[-1] and not (run / "backbone").exists()
    log = (run.parent / "train.log").read_text()
    # Both ranks, each on the first signal it handled: the study's SIGUSR1 or, on Ctrl-C, the SIGINT that the
    # launcher's agent forwards, whichever comes first; a forwarded Ctrl-C is not taken for a second one.
    assert log.count("received: checkpointing at the next step boundary") == 2, log
    assert "KeyboardInterrupt" not in log, log
    if stop != "sigterm":
        return

    # The re-run in this process (the stopped study's process has ended); the cell's ranks are launched again.
    capsys.readouterr()
    code = _study_here(monkeypatch, *cmd[3:])
    assert code == 0, "".join(capsys.readouterr())[-3000:]
    steps = history_steps(run)
    assert steps == list(range(1, len(steps) + 1)) and len(steps) > last
    rank_files = sorted((run / "ranks").glob("rank-*.json"))
    assert [json.loads(p.read_text())["world_size"] for p in rank_files] == [2, 2]


@pytest.mark.slow
def test_a_study_can_score_cells_by_land_cover_segmentation(dataset, tmp_path, capsys, monkeypatch):
    """eval.task=segment: each cell's backbone gets a linear head trained into land-cover maps (mIoU)."""
    import mlflow

    out = tmp_path / "study"
    study = _study_file(tmp_path, str(dataset), out, grid={"batch_size": [8], "epochs": [1]})
    data = yaml.safe_load(study.read_text())
    data["eval"] = {
        "task": "segment",
        "protocols": ["linear"],
        "budget": "all",
        "inputs": ["s2"],
        "finetune_epochs": 1,
        "batch_size": 8,
    }
    study.write_text(yaml.safe_dump(data))
    # In this process (what is checked is the score, not the study's process); the cell trains in its own.
    assert _study_here(monkeypatch, "study", "--config", str(study)) == 0
    state = json.loads((out / "cells" / "batch_size-8_epochs-1" / "cell.json").read_text())
    miou = state["evaluated"]["linear"]["eval.linear.s2.miou"]
    assert 0.0 <= miou <= 1.0, capsys.readouterr().out[-2000:]
    assert (out / "cells" / "batch_size-8_epochs-1" / "eval" / "linear" / "results.md").exists()
    client = mlflow.MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    assert client.get_run(state["run_id"]).data.metrics["eval.linear.s2.miou"] == pytest.approx(miou)
    assert "eval.linear.s2.miou" in (out / "results.csv").read_text().splitlines()[0]
    with pytest.raises(ValueError, match="not a segment protocol"):
        load_study(study, {"eval.protocols": "[knn]"})


@pytest.mark.slow
def test_a_cell_held_by_another_process_is_skipped(dataset, tmp_path):
    """Two studies (or a cluster job's ``--cell`` and a local run) never run the same cell at once."""
    import fcntl

    out = tmp_path / "study"
    study = _study_file(tmp_path, str(dataset), out, grid={"batch_size": [4]})  # checked before any cell
    cell = out / "cells" / "batch_size-4"
    cell.mkdir(parents=True)
    with open(cell / ".cell.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        proc = run_cli("study", "--config", str(study), "--cell", "batch_size-4", timeout=120)
    assert "batch_size-4: being run by another process, skipped" in proc.stdout
    assert not (cell / "run").exists() and not (cell / "train.log").exists()
    assert "not finished" in proc.stdout
