"""The rectified-flow math, the shared attention and time embedding, activation checkpointing and the
conditional U-Net denoiser (decoder_diffusion.py)."""

import math

import pytest
import torch

import decoder_diffusion as dd


def test_noising_velocity_and_one_step_estimate_match_hand_computed_values():
    x = torch.tensor([[1.0, -1.0]])  # (B=1, 2)
    eps = torch.tensor([[0.5, 2.0]])
    t = torch.tensor([0.25])
    x_t = dd.add_noise(x, eps, t)
    # (1 - 0.25) * 1 + 0.25 * 0.5 = 0.875 ; 0.75 * -1 + 0.25 * 2 = -0.25
    assert torch.allclose(x_t, torch.tensor([[0.875, -0.25]]))
    v = dd.velocity_target(x, eps)
    assert torch.allclose(v, torch.tensor([[-0.5, 3.0]]))
    # with the true velocity the one-step estimate recovers x exactly
    assert torch.allclose(dd.x0_estimate(x_t, t, v), x)
    # t is per-sample: broadcast over all other dims
    x4 = torch.ones(2, 3, 4, 4)
    out = dd.add_noise(x4, torch.zeros_like(x4), torch.tensor([0.0, 1.0]))
    assert torch.equal(out[0], x4[0]) and torch.equal(out[1], torch.zeros(3, 4, 4))


def test_t_sampling_distributions():
    torch.manual_seed(0)
    u = dd.sample_t(20000, "uniform")
    ln = dd.sample_t(20000, "logit_normal")
    for t in (u, ln):
        assert t.shape == (20000,) and t.min() > 0 and t.max() < 1
    assert abs(u.mean().item() - 0.5) < 0.01 and abs(u.var().item() - 1 / 12) < 0.003
    # logit(t) ~ N(0, 1): check the moments of the logit
    logit = torch.log(ln / (1 - ln))
    assert abs(logit.mean().item()) < 0.03 and abs(logit.std().item() - 1.0) < 0.03
    with pytest.raises(ValueError, match="unknown t distribution"):
        dd.sample_t(4, "beta")


def test_euler_sampler_integrates_straight_line_field_exactly():
    # The velocity of the straight path through a fixed point x0 is v(x, t) = (x - x0) / t.
    # Euler steps along a straight line are exact, so any number of steps lands on x0.
    torch.manual_seed(0)
    x0 = torch.randn(3, 2, 5, 5)
    x1 = torch.randn(3, 2, 5, 5)
    calls = []

    def v(x, t):
        calls.append(t.clone())
        assert t.shape == (3,)
        return (x - x0) / t.view(-1, 1, 1, 1)

    for steps in (1, 4, 7):
        calls.clear()
        out = dd.euler_sample(v, x1, steps)
        assert torch.allclose(out, x0, atol=1e-5)
        assert len(calls) == steps and calls[0][0].item() == 1.0
        assert math.isclose(calls[-1][0].item(), 1.0 / steps, rel_tol=1e-6)


def test_euler_sampler_matches_closed_form_for_linear_field():
    # dx/dt = a x  -> Euler from t=1 to 0 with N steps of dt = -1/N gives x1 * (1 - a/N)^N
    x1 = torch.randn(2, 3)
    a = 0.7
    out = dd.euler_sample(lambda x, t: a * x, x1, 5)
    assert torch.allclose(out, x1 * (1 - a / 5) ** 5, atol=1e-6)


def test_a_gradient_flows_through_the_sampler_when_asked():
    # the sampler is a plain function of tensors: an exercise may backpropagate through it (the scripts
    # sample under torch.no_grad()); for dx/dt = a x the Jacobian d x0 / d x1 is (1 - a/N)^N
    x1 = torch.randn(2, 3, requires_grad=True)
    dd.euler_sample(lambda x, t: 0.7 * x, x1, 5).sum().backward()
    assert torch.allclose(x1.grad, torch.full_like(x1, (1 - 0.7 / 5) ** 5))


