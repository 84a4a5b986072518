"""
The measures eval.py reports, as plain functions of tensors: the formulas only, no files, models or
processes. eval.py's docstring gives the protocol around them (crops, uint8 rounding, sharding over
GPUs) and why each convention matches published numbers. Pixel metrics (PSNR, SSIM, low-frequency
PSNR, high-frequency energy, band power) return one value per image; distribution metrics take the
InceptionV3 features (inception.py) of many images: the Frechet distance between their Gaussians
(FID, sFID, rFID), the Inception Score, and precision / recall from k-nearest-neighbour balls.
"""

import numpy as np
import torch
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# pixel metrics: inputs are (B, 3, H, W) float tensors holding the integers 0..255, what a saved PNG
# holds (eval_data.to_pixels rounds a reconstruction to them)

# Our choice: the MSE is floored at 1/12, the variance of rounding to 8 bits, so PSNR is at most
# 10 log10(255^2 * 12) = 58.9 dB, not inf: a flat crop scored against its own mean colour would
# otherwise make the mean over images infinite. Above the floor this is the standard formula.
MSE_FLOOR = 1 / 12


def psnr_of_mse(mse):
    """(B,) PSNR in dB from per-image MSEs on [0, 255], 10 log10(255^2 / max(MSE, 1/12))."""
    return 10 * torch.log10(255.0**2 / mse.double().clamp_min(MSE_FLOOR))


def psnr(x, y):
    """(B,) PSNR in dB of images in [0, 255]."""
    return psnr_of_mse(((x.double() - y.double()) ** 2).mean(dim=(1, 2, 3)))


def conditional_mean_mse(samples, x):
    """(B,) unbiased estimate of the MSE of E[x_hat | z] against x (B, 3, H, W), from samples
    (K, B, 3, H, W): K >= 2 decodes of the same latents with different noise. Our estimator:
    E ||mean - x||^2 = ||b||^2 + sigma^2 / K for the decoder's bias b, and the decodes' sample
    variance (ddof 1) estimates sigma^2 without bias, so ||mean - x||^2 - var / K estimates ||b||^2.
    Per image it can fall below 0 by chance: psnr_of_mse floors it."""
    k = samples.shape[0]
    s = samples.double()
    err = ((s.mean(0) - x.double()) ** 2).mean(dim=(1, 2, 3))  # (B,)
    return err - s.var(0, unbiased=True).mean(dim=(1, 2, 3)) / k


def gaussian_window(size=11, sigma=1.5):
    """The normalised 1-D Gaussian (size,); SSIM's 2-D window is its outer product (separable)."""
    c = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(c**2) / (2 * sigma**2))
    return g / g.sum()


def ssim(x, y, size=11, sigma=1.5, k1=0.01, k2=0.03, data_range=255.0):
    """(B,) mean SSIM of images in [0, 255], per channel then averaged (float64 throughout)."""
    x, y = x.double(), y.double()
    C = x.shape[1]
    g = gaussian_window(size, sigma).to(x.device)
    gh, gw = g.view(1, 1, size, 1).repeat(C, 1, 1, 1), g.view(1, 1, 1, size).repeat(C, 1, 1, 1)

    def filt(t):  # Gaussian-weighted local mean over each 'valid' window, channel by channel
        return F.conv2d(F.conv2d(t, gh, groups=C), gw, groups=C)  # (B, C, H-size+1, W-size+1)

    mu_x, mu_y = filt(x), filt(y)
    var_x, var_y, cov = filt(x * x) - mu_x**2, filt(y * y) - mu_y**2, filt(x * y) - mu_x * mu_y
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    ssim_map = (((2 * mu_x * mu_y + c1) * (2 * cov + c2))
                / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2)))
    return ssim_map.mean(dim=(1, 2, 3))


def lowfreq_psnr(x, y, factor):
    """(B,) PSNR after average-pooling both images by `factor` (the compression f) to the latent's
    resolution: it scores what z can carry, blind to detail finer than one latent cell."""
    return psnr(F.avg_pool2d(x.double(), factor), F.avg_pool2d(y.double(), factor))


def highfreq_energy(x, factor):
    """(B,) spectral energy of x above the latent grid's Nyquist frequency: sum |X|^2 of each
    channel's 2-D DFT over the frequencies (ky, kx), in cycles per image, that a grid of H / factor
    cells cannot represent, max(|ky|, |kx|) > H / (2 factor). (Parseval: the sum over all
    frequencies is H * W times the pixel energy.)"""
    H, W = x.shape[-2:]
    spec = torch.fft.fft2(x.double()).abs() ** 2  # (B, 3, H, W)
    ky = torch.fft.fftfreq(H, d=1.0 / H, device=x.device).abs()  # (H,) cycles per image
    kx = torch.fft.fftfreq(W, d=1.0 / W, device=x.device).abs()
    high = torch.maximum(ky[:, None], kx[None, :]) > H / (2 * factor)  # (H, W)
    return (spec * high).sum(dim=(1, 2, 3))


def highfreq_ratio(recon_energy, real_energy):
    """Total high-frequency energy of the reconstructions over the originals': 1 as detailed, < 1
    blurred (regression to the mean), > 1 noisier. A ratio of totals, not a mean of per-image
    ratios, since flat images have no such energy."""
    return float(np.sum(recon_energy) / max(np.sum(real_energy), 1e-12))


