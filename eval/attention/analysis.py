"""What a pre-trained ViT learned, patch by patch: CLS attention, DINO attention masks, token embeddings.

For each requested patch, one PNG (``OUT/<key>.png``) shows the input as a person reads it (S1 VV/VH
false colour, S2 true colour, the simplified IGBP land-cover map), the last-layer CLS attention of every
head and their mean, the DINO paper's thresholded masks (per head, the smallest set of patches holding
``keep_mass`` of the attention), and the patch tokens as a map: their first three principal components as
RGB and their k-means clusters. Where the patch has land cover, the clusters and masks are scored against
it (``segment.metrics.matched_miou``, Hungarian-matched mIoU), and the numbers go into the figure
title, ``OUT/attention_metrics.json`` (per key) and ``OUT/summary.json`` (means).

Definitions (``DEFINITIONS``, also written into ``summary.json``):

- attention: row 0 (CLS) of the last block's softmax attention, columns of the patch tokens only (CLS
  and register columns dropped) and renormalised to sum 1 over patches, as in DINO's
  ``visualize_attention.py``. Maps are shown as "x uniform" (1 = every patch gets the same share).
- masks: per head, patches sorted by attention, the smallest prefix whose mass reaches ``keep_mass``.
- attention agreement: each head's mask and its complement are a 2-cluster segmentation, scored with
  ``matched_miou``; reported per head, for the best head and as the mean over heads (with 2 clusters
  at most 2 LC classes can be matched, so the ceiling is 2 / classes present).
- token agreement: k-means (k = ``n_clusters``, seeded k-means++, 50 Lloyd iterations, Euclidean on the
  final-norm patch tokens), each token's cluster painted over its pixels (nearest upsampling).
- input baseline: the same k-means on the model input averaged over each token's pixels: what the
  raw channels give on the same grid, the reference a learned embedding should beat.

The display reads the stored values (raw dB and reflectance); the model reads the patch through
``ZarrPatchDataset`` and ``EvalEncoder.prepare``, the same path as every other evaluation.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import zarr

from eossl.ingest.bands import IGBP_SIMPLE_CLASSES, igbp_to_simple_lut
from eossl.ingest.format import ZARR_DIR
from eossl.ingest.storage import DatasetRoot
from eossl.streaming.inputs import InputSpec, parse_sensors
from eossl.streaming.zarr_dataset import ZarrPatchDataset
from eossl.train.export import read_model_card
from eossl.train.progress import Countdown, log_line
from eossl.train.tracking import default_tracking_uri, quiet_mlflow_logs
from eossl.train.vit import is_vit, last_self_attention, patch_grid, patch_tokens

from ..config import AttentionConfig
from ..models import EvalEncoder, build_eval_encoder
from ..segment.metrics import matched_miou
from .figure import RawPatch, caption, plot_patch
from .maps import PatchAnalysis, PatchMaps, keep_mass_masks, kmeans, token_pca_rgb, upsample_tokens

__all__ = ["DEFINITIONS", "attention_figures"]

_N_LC = len(IGBP_SIMPLE_CLASSES)

DEFINITIONS: dict[str, str] = {
    "attention": "CLS row of the last block's softmax attention, patch columns only, renormalised to sum 1",
    "mask": "per head, the smallest set of patches holding keep_mass of its attention",
    "attention_miou": (
        "each head's mask vs its complement as 2 clusters, Hungarian-matched mIoU vs simplified IGBP "
        "over the classes present; best head and mean over heads"
    ),
    "kmeans_miou": (
        "k-means (k-means++, seed 0, 50 iterations) of the final-norm patch tokens, nearest-upsampled, "
        "Hungarian-matched mIoU"
    ),
    "kmeans_input_baseline_miou": "the same k-means on the model input averaged over each token's pixels",
}


# ---------------------------------------------------------------------------------------------- model
def _input_spec(card: dict, inputs: str | None) -> InputSpec:
    """The model's input: the card's view0 sensors by default, bands and S1 clip as the model saw them."""
    views = list(card["inputs"].values())
    sensors = tuple(views[0]["sensors"]) if inputs is None else parse_sensors(inputs)
    s2_view = next((v for v in views if "s2" in v["sensors"]), None)
    s1_view = next((v for v in views if "s1" in v["sensors"]), None)
    clip = s1_view.get("s1_clip") if s1_view else (-25.0, 0.0)
    return InputSpec(
        sensors, tuple(s2_view["s2_bands"]) if s2_view else "land", tuple(clip) if clip else None
    )


def _load_model(
    run_dir: str, card: dict, channels: list[str], mean: np.ndarray, std: np.ndarray, device: torch.device
) -> EvalEncoder:
    ev = build_eval_encoder("checkpoint", channels, mean, std, run_dir)
    backbone = ev.encoder.backbone
    if not is_vit(backbone):
        raise ValueError(
            f"{card['timm_model']} from {run_dir} is not a ViT: attention maps need a transformer"
        )
    # The card's timm arguments (dynamic_img_size: the full 256 px patch goes in). When the encoder was
    # built without them, rebuild the backbone with them and move the weights over.
    extra = {k: v for k, v in (card.get("timm_kwargs") or {}).items() if k not in ("in_chans", "num_classes")}
    if any(getattr(backbone, k, v) != v for k, v in extra.items()):
        import timm

        rebuilt = timm.create_model(
            card["timm_model"], pretrained=False, num_classes=0, in_chans=ev.encoder.in_chans, **extra
        )
        rebuilt.load_state_dict(backbone.state_dict())
        ev.encoder.backbone = rebuilt
    ev.encoder.eval().to(device)
    return ev


@torch.no_grad()
def _patch_maps(ev: EvalEncoder, x: torch.Tensor) -> PatchMaps:
    """One standardised input (C, H, W) -> CLS attention (heads, gh, gw), tokens (N, D), grid, patch."""
    backbone = ev.encoder.backbone
    h, w = x.shape[-2:]
    if not getattr(backbone, "dynamic_img_size", False) and tuple(backbone.patch_embed.img_size) != (h, w):
        backbone.set_input_size(img_size=(h, w))  # no timm_kwargs in the card: resample pos. embeddings once
    xin = ev.encoder.adapt(ev.prepare(x[None]), ev.sensor)
    attn = last_self_attention(backbone, xin)[0].float().cpu().numpy()  # (heads, N_all, N_all)
    tokens = patch_tokens(backbone, xin)[0].float().cpu().numpy()  # (N, D)
    gh, gw = patch_grid(backbone, h, w)
    cls = attn[:, 0, backbone.num_prefix_tokens :]  # (heads, N): CLS row, patch columns
    if cls.shape[1] != gh * gw or tokens.shape[0] != gh * gw:
        raise ValueError(
            f"expected {gh}x{gw} patch tokens, got {cls.shape[1]} attention columns, {len(tokens)} tokens"
        )
    to_patches = cls.sum(1)  # share of the CLS attention that goes to patches (rest: CLS, registers)
    cls = cls / to_patches[:, None]
    return PatchMaps(
        attention=cls.reshape(-1, gh, gw),
        tokens=tokens,
        grid=(gh, gw),
        patch=tuple(backbone.patch_embed.patch_size),
        cls_to_patches=to_patches,
    )


# ------------------------------------------------------------------------------------------- scoring
def _score(
    maps: PatchMaps, masks: np.ndarray, clusters: np.ndarray, base_clusters: np.ndarray, lc: np.ndarray
) -> dict:
    """Agreement with the land-cover map lc (H, W) of simplified codes; masks (heads+1, gh, gw) with the
    mask of the head-mean attention last; clusters, base_clusters (gh, gw)."""
    up = lambda m: upsample_tokens(m, maps.patch, lc.shape)  # noqa: E731
    heads = [matched_miou(up(m).astype(np.int64), lc, _N_LC)["miou"] for m in masks[:-1]]
    best = int(np.argmax(heads))
    return {
        "lc_classes_present": sorted(int(c) for c in np.unique(lc) if c),
        "kmeans": matched_miou(up(clusters), lc, _N_LC),
        "kmeans_input_baseline": matched_miou(up(base_clusters), lc, _N_LC),
        "attention": {
            "per_head_miou": heads,
            "best_head": best,
            "best_miou": heads[best],
            "mean_miou": float(np.mean(heads)),
            "mean_attention_miou": matched_miou(up(masks[-1]).astype(np.int64), lc, _N_LC)["miou"],
        },
    }


def _analyse(
    maps: PatchMaps, x: np.ndarray, lc: np.ndarray | None, keep_mass: float, n_clusters: int
) -> PatchAnalysis:
    """Masks, token clusters, PCA and (with lc) agreement scores of one patch; x is the standardised input."""
    heads, gh, gw = maps.attention.shape
    flat = maps.attention.reshape(heads, -1)
    # masks: (heads + 1, gh, gw), the mask of the head-mean attention last
    masks = keep_mass_masks(np.concatenate([flat, flat.mean(0, keepdims=True)]), keep_mass).reshape(
        -1, gh, gw
    )
    k = min(n_clusters, gh * gw)
    clusters = kmeans(maps.tokens, k, seed=0).reshape(gh, gw)
    ph, pw = maps.patch
    cells = x[:, : gh * ph, : gw * pw].reshape(len(x), gh, ph, gw, pw).mean((2, 4))  # (C, gh, gw) cell means
    base_clusters = kmeans(cells.reshape(len(x), -1).T, k, seed=0).reshape(gh, gw)
    pca, var = token_pca_rgb(maps.tokens)
    scores = _score(maps, masks, clusters, base_clusters, lc) if lc is not None else None
    entry = {
        "has_lc": scores is not None,
        "grid": [gh, gw],
        "heads": heads,
        "n_clusters": k,
        "mask_area_fraction": masks.reshape(heads + 1, -1).mean(1).tolist(),
        "cls_to_patches": maps.cls_to_patches.tolist(),
        "pca_variance": var.tolist(),
    }
    if scores:
        entry["agreement"] = scores
    return PatchAnalysis(masks, clusters, pca, var, scores, entry)


def _clean(obj):
    """JSON-safe: NaN -> null, numpy scalars -> Python, dict keys -> str."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return None if math.isnan(obj) else float(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


