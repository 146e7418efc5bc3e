"""The method contract: a method defined here, registered with one line, trains through the unchanged loop,
and the loop calls each of its hooks; MoCo and DINO choose what is compiled; names come from the registry."""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from eossl.streaming.augment import AugmentConfig
from eossl.streaming.inputs import InputSpec
from eossl.streaming.views import ViewConfig
from eossl.train.backbones import build_encoder
from eossl.train.config import DataConfig, TrainConfig, load_config
from eossl.train.method import SSLMethod
from eossl.train.methods import METHODS, get_method, method_names

from conftest import TINY_MOCO, run_cli


class _CompileProbe(nn.Module):
    """Stands in for the module a method wants compiled: records the call instead of compiling."""

    def compile(self, *args, **kwargs) -> None:
        TinyMethod.calls.append(("compile", None))


class TinyMethod(SSLMethod):
    """Two views, one encoder, a cosine loss between their features; records every call the loop makes."""

    calls: ClassVar[list[tuple[str, Any]]] = []
    config_defaults: ClassVar[Mapping[str, Any]] = {"backbone.name": "resnet18", "channels_last": False}
    nan_at_forward: ClassVar[int] = 2  # the 2nd forward pass gives a non-finite loss: the step is skipped

    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder
        self.probe = _CompileProbe()
        self.forwards = 0

    @classmethod
    def views(cls, cfg: TrainConfig) -> ViewConfig:
        cls.calls.append(("views", None))
        inputs = InputSpec.parse(cfg.loader.sensors, cfg.loader.s2_bands)
        return ViewConfig(mode="single", inputs=inputs, size=cfg.loader.size, augment=AugmentConfig.none())

    @classmethod
    def build(cls, cfg: TrainConfig, channels: list[int], mode: str) -> TinyMethod:
        cls.calls.append(("build", (tuple(channels), mode)))
        return cls(build_encoder(cfg.backbone, {"input": channels[0]}))

    @classmethod
    def schedules(cls, cfg: TrainConfig, total_steps: int, steps_per_epoch: int) -> dict[str, np.ndarray]:
        cls.calls.append(("schedules", total_steps))
        return {"tiny_scale": np.arange(total_steps, dtype=np.float64) + 10.0}

    def forward(self, views):
        self.forwards += 1
        self.calls.append(("forward", len(views)))
        a, b = (F.normalize(self.encoder(v), dim=1) for v in views)
        loss = 2 - 2 * (a * b).sum(1).mean()
        if self.forwards == self.nan_at_forward:
            loss = loss * float("nan")
        return loss, {"tiny_similarity": (a * b).sum(1).mean().detach()}

    def backbone(self):
        return self.encoder

    def param_groups(self):
        self.calls.append(("param_groups", None))
        return super().param_groups()

    def compile_target(self):
        return self.probe

    def set_step(self, values, epoch):
        self.calls.append(("set_step", (dict(values), epoch)))

    def discard_pending(self):
        self.calls.append(("discard_pending", None))

    def clip_gradients(self, clip, max_norm):
        self.calls.append(("clip_gradients", max_norm))
        super().clip_gradients(clip, max_norm)
        norm = torch.cat([p.grad.flatten() for p in self.parameters() if p.grad is not None]).norm()
        assert float(norm) <= max_norm + 1e-4  # the default clipped with the loop's clipper

    def before_optimizer_step(self):
        self.calls.append(("before_optimizer_step", None))

    def after_step(self, values):
        self.calls.append(("after_step", dict(values)))

    def state_digests(self):
        return {"tiny_digest": "written by the method"}


@pytest.fixture
def tiny(monkeypatch):
    """The tiny method registered by one registry line, for this test only."""
    monkeypatch.setitem(METHODS, "tiny", f"{__name__}:TinyMethod")
    TinyMethod.calls = []
    return TinyMethod


@pytest.fixture(scope="module")
def dataset(synthetic_source, module_tmp) -> Path:
    out = module_tmp("method") / "ds"
    run_cli(
        "ingest", str(synthetic_source), str(out), "--shard-size", "8MB", "--budgets", "2", "--no-progress"
    )
    return out


