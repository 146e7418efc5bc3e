"""What a pre-trained ViT learned, patch by patch: CLS attention, DINO attention masks, token embeddings.

For each requested patch, one PNG (``OUT/<key>.png``) shows the input as a person reads it (S1 VV/VH
false colour, S2 true colour, the simplified IGBP land-cover map), the last-layer CLS attention of every
head and their mean, the DINO paper's thresholded masks (per head, the smallest set of patches holding
``keep_mass`` of the attention), and the patch tokens as a map: their first three principal components as
RGB and their k-means clusters. Where the patch has land cover, the clusters and masks are scored against
it (``segmentation_metrics.matched_miou``, Hungarian-matched mIoU), and the numbers go into the figure
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

from eossl.ingest.bands import IGBP_SIMPLE_CLASSES, S2, igbp_to_simple_lut
from eossl.ingest.format import ZARR_DIR
from eossl.ingest.storage import Output
from eossl.streaming.inputs import InputSpec, parse_sensors
from eossl.streaming.zarr_dataset import ZarrPatchDataset
from eossl.train.vit import is_vit, last_self_attention, patch_grid, patch_tokens

from .models import EvalEncoder, build_eval_encoder
from .segmentation_metrics import matched_miou

__all__ = ["LC_COLOURS", "attention_figures", "keep_mass_masks", "kmeans", "token_pca_rgb", "upsample_tokens"]

# One fixed colour per simplified IGBP class (index = class code; 0 = no data), after the MODIS MCD12Q1
# palette, so the same class has the same colour in every figure.
LC_COLOURS: tuple[str, ...] = ("#000000", "#05450a", "#c6b044", "#fbff13", "#b6ff05", "#27ff87", "#c24f44",
                               "#a5a5a5", "#69fff8", "#f9ffa4", "#1c0dff")
_N_LC = len(IGBP_SIMPLE_CLASSES)

DEFINITIONS: dict[str, str] = {
    "attention": "CLS row of the last block's softmax attention, patch columns only, renormalised to sum 1",
    "mask": "per head, the smallest set of patches holding keep_mass of its attention",
    "attention_miou": "each head's mask vs its complement as 2 clusters, Hungarian-matched mIoU vs simplified "
                      "IGBP over the classes present; best head and mean over heads",
    "kmeans_miou": "k-means (k-means++, seed 0, 50 iterations) of the final-norm patch tokens, nearest-upsampled, "
                   "Hungarian-matched mIoU",
    "kmeans_input_baseline_miou": "the same k-means on the model input averaged over each token's pixels",
}


# ----------------------------------------------------------------------------------------------- maps
def kmeans(x: np.ndarray, k: int, seed: int = 0, iters: int = 50) -> np.ndarray:
    """Seeded k-means (k-means++ init, ``iters`` Lloyd steps, float64) -> labels (N,) int64.

    Clusters are numbered by size, largest first, so colours are comparable between patches. An empty
    cluster restarts at the point worst fitted by its centre (standard; keeps k clusters).
    """
    x = np.asarray(x, dtype=np.float64)
    n = len(x)
    if not 1 <= k <= n:
        raise ValueError(f"k-means needs 1 <= k <= {n} points, got k={k}")
    rng = np.random.default_rng(seed)
    centres = np.empty((k, x.shape[1]))
    centres[0] = x[rng.integers(n)]
    d2 = ((x - centres[0]) ** 2).sum(1)
    for j in range(1, k):  # k-means++: next centre drawn with probability proportional to D^2
        total = d2.sum()
        centres[j] = x[rng.choice(n, p=d2 / total) if total > 0 else rng.integers(n)]
        d2 = np.minimum(d2, ((x - centres[j]) ** 2).sum(1))

    def assign(c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        dist = np.maximum((x ** 2).sum(1)[:, None] - 2 * x @ c.T + (c ** 2).sum(1)[None], 0.0)
        return dist.argmin(1), dist.min(1)

    for _ in range(iters):
        labels, best = assign(centres)
        new = centres.copy()
        worst = iter(np.argsort(-best, kind="stable"))
        for j in range(k):
            members = labels == j
            new[j] = x[members].mean(0) if members.any() else x[next(worst)]
        if np.array_equal(new, centres):  # converged: further iterations change nothing
            break
        centres = new
    labels, _ = assign(centres)
    order = np.argsort(-np.bincount(labels, minlength=k), kind="stable")
    return np.argsort(order)[labels].astype(np.int64)


def token_pca_rgb(tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Tokens (N, D) -> (N, 3) first three principal components, each min-max scaled to [0, 1], and
    their share of the variance (3,). Signs are fixed (largest loading positive) so reruns agree."""
    x = np.asarray(tokens, dtype=np.float64)
    xc = x - x.mean(0)
    _, s, vt = np.linalg.svd(xc, full_matrices=False)
    m = min(3, len(s))
    vt = vt[:m] * np.sign(vt[np.arange(m), np.abs(vt[:m]).argmax(1)])[:, None]
    comps = np.zeros((len(x), 3))
    comps[:, :m] = xc @ vt.T
    lo, hi = comps.min(0), comps.max(0)
    rgb = np.where(hi > lo, (comps - lo) / np.where(hi > lo, hi - lo, 1.0), 0.5)
    var = np.zeros(3)
    var[:m] = s[:m] ** 2 / max((s ** 2).sum(), 1e-300)
    return rgb, var


