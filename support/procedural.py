"""
The built-in dataset (--data ""): coloured shapes and textures drawn on the fly, never downloaded,
with sharp detail to reconstruct. Item i is a pure function of (seed, i) at any resolution: a
float32 tensor (3, H, W) in [-1, 1] and the pattern's index as label. PatternClassifier, a small
CNN that tells the patterns apart, scores stage 2's samples (eval.py classes).
"""

import math
from functools import lru_cache

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, RandomSampler


@lru_cache(maxsize=8)
def _grid(resolution):
    # pixel-centre coordinates in [-1, 1]. Every shape below is defined in these continuous
    # coordinates, so the same (seed, index) draws the same picture at 32 px and at 256 px.
    u = (np.arange(resolution, dtype=np.float32) + 0.5) / resolution * 2.0 - 1.0
    yy, xx = np.meshgrid(u, u, indexing="ij")  # (H, W) each; y grows downwards
    return yy, xx


def _rotate(yy, xx, cy, cx, angle):
    # coordinates relative to (cy, cx) in a frame rotated by `angle`
    dy, dx = yy - cy, xx - cx
    c, s = math.cos(angle), math.sin(angle)
    return c * dy - s * dx, s * dy + c * dx


# Each pattern maps (rng, yy, xx) -> a mask (H, W) in [0, 1] (1 = foreground colour). Sizes,
# positions, phases and frequencies are random within the class; frequencies, in cycles per unit of
# the [-1, 1] coordinates, keep a period >= ~4 px at 32 px, so the class stays recognisable.

def _disc(rng, yy, xx):
    cy, cx = rng.uniform(-0.4, 0.4, 2)
    r = rng.uniform(0.3, 0.6)
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def _square(rng, yy, xx):
    cy, cx = rng.uniform(-0.4, 0.4, 2)
    ry, rx = _rotate(yy, xx, cy, cx, rng.uniform(0, math.pi / 2))
    return np.maximum(np.abs(ry), np.abs(rx)) <= rng.uniform(0.25, 0.5)


def _triangle(rng, yy, xx):
    # equilateral triangle = intersection of three half-planes whose outward normals are 120
    # degrees apart; the inradius is half the circumradius r.
    cy, cx = rng.uniform(-0.35, 0.35, 2)
    r, theta = rng.uniform(0.45, 0.75), rng.uniform(0, 2 * math.pi)
    inside = np.ones_like(yy, dtype=bool)
    for k in range(3):
        a = theta + 2 * math.pi * k / 3
        inside &= (yy - cy) * math.sin(a) + (xx - cx) * math.cos(a) <= r / 2
    return inside


def _ring(rng, yy, xx):
    cy, cx = rng.uniform(-0.3, 0.3, 2)
    r, w = rng.uniform(0.35, 0.6), rng.uniform(0.08, 0.16)
    return np.abs(np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2) - r) <= w


def _stripes(coord, rng):
    f, phase = rng.uniform(1.5, 4.0), rng.uniform(0, 2 * math.pi)
    return np.sin(2 * math.pi * f * coord + phase) > 0


def _hstripes(rng, yy, xx):
    return _stripes(yy, rng)


def _vstripes(rng, yy, xx):
    return _stripes(xx, rng)


def _dstripes(rng, yy, xx):
    sign = 1.0 if rng.uniform() < 0.5 else -1.0  # "/" or "\"
    return _stripes((xx + sign * yy) / math.sqrt(2), rng)


def _checkerboard(rng, yy, xx):
    f = rng.uniform(1.0, 2.5)
    py, px = rng.uniform(0, 2 * math.pi, 2)
    return np.sin(2 * math.pi * f * yy + py) * np.sin(2 * math.pi * f * xx + px) > 0


def _concentric(rng, yy, xx):
    cy, cx = rng.uniform(-0.5, 0.5, 2)
    f, phase = rng.uniform(1.5, 3.5), rng.uniform(0, 2 * math.pi)
    return np.sin(2 * math.pi * f * np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2) + phase) > 0


def _dots(rng, yy, xx):
    # a square lattice of dots: local coordinates inside each lattice cell, centred on 0
    f = rng.uniform(1.5, 3.0)
    oy, ox = rng.uniform(0, 1, 2)
    ly = (yy * f + oy) % 1.0 - 0.5
    lx = (xx * f + ox) % 1.0 - 0.5
    return ly ** 2 + lx ** 2 <= rng.uniform(0.2, 0.35) ** 2


