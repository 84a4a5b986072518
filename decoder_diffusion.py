"""
The heart of DGAE: the decoder is a conditional diffusion model. Instead of mapping the latent z
straight to pixels, it starts from Gaussian noise and denoises it into the image, guided by z.

0. the pieces every network of the repository shares (ae.py and dit.py import them from here):
   attention, the sinusoidal time embedding, activation checkpointing;
1. the rectified-flow math (noising, velocity target, t sampling, the one-step estimate of the
   clean image, the Euler ODE sampler): plain functions of tensors, reused unchanged by the DiT;
2. the network blocks (time-modulated residual block, self-attention, down/up-sampling), from
   which the U-Net here and the encoder in ae.py are built;
3. the latent conditioning network ("latent decoder") that turns z into a feature map at every
   U-Net resolution, and the conditional U-Net denoiser itself.

Conventions: images x are in [-1, 1]; t in [0, 1] with t=0 the data and t=1 pure noise.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# -----------------------------------------------------------------------------
# 0. shared pieces: attention, the time embedding, activation checkpointing


def attention(q, k, v, impl="math"):
    """Multi-head scaled dot-product attention, softmax(q k^T / sqrt(d)) v; q, k, v and the
    result are (B, nh, T, hs).

    impl="math" is the readable reference: plain matmuls, the softmax in fp32 (bf16 autocast
    logits would lose precision), no data-dependent control flow, so torch.compile fuses it whole.
    impl="sdpa" is PyTorch's fused (flash / memory-efficient) kernel; tests check both agree.
    """
    if impl == "sdpa":
        # the fused kernels need a unit last-dim stride (the U-Net's q, k, v from an NCHW tensor
        # have stride H*W there); otherwise SDPA silently falls back to its copying math kernel
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
    """Sinusoidal embedding (B, dim) of the time t (B,) in [0, 1], as the Transformer's position
    encoding. t is scaled by 1000 first, to the range of the integer-timestep models it was designed
    for: t in [0, 1] would barely move the low frequencies."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period)
                      * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = (t.float() * 1000.0)[:, None] * freqs[None, :]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, 2*half)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def checkpointed(module, on, *args):
    """module(*args); if `on` and autograd is recording, through activation checkpointing.

    A checkpointed block keeps only its inputs for the backward and reruns its forward there: about
    a third more compute for far less activation memory, which lets a large model at 256 px train
    at a useful batch on a small GPU. The gradients are exactly the plain forward's: checkpoint's
    default preserve_rng_state restores the RNG state for the replay (the same dropout mask) and
    puts it back after, so the RNG stream that checkpoints save for an exact --resume goes on as if
    nothing had been replayed. use_reentrant=False (torch's recommendation) works under DDP and
    torch.compile. Under no_grad (the EMA, decoding, sampling) the block simply runs.
    """
    if on and torch.is_grad_enabled():
        return checkpoint(module, *args, use_reentrant=False)
    return module(*args)


# -----------------------------------------------------------------------------
# 1. rectified flow. The paper states only "a conditional diffusion model"; rectified flow is our
# choice (README, "What the paper states and what we chose"): its straight path needs no noise
# schedule, and a few Euler steps already decode well, which keeps decoding cheap.
# The forward process is the straight line x_t = (1 - t) x + t eps from the data x to noise eps;
# its time derivative dx_t/dt = eps - x is the velocity the network learns to predict. Sampling
# integrates that ODE backwards from t=1 (noise) to t=0 (data).


def add_noise(x, eps, t):
    """x_t = (1 - t) x + t eps.   x, eps: (B, ...), t: (B,)."""
    t = t.view(-1, *([1] * (x.dim() - 1)))  # (B, 1, 1, 1) to broadcast over pixels
    return (1 - t) * x + t * eps


def velocity_target(x, eps):
    """v = d x_t / dt = eps - x: the regression target of the denoiser."""
    return eps - x


def x0_estimate(x_t, t, v_hat):
    """One-step estimate of the clean image, x0_hat = x_t - t v_hat; exact for the true velocity
    (x_t - t (eps - x) = x). The training loss puts LPIPS on this estimate, so the perceptual term
    shapes the decoder without running the whole sampler."""
    t = t.view(-1, *([1] * (x_t.dim() - 1)))
    return x_t - t * v_hat


def shift_t(t, shift):
    """t_s = shift * t / (1 + (shift - 1) * t): moves times towards the noise end when shift > 1.

    SD3's timestep shift, a monotone map of [0, 1] onto itself. Training and sampling apply the same
    shift, so the sampler's steps fall where training put its samples: with shift 3, logit-normal t
    has P(t > 0.9) = 14% instead of 1.4%, and a 10-step Euler grid starts 1 -> 0.96 -> 0.92.
    """
    return shift * t / (1 + (shift - 1) * t)


