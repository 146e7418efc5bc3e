"""Land-cover segmentation: per-pixel IoU by hand, heads on constructed features, the frozen backbone, labels
from the stored LC layers, and the CLI grid end to end (tables, MLflow, figures, GeoTIFF maps)."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
import rasterio
import timm
import torch
from accelerate import Accelerator
from safetensors.torch import save_file
from test_eval_attention import fake_dino_run
from torch import nn

from eossl.eval.models import build_eval_encoder
from eossl.eval.segment.data import IGNORE_INDEX, SegmentationPatches, class_weights, label_scheme
from eossl.eval.segment.heads import LinearHead, build_segmenter
from eossl.eval.segment.metrics import pixel_confusion, segmentation_scores
from eossl.eval.segment.train import SegTrainConfig, predict, train_segmenter
from eossl.streaming.inputs import InputSpec
from eossl.train.checkpoint import state_digest

from conftest import run_cli, sen12ms_path


# --------------------------------------------------------------------------------------------- metrics
def test_miou_hand_computed_with_ignored_pixels_and_absent_classes():
    # K = 5. The last two pixels are ignored (255): what is predicted there does not count.
    target = np.array([0, 0, 0, 1, 1, 2, 2, 255, 255])
    pred = np.array([0, 0, 1, 1, 1, 0, 3, 3, 2])
    # Scored: target 0 0 0 1 1 2 2 / pred 0 0 1 1 1 0 3.
    # class 0: TP 2, FP 1 (a 2 predicted as 0), FN 1 -> 2/4. class 1: TP 2, FP 1, FN 0 -> 2/3.
    # class 2: in the reference, never predicted on a scored pixel -> 0/2 = 0 (counts in the mean).
    # class 3: predicted once, absent from the reference -> 0/1 = 0 (counts).
    # class 4: absent from both -> no IoU, left out of the mean.
    cm = pixel_confusion(pred, target, 5)
    np.testing.assert_array_equal(cm, [[2, 1, 0, 0, 0], [0, 2, 0, 0, 0], [1, 0, 0, 1, 0], [0] * 5, [0] * 5])
    s = segmentation_scores(cm, ["a", "b", "c", "d", "e"])
    assert s["per_class_iou"][:4] == pytest.approx([0.5, 2 / 3, 0.0, 0.0])
    assert s["per_class_iou"][4] is None
    assert s["miou"] == pytest.approx((0.5 + 2 / 3) / 4)
    assert s["pixel_accuracy"] == pytest.approx(4 / 7)
    assert s["classes_scored"] == 4 and s["pixels"] == 7 and s["support"] == [3, 2, 2, 0, 0]
    # A value outside the classes is an error where it is scored, and ignored where the reference is 255.
    with pytest.raises(ValueError, match="pred holds values outside"):
        pixel_confusion(np.array([7, 0]), np.array([0, 0]), 5)
    assert pixel_confusion(np.array([7, 0]), np.array([255, 0]), 5).sum() == 1
    assert segmentation_scores(pixel_confusion(pred, np.full(9, 255), 5))["miou"] is None  # nothing scored


def test_miou_is_dataset_level_and_matches_a_float64_reference():
    rng = np.random.default_rng(0)
    preds = [rng.integers(0, 4, size=(16, 16)) for _ in range(3)]
    refs = [np.where(rng.random((16, 16)) < 0.1, 255, rng.integers(0, 3, size=(16, 16))) for _ in range(3)]
    total = sum(pixel_confusion(p, t, 4) for p, t in zip(preds, refs, strict=True))
    s = segmentation_scores(total)
    p, t = np.concatenate([x.ravel() for x in preds]), np.concatenate([x.ravel() for x in refs])
    keep = t != 255
    p, t = p[keep], t[keep]
    ious = []
    for c in range(4):
        inter, union = np.sum((p == c) & (t == c)), np.sum((p == c) | (t == c))
        ious.append(inter / union if union else None)
    assert s["per_class_iou"] == pytest.approx(ious)
    assert s["miou"] == pytest.approx(np.mean([v for v in ious if v is not None]))
    assert s["pixel_accuracy"] == pytest.approx(np.mean(p == t))


def test_label_schemes_map_codes_and_ignore_invalid_pixels():
    lc = np.zeros((4, 2, 4), dtype=np.uint8)
    lc[0] = [[1, 5, 12, 14], [17, 0, 255, 99]]  # IGBP; 0, 255 and 99 are not classes
    lc[1] = [[14, 16, 21, 22], [255, 0, 3, 31]]  # LCCS-LC: 255 = unclassified
    simple = label_scheme("igbp_simple").targets(lc)
    np.testing.assert_array_equal(simple, [[0, 0, 5, 5], [9, 255, 255, 255]])  # forest, croplands, water
    np.testing.assert_array_equal(label_scheme("igbp").targets(lc), [[0, 4, 11, 13], [16, 255, 255, 255]])
    lccs = label_scheme("lccs_lc")
    idx = lccs.targets(lc)
    assert [lccs.codes[i] for i in idx[0]] == [14, 16, 21, 22]
    assert idx[1, 0] == idx[1, 1] == IGNORE_INDEX and lccs.classes[idx[1, 3]] == "dense herbaceous"
    with pytest.raises(ValueError, match="segmentation label"):
        label_scheme("corine")


def test_class_weights():
    counts = np.array([800, 100, 100, 0])
    w = class_weights(counts, "median_frequency")  # median of the present frequencies: 0.1
    freq = counts / counts.sum()
    assert w[3] == 0 and (freq * w).sum() == pytest.approx(1.0)
    assert w[1] / w[0] == pytest.approx(8.0) and w[1] == w[2]
    w = class_weights(counts, "inverse_sqrt")
    assert w[1] / w[0] == pytest.approx(np.sqrt(8.0))
    np.testing.assert_allclose(class_weights(counts, "none")[:3], 1.0)


# ------------------------------------------------------------------------------ heads on known features
class _OnFeatures(nn.Module):
    """The linear head fed the input as its feature map, sampled on a stride-4 token grid (the backbone is a
    subsampling identity), so the head's bilinear upsampling to pixels is part of what is tested."""

    def __init__(self, channels: int, classes: int, stride: int = 4):
        super().__init__()
        self.head = LinearHead(channels, classes)
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.stride
        return self.head([x[..., s // 2 :: s, s // 2 :: s]], tuple(x.shape[-2:]))


def _label_features(n: int, rng: np.random.Generator, codes: np.ndarray, size: int = 64, cell: int = 16):
    """Label maps constant on 16 px cells (4 tokens wide, as 46 px MODIS cells are ~3 ViT tokens) with 5 %
    ignored pixels, and features that hold each pixel's class (its code vector, ``codes`` (K, D)) plus
    noise."""
    items = []
    for _ in range(n):
        grid = rng.integers(0, len(codes), size=(size // cell, size // cell))
        y = np.kron(grid, np.ones((cell, cell), dtype=np.int64))
        x = (
            codes[y].transpose(2, 0, 1)
            + rng.normal(size=(codes.shape[1], size, size)).astype(np.float32) * 0.5
        )
        y = np.where(rng.random(y.shape) < 0.05, IGNORE_INDEX, y)
        items.append(
            {"x": torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)), "y": torch.from_numpy(y)}
        )
    return items


def _scores_after_training(train, test, seed=0):
    torch.manual_seed(seed)
    model = _OnFeatures(16, 4)
    acc = Accelerator(cpu=True)
    cfg = SegTrainConfig(epochs=15, batch_size=8, lr=3e-2, class_weighting="none")
    counts = np.bincount(np.concatenate([t["y"].numpy().ravel() for t in train]), minlength=256)[:4]
    train_segmenter(model, train, class_weights(counts, "none"), cfg, seed, acc)
    cm = sum(pixel_confusion(p, item["y"].numpy(), 4) for item, p in predict(model, test, 8, acc))
    return segmentation_scores(cm)


@pytest.mark.slow
def test_linear_head_reads_label_features_and_stays_at_chance_on_shuffled_labels():
    rng = np.random.default_rng(0)
    codes = rng.normal(size=(4, 16)).astype(np.float32) * 2
    train, test = _label_features(24, rng, codes), _label_features(8, rng, codes)
    good = _scores_after_training(train, test)
    assert good["miou"] > 0.95 and good["pixel_accuracy"] > 0.97
    # Shuffled labels: the targets are permuted over pixels and patches, so features say nothing about them.
    ys = torch.stack([t["y"] for t in train])
    perm = torch.from_numpy(rng.permutation(ys.numel()))
    shuffled = ys.flatten()[perm].reshape(ys.shape)
    chance = _scores_after_training(
        [{"x": t["x"], "y": y} for t, y in zip(train, shuffled, strict=True)], test
    )
    # Chance for 4 balanced classes: pixel accuracy 0.25; mIoU 1/7 for uniform guesses, 1/16 for one class.
    assert chance["pixel_accuracy"] < 0.35 and chance["miou"] < 0.25


# -------------------------------------------------------------------------------------- on a dataset
def fake_resnet_run(run_dir: Path, dataset: Path) -> Path:
    """A run folder as train/export.py writes it, with a randomly initialised ResNet-18 on S1 (native
    input)."""
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, num_classes=0, in_chans=2)
    out = run_dir / "backbone"
    out.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "backbone.safetensors"))
    spec = InputSpec(("s1",))
    mean, std = spec.normalisation(json.loads((dataset / "manifest.json").read_text()))
    card = {
        "method": "moco",
        "timm_model": "resnet18",
        "in_chans": 2,
        "timm_kwargs": {"in_chans": 2, "num_classes": 0},
        "adapter": {"type": "native", "mode": "trainable", "channels": {"input": 2}, "out_channels": 3},
        "inputs": {"view0": {**spec.to_json(), "mean": mean.tolist(), "std": std.tolist()}},
        "steps": 0,
        "feature_dim": model.num_features,
    }
    (out / "model_card.json").write_text(json.dumps(card))
    return run_dir


