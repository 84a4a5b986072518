"""Tests for metrics.py: PSNR, SSIM, the low-frequency PSNR and high-frequency ratio, FID, IS and
precision/recall against hand-computed values and slow reference implementations."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from support import metrics

# -----------------------------------------------------------------------------
# PSNR and SSIM


CAP_DB = 10 * math.log10(255**2 * 12)  # PSNR at the MSE floor of 1/12 (8-bit rounding): 58.9 dB


def test_psnr_identical_images_is_the_cap_and_a_constant_offset_gives_20log10_255_over_d():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(20, 200, (2, 3, 16, 16), generator=g).double()
    assert torch.allclose(metrics.psnr(x, x), torch.full((2,), CAP_DB, dtype=torch.float64))
    # a flat image against its own mean colour (the trivial baseline) is finite, so a folder's mean is too
    flat = torch.full((1, 3, 16, 16), 77.0)
    assert torch.isfinite(torch.cat([metrics.psnr(flat, flat.mean(dim=(2, 3), keepdim=True).expand_as(flat)),
                                     metrics.psnr(x, x + 3)])).all()
    # just above the floor the standard formula holds: an offset of 0.5 everywhere is MSE 0.25 > 1/12
    assert torch.allclose(metrics.psnr(x, x + 0.5), torch.full((2,), 20 * math.log10(255 / 0.5), dtype=torch.float64))
    # every pixel off by exactly d: MSE = d^2, PSNR = 10 log10(255^2 / d^2)
    assert torch.allclose(metrics.psnr(x, x + 10), torch.full((2,), 20 * math.log10(255 / 10), dtype=torch.float64))


def test_ssim_identical_is_one_and_a_constant_offset_of_a_flat_image_is_the_luminance_term():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (2, 3, 16, 16), generator=g).double()
    assert torch.allclose(metrics.ssim(x, x), torch.ones(2, dtype=torch.float64))
    # flat images 100 vs 110: variances and covariance are 0, so SSIM = (2 mu_x mu_y + C1) / (mu_x^2 + mu_y^2 + C1)
    c1 = (0.01 * 255) ** 2
    expected = (2 * 100 * 110 + c1) / (100**2 + 110**2 + c1)
    assert metrics.ssim(torch.full((1, 3, 16, 16), 100.0), torch.full((1, 3, 16, 16), 110.0)).item() == pytest.approx(expected, rel=1e-12)


def test_psnr_and_ssim_of_a_known_blur_match_the_hand_computed_values():
    a, b, H, W = 40.0, 200.0, 16, 32
    cols = torch.tensor([a if j % 2 == 0 else b for j in range(W)])
    x = cols.expand(1, 3, H, W).clone()  # vertical stripes a, b, a, b, ...
    # a horizontal [1/4, 1/2, 1/4] blur (wrapping around) turns period-2 stripes into flat (a + b) / 2
    kernel = torch.tensor([0.25, 0.5, 0.25]).view(1, 1, 1, 3).repeat(3, 1, 1, 1)
    y = F.conv2d(F.pad(x, (1, 1, 0, 0), mode="circular"), kernel, groups=3)
    m = (a + b) / 2
    assert torch.equal(y, torch.full_like(x, m))
    assert metrics.psnr(x, y).item() == pytest.approx(10 * math.log10(255**2 / ((a - b) / 2) ** 2), rel=1e-12)
    # SSIM by hand: within a window centred on an `a` column, the Gaussian weight on `a` columns is
    # w_e (even offsets), on `b` columns w_o = 1 - w_e. Then mu_x = w_e a + w_o b, var_x =
    # w_e w_o (a - b)^2, and y is flat (var_y = cov = 0). Centres on `b` columns swap a and b; the
    # 22 valid centres of a 32-wide image are half of each kind.
    g = [math.exp(-(o**2) / (2 * 1.5**2)) for o in range(-5, 6)]
    w_e = sum(g[o + 5] for o in range(-4, 5, 2)) / sum(g)
    w_o = 1 - w_e
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2

    def ssim_at(mu_x):
        return (2 * mu_x * m + c1) / (mu_x**2 + m**2 + c1) * c2 / (w_e * w_o * (a - b) ** 2 + c2)

    expected = (ssim_at(w_e * a + w_o * b) + ssim_at(w_e * b + w_o * a)) / 2
    assert metrics.ssim(x, y).item() == pytest.approx(expected, rel=1e-10)


def test_ssim_matches_a_slow_window_by_window_reference():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (2, 3, 14, 15)).astype(np.float64)
    y = np.clip(x + rng.normal(0, 30, x.shape), 0, 255).round()
    c = np.arange(11) - 5.0
    g = np.exp(-(c**2) / (2 * 1.5**2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    ref = np.zeros(2)
    for n in range(2):
        vals = []
        for ch in range(3):
            for i in range(14 - 10):
                for j in range(15 - 10):
                    px, py = x[n, ch, i : i + 11, j : j + 11], y[n, ch, i : i + 11, j : j + 11]
                    mx, my = (w * px).sum(), (w * py).sum()
                    vx, vy = (w * (px - mx) ** 2).sum(), (w * (py - my) ** 2).sum()
                    cxy = (w * (px - mx) * (py - my)).sum()
                    vals.append((2 * mx * my + c1) * (2 * cxy + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
        ref[n] = np.mean(vals)
    assert np.allclose(metrics.ssim(torch.from_numpy(x), torch.from_numpy(y)).numpy(), ref, rtol=1e-10)


# -----------------------------------------------------------------------------
# low-frequency PSNR and high-frequency ratio (no pretrained network)


def _wave(freq, H=32, axis=-1, amp=50.0):
    """(1, 3, H, H) pixels: 128 + amp * cos(2 pi freq u / H) along one axis, freq in cycles per image."""
    u = torch.arange(H, dtype=torch.float64)
    w = 128 + amp * torch.cos(2 * math.pi * freq * u / H)
    return (w.view(1, 1, 1, H) if axis == -1 else w.view(1, 1, H, 1)).expand(1, 3, H, H).clone()


def test_lowfreq_psnr_of_identical_images_is_the_cap_and_sees_a_constant_colour_shift_exactly():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(20, 200, (2, 3, 32, 32), generator=g).double()
    assert torch.allclose(metrics.lowfreq_psnr(x, x, 8), torch.full((2,), CAP_DB, dtype=torch.float64))
    # pooling keeps a constant offset d unchanged: PSNR = 10 log10(255^2 / d^2), as at full resolution
    shifted = x + torch.tensor([6.0, -6.0, 6.0]).view(1, 3, 1, 1)
    assert torch.allclose(metrics.lowfreq_psnr(x, shifted, 8), torch.full((2,), 20 * math.log10(255 / 6), dtype=torch.float64))


def test_lowfreq_psnr_is_blind_to_detail_inside_a_latent_cell():
    # a period-2 stripe pattern averages to its mean in every 8x8 cell: invisible at the latent's scale
    stripes = _wave(16, amp=60.0)  # 16 cycles over 32 px
    flat = torch.full_like(stripes, 128.0)
    assert torch.allclose(metrics.lowfreq_psnr(stripes, flat, 8), torch.full((1,), CAP_DB, dtype=torch.float64))
    assert metrics.psnr(stripes, flat).item() < 20


def test_highfreq_energy_counts_only_frequencies_above_the_latent_grids_nyquist():
    # at f=8 on 32 px the latent grid is 4x4, its Nyquist 2 cycles per image
    low, high = _wave(2), _wave(3, axis=-2)
    assert metrics.highfreq_energy(low, 8).item() == pytest.approx(0.0, abs=1e-6)
    # Parseval: a cosine of amplitude A has pixel energy H W A^2 / 2 per channel, so DFT energy
    # (H W)^2 A^2 / 2, all of it at +-3 cycles; the constant 128 sits at frequency 0
    assert metrics.highfreq_energy(high, 8).item() == pytest.approx(3 * (32 * 32) ** 2 * 50.0**2 / 2, rel=1e-9)
    assert metrics.highfreq_energy(low + high - 128, 8).item() == pytest.approx(metrics.highfreq_energy(high, 8).item(), rel=1e-9)


def test_highfreq_ratio_is_one_for_identical_images_and_drops_under_a_known_blur():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (4, 3, 32, 32), generator=g).double()
    e = metrics.highfreq_energy(x, 8).numpy()
    assert metrics.highfreq_ratio(e, e) == pytest.approx(1.0)
    # a 3x3 box blur (circular) multiplies frequency (ky, kx) by |H(ky) H(kx)|^2 <= 1, strictly < 1 above 0
    kernel = torch.full((3, 1, 3, 3), 1 / 9, dtype=torch.float64)
    blurred = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="circular"), kernel, groups=3)
    ratio = metrics.highfreq_ratio(metrics.highfreq_energy(blurred, 8).numpy(), e)
    # the same ratio from the blur's transfer function: H(k) = (1 + 2 cos(2 pi k / 32)) / 3
    k = torch.fft.fftfreq(32, d=1 / 32, dtype=torch.float64)
    h = (1 + 2 * torch.cos(2 * math.pi * k / 32)) / 3
    spec = torch.fft.fft2(x).abs() ** 2 * (h[:, None] * h[None, :]) ** 2
    high = torch.maximum(k.abs()[:, None], k.abs()[None, :]) > 2
    assert ratio == pytest.approx((spec * high).sum().item() / e.sum(), rel=1e-9)
    assert ratio < 0.5


# -----------------------------------------------------------------------------
# FID, IS, precision/recall


def test_fid_is_zero_for_identical_statistics_even_when_the_covariance_is_singular():
    g = torch.Generator().manual_seed(0)
    f = torch.randn(200, 16, generator=g, dtype=torch.float64) @ torch.randn(16, 16, generator=g, dtype=torch.float64)
    mu, sigma = metrics.feature_stats(f)
    assert abs(metrics.frechet_distance(mu, sigma, mu, sigma)) < 1e-9 * sigma.trace().item()
    mu, sigma = metrics.feature_stats(f[:6])  # 6 samples in 16 dimensions: rank 5
    assert abs(metrics.frechet_distance(mu, sigma, mu, sigma)) < 1e-5 * sigma.trace().item()


def test_feature_stats_are_numpys_mean_and_unbiased_covariance():
    f = np.random.default_rng(0).normal(size=(50, 7))
    mu, sigma = metrics.feature_stats(f)
    assert np.allclose(mu.numpy(), f.mean(0)) and np.allclose(sigma.numpy(), np.cov(f, rowvar=False))


def test_fid_equals_the_closed_form_for_gaussians_with_known_parameters():
    # 1-D: (m1 - m2)^2 + (s1 - s2)^2
    assert metrics.frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(4 + 1, rel=1e-12)
    # commuting covariances Q diag(a) Q^T, Q diag(b) Q^T: |mu1 - mu2|^2 + sum (sqrt a - sqrt b)^2
    g = torch.Generator().manual_seed(1)
    D = 12
    q, _ = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=torch.float64))
    a, b = torch.rand(D, generator=g, dtype=torch.float64) + 0.1, torch.rand(D, generator=g, dtype=torch.float64) * 5
    mu1, mu2 = torch.randn(D, generator=g, dtype=torch.float64), torch.randn(D, generator=g, dtype=torch.float64)
    s1, s2 = q @ torch.diag(a) @ q.t(), q @ torch.diag(b) @ q.t()
    expected = ((mu1 - mu2) ** 2).sum() + ((a.sqrt() - b.sqrt()) ** 2).sum()
    assert metrics.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected.item(), rel=1e-10)


def test_fid_trace_term_matches_the_eigenvalues_of_the_nonsymmetric_product():
    # general (non-commuting) covariances: tr sqrtm(S1 S2) = sum sqrt(eig(S1 S2)), computed here by a
    # different route (general eigensolver on the product itself)
    g = torch.Generator().manual_seed(2)
    A, B = torch.randn(10, 10, generator=g, dtype=torch.float64), torch.randn(10, 10, generator=g, dtype=torch.float64)
    s1, s2 = A @ A.t() + 0.1 * torch.eye(10), B @ B.t()
    mu = torch.zeros(10, dtype=torch.float64)
    tr_sqrt = torch.linalg.eigvals(s1 @ s2).real.clamp_min(0).sqrt().sum()
    expected = s1.trace() + s2.trace() - 2 * tr_sqrt
    assert metrics.frechet_distance(mu, s1, mu, s2) == pytest.approx(expected.item(), rel=1e-9)


def test_inception_score_of_uniform_predictions_is_one():
    mean, std = metrics.inception_score(torch.zeros(100, 1008))
    assert mean == pytest.approx(1.0, abs=1e-12) and std == pytest.approx(0.0, abs=1e-12)


def test_inception_score_of_confident_evenly_spread_predictions_is_the_class_count():
    K, N = 10, 100  # each of the 10 splits (10 samples) holds every class once
    logits = 50.0 * F.one_hot(torch.arange(N) % K, 1008).double()
    assert metrics.inception_score(logits)[0] == pytest.approx(K, rel=1e-9)
    # all samples confidently the same class: no diversity, IS = 1
    assert metrics.inception_score(50.0 * F.one_hot(torch.zeros(N, dtype=torch.long), 1008).double())[0] == pytest.approx(1.0, rel=1e-9)


def test_precision_recall_hand_computed_on_a_line():
    # reals 0..4: squared distance to the 3rd nearest neighbour = 9, 4, 4, 4, 9
    ref = np.arange(5.0)[:, None]
    # fakes: four near 0.5-0.8 (inside the ball of real 0 or 1) and one far away at 20
    fake = np.array([0.5, 0.6, 0.7, 0.8, 20.0])[:, None]
    # precision: 4 of 5 fakes lie in a real ball (20 is 256 from real 4 > 9)
    # recall: fake radii are 0.09, 0.04, 0.04, 0.09, 376.36; real 0 is outside all of them
    # (0.25, 0.36, 0.49, 0.64, 400), reals 1..4 are inside (0.04 <= 0.09; 324, 289, 256 <= 376.36)
    assert metrics.precision_recall(ref, fake, k=3) == pytest.approx((0.8, 0.8))
    assert torch.allclose(metrics.knn_radii(torch.tensor(ref, dtype=torch.float32)), torch.tensor([9.0, 4, 4, 4, 9]))


def test_precision_recall_matches_a_brute_force_reference():
    rng = np.random.default_rng(0)
    ref, fake = rng.normal(size=(30, 3)), rng.normal(0.5, 1.2, size=(40, 3))

    def brute(a, b, k):  # fraction of b inside some k-NN ball of a
        d_aa = ((a[:, None] - a[None]) ** 2).sum(-1)
        radii = np.sort(d_aa, axis=1)[:, k]
        d_ba = ((b[:, None] - a[None]) ** 2).sum(-1)
        return float((d_ba <= radii[None]).any(1).mean())

    p, r = metrics.precision_recall(ref, fake, k=3)
    assert p == pytest.approx(brute(ref, fake, 3)) and r == pytest.approx(brute(fake, ref, 3))
    assert 0 < p < 1 and 0 < r < 1  # the check is not vacuous


def test_conditional_mean_mse_removes_the_sampling_variance_of_a_k_decode_mean():
    """A known answer: decodes = x + bias + noise of sd 10, so E[x_hat | z] misses x by the bias alone (MSE
    9). The mean of K = 4 decodes keeps sigma^2 / K = 25 of the noise (MSE 34); the estimator removes it."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4000, 3, 4, 4, generator=g) * 255
    samples = x + 3.0 + 10.0 * torch.randn(4, *x.shape, generator=g)  # (K, B, 3, H, W)
    naive = ((samples.mean(0) - x) ** 2).mean(dim=(1, 2, 3))
    est = metrics.conditional_mean_mse(samples, x)
    assert naive.mean().item() == pytest.approx(9 + 100 / 4, rel=0.02)
    assert est.mean().item() == pytest.approx(9.0, abs=0.3)  # SE of this mean over 4000 images: about 0.1
    # a deterministic decoder (K identical decodes): nothing to remove
    same = (x + 3.0).expand(2, *x.shape)
    assert torch.allclose(metrics.conditional_mean_mse(same, x), torch.full((4000,), 9.0, dtype=torch.float64))
    assert metrics.psnr_of_mse(torch.tensor([-1.0]))[0] == pytest.approx(10 * math.log10(255**2 * 12))  # floored
