"""Progress in a log file and one MLflow store: what a user follows while a run is on a cluster.

One real pre-training run with its output redirected to a file (as a cluster job's ``--output``), then a
real evaluation of it, both from the same folder with default settings: they must share one SQLite store
(``./mlflow.db``), and the evaluation's runs must name the training run they score.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import TINY_MOCO, cli_set, run_cli


def _plain_env() -> dict[str, str]:
    return {**os.environ, "MLFLOW_TRACKING_URI": ""}  # unset: the default store


@pytest.fixture(scope="module")
def project(dataset, module_tmp) -> Path:
    """A project folder: a 4-step MoCo run whose stdout went to a file, then a k-NN grid evaluating it."""
    folder = module_tmp("project")
    log = folder / "train.log"
    args = ["train", "moco", "--data", str(dataset), "--out", "runs/moco", "--max-steps", "4"]
    values = {
        **TINY_MOCO,
        "log_every": "2",
        "ckpt_every": "0",
        "split": "train",
        "system_metrics_every_s": "0.5",
    }
    with open(log, "w") as f:
        proc = subprocess.run(
            [sys.executable, "-m", "eossl.launch", *args, *cli_set(values)],
            cwd=folder,
            stdout=f,
            stderr=subprocess.STDOUT,
            env=_plain_env(),
            timeout=600,
        )
    assert proc.returncode == 0, log.read_text()
    eval_args = [
        "eval",
        "classify",
        "--checkpoint",
        "runs/moco",
        "--dataset",
        str(dataset),
        "--budget",
        "8",
        "--protocol",
        "knn",
        "--seeds",
        "0",
        "--set",
        "inputs=s2",
        "--out",
        "eval",
    ]
    proc = run_cli(*eval_args, cwd=folder, env=_plain_env())
    (folder / "eval.log").write_text(proc.stdout + proc.stderr)
    return folder


@pytest.mark.slow
def test_training_log_file_has_plain_progress_lines(project):
    text = (project / "train.log").read_text()
    assert "\r" not in text  # no progress bar redraws in a file
    steps = re.findall(
        r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d step (\d+)/4 epoch \d+/200 loss [-\d.]+ lr [\d.e-]+ "
        r"samples/s [\d.]+ data-wait \d+% ETA \S+$",
        text,
        flags=re.MULTILINE,
    )
    assert steps == ["2", "4"]  # every log_every steps, and the last one
    assert re.search(r" step 4/4 .* ETA 0s$", text, flags=re.MULTILINE)  # nothing left after the last step
    assert re.search(r"^\S+ \S+ epoch 1/\d+ done at step \d+/4, loss", text, flags=re.MULTILINE)
    assert "Creating initial MLflow database tables" not in text  # MLflow's own INFO lines are quiet


@pytest.mark.slow
def test_eval_prints_progress_per_cell(project):
    text = (project / "eval.log").read_text()
    assert re.search(r"classify\S*: 2 cells \(2 rows x 1 inputs\)", text), text
    assert "cell 1/2: random init / s2 (1 after it, ETA ?)" in text
    assert re.search(r"cell 2/2: moco / s2 \(0 after it, ETA \S+\)", text)
    assert re.search(r"cell 2/2 moco / s2: overall_accuracy [\d.]+ %", text)
    assert "Creating initial MLflow database tables" not in text


@pytest.mark.slow
def test_one_store_linked_runs_and_run_level_tags(project, dataset):
    import mlflow

    # One store, in the folder the commands ran in; none beside the run or the evaluation.
    assert (project / "mlflow.db").exists()
    assert (
        not (project / "runs" / "moco" / "mlflow.db").exists()
        and not (project / "eval" / "mlflow.db").exists()
    )
    client = mlflow.MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    exp = client.get_experiment_by_name("eossl")
    (train_run,) = client.search_runs([exp.experiment_id])
    # Run tags on the run, not on the experiment (which would show the first run's commit forever).
    assert {"git_commit", "dataset", "normalisation"} <= set(train_run.data.tags)
    assert not {"git_commit", "dataset", "normalisation"} & set(exp.tags)
    # Only the running method's section: no dino.* params and no dino section in config.yaml.
    params = train_run.data.params
    assert any(k.startswith("moco.") for k in params) and not any(k.startswith("dino.") for k in params)
    config = yaml.safe_load((project / "runs" / "moco" / "config.yaml").read_text())
    assert "moco" in config and "dino" not in config
    # The dataset as a dataset input (name, digest = manifest sha256, source) and the card as description.
    manifest = json.loads((dataset / "manifest.json").read_text())
    inputs = client.get_run(train_run.info.run_id).inputs.dataset_inputs
    assert len(inputs) == 1
    ds = inputs[0].dataset
    assert ds.name == dataset.name and manifest["manifest_sha256"].startswith(ds.digest)
    assert str(dataset.resolve()) in ds.source
    assert "backbone.safetensors" in train_run.data.tags["mlflow.note.content"]
    # The evaluation is in the same store and names the training run it scores.
    eval_exp = client.get_experiment_by_name("eossl-eval")
    cells = client.search_runs([eval_exp.experiment_id], "tags.`eossl.eval.cell` = '1'")
    by_method = {c.data.tags["eossl.eval.method"]: c for c in cells}
    assert set(by_method) == {"random init", "moco"}
    linked = by_method["moco"].data.tags
    assert linked["eossl.pretrain_run_id"] == train_run.info.run_id
    assert linked["eossl.pretrain_run"].endswith(f"/runs/{train_run.info.run_id}")
    assert linked["eossl.pretrain_dir"] == str((project / "runs" / "moco").resolve())
    assert "eossl.pretrain_run_id" not in by_method["random init"].data.tags
    (parent,) = client.search_runs([eval_exp.experiment_id], "tags.`eossl.eval.parent` = '1'")
    assert parent.data.params["dataset"] == str(dataset.resolve())  # absolute, never cwd-relative
    assert parent.data.params["checkpoints"] == str([str((project / "runs" / "moco").resolve())])
    assert client.get_run(parent.info.run_id).inputs.dataset_inputs[0].dataset.name == dataset.name


@pytest.mark.slow
def test_system_metrics_are_logged_when_asked_and_a_missing_package_is_said(project, monkeypatch, capsys):
    import importlib.util

    import mlflow

    from eossl.train.tracking import system_metrics

    client = mlflow.MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("eossl").experiment_id])
    assert run.data.params["system_metrics_every_s"] == "0.5"
    sampled = {k for k in run.data.metrics if k.startswith("system/")}
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= sampled
    log = (project / "train.log").read_text()
    if importlib.util.find_spec("pynvml") is None:  # this machine: said, and trained without GPU figures
        assert "system metrics without GPU figures: the pynvml package is not installed" in log
    assert not system_metrics(0.0)  # off (the default): nothing said
    assert capsys.readouterr().out == ""
    monkeypatch.setitem(sys.modules, "psutil", None)  # as if not installed: `import psutil` fails
    assert not system_metrics(0.2)
    assert "system metrics not logged: the psutil package is not installed" in capsys.readouterr().out


def test_store_default_and_override(tmp_path, monkeypatch):
    from eossl.train.tracking import default_tracking_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert default_tracking_uri() == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert default_tracking_uri() == "http://127.0.0.1:5000"


def test_pretrain_run_id_from_a_run_or_a_checkpoint(tmp_path):
    from eossl.eval.tracking import pretrain_run_id

    run = tmp_path / "run"
    assert pretrain_run_id(run) is None
    ckpt = run / "checkpoints" / "step-0000004"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer.json").write_text(json.dumps({"step": 4, "mlflow_run_id": "abc123"}))
    (run / "checkpoints" / "latest").write_text("step-0000004")
    assert pretrain_run_id(run) == "abc123"  # a run folder: its latest checkpoint
    assert pretrain_run_id(ckpt) == "abc123"  # a named checkpoint


def test_flatten_and_yaml_hold_only_the_running_method(tmp_path):
    from eossl.train.config import TrainConfig, flatten, to_yaml

    moco, dino = TrainConfig(method="moco"), TrainConfig(method="dino")
    assert any(k.startswith("moco.") for k in flatten(moco))
    assert not any(k.startswith("dino.") for k in flatten(moco))
    assert not any(k.startswith("moco.") for k in flatten(dino)) and any(
        k.startswith("dino.") for k in flatten(dino)
    )
    assert "dino" not in yaml.safe_load(to_yaml(moco)) and "moco" not in yaml.safe_load(to_yaml(dino))


def test_loss_plot_keeps_every_curve_visible(tmp_path):
    """Prefix runs (2 epochs = the start of 4) coincide: each needs its own style and to be drawn over."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from eossl.launch.study.report import draw_loss_curves

    def curve(n: int, k: float) -> list[tuple[float, float]]:
        return [(e / 3, 5.0 - k * e) for e in range(n)]

    cells = [
        {"cell": "b32-e2", "loss_curve": curve(12, 0.1)},
        {"cell": "b32-e4", "loss_curve": curve(24, 0.1)},
        {"cell": "b64-e2", "loss_curve": curve(6, 0.05)},
        {"cell": "b64-e4", "loss_curve": curve(12, 0.05)},
        {"cell": "failed", "loss_curve": []},
    ]
    fig, ax = plt.subplots()
    lines = draw_loss_curves(ax, cells)
    assert len(lines) == 4 and len(ax.get_lines()) == 4
    assert len({(line.get_linestyle(), line.get_marker()) for line in lines}) == 4
    order = {line.get_label(): line.get_zorder() for line in lines}
    assert order["b32-e2"] > order["b32-e4"] and order["b64-e2"] > order["b64-e4"]  # shorter drawn over
    plt.close(fig)