def test_flow_matching_loss_is_the_mse_on_the_velocity():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 8, 8)
    net = lambda x_t, t: x_t * 0.3 + t.view(-1, 1, 1, 1)  # any differentiable function
    torch.manual_seed(1)
    loss, x_t, t, v_hat = dd.flow_matching_loss(net, x, "uniform")
    torch.manual_seed(1)  # redraw the same t and eps by hand
    t_ref = torch.rand(4)
    eps = torch.randn_like(x)
    x_t_ref = (1 - t_ref.view(-1, 1, 1, 1)) * x + t_ref.view(-1, 1, 1, 1) * eps
    assert torch.equal(t, t_ref) and torch.allclose(x_t, x_t_ref)
    ref = ((net(x_t_ref, t_ref) - (eps - x)) ** 2).mean()
    assert torch.allclose(loss, ref)


def _unet(cond, f=8, res=32):
    torch.manual_seed(0)
    net = dd.UNet(latent_channels=4, compression=f, resolution=res, ch=16, ch_mult=(1, 2), num_res_blocks=1,
                  attn_res=(16,), cond=cond, cond_ch=16)
    with torch.no_grad():  # undo the zero init of the residual branches, so that the output depends on x_t, t, z
        for p in net.parameters():
            if not p.any():
                p.normal_(std=0.05)
    return net