def band_power(x):
    """(B, 3 * H // 2) spectrum: log(1 + mean |X(k)|^2) per channel and radial band b, the
    frequencies k in cycles per image with b < |k| <= b + 1, b = 0 .. H/2 - 1 (k = 0, the mean
    colour, is left to PSNR). Its Frechet distance (eval.py's spectral_fd) needs no pretrained
    network: blur lowers the high bands, noise raises them, plausible detail matches them. It
    ignores where detail is: a circularly shifted image has the same vector."""
    B, C, H, W = x.shape
    spec = torch.fft.fft2(x.double()).abs() ** 2 / (H * W)  # (B, 3, H, W), per-pixel energy scale
    ky = torch.fft.fftfreq(H, d=1.0 / H, device=x.device)
    kx = torch.fft.fftfreq(W, d=1.0 / W, device=x.device)
    radius = (ky[:, None] ** 2 + kx[None, :] ** 2).sqrt()  # (H, W)
    band = (radius.ceil() - 1).long()  # band of each frequency; -1 for k = 0
    n_bands = H // 2
    keep = (band >= 0) & (band < n_bands)  # the corners beyond H/2 are left out with k = 0
    onehot = F.one_hot(band[keep], n_bands).double()  # (n_kept, n_bands)
    power = spec[..., keep] @ onehot / onehot.sum(0)  # (B, 3, n_bands): mean power per band
    return torch.log1p(power).flatten(1)  # (B, 3 * n_bands)


# -----------------------------------------------------------------------------
# distribution metrics on Inception features


def feature_stats(f, device="cpu"):
    """(N, D) features -> float64 mean (D,) and covariance (D, D), normalised by N - 1 as np.cov."""
    f = torch.as_tensor(f).to(device, torch.float64)
    mu = f.mean(0)
    d = f - mu
    return mu.cpu(), (d.t() @ d / (len(f) - 1)).cpu()


def _sqrt_psd(a):
    """Symmetric PSD square root through eigh; tiny negative eigenvalues (round-off) become 0."""
    w, v = torch.linalg.eigh(a)
    return (v * w.clamp_min(0).sqrt()) @ v.t()


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)), in float64, without scipy.

    S1 S2 is not symmetric (scipy's sqrtm can return complex garbage for nearly singular
    covariances), but it is similar to the symmetric PSD S1^(1/2) S2 S1^(1/2), so tr sqrtm(S1 S2) is
    the sum of the square roots of that matrix's eigenvalues, which eigvalsh gets stably."""
    mu1, sigma1, mu2, sigma2 = (torch.as_tensor(t).double() for t in (mu1, sigma1, mu2, sigma2))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"statistics of different sizes: {tuple(mu1.shape)} vs {tuple(mu2.shape)}")
    s1_half = _sqrt_psd(sigma1)
    m = s1_half @ sigma2 @ s1_half
    tr_covmean = torch.linalg.eigvalsh((m + m.t()) / 2).clamp_min(0).sqrt().sum()
    diff = mu1 - mu2
    return float(diff @ diff + sigma1.trace() + sigma2.trace() - 2 * tr_covmean)


def inception_score(logits, splits=10):
    """IS = exp(E_x KL(p(y|x) || p(y))) on each of `splits` chunks -> (mean, std) over chunks, p(y)
    the chunk's mean prediction (improved-GAN, ADM: 10 chunks of 5000 for 50K samples)."""
    p = torch.softmax(torch.as_tensor(logits).double(), dim=1)  # (N, 1008)
    scores = []
    for part in p.tensor_split(min(splits, len(p))):  # exactly `splits` near-equal chunks
        py = part.mean(0, keepdim=True)  # (1, 1008) marginal
        # xlogy: 0 * log 0 = 0 for saturated softmax outputs
        kl = (torch.xlogy(part, part) - torch.xlogy(part, py)).sum(1).mean()
        scores.append(kl.exp())
    scores = torch.stack(scores)
    return float(scores.mean()), float(scores.std(unbiased=False))


def _sq_dists(a, b):
    """(n, D), (m, D) -> (n, m) squared Euclidean distances (the ADM evaluator's form), >= 0."""
    return ((a * a).sum(1, keepdim=True) - 2 * a @ b.t() + (b * b).sum(1)[None]).clamp_min(0)


def knn_radii(f, k=3, block=1024):
    """(N,) squared distance from each row of f to its k-th nearest other row (itself is 0th)."""
    return torch.cat([_sq_dists(f[i : i + block], f).topk(k + 1, dim=1, largest=False).values[:, k]
                      for i in range(0, len(f), block)])


def inside(f, ref, radii, block=1024):
    """(N,) bool: row i of f lies within the k-NN ball of at least one row of ref."""
    return torch.cat([(_sq_dists(f[i : i + block], ref) <= radii[None]).any(1)
                      for i in range(0, len(f), block)])


def precision_recall(ref_feats, sample_feats, k=3, device="cpu"):
    """Improved precision (samples in the reals' k-NN balls) and recall (reals in the samples')."""
    r = torch.as_tensor(ref_feats, dtype=torch.float32, device=device)
    s = torch.as_tensor(sample_feats, dtype=torch.float32, device=device)
    precision = inside(s, r, knn_radii(r, k)).double().mean()
    recall = inside(r, s, knn_radii(s, k)).double().mean()
    return float(precision), float(recall)
