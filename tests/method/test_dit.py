"""Tests for dit.py: the class-conditional DiT that predicts rectified-flow velocities of latents.

Everything runs on the CPU with DiTs of a few hundred thousand parameters. Many properties are
invisible at initialisation (adaLN-Zero makes the output exactly zero and the blocks the identity),
so most tests first give the zero-initialised layers random weights with `randomize_zero_init`.
"""

import math
import time

import pytest
import torch

from dit import DiT, build_dit, pos_embed_2d
import dit
from support import common


def tiny(**kw):
    """A small DiT: 2 blocks, width 32, 4 heads, 10 classes, 4 latent channels, 8x8 input."""
    args = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=4, num_classes=10)
    args.update(kw)
    torch.manual_seed(0)
    return DiT(**args)


def randomize_zero_init(model, seed=1):
    """Give the adaLN modulation layers and the final linear random weights, so every path is live."""
    g = torch.Generator().manual_seed(seed)
    layers = [b.adaLN_modulation[-1] for b in model.blocks]
    layers += [model.final_layer.adaLN_modulation[-1], model.final_layer.linear]
    with torch.no_grad():
        for lin in layers:
            lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * 0.2)
            lin.bias.copy_(torch.randn(lin.bias.shape, generator=g) * 0.2)
    return model


def inputs(model, B=3, H=8, W=8, seed=2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, model.in_channels, H, W, generator=g)
    t = torch.rand(B, generator=g)
    y = torch.randint(0, model.num_classes, (B,), generator=g)
    return x, t, y


# -----------------------------------------------------------------------------
# shapes and layout


