"""
InceptionV3 as the FID protocol uses it: the network behind FID, sFID, IS and precision/recall.

eval.py runs it and metrics.py compares its features. They compare with published numbers only if
the network is the one everyone uses: the TensorFlow Inception graph of 2015-12-05 that the original
FID code and OpenAI's ADM evaluator load, as pytorch-fid ported it (INCEPTION_URL). We rebuild that
port with its module names, so its file loads with strict=True: torchvision's Inception3 layout
without the auxiliary head, and the changes that make PyTorch compute what the TF graph computes:

  - the pooling branches of Mixed_5b..5d, 6b..6e and 7b average with count_include_pad=False (TF
    divides by the real pixels in the window, not the zero padding); Mixed_7c's is a 3x3 *max* pool
    (the TF graph has it so; the paper says avg).
  - BatchNorm eps 0.001, convolutions without bias, 1008 classes (TF's 1000 plus 8 unused).
  - inputs in [0, 1] are bilinearly resized to 299x299 (align_corners=False, as pytorch-fid) and
    scaled to [-1, 1]. TF's old resize samples pixels slightly differently, so features (and FIDs)
    match pytorch-fid's exactly and the TF evaluator's closely, not bit for bit.

forward returns the features the ADM evaluator (guided-diffusion's evaluations/evaluator.py) reads:

  pool    (B, 2048)  `pool_3`: the global average pool after Mixed_7c.        -> FID, prec./recall
  spatial (B, 2023)  `mixed_6/conv` (TF counts Mixed_5b as "mixed", so mixed_6 is our Mixed_6d):
                     the first 7 channels of its 1x1 branch, in TF's (H, W, C) order.    -> sFID
  logits  (B, 1008)  pool @ fc.weight^T *without* the bias, as the standard IS code (improved-GAN,
                     ADM) does.                                                          -> IS
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from support import checkpoints

INCEPTION_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                 "pt_inception-2015-12-05-6726825d.pth")
INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"
NUM_CLASSES = 1008
SPATIAL_CHANNELS = 7  # the ADM evaluator keeps mixed_6/conv[..., :7]: 17 * 17 * 7 = 2023 features


class BasicConv2d(nn.Module):
    """conv (no bias) -> BatchNorm (eps 1e-3, TF's value) -> ReLU: every conv of Inception."""

    def __init__(self, c_in, c_out, **conv_kwargs):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, bias=False, **conv_kwargs)
        self.bn = nn.BatchNorm2d(c_out, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def pool3x3(x, kind):
    """The stride-1, shape-preserving 3x3 pool before a Mixed block's `branch_pool` conv. "avg"
    leaves the zero padding out of the average (TF's semantics, the FID patch); "max": Mixed_7c."""
    if kind == "avg":
        return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)
    if kind == "max":
        return F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
    raise ValueError(f"unknown pool kind {kind!r}")


class Mixed(nn.Module):
    """A block with a pooling branch. forward concatenates branches(x) on channels, so the model can
    read one branch (Mixed_6d's 1x1 branch, for sFID) without computing it twice."""

    pool = "avg"  # the kind of pool3x3 in front of branch_pool

    def forward(self, x):
        return torch.cat(self.branches(x), 1)