def test_a_new_method_trains_through_the_loop_and_each_hook_is_called(tiny, dataset, tmp_path, monkeypatch):
    from eossl.train.loop import train

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)  # the default store: ./mlflow.db
    run = tmp_path / "run"
    cfg = load_config(
        "tiny",
        None,
        {
            "data": str(dataset),
            "out": str(run),
            "batch_size": "4",
            "size": "32",
            "workers": "0",
            "threads": "1",
            "split": "all",
            "device": "cpu",
            "max_steps": "2",
            "log_every": "1",
            "ckpt_every": "0",
            "clip_grad": "0.5",
            "compile": "true",
            "optim.schedule": "constant",
        },
    )
    assert cfg.backbone.name == "resnet18" and cfg.channels_last is False  # the method's config defaults
    result = train(cfg, resume=False)
    assert result.steps == 2 and np.isfinite(result.final_loss)

    calls = tiny.calls
    names = [name for name, _ in calls]
    assert names[:2] == ["views", "build"] and calls[1][1][1] == "single"
    assert names.count("compile") == 1 and names.count("schedules") == 1 and names.count("param_groups") == 1
    per_step = [
        n
        for n in names
        if n
        in ("set_step", "forward", "discard_pending", "clip_gradients", "before_optimizer_step", "after_step")
    ]
    step = ["set_step", "forward", "clip_gradients", "before_optimizer_step", "after_step"]
    skipped = ["set_step", "forward", "discard_pending"]  # the 2nd forward's loss is not finite
    assert per_step == step + skipped + step
    set_steps = [args for name, args in calls if name == "set_step"]
    after = [args for name, args in calls if name == "after_step"]
    assert set_steps == [({"tiny_scale": 10.0}, 0), ({"tiny_scale": 11.0}, 0), ({"tiny_scale": 11.0}, 0)]
    assert after == [{"tiny_scale": 10.0}, {"tiny_scale": 11.0}]  # indexed by global step
    assert [args for name, args in calls if name == "clip_gradients"] == [0.5, 0.5]

    history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == [1, 2]
    assert history[-1]["schedule_tiny_scale"] == 11.0 and "tiny_similarity" in history[-1]
    assert history[-1]["nonfinite_steps"] == 1
    digests = json.loads((run / "ranks" / "rank-0.json").read_text())
    assert digests["tiny_digest"] == "written by the method" and "params_sha256" in digests
    assert (run / "backbone" / "backbone.safetensors").exists()


def test_method_names_come_from_the_registry(tiny):
    assert "tiny" in method_names() and get_method("tiny") is TinyMethod
    parser = argparse.ArgumentParser()
    from eossl.train.cli import add_train_arguments

    add_train_arguments(parser)
    assert parser.parse_args(["tiny", "--data", "d", "--out", "o"]).method == "tiny"
    # The other methods' sections are not searched by short names; their dotted keys still reach them.
    with pytest.raises(ValueError, match="unknown config key 'hidden'"):
        load_config("tiny", None, {"data": "d", "out": "o", "hidden": "64"})
    assert load_config("tiny", None, {"data": "d", "out": "o", "moco.hidden": "64"}).moco.hidden == 64
    with pytest.raises(ValueError, match="method must be one of .*tiny"):
        load_config("nope", None, {"data": "d", "out": "o"})
    with pytest.raises(ValueError, match="unknown method 'nope'; available: moco, dino, tiny"):
        get_method("nope")


def test_cli_passes_only_the_flags_given():
    from eossl.train.cli import add_train_arguments

    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    args = parser.parse_args(["moco", "--data", "d", "--out", "o"])
    assert not hasattr(args, "seed") and not hasattr(args, "max_steps")
    assert parser.parse_args(["moco", "--data", "d", "--out", "o", "--seed", "4"]).seed == 4


def test_data_config_defaults_are_the_streaming_ones():
    from eossl.streaming.loader import LoaderConfig
    from eossl.streaming.plan import PlanConfig
    from eossl.streaming.storage import StorageOptions

    d, loader, storage = DataConfig(), LoaderConfig(), StorageOptions()
    assert (d.workers, d.threads, d.device, d.split) == (
        loader.workers,
        loader.num_threads,
        loader.device,
        loader.split,
    )
    assert d.shuffle_buffer == PlanConfig().shuffle_buffer
    assert (d.cache_dir, d.retries, d.timeout_s) == (storage.cache_dir, storage.retries, storage.timeout_s)
    assert int(d.cache_gb * 2**30) == storage.cache_bytes
    assert (d.read_while_downloading, d.map_files) == (storage.read_while_downloading, storage.map_files)
    views = ViewConfig()
    assert (d.mode, d.size, d.n_local, d.local_size) == (
        views.mode,
        views.size,
        views.n_local,
        views.local_size,
    )
    assert TrainConfig().batch_size == loader.batch_size


def test_storage_settings_reach_the_loader_from_set():
    from eossl.train.builders import loader_config
    from eossl.train.methods import get_method

    cfg = load_config("moco", None, {"data": "d", "out": "o", "map_files": "false", "cache_gb": "2"})
    storage = loader_config(cfg, get_method("moco").views(cfg)).storage
    assert storage.map_files is False and storage.cache_bytes == 2 * 2**30


def test_moco_compiles_the_query_encoder_and_dino_the_student():
    moco_cfg = load_config(
        "moco",
        None,
        {"data": "d", "out": "o", "backbone": "resnet18", "queue_size": "8", "hidden": "16", "dim": "8"},
    )
    moco = get_method("moco").build(moco_cfg, [3, 3], "single")
    assert moco.compile_target() is moco.encoder_q
    dino_cfg = load_config(
        "dino",
        None,
        {
            "data": "d",
            "out": "o",
            "backbone": "vit_tiny_patch16_224",
            "out_dim": "16",
            "dino.hidden": "16",
            "bottleneck": "8",
        },
    )
    dino = get_method("dino").build(dino_cfg, [2, 2, 2], "multicrop")
    assert dino.compile_target() is dino.student and dino.backbone() is dino.teacher.encoder


