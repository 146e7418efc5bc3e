"""What a pre-trained ViT learned, patch by patch (``eossl attention``).

``analysis`` rebuilds the model, takes its maps (``PatchMaps``), derives masks, clusters and scores
(``PatchAnalysis``) and writes the metrics; ``figure`` draws one patch from those records; ``maps`` holds
the pure map functions both use.
"""

from .analysis import DEFINITIONS, attention_figures
from .figure import LC_COLOURS, s1_composite, s2_true_colour
from .maps import PatchAnalysis, PatchMaps, keep_mass_masks, kmeans, token_pca_rgb, upsample_tokens

__all__ = [
    "DEFINITIONS",
    "LC_COLOURS",
    "PatchAnalysis",
    "PatchMaps",
    "attention_figures",
    "keep_mass_masks",
    "kmeans",
    "s1_composite",
    "s2_true_colour",
    "token_pca_rgb",
    "upsample_tokens",
]
