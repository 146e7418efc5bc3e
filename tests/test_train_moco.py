"""MoCo-v2 training on CPU with real data: every mode learns, runs resume exactly, exports load with timm."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file

from eossl.streaming.loader import SSLLoader
from eossl.train.builders import loader_config
from eossl.train.config import load_config
from eossl.train.methods import get_method

from conftest import TINY_MOCO, cli_set, run_cli, train_compiled


@pytest.mark.slow
@pytest.mark.parametrize(
    "mode, extra",
    [
        ("single", {"sensors": "s1"}),
        ("single", {"sensors": "s2"}),
        ("single", {"sensors": "s1s2"}),
        ("pair", {"adapter": "conv1x1"}),
        ("pair", {"adapter": "conv1x1", "augment": "false", "pairing": "symmetric"}),
        ("pair", {"adapter": "conv1x1", "pairing": "mixed"}),
        ("pair", {"adapter": "zeropad"}),
        ("fusion_all", {}),
        ("fusion_partial", {}),
        ("fusion_optional", {}),
    ],
    ids=[
        "s1",
        "s2",
        "s1s2",
        "pair",
        "pair-noaug-symmetric",
        "pair-mixed",
        "pair-zeropad",
        "fusion_all",
        "fusion_partial",
        "fusion_optional",
    ],
)
def test_each_mode_reduces_the_loss_on_a_fixed_batch(dataset, mode, extra):
    cfg = load_config(
        "moco",
        None,
        {**TINY_MOCO, "mode": mode, "data": str(dataset), "out": "unused", "moco.momentum": "0.5", **extra},
    )
    spec = get_method("moco")
    views_cfg = spec.views(cfg)
    loader = SSLLoader(str(dataset), loader_config(cfg, views_cfg), rank=0, world_size=1)
    batch = next(iter(loader))
    torch.manual_seed(0)
    model = spec.build(cfg, loader.channels, views_cfg.mode)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05, momentum=0.9)
    losses = []
    model.train()
    for _ in range(12):
        loss, _ = model(batch.views)
        opt.zero_grad()
        loss.backward()
        opt.step()
        # A fixed batch would fill the queue with its own keys (negatives = positives): keep the queue
        # fixed and apply only the key-encoder EMA.
        model.discard_pending()
        model.after_step({"momentum": 0.5})
        losses.append(float(loss))
    assert sum(losses[-3:]) / 3 < losses[0] - 0.1, losses


def _train_args(dataset: Path, out: Path, steps: int, **extra) -> list[str]:
    values = {**TINY_MOCO, "ckpt_every": "2", "log_every": "1", "moco.momentum": "0.9", **extra}
    return [
        "train",
        "moco",
        "--data",
        str(dataset),
        "--out",
        str(out),
        "--max-steps",
        str(steps),
        "--seed",
        "1",
        *cli_set(values),
    ]


def _history(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]


def _losses(run: Path) -> dict[int, float]:
    return {h["step"]: h["loss"] for h in _history(run)}


@pytest.mark.slow
def test_exact_resume_after_kill_mid_epoch(dataset, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    straight = tmp_path / "straight"
    run_cli(*_train_args(dataset, straight, 6))
    # Same run killed after its step-2 checkpoint (mid-epoch: 3 steps per epoch here), then resumed.
    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "eossl.launch", *_train_args(dataset, killed, 6)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    pointer = killed / "checkpoints" / "latest"
    deadline = time.monotonic() + 240
    while not (pointer.exists() and pointer.read_text().strip() == "step-0000002"):
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    assert not (killed / "ranks").exists()  # it really did not finish
    out = run_cli(*_train_args(dataset, killed, 6)).stdout
    assert "resumed from" in out and "step-0000002" in out
    ref, got = _losses(straight), _losses(killed)
    assert sorted(got) == list(range(1, 7)) and sorted(ref) == list(range(1, 7))
    for step in range(1, 7):
        assert got[step] == pytest.approx(ref[step], abs=1e-6), (step, got, ref)
    a = json.loads((straight / "ranks" / "rank-0.json").read_text())
    b = json.loads((killed / "ranks" / "rank-0.json").read_text())
    assert a["state_sha256"] == b["state_sha256"]  # weights, heads, queue and pointer identical


@pytest.mark.slow
def test_run_outputs_export_and_local_mlflow(dataset, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = tmp_path / "run"
    out = run_cli(*_train_args(dataset, run, 3, mode="pair", adapter="conv1x1")).stdout
    assert "backbone:" in out and "mlflow run:" in out
    card = json.loads((run / "backbone" / "model_card.json").read_text())
    assert card["in_chans"] == 3 and card["adapter"]["channels"] == {"s1": 2, "s2": 10}
    assert card["inputs"]["view1"]["channels"][0] == "s2:B2" and len(card["inputs"]["view1"]["mean"]) == 10
    model = timm.create_model("resnet18", in_chans=card["in_chans"], num_classes=0)
    model.load_state_dict(load_file(str(run / "backbone" / "backbone.safetensors")))
    assert set(load_file(str(run / "backbone" / "adapters.safetensors"))) >= {
        "s1.conv.weight",
        "s2.conv.weight",
    }
    assert "B8A" in (run / "backbone" / "README.md").read_text()
    ckpt = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
    state = torch.load(ckpt / "model.pt", weights_only=True)
    assert {"queue", "queue_ptr"} <= set(state)
    # The store holds the run.
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("eossl").experiment_id])
    assert len(runs) == 1
    assert [m.step for m in client.get_metric_history(runs[0].info.run_id, "loss")] == [1, 2, 3]


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_accumulation_and_clipping(dataset, tmp_path, monkeypatch, precision):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = tmp_path / precision
    args = _train_args(dataset, run, 2, precision=precision, grad_accum="2", clip_grad="1.0", batch_size="4")
    if precision == "fp16" and not torch.cuda.is_available():
        proc = run_cli(*args, check=False)
        assert proc.returncode == 2 and "fp16 needs a CUDA GPU" in proc.stderr
        return
    out = run_cli(*args).stdout
    assert "effective batch size 8 (= 4 x 1 ranks x 2 accumulation)" in out
    losses = _losses(run)
    assert sorted(losses) == [1, 2] and all(v == v for v in losses.values())  # finite, logged per step
    ckpt = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
    assert (ckpt / "scaler.pt").exists() == (precision == "fp16")  # fp16 trains with a loss scaler


@pytest.mark.slow
def test_torch_compile_option(dataset, tmp_path, monkeypatch):
    """compile=true compiles the query encoder in place (inductor): training runs and the export keeps
    timm's keys. Trained in this process (``train_compiled``): compiling is the test's cost."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = tmp_path / "compiled"
    values = {**TINY_MOCO, "ckpt_every": "2", "log_every": "1", "moco.momentum": "0.9", "compile": "true"}
    cfg = load_config("moco", None, {**values, "data": str(dataset), "out": str(run), "max_steps": "2"})
    train_compiled(cfg)
    assert sorted(_losses(run)) == [1, 2]
    card = json.loads((run / "backbone" / "model_card.json").read_text())
    model = timm.create_model("resnet18", in_chans=card["in_chans"], num_classes=0)
    model.load_state_dict(load_file(str(run / "backbone" / "backbone.safetensors")))  # no "_orig_mod." keys
