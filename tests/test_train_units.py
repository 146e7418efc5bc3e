"""Training building blocks on CPU without a process group: config merging, adapters, queue, EMA, losses."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from eossl.train.backbones import build_encoder
from eossl.train.config import BackboneConfig, TrainConfig, apply_overrides, load_config
from eossl.train.moco import MoCo
from eossl.train.schedules import cosine_schedule, scaled_lr


def test_overrides_flat_dotted_and_section_names():
    cfg = load_config(
        "moco",
        None,
        {
            "data": "d",
            "out": "o",
            "backbone": "resnet18",
            "queue_size": "64",
            "optim.lr": "0.06",
            "batch_size": "8",
            "pairing": "mixed",
            "cache_dir": "none",
            "channels_last": "false",
        },
    )
    assert cfg.backbone.name == "resnet18" and cfg.moco.queue_size == 64 and cfg.optim.lr == 0.06
    assert cfg.batch_size == 8 and cfg.moco.pairing == "mixed" and cfg.loader.cache_dir is None
    assert cfg.channels_last is False
    with pytest.raises(ValueError, match="unknown config key 'queue'; did you mean moco.queue_size"):
        apply_overrides(TrainConfig(), {"queue": 3})
    with pytest.raises(ValueError, match="unknown config key 'szie'; did you mean loader.size"):
        apply_overrides(TrainConfig(), {"szie": 64})
    with pytest.raises(ValueError, match="ambiguous"):
        apply_overrides(TrainConfig(), {"name": "sgd"})  # backbone.name or optim.name
    # The optimiser's momentum or MoCo's key-encoder EMA: refused with both full keys, never guessed.
    with pytest.raises(
        ValueError, match="'momentum' is ambiguous: it could be moco.momentum or optim.momentum"
    ):
        apply_overrides(TrainConfig(method="moco"), {"momentum": "0.5"})
    assert apply_overrides(TrainConfig(method="moco"), {"moco.momentum": "0.5"}).moco.momentum == 0.5
    # The sections of methods that are not running are not searched by short names.
    assert apply_overrides(TrainConfig(method="dino"), {"hidden": "64"}).dino.hidden == 64
    assert apply_overrides(TrainConfig(method="moco"), {"hidden": "64"}).moco.hidden == 64
    with pytest.raises(ValueError, match="cannot read"):
        apply_overrides(TrainConfig(), {"batch_size": "eight"})
    with pytest.raises(ValueError, match="adapter"):
        apply_overrides(TrainConfig(), {"backbone.adapter": "magic"})


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        "backbone:\n  name: resnet18\n  adapter: conv1x1\nmoco:\n  queue_size: 128\nbatch_size: 4\n"
    )
    cfg = load_config("moco", str(path), {"data": "d", "out": "o", "queue_size": 256})
    assert (cfg.backbone.name, cfg.backbone.adapter, cfg.moco.queue_size, cfg.batch_size) == (
        "resnet18",
        "conv1x1",
        256,
        4,
    )


def test_schedules_and_lr_scaling():
    s = cosine_schedule(1.0, 0.0, 10, warmup_steps=2)
    assert len(s) == 10 and s[0] == 0 and s[1] == 0.5 and s[2] == 1.0 and s[-1] < 0.05
    assert scaled_lr(0.03, "linear", 512, 256) == pytest.approx(0.06)
    assert scaled_lr(0.03, "sqrt", 1024, 256) == pytest.approx(0.06)
    assert scaled_lr(0.03, "none", 1024, 256) == 0.03


@pytest.mark.parametrize(
    "adapter, channels, in_chans",
    [
        ("native", {"input": 12}, 12),
        ("zeropad", {"s1": 2, "s2": 10}, 15),
        ("conv1x1", {"s1": 2, "s2": 10}, 3),
    ],
)
def test_adapters_feed_the_backbone(adapter, channels, in_chans):
    enc = build_encoder(BackboneConfig(name="resnet18", adapter=adapter), channels)
    assert enc.in_chans == in_chans and enc.backbone.conv1.in_channels == in_chans
    for sensor, c in channels.items():
        out = enc(torch.randn(2, c, 32, 32), sensor)
        assert out.shape == (2, enc.feature_dim)
    with pytest.raises(ValueError, match="native"):
        build_encoder(BackboneConfig(name="resnet18", adapter="native"), {"s1": 2, "s2": 10})


def test_frozen_adapter_does_not_change_trainable_does():
    torch.manual_seed(0)
    frozen = build_encoder(
        BackboneConfig(name="resnet18", adapter="conv1x1", adapter_mode="frozen"), {"s2": 10}
    )
    trainable = build_encoder(
        BackboneConfig(name="resnet18", adapter="conv1x1", adapter_mode="trainable"), {"s2": 10}
    )
    for enc in (frozen, trainable):
        before = {k: v.clone() for k, v in enc.adapters.state_dict().items()}
        opt = torch.optim.SGD([p for p in enc.parameters() if p.requires_grad], lr=0.1)
        enc.train()
        for _ in range(3):
            loss = enc(torch.randn(4, 10, 32, 32), "s2").pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        after = enc.adapters.state_dict()
        changed = {k: not torch.equal(before[k], after[k]) for k in before}
        if enc is frozen:
            assert not any(changed.values()), changed  # weights and BN statistics
        else:
            assert changed["s2.conv.weight"] and changed["s2.bn.running_mean"]


def _moco(queue: int = 16, dim: int = 8) -> MoCo:
    torch.manual_seed(0)
    enc = build_encoder(BackboneConfig(name="resnet18"), {"input": 3})
    return MoCo(
        enc, dim=dim, hidden=32, queue_size=queue, temperature=0.2, view_sensors=[None, None], bn_splits=2
    )


def test_queue_contents_and_pointer_wrap():
    model = _moco(queue=10)
    views = [torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)]
    seen = []
    for step in range(3):  # 12 keys into a queue of 10: wraps around
        model(views)
        pending = model._pending[0].clone()
        model.after_step({"momentum": 0.99})
        seen.append(pending)
        assert int(model.queue_ptr) == (4 * (step + 1)) % 10
    keys = torch.cat(seen)  # 12 x dim, in enqueue order
    expected_cols = {i % 10: keys[i] for i in range(12)}  # later keys overwrite earlier ones
    for col, k in expected_cols.items():
        torch.testing.assert_close(model.queue[:, col], k)
    torch.testing.assert_close(model.queue.norm(dim=0), torch.ones(10))


def test_momentum_update_is_the_ema():
    model = _moco()
    with torch.no_grad():
        for p in model.encoder_q.parameters():
            p.add_(1.0)
    q = [p.clone() for p in model.encoder_q.parameters()]
    k = [p.clone() for p in model.encoder_k.parameters()]
    model.after_step({"momentum": 0.9})
    for pq, pk, new in zip(q, k, model.encoder_k.parameters(), strict=True):
        torch.testing.assert_close(new, 0.9 * pk + 0.1 * pq)
    assert not any(p.requires_grad for p in model.key_parameters())


def test_loss_matches_float64_reference():
    model = _moco(queue=6, dim=4).eval()
    model.shuffle_bn = False
    x = [torch.randn(3, 3, 32, 32), torch.randn(3, 3, 32, 32)]
    loss, _ = model(x)
    with torch.no_grad():
        q = torch.nn.functional.normalize(model.head_q(model.encoder_q(x[0])), dim=1).double()
        k = torch.nn.functional.normalize(model.head_k(model.encoder_k(x[1])), dim=1).double()
        queue = model.queue.double()
        logits = torch.cat([(q * k).sum(1, keepdim=True), q @ queue], dim=1) / 0.2
        ref = -torch.log_softmax(logits, dim=1)[:, 0].mean()
    assert abs(float(loss) - float(ref)) < 1e-5
    assert np.isfinite(float(loss))


class _FakeClock:
    """Seconds that pass only when a test says so."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_signal_handled_inside_the_first_ones_message_is_not_announced_again(monkeypatch, capsys):
    """Python runs a second signal's handler between the first handler's bytecodes, e.g. inside its print:
    the study's SIGUSR1 arriving while a rank announces the forwarded Ctrl-C. One announcement per rank."""
    import builtins
    import signal

    from eossl.train.preemption import StopRequest

    stop = StopRequest(rank=1, clock=_FakeClock())
    real_print = builtins.print
    nested = []

    def print_interrupted(*args, **kwargs):
        if not nested:  # the SIGUSR1 handler runs in the middle of the first message
            nested.append(True)
            stop(signal.SIGUSR1)
        real_print(*args, **kwargs)

    monkeypatch.setattr(builtins, "print", print_interrupted)
    stop(signal.SIGINT)
    monkeypatch.undo()
    out = capsys.readouterr().out
    assert nested and out.count("received: checkpointing at the next step boundary") == 1, out
    assert "rank 1: SIGINT received" in out and stop.signum == signal.SIGUSR1  # the last signal still counts


