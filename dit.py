"""
Stage 2: the class-conditional Diffusion Transformer (DiT) that generates DGAE latents.

The DiT (Peebles & Xie, 2023) sees a normalised stage-1 latent z (B, C, H, W) noised along the
rectified-flow path x_t = (1-t) z + t eps, the time t and a class label, and predicts the velocity
v = eps - z. train_dit.py trains it on cached latents; sample.py integrates it from t=1 to t=0 with
classifier-free guidance (`forward_with_cfg`) and hands the latent to the DGAE decoder.

Top to bottom: DiT helpers (adaLN `modulate`, the 2-D sin-cos position table); the embedders and
the adaLN-Zero block; the `DiT` model; the presets ("DiT-XL/2", ...) and `build_dit`. Attention,
the time embedding and activation checkpointing come from decoder_diffusion.py.
"""

import torch
import torch.nn as nn

from decoder_diffusion import attention, checkpointed, timestep_embedding

# -----------------------------------------------------------------------------
# DiT helpers


def modulate(x, shift, scale):
    """adaLN: LayerNorm whose affine shift/scale are regressed per sample from the conditioning.
    x: (B, T, D); shift, scale: (B, D), broadcast over the T tokens. With (1 + scale), a zero scale
    (what zero-init gives) leaves the normalised activations alone."""
    return x * (1 + scale[:, None]) + shift[:, None]


def pos_embed_2d(dim, grid_h, grid_w):
    """Fixed 2-D sin-cos position embedding (grid_h * grid_w, dim) float32 of a grid of patch
    tokens, token index = row * grid_w + col (the patchify conv's flattening order). The first
    dim/2 channels encode the column, the last dim/2 the row, each as [sin(pos * w_k)] then
    [cos(pos * w_k)], w_k = 10000^(-k / (dim/4)), k = 0..dim/4-1: the MAE/DiT table (whose meshgrid
    also puts the column first), extended to non-square grids. Fixed, as in the DiT paper."""
    assert dim % 4 == 0, "the 2-D sin-cos embedding needs hidden_size divisible by 4"
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))  # (dim/4,)

    def embed_1d(pos):  # (M,) -> (M, dim/2)
        angles = pos[:, None] * omega[None, :]
        return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)

    cols = embed_1d(torch.arange(grid_w, dtype=torch.float64))  # (W, dim/2)
    rows = embed_1d(torch.arange(grid_h, dtype=torch.float64))  # (H, dim/2)
    # token (i, j) gets cols[j] and rows[i]: tile the columns H times, repeat each row W times
    emb = torch.cat([cols.repeat(grid_h, 1), rows.repeat_interleave(grid_w, dim=0)], dim=1)
    return emb.float()  # (H*W, dim), computed in fp64 then rounded once


# -----------------------------------------------------------------------------
# embedders and blocks


class TimestepEmbedder(nn.Module):
    """t (B,) in [0, 1] -> (B, D): the fixed sinusoidal features, then a learned 2-layer MLP."""

    def __init__(self, hidden_size, freq_dim=256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden_size), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size))

    def forward(self, t):
        return self.mlp(timestep_embedding(t, self.freq_dim))  # (B, D)


class LabelEmbedder(nn.Module):
    """y (B,) class ids -> (B, D), with label dropout for classifier-free guidance: row
    `num_classes` of the table is the learned "null" class. Training with a fraction of labels
    replaced by it teaches the same network the unconditional velocity, which guidance needs."""

    def __init__(self, num_classes, hidden_size, dropout_prob):
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)

    def drop_labels(self, y, force_drop=None):
        """Replace labels by the null class where force_drop (B,) is true, or if it is None, each
        with probability dropout_prob, from the global torch RNG of y's device (so a resumed run
        drops the same labels)."""
        if force_drop is None:
            drop = torch.rand(y.shape[0], device=y.device) < self.dropout_prob  # (B,) bool
        else:
            drop = force_drop.bool()
        return torch.where(drop, self.num_classes, y)

    def forward(self, y, force_drop=None):
        # only Python-level flags are tested (never tensor values): no branch for torch.compile
        if force_drop is not None or (self.training and self.dropout_prob > 0):
            y = self.drop_labels(y, force_drop)
        return self.embedding_table(y)  # (B, D)