@pytest.mark.parametrize("p,size", [(1, (8, 8)), (2, (8, 8)), (4, (8, 8)), (2, (8, 16)), (4, (4, 12))])
def test_output_has_input_shape_for_every_patch_size(p, size):
    model = randomize_zero_init(tiny(patch_size=p, input_size=size)).eval()
    x, t, y = inputs(model, H=size[0], W=size[1])
    v = model(x, t, y)
    assert v.shape == x.shape
    assert model.pos_embed.shape == (1, (size[0] // p) * (size[1] // p), 32)
    assert torch.isfinite(v).all() and v.abs().max() > 0


def test_unpatchify_matches_slow_reference():
    # token (i, j) holds its p x p x C patch as a vector laid out (row in patch, col in patch, channel)
    model = tiny(patch_size=2, input_size=(4, 6), in_channels=3)
    B, (h, w), p, C = 2, model.grid, 2, 3
    tokens = torch.randn(B, h * w, p * p * C)
    out = model.unpatchify(tokens)
    ref = torch.empty(B, C, h * p, w * p)
    for i in range(h):
        for j in range(w):
            for a in range(p):
                for b in range(p):
                    for c in range(C):
                        ref[:, c, i * p + a, j * p + b] = tokens[:, i * w + j, (a * p + b) * C + c]
    assert torch.equal(out, ref)


@pytest.mark.parametrize("p", [1, 2, 4])
def test_patchify_and_unpatchify_agree_on_token_layout(p):
    # At init every block is the identity and the final layer acts on each token alone, so an input
    # pixel may change only the output patch it belongs to. A transposed or mis-ordered token layout
    # anywhere (conv flatten, position table, unpatchify) would move the change somewhere else.
    model = tiny(patch_size=p, input_size=(8, 16)).eval()
    with torch.no_grad():
        model.final_layer.linear.weight.normal_()
    x, t, y = inputs(model, H=8, W=16)
    r, c = 5, 10  # a pixel in patch (5 // p, 10 // p)
    x2 = x.clone()
    x2[:, 1, r, c] += 1.0
    with torch.no_grad():
        diff = (model(x2, t, y) - model(x, t, y)).abs().sum(dim=(0, 1))  # (H, W)
    inside = torch.zeros_like(diff, dtype=torch.bool)
    inside[r // p * p:(r // p + 1) * p, c // p * p:(c // p + 1) * p] = True
    assert diff[inside].min() > 0
    assert diff[~inside].max() == 0


def test_pos_embed_matches_slow_reference():
    dim, H, W = 16, 3, 5
    emb = pos_embed_2d(dim, H, W)
    assert emb.shape == (H * W, dim) and emb.dtype == torch.float32
    ref = torch.empty(H * W, dim)
    q = dim // 4
    for i in range(H):
        for j in range(W):
            for k in range(q):
                omega = 10000.0 ** (-k / q)
                # first half: column j, sin then cos; second half: row i, sin then cos
                ref[i * W + j, k] = math.sin(j * omega)
                ref[i * W + j, q + k] = math.cos(j * omega)
                ref[i * W + j, 2 * q + k] = math.sin(i * omega)
                ref[i * W + j, 3 * q + k] = math.cos(i * omega)
    torch.testing.assert_close(emb, ref, rtol=0, atol=1e-6)


def test_pos_embed_is_a_fixed_buffer_outside_the_checkpoint():
    model = tiny()
    assert "pos_embed" not in dict(model.named_parameters())
    assert "pos_embed" not in model.state_dict()
    assert torch.equal(model.pos_embed[0], pos_embed_2d(32, 4, 4))


# -----------------------------------------------------------------------------
# adaLN-Zero initialisation


def test_output_is_exactly_zero_at_init():
    model = tiny(patch_size=1)
    x, t, y = inputs(model)
    for mode in (model.train, model.eval):
        mode()
        assert torch.equal(model(x, t, y), torch.zeros_like(x))


def test_every_block_is_the_identity_at_init():
    model = tiny()
    tokens = torch.randn(3, 16, 32)
    c = torch.randn(3, 32)
    for block in model.blocks:
        assert torch.equal(block(tokens, c), tokens)
    # and the gradient still reaches the final layer, so training can start
    x, t, y = inputs(model)
    (model(x, t, y) - x).pow(2).sum().backward()  # loss against a non-zero target
    assert model.final_layer.linear.weight.grad.abs().max() > 0


# -----------------------------------------------------------------------------
# the two attention paths


def test_math_and_sdpa_attention_agree_forward_and_backward():
    m_math = randomize_zero_init(tiny(attn_impl="math")).eval()
    m_sdpa = tiny(attn_impl="sdpa").eval()
    m_sdpa.load_state_dict(m_math.state_dict())
    x, t, y = inputs(m_math)
    grads = []
    for model in (m_math, m_sdpa):
        xx, tt = x.clone().requires_grad_(), t.clone().requires_grad_()
        v = model(xx, tt, y)
        (v * torch.linspace(-1, 1, v.numel()).view_as(v)).sum().backward()
        grads.append((v.detach(), xx.grad, tt.grad, {n: p.grad for n, p in model.named_parameters()}))
    (v1, gx1, gt1, gp1), (v2, gx2, gt2, gp2) = grads
    torch.testing.assert_close(v1, v2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx1, gx2, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gt1, gt2, rtol=1e-4, atol=1e-5)
    assert gx1.abs().max() > 0 and gt1.abs().max() > 0
    for name in gp1:
        if name.startswith("y_embedder"):  # only the rows of the labels used get gradient
            assert gp1[name].abs().sum() > 0
        torch.testing.assert_close(gp1[name], gp2[name], rtol=1e-4, atol=1e-5, msg=name)
    # the attention weights themselves get a real (non-zero) gradient, so the check has teeth
    assert gp1["blocks.0.attn.qkv.weight"].abs().max() > 0


def test_unknown_attention_impl_and_bad_sizes_are_rejected():
    with pytest.raises(ValueError, match="attn_impl"):
        tiny(attn_impl="flash")
    with pytest.raises(ValueError, match="divisible"):
        tiny(input_size=10, patch_size=4)


# -----------------------------------------------------------------------------
# torch.compile


@pytest.mark.slow
def test_compile_fullgraph_matches_eager():
    # fullgraph=True raises on any graph break (.item(), data-dependent Python branches, ...)
    torch._dynamo.reset()
    model = randomize_zero_init(tiny(depth=1)).eval()
    x, t, y = inputs(model)
    compiled = torch.compile(model, fullgraph=True)
    start = time.time()
    with torch.no_grad():
        v_compiled = compiled(x, t, y)
        v_eager = model(x, t, y)
    print(f"compile + first call: {time.time() - start:.1f} s")
    torch.testing.assert_close(v_compiled, v_eager, rtol=1e-4, atol=1e-5)
    assert v_eager.abs().max() > 0


# -----------------------------------------------------------------------------
# classifier-free guidance


def test_cfg_scale_one_is_conditional_and_zero_is_null_class():
    model = randomize_zero_init(tiny()).eval()
    x, t, y = inputs(model)
    null = torch.full_like(y, model.num_classes)
    with torch.no_grad():
        v_cond, v_null = model(x, t, y), model(x, t, null)
        assert (v_cond - v_null).abs().max() > 1e-3  # the label matters, so the checks below can fail
        torch.testing.assert_close(model.forward_with_cfg(x, t, y, 1.0), v_cond, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model.forward_with_cfg(x, t, y, 0.0), v_null, rtol=1e-5, atol=1e-5)


def test_cfg_general_scale_guides_every_channel():
    # 6 channels: the old DiT shortcut would leave channels 3, 4, 5 equal to v_cond
    model = randomize_zero_init(tiny(in_channels=6)).train()  # train mode: forward_with_cfg must not drop labels
    x, t, y = inputs(model)
    s = 4.0
    with torch.no_grad():
        v = model.forward_with_cfg(x, t, y, s)
        model.eval()
        v_cond, v_null = model(x, t, y), model(x, t, torch.full_like(y, model.num_classes))
    ref = v_null + s * (v_cond - v_null)
    assert v.shape == x.shape
    torch.testing.assert_close(v, ref, rtol=1e-5, atol=1e-4)
    assert (ref - v_cond)[:, 3:].abs().max() > 1e-2  # guidance visibly changes channels >= 3


# -----------------------------------------------------------------------------
# label dropout


def test_label_dropout_rate_and_null_class():
    emb = tiny(class_dropout_prob=0.1).y_embedder
    y = torch.randint(0, 10, (20000,))
    torch.manual_seed(0)
    dropped = emb.drop_labels(y)
    is_null = dropped == 10
    assert abs(is_null.float().mean().item() - 0.1) < 0.01  # std of the rate is 0.002
    assert torch.equal(dropped[~is_null], y[~is_null])  # kept labels are untouched


def test_label_dropout_is_reproducible_under_manual_seed():
    emb = tiny().y_embedder
    y = torch.randint(0, 10, (1000,))
    torch.manual_seed(123)
    a = emb.drop_labels(y)
    torch.manual_seed(123)
    b = emb.drop_labels(y)
    c = emb.drop_labels(y)
    assert torch.equal(a, b) and not torch.equal(b, c)


def test_train_forward_is_reproducible_with_saved_rng_state_and_eval_never_drops():
    model = randomize_zero_init(tiny(class_dropout_prob=0.5)).train()
    x, t, y = inputs(model, B=16)
    state = torch.get_rng_state()
    with torch.no_grad():
        v1 = model(x, t, y)
        torch.set_rng_state(state)
        v2 = model(x, t, y)
        assert torch.equal(v1, v2)
        model.eval()
        v_eval = model(x, t, y)
        assert not torch.equal(v1, v_eval)  # with p = 0.5 some of the 16 labels were dropped in training
        # eval mode: no label dropout and no RNG use, whatever the RNG state
        torch.manual_seed(7)
        assert torch.equal(model(x, t, y), v_eval)


def test_force_drop_mask_selects_the_null_class():
    model = randomize_zero_init(tiny()).eval()
    x, t, y = inputs(model, B=4)
    mask = torch.tensor([True, False, True, False])
    y_masked = torch.where(mask, model.num_classes, y)
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, y, force_drop=mask), model(x, t, y_masked), rtol=0, atol=0)
        # in training mode the mask replaces the random coin flips entirely
        model.train()
        torch.testing.assert_close(model(x, t, y, force_drop=mask), model(x, t, y_masked, force_drop=mask))


# -----------------------------------------------------------------------------
# presets


def expected_params(depth, D, p, C, K, freq=256, mlp=4):
    patch = C * p * p * D + D
    t_emb = freq * D + D + D * D + D
    y_emb = (K + 1) * D
    block = (D * 6 * D + 6 * D) + (D * 3 * D + 3 * D) + (D * D + D) + (D * mlp * D + mlp * D) + (mlp * D * D + D)
    final = (D * 2 * D + 2 * D) + (D * p * p * C + p * p * C)
    return patch + t_emb + y_emb + depth * block + final


def test_presets_have_the_paper_sizes_and_parameter_counts():
    sizes = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16), "Tiny": (4, 128, 4)}
    assert set(dit.DIT_PRESETS) == {f"DiT-{s}/{p}" for s in sizes for p in (1, 2, 4)}
    for name in dit.DIT_PRESETS:
        depth, D, nh = sizes[name[4:-2]]
        p = int(name[-1])
        with torch.device("meta"):  # shapes only, no memory
            model = build_dit(name, input_size=32, in_channels=4, num_classes=1000)
        assert (len(model.blocks), model.blocks[0].attn.num_heads, model.patch_size) == (depth, nh, p)
        assert common.count_params(model) == expected_params(depth, D, p, 4, 1000), name
    # the DiT paper's 675M for XL/2 also counts its fixed position table (256 x 1152) and the
    # learned-sigma half of the output layer (1152 x 16 + 16), which we do not have
    with torch.device("meta"):
        xl = build_dit("DiT-XL/2", 32, 4, 1000)
    assert common.count_params(xl) + 256 * 1152 + 1152 * 16 + 16 == 675_129_632


def test_build_dit_tiny_runs_and_overrides_win():
    model = build_dit("DiT-Tiny/1", input_size=(4, 6), in_channels=16, num_classes=7, attn_impl="sdpa", depth=1)
    assert len(model.blocks) == 1 and model.blocks[0].attn.attn_impl == "sdpa"
    x = torch.randn(2, 16, 4, 6)
    assert model(x, torch.rand(2), torch.tensor([0, 6])).shape == x.shape
    rebuilt = DiT(**model.config)
    rebuilt.load_state_dict(model.state_dict())  # the config and state dict rebuild the model exactly


def test_unknown_preset_name_lists_the_valid_ones():
    with pytest.raises(ValueError) as err:
        build_dit("DiT-XXL/2", 32, 4, 1000)
    assert "DiT-XXL/2" in str(err.value) and "DiT-XL/2" in str(err.value) and "DiT-Tiny/4" in str(err.value)
