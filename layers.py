"""
The four small pieces that both stages' networks are built from. Neither stage imports the other's
model: the DGAE decoder and encoder (decoder_diffusion.py, ae.py) and the DiT (dit.py) all build on
this file, which is why it is the first to read.

1. `attention`: multi-head scaled dot-product attention, the one used by every self-attention layer
   of the repository (the U-Net's and the encoder's, and every DiT block's);
2. `timestep_embedding`: the sinusoidal features of the diffusion time t, which both denoisers (the
   U-Net and the DiT) turn into the vector that conditions each of their blocks on the noise level;
3. `checkpointed`: how training saves activation memory (activation checkpointing of one block);
4. `no_autograd`: how decoding and sampling save autograd's work (inference mode).
"""

import functools
import math

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# -----------------------------------------------------------------------------
# attention and the time embedding


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
        # the flash and memory-efficient kernels need a unit stride in the last dimension (the U-Net's
        # q, k, v from an NCHW tensor have stride H*W there): otherwise SDPA falls back, silently, to
        # its math kernel, which copies anyway
        q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
        return F.scaled_dot_product_attention(q, k, v)
    if impl != "math":
        raise ValueError(f"unknown attention impl {impl!r}; use 'math' or 'sdpa'")
    scale = 1.0 / math.sqrt(q.shape[-1])
    att = (q @ k.transpose(-2, -1)) * scale  # (B, nh, T, T)
    # softmax in (at least) fp32, then back to the compute dtype
    att = att.to(torch.promote_types(att.dtype, torch.float32)).softmax(dim=-1).to(v.dtype)
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


# -----------------------------------------------------------------------------
# the two ways the models save work: activation checkpointing in training, inference mode outside it


def checkpointed(module, on, *args):
    """module(*args); if `on` and autograd is recording, through activation checkpointing.

    Training keeps every activation of the forward pass for the backward. Checkpointing a block
    keeps only its inputs instead, and runs the block's forward again during the backward to get
    the rest back: the step costs one more forward pass of the checkpointed blocks (about a third
    more compute, a backward being about two forwards) and needs far less activation memory, which
    is what lets a large model at 256 px train at a useful batch on a small GPU.
    The gradients are exactly those of the plain forward. The replay runs the same operations on
    the same inputs, and the random-number state is handled by checkpoint's default
    preserve_rng_state: the CPU (and the inputs' GPU) RNG state is saved when the block first runs,
    restored for the replay, so a dropout mask is drawn again identically, and put back afterwards,
    so the RNG stream (which checkpoints save for an exact --resume) continues as if nothing had been
    replayed. use_reentrant=False is the implementation torch recommends; it works under DDP and
    torch.compile. Under no_grad or inference_mode (the EMA, decoding, sampling) nothing is stored
    for a backward anyway, so the block simply runs.
    """
    if on and torch.is_grad_enabled():
        return checkpoint(module, *args, use_reentrant=False)
    return module(*args)


# Decoding and sampling never need gradients, so they run under torch.inference_mode: like no_grad,
# and the tensors made inside also skip autograd's bookkeeping (version counters, view tracking).
# The price: such a tensor may never enter autograd later, nor be changed in place outside inference
# mode. What they return only goes to grids, metrics and files, never back into training.
def no_autograd(fn):
    """Decorator: fn runs under torch.inference_mode."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        with torch.inference_mode():
            return fn(*args, **kwargs)

    return run