def test_stop_request_real_signals_first_ctrl_c_flags_second_interrupts(capsys):
    """Real signals to this process: SIGTERM/SIGUSR1/SIGINT set the flag; a second SIGINT raises at once."""
    import os
    import signal

    from eossl.train.preemption import StopRequest

    before = signal.getsignal(signal.SIGINT)
    clock = _FakeClock()
    with StopRequest(rank=3, clock=clock).installed() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.signum == signal.SIGINT
        assert "rank 3: SIGINT received" in capsys.readouterr().out
        clock.now += StopRequest.REPEAT_AFTER_S / 2
        os.kill(os.getpid(), signal.SIGINT)  # the same Ctrl-C forwarded by accelerate's agent: no effect
        assert stop.signum == signal.SIGINT
        clock.now += StopRequest.REPEAT_AFTER_S / 2
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before  # restored
    with StopRequest(clock=clock).installed() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(
            os.getpid(), signal.SIGINT
        )  # after a pre-emption request, Ctrl-C does not abandon the checkpoint
        assert stop.signum == signal.SIGINT
    with StopRequest(clock=clock).installed() as stop:  # Ctrl-C under a study: SIGINT, SIGUSR1, Ctrl-C again
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGUSR1)
        clock.now += StopRequest.REPEAT_AFTER_S
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    with StopRequest(clock=clock).installed() as stop:
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.signum == signal.SIGUSR1


