"""
LPIPS: the learned perceptual image distance of Zhang et al. 2018 ("The Unreasonable
Effectiveness of Deep Features as a Perceptual Metric"), VGG16 trunk, version 0.1.

Where it fits: stage-1 training adds `w_lpips * LPIPS(x0_hat, x)` to the rectified-flow loss, with
x0_hat the one-step estimate of the clean image (see ae.py), and eval.py reports it as the LPIPS
reconstruction metric. Both only make sense with the published weights, so this file is written
to reproduce the published network number for number once they are loaded:

  - `vgg16-397923af.pth`, the torchvision ImageNet VGG16 (we read its `features.*` convolutions and
    ignore its `classifier.*` layers), and
  - LPIPS v0.1 `vgg.pth`, the five learned 1x1 "linear" heads (`lin0.model.1.weight` ..
    `lin4.model.1.weight`, each (1, C, 1, 1), no bias).

The distance between images x and y (both (B, 3, H, W) in [-1, 1]) is

    d(x, y) = sum_l  mean_{h,w}  sum_c  w_l[c] * ( f_l(x)[c,h,w]/|f_l(x)[:,h,w]| - f_l(y)[c,h,w]/|f_l(y)[:,h,w]| )^2

where f_l are the VGG16 activations after relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 of the
rescaled input, |.| is the L2 norm over channels (plus a tiny eps), and w_l >= 0 the learned heads.
The network is a frozen measuring instrument: no parameter ever trains, but gradients flow back to
the images, which is what the training loss needs.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from support import checkpoints

VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"
VGG16_FILE = "vgg16-397923af.pth"
LPIPS_URL = ("https://github.com/richzhang/PerceptualSimilarity/raw/master/lpips/weights/v0.1/"
             "vgg.pth")
LPIPS_FILE = "vgg.pth"

# VGG16 is torchvision's configuration "D": 3x3 convs (padding 1) each followed by a ReLU, with a
# 2x2 / stride-2 max-pool at each "M". We rebuild the exact same nn.Sequential so every conv sits at
# the torchvision index (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28) and the published file's
# `features.{i}.weight/bias` keys load as they are. The final pool (index 30) is never reached,
# because LPIPS taps relu5_3 (index 29) last, so we stop before it.
VGG16_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
# indices in `features` of the ReLUs LPIPS reads: relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
TAPS = (3, 8, 15, 22, 29)
CHANNELS = (64, 128, 256, 512, 512)

# The eps LPIPS adds to the channel norm before dividing (published: x / (sqrt(sum x^2) + 1e-10)).
# It only matters where a feature vector is exactly zero (dead ReLUs), where it turns 0/0 into 0.
NORM_EPS = 1e-10


def make_vgg16_features():
    """The torchvision VGG16 `features` stack up to and including relu5_3 (30 modules)."""
    layers, c_in = [], 3
    for v in VGG16_CFG:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers.append(nn.Conv2d(c_in, v, kernel_size=3, padding=1))
            # not inplace: the activation we tap must not be overwritten by a later layer
            layers.append(nn.ReLU())
            c_in = v
    return nn.Sequential(*layers)


class NetLin(nn.Module):
    """One LPIPS head: a 1x1 conv from C channels to 1, no bias.

    Published layout is `model = Sequential(Dropout, Conv2d)`, so the conv's key is
    `model.1.weight`. The dropout was only there while the heads were trained; the metric always
    runs it in eval mode, where dropout is the identity. We put an nn.Identity in slot 0: same keys,
    same numbers, and no way for a parent module's .train() to switch a random dropout mask on
    inside the loss.
    """

    def __init__(self, channels):
        super().__init__()
        self.model = nn.Sequential(nn.Identity(), nn.Conv2d(channels, 1, kernel_size=1, bias=False))


def unit_normalize(f, eps=NORM_EPS):
    """Scale each spatial position's feature vector to unit L2 norm over channels.

    f: (B, C, H, W) -> (B, C, H, W). Computed in at least fp32: under bf16 autocast the features
    come out in bf16, and a sum of 512 squares in bf16 (8 bits of mantissa) would make the metric
    noisy.
    """
    f = f.to(torch.promote_types(f.dtype, torch.float32))
    norm = torch.sqrt(torch.sum(f * f, dim=1, keepdim=True))  # (B, 1, H, W)
    return f / (norm + eps)


def check_keys(state, expected, what):
    """Raise ValueError unless `state` has exactly the keys and shapes in `expected`."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    misshaped = [f"{k}: {tuple(state[k].shape)} != {expected[k]}"
                 for k in sorted(set(state) & set(expected))
                 if tuple(state[k].shape) != expected[k]]
    if missing or unexpected or misshaped:
        raise ValueError(f"{what} state dict does not match the published layout: "
                         f"missing {missing}, unexpected {unexpected}, wrong shape {misshaped}")