class SelfAttention(nn.Module):
    """Multi-head self-attention over the patch tokens, through the shared `attention`."""

    def __init__(self, dim, num_heads, attn_impl):
        super().__init__()
        self.num_heads = num_heads
        self.attn_impl = attn_impl
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, T, D = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.num_heads, D // self.num_heads)  # (B, T, 3, nh, hs)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, nh, T, hs)
        y = attention(q, k, v, self.attn_impl)  # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(B, T, D)  # re-assemble the heads side by side
        return self.proj(y)  # (B, T, D)


class DiTBlock(nn.Module):
    """Transformer block with adaLN-Zero conditioning (DiT paper, Sec. 3.2): c regresses shift,
    scale and gate (B, D) for the attention and the MLP branch. The LayerNorms have no affine
    parameters (shift/scale replace them); the gates multiply each residual branch, from zero."""

    def __init__(self, hidden_size, num_heads, mlp_ratio, attn_impl):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(hidden_size, num_heads, attn_impl)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        mlp_hidden = int(hidden_size * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(hidden_size, mlp_hidden), nn.GELU(approximate="tanh"),
                                 nn.Linear(mlp_hidden, hidden_size))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x, c):
        # x: (B, T, D) tokens, c: (B, D) conditioning
        (shift_msa, scale_msa, gate_msa,
         shift_mlp, scale_mlp, gate_mlp) = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa[:, None] * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp[:, None] * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x  # (B, T, D)


class FinalLayer(nn.Module):
    """adaLN (shift, scale; no gate) then a linear map from each token to its p*p*C output patch."""

    def __init__(self, hidden_size, patch_size, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)  # each (B, D)
        return self.linear(modulate(self.norm_final(x), shift, scale))  # (B, T, p*p*C)


# -----------------------------------------------------------------------------
# the model


