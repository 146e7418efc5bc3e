"""DINO on the shared loop: loss against float64, center and EMA (also on two gloo ranks), learning,
the frozen last layer, exact resume, divergence handling."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from eossl.train.config import load_config
from eossl.train.dino import DINOLoss, build_dino

from conftest import TINY_DINO, cli_set, run_cli, train_compiled


def _reference_loss(student, teacher, center, n_crops, n_global, t_student, t_teacher) -> float:
    s = student.double() / t_student
    q = torch.softmax((teacher.double() - center.double()) / t_teacher, dim=-1)
    s_chunks, q_chunks = s.chunk(n_crops), q.chunk(n_global)
    terms = [
        (-(qc * torch.log_softmax(sc, -1)).sum(-1)).mean()
        for i, qc in enumerate(q_chunks)
        for v, sc in enumerate(s_chunks)
        if v != i
    ]
    return float(sum(terms) / len(terms))


def test_dino_loss_matches_float64_reference_with_center_and_temperatures():
    torch.manual_seed(0)
    n_crops, n_global, b, k = 4, 2, 3, 7
    loss_fn = DINOLoss(k, n_crops, n_global, student_temp=0.1, center_momentum=0.9)
    loss_fn.center.copy_(torch.randn(1, k))
    student, teacher = torch.randn(n_crops * b, k), torch.randn(n_global * b, k)
    got = float(loss_fn(student, teacher, teacher_temp=0.05))
    ref = _reference_loss(student, teacher, loss_fn.center, n_crops, n_global, 0.1, 0.05)
    assert got == pytest.approx(ref, rel=1e-5)
    # A temperature or the center left out would give another value.
    assert got != pytest.approx(
        _reference_loss(student, teacher, torch.zeros(1, k), n_crops, n_global, 0.1, 0.05), rel=1e-3
    )
    assert got != pytest.approx(
        _reference_loss(student, teacher, loss_fn.center, n_crops, n_global, 0.1, 0.1), rel=1e-3
    )


def test_center_is_the_ema_of_the_teacher_mean():
    loss_fn = DINOLoss(5, 2, 2, center_momentum=0.9)
    c0 = torch.randn(1, 5)
    loss_fn.center.copy_(c0)
    teacher = torch.randn(6, 5)
    loss_fn(torch.randn(6, 5), teacher, 0.04)
    loss_fn.update_center()
    torch.testing.assert_close(loss_fn.center, 0.9 * c0 + 0.1 * teacher.mean(0, keepdim=True))


def _center_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world
    )
    torch.manual_seed(rank)
    loss_fn = DINOLoss(4, 2, 2, center_momentum=0.5)
    teacher = torch.full((2 * (rank + 1), 4), float(rank + 1))  # rank 0: 2 rows of 1; rank 1: 4 rows of 2
    loss_fn(torch.randn(teacher.shape[0], 4), teacher, 0.04)
    loss_fn.update_center()
    torch.save(loss_fn.center, Path(out_dir) / f"center-{rank}.pt")
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_center_update_over_two_ranks(tmp_path):
    """Mean over the global batch of both ranks (weighted by rows): (2*1 + 4*2) / 6, identical on both."""
    mp.spawn(_center_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    centers = [torch.load(tmp_path / f"center-{r}.pt", weights_only=True) for r in range(2)]
    expected = torch.full((1, 4), 0.5 * (10 / 6))
    for c in centers:
        torch.testing.assert_close(c, expected)


def _views(dataset: Path, cfg):
    from eossl.streaming.loader import SSLLoader
    from eossl.train.builders import loader_config
    from eossl.train.methods import get_method

    spec = get_method("dino")
    views = spec.views(cfg)
    loader = SSLLoader(str(dataset), loader_config(cfg, views), rank=0, world_size=1)
    return loader, next(iter(loader))


@pytest.mark.slow
def test_teacher_ema_frozen_last_layer_and_learning_on_a_fixed_batch(dataset):
    cfg = load_config(
        "dino", None, {**TINY_DINO, "data": str(dataset), "out": "unused", "freeze_last_layer_epochs": "1"}
    )
    loader, batch = _views(dataset, cfg)
    assert [v.shape[-1] for v in batch.views] == [32, 32, 16, 16]
    torch.manual_seed(0)
    model = build_dino(cfg, loader.channels, "multicrop")
    opt = torch.optim.AdamW(model.param_groups(), lr=1e-3)
    last = model.student.head.last_layer.parametrizations.weight.original1
    # Epoch 0: the last layer is frozen.
    model.set_step({"teacher_temp": 0.04}, epoch=0)
    before_last, before_teacher = last.detach().clone(), [p.clone() for p in model.teacher.parameters()]
    loss, _ = model(batch.views)
    loss.backward()
    model.before_optimizer_step()
    opt.step()
    assert torch.equal(last, before_last)
    model.after_step({"momentum": 0.9})
    s_now = list(model.student.parameters())
    for t0, s1, t1 in zip(before_teacher, s_now, model.teacher.parameters(), strict=True):
        torch.testing.assert_close(t1, 0.9 * t0 + 0.1 * s1.detach())
    # Later epochs: the last layer trains, and the loss on a fixed batch goes down.
    model.set_step({"teacher_temp": 0.04}, epoch=1)
    losses = []
    for _ in range(15):
        opt.zero_grad()
        loss, _ = model(batch.views)
        loss.backward()
        model.before_optimizer_step()
        opt.step()
        model.after_step({"momentum": 0.9})
        losses.append(float(loss))
    assert not torch.equal(last, before_last)
    assert np.mean(losses[-3:]) < losses[0] - 0.05, losses


def _train_args(dataset: Path, out: Path, steps: int, **extra) -> list[str]:
    values = {**TINY_DINO, "ckpt_every": "2", "log_every": "1", **extra}
    return [
        "train",
        "dino",
        "--data",
        str(dataset),
        "--out",
        str(out),
        "--max-steps",
        str(steps),
        "--seed",
        "3",
        *cli_set(values),
    ]


def _losses(run: Path) -> dict[int, float]:
    return {
        json.loads(line)["step"]: json.loads(line)["loss"]
        for line in (run / "history.jsonl").read_text().splitlines()
    }


@pytest.mark.slow
def test_exact_resume_and_export(dataset, tmp_path):
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_cli(*_train_args(dataset, straight, 4), env=env)
    run_cli(*_train_args(dataset, resumed, 2), env=env)
    assert "resumed from" in run_cli(*_train_args(dataset, resumed, 4), env=env).stdout
    a, b = _losses(straight), _losses(resumed)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for step in a:
        assert a[step] == pytest.approx(b[step], abs=1e-6)
    ra = json.loads((straight / "ranks" / "rank-0.json").read_text())
    rb = json.loads((resumed / "ranks" / "rank-0.json").read_text())
    assert ra["state_sha256"] == rb["state_sha256"]  # student, teacher, center
    ckpt = resumed / "checkpoints" / (resumed / "checkpoints" / "latest").read_text().strip()
    assert "loss_fn.center" in torch.load(ckpt / "model.pt", weights_only=True)
    card = json.loads((straight / "backbone" / "model_card.json").read_text())
    assert card["timm_kwargs"]["dynamic_img_size"] is True and card["in_chans"] == 2
    history = [json.loads(line) for line in (straight / "history.jsonl").read_text().splitlines()]
    assert "schedule_teacher_temp" in history[-1] and history[-1]["schedule_momentum"] > 0.996


@pytest.mark.slow
def test_diverging_run_stops_with_a_clear_message(dataset, tmp_path):
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    run = tmp_path / "nan"
    proc = run_cli(
        *_train_args(
            dataset,
            run,
            4,
            **{"dino.teacher_temp": "0", "dino.warmup_teacher_temp": "0", "max_nonfinite_steps": "3"},
        ),
        check=False,
        env=env,
    )
    assert proc.returncode == 1
    assert "3 consecutive non-finite losses" in proc.stderr


@pytest.mark.slow
def test_torch_compile_option(dataset, tmp_path, monkeypatch):
    """compile=true compiles the student in place: two steps train, log the collapse metrics, and the
    exported teacher backbone keeps timm's keys. With ``compile_backend=aot_eager``: dynamo captures the
    same graphs (forward and backward, both crop sizes) without inductor generating C++ for them, minutes
    of CPU for a ViT; inductor's code generation is exercised by MoCo's compile test, and on a GPU it
    generates Triton kernels, which no CPU test runs. timm's ``test_vit`` (6 blocks of width 64, the same
    VisionTransformer class) keeps the graphs small.

    Trained in this process (``train_compiled``).
    """
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)  # the default store: ./mlflow.db
    run = tmp_path / "compiled"
    values = {
        **TINY_DINO,
        "backbone": "test_vit",
        "ckpt_every": "2",
        "log_every": "1",
        "compile": "true",
        "compile_backend": "aot_eager",
    }
    cfg = load_config("dino", None, {**values, "data": str(dataset), "out": str(run), "max_steps": "2"})
    train_compiled(cfg)
    assert sorted(_losses(run)) == [1, 2]
    history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    assert {"teacher_entropy", "teacher_student_kl"} <= set(history[-1])
    import timm
    from safetensors.torch import load_file

    card = json.loads((run / "backbone" / "model_card.json").read_text())
    kwargs = {"in_chans": card["in_chans"], "num_classes": 0, **card["timm_kwargs"]}
    model = timm.create_model(card["timm_model"], **kwargs)
    model.load_state_dict(load_file(str(run / "backbone" / "backbone.safetensors")))  # no "_orig_mod." keys
    assert card["timm_model"] == "test_vit"