@pytest.mark.slow
@pytest.mark.parametrize("frozen", [True, False])
def test_backbone_is_unchanged_in_the_frozen_protocol(dataset, frozen):
    spec = InputSpec.parse("s1")
    scheme = label_scheme("igbp_simple")
    train = SegmentationPatches(str(dataset), spec, "budget_4_seed0", scheme)
    assert len(train) == 4
    ev = build_eval_encoder("random", spec.channel_names, train.mean, train.std, backbone="resnet18")
    model = build_segmenter(ev, len(scheme.classes), "linear" if frozen else "decoder", frozen, width=16)
    before, head_before = state_digest(model.encoder), state_digest(model.head)
    cfg = SegTrainConfig(epochs=1, batch_size=2, crop=32)
    losses = train_segmenter(
        model, train, class_weights(train.pixel_counts(), cfg.class_weighting), cfg, 0, Accelerator(cpu=True)
    )
    assert len(losses) == 2 and all(np.isfinite(losses))
    assert state_digest(model.head) != head_before  # the head did train
    # Frozen: weights and BatchNorm statistics bit-identical; fine-tuned: the same check sees the change.
    assert (state_digest(model.encoder) == before) == frozen


def _read_csv(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
@pytest.mark.parametrize("protocol", ["linear", "finetune"])
def test_segment_cli_tables_mlflow_figures_and_georeferenced_maps(
    dataset, synthetic_source, tmp_path, monkeypatch, protocol
):
    import mlflow
    import zarr

    from eossl.launch.cli import main

    dino = fake_dino_run(tmp_path / "dino", dataset)
    moco = fake_resnet_run(tmp_path / "moco", dataset)
    out = tmp_path / "eval"
    args = [
        "eval",
        "segment",
        "--checkpoint",
        str(dino),
        "--checkpoint",
        str(moco),
        "--dataset",
        str(dataset),
        "--inputs",
        "s1,s1s2",
        "--budget",
        "4",
        "--protocol",
        protocol,
        "--seeds",
        "0,1",
        "--epochs",
        "1",
        "--batch-size",
        "4",
        "--crop",
        "32",
        "--figures",
        "2",
        "--attention-patches",
        "2",
        "--out",
        str(out),
    ]
    if protocol == "linear":
        args.append("--write-maps")
    else:
        args += ["--precision", "bf16", "--backbone-lr-scale", "0.5"]
    if protocol == "finetune":  # the real command, started as users start it: its own process and autocast
        run_cli(*args, env={**os.environ, "MLFLOW_TRACKING_URI": ""}, cwd=tmp_path)  # store: ./mlflow.db
    else:  # the same command line through the same entry point, in this process (torch is imported already)
        monkeypatch.chdir(tmp_path)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", "")  # store: ./mlflow.db, as for the command above
        assert main(args) == 0

    rows = {r["method"]: r for r in _read_csv(out / "results.csv")}
    supervised = ["random init (vit_tiny_patch16_224)", "random init (resnet18)", "dino", "moco"]
    assert list(rows)[:4] == supervised
    for m in supervised:
        assert 0.0 <= float(rows[m]["s1"]) <= 100.0
        # Random inits are built for any input; the S1-only checkpoints have no layout for S2: n/a, reason in
        # md.
        assert (rows[m]["s1s2"] == "") == (m in ("dino", "moco"))
    assert 0.0 < float(rows["dino: token k-means (no labels)"]["s1"]) <= 100.0
    assert rows["moco: token k-means (no labels)"]["s1"] == ""  # a ResNet has no tokens: n/a
    md = (out / "results.md").read_text()
    assert "±" in md and "Per-class IoU" in md and "resnet18 has no attention maps" in md

    cell = json.loads((out / "cells" / "dino__s1" / "metrics.json").read_text())
    assert [m["train_patches"] for m in cell["per_seed"]] == [4, 4]
    n_test = cell["per_seed"][0]["test_patches"]
    assert cell["per_seed"][0]["pixels"] <= n_test * 256 * 256
    assert cell["per_seed"][0]["backbone_unchanged"] is (True if protocol == "linear" else None)
    assert (out / "cells" / "moco__s1" / "predictions.png").stat().st_size > 20_000

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("eossl-eval")
    parent = client.search_runs([exp.experiment_id], "tags.`eossl.eval.parent` = '1'")[0]
    children = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    scored = [c for c in children if "miou_mean" in c.data.metrics]
    assert parent.data.params["train.backbone_lr_scale"] == ("0.5" if protocol == "finetune" else "0.1")
    assert len(children) == len(_read_csv(out / "results.csv")) * 2  # every row x (s1, s1s2)
    assert {
        c.data.tags["eossl.eval.method"] for c in scored if c.data.tags["eossl.eval.input"] == "s1"
    } >= set(supervised)

    maps = sorted((out / "cells" / "dino__s1" / "maps").glob("*.tif"))
    if protocol == "finetune":
        assert not maps
        report = tmp_path / "report"
        # `eval report` reads nothing but the MLflow store: in this process it proves the same as a new one.
        report_args = [
            "--parent",
            parent.info.run_id,
            "--tracking-uri",
            f"sqlite:///{tmp_path / 'mlflow.db'}",
        ]
        assert main(["eval", "report", *report_args, "--out", str(report)]) == 0
        assert _read_csv(report / "results.csv") == _read_csv(out / "results.csv")  # rebuilt from MLflow only
        return
    assert len(maps) == n_test
    vrts = sorted(p.stem for p in (out / "cells" / "dino__s1" / "maps").glob("*.vrt"))
    assert vrts == sorted({p.stem.rsplit("_p", 1)[0] for p in maps})  # one mosaic per hold-out scene
    group = zarr.open_group(str(dataset / "data.zarr"), mode="r")
    row_of = {str(k): i for i, k in enumerate(group["key"][:])}
    codes = set(label_scheme("igbp_simple").codes)
    for path in maps:
        key = path.stem
        roi, season, scene, patch = key.rsplit("_", 3)
        source = sen12ms_path(synthetic_source, "lc", roi, season, int(scene), int(patch[1:]))
        with rasterio.open(path) as pred, rasterio.open(source) as ref:
            assert pred.shape == ref.shape == (256, 256) and pred.count == 1 and pred.dtypes[0] == "uint8"
            assert pred.crs == ref.crs and pred.transform == ref.transform  # the source patch's georeference
            assert set(np.unique(pred.read(1)).tolist()) <= codes
        assert str(group["crs"][row_of[key]]) == pred.crs.to_string()