def test_dino_reads_its_frozen_last_layer_epochs_from_its_config():
    cfg = load_config(
        "dino",
        None,
        {
            "data": "d",
            "out": "o",
            "backbone": "vit_tiny_patch16_224",
            "out_dim": "16",
            "dino.hidden": "16",
            "bottleneck": "8",
            "freeze_last_layer_epochs": "2",
        },
    )
    dino = get_method("dino").build(cfg, [2, 2, 2], "multicrop")
    frozen = []
    for epoch in range(4):
        dino.set_step({"teacher_temp": 0.04}, epoch)
        frozen.append(dino.freeze_last_layer)
    assert frozen == [True, True, False, False]


def test_the_base_defaults():
    class Bare(SSLMethod):
        def __init__(self):
            super().__init__()
            self.encoder = nn.Linear(3, 2)
            self.frozen = nn.Linear(2, 2).requires_grad_(False)

        def backbone(self):
            return self.encoder

    bare = Bare()
    (group,) = bare.param_groups()
    assert group["params"] == list(bare.encoder.parameters())  # one group, trainable parameters only
    assert bare.compile_target() is bare.encoder
    assert bare.schedules(TrainConfig(), 5, 1) == {} and bare.state_digests() == {}
    seen = []
    bare.clip_gradients(lambda params, norm: seen.append((len(list(params)), norm)), 0.0)
    assert seen == []  # 0 disables clipping (optim.clip_grad)
    bare.clip_gradients(lambda params, norm: seen.append((len(list(params)), norm)), 3.0)
    assert seen == [(4, 3.0)]  # one global norm over every parameter
    bare.set_step({}, 0), bare.before_optimizer_step(), bare.after_step({}), bare.discard_pending()


def test_config_digest_leaves_out_what_a_resume_may_change():
    from eossl.train.resume import config_digest

    cfg = TrainConfig(data="d", out="o")
    changed = TrainConfig(data="d", out="o", max_steps=9, batch_size=3)
    assert config_digest(cfg) == config_digest(changed)
    other = TrainConfig(data="d", out="o", seed=9)
    assert config_digest(cfg) != config_digest(other)
    assert config_digest(cfg, ("seed",)) == config_digest(other, ("seed",))  # a method's resume_may_change


def test_config_changes_name_the_keys_and_accept_a_new_setting_at_its_default():
    from eossl.train.resume import config_changes

    recorded = {"seed": 0, "optim.lr": 0.03, "moco.symmetric": True}
    current = {"seed": 9, "optim.lr": 0.03, "backbone.weights": None, "loader.node_affinity": True}
    defaults = {"seed": 0, "optim.lr": 0.03, "backbone.weights": None, "loader.node_affinity": False}
    assert config_changes(recorded, current, defaults) == [
        "loader.node_affinity: (not in the checkpoint) -> True",  # a newer setting, moved from its default
        "moco.symmetric: True -> (no such setting now)",
        "seed: 0 -> 9",
    ]  # backbone.weights: newer, at its default: the run behaves as the checkpoint's did
    assert config_changes(recorded, dict(recorded), defaults) == []


def test_a_resume_with_another_config_is_refused_naming_what_changed(dataset, tmp_path, monkeypatch):
    """The checkpoint records the values its digest covers: a changed one is named; a setting the
    checkpoint predates resumes at its default."""
    from eossl.streaming.views import DRAW_RULE
    from eossl.train.checkpoint import CheckpointError
    from eossl.train.config import load_config
    from eossl.train.loop import train

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)  # the default store, ./mlflow.db, outside the checkout
    run = tmp_path / "run"
    values = {**TINY_MOCO, "data": str(dataset), "out": str(run), "ckpt_every": "1"}
    train(load_config("moco", None, {**values, "max_steps": "1"}))
    (ckpt,) = (run / "checkpoints").glob("step-*")
    trainer = json.loads((ckpt / "trainer.json").read_text())
    assert trainer["config"]["seed"] == 0 and "max_steps" not in trainer["config"]

    with pytest.raises(CheckpointError, match=r"moco\.temperature: 0\.2 -> 0\.5; seed: 0 -> 7\. Resume with"):
        train(load_config("moco", None, {**values, "max_steps": "2", "seed": "7", "moco.temperature": "0.5"}))
    del trainer["config"]["loader.node_affinity"]  # as written by an eossl without that setting
    (ckpt / "trainer.json").write_text(json.dumps(trainer))
    assert train(load_config("moco", None, {**values, "max_steps": "2"})).steps == 2

    # A checkpoint whose views were drawn by another rule: the views after a resume would differ.
    (latest,) = sorted((run / "checkpoints").glob("step-*"))[-1:]
    trainer = json.loads((latest / "trainer.json").read_text())
    assert trainer["loader"]["draw_rule"] == DRAW_RULE
    trainer["loader"]["draw_rule"] = "an older rule"
    (latest / "trainer.json").write_text(json.dumps(trainer))
    with pytest.raises(ValueError, match="view parameters were drawn by 'an older rule'"):
        train(load_config("moco", None, {**values, "max_steps": "3"}))