def sample_t(n, dist="logit_normal", device="cpu", shift=1.0, mean=0.0, std=1.0):
    """Training times t (n,) in (0, 1), from the global torch RNG (which checkpoints save).

    logit-normal (t = sigmoid(u), u ~ N(mean, std)) puts more samples mid-path, where the velocity
    is hardest to predict (Esser et al., SD3); uniform is the plain rectified-flow choice. A shift
    above 1 then moves them towards t = 1 (see shift_t).
    """
    if dist == "logit_normal":
        t = torch.sigmoid(torch.randn(n, device=device) * std + mean)
    elif dist == "uniform":
        t = torch.rand(n, device=device)
    else:
        raise ValueError(f"unknown t distribution {dist!r}; use 'logit_normal' or 'uniform'")
    return shift_t(t, shift) if shift != 1.0 else t


def flow_matching_loss(velocity_fn, x, t_dist="logit_normal", t_shift=1.0):
    """The rectified-flow training loss |v_hat - v|^2 on clean data x (B, ...): draws t and eps,
    builds x_t, asks velocity_fn(x_t, t) for v_hat and regresses it on v = eps - x. Returns
    (loss, x_t, t, v_hat). The DiT trains with it; DGAE.loss writes the same term out, because its
    U-Net call also serves the consistency term."""
    t = sample_t(x.shape[0], t_dist, x.device, t_shift)  # (B,)
    eps = torch.randn_like(x)
    x_t = add_noise(x, eps, t)
    v_hat = velocity_fn(x_t, t).float()
    return F.mse_loss(v_hat, velocity_target(x, eps)), x_t, t, v_hat


def euler_sample(velocity_fn, x1, steps, shift=1.0):
    """Integrate dx/dt = v(x, t) from t=1 (x1, pure noise) to t=0 with `steps` Euler steps,
    x_{t - dt} = x_t - dt * v(x_t, t), on a grid uniform in t before `shift` (the training shift,
    see shift_t). velocity_fn(x_t, t) takes t as a (B,) tensor. Deterministic: the same x1 gives
    the same x0. Autograd records every step: call it under torch.no_grad() to sample (as the
    scripts do), or without, to backpropagate through the sampler."""
    x = x1
    ts = shift_t(torch.linspace(1.0, 0.0, steps + 1, device=x1.device), shift)  # (steps + 1,)
    for i in range(steps):
        t = ts[i].expand(x.shape[0])  # (B,)
        v = velocity_fn(x, t)
        x = x + (ts[i + 1] - ts[i]) * v.to(x.dtype)  # dt is negative: we walk back towards the data
    return x


# -----------------------------------------------------------------------------
# 2. network blocks (shared with the encoder and the baseline decoder in ae.py)


def Norm(ch):
    """GroupNorm with 32 groups as in SD-VAE and ADM, but never fewer than 4 channels per group.

    The floor is our choice, for thin toy widths: GroupNorm(32, 32) subtracts each channel's spatial
    mean, exactly the colour the decoder must reproduce (docs/NOTES.md: +1.2 dB with four channels
    per group). Widths of 128 and more keep SD-VAE's 32 groups.
    """
    groups = math.gcd(32, ch)
    while groups > 1 and ch // groups < 4:
        groups //= 2
    return nn.GroupNorm(groups, ch, eps=1e-6)


