"""The methods' numerics against float64 references written from the papers' equations: DINO's teacher
in train mode without drop-path, DINO's per-tensor gradient clipping, float32 logits and losses under
bf16 autocast, the collapse metrics, and MoCo's sensor pairings (fixed, mixed, symmetric)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from eossl.train.config import load_config
from eossl.train.dino import DINOLoss, build_dino
from eossl.train.moco import build_moco, info_nce, key_std

TINY_VIT = {
    "data": "d",
    "out": "o",
    "backbone": "vit_tiny_patch16_224",
    "out_dim": "16",
    "dino.hidden": "16",
    "bottleneck": "8",
}


def _dino(**extra):
    cfg = load_config("dino", None, {**TINY_VIT, **extra})
    torch.manual_seed(0)
    return build_dino(cfg, [2, 2, 2, 2], "multicrop")


def _crops(b: int = 4) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(b, 2, s, s, generator=g) * 3 + 1 for s in (32, 32, 16, 16)]


# -- DINO teacher ---------------------------------------------------------------------------------------


def _drop_path_rates(module: torch.nn.Module) -> list[float]:
    return [float(m.drop_prob) for m in module.modules() if type(m).__name__ == "DropPath"]


def test_dino_teacher_has_no_drop_path_and_normalises_with_batch_statistics():
    model = _dino(adapter="conv1x1", **{"dino.drop_path": "0.2"})
    model.train()
    assert max(_drop_path_rates(model.student)) > 0 and set(_drop_path_rates(model.teacher)) <= {0.0}
    bn = model.teacher.encoder.adapters["input"].bn
    seen = {}
    bn.register_forward_hook(
        lambda m, inp, out: seen.update(x=inp[0].detach().clone(), y=out.detach().clone())
    )
    views = _crops()
    model.set_step({"teacher_temp": 0.04}, epoch=0)
    model(views)
    assert model.teacher.training
    # float64 reference of BatchNorm in train mode over the teacher's input: both global crops (one call).
    x = seen["x"].double()
    mean = x.mean(dim=(0, 2, 3))
    var = x.var(dim=(0, 2, 3), unbiased=False)
    w, b = bn.weight.double(), bn.bias.double()
    ref = (x - mean[None, :, None, None]) / torch.sqrt(var[None, :, None, None] + bn.eps)
    ref = ref * w[None, :, None, None] + b[None, :, None, None]
    torch.testing.assert_close(seen["y"].double(), ref, rtol=1e-5, atol=1e-5)
    assert x.shape[0] == 2 * views[0].shape[0]  # the global crops only
    # Running statistics updated from the initial (0, 1) with BatchNorm's momentum 0.1.
    n = x.shape[0] * x.shape[2] * x.shape[3]
    torch.testing.assert_close(bn.running_mean.double(), 0.1 * mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bn.running_var.double(), 0.9 + 0.1 * var * n / (n - 1), rtol=1e-5, atol=1e-6)
    # No drop-path and batch statistics: the teacher is deterministic for a given batch.
    with torch.no_grad():
        a, b2 = model.teacher(views[:2]), model.teacher(views[:2])
    torch.testing.assert_close(a, b2)


def test_dino_teacher_batchnorm_of_a_resnet_updates_its_running_statistics():
    cfg = load_config("dino", None, {**TINY_VIT, "backbone": "resnet18"})
    torch.manual_seed(0)
    model = build_dino(cfg, [2, 2, 2, 2], "multicrop")
    model.train()
    bn = model.teacher.encoder.backbone.bn1
    assert torch.equal(bn.running_mean, torch.zeros_like(bn.running_mean))
    model.set_step({"teacher_temp": 0.04}, epoch=0)
    model(_crops())
    assert bn.running_mean.abs().max() > 1e-3 and model.teacher.training
    # The EMA moves parameters only: the teacher keeps its own statistics.
    student_bn = model.student.encoder.backbone.bn1
    model.after_step({"momentum": 0.5})
    assert not torch.equal(bn.running_mean, student_bn.running_mean)


# -- DINO gradient clipping -----------------------------------------------------------------------------


def _set_grads(model, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    grads = {}
    for i, (name, p) in enumerate(model.student.named_parameters()):
        if p.requires_grad:
            # Norms from well under to well over 3.0, so both branches of the rule are exercised.
            p.grad = torch.randn(p.shape, generator=g) * (0.01 if i % 2 else 1.0)
            grads[name] = p.grad.detach().double().clone()
    return grads


@pytest.mark.parametrize("frozen", [True, False])
def test_dino_clips_each_tensor_like_the_reference(frozen):
    model = _dino()
    model.set_step({"teacher_temp": 0.04}, epoch=0 if frozen else 1)
    grads = _set_grads(model, 3)
    model.clip_gradients(torch.nn.utils.clip_grad_norm_, 3.0)
    clipped = small = 0
    for name, p in model.student.named_parameters():
        if name not in grads:
            continue
        if frozen and name.startswith("head.last_layer."):
            assert p.grad is None  # cancelled before clipping
            continue
        g = grads[name]
        norm = float(torch.linalg.vector_norm(g))
        ref = g * min(1.0, 3.0 / (norm + 1e-6))
        torch.testing.assert_close(p.grad.double(), ref, rtol=1e-5, atol=1e-9)
        clipped += norm > 3.0
        small += norm < 3.0
    assert clipped > 5 and small > 5
    # One global norm would have given other gradients.
    model2 = _dino()
    _set_grads(model2, 3)
    torch.nn.utils.clip_grad_norm_(model2.student.parameters(), 3.0)
    name = next(n for n, p in model.student.named_parameters() if p.grad is not None and n in grads)
    assert not torch.allclose(
        dict(model.student.named_parameters())[name].grad, dict(model2.student.named_parameters())[name].grad
    )


def test_dino_clip_zero_disables_clipping_but_still_cancels_the_frozen_last_layer():
    model = _dino()
    model.set_step({"teacher_temp": 0.04}, epoch=0)
    grads = _set_grads(model, 4)
    model.clip_gradients(torch.nn.utils.clip_grad_norm_, 0.0)
    for name, p in model.student.named_parameters():
        if name.startswith("head.last_layer."):
            assert p.grad is None
        elif name in grads:
            assert torch.equal(p.grad.double(), grads[name])


# -- float32 logits and losses under autocast -----------------------------------------------------------


def _unit_rows(n: int, c: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(n, c, generator=torch.Generator().manual_seed(seed)), dim=1)


def _info_nce_float64(q, k, queue, t):
    q, k, queue = q.double(), k.double(), queue.double()
    logits = torch.cat([(q * k).sum(1, keepdim=True), q @ queue], dim=1) / t
    return (torch.logsumexp(logits, dim=1) - logits[:, 0]).mean()


def test_moco_logits_and_loss_are_float32_under_bf16_autocast():
    q = _unit_rows(16, 128, 0).requires_grad_(True)
    k, queue = _unit_rows(16, 128, 1), _unit_rows(4096, 128, 2).T.contiguous()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, logits = info_nce(q, k, queue, 0.2)
        naive = F.cross_entropy(
            torch.cat([torch.einsum("nc,nc->n", q, k)[:, None], q @ queue], 1) / 0.2,
            torch.zeros(16, dtype=torch.long),
        )
    assert logits.dtype == torch.float32 and loss.dtype == torch.float32
    (grad,) = torch.autograd.grad(loss, q)
    loss32, _ = info_nce(q, k, queue, 0.2)  # no autocast at all
    (grad32,) = torch.autograd.grad(loss32, q)
    assert abs(float(loss) - float(loss32)) <= 1e-6
    torch.testing.assert_close(grad, grad32, rtol=1e-6, atol=1e-9)
    q64 = q.detach().double().requires_grad_(True)
    ref = _info_nce_float64(q64, k, queue, 0.2)
    (grad64,) = torch.autograd.grad(ref, q64)
    assert float(loss) == pytest.approx(float(ref), rel=1e-6)
    torch.testing.assert_close(grad.double(), grad64, rtol=1e-4, atol=1e-7)
    # The same products left to autocast run in bf16: far off the reference (the test can fail).
    assert abs(float(naive) - float(ref)) > 1e-4


def test_moco_forward_under_bf16_autocast_gives_float32_unit_keys_and_loss():
    cfg = load_config(
        "moco",
        None,
        {"data": "d", "out": "o", "backbone": "resnet18", "queue_size": "16", "hidden": "16", "dim": "8"},
    )
    torch.manual_seed(0)
    model = build_moco(cfg, [3, 3], "single")
    views = [torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, logs = model(views)
    (keys,) = model._pending
    assert loss.dtype == keys.dtype == torch.float32
    torch.testing.assert_close(
        keys.double().norm(dim=1), torch.ones(4, dtype=torch.float64), atol=1e-6, rtol=0
    )
    assert 0 < float(logs["key_std"]) < 1


def _dino_loss_float64(student, teacher, center, n_crops, n_global, ts, tt):
    s = (student.double() / ts).chunk(n_crops)
    q = torch.softmax((teacher.double() - center.double()) / tt, -1).chunk(n_global)
    terms = [
        (-(qi * torch.log_softmax(sv, -1)).sum(-1)).mean()
        for i, qi in enumerate(q)
        for v, sv in enumerate(s)
        if v != i
    ]
    return sum(terms) / len(terms)


def test_dino_loss_is_float32_under_bf16_autocast():
    torch.manual_seed(0)
    loss_fn = DINOLoss(512, 4, 2)
    loss_fn.center.copy_(torch.randn(1, 512))
    student, teacher = torch.randn(4 * 8, 512) * 5, torch.randn(2 * 8, 512) * 5
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = loss_fn(student, teacher, 0.04)
    plain = loss_fn(student, teacher, 0.04)
    assert got.dtype == torch.float32 and abs(float(got) - float(plain)) <= 1e-6
    ref = _dino_loss_float64(student, teacher, loss_fn.center, 4, 2, 0.1, 0.04)
    assert float(got) == pytest.approx(float(ref), rel=1e-5)


# -- collapse metrics -----------------------------------------------------------------------------------


def test_dino_collapse_metrics_move_the_right_way():
    k, b = 64, 16
    loss_fn = DINOLoss(k, 4, 2)
    g = torch.Generator().manual_seed(0)
    healthy_t = torch.randn(2 * b, k, generator=g) * 0.1
    healthy_s = torch.randn(4 * b, k, generator=g)
    healthy = loss_fn.collapse_metrics(healthy_s, healthy_t, 0.04)
    # Uniform collapse: every teacher output the same vector, which the center has absorbed; the student
    # copies the uniform teacher.
    const = torch.randn(1, k, generator=g)
    loss_fn.center.copy_(const)
    uniform = loss_fn.collapse_metrics(torch.zeros(4 * b, k), const.expand(2 * b, k), 0.04)
    # One-prototype collapse: one dimension dominates the teacher, and the student follows.
    loss_fn.center.zero_()
    spike = torch.zeros(1, k)
    spike[0, 3] = 10.0
    dominated = loss_fn.collapse_metrics(spike.expand(4 * b, k) * 5, spike.expand(2 * b, k), 0.04)
    h_healthy = float(healthy["teacher_entropy"])
    assert float(uniform["teacher_entropy"]) == pytest.approx(math.log(k), abs=1e-5)
    assert float(dominated["teacher_entropy"]) < 1e-6
    assert 0.1 < h_healthy < math.log(k) - 0.1
    assert float(healthy["teacher_student_kl"]) > 0.5
    assert float(uniform["teacher_student_kl"]) < 1e-5 and float(dominated["teacher_student_kl"]) < 1e-5
    # The loss is the entropy plus the KL.
    loss_fn.center.zero_()
    m = loss_fn.collapse_metrics(healthy_s, healthy_t, 0.04)
    loss = loss_fn(healthy_s, healthy_t, 0.04)
    assert float(loss) == pytest.approx(float(m["teacher_entropy"] + m["teacher_student_kl"]), rel=1e-5)


def test_dino_logs_the_collapse_metrics():
    model = _dino()
    model.train()
    model.set_step({"teacher_temp": 0.04}, epoch=0)
    _, logs = model(_crops())
    assert set(logs) == {"teacher_entropy", "teacher_student_kl"}
    assert (
        0 <= float(logs["teacher_entropy"]) <= math.log(16) + 1e-5 and float(logs["teacher_student_kl"]) >= 0
    )


def test_moco_key_std_is_one_over_sqrt_dim_when_spread_and_zero_when_collapsed():
    spread = _unit_rows(4096, 128, 0)
    assert float(key_std(spread)) == pytest.approx(1 / math.sqrt(128), rel=0.02)
    collapsed = _unit_rows(1, 128, 1).expand(64, 128)
    assert float(key_std(collapsed)) == pytest.approx(0.0, abs=1e-7)
    nearly = F.normalize(collapsed + 0.01 * _unit_rows(64, 128, 2), dim=1)
    assert 0 < float(key_std(nearly)) < 0.1 * float(key_std(spread))


# -- MoCo sensor pairings -------------------------------------------------------------------------------


def _pair_model(pairing: str, **extra):
    cfg = load_config(
        "moco",
        None,
        {
            "data": "d",
            "out": "o",
            "backbone": "resnet18",
            "adapter": "conv1x1",
            "queue_size": "16",
            "hidden": "16",
            "dim": "8",
            "mode": "pair",
            "pairing": pairing,
            **extra,
        },
    )
    torch.manual_seed(0)
    return build_moco(cfg, [2, 10], "pair")


def _pair_views(n: int = 8) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return [torch.randn(n, 2, 32, 32, generator=g), torch.randn(n, 10, 32, 32, generator=g)]


def _adapter_inputs(model) -> dict[tuple[str, str], list[torch.Tensor]]:
    seen: dict[tuple[str, str], list[torch.Tensor]] = {}
    for branch in ("encoder_q", "encoder_k"):
        for sensor, adapter in getattr(model, branch).adapters.items():
            key = (branch, sensor)
            adapter.register_forward_pre_hook(lambda m, inp, key=key: seen.setdefault(key, []).append(inp[0]))
    return seen


def test_mixed_pairing_sends_each_half_through_the_right_sensors():
    model = _pair_model("mixed", shuffle_bn="false")
    model.train()
    seen = _adapter_inputs(model)
    s1, s2 = _pair_views()
    model([s1, s2])
    # First half: query S2, key S1; second half: query S1, key S2.
    assert torch.equal(torch.cat(seen[("encoder_q", "s2")]), s2[:4])
    assert torch.equal(torch.cat(seen[("encoder_k", "s1")]), s1[:4])
    assert torch.equal(torch.cat(seen[("encoder_q", "s1")]), s1[4:])
    assert torch.equal(torch.cat(seen[("encoder_k", "s2")]), s2[4:])
    # Fixed: S2 queries only.
    fixed = _pair_model("fixed", shuffle_bn="false")
    seen = _adapter_inputs(fixed)
    fixed([s1, s2])
    assert set(seen) == {("encoder_q", "s2"), ("encoder_k", "s1")}
    assert torch.equal(seen[("encoder_q", "s2")][0], s2)


def _one_step(model) -> dict[str, torch.Tensor]:
    model.train()
    before = {n: p.detach().clone() for n, p in model.encoder_q.adapters.named_parameters()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    loss, _ = model(_pair_views())
    loss.backward()
    grads = {
        n: (None if p.grad is None else p.grad.detach().clone())
        for n, p in model.encoder_q.adapters.named_parameters()
    }
    opt.step()
    model.after_step({"momentum": 0.9})
    changed = {n: not torch.equal(before[n], p) for n, p in model.encoder_q.adapters.named_parameters()}
    return grads, changed


@pytest.mark.parametrize("pairing", ["mixed", "symmetric"])
def test_mixed_and_symmetric_pairings_train_both_adapters(pairing):
    grads, changed = _one_step(_pair_model(pairing))
    for sensor in ("s1", "s2"):
        g = grads[f"{sensor}.conv.weight"]
        assert g is not None and float(g.abs().max()) > 0
        assert changed[f"{sensor}.conv.weight"]
    # The fixed direction leaves the S1 adapter without gradient: it never changes.
    grads, changed = _one_step(_pair_model("fixed"))
    assert grads["s1.conv.weight"] is None and not changed["s1.conv.weight"]
    assert changed["s2.conv.weight"]


def test_mixed_pairing_loss_is_the_mean_of_the_two_directed_halves():
    model = _pair_model("mixed", shuffle_bn="false")
    model.eval()  # batch statistics would differ between a half and the whole batch
    s1, s2 = _pair_views()
    with torch.no_grad():
        loss, _ = model([s1, s2])
        model.discard_pending()
        fixed_half, _, _ = model._contrast(s2[:4], "s2", s1[:4], "s1")
        other_half, _, _ = model._contrast(s1[4:], "s1", s2[4:], "s2")
    assert float(loss) == pytest.approx(float(fixed_half + other_half) / 2, rel=1e-6)
    assert len(torch.cat(model._pending)) == 8  # both halves' keys are queued (4 + 4)


def test_unknown_pairing_is_refused():
    with pytest.raises(ValueError, match="moco.pairing must be one of fixed, mixed, symmetric"):
        _pair_model("both")
