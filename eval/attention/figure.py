"""The figure of one patch: what a person reads (S1, S2, land cover) beside what the ViT's maps show.

Display only: the numbers in it come from the analysis (``PatchMaps``, ``PatchAnalysis``); the input
panels read the stored values (raw dB and reflectance), each stretched to its 2-98 percentiles.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from eossl.ingest.bands import IGBP_SIMPLE_CLASSES, S2

from .maps import PatchAnalysis, PatchMaps, upsample_tokens

__all__ = ["LC_COLOURS", "RawPatch", "caption", "plot_patch", "s1_composite", "s2_true_colour"]

# One fixed colour per simplified IGBP class (index = class code; 0 = no data), after the MODIS MCD12Q1
# palette, so the same class has the same colour in every figure.
LC_COLOURS: tuple[str, ...] = (
    "#000000",
    "#05450a",
    "#c6b044",
    "#fbff13",
    "#b6ff05",
    "#27ff87",
    "#c24f44",
    "#a5a5a5",
    "#69fff8",
    "#f9ffa4",
    "#1c0dff",
)


@dataclass(frozen=True)
class RawPatch:
    """The stored arrays of one patch as drawn (None: the patch lacks that layer).

    Attributes:
        s1: (2, H, W) VV, VH in dB.
        s2: (13, H, W) stored S2 reflectance.
        lc: (H, W) simplified IGBP codes (0 = no data); None also when the map is all no-data.
        model_sensors: the sensors the model read (the masks are drawn over S1 when it read S1).
    """

    s1: np.ndarray | None
    s2: np.ndarray | None
    lc: np.ndarray | None
    model_sensors: tuple[str, ...]


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


def caption(scores: dict | None) -> str:
    """The figure title's second line: the agreement scores in words."""
    if not scores:
        return "no land-cover map for this patch: no agreement scores"
    a = scores["attention"]
    return (
        f"LC agreement, Hungarian-matched mIoU over the {len(scores['lc_classes_present'])} classes "
        f"present: token k-means {scores['kmeans']['miou']:.2f} (input k-means baseline "
        f"{scores['kmeans_input_baseline']['miou']:.2f}); attention masks best head {a['best_head']} "
        f"{a['best_miou']:.2f}, mean over heads {a['mean_miou']:.2f}"
    )


def plot_patch(
    path: Path, title: str, raw: RawPatch, maps: PatchMaps, analysis: PatchAnalysis, keep_mass: float
) -> None:
    """The figure of one patch: raw stored arrays, the model's maps and their analysis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import BoundaryNorm, ListedColormap
    from matplotlib.patches import Patch

    att = maps.attention
    heads = len(att)
    masks, clusters, pca, var, scores = (
        analysis.masks,
        analysis.clusters,
        analysis.pca,
        analysis.variance,
        analysis.scores,
    )
    size = raw.s1.shape[-2:] if raw.s1 is not None else raw.s2.shape[-2:]
    up = lambda m: upsample_tokens(m, maps.patch, size)  # noqa: E731
    ncols = min(max(6, heads + 1), 7)
    rows_att = math.ceil((heads + 1) / ncols)
    panel = 16.0 / ncols
    band = 0.16  # height of a row-title band, in panel heights
    fig = plt.figure(
        figsize=(16, panel * (1.3 + 2 * rows_att + 3 * band) * 1.08 + 0.9), dpi=110, layout="constrained"
    )
    fig.suptitle(title, fontsize=11)
    # Each row's title has a band of its own: a title drawn over the row (a subfigure's suptitle) collides
    # with the two-line panel titles below it, and the land-cover legend hangs into the next row.
    sub = fig.subfigures(6, 1, height_ratios=[band, 1.3, band, rows_att, band, rows_att])
    row_titles = (
        "input and patch-token embeddings",
        "last-layer CLS attention over patches (x uniform: 1 = every patch equal)",
        f"thresholded attention: per head the smallest set of patches holding {keep_mass:.0%} of "
        "its attention (dimmed: outside the mask)",
    )
    for band_fig, text in zip(sub[0::2], row_titles, strict=True):
        band_fig.text(0.5, 0.3, text, ha="center", va="center", fontsize=10, fontweight="bold")
    sub = sub[1::2]
    top = sub[0].subplots(1, ncols, squeeze=False)[0]
    att_ax = sub[1].subplots(rows_att, ncols, squeeze=False).ravel()
    mask_ax = sub[2].subplots(rows_att, ncols, squeeze=False).ravel()
    for ax in (*top, *att_ax, *mask_ax):
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_axis_off()

    def show(ax, img, text, **kw):
        ax.set_axis_on()
        im = ax.imshow(img, interpolation="nearest", **kw)
        ax.set_title(text, fontsize=8.5)
        return im

    def missing(ax, text):  # a blank panel of the same size, so the grid stays aligned
        show(ax, np.full((*size, 3), 0.96), "")
        ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=9, color="0.35", transform=ax.transAxes)

    s1_rgb = s1_composite(raw.s1) if raw.s1 is not None else None
    s2_rgb = s2_true_colour(raw.s2) if raw.s2 is not None else None
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
    if raw.lc is not None:
        lc = raw.lc
        show(top[2], lc, "land cover (IGBP simplified)", cmap=lc_cmap, norm=lc_norm)
        codes, counts = np.unique(lc, return_counts=True)
        names = ("no data", *IGBP_SIMPLE_CLASSES)
        handles = [
            Patch(facecolor=LC_COLOURS[c], edgecolor="0.3", label=f"{names[c]} {n / lc.size:.0%}")
            for c, n in zip(codes, counts, strict=True)
        ]
        top[2].legend(
            handles=handles,
            loc="upper center",
            bbox_to_anchor=(0.5, -0.02),
            fontsize=7.5,
            ncol=2,
            frameon=False,
            handlelength=1.2,
            columnspacing=0.8,
        )
    else:
        missing(top[2], "no land cover\nfor this patch")
    show(
        top[3],
        np.moveaxis(up(pca.T.reshape(3, *maps.grid)), 0, -1),
        f"tokens: PCA 1-3 as RGB\n({', '.join(f'{v:.0%}' for v in var)} of variance)",
    )
    k = int(clusters.max()) + 1
    tab = plt.get_cmap("tab10" if k <= 10 else "tab20")
    km_cmap = ListedColormap([tab(i) for i in range(k)])
    im = show(
        top[4],
        up(clusters),
        f"tokens: k-means, k={k}" + (f"\nmIoU vs LC {scores['kmeans']['miou']:.2f}" if scores else ""),
        cmap=km_cmap,
        norm=BoundaryNorm(np.arange(-0.5, k), k),
    )
    cb = sub[0].colorbar(im, ax=top[4], fraction=0.046, pad=0.03, ticks=range(k))
    cb.set_label("cluster", fontsize=8)
    cb.ax.tick_params(labelsize=7)
    if scores:
        matching = scores["kmeans"]["matching"]
        painted = np.vectorize(lambda c: matching.get(int(c), 0))(clusters)
        show(
            top[5],
            up(painted),
            "k-means clusters as their\nmatched LC class (black: unmatched)",
            cmap=lc_cmap,
            norm=lc_norm,
        )
    else:
        missing(top[5], "no land cover:\nno cluster matching")

    base = s1_rgb if s1_rgb is not None and "s1" in raw.model_sensors else s2_rgb
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
