"""What a ViT backbone shows: last-layer self-attention and patch-token embeddings.

One place computes them from a timm VisionTransformer (no forward hooks spread around): the attention of
the last block is recomputed from its own ``qkv`` projection, exactly as the block computes it, and
token embeddings are ``forward_features`` without the prefix (CLS/register) tokens.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["is_vit", "last_self_attention", "patch_grid", "patch_tokens"]


def is_vit(model: nn.Module) -> bool:
    return hasattr(model, "blocks") and hasattr(model, "patch_embed") and hasattr(model.blocks[-1], "attn")


def patch_grid(model: nn.Module, height: int, width: int) -> tuple[int, int]:
    ph, pw = model.patch_embed.patch_size
    return height // ph, width // pw


@torch.no_grad()
def last_self_attention(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(B, heads, N, N) softmax attention of the last block; token 0.. are the prefix tokens (CLS first)."""
    if not is_vit(model):
        raise ValueError(f"{type(model).__name__} is not a ViT: attention maps need a transformer backbone")
    t = model.patch_embed(x)
    t = model._pos_embed(t)
    t = model.patch_drop(t)
    t = model.norm_pre(t)
    for block in model.blocks[:-1]:
        t = block(t)
    block = model.blocks[-1]
    y = block.norm1(t)
    attn = block.attn
    b, n, c = y.shape
    qkv = attn.qkv(y).reshape(b, n, 3, attn.num_heads, c // attn.num_heads).permute(2, 0, 3, 1, 4)
    q, k, _ = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    return ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)


@torch.no_grad()
def patch_tokens(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(B, N_patches, D) final-layer patch token embeddings (after the final norm)."""
    feats = model.forward_features(x)
    return feats[:, model.num_prefix_tokens :]
