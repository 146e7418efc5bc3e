"""Attention maps and token-embedding maps of a ViT: the matched-mIoU metric, the attention itself, and the
figures end to end on the real sample patches (ingested with the real CLI)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.models.vision_transformer import VisionTransformer

from eossl.eval.attention import attention_figures, keep_mass_masks, kmeans, token_pca_rgb, upsample_tokens
from eossl.eval.segment.metrics import matched_miou
from eossl.streaming.inputs import InputSpec
from eossl.train.vit import last_self_attention

from conftest import run_cli

P30, P839 = "ROIs1158_spring_1_p30", "ROIs1970_fall_139_p839"  # p30: S1 + LC; p839: S1 + S2, no LC


# ------------------------------------------------------------------------------------------ matched mIoU
def test_matched_miou_is_one_when_clusters_are_the_classes_relabelled():
    rng = np.random.default_rng(0)
    target = rng.choice([1, 3, 5], size=(32, 32))
    relabel = {1: 7, 3: 0, 5: 42}
    pred = np.vectorize(relabel.get)(target)
    res = matched_miou(pred, target, n_target_classes=10)
    assert res["miou"] == 1.0
    assert res["per_class"] == {1: 1.0, 3: 1.0, 5: 1.0}
    assert res["matching"] == {7: 1, 0: 3, 42: 5}


def test_matched_miou_hand_computed_with_ignored_pixels_and_an_unmatched_class():
    # Pixels 0-1 are no data (ignored, so cluster 9 that only lies there does not exist for the metric).
    target = np.array([0, 0, 1, 1, 1, 2, 2, 3])
    pred = np.array([5, 9, 5, 5, 6, 6, 6, 6])
    # Scored pixels: target 1 1 1 2 2 3 / pred 5 5 6 6 6 6.
    # IoU(5, 1) = 2 / 3; IoU(6, 1) = 1 / 6; IoU(6, 2) = 2 / 4; IoU(6, 3) = 1 / 4; cluster 5 vs 2, 3: 0.
    # Best one-to-one matching: 5 -> 1, 6 -> 2 (total 7/6); class 3 gets no cluster: IoU 0.
    res = matched_miou(pred, target, n_target_classes=10, ignore=0)
    assert res["matching"] == {5: 1, 6: 2}
    assert res["per_class"] == pytest.approx({1: 2 / 3, 2: 0.5, 3: 0.0})
    assert res["miou"] == pytest.approx((2 / 3 + 0.5 + 0.0) / 3)
    # Without ignoring 0, class 0 is scored too (cluster 9 matches it: IoU 1/2; 5 now has 3 pixels).
    res = matched_miou(pred, target, ignore=None)
    assert res["per_class"][0] == pytest.approx(0.5)
    assert res["per_class"][1] == pytest.approx(2 / 4)


def _brute_force_miou(pred: np.ndarray, target: np.ndarray) -> float:
    """Best mean IoU over every one-to-one assignment of clusters to the classes present (0 ignored)."""
    valid = target != 0
    p, t = pred[valid], target[valid]
    clusters, classes = np.unique(p), np.unique(t)

    def iou(c, k):
        return ((p == c) & (t == k)).sum() / max(((p == c) | (t == k)).sum(), 1)

    best = 0.0
    for assign in itertools.permutations(list(clusters) + [None] * len(classes), len(classes)):
        best = max(best, sum(iou(c, k) for c, k in zip(assign, classes, strict=True) if c is not None))
    return best / len(classes)


def test_matched_miou_is_invariant_to_cluster_ids_and_optimal():
    rng = np.random.default_rng(1)
    for _ in range(20):
        target = rng.integers(0, 4, size=(12, 12))  # 0 = no data, classes 1..3
        pred = rng.integers(0, 4, size=(12, 12))
        res = matched_miou(pred, target, n_target_classes=3)
        perm = rng.permutation(50)[:4] + 100  # new, arbitrary ids
        res_p = matched_miou(perm[pred], target, n_target_classes=3)
        assert res_p["miou"] == pytest.approx(res["miou"])
        assert res_p["per_class"] == pytest.approx(res["per_class"])
        assert res_p["matching"] == {int(perm[c]): k for c, k in res["matching"].items()}
        assert res["miou"] == pytest.approx(_brute_force_miou(pred, target))  # optimal matching


def test_matched_miou_rejects_bad_input():
    with pytest.raises(ValueError, match="same shape"):
        matched_miou(np.zeros((2, 2), int), np.zeros((2, 3), int))
    with pytest.raises(ValueError, match="outside 0..10"):  # raw IGBP codes where simplified are expected
        matched_miou(np.zeros(3, int), np.array([1, 12, 17]), n_target_classes=10)
    assert np.isnan(matched_miou(np.zeros(3, int), np.zeros(3, int))["miou"])  # all no data


# ----------------------------------------------------------------------------------------- attention
@pytest.mark.parametrize("reg_tokens", [0, 2])
def test_last_self_attention_is_the_attention_the_block_applies(reg_tokens):
    torch.manual_seed(0)
    model = (
        VisionTransformer(
            img_size=32,
            patch_size=8,
            in_chans=2,
            embed_dim=24,
            depth=2,
            num_heads=3,
            num_classes=0,
            reg_tokens=reg_tokens,
            dynamic_img_size=True,
        )
        .double()
        .eval()
    )
    block = model.blocks[-1]
    with torch.no_grad():
        torch.nn.init.normal_(block.attn.qkv.weight, std=0.5)  # peaked attention: a wrong map cannot hide
        # behind a near-uniform one
    seen = {}
    block.register_forward_pre_hook(lambda m, args: seen.__setitem__("x", args[0]))
    block.attn.register_forward_hook(lambda m, args, out: seen.__setitem__("attn_out", out))
    x = torch.randn(2, 2, 48, 64, dtype=torch.float64)  # not the built size: dynamic grid 6 x 8
    with torch.no_grad():
        model.forward_features(x)
        attn = last_self_attention(model, x)
        n = model.num_prefix_tokens + 6 * 8
        assert attn.shape == (2, 3, n, n)
        torch.testing.assert_close(attn.sum(-1), torch.ones(2, 3, n, dtype=torch.float64))
        assert attn[:, :, 0].max() > 5.0 / n  # the CLS row is far from uniform
        # Reference: the block's own attention output is proj(attn @ v) with v from its own qkv.
        y = block.norm1(seen["x"])
        b, _, c = y.shape
        v = block.attn.qkv(y).reshape(b, n, 3, 3, c // 3).permute(2, 0, 3, 1, 4)[2]

        def project(a):
            return block.attn.proj(block.attn.norm((a @ v).transpose(1, 2).reshape(b, n, c)))

        torch.testing.assert_close(project(attn), seen["attn_out"], rtol=1e-10, atol=1e-12)
        # The check is sensitive: the transposed map or a map without the 1/sqrt(d) scale fail it.
        assert not torch.allclose(project(attn.transpose(-1, -2)), seen["attn_out"], atol=1e-6)
        q, k = block.attn.qkv(y).reshape(b, n, 3, 3, c // 3).permute(2, 0, 3, 1, 4)[:2]
        assert not torch.allclose(project((q @ k.transpose(-2, -1)).softmax(-1)), seen["attn_out"], atol=1e-6)


def test_keep_mass_masks_keep_the_smallest_set():
    att = np.array([[0.5, 0.3, 0.1, 0.1], [0.1, 0.1, 0.1, 0.7], [0.25, 0.25, 0.25, 0.25]])
    np.testing.assert_array_equal(keep_mass_masks(att, 0.6), [[1, 1, 0, 0], [0, 0, 0, 1], [1, 1, 1, 0]])
    np.testing.assert_array_equal(keep_mass_masks(att, 0.5)[0], [1, 0, 0, 0])  # exactly reached by one
    with pytest.raises(ValueError):
        keep_mass_masks(att, 0.0)


def test_kmeans_pca_and_upsampling():
    rng = np.random.default_rng(0)
    centres = np.array([[0.0, 0.0, 0.0], [10.0, 0.0, 0.0], [0.0, 10.0, 5.0]])
    sizes = [30, 50, 20]
    truth = np.repeat(np.arange(3), sizes)
    x = centres[truth] + rng.normal(0, 0.3, size=(100, 3))
    labels = kmeans(x, 3, seed=0)
    np.testing.assert_array_equal(labels, np.array([1, 0, 2])[truth])  # recovered, numbered by size
    np.testing.assert_array_equal(kmeans(x, 3, seed=0), labels)  # seeded
    rgb, var = token_pca_rgb(x)
    assert rgb.shape == (100, 3) and rgb.min() == 0.0 and rgb.max() == 1.0
    assert var[0] > var[1] > var[2] and var.sum() <= 1.0 + 1e-12
    grid = np.arange(4).reshape(2, 2)
    np.testing.assert_array_equal(
        upsample_tokens(grid, (2, 2), (5, 5)),
        [[0, 0, 1, 1, 1], [0, 0, 1, 1, 1], [2, 2, 3, 3, 3], [2, 2, 3, 3, 3], [2, 2, 3, 3, 3]],
    )


# ---------------------------------------------------------------------------------------- end to end
def fake_dino_run(run_dir: Path, dataset: Path, timm_kwargs: bool = True) -> Path:
    """A run folder as train/export.py writes it, with a randomly initialised tiny ViT on S1."""
    torch.manual_seed(0)
    name = "vit_tiny_patch16_224"
    model = timm.create_model(name, pretrained=False, num_classes=0, in_chans=2, dynamic_img_size=True)
    out = run_dir / "backbone"
    out.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "backbone.safetensors"))
    spec = InputSpec(("s1",))
    mean, std = spec.normalisation(json.loads((dataset / "manifest.json").read_text()))
    card = {
        "method": "dino",
        "timm_model": name,
        "in_chans": 2,
        "load": f"timm.create_model({name!r}, in_chans=2, num_classes=0, dynamic_img_size=True)",
        "adapter": {"type": "native", "mode": "trainable", "channels": {"input": 2}, "out_channels": 3},
        "view_mode": "multicrop",
        "inputs": {"view0": {**spec.to_json(), "mean": mean.round(6).tolist(), "std": std.round(6).tolist()}},
        "normalisation": "(x - mean) / std per channel after clipping S1 to s1_clip (dB)",
        "dataset": str(dataset),
        "dataset_manifest_sha256": None,
        "steps": 0,
        "feature_dim": model.num_features,
    }
    if timm_kwargs:
        card["timm_kwargs"] = {"in_chans": 2, "num_classes": 0, "dynamic_img_size": True}
    (out / "model_card.json").write_text(json.dumps(card, indent=1))
    return run_dir


@pytest.fixture
def real_dataset(real_source, tmp_path) -> Path:
    ds = tmp_path / "ds"
    run_cli("ingest", str(real_source), str(ds), "--required", "s1", "--no-progress")
    return ds


@pytest.mark.slow
def test_attention_figures_on_real_patches(real_dataset, tmp_path, monkeypatch):
    import matplotlib.image
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    client = mlflow.MlflowClient()
    exp = client.create_experiment("attention", artifact_location=(tmp_path / "artifacts").as_uri())
    run_id = client.create_run(exp).info.run_id

    run = fake_dino_run(tmp_path / "run", real_dataset)
    out = tmp_path / "figures"
    res = attention_figures(str(run), str(real_dataset), [P30, P839], str(out), mlflow_run_id=run_id)

    assert res["figures"] == [str(out / f"{P30}.png"), str(out / f"{P839}.png")]
    for fig in res["figures"]:
        img = matplotlib.image.imread(fig)
        assert img.shape[1] >= 1300 and img.shape[0] >= 700  # ~16 inches wide at 110 dpi
        assert Path(fig).stat().st_size > 100_000  # images, not empty axes
    metrics = json.loads((out / "attention_metrics.json").read_text())
    assert set(metrics) == {P30, P839}
    assert metrics[P30]["has_lc"] and not metrics[P839]["has_lc"]
    assert "agreement" not in metrics[P839]
    agree = metrics[P30]["agreement"]
    assert agree["lc_classes_present"] == [1, 3]  # forest, savanna
    values = [
        agree["kmeans"]["miou"],
        agree["kmeans_input_baseline"]["miou"],
        agree["attention"]["best_miou"],
        agree["attention"]["mean_miou"],
        agree["attention"]["mean_attention_miou"],
        *agree["attention"]["per_head_miou"],
        *agree["kmeans"]["per_class"].values(),
    ]
    assert all(0.0 <= v <= 1.0 for v in values)
    assert len(agree["attention"]["per_head_miou"]) == 3  # ViT-Ti: 3 heads
    assert agree["attention"]["best_miou"] == max(agree["attention"]["per_head_miou"])
    for m in metrics.values():
        assert m["grid"] == [16, 16]  # the full 256 px patch went in (dynamic image size)
        assert all(0.0 < a <= 1.0 for a in m["mask_area_fraction"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["patches"] == 2 and summary["patches_with_lc"] == 1
    assert summary["kmeans_miou"] == pytest.approx(agree["kmeans"]["miou"])
    assert summary["channels"] == ["s1:VV", "s1:VH"]
    logged = {Path(f.path).name for f in client.list_artifacts(run_id, "attention")}
    assert logged == {f"{P30}.png", f"{P839}.png", "attention_metrics.json", "summary.json"}

    # A card without timm_kwargs (built at 224 px): the position embeddings are resampled to the 16 x 16
    # grid once, which gives the same maps as dynamic_img_size.
    old = fake_dino_run(tmp_path / "old", real_dataset, timm_kwargs=False)
    res_old = attention_figures(str(old), str(real_dataset), [P839], str(tmp_path / "old_figs"))
    assert res_old["metrics"][P839]["mask_area_fraction"] == metrics[P839]["mask_area_fraction"]
    np.testing.assert_allclose(
        res_old["metrics"][P839]["cls_to_patches"], metrics[P839]["cls_to_patches"], rtol=1e-5
    )


@pytest.mark.slow
def test_attention_figures_rejects_unknown_keys(real_dataset, tmp_path):
    run = fake_dino_run(tmp_path / "run", real_dataset)
    with pytest.raises(ValueError, match=f"unknown patch keys.*{P30}"):
        attention_figures(str(run), str(real_dataset), ["ROIs0000_spring_1_p1"], str(tmp_path / "f"))
    with pytest.raises(ValueError, match="lack the model input"):  # p30 has no S2
        attention_figures(str(run), str(real_dataset), [P30], str(tmp_path / "f"), inputs="s2")