class LPIPS(nn.Module):
    """LPIPS v0.1 with the VGG16 trunk. forward(x, y) -> (B,) distances, images in [-1, 1].

    Freshly constructed, the trunk has PyTorch's random init and every head weight is 1, which
    makes the heads a plain channel sum (the published "baseline", uncalibrated variant). Load the
    published weights with `load_published` or, simpler, build it with `load_lpips`.
    """

    def __init__(self):
        super().__init__()
        # LPIPS v0.1 input scaling: maps [-1, 1] images to roughly ImageNet-normalised values, since
        # shift = 2*mean - 1 and scale = 2*std of the ImageNet statistics the trunk was trained on.
        # Not persistent: they are constants, not part of either published file.
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1),
                             persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1),
                             persistent=False)
        self.features = make_vgg16_features()
        # five named attributes (not a ModuleList) so the state-dict keys are
        # `lin{k}.model.1.weight`
        for k, c in enumerate(CHANNELS):
            setattr(self, f"lin{k}", NetLin(c))
            nn.init.ones_(getattr(self, f"lin{k}").model[1].weight)
        # a measuring instrument: never trained, always in eval mode
        self.requires_grad_(False)
        self.eval()

    def train(self, mode=True):
        # Stay in eval mode even when a parent (the autoencoder holding this loss) calls .train().
        # The loss network is fixed: no layer of it may ever switch to training behaviour.
        return super().train(False)

    @property
    def lins(self):
        return [getattr(self, f"lin{k}") for k in range(len(CHANNELS))]

    def vgg_taps(self, x):
        """Scaled image (B, 3, H, W) -> the five tapped activations [(B, C_l, H/2^l, W/2^l)]."""
        taps = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in TAPS:
                taps.append(x)
        return taps

    def forward(self, x, y):
        """x, y: (B, 3, H, W) in [-1, 1], H and W at least 16. Returns (B,) fp32 distances."""
        if x.shape != y.shape or x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"LPIPS wants two (B, 3, H, W) images of the same shape, "
                             f"got {tuple(x.shape)} and {tuple(y.shape)}")
        if min(x.shape[2:]) < 16:
            raise ValueError(f"LPIPS needs H, W >= 16 (four 2x pools before relu5_3), "
                             f"got {tuple(x.shape[2:])}")
        # Two separate passes rather than one on cat([x, y]): in training only x (the estimate)
        # needs gradients, and a separate pass for the target builds no graph at all.
        fx = self.vgg_taps((x - self.shift) / self.scale)
        fy = self.vgg_taps((y - self.shift) / self.scale)
        # Everything after the trunk runs outside autocast, in (at least) fp32: the normalisation,
        # the squared difference of two nearly equal unit vectors, and the head's weighted sum are
        # exactly the parts that bf16 would round away.
        # (the meta device, where bench.py predicts memory, has no autocast of its own to turn off)
        with torch.autocast(device_type="cpu" if x.is_meta else x.device.type, enabled=False):
            d = 0.0
            for f0, f1, lin in zip(fx, fy, self.lins):
                diff = (unit_normalize(f0) - unit_normalize(f1)) ** 2  # (B, C, h, w)
                w = lin.model[1].weight.to(diff.dtype)  # (1, C, 1, 1)
                score = F.conv2d(diff, w)  # (B, 1, h, w): the learned channel weighting
                d = d + score.mean(dim=(1, 2, 3))  # (B,) spatial average, summed over layers
        return d

    # ------------------------------------------------------------------------------------------
    # loading the two published files

    def expected_keys(self):
        """(vgg_shapes, lpips_shapes): dicts key -> shape of the two published state dicts."""
        sd = self.state_dict()
        vgg = {k: tuple(v.shape) for k, v in sd.items() if k.startswith("features.")}
        lin = {k: tuple(v.shape) for k, v in sd.items() if k.startswith("lin")}
        assert len(vgg) + len(lin) == len(sd)  # nothing else is saved
        return vgg, lin

    def load_published(self, vgg_state, lpips_state):
        """Load torchvision's VGG16 state dict and LPIPS v0.1's vgg.pth state dict, strictly.

        `classifier.*` keys of the VGG16 file are dropped (LPIPS never reaches the classifier).
        Every other key must be exactly the expected one with exactly the expected shape; a missing,
        extra or misshaped key raises ValueError naming it, instead of leaving a random layer in
        place the way a non-strict load would.
        """
        vgg_expected, lin_expected = self.expected_keys()
        vgg_state = {k: v for k, v in vgg_state.items() if not k.startswith("classifier.")}
        check_keys(vgg_state, vgg_expected, f"VGG16 ({VGG16_FILE})")
        check_keys(lpips_state, lin_expected, f"LPIPS v0.1 heads ({LPIPS_FILE})")
        self.load_state_dict({**vgg_state, **lpips_state}, strict=True)
        return self


def load_lpips(vgg_path="", lpips_path="", required=True, device="cpu"):
    """Build LPIPS with the published VGG16 and LPIPS v0.1 weights, both read from local files.

    Each file is resolved by checkpoints.find_weights: the given path, else $DGAE_VGG16 /
    $DGAE_LPIPS, else <$DGAE_WEIGHTS or ./weights>/<file name>. If a file is missing: with
    required=True the FileNotFoundError names the file, its download URL and the flag (--vgg-path /
    --lpips-path); with required=False we return None, so callers can skip the LPIPS term or metric.
    """
    vgg_file = checkpoints.find_weights(vgg_path, VGG16_FILE, VGG16_URL, "--vgg-path", "DGAE_VGG16",
                                        required)
    lpips_file = checkpoints.find_weights(lpips_path, LPIPS_FILE, LPIPS_URL, "--lpips-path",
                                          "DGAE_LPIPS", required)
    if vgg_file is None or lpips_file is None:
        return None
    # weights_only: these files are plain tensor dicts, and we never unpickle arbitrary objects
    vgg_state = checkpoints.load_weight_file(vgg_file, "--vgg-path", VGG16_URL)
    lpips_state = checkpoints.load_weight_file(lpips_file, "--lpips-path", LPIPS_URL)
    net = LPIPS()
    checkpoints.load_published_weights(lambda: net.load_published(vgg_state, lpips_state),
                                       f"{vgg_file}, {lpips_file}", "--vgg-path/--lpips-path",
                                       f"{VGG16_URL} and {LPIPS_URL}")
    return net.to(device)