def keep_mass_masks(attention: np.ndarray, keep_mass: float) -> np.ndarray:
    """(heads, N) attention -> bool (heads, N): per head the smallest set of tokens holding ``keep_mass``
    of the head's attention mass (DINO's thresholded attention; ties broken by token order)."""
    if not 0.0 < keep_mass <= 1.0:
        raise ValueError(f"keep_mass must be in (0, 1], got {keep_mass}")
    a = np.asarray(attention, dtype=np.float64)
    masks = np.zeros(a.shape, dtype=bool)
    for h, row in enumerate(a):
        order = np.argsort(-row, kind="stable")
        cum = np.cumsum(row[order])
        n_keep = min(int(np.searchsorted(cum, keep_mass * cum[-1] * (1 - 1e-12))) + 1, len(row))
        masks[h, order[:n_keep]] = True
    return masks


def upsample_tokens(grid: np.ndarray, patch: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
    """Nearest upsampling of a token map (..., gh, gw) to pixels (..., H, W): pixel (i, j) takes the
    token whose ``patch``-sized cell holds it (pixels past the last full cell take the last token)."""
    gh, gw = grid.shape[-2:]
    iy = np.minimum(np.arange(size[0]) // patch[0], gh - 1)
    ix = np.minimum(np.arange(size[1]) // patch[1], gw - 1)
    return grid[..., iy[:, None], ix[None, :]]


def _stretch(band: np.ndarray) -> np.ndarray:
    """2-98 percentile stretch to [0, 1] over the finite pixels; non-finite pixels become 0."""
    ok = np.isfinite(band)
    if not ok.any():
        return np.zeros(band.shape)
    lo, hi = np.percentile(band[ok], [2, 98])
    out = np.clip((band - lo) / (hi - lo if hi > lo else 1.0), 0, 1)
    return np.where(ok, out, 0.0)


def s1_composite(s1: np.ndarray) -> np.ndarray:
    """(2, H, W) VV, VH in dB -> (H, W, 3): R = VV, G = VH, B = VV - VH (the ratio, in dB)."""
    vv, vh = s1.astype(np.float64)
    return np.dstack([_stretch(vv), _stretch(vh), _stretch(vv - vh)])


def s2_true_colour(s2: np.ndarray) -> np.ndarray:
    """(13, H, W) stored S2 -> (H, W, 3) B4, B3, B2 each stretched to its 2-98 percentile."""
    return np.dstack([_stretch(s2[S2.bands.index(b)].astype(np.float64)) for b in ("B4", "B3", "B2")])


# ---------------------------------------------------------------------------------------------- model
def _input_spec(card: dict, inputs: str | None) -> InputSpec:
    """The model's input: the card's view0 sensors by default, bands and S1 clip as the model saw them."""
    views = list(card["inputs"].values())
    sensors = tuple(views[0]["sensors"]) if inputs is None else parse_sensors(inputs)
    s2_view = next((v for v in views if "s2" in v["sensors"]), None)
    s1_view = next((v for v in views if "s1" in v["sensors"]), None)
    clip = s1_view.get("s1_clip") if s1_view else (-25.0, 0.0)
    return InputSpec(sensors, tuple(s2_view["s2_bands"]) if s2_view else "land", tuple(clip) if clip else None)


def _load_model(run_dir: str, card: dict, channels: list[str], mean: np.ndarray, std: np.ndarray,
                device: torch.device) -> EvalEncoder:
    ev = build_eval_encoder("checkpoint", channels, mean, std, run_dir)
    backbone = ev.encoder.backbone
    if not is_vit(backbone):
        raise ValueError(f"{card['timm_model']} from {run_dir} is not a ViT: attention maps need a transformer")
    # The card's timm arguments (dynamic_img_size: the full 256 px patch goes in). When the encoder was
    # built without them, rebuild the backbone with them and move the weights over.
    extra = {k: v for k, v in (card.get("timm_kwargs") or {}).items() if k not in ("in_chans", "num_classes")}
    if any(getattr(backbone, k, v) != v for k, v in extra.items()):
        import timm

        rebuilt = timm.create_model(card["timm_model"], pretrained=False, num_classes=0,
                                    in_chans=ev.encoder.in_chans, **extra)
        rebuilt.load_state_dict(backbone.state_dict())
        ev.encoder.backbone = rebuilt
    ev.encoder.eval().to(device)
    return ev


@torch.no_grad()
def _patch_maps(ev: EvalEncoder, x: torch.Tensor) -> dict:
    """One standardised input (C, H, W) -> CLS attention (heads, gh, gw), tokens (N, D), grid, patch."""
    backbone = ev.encoder.backbone
    h, w = x.shape[-2:]
    if not getattr(backbone, "dynamic_img_size", False) and tuple(backbone.patch_embed.img_size) != (h, w):
        backbone.set_input_size(img_size=(h, w))  # no timm_kwargs in the card: resample pos. embeddings once
    xin = ev.encoder.adapt(ev.prepare(x[None]), ev.sensor)
    attn = last_self_attention(backbone, xin)[0].float().cpu().numpy()  # (heads, N_all, N_all)
    tokens = patch_tokens(backbone, xin)[0].float().cpu().numpy()  # (N, D)
    gh, gw = patch_grid(backbone, h, w)
    cls = attn[:, 0, backbone.num_prefix_tokens:]  # (heads, N): CLS row, patch columns
    if cls.shape[1] != gh * gw or tokens.shape[0] != gh * gw:
        raise ValueError(f"expected {gh}x{gw} patch tokens, got {cls.shape[1]} attention columns, {len(tokens)} tokens")
    to_patches = cls.sum(1)  # share of the CLS attention that goes to patches (rest: CLS, registers)
    cls = cls / to_patches[:, None]
    return {"attention": cls.reshape(-1, gh, gw), "tokens": tokens, "grid": (gh, gw),
            "patch": tuple(backbone.patch_embed.patch_size), "cls_to_patches": to_patches}


# ------------------------------------------------------------------------------------------- scoring
def _score(maps: dict, masks: np.ndarray, clusters: np.ndarray, base_clusters: np.ndarray,
           lc: np.ndarray) -> dict:
    """Agreement with the land-cover map lc (H, W) of simplified codes; masks (heads+1, gh, gw) with the
    mask of the head-mean attention last; clusters, base_clusters (gh, gw)."""
    up = lambda m: upsample_tokens(m, maps["patch"], lc.shape)  # noqa: E731
    heads = [matched_miou(up(m).astype(np.int64), lc, _N_LC)["miou"] for m in masks[:-1]]
    best = int(np.argmax(heads))
    return {
        "lc_classes_present": sorted(int(c) for c in np.unique(lc) if c),
        "kmeans": matched_miou(up(clusters), lc, _N_LC),
        "kmeans_input_baseline": matched_miou(up(base_clusters), lc, _N_LC),
        "attention": {"per_head_miou": heads, "best_head": best, "best_miou": heads[best],
                      "mean_miou": float(np.mean(heads)),
                      "mean_attention_miou": matched_miou(up(masks[-1]).astype(np.int64), lc, _N_LC)["miou"]},
    }


def _analyse(maps: dict, x: np.ndarray, lc: np.ndarray | None, keep_mass: float, n_clusters: int) -> dict:
    """Masks, token clusters, PCA and (with lc) agreement scores of one patch; x is the standardised input."""
    heads, gh, gw = maps["attention"].shape
    flat = maps["attention"].reshape(heads, -1)
    # masks: (heads + 1, gh, gw), the mask of the head-mean attention last
    masks = keep_mass_masks(np.concatenate([flat, flat.mean(0, keepdims=True)]), keep_mass).reshape(-1, gh, gw)
    k = min(n_clusters, gh * gw)
    clusters = kmeans(maps["tokens"], k, seed=0).reshape(gh, gw)
    ph, pw = maps["patch"]
    cells = x[:, : gh * ph, : gw * pw].reshape(len(x), gh, ph, gw, pw).mean((2, 4))  # (C, gh, gw) cell means
    base_clusters = kmeans(cells.reshape(len(x), -1).T, k, seed=0).reshape(gh, gw)
    pca, var = token_pca_rgb(maps["tokens"])
    scores = _score(maps, masks, clusters, base_clusters, lc) if lc is not None else None
    entry = {"has_lc": scores is not None, "grid": [gh, gw], "heads": heads, "n_clusters": k,
             "mask_area_fraction": masks.reshape(heads + 1, -1).mean(1).tolist(),
             "cls_to_patches": maps["cls_to_patches"].tolist(), "pca_variance": var.tolist()}
    if scores:
        entry["agreement"] = scores
    return {"masks": masks, "clusters": clusters, "pca": pca, "var": var, "scores": scores, "entry": entry}


def _caption(scores: dict | None) -> str:
    if not scores:
        return "no land-cover map for this patch: no agreement scores"
    a = scores["attention"]
    return (f"LC agreement, Hungarian-matched mIoU over the {len(scores['lc_classes_present'])} classes "
            f"present: token k-means {scores['kmeans']['miou']:.2f} (input k-means baseline "
            f"{scores['kmeans_input_baseline']['miou']:.2f}); attention masks best head {a['best_head']} "
            f"{a['best_miou']:.2f}, mean over heads {a['mean_miou']:.2f}")


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


# ------------------------------------------------------------------------------------------- figure
def _plot(path: Path, title: str, raw: dict, maps: dict, res: dict, keep_mass: float) -> None:
    """The figure of one patch: raw stored arrays, model maps and their analysis (``_analyse``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import BoundaryNorm, ListedColormap
    from matplotlib.patches import Patch

    att = maps["attention"]
    heads = len(att)
    masks, clusters, pca, var, scores = (res[k] for k in ("masks", "clusters", "pca", "var", "scores"))
    size = raw["s1"].shape[-2:] if raw["s1"] is not None else raw["s2"].shape[-2:]
    up = lambda m: upsample_tokens(m, maps["patch"], size)  # noqa: E731
    ncols = min(max(6, heads + 1), 7)
    rows_att = math.ceil((heads + 1) / ncols)
    panel = 16.0 / ncols
    fig = plt.figure(figsize=(16, panel * (1 + 2 * rows_att) * 1.08 + 0.9), dpi=110, layout="constrained")
    fig.suptitle(title, fontsize=11)
    sub = fig.subfigures(3, 1, height_ratios=[1.15, rows_att, rows_att])
    top = sub[0].subplots(1, ncols, squeeze=False)[0]
    att_ax = sub[1].subplots(rows_att, ncols, squeeze=False).ravel()
    mask_ax = sub[2].subplots(rows_att, ncols, squeeze=False).ravel()
    for ax in (*top, *att_ax, *mask_ax):
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_axis_off()
    sub[0].suptitle("input and patch-token embeddings", fontsize=10, fontweight="bold")
    sub[1].suptitle("last-layer CLS attention over patches (x uniform: 1 = every patch equal)",
                    fontsize=10, fontweight="bold")
    sub[2].suptitle(f"thresholded attention: per head the smallest set of patches holding {keep_mass:.0%} of "
                    "its attention (dimmed: outside the mask)", fontsize=10, fontweight="bold")

    def show(ax, img, text, **kw):
        ax.set_axis_on()
        im = ax.imshow(img, interpolation="nearest", **kw)
        ax.set_title(text, fontsize=8.5)
        return im

    def missing(ax, text):  # a blank panel of the same size, so the grid stays aligned
        show(ax, np.full((*size, 3), 0.96), "")
        ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=9, color="0.35", transform=ax.transAxes)

    s1_rgb = s1_composite(raw["s1"]) if raw["s1"] is not None else None
    s2_rgb = s2_true_colour(raw["s2"]) if raw["s2"] is not None else None
    if s1_rgb is not None:
        show(top[0], s1_rgb, "S1 false colour\nR=VV, G=VH, B=VV-VH (dB), 2-98 %")
    else:
        missing(top[0], "no S1 for this patch")
    if s2_rgb is not None:
        show(top[1], s2_rgb, "S2 true colour\nB4, B3, B2, 2-98 %")
    else:
        missing(top[1], "no S2 for this patch")
    lc_cmap = ListedColormap(LC_COLOURS)
    lc_norm = BoundaryNorm(np.arange(-0.5, len(LC_COLOURS)), len(LC_COLOURS))
    if raw["lc"] is not None:
        lc = raw["lc"]
        show(top[2], lc, "land cover (IGBP simplified)", cmap=lc_cmap, norm=lc_norm)
        codes, counts = np.unique(lc, return_counts=True)
        names = ("no data", *IGBP_SIMPLE_CLASSES)
        handles = [Patch(facecolor=LC_COLOURS[c], edgecolor="0.3", label=f"{names[c]} {n / lc.size:.0%}")
                   for c, n in zip(codes, counts, strict=True)]
        top[2].legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.02), fontsize=7.5,
                      ncol=2, frameon=False, handlelength=1.2, columnspacing=0.8)
    else:
        missing(top[2], "no land cover\nfor this patch")
    show(top[3], np.moveaxis(up(pca.T.reshape(3, *maps["grid"])), 0, -1),
         f"tokens: PCA 1-3 as RGB\n({', '.join(f'{v:.0%}' for v in var)} of variance)")
    k = int(clusters.max()) + 1
    tab = plt.get_cmap("tab10" if k <= 10 else "tab20")
    km_cmap = ListedColormap([tab(i) for i in range(k)])
    im = show(top[4], up(clusters), f"tokens: k-means, k={k}" + (
        f"\nmIoU vs LC {scores['kmeans']['miou']:.2f}" if scores else ""),
        cmap=km_cmap, norm=BoundaryNorm(np.arange(-0.5, k), k))
    cb = sub[0].colorbar(im, ax=top[4], fraction=0.046, pad=0.03, ticks=range(k))
    cb.set_label("cluster", fontsize=8)
    cb.ax.tick_params(labelsize=7)
    if scores:
        matching = scores["kmeans"]["matching"]
        painted = np.vectorize(lambda c: matching.get(int(c), 0))(clusters)
        show(top[5], up(painted), "k-means clusters as their\nmatched LC class (black: unmatched)",
             cmap=lc_cmap, norm=lc_norm)
    else:
        missing(top[5], "no land cover:\nno cluster matching")

    base = s1_rgb if s1_rgb is not None and "s1" in raw["model_sensors"] else s2_rgb
    base = base if base is not None else np.full((*size, 3), 0.6)
    mean_att = att.mean(0)
    n_tok = att.shape[1] * att.shape[2]
    per_head = scores["attention"]["per_head_miou"] if scores else None
    for h in range(heads + 1):
        a, label = (att[h], f"head {h}") if h < heads else (mean_att, "mean over heads")
        # Colour range per panel (the colour bar gives it): a near-uniform head still shows its structure.
        im = show(att_ax[h], up(a) * n_tok, label, cmap="inferno")
        cb = sub[1].colorbar(im, ax=att_ax[h], fraction=0.046, pad=0.03)
        cb.ax.tick_params(labelsize=7)
        cb.set_label("x uniform", fontsize=7)
        m = up(masks[h])[..., None]
        lines = [f"{label}: {m.mean():.0%} of area"]
        if scores:
            miou = per_head[h] if h < heads else scores["attention"]["mean_attention_miou"]
            best = " (best)" if h == scores["attention"]["best_head"] else ""
            lines.append(f"mask vs LC mIoU {miou:.2f}{best}")
        show(mask_ax[h], base * np.where(m, 1.0, 0.25), "\n".join(lines))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------- entry
def attention_figures(run_dir: str, dataset: str, keys: Sequence[str], out: str, *, keep_mass: float = 0.6,
                      n_clusters: int = 6, inputs: str | None = None, mlflow_run_id: str | None = None,
                      draw: bool = True) -> dict:
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
            tracking URI comes from the environment (MLFLOW_TRACKING_URI).
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
    card_path = Path(run_dir) / "backbone" / "model_card.json"
    if not card_path.exists():
        raise FileNotFoundError(f"{card_path} not found: not a finished eossl pre-training run")
    card = json.loads(card_path.read_text())
    group = zarr.open_group(Output(dataset).zarr_store(ZARR_DIR, read_only=True), mode="r")
    all_keys = [str(k) for k in group["key"][:]]
    row_of = {k: i for i, k in enumerate(all_keys)}
    unknown = [k for k in keys if k not in row_of]
    if unknown:
        raise ValueError(f"unknown patch keys {unknown[:5]} in {dataset}; valid keys include "
                         f"{', '.join(all_keys[:5])} ({len(all_keys)} in all)")
    spec = _input_spec(card, inputs)
    ds = ZarrPatchDataset(dataset, spec, rows=[row_of[k] for k in keys], label=None)
    if len(ds) != len(keys):
        lacking = sorted(set(keys) - set(ds.keys.tolist()))
        raise ValueError(f"patches {lacking[:5]} lack the model input {spec.sensors} ({ds.excluded})")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ev = _load_model(run_dir, card, spec.channel_names, ds.mean, ds.std, device)
    has = {m: group[f"has_{m}"][:] for m in ("s1", "s2", "lc")}
    lut = igbp_to_simple_lut()
    model_text = (f"{card.get('method', '?')} {card['timm_model']} ({card.get('steps', '?')} steps, "
                  f"{Path(run_dir).name}), input {', '.join(spec.channel_names)}")
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    figures, per_key = [], {}
    for i, key in enumerate(keys):
        row = row_of[key]
        raw = {m: np.asarray(group[m][row]) if has[m][row] else None for m in ("s1", "s2", "lc")}
        if raw["lc"] is not None:  # IGBP band -> simplified codes; an all-no-data map scores nothing
            raw["lc"] = lut[raw["lc"][0]]
            raw["lc"] = raw["lc"] if raw["lc"].any() else None
        raw["model_sensors"] = spec.sensors
        x = ds[i]["x"].to(device)
        maps = _patch_maps(ev, x)
        res = _analyse(maps, x.cpu().numpy(), raw["lc"], keep_mass, n_clusters)
        per_key[key] = {"row": row, **res["entry"]}
        if draw:
            path = out_dir / f"{key}.png"
            _plot(path, f"{key}  |  {model_text}\n{_caption(res['scores'])}", raw, maps, res, keep_mass)
            figures.append(str(path))

    scored = [e["agreement"] for e in per_key.values() if "agreement" in e]
    mean = lambda vals: float(np.nanmean(vals)) if vals else None  # noqa: E731
    summary = {
        "run_dir": str(run_dir), "dataset": str(dataset), "timm_model": card["timm_model"],
        "method": card.get("method"), "channels": spec.channel_names, "keep_mass": keep_mass,
        "n_clusters": n_clusters, "patches": len(keys), "patches_with_lc": len(scored),
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

        client = mlflow.MlflowClient()  # tracking URI from MLFLOW_TRACKING_URI
        for p in (*figures, metrics_path, summary_path):
            client.log_artifact(mlflow_run_id, str(p), artifact_path="attention")
    return {"figures": figures, "metrics": per_key, "summary": summary}