class InceptionA(Mixed):
    """35x35 block (Mixed_5b/5c/5d): 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1.
    -> (B, 224 + pool_features, H, W)"""

    def __init__(self, c_in, pool_features):
        super().__init__()
        self.branch1x1 = BasicConv2d(c_in, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(c_in, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(c_in, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(c_in, pool_features, kernel_size=1)

    def branches(self, x):
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return [self.branch1x1(x), b5, b3, self.branch_pool(pool3x3(x, self.pool))]


class InceptionB(nn.Module):
    """Grid reduction 35 -> 17 (Mixed_6a): 3x3/2 | 1x1-3x3-3x3/2 | maxpool/2.
    -> (B, 480 + c_in, 17, 17)"""

    def __init__(self, c_in):
        super().__init__()
        self.branch3x3 = BasicConv2d(c_in, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(c_in, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3(x)
        b3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([b3, b3dbl, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionC(Mixed):
    """17x17 block (Mixed_6b..6e): 7x7 convs factorised as 1x7, 7x1. -> (B, 768, 17, 17)"""

    def __init__(self, c_in, channels_7x7):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(c_in, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(c_in, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(c_in, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(c_in, 192, kernel_size=1)

    def branches(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        b7dbl = self.branch7x7dbl_1(x)
        for conv in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                     self.branch7x7dbl_5):
            b7dbl = conv(b7dbl)
        return [self.branch1x1(x), b7, b7dbl, self.branch_pool(pool3x3(x, self.pool))]


class InceptionD(nn.Module):
    """Grid reduction 17 -> 8 (Mixed_7a): 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool/2.
    -> (B, 512 + c_in, 8, 8)"""

    def __init__(self, c_in):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(c_in, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(c_in, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionE(Mixed):
    """8x8 block (Mixed_7b avg-pooled, Mixed_7c max-pooled), 1x3 / 3x1 splits -> (B, 2048, 8, 8)"""

    def __init__(self, c_in, pool):
        super().__init__()
        self.pool = pool
        self.branch1x1 = BasicConv2d(c_in, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(c_in, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(c_in, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(c_in, 192, kernel_size=1)

    def branches(self, x):
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        b3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        b3dbl = torch.cat([self.branch3x3dbl_3a(b3dbl), self.branch3x3dbl_3b(b3dbl)], 1)
        return [self.branch1x1(x), b3, b3dbl, self.branch_pool(pool3x3(x, self.pool))]


class InceptionV3(nn.Module):
    """The FID InceptionV3: x (B, 3, H, W) in [0, 1], any H, W (resized to 299x299 first) ->
    dict(pool, spatial, logits). Random init; `load_inception` loads the published weights."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, pool="avg")
        self.Mixed_7c = InceptionE(2048, pool="max")
        self.fc = nn.Linear(2048, NUM_CLASSES)
        # a measuring instrument: BatchNorm uses the stored TF statistics, nothing trains
        self.requires_grad_(False)
        self.eval()

    def train(self, mode=True):
        # Stay in eval mode: batch statistics would make an image's features depend on its batch.
        return super().train(False)

    def forward(self, x):
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        x = 2 * x - 1  # [0, 1] -> [-1, 1], the range the TF graph was trained on
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # (B, 64, 147, 147)
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # (B, 64, 73, 73)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))  # (B, 192, 71, 71)
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # (B, 192, 35, 35)
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))  # (B, 288, 35, 35)
        x = self.Mixed_6c(self.Mixed_6b(self.Mixed_6a(x)))  # (B, 768, 17, 17)
        branches = self.Mixed_6d.branches(x)
        spatial = branches[0][:, :SPATIAL_CHANNELS]  # (B, 7, 17, 17): TF's mixed_6/conv[..., :7]
        spatial = spatial.permute(0, 2, 3, 1).flatten(1)  # (B, 2023) in TF's (H, W, C) order
        x = self.Mixed_6e(torch.cat(branches, 1))  # (B, 768, 17, 17)
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))  # (B, 2048, 8, 8)
        pool = x.mean(dim=(2, 3))  # (B, 2048): pool_3
        logits = pool @ self.fc.weight.t()  # (B, 1008), no bias: what the standard IS code uses
        return {"pool": pool, "spatial": spatial, "logits": logits}


def load_inception(path="", device="cpu", required=True):
    """The FID InceptionV3 with the published weights, loaded strictly from `path`, else
    $DGAE_INCEPTION, else <$DGAE_WEIGHTS or ./weights>/INCEPTION_FILE. A missing file raises
    FileNotFoundError naming it, its URL and --inception-path, or returns None if not required."""
    file = checkpoints.find_weights(path, INCEPTION_FILE, INCEPTION_URL, "--inception-path",
                                    "DGAE_INCEPTION", required)
    if file is None:
        return None
    model = InceptionV3()
    state = checkpoints.load_weight_file(file, "--inception-path", INCEPTION_URL)
    checkpoints.load_published_weights(lambda: model.load_state_dict(state, strict=True), file,
                                       "--inception-path", INCEPTION_URL)
    return model.to(device)