# --------------------------------------------------------------------------------------------- store
def _rows_of(group, keys: Sequence[str], dataset: str) -> dict[str, int]:
    """Patch key -> row of the store; an unknown key is refused with a few valid ones."""
    all_keys = [str(k) for k in group["key"][:]]
    row_of = {k: i for i, k in enumerate(all_keys)}
    unknown = [k for k in keys if k not in row_of]
    if unknown:
        raise ValueError(
            f"unknown patch keys {unknown[:5]} in {dataset}; valid keys include "
            f"{', '.join(all_keys[:5])} ({len(all_keys)} in all)"
        )
    return row_of


def _raw_patch(group, has: dict[str, np.ndarray], row: int, model_sensors: tuple[str, ...]) -> RawPatch:
    """The stored layers of one row; land cover as simplified IGBP codes (an all-no-data map is None)."""
    s1, s2, lc = (np.asarray(group[m][row]) if has[m][row] else None for m in ("s1", "s2", "lc"))
    if lc is not None:
        lc = igbp_to_simple_lut()[lc[0]]
        lc = lc if lc.any() else None
    return RawPatch(s1, s2, lc, tuple(model_sensors))


# ---------------------------------------------------------------------------------------------- entry
def attention_figures(
    run_dir: str,
    dataset: str,
    keys: Sequence[str],
    out: str,
    *,
    keep_mass: float = AttentionConfig.keep_mass,
    n_clusters: int = AttentionConfig.n_clusters,
    inputs: str | None = None,
    mlflow_run_id: str | None = None,
    draw: bool = True,
) -> dict:
    """Attention and token-embedding figures of a pre-trained ViT, with their agreement with land cover.

    Args:
        run_dir: pre-training run folder holding ``backbone/`` (backbone.safetensors, model_card.json).
        dataset: dataset folder or URL with ``data.zarr``.
        keys: patch keys (``ROIs1158_spring_1_p30``) to draw, one figure each.
        out: local folder for ``<key>.png``, ``attention_metrics.json`` and ``summary.json``.
        keep_mass: attention mass kept by the thresholded masks (DINO uses 0.6).
        n_clusters: k of the token k-means (about the number of LC classes a patch holds, plus a few).
        inputs: 's1', 's2' or 's1s2'; default the card's view0 sensors (what the model was trained on).
        mlflow_run_id: log the PNGs and JSONs as artifacts (``attention/``) of this MLflow run; the
            tracking URI is the project store (MLFLOW_TRACKING_URI, else ./mlflow.db).
        draw: False computes and writes only the metrics (no PNG): the segmentation table uses this.

    Returns:
        ``{"figures": [png paths], "metrics": {key: per-patch metrics}, "summary": means over patches}``.

    Raises:
        ValueError: an unknown key (the message lists valid ones), a patch without the model's sensors,
            a backbone that is not a ViT.
    """
    if n_clusters < 1:
        raise ValueError(f"n_clusters must be >= 1, got {n_clusters}")
    keys = list(dict.fromkeys(keys))  # one figure per key, in the given order
    if not keys:
        raise ValueError("no patch keys given")
    card = read_model_card(run_dir)
    group = zarr.open_group(DatasetRoot(dataset).zarr_store(ZARR_DIR, read_only=True), mode="r")
    row_of = _rows_of(group, keys, dataset)
    spec = _input_spec(card, inputs)
    ds = ZarrPatchDataset(dataset, spec, rows=[row_of[k] for k in keys], label=None)
    if len(ds) != len(keys):
        lacking = sorted(set(keys) - set(ds.keys.tolist()))
        raise ValueError(f"patches {lacking[:5]} lack the model input {spec.sensors} ({ds.excluded})")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ev = _load_model(run_dir, card, spec.channel_names, ds.mean, ds.std, device)
    has = {m: group[f"has_{m}"][:] for m in ("s1", "s2", "lc")}
    model_text = (
        f"{card.get('method', '?')} {card['timm_model']} ({card.get('steps', '?')} steps, "
        f"{Path(run_dir).name}), input {', '.join(spec.channel_names)}"
    )
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    figures, per_key = [], {}
    countdown = Countdown(len(keys))
    for i, key in enumerate(keys):
        log_line(
            f"attention: patch {i + 1}/{len(keys)} {key} "
            f"({countdown.left - 1} after it, ETA {countdown.eta()})"
        )
        row = row_of[key]
        raw = _raw_patch(group, has, row, spec.sensors)
        x = ds[i]["x"].to(device)
        maps = _patch_maps(ev, x)
        analysis = _analyse(maps, x.cpu().numpy(), raw.lc, keep_mass, n_clusters)
        per_key[key] = {"row": row, **analysis.entry}
        if draw:
            path = out_dir / f"{key}.png"
            title = f"{key}  |  {model_text}\n{caption(analysis.scores)}"
            plot_patch(path, title, raw, maps, analysis, keep_mass)
            figures.append(str(path))
        countdown.advance()

    scored = [e["agreement"] for e in per_key.values() if "agreement" in e]
    mean = lambda vals: float(np.nanmean(vals)) if vals else None  # noqa: E731
    summary = {
        "run_dir": str(run_dir),
        "dataset": str(dataset),
        "timm_model": card["timm_model"],
        "method": card.get("method"),
        "channels": spec.channel_names,
        "keep_mass": keep_mass,
        "n_clusters": n_clusters,
        "patches": len(keys),
        "patches_with_lc": len(scored),
        "kmeans_miou": mean([s["kmeans"]["miou"] for s in scored]),
        "kmeans_input_baseline_miou": mean([s["kmeans_input_baseline"]["miou"] for s in scored]),
        "attention_best_head_miou": mean([s["attention"]["best_miou"] for s in scored]),
        "attention_mean_head_miou": mean([s["attention"]["mean_miou"] for s in scored]),
        "definitions": DEFINITIONS,
    }
    metrics_path, summary_path = out_dir / "attention_metrics.json", out_dir / "summary.json"
    metrics_path.write_text(json.dumps(_clean(per_key), indent=1))
    summary_path.write_text(json.dumps(_clean(summary), indent=1))
    if mlflow_run_id:
        import mlflow

        quiet_mlflow_logs()
        client = mlflow.MlflowClient(default_tracking_uri())  # the project's store, as training's
        for p in (*figures, metrics_path, summary_path):
            client.log_artifact(mlflow_run_id, str(p), artifact_path="attention")
    return {"figures": figures, "metrics": per_key, "summary": summary}
