"""The measures and diagnostics that judge the paper's claims (metrics.band_power, the E[x|z] and
judge columns of eval.score_reconstructions, claims.z_gap, claims.linear_probe), the anchored and
deterministic-U-Net decoders of ae.DGAE, and `claims.py compare --quick` end to end."""

import json
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import ae
import eval as ev
from experiments import claims
from support import common, metrics
from support.checkpoints import REQUIRED_KEYS
from support.eval_data import ImageSource, to_pixels
from support.procedural import PatternClassifier

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CPU = common.Dist(ddp=False, rank=0, local_rank=0, world_size=1, device=torch.device("cpu"), master=True)


def _tiny(**kw):
    args = dict(enc_ch=16, unet_ch=16, cond_ch=16, unet_mult=(1, 2), attn_res=(16,))
    args.update(kw)
    return ae.make_config("tiny", **args)


# -----------------------------------------------------------------------------
# the spectral measure


def test_band_power_of_a_cosine_is_its_energy_in_its_band_only():
    H = 32
    xx = torch.arange(H).double()
    amp = 40.0
    img = (amp * torch.cos(2 * math.pi * 4 * xx / H)).expand(1, 3, H, H)  # 4 cycles per image along x
    p = metrics.band_power(img).view(3, H // 2)
    # the DFT puts amp * H * H / 2 at k = (0, +-4); per-pixel energy |X|^2 / (H W) = amp^2 H^2 / 4 at each.
    # Band 3 holds the frequencies with 3 < |k| <= 4: count them to get its mean.
    k = torch.fft.fftfreq(H, d=1.0 / H)
    r = (k[:, None] ** 2 + k[None, :] ** 2).sqrt()
    n_band3 = int(((r > 3) & (r <= 4)).sum())
    expected = math.log1p(2 * amp**2 * H * H / 4 / n_band3)
    assert p[:, 3] == pytest.approx(torch.full((3,), expected, dtype=torch.float64))
    assert p[:, [b for b in range(H // 2) if b != 3]].abs().max() < 1e-9


def test_spectral_distance_is_zero_for_copies_and_shifts_and_grows_with_blur():
    torch.manual_seed(0)
    real = (torch.rand(200, 3, 16, 16) * 255).round()
    stats = lambda x: metrics.feature_stats(metrics.band_power(x))  # noqa: E731
    fd = lambda a, b: metrics.frechet_distance(*stats(a), *stats(b))  # noqa: E731
    assert fd(real, real) == pytest.approx(0, abs=1e-6)
    assert fd(real, real.roll((3, 5), (2, 3))) == pytest.approx(0, abs=1e-6)  # where the detail is does not matter
    blur1 = F.avg_pool2d(F.pad(real, (1, 1, 1, 1), mode="circular"), 3, stride=1)
    blur2 = F.avg_pool2d(F.pad(blur1, (1, 1, 1, 1), mode="circular"), 3, stride=1)
    assert 0 < fd(real, blur1) < fd(real, blur2)


# -----------------------------------------------------------------------------
# score_reconstructions: the mean of K decodes and the judge


def test_mean_of_k_decodes_is_scored_as_the_estimate_of_E_x_given_z():
    torch.manual_seed(0)
    model = ae.DGAE(_tiny()).eval()
    torch.nn.init.normal_(model.decoder.conv_out.weight, std=0.1)  # an untrained U-Net outputs 0: make the noise matter
    source = ImageSource("", 32, builtin_limit=4)
    s = ev.score_reconstructions(model, source, 2, CPU, 4, 4, seed=5, mean_of=3)
    real = torch.cat(list(source.batches(0, 4, 4)))
    z = model.encode(real / 127.5 - 1)
    decodes = [model.decode(z, 2, seed=5 + 7919 * k) for k in range(3)]
    mean_rec = to_pixels(torch.stack(decodes).mean(0))
    assert s["lowfreq_psnr_mean"] == pytest.approx(metrics.lowfreq_psnr(real, mean_rec, 4).mean().item(), rel=1e-9)
    assert s["psnr_mean"] == pytest.approx(metrics.psnr(real, mean_rec).mean().item(), rel=1e-9)
    assert s["psnr"] == pytest.approx(metrics.psnr(real, to_pixels(decodes[0])).mean().item(), rel=1e-9)  # k = 0 is the single decode
    assert s["psnr_mean"] > s["psnr"]  # averaging independent noise brings the decode closer to the image


class ShiftingModel:
    """A stand-in autoencoder whose 'reconstruction' is the input rolled by `shift` pixels."""

    def __init__(self, shift):
        self.cfg = SimpleNamespace(compression=4, resolution=32)
        self.shift = shift

    def reconstruct(self, x, steps=None, seed=0):
        return x.roll((self.shift, self.shift), (2, 3))


def test_judge_and_spectral_columns_on_a_perfect_and_a_shifted_reconstruction():
    torch.manual_seed(0)
    judge = PatternClassifier().eval()
    source = ImageSource("", 32, builtin_limit=40)
    real = torch.cat(list(source.batches(0, 40, 20))) / 127.5 - 1
    with torch.no_grad():
        real_acc = (judge(real).argmax(1) == torch.arange(40) % 10).double().mean().item()
    same = ev.score_reconstructions(ShiftingModel(0), source, 1, CPU, 40, 20, 0, judge=judge)
    assert same["judge_fd"] == pytest.approx(0, abs=1e-6) and same["judge_accuracy"] == pytest.approx(real_acc)
    assert same["spectral_fd"] == pytest.approx(0, abs=1e-4)  # 40 images, 48 bands: round-off of a singular covariance
    shifted = ev.score_reconstructions(ShiftingModel(3), source, 1, CPU, 40, 20, 0, judge=judge)
    assert shifted["spectral_fd"] == pytest.approx(0, abs=1e-4) and shifted["psnr"] < same["psnr"]


# -----------------------------------------------------------------------------
# does the decoder use z?


class OracleDecoder:
    """A stand-in diffusion autoencoder: z is the image itself, and the velocity is exact given z."""

    def __init__(self, uses_z):
        self.cfg = SimpleNamespace(decoder="diffusion", compression=2)
        self.anchor, self.uses_z = None, uses_z

    def encode(self, x):
        return x

    def velocity(self, x_t, t, z, x_tilde=None):
        t = t.view(-1, 1, 1, 1)
        return (x_t - z) / t if self.uses_z else x_t  # v = eps - x = (x_t - x) / t when z = x


def test_shuffled_z_gap_is_zero_for_a_decoder_that_ignores_z_and_exact_for_one_that_uses_it():
    torch.manual_seed(0)
    x = torch.rand(6, 3, 8, 8) * 2 - 1
    assert all(v == 0 for v in claims.z_gap(OracleDecoder(False), x).values())
    gaps = claims.z_gap(OracleDecoder(True), x)
    # with the right z the loss is 0; with the neighbour's, v_hat - v = (x - x_wrong) / t
    for t, gap in gaps.items():
        assert gap == pytest.approx(((x - x.roll(1, 0)) ** 2).mean().item() / t**2, rel=1e-5)


def test_shuffled_z_gap_of_a_real_model_and_of_one_cut_off_from_z():
    torch.manual_seed(0)
    model = ae.DGAE(_tiny(anchor_ch=0)).eval()  # the plain decoder: z enters only through cond_proj
    for p in model.decoder.parameters():
        torch.nn.init.normal_(p, std=0.05)
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    assert any(abs(v) > 0 for v in claims.z_gap(model, x).values())
    for stage in [*model.decoder.down, *model.decoder.up]:
        torch.nn.init.zeros_(stage["cond_proj"].weight)  # z's only way in
        torch.nn.init.zeros_(stage["cond_proj"].bias)
    assert all(v == pytest.approx(0, abs=1e-12) for v in claims.z_gap(model, x).values())


class PoolingEncoder:
    def __init__(self, f, noise=False):
        self.cfg = SimpleNamespace(compression=f)
        self.noise = noise

    def encode(self, x):
        pooled = F.avg_pool2d(x, self.cfg.compression)
        return torch.randn_like(pooled) if self.noise else 2 * pooled + 1


def test_linear_probe_finds_a_linear_latent_and_nothing_in_noise():
    torch.manual_seed(0)
    train, test = torch.rand(300, 3, 8, 8), torch.rand(100, 3, 8, 8)
    assert claims.linear_probe(PoolingEncoder(4), train, test) == pytest.approx(1, abs=1e-3)
    assert claims.linear_probe(PoolingEncoder(4, noise=True), train, test) < 0.05


# -----------------------------------------------------------------------------
# the anchored and the deterministic-U-Net decoders


def test_colour_code_keeps_the_top_colour_axes_and_loses_exactly_the_rest():
    # 2 images of 8x8 cells (f = 1): R, G, B swing by +-40, +-20, +-10 on checkerboards of
    # different kinds (sx, sy, sx*sy), which are uncorrelated over the grid, so the principal axes
    # are R, G, B with variances 1600, 400, 100
    sx = torch.tensor([1.0, -1.0]).repeat(4).view(1, 8).expand(8, 8)
    sy = sx.t()
    img = torch.stack([128 + 40 * sx, 128 + 20 * sy, 128 + 10 * sx * sy]).expand(2, 3, 8, 8)
    cap = 10 * math.log10(255**2 * 12)
    assert claims.colour_code_psnr(img, 1, 3) == pytest.approx(cap)  # three numbers: exact
    assert claims.colour_code_psnr(img, 1, 2) == pytest.approx(10 * math.log10(255**2 / (100 / 3)))  # B is lost
    assert claims.colour_code_psnr(img, 1, 1) == pytest.approx(10 * math.log10(255**2 / (500 / 3)))  # G and B
    # grey images need one number per cell, whatever their brightness pattern
    grey = (128 + 50 * sx * sy).expand(2, 3, 8, 8)
    assert claims.colour_code_psnr(grey, 1, 1) == pytest.approx(cap)
    # pooling first: a 2x2 cell of +-10 stripes averages to its mean, so f = 2 sees flat cells
    assert claims.colour_code_psnr(128 + 10 * sx.expand(1, 3, 8, 8), 2, 1) == pytest.approx(cap)


def test_anchored_decoder_shapes_and_its_anchor_depends_on_z_alone():
    torch.manual_seed(0)
    model = ae.DGAE(_tiny(anchor_ch=8))
    assert model.decoder.conv_in.in_channels == 6  # x_t and x~
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    z = model.encode(x)
    x_tilde = model.anchor(z)
    assert x_tilde.shape == x.shape
    _, terms = model.loss(x)
    assert {"flow", "recon", "consistency", "anchor", "kl"} <= set(terms)
    # decoding twice from different noise: the anchor is the same, the U-Net's input differs only in x_t
    seen = []
    hook = model.decoder.conv_in.register_forward_hook(lambda m, inp, out: seen.append(inp[0][:, 3:].clone()))
    model.eval().decode(z, steps=1, seed=0)
    model.decode(z, steps=1, seed=1)
    hook.remove()
    assert torch.equal(seen[0], seen[1]) and torch.allclose(seen[0], x_tilde.detach())


def test_gradients_reach_the_encoder_through_the_anchor():
    torch.manual_seed(0)
    model = ae.DGAE(_tiny(anchor_ch=8))
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    _, terms = model.loss(x)
    terms["anchor"].backward()  # the anchor's L1 alone: its only path to the encoder is z -> x~
    assert model.encoder.conv_out.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.decoder.parameters())


def test_deterministic_unet_decoder_is_minus_the_unet_at_t1_from_zeros():
    torch.manual_seed(0)
    model = ae.DGAE(_tiny(decoder="unet")).eval()
    for p in model.decoder.parameters():
        torch.nn.init.normal_(p, std=0.05)
    z = model.encode(torch.rand(2, 3, 32, 32) * 2 - 1)
    with torch.no_grad():
        v = model.decoder(torch.zeros(2, 3, 32, 32), torch.ones(2), z)
    assert torch.allclose(model.decode(z, seed=0), (-v).clamp(-1, 1))
    assert torch.equal(model.decode(z, seed=0), model.decode(z, seed=1))  # no noise anywhere
    _, terms = model.loss(torch.rand(2, 3, 32, 32) * 2 - 1)
    assert set(terms) == {"l1", "kl"}


def test_anchor_is_refused_for_the_deterministic_decoders():
    with pytest.raises(ValueError, match="only the diffusion decoder has one"):
        ae.make_config("tiny", decoder="gaussian", anchor_ch=8)


def _group(ez, fd, hf=1.0, seeds=(0, 1, 2), spread=0.1):
    """A row of the claims table: each measure over the seeds, mean as given, seeds spread by +-spread."""
    n = len(seeds)
    offsets = [spread * (i - (n - 1) / 2) for i in range(n)]
    return {"seeds": list(seeds), "ez_lowfreq_psnr": [ez + o for o in offsets], "spectral_fd": [fd + o for o in offsets],
            "highfreq_ratio": [hf + o / 100 for o in offsets]}


def test_decide_holds_or_fails_only_beyond_two_standard_errors():
    assert claims.decide(0.5, 0.2) == "holds" and claims.decide(-0.5, 0.2) == "fails"
    assert claims.decide(0.3, 0.2) == "undecided" and claims.decide(-0.3, 0.2) == "undecided"
    assert claims.decide(5.0, math.nan) == "undecided"  # one seed: no standard error, nothing decided
    assert claims.mean_se([1.0, 2.0, 3.0]) == pytest.approx((2.0, 1.0 / math.sqrt(3)))


def test_verdicts_apply_each_rule_at_equal_steps_and_at_equal_compute(monkeypatch):
    monkeypatch.setattr(claims, "kinds", "dgae,gauss,unet")
    monkeypatch.setattr(claims, "compute_factor", 3)
    groups = {("dgae", 2, 1): _group(30.0, 5.0), ("dgae", 4, 1): _group(33.0, 5.0, hf=1.0),
              ("gauss", 4, 1): _group(31.5, 30.0), ("unet", 4, 1): _group(33.5, 7.0),
              ("gauss", 4, 3): _group(32.5, 20.0)}
    v = claims.verdicts(groups, 4)
    # claim 2 at equal steps: -1.5 dB against the rule's -2 (margin 0.5, SE 0.08) and an FD 25 below: holds;
    # at equal compute -2.5 dB (margin -0.5): fails
    assert v["claim 2, dgae, equal steps"][0] == "holds" and v["claim 2, dgae, equal compute (x3)"][0] == "fails"
    assert "-2.50 +- 0.08 SE" in v["claim 2, dgae, equal compute (x3)"][1]
    # one decode's low-frequency PSNR is reported beside the rule, and does not move the verdict
    one_decode = {**groups, ("dgae", 2, 1): {**groups[("dgae", 2, 1)], "lowfreq_psnr": [27.0, 27.0, 27.0]},
                  ("gauss", 4, 1): {**groups[("gauss", 4, 1)], "lowfreq_psnr": [31.4, 31.5, 31.6]}}
    verdict, why = claims.verdicts(one_decode, 4)["claim 2, dgae, equal steps"]
    assert verdict == "holds" and why.endswith("one decode's low-freq PSNR -4.50 +- 0.06 SE (not in the rule)")
    assert "one decode" not in v["claim 2, dgae, equal steps"][1]  # rows without it: no such line
    # claim 1 at equal steps: the best reference is unet (33.5 dB): -0.5 dB holds (rule -1), the FD is lower
    # than both references' beyond 2 SE, and the ratio 1.0 is in range
    assert v["claim 1, dgae, equal steps"][0] == "holds"
    assert "-0.50 +- 0.08 SE (rule: >= -1 dB): holds" in v["claim 1, dgae, equal steps"][1]
    # unet at equal compute was never trained while unet is one of --kinds: open, not decided on gauss alone
    assert v["claim 1, dgae, equal compute (x3)"][0] == "open"
    # a decoder left out of --kinds gets no verdict; one in it without runs is open
    assert not any("anchored" in k for k in v)
    monkeypatch.setattr(claims, "kinds", "dgae,anchored,gauss,unet")
    assert claims.verdicts(groups, 4)["claim 1, anchored, equal steps"][0] == "open"
    monkeypatch.setattr(claims, "kinds", "dgae,gauss,unet")
    # DGAE at x3 against the references at x3: its own row, not the x1 row (which would fail by 2.5 dB)
    long = {**groups, ("unet", 4, 3): _group(33.0, 6.0), ("dgae", 4, 3): _group(34.5, 4.0)}
    v = claims.verdicts(long, 4)
    assert v["claim 1, dgae, equal steps (x3)"][0] == "holds" and "+1.50 +- 0.08 SE" in v["claim 1, dgae, equal steps (x3)"][1]
    assert v["claim 1, dgae, equal compute (x3)"][0] == "holds"  # x1 at 33.0 against unet x3 at 33.0: 0 >= -1
    assert not any("anchored" in k and "(x3)" in k and "equal steps" in k for k in v)  # no anchored x3 runs
    # a miss inside 2 standard errors is undecided, not "fails": -1.05 dB with seeds spread by 0.5 dB
    near = {**groups, ("dgae", 4, 1): _group(32.45, 5.0, spread=0.5)}
    assert claims.verdicts(near, 4)["claim 1, dgae, equal steps"][0] == "undecided"
    groups[("dgae", 4, 1)]["highfreq_ratio"] = [0.6] * 3  # too little detail: fails on the ratio alone
    assert claims.verdicts(groups, 4)["claim 1, dgae, equal steps"][0] == "fails"
    one_seed = {k: _group(g["ez_lowfreq_psnr"][1], g["spectral_fd"][1], seeds=(0,)) for k, g in groups.items()}
    assert {v for v, _ in claims.verdicts(one_seed, 4).values()} <= {"undecided", "open"}  # nothing decided
    monkeypatch.setattr(claims, "compute_factor", 0)  # no equal-compute runs: no such verdicts
    assert not any("compute" in k for k in claims.verdicts(groups, 4))


def test_converge_takes_each_seed_at_the_sweeps_best_rate_and_can_skip_the_controls(tmp_path, monkeypatch):
    monkeypatch.setattr(claims, "out", str(tmp_path))
    monkeypatch.setattr(claims, "lrs", "1e-3,3e-4")
    monkeypatch.setattr(claims, "seeds", "1,2")  # the sweep is at seed 1, the first
    for name, ez in [("gauss_c4_lr0.001_s1", 20.0), ("gauss_c4_lr0.0003_s1", 25.0), ("dgae_c2_lr0.001_s1", 19.0),
                     ("dgae_c2_lr0.0003_s1", 18.0), ("dgae_c4_lr0.001_s1", 30.0), ("dgae_c4_lr0.0003_s1", 31.0),
                     ("gauss_c2_lr0.001_s1", 22.0), ("gauss_c2_lr0.0003_s1", 21.0),
                     ("gauss_c4_lr0.001_s0", 40.0), ("gauss_c4_lr0.0003_s0", 10.0),  # seed 0 is no sweep here
                     ("gauss_c4_lr0.0003_s2", 5.0), ("dgae_c2_lr0.001_s2", 5.0), ("dgae_c4_lr0.0003_s2", 5.0),
                     ("gauss_c2_lr0.001_s2", 5.0), ("gauss_c4_lr0.001_s2", 99.0)]:  # seed 2 does not pick its own rate
        os.makedirs(tmp_path / name)
        json.dump({"ez_lowfreq_psnr": ez}, open(tmp_path / name / "scores.json", "w"))
    found = [(label, run) for label, run, _ in claims.converge_latents(4, 1)]
    assert found == [("gauss c=4", "gauss_c4_lr0.0003_s1"), ("dgae c=2", "dgae_c2_lr0.001_s1"),
                     ("dgae c=4", "dgae_c4_lr0.0003_s1"), ("gauss c=2", "gauss_c2_lr0.001_s1")]
    assert [run for _, run, _ in claims.converge_latents(4, 2)] == [
        "gauss_c4_lr0.0003_s2", "dgae_c2_lr0.001_s2", "dgae_c4_lr0.0003_s2", "gauss_c2_lr0.001_s2"]
    monkeypatch.setattr(claims, "controls", False)
    assert [run for _, run, _ in claims.converge_latents(4, 2)] == ["gauss_c4_lr0.0003_s2", "dgae_c2_lr0.001_s2"]
    os.remove(tmp_path / "dgae_c2_lr0.001_s2" / "scores.json")  # a missing run: say which, and the command that trains it
    with pytest.raises(SystemExit, match=r"dgae_c2_lr0\.001_s2 \(.*`python experiments/claims\.py compare .*--seeds 1,2 --lrs 1e-3,3e-4 "
                                         r"--compute-factor 0 --only dgae_c2_lr0\.001_s2`"):
        claims.converge_latents(4, 2)
    os.remove(tmp_path / "dgae_c2_lr0.0003_s1" / "scores.json")  # the sweep is unfinished: its missing run is named
    with pytest.raises(SystemExit, match=r"the stage-1 run \S*dgae_c2_lr0\.0003_s1 .*--seeds 0,2"):
        claims.converge_latents(4, 2)


def test_converge_at_a_later_seed_gives_the_dit_that_seed_and_writes_that_seeds_report(tmp_path, monkeypatch):
    monkeypatch.setattr(claims, "out", str(tmp_path))
    monkeypatch.setattr(claims, "lrs", "1e-3")
    monkeypatch.setattr(claims, "seeds", "0,2")
    monkeypatch.setattr(claims, "controls", False)
    for name in ("gauss_c4_lr0.001_s0", "dgae_c2_lr0.001_s0", "gauss_c4_lr0.001_s2", "dgae_c2_lr0.001_s2"):
        os.makedirs(tmp_path / name)
        json.dump({"ez_lowfreq_psnr": 20.0, "judge_accuracy": 0.9, "judge_fd": 1.0}, open(tmp_path / name / "scores.json", "w"))
    calls = []

    def fake_script(name, *args):  # stands in for the subprocesses; eval.py leaves a result that grows with the step
        calls.append((name, [str(a) for a in args]))
        if name == "train_dit.py":  # trains on to --max-steps, never back (train_dit.py: "nothing to train")
            ckpt, step = os.path.join(args[args.index("--out-dir") + 1], "ckpt.pt"), int(args[args.index("--max-steps") + 1])
            os.makedirs(os.path.dirname(ckpt), exist_ok=True)
            if not os.path.exists(ckpt) or torch.load(ckpt)["step"] < step:
                torch.save({**dict.fromkeys(REQUIRED_KEYS["dit"], {}), "kind": "dit", "step": step}, ckpt)
        if name == "eval.py":
            for samples in args[args.index("--samples") + 1].split(","):
                os.makedirs(os.path.dirname(samples), exist_ok=True)
                step = int(os.path.basename(samples)[len("samples_"):-len(".npz")])
                json.dump({"accuracy": step / 40, "judge_fd": 1.0, "judge_fd_recon": 100 / step,
                           "recon_accuracy": 0.85}, open(samples[:-len(".npz")] + "_classes.json", "w"))

    monkeypatch.setattr(claims, "script", fake_script)
    rows = claims.converge_one_seed(SimpleNamespace(device=torch.device("cpu")), 4, 2, [10, 20], str(tmp_path / "c"))
    # each latent's samples are judged against that latent's own reconstructions: its stage-1 model goes to eval.py,
    # once for all its steps' samples (one judge, one reconstruction of the held-out images)
    judged = [(a[a.index("--ae-ckpt") + 1], a[a.index("--samples") + 1]) for name, a in calls if name == "eval.py"]
    assert judged == [(str(tmp_path / r / "ckpt.pt"), ",".join(str(tmp_path / "c" / r / f"samples_{s}.npz") for s in (10, 20)))
                      for r in ("gauss_c4_lr0.001_s2", "dgae_c2_lr0.001_s2")]
    assert [p["judge_fd_recon"] for p in rows["dgae c=2"]["curve"]] == [10.0, 5.0]
    md = open(tmp_path / "c" / "converge_s2.md").read()
    assert "| latent | acc@10 | acc@20 | ceiling acc | fd@10 | fd@20 | steps to target | ratio | shift |" in md
    assert "| dgae c=2 | 0.250 | 0.500 | 0.850 | 10.00 | 5.00 | 20 | 1.00 |" in md  # the ceiling eval.py measured
    dit_runs = [args for name, args in calls if name == "train_dit.py"]
    assert len(dit_runs) == 4 and all(a[a.index("--seed") + 1] == "2" for a in dit_runs)
    assert [a[a.index("--ae-ckpt") + 1] for a in dit_runs][::2] == [str(tmp_path / r / "ckpt.pt")
                                                                    for r in ("gauss_c4_lr0.001_s2", "dgae_c2_lr0.001_s2")]
    assert json.load(open(tmp_path / "c" / "converge_s2.json"))["target_accuracy"] == 0.5
    assert claims.finished_seed(str(tmp_path / "c"), 2, [10, 20]) == rows  # read back whole, the same shape
    assert rows["dgae c=2"]["speedup"] == 1.0 and (tmp_path / "c" / "converge_s2.png").exists()
    # resumed with one step judged and the next one's samples drawn: nothing trains, only the unjudged samples are judged
    run = tmp_path / "c" / "dgae_c2_lr0.001_s2"
    os.remove(run / "samples_20_classes.json")
    open(run / "samples_20.npz", "w").close()
    calls.clear()
    claims.converge_one_seed(SimpleNamespace(device=torch.device("cpu")), 4, 2, [10, 20], str(tmp_path / "c"))
    assert [(name, a[a.index("--samples") + 1]) for name, a in calls] == [("eval.py", str(run / "samples_20.npz"))]
    # samples made another way (here fewer per step) are not reused: the DiT folder is named
    monkeypatch.setattr(claims, "num_samples", 300)
    with pytest.raises(SystemExit, match=r"gauss_c4_lr0\.001_s2.settings\.json was made with other settings \(--num-samples 600, "
                                         r"now 300\); run with those, or delete \S*gauss_c4_lr0\.001_s2 to train its DiT again"):
        claims.converge_one_seed(SimpleNamespace(device=torch.device("cpu")), 4, 2, [10, 20], str(tmp_path / "c"))
    monkeypatch.setattr(claims, "num_samples", 600)
    # a step's samples gone while the DiT is already past it: refused, not the later DiT sampled as that step
    os.remove(run / "samples_10_classes.json")
    with pytest.raises(SystemExit, match=r"ckpt.pt is at step 20, not 10, and \S*samples_10.npz is missing; delete"):
        claims.converge_one_seed(SimpleNamespace(device=torch.device("cpu")), 4, 2, [10, 20], str(tmp_path / "c"))


def test_converge_refuses_a_flat_folder_whose_one_class_every_sample_would_match(tmp_path, monkeypatch):
    from PIL import Image
    for split in ("train", "val"):
        (tmp_path / split).mkdir()
        for i in range(3):
            Image.fromarray(np.full((40, 40, 3), 60 * i, np.uint8)).save(tmp_path / split / f"{i}.png")
    monkeypatch.setattr(claims, "data", str(tmp_path / "train"))
    monkeypatch.setattr(claims, "val_data", str(tmp_path / "val"))
    monkeypatch.setattr(claims, "out", str(tmp_path / "out"))
    with pytest.raises(ValueError, match="one class, so every image would be named right"):
        claims.run_converge(SimpleNamespace(ddp=False, device=torch.device("cpu")))
    assert not (tmp_path / "out").exists()  # refused before any run
    for split, names in (("train2", "ab"), ("val2", "ac")):  # held-out classes other than the training folder's
        for name in names:
            (tmp_path / split / name).mkdir(parents=True)
            Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(tmp_path / split / name / "0.png")
    monkeypatch.setattr(claims, "data", str(tmp_path / "train2"))
    monkeypatch.setattr(claims, "val_data", str(tmp_path / "val2"))
    with pytest.raises(ValueError, match="--val-data .*val2: classes \\['a', 'c'\\]... differ from --data's"):
        claims.run_converge(SimpleNamespace(ddp=False, device=torch.device("cpu")))
    assert not (tmp_path / "out").exists()


def test_compare_judges_only_folders_with_classes_to_name_and_refuses_other_held_out_classes_before_any_run(
        tmp_path, monkeypatch, capsys):
    from PIL import Image
    for split, names in (("train", "ab"), ("val", "ac"), ("flat", "")):
        (tmp_path / split).mkdir()
        for name in names or ".":
            (tmp_path / split / name).mkdir(exist_ok=True)
            Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(tmp_path / split / name / "0.png")
    monkeypatch.setattr(claims, "out", str(tmp_path / "out"))
    monkeypatch.setattr(claims, "data", str(tmp_path / "train"))
    monkeypatch.setattr(claims, "val_data", str(tmp_path / "val"))
    with pytest.raises(ValueError, match=r"--val-data .*val: classes \['a', 'c'\]... differ from --data's"):
        claims.run_compare(SimpleNamespace(ddp=False, device=torch.device("cpu")))
    assert not (tmp_path / "out").exists()  # refused before any run
    # the same classes: the judge's folder; a one-class --data or an .npz held out: nothing to judge
    monkeypatch.setattr(claims, "val_data", str(tmp_path / "train"))
    heldout = ImageSource(str(tmp_path / "train"), 32)
    assert claims.judge_folder(32, heldout).classes == ["a", "b"]
    monkeypatch.setattr(claims, "data", str(tmp_path / "flat"))
    assert claims.judge_folder(32, heldout) is None
    monkeypatch.setattr(claims, "report_only", True)  # said before any run, not silently left out
    claims.run_compare(SimpleNamespace(ddp=False, device=torch.device("cpu")))
    assert "no judge: --val-data has no classes or --data has one" in capsys.readouterr().out
    assert claims.make_judge(32, claims.judge_folder(32, heldout), SimpleNamespace(device=torch.device("cpu"))) is None
    monkeypatch.setattr(claims, "data", str(tmp_path / "train"))
    assert claims.sample_settings()["data_classes"] == ["a", "b"]  # converge records a folder's classes, not its path
    np.savez(tmp_path / "v.npz", arr_0=np.zeros((2, 32, 32, 3), np.uint8))
    assert claims.judge_folder(32, ImageSource(str(tmp_path / "v.npz"), 32)) is None


def converge_rows(accuracies, ceiling, speedup, curve_speedup=None, fd_recon=None):
    extra = {"judge_fd_recon": fd_recon} if fd_recon is not None else {}  # results from before --ae-ckpt lack it
    return {"curve": [{"step": s, "accuracy": a, "judge_fd": 1.0, **extra} for s, a in zip((10, 20), accuracies)],
            "ceiling_accuracy": ceiling, "speedup": speedup, "curve_speedup": curve_speedup}


def test_curve_speedup_reads_a_known_horizontal_shift_from_the_whole_curve():
    """A known answer: the latent's curve is the reference's at 1.4x the steps, a speed-up that the old
    first-grid-point-past-a-target rule read as 1.0 or 1.5 only. Noise-free here; a dip (non-monotone) in
    the curve does not move the estimate, and curves that never overlap give None."""
    steps = [125, 177, 250, 354, 500, 707, 1000, 1414, 2000, 2828]
    acc = lambda s: 0.8 * (1 - math.exp(-s / 600))  # noqa: E731
    ref, faster = [(s, acc(s)) for s in steps], [(s, acc(1.4 * s)) for s in steps]
    assert claims.curve_speedup(ref, faster) == pytest.approx(1.4, rel=0.01)
    assert claims.curve_speedup(faster, ref) == pytest.approx(1 / 1.4, rel=0.01)
    dipped = list(faster)
    dipped[5] = (dipped[5][0], dipped[4][1] - 0.05)  # one noisy point below its predecessor
    assert claims.curve_speedup(ref, dipped) == pytest.approx(1.4, rel=0.05)
    assert claims.curve_speedup([(10, 0.1), (20, 0.2)], [(10, 0.5), (20, 0.6)]) is None


def test_converge_over_seeds_writes_the_mean_and_spread_of_each_step_and_every_seeds_speed_up(tmp_path, monkeypatch):
    per_seed = {0: {"gauss c=4": converge_rows((0.2, 0.6), 0.8, 1.0, 1.0), "dgae c=2": converge_rows((0.4, 0.5), 0.7, None, 1.5, 5.0)},
                1: {"gauss c=4": converge_rows((0.4, 0.8), 0.9, 1.0, 1.0), "dgae c=2": converge_rows((0.6, 0.9), 0.8, 2.0, 1.7, 7.0)}}
    monkeypatch.setattr(claims, "out", str(tmp_path))
    monkeypatch.setattr(claims, "seeds", "0,1,0")  # a repeated seed counts once
    monkeypatch.setattr(claims, "dit_steps", "10,20")
    monkeypatch.setattr(claims, "converge_latents", lambda c, seed: [])  # the stage-1 runs are checked elsewhere
    monkeypatch.setattr(claims, "converge_one_seed", lambda dist, c, seed, steps, root: per_seed[seed])
    claims.run_converge(SimpleNamespace(ddp=False))
    summary = json.load(open(tmp_path / "converge" / "converge_summary.json"))
    assert summary["seeds"] == [0, 1]
    dgae = summary["latents"]["dgae c=2"]
    assert dgae["steps"] == [10, 20] and dgae["speedups"] == [None, 2.0]
    assert dgae["accuracy_mean"] == pytest.approx([0.5, 0.7]) and dgae["ceiling_accuracy"] == pytest.approx(0.75)
    assert dgae["accuracy_sd"] == pytest.approx([0.02 ** 0.5, 0.08 ** 0.5])  # two seeds: |a - b| / sqrt(2)
    table = open(tmp_path / "converge" / "converge_summary.md").read()
    # the last step's FD to the latent's own reconstructions, mean +- SD over seeds; "-" where a seed lacks it
    assert "| dgae c=2 | 0.500 +- 0.141 | 0.700 +- 0.283 | 0.750 | 6.000 +- 1.414 | not reached, 2.00x | 1.50x, 1.70x |" in table
    assert "| gauss c=4 | 0.300 +- 0.141 | 0.700 +- 0.141 | 0.850 | - |" in table
    # the shift over seeds: exp(mean log) = sqrt(1.5 * 1.7), its log SE |log 1.7 - log 1.5| / 2; 1.60x is
    # beyond 2 SE (0.125) of no speed-up: faster, and the reference against itself is undecided (SE 0)
    assert dgae["speedup_mean"] == pytest.approx((1.5 * 1.7) ** 0.5)
    assert dgae["log_speedup_se"] == pytest.approx(abs(math.log(1.7 / 1.5)) / 2) and dgae["verdict"] == "holds"
    assert summary["latents"]["gauss c=4"]["verdict"] == "undecided"
    assert (tmp_path / "converge" / "converge_summary.png").stat().st_size > 1000
    monkeypatch.setattr(claims, "seeds", "1")  # one seed: its own report only, no summary
    os.remove(tmp_path / "converge" / "converge_summary.json")
    claims.run_converge(SimpleNamespace(ddp=False))
    assert not (tmp_path / "converge" / "converge_summary.json").exists()


def test_converge_takes_a_finished_seed_from_its_report_and_refuses_one_made_with_other_settings(tmp_path, monkeypatch):
    """Seeds finished on other machines pool by their reports alone: no stage-1 run or DiT is needed again."""
    monkeypatch.setattr(claims, "out", str(tmp_path))
    monkeypatch.setattr(claims, "seeds", "0,1")
    monkeypatch.setattr(claims, "dit_steps", "20,10")
    root = tmp_path / "converge"
    root.mkdir()
    ref, faster = [(10, 0.2), (20, 0.6)], {0: [(10, 0.4), (20, 0.7)], 1: [(10, 0.3), (20, 0.65)]}
    for seed in (0, 1):  # the stored speed-ups are stale (99): they are derived anew from the curves
        rows = {"gauss c=4": converge_rows([a for _, a in ref], 0.8, 99.0, 99.0),
                "dgae c=2": converge_rows([a for _, a in faster[seed]], 0.7, 99.0, 99.0)}
        json.dump({"latents": rows, "settings": claims.converge_settings([10, 20])}, open(root / f"converge_s{seed}.json", "w"))
    monkeypatch.setattr(claims, "script", lambda *a: pytest.fail(f"nothing is run again: {a}"))
    claims.run_converge(SimpleNamespace(ddp=False, device=torch.device("cpu")))  # no stage-1 run exists in out
    summary = json.load(open(root / "converge_summary.json"))["latents"]["dgae c=2"]
    shifts = [claims.curve_speedup(ref, faster[seed]) for seed in (0, 1)]
    assert summary["curve_speedups"] == pytest.approx(shifts) and 1 < shifts[1] < shifts[0] < 99
    assert summary["speedup_mean"] == pytest.approx((shifts[0] * shifts[1]) ** 0.5) and summary["speedups"] == [1.0, 1.0]
    monkeypatch.setattr(claims, "num_samples", 300)  # a report of another size is refused, the setting named
    with pytest.raises(SystemExit, match=r"converge_s0\.json was made with other settings \(--num-samples 600, now 300\); "
                                         r"run with those, or delete it to run seed 0 again"):
        claims.run_converge(SimpleNamespace(ddp=False, device=torch.device("cpu")))
    monkeypatch.setattr(claims, "num_samples", 600)
    monkeypatch.setattr(claims, "dit_steps", "10,20,40")
    with pytest.raises(SystemExit, match=r"\(--dit-steps 10,20, now 10,20,40\)"):
        claims.run_converge(SimpleNamespace(ddp=False, device=torch.device("cpu")))
    monkeypatch.setattr(claims, "dit_steps", "10,20")
    monkeypatch.setattr(claims, "dit_args", "--lr 1e-4")  # strings quoted as typed, an empty one too
    monkeypatch.setattr(claims, "controls", False)
    with pytest.raises(SystemExit, match=r"\(--controls True, now False; --dit-args '', now '--lr 1e-4'\)"):
        claims.run_converge(SimpleNamespace(ddp=False, device=torch.device("cpu")))
    # a report from before reports recorded their settings: the seed is made anew from its runs
    json.dump({"latents": rows}, open(root / "converge_s0.json", "w"))
    assert claims.finished_seed(str(root), 0, [10, 20]) is None
    (root / "converge_s1.json").write_text("{")  # damaged: named, with what to do
    with pytest.raises(SystemExit, match=r"converge_s1\.json cannot be read \(JSONDecodeError\); delete it to run seed 1"):
        claims.finished_seed(str(root), 1, [10, 20])


def test_plan_runs_the_sweep_then_the_seeds_then_the_equal_compute_runs(tmp_path, monkeypatch):
    monkeypatch.setattr(claims, "out", str(tmp_path))
    monkeypatch.setattr(claims, "kinds", "dgae,gauss")
    monkeypatch.setattr(claims, "lrs", "1e-3,3e-4")
    monkeypatch.setattr(claims, "seeds", "0,1,2")
    monkeypatch.setattr(claims, "compute_factor", 3)
    names = [p[0] for p in claims.plan(4)]
    assert len(names) == 8 and all(n.endswith("_s0") for n in names)  # the sweep alone until it is scored
    for name, ez in [("gauss_c4_lr0.001_s0", 20.0), ("gauss_c4_lr0.0003_s0", 25.0)]:
        os.makedirs(tmp_path / name)
        json.dump({"ez_lowfreq_psnr": ez}, open(tmp_path / name / "scores.json", "w"))
    later = [p[0] for p in claims.plan(4)][8:]  # gauss at c is swept: its seeds and x3 run follow at its best rate
    assert later == ["gauss_c4_lr0.0003_s1", "gauss_c4_lr0.0003_s2", "gauss_c4_lr0.0003_s0_x3"]
    monkeypatch.setattr(claims, "compute_seeds", 2)
    assert [p[0] for p in claims.plan(4)][10:] == ["gauss_c4_lr0.0003_s0_x3", "gauss_c4_lr0.0003_s1_x3"]
    for name, ez in [("dgae_c4_lr0.001_s0", 26.0), ("dgae_c4_lr0.0003_s0", 24.0)]:
        os.makedirs(tmp_path / name)
        json.dump({"ez_lowfreq_psnr": ez}, open(tmp_path / name / "scores.json", "w"))
    # DGAE also trains as long as the references (x3), at its own best rate, before them
    assert [p[0] for p in claims.plan(4)][8:] == [
        "dgae_c4_lr0.001_s1", "dgae_c4_lr0.001_s2", "gauss_c4_lr0.0003_s1", "gauss_c4_lr0.0003_s2",
        "dgae_c4_lr0.001_s0_x3", "dgae_c4_lr0.001_s1_x3", "gauss_c4_lr0.0003_s0_x3", "gauss_c4_lr0.0003_s1_x3"]
    # 0 or fewer seeds would silently drop (or, negative, slice away) the equal-compute runs: refused in one line
    proc = subprocess.run([sys.executable, "experiments/claims.py", "compare", "--compute-seeds", "0", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and proc.stderr.strip().splitlines()[-1] == "error: --compute-seeds must be at least 1, got 0"


def test_decoder_step_flops_count_the_decoder_alone():
    dgae, unet, gauss, anchored = (claims.decoder_step_flops(k, 4) for k in ("dgae", "unet", "gauss", "anchored"))
    # a DGAE step runs the U-Net twice (the flow term on x_t, the consistency term from pure noise), "unet" once;
    # with the encoder's share counted too the ratio would be about 1.75 at this size
    assert dgae / unet == pytest.approx(2.0, rel=1e-3)
    assert dgae < anchored < dgae * 1.2 and 0 < gauss < unet  # the anchor's small decoder; a smaller network
    # the whole step adds the same encoder to every kind: "equal compute" counted whole is a smaller ratio
    totals = {k: claims.step_flops(k, 4) for k in ("dgae", "gauss")}
    encoder = totals["dgae"][0] - totals["dgae"][1]
    assert encoder > 0 and totals["gauss"][0] - totals["gauss"][1] == pytest.approx(encoder)
    assert totals["gauss"][0] / totals["dgae"][0] > gauss / dgae


# -----------------------------------------------------------------------------
# claims.py compare, end to end


@pytest.mark.slow
def test_compare_quick_trains_every_part_and_reports_the_verdicts(tmp_path):
    out = tmp_path / "cmp"
    cmd = [sys.executable, "experiments/claims.py", "compare", "--quick", "true", "--kinds", "dgae,gauss", "--out", str(out),
           "--train-args", "--batch-size 4 --decode-steps 1 --log-every 1", "--device", "cpu"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    report = json.load(open(out / "report.json"))
    groups = {(g["kind"], g["channels"], g["steps_factor"]): g for g in report["groups"]}
    # dgae and gauss at c = 4 and c/2 = 2, and both at c for 2x the steps (--quick's equal-compute factor)
    assert set(groups) == {("dgae", 2, 1), ("dgae", 4, 1), ("gauss", 2, 1), ("gauss", 4, 1), ("gauss", 4, 2), ("dgae", 4, 2)}
    for g in groups.values():
        assert g["seeds"] == [0] and g["lr"] == 1e-3 and g["lpips_used"] is False
        for col in ("psnr", "ez_lowfreq_psnr", "spectral_fd", "judge_accuracy", "judge_fd", "zgap_t1", "probe_r2"):
            assert len(g[col]) == 1 and math.isfinite(g[col][0]), col
    assert len(groups[("dgae", 4, 1)]["psnr_1step"]) == 1 and groups[("gauss", 4, 1)]["psnr_1step"] == []
    assert torch.load(out / "gauss_c4_lr0.001_s0_x2" / "ckpt.pt", weights_only=True)["step"] == 8
    assert torch.load(out / "dgae_c4_lr0.001_s0_x2" / "ckpt.pt", weights_only=True)["step"] == 8
    # the floor, scored on the same held-out images as every run
    scored_all = json.load(open(out / "dgae_c4_lr0.001_s0" / "scores.json"))
    scored = scored_all["meancolour_psnr"]
    assert math.isfinite(report["meancolour_psnr"]) and abs(report["meancolour_psnr"] - scored) < 1e-6
    # 4 channels per cell hold any colour exactly; 2 do not hold the built-in data's (random colours)
    assert report["colour_code_psnr"]["c=4"] > 58 > report["colour_code_psnr"]["c=2"]
    # the anchored decoder is not in --kinds: no verdict for it (one in --kinds but untrained is "open")
    assert set(report["verdicts"]) == {f"claim {n}, dgae, {cmp}" for n in (1, 2)
                                       for cmp in ("equal steps", "equal compute (x2)")} | {"claim 1, dgae, equal steps (x2)"}
    for cmp in ("equal steps", "equal compute (x2)", "equal steps (x2)"):  # one seed: no standard error, so nothing is decided
        assert report["verdicts"][f"claim 1, dgae, {cmp}"]["verdict"] == "undecided"
        assert report["verdicts"][f"claim 1, dgae, {cmp}"]["why"].startswith("1 seed, no standard error")
    md = open(out / "report.md").read()
    assert "LPIPS off" in md and "| dgae | c=2 |" in md and "16 held-out images" in md
    flops = report["decoder_step_flops_per_image"]
    assert set(flops) == {"dgae", "gauss"} and f"x2 its steps is {2 * flops['gauss'] / flops['dgae']:.2f}x" in md
    total = report["step_flops_per_image"]
    assert f"{2 * total['gauss'] / total['dgae']:.2f}x its total training compute" in md and "x its wall clock" in md
    # without equal-compute runs (--compute-factor 0; --quick would set its own factor) the report has no rows for them
    subprocess.run([sys.executable, "experiments/claims.py", "compare", "--kinds", "dgae,gauss", "--out", str(out), "--report-only",
                    "true", "--compute-factor", "0", "--device", "cpu"], cwd=ROOT, capture_output=True, check=True)
    rows = {(g["kind"], g["channels"], g["steps_factor"]) for g in json.load(open(out / "report.json"))["groups"]}
    assert rows == {("dgae", 2, 1), ("dgae", 4, 1), ("gauss", 2, 1), ("gauss", 4, 1)}
    assert "equal-compute" not in open(out / "report.md").read()
    # diagnose on one of those checkpoints gives the diagnostics its scores.json holds (same images, same noise)
    diag = subprocess.run([sys.executable, "experiments/claims.py", "diagnose", "--ckpt", str(out / "dgae_c4_lr0.001_s0" / "ckpt.pt"),
                           "--num-images", "16", "--device", "cpu"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert diag.returncode == 0, diag.stderr[-2000:]
    found = json.loads(diag.stdout[diag.stdout.index("{"):])
    assert set(claims.DIAG_TIMES) == {float(k[len("zgap_t"):]) for k in found if k.startswith("zgap_t")}
    for key in [k for k in found if k.startswith("zgap_t")] + ["probe_r2"]:
        assert abs(found[key] - scored_all[key]) < 1e-5, key
    # a second call trains nothing: every part is finished
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "$ " not in again.stdout

    # claim 3 on those four stage-1 models: the same DiT on each latent, scored at DiT steps 2 and 4
    conv = subprocess.run([sys.executable, "experiments/claims.py", "converge", "--quick", "true", "--out", str(out), "--device", "cpu",
                           "--dit-args", "--batch-size 8 --dataset-size 64 --log-every 1 --sample-steps 2"],
                          cwd=ROOT, capture_output=True, text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert conv.returncode == 0, conv.stdout[-2000:] + conv.stderr[-3000:]
    result = json.load(open(out / "converge" / "converge_s0.json"))
    assert list(result["latents"]) == ["gauss c=4", "dgae c=2", "dgae c=4", "gauss c=2"]  # the claim's pair first
    for label, r in result["latents"].items():
        assert [p["step"] for p in r["curve"]] == [2, 4]
        assert all(0 <= p["accuracy"] <= 1 and math.isfinite(p["judge_fd"]) for p in r["curve"])
        assert all(p["judge_fd_recon"] > 0 for p in r["curve"])  # against the latent's own reconstructions
        # the ceiling: the same judge on the same autoencoder's reconstructions at every step (one number)
        assert r["ceiling_accuracy"] == r["curve"][0]["recon_accuracy"] == r["curve"][1]["recon_accuracy"]
    ref = result["latents"]["gauss c=4"]
    assert result["target_accuracy"] == ref["curve"][-1]["accuracy"] and ref["speedup"] == 1.0
    # each DiT's folder is named by its stage-1 run, so a different best rate of the sweep trains a new DiT
    for r in result["latents"].values():
        assert (out / "converge" / os.path.basename(os.path.dirname(r["ae_ckpt"])) / "ckpt.pt").exists()
    assert torch.load(out / "converge" / "dgae_c2_lr0.001_s0" / "ckpt.pt", weights_only=True)["step"] == 4  # resumed from 2
    png = out / "converge" / "converge_s0.png"
    assert png.stat().st_size > 1000 and "| latent |" in open(out / "converge" / "converge_s0.md").read()


@pytest.mark.slow
def test_claim_3_runs_on_an_image_folder_with_a_judge_of_its_classes(tmp_path):
    # three classes of 32-px images, noise around each class's colour: compare scores the reconstructions
    # with a judge trained on the folder, converge trains the DiTs on it and judges their samples the same way
    from PIL import Image
    rng = np.random.default_rng(0)
    for split, n in (("train", 24), ("val", 8)):
        for k, name in enumerate(("blue", "green", "red")):
            (tmp_path / split / name).mkdir(parents=True)
            for i in range(n):
                arr = np.clip(rng.normal(60, 30, (32, 32, 3)), 0, 255)
                arr[..., 2 - k] += 150
                Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(tmp_path / split / name / f"{i}.png")
    out = tmp_path / "cmp"
    data = ["--data", str(tmp_path / "train"), "--val-data", str(tmp_path / "val")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmp = subprocess.run([sys.executable, "experiments/claims.py", "compare", "--quick", "true", "--kinds", "dgae,gauss",
                          "--compute-factor", "0", "--out", str(out), *data, "--device", "cpu",
                          "--train-args", "--lpips-weight 0 --batch-size 4 --decode-steps 1"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert cmp.returncode == 0, cmp.stdout[-2000:] + cmp.stderr[-3000:]
    conv = subprocess.run([sys.executable, "experiments/claims.py", "converge", "--quick", "true", "--out", str(out),
                           "--controls", "false", *data, "--device", "cpu",
                           "--dit-args", "--batch-size 8 --log-every 1 --sample-steps 2"],
                          cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
    assert conv.returncode == 0, conv.stdout[-2000:] + conv.stderr[-3000:]
    result = json.load(open(out / "converge" / "converge_s0.json"))
    assert list(result["latents"]) == ["gauss c=4", "dgae c=2"]
    for label, r in result["latents"].items():
        run = os.path.basename(os.path.dirname(r["ae_ckpt"]))
        judged = json.load(open(out / "converge" / run / "samples_4_classes.json"))
        # the ceiling: the folder's judge on this autoencoder's reconstructions of the held-out images
        assert r["ceiling_accuracy"] == judged["recon_accuracy"] and 0 <= r["ceiling_accuracy"] <= 1
        assert judged["ae_ckpt"] == r["ae_ckpt"] and math.isfinite(judged["judge_fd_recon"])
        assert judged["judged_on"] == str(tmp_path / "train") and judged["num_classes"] == 3
        assert set(judged["per_class_accuracy"]) <= {"blue", "green", "red"}
        assert judged["real_accuracy"] >= 0.9  # the judge knows the folder's colours, at 60 quick steps
        dit = torch.load(out / "converge" / run / "ckpt.pt", weights_only=True)
        assert dit["num_classes"] == 3 and dit["step"] == 4


def test_a_failing_run_stops_compare_with_one_line_that_says_where_flags_go(tmp_path):
    # an image folder and no LPIPS weight files: train_ae.py refuses, and compare says how to pass
    # --lpips-weight 0 to every run instead of printing a traceback
    from PIL import Image
    for cls in ("a", "b"):
        (tmp_path / "data" / cls).mkdir(parents=True)
        for i in range(10):
            Image.new("RGB", (40, 40), (20 * i, 90, 200)).save(tmp_path / "data" / cls / f"{i}.png")
    proc = subprocess.run([sys.executable, "experiments/claims.py", "compare", "--quick", "true", "--kinds", "gauss",
                           "--data", str(tmp_path / "data"), "--val-data", str(tmp_path / "data"), "--out", str(tmp_path / "cmp"), "--device", "cpu"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "DGAE_WEIGHTS": str(tmp_path / "none")})
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: train_ae.py stopped with exit status 1") and '--train-args "--lpips-weight 0"' in last
    assert "vgg16" in proc.stderr  # train_ae.py's own message, above it


# -----------------------------------------------------------------------------
# fcurve: claim 1 against f


def test_fcurve_keeps_the_latent_size_and_sweeps_before_the_other_seeds(tmp_path, monkeypatch):
    monkeypatch.setattr(claims, "preset", "tiny")  # 32 px, f4c4: an 8x8x4 latent
    monkeypatch.setattr(claims, "fs", "4,16,8")
    points = claims.fcurve_points()
    assert points == [(4, 4), (16, 64), (8, 16)]  # (32/f)^2 * c = 256 numbers at every f
    monkeypatch.setattr(claims, "fixed_c", True)
    assert claims.fcurve_points() == [(4, 4), (16, 4), (8, 4)]  # the channels kept: the latent shrinks with f
    monkeypatch.setattr(claims, "fixed_c", False)
    monkeypatch.setattr(claims, "fs", "4,6")
    with pytest.raises(SystemExit, match="multiple of the smallest"):
        claims.fcurve_points()
    monkeypatch.setattr(claims, "seeds", "0,1")
    monkeypatch.setattr(claims, "lrs", "1e-3,3e-4")
    monkeypatch.setattr(claims, "out", str(tmp_path))
    plan = claims.fcurve_plan(points)
    assert [p[0] for p in plan] == [f"{k}_f{f}c{c}_lr{lr}_s0" for f, c in points for k in ("dgae", "gauss")
                                    for lr in ("0.001", "0.0003")]  # the sweep only, until it is scored
    for f, c in points:  # the sweep scored: 3e-4 wins for dgae, 1e-3 for gauss
        for k, lr, v in (("dgae", 1e-3, 20.0), ("dgae", 3e-4, 21.0), ("gauss", 1e-3, 22.0), ("gauss", 3e-4, 21.0)):
            d = tmp_path / claims.run_name(k, c, lr, 0, f=f)
            d.mkdir()
            (d / "scores.json").write_text(json.dumps({"psnr_ez": v}))
    seed1 = [p for p in claims.fcurve_plan(points) if p[-1] == 1]
    assert [(p[1], p[4]) for p in seed1] == [("dgae", 3e-4), ("gauss", 1e-3)] * 3


def test_fcurve_with_fixed_channels_reports_apart_from_the_fixed_size_curve(tmp_path, monkeypatch):
    # --fixed-c: c = 4 at f = 4 and 8 (the latent shrinks 4x); its runs, report and plots are its own
    for name, value in (("preset", "tiny"), ("fs", "4,8"), ("fixed_c", True), ("seeds", "0,1"), ("lrs", "1e-3"),
                        ("out", str(tmp_path)), ("report_only", True)):
        monkeypatch.setattr(claims, name, value)
    # the fixed-size curve's f = 8 runs (c = 16) in the same --out, far off: they must not enter
    for (k, f, c), base in {("dgae", 4, 4): 30.0, ("dgae", 8, 4): 27.0, ("gauss", 4, 4): 29.0, ("gauss", 8, 4): 25.0,
                            ("dgae", 8, 16): 0.0, ("gauss", 8, 16): 50.0}.items():
        for seed, jitter in ((0, 0.1), (1, -0.1)):
            d = tmp_path / claims.run_name(k, c, 1e-3, seed, f=f)
            d.mkdir()
            (d / "scores.json").write_text(json.dumps({m: base + jitter for m in claims.FCURVE_MEASURES}))
    claims.run_fcurve(SimpleNamespace(ddp=False, device=torch.device("cpu")))
    md = open(tmp_path / "fcurve_fixed_c.md").read()
    assert md.startswith("# claim 1 against f: the built-in data, tiny preset, c = 4 at every f")
    assert "| dgae | 8 | 4 |" in md and not (tmp_path / "fcurve.md").exists()
    assert json.load(open(tmp_path / "fcurve_fixed_c.json"))["verdicts"]["psnr_ez"]["D"] == pytest.approx(1.0)

def test_drop_verdict_compares_the_two_decoders_losses_with_their_standard_error():
    rows = lambda v: {m: list(v) for m in claims.FCURVE_MEASURES}  # noqa: E731
    table = {("dgae", 4): rows([30.0, 30.2, 29.8]), ("dgae", 16): rows([28.0, 28.2, 27.8]),   # drops 2 dB
             ("gauss", 4): rows([31.0, 31.2, 30.8]), ("gauss", 16): rows([26.0, 26.2, 25.8])}  # drops 5 dB
    d, se, verdict = claims.drop_verdict(table, "psnr_ez", 4, 16)
    assert d == pytest.approx(3.0) and se == pytest.approx(math.sqrt(4 * 0.04 / 3)) and verdict == "holds"
    table[("gauss", 16)] = rows([28.0, 29.0, 27.0])  # drops 2 dB too, with a wide spread
    assert claims.drop_verdict(table, "psnr_ez", 4, 16)[2] == "undecided"
    # a distance: its growth is the drop; DGAE's grows more here, so the claim fails on it
    table = {("dgae", 4): rows([1.0, 1.1, 0.9]), ("dgae", 16): rows([9.0, 9.1, 8.9]),
             ("gauss", 4): rows([1.0, 1.1, 0.9]), ("gauss", 16): rows([3.0, 3.1, 2.9])}
    assert claims.drop_verdict(table, "spectral_fd", 4, 16)[2] == "fails"
    assert claims.drop_verdict({}, "psnr_ez", 4, 16)[2].startswith("undecided: runs missing")


@pytest.mark.parametrize("mode", ["compare", "fcurve"])
def test_only_that_matches_no_run_is_refused_not_a_silent_exit_0(tmp_path, mode):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "claims.py"), mode, "--only", "NOMATCH", "--out",
                           str(tmp_path / "c"), "--judge-steps", "1", "--num-images", "4"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1].startswith("error: --only 'NOMATCH' matches no run of the plan")


def test_a_damaged_scores_file_is_one_line_naming_it(tmp_path, monkeypatch):
    monkeypatch.setattr(claims, "out", str(tmp_path))
    (tmp_path / "dgae_c4_lr0.001_s0").mkdir()
    (tmp_path / "dgae_c4_lr0.001_s0" / "scores.json").write_text('{"psnr": 3')  # cut short
    with pytest.raises(SystemExit, match=r"dgae_c4_lr0.001_s0/scores.json cannot be read \(JSONDecodeError\); delete it"):
        claims.finished_scores("dgae_c4_lr0.001_s0")
    assert claims.finished_scores("not_run_yet") is None


@pytest.mark.slow
def test_fcurve_runs_on_a_flat_folder_of_photos_of_any_size(tmp_path):
    # loose JPEGs of mixed, non-square sizes, as a set of photographs comes: center-cropped to 32 px;
    # each (decoder, f) trained at its f with the latent's size kept, scored, tabulated and plotted
    from PIL import Image
    rng = np.random.default_rng(0)
    for split, n in (("train", 16), ("val", 8)):
        (tmp_path / split).mkdir()
        for i in range(n):
            h, w = rng.integers(40, 90, 2)
            ramp = np.linspace(0, 255, w)[None, :, None] * rng.uniform(0.2, 1, 3)
            arr = np.clip(ramp + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(tmp_path / split / f"photo_{i}.jpg", quality=90)
    out = tmp_path / "fc"
    proc = subprocess.run([sys.executable, "experiments/claims.py", "fcurve", "--quick", "true", "--fs", "4,8",
                           "--data", str(tmp_path / "train"), "--val-data", str(tmp_path / "val"), "--out", str(out),
                           "--device", "cpu", "--train-args", "--lpips-weight 0 --batch-size 4 --decode-steps 1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    report = json.load(open(out / "fcurve.json"))
    cells = {(g["kind"], g["f"]): g for g in report["groups"]}
    assert set(cells) == {("dgae", 4), ("dgae", 8), ("gauss", 4), ("gauss", 8)}
    for (kind, f), g in cells.items():
        assert g["c"] == {4: 4, 8: 16}[f] and g["seeds"] == [0]
        assert all(len(g[m]) == 1 and math.isfinite(g[m][0]) for m in claims.FCURVE_MEASURES)
        ck = torch.load(out / claims.run_name(kind, g["c"], g["lr"], 0, f=f) / "ckpt.pt", weights_only=True)
        assert ck["config"]["compression"] == f and ck["model_args"]["latent_channels"] == g["c"]
    # a deterministic decoder's E[x|z] is its one decode
    gauss = json.load(open(out / claims.run_name("gauss", 4, cells[("gauss", 4)]["lr"], 0, f=4) / "scores.json"))
    assert gauss["psnr_ez"] == gauss["psnr"] and gauss["lowfreq_psnr_ez"] == gauss["lowfreq_psnr"]
    for m in claims.FCURVE_MEASURES:  # one seed: no standard error, nothing decided
        assert report["verdicts"][m]["verdict"].startswith("undecided")
        assert (out / f"fcurve_{m}.png").stat().st_size > 1000
    md = open(out / "fcurve.md").read()
    assert "| dgae | 8 | 16 |" in md and "8 held-out images" in md  # the 8 there are, not --quick's 16
