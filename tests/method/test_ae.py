"""The DGAE autoencoder (ae.py): shapes, posterior, determinism, loss terms, and a tiny overfit."""

import copy
from dataclasses import replace

import pytest
import torch

import ae
from support import common
from support.optim import update_ema
from support.procedural import ProceduralDataset


def _tiny(**kw):
    # narrower than the `tiny` preset so the tests stay fast
    args = dict(enc_ch=16, unet_ch=16, cond_ch=16, unet_mult=(1, 2), attn_res=(16,))
    args.update(kw)
    return ae.make_config("tiny", **args)


@pytest.mark.parametrize("f", [8, 16, 32, 64])
@pytest.mark.parametrize("decoder", ["diffusion", "gaussian"])
def test_shapes_for_every_compression(f, decoder):
    torch.manual_seed(0)
    cfg = _tiny(resolution=64, compression=f, decoder=decoder)
    assert cfg.latent_channels == {8: 4, 16: 8, 32: 16, 64: 64}[f]  # ae.DEFAULT_LATENT_CHANNELS: half the usual f16c16, f32c32, f64c128
    model = ae.DGAE(cfg)
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    z = model.encode(x)
    assert z.shape == (2, cfg.latent_channels, 64 // f, 64 // f)
    assert model.decode(z, steps=2).shape == (2, 3, 64, 64)
    loss, terms = model.loss(x)
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert set(terms) == ({"flow", "recon", "consistency", "psnr_t1", "kl"} if decoder == "diffusion" else {"l1", "kl"})


def test_latent_channels_flag_overrides_the_default():
    cfg = _tiny(compression=16, latent_channels=12)
    assert ae.DGAE(cfg).encode(torch.zeros(1, 3, 32, 32)).shape == (1, 12, 2, 2)


def test_impossible_sizes_are_clear_errors():
    with pytest.raises(ValueError, match="not divisible by --compression"):
        ae.make_config("tiny", resolution=40, compression=16)
    with pytest.raises(ValueError, match="--compression must be one of"):
        ae.make_config("tiny", compression=2)
    with pytest.raises(ValueError, match="unknown model preset"):
        ae.make_config("huge")
    with pytest.raises(ValueError, match="--decoder"):
        ae.make_config("tiny", decoder="gan")


def test_posterior_kl_sample_and_mode():
    mean = torch.tensor([0.5, -1.0]).view(1, 2, 1, 1)
    logvar = torch.tensor([0.0, 1.0]).view(1, 2, 1, 1)
    q = ae.DiagonalGaussian(torch.cat([mean, logvar], dim=1))
    # KL(N(m, v) || N(0, 1)) = 1/2 (m^2 + v - 1 - log v), summed over dims
    ref = 0.5 * (0.25 + 1 - 1 - 0) + 0.5 * (1.0 + torch.e - 1 - 1)
    assert torch.allclose(q.kl(), torch.tensor([ref]))
    assert torch.equal(q.mode(), mean)
    assert ae.DiagonalGaussian(torch.zeros(3, 4, 2, 2)).kl().abs().max() == 0  # q == prior
    # reparameterisation: the sample has the right moments and gradients reach mean and logvar
    moments = torch.cat([mean, logvar], dim=1).repeat(20000, 1, 1, 1).requires_grad_(True)
    z = ae.DiagonalGaussian(moments).sample()
    assert torch.allclose(z.mean(0).flatten(), mean.flatten(), atol=0.03)
    assert torch.allclose(z.var(0).flatten(), logvar.exp().flatten(), rtol=0.05)
    z.sum().backward()
    assert moments.grad.abs().sum() > 0


def test_decode_is_deterministic_under_a_seed():
    torch.manual_seed(0)
    model = ae.DGAE(_tiny()).eval()
    z = torch.randn(2, 4, 4, 4)
    a, b = model.decode(z, steps=3, seed=7), model.decode(z, steps=3, seed=7)
    assert torch.equal(a, b)
    assert not torch.equal(a, model.decode(z, steps=3, seed=8))
    # the global RNG is neither used nor disturbed by decoding
    state = torch.get_rng_state()
    model.reconstruct(torch.zeros(1, 3, 32, 32), steps=2)
    assert torch.equal(state, torch.get_rng_state())


def test_decoding_between_training_steps_leaves_the_model_trainable():
    # train_ae.py draws its grids with ema.reconstruct under torch.no_grad() between training steps:
    # nothing is recorded, and the next step and the EMA update work as before
    torch.manual_seed(0)
    model = ae.DGAE(_tiny())
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        recon = model.reconstruct(x, steps=2)
    assert recon.grad_fn is None
    ema = copy.deepcopy(model)
    model.loss(x)[0].backward()
    update_ema(ema, model, 0.5)
    assert all(p.grad is not None for p in model.encoder.parameters())


def test_decoding_passes_a_gradient_to_the_latent_when_asked():
    # without no_grad the decoder is an ordinary differentiable function of z (an exercise may optimise z)
    torch.manual_seed(0)
    model = ae.DGAE(_tiny())
    for p in model.parameters():  # the zero-initialised output layers would make the gradient 0
        p.data.add_(0.02 * torch.randn_like(p))
    z = torch.randn(1, 4, 8, 8, requires_grad=True)
    model.decode(z, steps=2).sum().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0


def test_lpips_term_enters_the_loss_and_its_gradient_reaches_the_encoder():
    from support.perceptual import LPIPS

    torch.manual_seed(0)
    model = ae.DGAE(_tiny(lpips_weight=0.5, anchor_ch=8))  # anchored: LPIPS on x0_hat and on the anchor's x~
    lp = LPIPS()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    torch.manual_seed(1)
    loss, terms = model.loss(x, lp)
    torch.manual_seed(1)
    x_tilde = model.anchor(model.posterior(x).sample())  # the loss's first draw is the posterior sample
    assert "lpips" in terms and terms["lpips"] > 0
    assert torch.allclose(loss, terms["flow"] + terms["recon"] + terms["consistency"] + 0.5 * terms["lpips"]
                          + model.cfg.kl_weight * terms["kl"] + terms["anchor"] + 0.5 * lp(x_tilde, x).mean())
    loss.backward()
    assert all(p.grad is not None for p in model.encoder.parameters())
    assert all(p.grad is None for p in lp.parameters())  # the perceptual network stays frozen


@pytest.mark.parametrize("anchor_ch", [0, 8])
def test_loss_terms_equal_their_formulas_computed_by_hand(anchor_ch):
    # the same random draws as DGAE.loss, in its order: posterior noise, t, eps, then the t = 1 noise
    torch.manual_seed(0)
    model = ae.DGAE(_tiny(recon_weight=0.7, consistency_weight=0.3, kl_weight=1e-3, anchor_ch=anchor_ch,
                          anchor_weight=0.6))
    for p in model.parameters():  # leave the zero-initialised branches: every path must matter
        p.data.add_(torch.randn_like(p) * 0.02)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    torch.manual_seed(1)
    loss, terms = model.loss(x)
    torch.manual_seed(1)
    q = model.posterior(x)
    z = q.sample()
    x_tilde = model.anchor(z) if anchor_ch else None  # (2, 3, 32, 32): the anchored U-Net's extra input
    t = torch.rand(2)  # t ~ uniform, the default
    eps = torch.randn_like(x)
    tb = t.view(2, 1, 1, 1)
    x_t = (1 - tb) * x + tb * eps
    v_hat = model.decoder(x_t, t, z, extra=x_tilde)
    x0_hat = x_t - tb * v_hat
    eps1 = torch.randn_like(x)
    x1_hat = eps1 - model.decoder(eps1, torch.ones(2), z, extra=x_tilde)
    kl = 0.5 * (q.mean**2 + q.logvar.exp() - 1 - q.logvar).sum(dim=(1, 2, 3)).mean() / (3 * 32 * 32)
    expected = {"flow": ((v_hat - (eps - x)) ** 2).mean(), "recon": (x0_hat - x).abs().mean(),
                "consistency": (x1_hat - x).abs().mean(), "kl": kl}
    total = expected["flow"] + 0.7 * expected["recon"] + 0.3 * expected["consistency"] + 1e-3 * kl
    if anchor_ch:
        expected["anchor"] = (x_tilde - x).abs().mean()
        total = total + 0.6 * expected["anchor"]
    assert set(terms) == set(expected) | {"psnr_t1"}
    for k, v in expected.items():
        assert torch.allclose(terms[k], v, rtol=1e-5, atol=1e-7), k
    assert torch.allclose(loss, total)


def _psnr(a, b):
    return (10 * torch.log10(4.0 / ((a - b) ** 2).mean())).item()  # images in [-1, 1]: peak-to-peak 2


# the diffusion decoder needs 300 steps (about 25 s), so it runs with the slow tests
@pytest.mark.parametrize("decoder,steps", [pytest.param("diffusion", 300, marks=pytest.mark.slow), ("gaussian", 150)])
def test_tiny_model_overfits_a_handful_of_images(decoder, steps, both_cores):
    torch.manual_seed(0)
    ds = ProceduralDataset(resolution=32, size=4)
    x = torch.stack([ds[i][0] for i in range(4)])  # (4, 3, 32, 32)
    model = ae.DGAE(_tiny(decoder=decoder, t_dist="uniform"))
    before = _psnr(model.reconstruct(x, steps=10), x)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    ema = copy.deepcopy(model)
    losses = []
    for _ in range(steps):
        loss, _ = model.loss(x)
        opt.zero_grad()
        loss.backward()
        opt.step()
        update_ema(ema, model, 0.9)
        losses.append(loss.item())
    first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    after = _psnr(ema.reconstruct(x, steps=10), x)
    assert last < 0.5 * first, f"loss did not fall: {first:.3f} -> {last:.3f}"
    assert after > before + 10, f"PSNR did not rise: {before:.1f} -> {after:.1f} dB"


def test_the_gaussian_baseline_gets_the_width_closest_to_the_diffusion_decoders_size():
    cfg = ae.make_config("tiny", decoder="gaussian")
    target = common.count_params(ae.DGAE(replace(cfg, decoder="diffusion")).decoder)
    size = lambda ch: common.count_params(ae.GaussianDecoder(replace(cfg, gauss_ch=ch)))  # noqa: E731
    assert cfg.gauss_ch % 4 == 0
    # no other multiple of 4 comes closer to the diffusion decoder's parameter count
    assert all(abs(size(cfg.gauss_ch) - target) <= abs(size(ch) - target) for ch in range(4, 129, 4))
    # 0 ("match it") is make_config's to resolve; a hand-built config is told so instead of a shape error
    with pytest.raises(ValueError, match="make_config"):
        ae.GaussianDecoder(replace(cfg, gauss_ch=0))