# the ten classes, in label order
_PATTERNS = [
    ("disc", _disc), ("square", _square), ("triangle", _triangle), ("ring", _ring),
    ("horizontal_stripes", _hstripes), ("vertical_stripes", _vstripes),
    ("diagonal_stripes", _dstripes), ("checkerboard", _checkerboard),
    ("concentric_circles", _concentric), ("dot_grid", _dots),
]


class ProceduralDataset(Dataset):
    """Coloured shapes and textures, one pattern per class."""

    def __init__(self, resolution=32, num_classes=10, size=10000, seed=0):
        if not 1 <= num_classes <= len(_PATTERNS):
            raise ValueError(f"ProceduralDataset has {len(_PATTERNS)} patterns, "
                             f"not num_classes={num_classes}")
        self.resolution, self.num_classes, self.size, self.seed = (
            resolution, num_classes, size, seed)
        self.class_names = [name for name, _ in _PATTERNS[:num_classes]]

    def __len__(self):
        return self.size

    def image(self, i):
        """The i-th image as a float32 numpy array (H, W, 3) in [-1, 1]."""
        # a fresh generator per item (not one per dataset) is what makes item i independent of
        # which items were drawn before it, in which worker process, in which order.
        i = int(i)
        if not 0 <= i < self.size:
            raise IndexError(f"index {i} out of range for ProceduralDataset of size {self.size}")
        rng = np.random.default_rng((self.seed, i))
        yy, xx = _grid(self.resolution)
        mask = _PATTERNS[i % self.num_classes][1](rng, yy, xx).astype(np.float32)  # (H, W)
        # two random colours with enough contrast that the pattern is always visible
        bg = rng.uniform(-1, 1, 3)
        fg = rng.uniform(-1, 1, 3)
        if np.abs(fg - bg).max() < 0.8:
            fg = np.where(bg > 0, bg - 1.0, bg + 1.0)  # push one unit away from bg on every channel
        bg, fg = bg.astype(np.float32), fg.astype(np.float32)
        return bg + mask[:, :, None] * (fg - bg)  # (H, W, 3)

    def __getitem__(self, i):
        x = torch.from_numpy(self.image(i)).permute(2, 0, 1).contiguous()  # (3, H, W)
        return x, int(i) % self.num_classes


# -----------------------------------------------------------------------------
# a judge for generated images: which pattern does an image show?


class PatternClassifier(nn.Module):
    """Names the pattern of a built-in image: x (B, 3, H, W) in [-1, 1] -> logits (B, K). Three
    levels of two 3x3 convolutions, then a global average: any resolution divisible by 8 works."""

    def __init__(self, num_classes=10, width=16):
        super().__init__()
        layers, ch = [], 3
        for w in (width, 2 * width, 4 * width):
            for c_in in (ch, w):
                layers += [nn.Conv2d(c_in, w, 3, padding=1), nn.GroupNorm(8, w), nn.ReLU()]
            layers.append(nn.MaxPool2d(2))
            ch = w
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(ch, num_classes)

    def embed(self, x):
        """(B, 4 * width) pooled features: the space of the judge's Frechet distance."""
        return self.features(x).mean((2, 3))

    def forward(self, x):
        return self.head(self.embed(x))  # (B, K)


def train_pattern_classifier(resolution, num_classes=10, steps=600, batch_size=64, seed=0,
                             device="cpu", images=None):
    """A PatternClassifier trained on fresh built-in images, each seen once, or on `images`, a
    labelled folder (data.ImageFolderDataset) drawn with replacement; in eval mode. Images are
    mirrored with probability 1/2 (stage 2 trains on mirrored latents too); the learning rate
    falls linearly to 0. Deterministic for a seed (its own RNG, not the global one)."""
    from support.data import collate_skip_bad, random_hflip, to_model_range  # data.py imports us

    sampler = None
    if images is None:
        images = ProceduralDataset(resolution, num_classes, size=steps * batch_size, seed=seed)
    else:
        sampler = RandomSampler(images, replacement=True, num_samples=steps * batch_size,
                                generator=torch.Generator().manual_seed(seed))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = PatternClassifier(num_classes).to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
        # the loader draws its workers' base seed from `generator`, not from the flips' RNG
        batches = DataLoader(images, batch_size, sampler=sampler, collate_fn=collate_skip_bad,
                             generator=torch.Generator().manual_seed(seed))
        for step, (x, y, _) in enumerate(batches):  # x (B, 3, H, W), y (B,)
            for group in opt.param_groups:
                group["lr"] = 2e-3 * (1 - step / steps)
            if len(y) == 0:  # a batch of unreadable files only
                continue
            x = random_hflip(to_model_range(x)).to(device)  # coins from the forked, seeded RNG
            loss = F.cross_entropy(model(x), y.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return model.eval()