def test_stop_request_default_clock_is_monotonic():
    import time

    from eossl.train.preemption import StopRequest

    assert StopRequest().clock is time.monotonic


def test_artifact_root_keeps_artifacts_beside_a_sqlite_store(tmp_path):
    from eossl.train.tracking import artifact_root

    assert (
        artifact_root(f"sqlite:///{tmp_path}/study/mlflow.db")
        == (tmp_path / "study" / "mlartifacts").as_uri()
    )
    assert artifact_root("http://127.0.0.1:5000") is None  # a server decides (proxied artifacts)
    assert artifact_root(str(tmp_path / "mlruns")) is None  # a file store keeps them inside itself


def test_moco_learning_rate_follows_the_linear_rule_by_default():
    """MoCo-v2's recipe is lr 0.03 at batch 256: one device at 64 trains at 0.0075, not 0.03."""
    cfg = load_config("moco", None, {"data": "d", "out": "o"})
    assert (cfg.optim.lr, cfg.optim.lr_scaling, cfg.optim.base_batch) == (0.03, "linear", 256)
    assert scaled_lr(cfg.optim.lr, cfg.optim.lr_scaling, 64, cfg.optim.base_batch) == pytest.approx(0.0075)
    assert scaled_lr(cfg.optim.lr, cfg.optim.lr_scaling, 4 * 64, cfg.optim.base_batch) == pytest.approx(0.03)
    kept = load_config("moco", None, {"data": "d", "out": "o", "lr_scaling": "none"})
    assert scaled_lr(kept.optim.lr, kept.optim.lr_scaling, 16, 256) == 0.03  # the demo's explicit choice


@pytest.mark.parametrize(
    "values, geometry, crop",
    [
        ({}, "shared", (0.2, 1.0)),
        ({"augment_preset": "moco_study"}, "independent", (1.0, 1.0)),
        ({"augment_preset": "moco_study", "pair_geometry": "shared"}, "shared", (1.0, 1.0)),
        ({"augment": "false"}, "shared", (1.0, 1.0)),
    ],
)
def test_augment_preset_reaches_the_views(values, geometry, crop):
    from eossl.streaming.augment import AugmentConfig
    from eossl.train.moco import moco_views

    cfg = load_config("moco", None, {"data": "d", "out": "o", "mode": "pair", **values})
    views = moco_views(cfg)
    assert views.pair_geometry == geometry and views.augment.crop_scale == crop
    if values.get("augment") == "false":
        assert views.augment == AugmentConfig.none() and views.pair_augment is False
    with pytest.raises(ValueError, match="augment_preset must be one of default, moco_study"):
        load_config("moco", None, {"data": "d", "out": "o", "augment_preset": "simclr"})


def test_an_unknown_compile_backend_is_refused_with_the_known_ones():
    from eossl.train.builders import compile_backend

    assert compile_backend("aot_eager") == "aot_eager"
    with pytest.raises(ValueError, match="compile_backend must be one of .*inductor.*, got 'inductr'"):
        compile_backend("inductr")
