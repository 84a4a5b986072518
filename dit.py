"""
Stage 2: the class-conditional Diffusion Transformer (DiT) that generates DGAE latents.

This file also holds the two small pieces every network in the repository shares:
`attention` (the one self-attention implementation, used by the DiT blocks and by the stage-1
U-Net's attention layers) and `timestep_embedding` (the sinusoidal embedding of the diffusion time).
"""

import math

import torch
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# shared building blocks


def attention(q, k, v, impl="math"):
    """Multi-head scaled dot-product attention, softmax(q k^T / sqrt(d)) v.

    q, k, v: (B, nh, T, hs). Returns (B, nh, T, hs).
    impl="math" is the readable reference: plain matmuls with the softmax in fp32 (under bf16
    autocast the logits would otherwise lose precision). It has no data-dependent Python control
    flow, so torch.compile captures it whole and fuses it into a few GPU kernels.
    impl="sdpa" calls F.scaled_dot_product_attention, PyTorch's fused (flash / memory-efficient)
    kernel. Both compute the same function; tests check they agree, forward and backward.
    """
    if impl == "sdpa":
        return F.scaled_dot_product_attention(q, k, v)
    if impl != "math":
        raise ValueError(f"unknown attention impl {impl!r}; use 'math' or 'sdpa'")
    scale = 1.0 / math.sqrt(q.shape[-1])
    att = (q @ k.transpose(-2, -1)) * scale  # (B, nh, T, T)
    att = att.float().softmax(dim=-1).to(v.dtype)  # softmax in fp32, then back to the compute dtype
    return att @ v  # (B, nh, T, hs)


def timestep_embedding(t, dim, max_period=10000.0):
    """Sinusoidal embedding of the diffusion time t, as in the Transformer position encoding.

    t: (B,) floats in [0, 1] (rectified-flow time). We multiply by 1000 first so that the
    frequencies see the same range as the integer-timestep models this embedding was designed for;
    without it, t in [0, 1] would barely move the low frequencies.
    Returns (B, dim).
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = (t.float() * 1000.0)[:, None] * freqs[None, :]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, 2*half)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb
