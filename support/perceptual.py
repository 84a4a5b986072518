"""
LPIPS v0.1 with the VGG16 trunk: the learned perceptual distance of Zhang et al. 2018 ("The
Unreasonable Effectiveness of Deep Features as a Perceptual Metric"). Stage-1 training adds
`w_lpips * LPIPS(x0_hat, x)` to its loss (ae.py) and eval.py reports it. Both need the published
weights, which this network reproduces number for number: torchvision's ImageNet VGG16 (its
`features.*` convolutions) and LPIPS v0.1's five learned 1x1 heads (`lin{l}.model.1.weight`, each
(1, C, 1, 1)). For x, y (B, 3, H, W) in [-1, 1], with u_l = f_l / |f_l| (L2 norm over channels):

    d(x, y) = sum_l  mean_{h,w}  sum_c  w_l[c] * (u_l(x)[c,h,w] - u_l(y)[c,h,w])^2

where f_l are the VGG16 activations of the rescaled input after relu1_2, relu2_2, relu3_3, relu4_3
and relu5_3, and w_l >= 0 the heads. The network is frozen, but gradients flow back to the images.
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

# torchvision's VGG16 configuration "D": 3x3 convs (padding 1) each followed by a ReLU, a 2x2 /
# stride-2 max-pool at each "M". The same nn.Sequential puts every conv at torchvision's index, so
# the published `features.{i}.weight/bias` keys load as they are. We stop before the final pool
# (index 30): LPIPS taps relu5_3 (index 29) last.
VGG16_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
# indices in `features` of the ReLUs LPIPS reads: relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
TAPS = (3, 8, 15, 22, 29)
CHANNELS = (64, 128, 256, 512, 512)
NORM_EPS = 1e-10  # published: x / (sqrt(sum x^2) + eps), 0/0 -> 0 where every ReLU is dead


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
    """One LPIPS head: a 1x1 conv from C channels to 1, no bias, at the published key
    `model.1.weight`. The published slot 0 is a Dropout, the identity in eval mode; an nn.Identity
    gives the same keys and numbers, and no parent's .train() can switch dropout on in the loss."""

    def __init__(self, channels):
        super().__init__()
        self.model = nn.Sequential(nn.Identity(), nn.Conv2d(channels, 1, kernel_size=1, bias=False))


def unit_normalize(f, eps=NORM_EPS):
    """(B, C, H, W) -> each position's feature vector at unit L2 norm over channels, in at least
    fp32: a sum of 512 squares in bf16 (autocast's output, 8 bits of mantissa) would be noisy."""
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

    As built, the trunk is randomly initialised and every head weight is 1: a plain channel sum (the
    published uncalibrated "baseline"). `load_lpips` builds it with the published weights."""

    def __init__(self):
        super().__init__()
        # LPIPS v0.1 input scaling, [-1, 1] to about ImageNet-normalised values: shift = 2*mean - 1
        # and scale = 2*std of ImageNet. Constants, in neither published file: not persistent.
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1),
                             persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1),
                             persistent=False)
        self.features = make_vgg16_features()
        # five named attributes (not a ModuleList): the state-dict keys are `lin{k}.model.1.weight`
        for k, c in enumerate(CHANNELS):
            setattr(self, f"lin{k}", NetLin(c))
            nn.init.ones_(getattr(self, f"lin{k}").model[1].weight)
        # a measuring instrument: never trained, always in eval mode
        self.requires_grad_(False)
        self.eval()

    def train(self, mode=True):
        # Stay in eval mode even when a parent (the autoencoder holding this loss) calls .train().
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
        # After the trunk, at least fp32 outside autocast: bf16 would round away the normalisation,
        # the squared difference of two nearly equal unit vectors and the heads' weighted sum.
        # (the meta device, where bench.py predicts memory, has no autocast of its own to turn off)
        with torch.autocast(device_type="cpu" if x.is_meta else x.device.type, enabled=False):
            d = 0.0
            for f0, f1, lin in zip(fx, fy, self.lins):
                diff = (unit_normalize(f0) - unit_normalize(f1)) ** 2  # (B, C, h, w)
                w = lin.model[1].weight.to(diff.dtype)  # (1, C, 1, 1)
                score = F.conv2d(diff, w)  # (B, 1, h, w): the learned channel weighting
                d = d + score.mean(dim=(1, 2, 3))  # (B,) spatial average, summed over layers
        return d

    def load_published(self, vgg_state, lpips_state):
        """Load torchvision's VGG16 state dict (less its unused `classifier.*`) and LPIPS v0.1's
        vgg.pth state dict strictly: a missing, extra or misshaped key raises ValueError naming it,
        where a non-strict load would leave a random layer in place."""
        shapes = {k: tuple(v.shape) for k, v in self.state_dict().items()}
        vgg_expected = {k: shape for k, shape in shapes.items() if k.startswith("features.")}
        lin_expected = {k: shape for k, shape in shapes.items() if k.startswith("lin")}
        assert len(vgg_expected) + len(lin_expected) == len(shapes)  # nothing else is saved
        vgg_state = {k: v for k, v in vgg_state.items() if not k.startswith("classifier.")}
        check_keys(vgg_state, vgg_expected, f"VGG16 ({VGG16_FILE})")
        check_keys(lpips_state, lin_expected, f"LPIPS v0.1 heads ({LPIPS_FILE})")
        self.load_state_dict({**vgg_state, **lpips_state}, strict=True)
        return self


def load_lpips(vgg_path="", lpips_path="", required=True, device="cpu"):
    """LPIPS with the published VGG16 and LPIPS v0.1 weights, each read from the given path, else
    $DGAE_VGG16 / $DGAE_LPIPS, else <$DGAE_WEIGHTS or ./weights>/<file name>. A missing file raises
    FileNotFoundError naming it, its URL and its flag, or with required=False returns None."""
    vgg_file = checkpoints.find_weights(vgg_path, VGG16_FILE, VGG16_URL, "--vgg-path", "DGAE_VGG16",
                                        required)
    lpips_file = checkpoints.find_weights(lpips_path, LPIPS_FILE, LPIPS_URL, "--lpips-path",
                                          "DGAE_LPIPS", required)
    if vgg_file is None or lpips_file is None:
        return None
    vgg_state = checkpoints.load_weight_file(vgg_file, "--vgg-path", VGG16_URL)
    lpips_state = checkpoints.load_weight_file(lpips_file, "--lpips-path", LPIPS_URL)
    net = LPIPS()
    checkpoints.load_published_weights(lambda: net.load_published(vgg_state, lpips_state),
                                       f"{vgg_file}, {lpips_file}", "--vgg-path/--lpips-path",
                                       f"{VGG16_URL} and {LPIPS_URL}")
    return net.to(device)