@pytest.mark.parametrize("cond", ["latent_decoder", "concat"])
@pytest.mark.parametrize("f", [8, 16, 32])
def test_unet_shapes_for_every_compression(cond, f):
    net = _unet(cond, f)
    x = torch.randn(2, 3, 32, 32)
    z = torch.randn(2, 4, 32 // f, 32 // f)
    assert net(x, torch.rand(2), z).shape == (2, 3, 32, 32)


@pytest.mark.parametrize("cond", ["latent_decoder", "concat"])
def test_denoiser_uses_z_and_t(cond):
    net = _unet(cond)
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([0.3, 0.8])
    z = torch.randn(2, 4, 4, 4, requires_grad=True)
    out = net(x, t, z)
    assert not torch.allclose(out, net(x, t, z + 1.0), atol=1e-4), "changing z must change the output"
    assert not torch.allclose(out, net(x, t.flip(0), z), atol=1e-4), "changing t must change the output"
    # and the gradient reaches z, so the encoder is trained through the decoder
    out.square().mean().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0


def test_zero_init_makes_the_untrained_denoiser_output_zero_but_trainable():
    torch.manual_seed(0)
    net = dd.UNet(4, 8, 32, ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_res=(16,), cond_ch=16)
    x, z = torch.randn(2, 3, 32, 32), torch.randn(2, 4, 4, 4)
    out = net(x, torch.rand(2), z)
    assert torch.equal(out, torch.zeros_like(out))
    out.sum().backward()  # the output conv still receives a gradient, so training can start
    assert net.conv_out.weight.grad.abs().sum() > 0


def test_latent_decoder_emits_a_map_at_every_resolution_from_latent_to_image():
    ld = dd.LatentDecoder(latent_channels=4, compression=8, ch=16)
    feats = ld(torch.randn(2, 4, 4, 4))
    assert sorted(feats) == [4, 8, 16, 32]
    assert all(v.shape == (2, 16, r, r) for r, v in feats.items())


def test_unknown_conditioning_is_an_error():
    with pytest.raises(ValueError, match="unknown cond"):
        dd.UNet(4, 8, 32, cond="crossattn")


# -----------------------------------------------------------------------------
# activation checkpointing (training), and sampling without autograd's records


def _checkpointing_case(kind):
    """(model in training mode, its training loss as a function, the block classes it checkpoints),
    with every zero-initialised weight made random, so that every gradient is live."""
    from ae import DGAE, make_config
    from dit import DiTBlock, build_dit

    torch.manual_seed(0)
    if kind == "dit":  # label dropout 0.5: the forward draws random numbers outside the blocks
        model, blocks = build_dit("DiT-Tiny/2", 8, 4, 10, class_dropout_prob=0.5), (DiTBlock,)
        z, y = torch.randn(4, 4, 8, 8), torch.randint(0, 10, (4,))
        loss = lambda: dd.flow_matching_loss(lambda x_t, t: model(x_t, t, y), z)[0]  # noqa: E731  (train_dit.py's)
    else:  # dropout 0.2 in the U-Net: random numbers drawn inside the checkpointed blocks
        cfg = make_config("tiny", decoder=kind, enc_ch=16, unet_ch=16, cond_ch=16, unet_mult=(1, 2), attn_res=(16,),
                          dropout=0.2)
        model, blocks = DGAE(cfg), (dd.ResBlock, dd.AttnBlock)
        x = torch.rand(4, 3, 32, 32) * 2 - 1
        loss = lambda: model.loss(x)[0]  # noqa: E731  (train_ae.py's, without LPIPS)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(std=0.1)
    return model.train(), loss, blocks


@pytest.mark.parametrize("kind", ["dit", "diffusion", "gaussian"])
def test_grad_checkpointing_changes_memory_only_not_gradients_or_rng(kind):
    model, loss_fn, blocks = _checkpointing_case(kind)
    calls = []
    for m in model.modules():
        if isinstance(m, blocks):
            m.register_forward_pre_hook(lambda *_: calls.append(1))

    def step(on):
        """One forward + backward from RNG seed 1: (loss, gradients, RNG state after, block calls,
        bytes autograd saved for the backward outside the checkpointed blocks)."""
        model.grad_checkpoint = on
        model.zero_grad(set_to_none=True)
        calls.clear()
        saved = []
        torch.manual_seed(1)
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel() * t.element_size()) or t,
                                                      lambda t: t):
            loss = loss_fn()
        loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters()}
        return loss, grads, torch.get_rng_state(), len(calls), sum(saved)

    loss0, grads0, rng0, calls0, saved0 = step(False)
    loss1, grads1, rng1, calls1, saved1 = step(True)
    # bit-identical: the replay in the backward is the same computation with the same random numbers
    # (checkpoint's preserve_rng_state), and autograd accumulates the gradients in the same order
    assert torch.equal(loss0, loss1)
    assert grads0.keys() == grads1.keys() and all(g is not None for g in grads0.values())
    for n in grads0:
        assert torch.equal(grads0[n], grads1[n]), n
    # the RNG continues exactly as without the replay, so a resumed run draws what the whole run drew
    assert torch.equal(rng0, rng1)
    # and checkpointing did happen: every block's forward started again in the backward (the replay stops
    # early, once it has rebuilt what the backward needs, so a forward hook would miss it), and far less was
    # kept for the backward outside them
    assert calls0 > 0 and calls1 == 2 * calls0
    assert saved1 < saved0 / 2
    # a runtime switch, not part of the model: neither its config nor its weights hold it, and a model
    # rebuilt from a checkpoint's config has it off
    from ae import config_to_dict
    config = model.config if kind == "dit" else config_to_dict(model.cfg)
    rebuilt = type(model)(**config) if kind == "dit" else type(model)(model.cfg)
    assert "grad_checkpoint" not in config and set(rebuilt.state_dict()) == set(model.state_dict())
    assert model.grad_checkpoint and not rebuilt.grad_checkpoint
    # without autograd (the EMA's grids, decoding) nothing is replayed: each block runs once
    calls.clear()
    with torch.no_grad():
        loss_fn()
    assert len(calls) == calls0


def test_sampling_under_no_grad_records_nothing():
    # what the scripts do: under torch.no_grad() a sample from trainable weights carries no graph
    net = torch.nn.Linear(3, 3)
    with torch.no_grad():
        x = dd.euler_sample(lambda x, t: net(x), torch.randn(2, 3), 2)
    assert x.grad_fn is None and not x.requires_grad
    assert dd.euler_sample(lambda x, t: net(x), torch.randn(2, 3), 2).grad_fn is not None


def test_sdpa_takes_the_unet_attentions_strided_qkv_and_agrees_with_math():
    """From an NCHW tensor the U-Net's q, k, v have stride H*W in their last dimension, which the fused SDPA
    kernels refuse; decoder_diffusion.attention hands them over with a unit stride, and the result is the math path's."""
    from decoder_diffusion import attention

    qkv = torch.randn(2, 3, 2, 8, 16 * 16)  # (B, 3, nh, hs, HW), as DiffusionUNet's attention reshapes it
    q, k, v = qkv.transpose(-1, -2).unbind(1)  # (B, nh, HW, hs), stride(-1) = HW
    assert q.stride(-1) == 256
    assert torch.allclose(attention(q, k, v, "sdpa"), attention(q, k, v, "math"), atol=1e-5)