class DiT(nn.Module):
    """Class-conditional DiT predicting the rectified-flow velocity v = eps - x of a latent.

    forward(x, t, y): x (B, C, H, W) noisy latents x_t = (1-t) x_0 + t eps, t (B,) floats in [0, 1]
    (t = 1 is pure noise), y (B,) long class ids -> v (B, C, H, W), the same C: rectified flow has
    no variance to learn, unlike DiT's learned-sigma output. `grad_checkpoint = True` checkpoints
    every block in training (decoder_diffusion.checkpointed).
    """

    def __init__(self, input_size=32, patch_size=2, in_channels=4, hidden_size=1152, depth=28,
                 num_heads=16, mlp_ratio=4.0, num_classes=1000, class_dropout_prob=0.1,
                 attn_impl="math"):
        super().__init__()
        H, W = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
        if H % patch_size or W % patch_size:
            raise ValueError(f"input_size {(H, W)} is not divisible by patch_size {patch_size}")
        if hidden_size % num_heads or hidden_size % 4:
            raise ValueError(f"hidden_size {hidden_size} must be divisible by "
                             f"num_heads {num_heads} and by 4")
        if attn_impl not in ("math", "sdpa"):
            raise ValueError(f"unknown attn_impl {attn_impl!r}; use 'math' or 'sdpa'")
        # everything needed to rebuild the model, for checkpoints (DiT(**model.config))
        self.config = dict(input_size=input_size, patch_size=patch_size, in_channels=in_channels,
                           hidden_size=hidden_size, depth=depth, num_heads=num_heads,
                           mlp_ratio=mlp_ratio, num_classes=num_classes,
                           class_dropout_prob=class_dropout_prob, attn_impl=attn_impl)
        self.in_channels = self.out_channels = in_channels
        self.patch_size = patch_size
        self.grid = (H // patch_size, W // patch_size)  # (h, w) tokens; T = h * w
        self.num_classes = num_classes
        # a switch of how training runs, not of the model (same function, same weights): out of
        # self.config and checkpoints; train_dit.py sets it from --grad-checkpoint on every run
        self.grad_checkpoint = False
        # patchify: a conv with kernel = stride = p is exactly "cut into p x p patches and apply the
        # same linear map to each flattened patch"
        self.x_embedder = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size,
                                    stride=patch_size)
        # non-persistent buffer: moves with .to(device), is never trained, and stays out of the
        # checkpoint (it is recomputed from the config, so no checkpoint can disagree with it)
        self.register_buffer("pos_embed", pos_embed_2d(hidden_size, *self.grid)[None],
                             persistent=False)  # (1, T, D)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio, attn_impl)
                                     for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self):
        # Xavier-uniform for every linear layer with zero bias, the ViT/DiT default
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        # the patchify conv is a linear layer on flattened p*p*C patches, so initialise it as one
        w = self.x_embedder.weight  # (D, C, p, p)
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.bias)
        # embeddings: small normal, as in DiT
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        # adaLN-Zero: every shift, scale and gate is 0 at init, so each block starts as the identity
        # and the deep network as a shallow one (the DiT paper found this clearly better, in FID,
        # than plain adaLN, cross-attention or in-context conditioning)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        # final layer zeroed too, so v = 0 at init. Training is not stuck: the final linear's
        # gradient is its non-zero input, so it moves first, and then the gates receive gradient.
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def unpatchify(self, x):
        """(B, T, p*p*C) tokens, each laid out as (p_row, p_col, C) -> (B, C, H, W)."""
        B = x.shape[0]
        (h, w), p, C = self.grid, self.patch_size, self.out_channels
        x = x.view(B, h, w, p, p, C)
        x = x.permute(0, 5, 1, 3, 2, 4)  # (B, C, h, p, w, p): row = i*p + a, col = j*p + b
        return x.reshape(B, C, h * p, w * p)

    def forward(self, x, t, y, force_drop=None):
        """x (B, C, H, W), t (B,) in [0, 1], y (B,) long; force_drop: optional (B,) bool mask of
        labels to replace by the null class (else labels drop at random, in training mode only)."""
        # (B, T, D), token = row*w + col
        x = self.x_embedder(x).flatten(2).transpose(1, 2) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y, force_drop)  # (B, D) conditioning
        ckpt = self.grad_checkpoint and self.training  # store only each block's input for backward
        for block in self.blocks:
            x = checkpointed(block, ckpt, x, c)  # (B, T, D)
        x = self.final_layer(x, c)  # (B, T, p*p*C)
        return self.unpatchify(x)  # (B, C, H, W)

    def forward_with_cfg(self, x, t, y, cfg_scale):
        """Classifier-free guidance v_uncond + cfg_scale * (v_cond - v_uncond), on ALL channels.
        The conditional and null-class passes run as one batch of 2B; cfg_scale = 1 is the plain
        conditional model (one pass of B), 0 the unconditional one. Label dropout is forced off for
        the conditional half, so this is deterministic even in training mode."""
        B = x.shape[0]
        if cfg_scale == 1.0:
            return self(x, t, y, force_drop=torch.zeros(B, dtype=torch.bool, device=x.device))
        drop = torch.arange(2 * B, device=x.device) >= B  # (2B,): True for the null half
        v = self(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, y]), force_drop=drop)
        v_cond, v_uncond = v[:B], v[B:]  # each (B, C, H, W)
        # Guidance on every channel: the original DiT code guides only the first 3, a leftover from
        # GLIDE's RGB pixels (github.com/facebookresearch/DiT/issues/12) that would leave latent
        # channels 3.. unguided, though all of them carry image content (DGAE: 4 to 64).
        return v_uncond + cfg_scale * (v_cond - v_uncond)


# -----------------------------------------------------------------------------
# presets: "DiT-{size}/{patch}". Sizes are the DiT paper's (Table 1) plus a CPU-sized "Tiny".
# For reference, at a 32x32x4 input: S/2 ~33M, B/2 ~130M, L/2 ~458M, XL/2 ~675M parameters.
# The patch size trades compute for detail: T = (H/p)(W/p) tokens, so p=1 on an 8x8 latent gives
# 64 tokens, like p=2 on a 16x16 latent.

DIT_SIZES = {  # name: (depth, hidden_size, num_heads)
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
    "Tiny": (4, 128, 4),
}
DIT_PRESETS = {
    f"DiT-{size}/{p}": dict(depth=d, hidden_size=h, num_heads=nh, patch_size=p)
    for size, (d, h, nh) in DIT_SIZES.items()
    for p in (1, 2, 4)
}


def build_dit(name, input_size, in_channels, num_classes, **overrides):
    """The DiT preset `name` (e.g. "DiT-XL/2") for a latent shape and class count; overrides (any
    other DiT keyword: attn_impl, class_dropout_prob, ...) win over the preset."""
    if name not in DIT_PRESETS:
        raise ValueError(f"unknown DiT preset {name!r}; valid names: {', '.join(DIT_PRESETS)}")
    kwargs = {**DIT_PRESETS[name], **overrides}
    return DiT(input_size=input_size, in_channels=in_channels, num_classes=num_classes, **kwargs)