class ResBlock(nn.Module):
    """Residual block: norm -> SiLU -> conv -> norm (modulated) -> SiLU -> conv, plus the skip.

    With the time embedding `emb` (the denoiser) the second norm is modulated, ADM's "scale-shift
    norm" h = norm(h) * (1 + scale) + shift with (scale, shift) linear in emb, so every block can
    behave differently at each noise level; without emb_dim, a plain SD-VAE residual block.
    """

    def __init__(self, in_ch, out_ch, emb_dim=None, dropout=0.0):
        super().__init__()
        self.norm1 = Norm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, 2 * out_ch) if emb_dim else None
        self.norm2 = Norm(out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x, emb=None):
        h = self.conv1(F.silu(self.norm1(x)))  # (B, out, H, W)
        h = self.norm2(h)
        if self.emb_proj is not None:
            # (B, out, 1, 1) each
            scale, shift = self.emb_proj(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
            h = h * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Spatial self-attention over the H*W positions, through the shared `attention`."""

    def __init__(self, ch, head_dim=64, attn_impl="math"):
        super().__init__()
        self.heads = max(1, ch // head_dim)
        self.norm = Norm(ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = nn.Conv2d(ch, ch, 1)
        self.attn_impl = attn_impl

    def forward(self, x, emb=None):
        B, C, H, W = x.shape
        # (B, 3, nh, hs, HW)
        qkv = self.qkv(self.norm(x)).reshape(B, 3, self.heads, C // self.heads, H * W)
        q, k, v = qkv.transpose(-1, -2).unbind(1)  # each (B, nh, HW, hs)
        h = attention(q, k, v, self.attn_impl)  # (B, nh, HW, hs)
        h = h.transpose(-1, -2).reshape(B, C, H, W)
        return x + self.proj(h)


class Downsample(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x):
        return self.conv(x)  # (B, C, H/2, W/2)


class Upsample(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))  # (B, C, 2H, 2W)


# -----------------------------------------------------------------------------
# 3. the conditional U-Net denoiser


class LatentDecoder(nn.Module):
    """Turns z (B, c, H/f, W/f) into {r: (B, ch, r, r)}, a feature map at every resolution r from
    H/f up to H: how z guides the diffusion decoder by default. The paper says only that z guides
    the decoder; how is our design (README, "What the paper states and what we chose"): a small
    conv decoder upsamples z step by step and the U-Net adds a projection of the map of matching
    size to its activations, so it gets z's content at every scale, not only as a tiny input.
    """

    def __init__(self, latent_channels, compression, ch):
        super().__init__()
        self.conv_in = nn.Conv2d(latent_channels, ch, 3, padding=1)
        self.blocks = nn.ModuleList([ResBlock(ch, ch)
                                     for _ in range(int(math.log2(compression)) + 1)])
        self.ups = nn.ModuleList([Upsample(ch) for _ in range(int(math.log2(compression)))])

    def forward(self, z):
        h = self.conv_in(z)  # (B, ch, H/f, W/f)
        feats = {}
        for i, block in enumerate(self.blocks):
            h = block(h)
            feats[h.shape[-1]] = h
            if i < len(self.ups):
                h = self.ups[i](h)  # doubles the resolution
        return feats


def _features_at(feats, r):
    """The latent-decoder map at resolution r, average-pooled below the latent's own resolution."""
    if r in feats:
        return feats[r]
    return F.adaptive_avg_pool2d(feats[min(feats)], r)


class UNet(nn.Module):
    """The denoiser v_hat = UNet(x_t, t, z), an ADM-style U-Net in pixel space.

    Down path: at each level `num_res_blocks` residual blocks, then a stride-2 conv; every block
    output is kept as a skip. Middle: res-attn-res. Up path: each block takes the matching skip
    (concatenated), then nearest-upsample + conv. Self-attention at the resolutions in `attn_res`.
    cond="latent_decoder" (default) adds the LatentDecoder's features at the start of every level;
    cond="concat" instead upsamples z (nearest) to the image size and concatenates it with x_t.
    """

    def __init__(self, latent_channels, compression, resolution, ch=64, ch_mult=(1, 2, 2),
                 num_res_blocks=2, attn_res=(8,), cond="latent_decoder", cond_ch=64, dropout=0.0,
                 attn_impl="math", extra_in=0):
        super().__init__()
        if cond not in ("latent_decoder", "concat"):
            raise ValueError(f"unknown cond {cond!r}; use 'latent_decoder' or 'concat'")
        self.cond = cond
        self.compression = compression
        self.ch = ch
        # `grad_checkpoint = True` checkpoints, in training, the latent decoder and every res,
        # attention and upsampling layer (see checkpointed): a switch of how training runs, not of
        # the model, so no constructor argument or checkpoint records it (--grad-checkpoint sets it)
        self.grad_checkpoint = False
        emb_dim = 4 * ch  # the time embedding that modulates every ResBlock
        self.time_mlp = nn.Sequential(nn.Linear(ch, emb_dim), nn.SiLU(),
                                      nn.Linear(emb_dim, emb_dim))
        # concat: the upsampled z sits beside x_t; extra_in: more image-sized inputs beside x_t (the
        # anchored decoder's deterministic decode, see ae.DGAE)
        in_ch = 3 + extra_in + (latent_channels if cond == "concat" else 0)
        self.conv_in = nn.Conv2d(in_ch, ch, 3, padding=1)
        if cond == "latent_decoder":
            self.latent_decoder = LatentDecoder(latent_channels, compression, cond_ch)

        # Each level of either path is a ModuleDict: "blocks" (a ResBlock, plus self-attention at
        # the resolutions in attn_res), "cond_proj" (1x1 conv from the latent-decoder features to
        # the level's width; latent_decoder only) and "resample" (not on the level nearest the
        # middle). cond_proj comes first: creation order fixes the initial weights a seed draws.
        # down path; skip_widths lists the width of every tensor it keeps for the up path, in order
        self.down = nn.ModuleList()
        skip_widths = [ch]  # conv_in's output is the first skip
        width = ch
        res = resolution
        for level, mult in enumerate(ch_mult):
            cond_proj = nn.Conv2d(cond_ch, width, 1) if cond == "latent_decoder" else None
            blocks = nn.ModuleList()
            for _ in range(num_res_blocks):
                block = nn.ModuleList([ResBlock(width, ch * mult, emb_dim, dropout)])
                if res in attn_res:
                    block.append(AttnBlock(ch * mult, attn_impl=attn_impl))
                blocks.append(block)
                width = ch * mult
                skip_widths.append(width)
            stage = nn.ModuleDict({"blocks": blocks})
            if cond_proj is not None:
                stage["cond_proj"] = cond_proj
            if level < len(ch_mult) - 1:
                stage["resample"] = Downsample(width)
                skip_widths.append(width)
                res //= 2
            self.down.append(stage)

        self.mid = nn.ModuleList([ResBlock(width, width, emb_dim, dropout),
                                  AttnBlock(width, attn_impl=attn_impl),
                                  ResBlock(width, width, emb_dim, dropout)])

        # up path, the mirror image; every block eats one skip, so a level has one block more
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(ch_mult))):
            cond_proj = nn.Conv2d(cond_ch, width, 1) if cond == "latent_decoder" else None
            blocks = nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                block = nn.ModuleList([ResBlock(width + skip_widths.pop(), ch * mult, emb_dim,
                                               dropout)])
                if res in attn_res:
                    block.append(AttnBlock(ch * mult, attn_impl=attn_impl))
                blocks.append(block)
                width = ch * mult
            stage = nn.ModuleDict({"blocks": blocks})
            if cond_proj is not None:
                stage["cond_proj"] = cond_proj
            if level > 0:
                stage["resample"] = Upsample(width)
                res *= 2
            self.up.append(stage)
        self.norm_out = Norm(width)
        self.conv_out = nn.Conv2d(width, 3, 3, padding=1)
        self._zero_init_residual_branches()

    def _zero_init_residual_branches(self):
        """ADM's init: the last layer of every residual branch (ResBlock.conv2, the attention output
        projection) and the output conv start at zero, so each block starts as the identity and
        v_hat = 0; training grows each branch from nothing instead of first undoing random noise."""
        for m in self.modules():
            if isinstance(m, ResBlock):
                nn.init.zeros_(m.conv2.weight)
                nn.init.zeros_(m.conv2.bias)
            elif isinstance(m, AttnBlock):
                nn.init.zeros_(m.proj.weight)
                nn.init.zeros_(m.proj.bias)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x_t, t, z, extra=None):
        """x_t: (B, 3, H, W) noisy image, t: (B,) in [0, 1], z: (B, c, H/f, W/f), extra: None or
        (B, extra_in, H, W) inputs concatenated with x_t. Returns v_hat (B, 3, H, W)."""
        ckpt = self.grad_checkpoint and self.training  # checkpoint each layer below
        emb = self.time_mlp(timestep_embedding(t, self.ch).to(x_t.dtype))  # (B, 4ch)
        feats = None
        if extra is not None:
            x_t = torch.cat([x_t, extra.to(x_t.dtype)], dim=1)  # (B, 3 + extra_in, H, W)
        if self.cond == "concat":
            # (B, c, H, W)
            z_up = F.interpolate(z, scale_factor=float(self.compression), mode="nearest")
            x_t = torch.cat([x_t, z_up.to(x_t.dtype)], dim=1)  # (B, 3 + c, H, W)
        else:
            feats = checkpointed(self.latent_decoder, ckpt, z)  # {r: (B, cond_ch, r, r)}

        h = self.conv_in(x_t)  # (B, ch, H, W)
        skips = [h]
        for stage in self.down:
            if feats is not None:
                h = h + stage["cond_proj"](_features_at(feats, h.shape[-1]))  # z guides every scale
            for block in stage["blocks"]:
                for layer in block:  # a ResBlock, then maybe self-attention
                    h = checkpointed(layer, ckpt, h, emb)
                skips.append(h)
            if "resample" in stage:
                # (B, C, H/2, W/2); its input and output are skips, kept anyway
                h = stage["resample"](h)
                skips.append(h)
        for layer in self.mid:
            h = checkpointed(layer, ckpt, h, emb)  # (B, C_mid, H_min, W_min)
        for stage in self.up:
            if feats is not None:
                h = h + stage["cond_proj"](_features_at(feats, h.shape[-1]))
            for block in stage["blocks"]:
                h = torch.cat([h, skips.pop()], dim=1)  # (B, C + C_skip, H, W)
                for layer in block:
                    h = checkpointed(layer, ckpt, h, emb)
            if "resample" in stage:
                # an Upsample's conv would otherwise keep its input, 4x the size of h
                h = checkpointed(stage["resample"], ckpt, h)  # (B, C, 2H, 2W)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, 3, H, W)
