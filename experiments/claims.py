"""
The paper's claims, measured: one command per claim, a table with mean and spread over seeds, and
a verdict by rules fixed before the runs: "holds" or "fails" only beyond 2 standard errors over
seeds, else "undecided". docs/CLAIMS.md has the runs and what they found.

    python experiments/claims.py compare                     # claims 1 and 2 on the built-in data
    python experiments/claims.py compare --data photos/train --val-data photos/val \\
        --out out/claims/photos
    python experiments/claims.py compare --only anchored_c2  # just the runs whose name has this
    python experiments/claims.py compare --report-only true  # the table of the runs finished so far
    python experiments/claims.py diagnose --ckpt out/ae/ckpt.pt  # does a stage-1 decoder use z?
    python experiments/claims.py converge                    # claim 3: the same DiT on four latents
    python experiments/claims.py fcurve --data photos/train --val-data photos/val \\
        --out out/claims/fcurve  # claim 1 against f

compare: real `python train_ae.py` runs, into out/<run>/, of four decoders on one encoder at the
preset's latent channels c and at c/2: dgae (the diffusion decoder), anchored (the U-Net also sees
a deterministic decode x~ = D(z)), gauss (the SD-VAE style baseline), unet (DGAE's U-Net as a
deterministic decoder: diffusion against architecture). First seed 0 at each rate of --lrs, then
the other seeds at each decoder's best rate, then dgae, gauss and unet at c for --compute-factor
times the steps (equal decoder compute for gauss and unet, as a DGAE step runs its U-Net twice;
DGAE as long, so that "costlier" and "under-trained" separate). A finished run is skipped and
an interrupted one resumes; each is scored once (scores.json in its folder). The report is
out/report.md, the rules in claims.verdicts.
diagnose: does a decoder use z? The shuffled-z loss gap (z_gap) and a linear probe (linear_probe).
converge: the same DiT on four of compare's latents at each seed, its samples named by a classifier
trained on the same data (built-in or --data's classes); claim 3 is the speed-up of DGAE
at c/2 over the Gaussian decoder at c (converge_one_seed, summarise_converge). A seed's report,
out/converge/converge_s<seed>.json, stands for that seed in later calls with the same settings:
seeds run on several machines pool by copying their reports into one out/converge.
fcurve: DGAE and the Gaussian decoder at each f of --fs, the latent's size fixed (c grows as f^2),
or with --fixed-c its channels; the rule is drop_verdict's.
"""

import functools
import itertools
import json
import math
import os
import shlex
import subprocess
import sys
import time

import numpy as np

# the repository: the stage scripts and support/
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch
import torch.nn.functional as F
from torch.utils.data import Subset

from ae import DGAE, make_config
from decoder_diffusion import add_noise, velocity_target
from eval import meancolour_psnr, score_reconstructions
from experiments.bench import count_flops
from support import common
from support.checkpoints import atomic_write, load_checkpoint, load_dgae, write_text
from support.data import (ImageFolderDataset, InOrder, build_dataset, check_judge_classes,
                          to_model_range)
from support.eval_data import HELDOUT_SIZE, ImageSource
from support.metrics import psnr
from support.procedural import train_pattern_classifier

# -----------------------------------------------------------------------------
# settings (override with --name value)
data = ""  # training images (an ImageNet-style folder); "" = the built-in procedural dataset
val_data = ""  # held-out images to score on (a folder); "" with built-in data = its held-out images
out = "out/claims"  # one folder per run, scores.json in each, report.md and report.json here
preset = "tiny"  # train_ae.py's model preset for every run
max_steps = 1350  # training steps of each run (train_ae.py's default demo)
seeds = "0,1,2"  # training seeds; the sweep runs at the first
lrs = "1e-3,3e-4"  # learning-rate sweep of every decoder (seed 0, both c); the first is run first
kinds = "dgae,anchored,gauss,unet"  # the decoders to train (see the docstring)
anchor_ch = 16  # the anchored decoder's --anchor-ch
compute_factor = 3  # equal-compute runs (dgae, gauss, unet): this many times the steps; 0: none
compute_seeds = 1  # their seeds (first N of --seeds): 1 where the verdict is far outside the spread
train_args = ""  # more train_ae.py flags for every run, e.g. "--lpips-weight 0"
only = ""  # run only parts whose name contains this (the report still collects all finished ones)
report_only = False  # write the report from the finished runs, train nothing
num_images = 500  # held-out images scored (the first N)
mean_of = 4  # decodes averaged for the E[x|z] estimate
batch_size = 50  # images per forward pass when scoring
ckpt = ""  # diagnose: the train_ae.py checkpoint
dit_steps = "125,177,250,354,500,707,1000,1414,2000,2828"  # converge: DiT steps scored (log-spaced)
num_samples = 600  # converge: samples scored at each of those steps
dit_args = ""  # converge: more train_dit.py flags for every run
fs = "4,8,16"  # fcurve: the spatial compressions, the latent's size fixed at the first's
fixed_c = False  # fcurve: keep the first f's channels at every f instead (the latent shrinks)
pool = 4  # fcurve: pooling factor of the low-/high-frequency measures, the same for every f
controls = True  # converge: also the controls (DGAE at c, Gaussian at c/2), beside the claim's pair
judge_steps = 600  # training steps of the pattern classifier that judges the classes
quick = False  # the tests' form: 4 steps, one seed, one rate, 16 images
device = ""  # "" = auto (cuda, mps, cpu)
dist_timeout = 600  # seconds a process waits for the others (claims.py itself runs as one process)
# -----------------------------------------------------------------------------
SETTINGS = common.settings_block(globals())  # the defaults above: every main() starts from them

KIND_FLAGS = {"dgae": ["--decoder", "diffusion", "--anchor-ch", "0"],
              "anchored": ["--decoder", "diffusion", "--anchor-ch", "ANCHOR"],
              "gauss": ["--decoder", "gaussian"], "unet": ["--decoder", "unet"]}
LONG_KINDS = ("dgae", "gauss", "unet")  # the decoders also trained for --compute-factor x the steps
DIAG_TIMES = (0.1, 0.5, 0.9, 1.0)  # the t at which zgap is measured
# the rules, fixed before any run (README, "The paper's claims, measured")
CLAIM1_LOWFREQ_DB, CLAIM2_LOWFREQ_DB, HIGHFREQ_RANGE = 1.0, 2.0, (0.85, 1.15)


# -----------------------------------------------------------------------------
# diagnostics: does the decoder use z?


@torch.inference_mode()
def z_gap(model, x, times=DIAG_TIMES, seed=0):
    """{t: loss(shuffled z) - loss(right z)}; x (B, 3, H, W) in [-1, 1], B >= 2: the same noise
    for both, z rolled by one image. A deterministic decoder's loss is its decode's MSE (t = 1)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    z = model.encode(x)  # (B, c, h, w): the posterior mean
    z_wrong = z.roll(1, dims=0)
    if model.cfg.decoder != "diffusion":
        return {1.0: (F.mse_loss(model.deterministic_decode(z_wrong), x)
                      - F.mse_loss(model.deterministic_decode(z), x)).item()}
    eps = torch.randn(x.shape, generator=g).to(x.device)  # (B, 3, H, W)
    gaps = {}
    for t in times:
        tt = torch.full((len(x),), t, device=x.device)
        x_t = add_noise(x, eps, tt)
        target = velocity_target(x, eps)

        def loss(zz):
            anchor = model.anchor(zz) if model.anchor is not None else None  # depends on z too
            return F.mse_loss(model.velocity(x_t, tt, zz, anchor), target)

        gaps[t] = (loss(z_wrong) - loss(z)).item()
    return gaps


def ridge_fit(a, b, lam=1e-3):
    """Ridge least squares of b (N, K) on a (N, D), both centred by their means; the penalty is lam
    times the mean variance of a's columns. Returns (W (D, K), a's mean, b's mean)."""
    a_mean, b_mean = a.mean(0), b.mean(0)
    ac = a - a_mean
    gram = ac.t() @ ac  # (D, D)
    reg = lam * gram.diagonal().mean() * torch.eye(len(gram), dtype=a.dtype)
    return torch.linalg.solve(gram + reg, ac.t() @ (b - b_mean)), a_mean, b_mean


@torch.inference_mode()
def linear_probe(model, train_x, test_x):
    """R^2 on test_x of a ridge map from z to the image average-pooled to the latent grid."""
    f = model.cfg.compression

    def pairs(x):
        z = torch.cat([model.encode(b) for b in x.split(100)]).flatten(1).double().cpu()  # (N, chw)
        return z, F.avg_pool2d(x, f).flatten(1).double().cpu()  # (N, 3 h w)

    (za, pa), (zb, pb) = pairs(train_x), pairs(test_x)
    w, z_mean, p_mean = ridge_fit(za, pa)
    pred = (zb - z_mean) @ w + p_mean
    # R^2 = 1 - SSE / SST over all entries, SST around the training targets' mean
    return float(1 - ((pred - pb) ** 2).sum() / ((pb - p_mean) ** 2).sum())


def colour_code_psnr(real, f, channels):
    """Low-frequency PSNR of coding each f x f cell's mean colour in its top `channels` principal
    components; real (N, 3, H, W) in [0, 255]. A property of the data: how much of the coarse image
    a latent that size holds without packing colour nonlinearly (exact with 3 or more channels)."""
    cells = F.avg_pool2d(real.double(), f)  # (N, 3, h, w)
    v = cells.permute(0, 2, 3, 1).reshape(-1, 3)  # (N h w, 3): one mean colour per cell
    mean = v.mean(0)
    axes = torch.linalg.eigh((v - mean).t() @ (v - mean))[1][:, max(0, 3 - channels):]  # (3, k)
    coded = (v - mean) @ axes @ axes.t() + mean
    coded = coded.view(cells.shape[0], *cells.shape[2:], 3).permute(0, 3, 1, 2)
    return float(psnr(cells, coded).mean())


def first_pixels(source, n):
    """The first n images of an ImageSource as (n, 3, H, W) uint8 values, on the CPU."""
    return torch.cat(list(source.batches(0, source.count(n), 100)))


def diagnostics(model, train_data, source, dev, n_probe=1000):
    """zgap on the first 64 images of the ImageSource and the linear probe, fitted on the first
    n_probe training images and scored on the source's first 500 of --num-images."""
    heldout = first_pixels(source, num_images).to(dev) / 127.5 - 1
    train_set = build_dataset(train_data, model.cfg.resolution, size=n_probe)
    train_set = Subset(train_set, range(min(n_probe, len(train_set))))
    train_x = to_model_range(torch.cat([x for x, _ in InOrder(train_set, 100)]).to(dev))
    out = {f"zgap_t{t:g}": v for t, v in z_gap(model, heldout[:64]).items()}
    out["probe_r2"] = linear_probe(model, train_x, heldout[:500])
    return out


def run_diagnose(dist):
    if not ckpt:
        raise SystemExit("diagnose needs --ckpt (a train_ae.py checkpoint); --data is its training "
                         "folder (\"\" = the built-in data), --val-data a held-out folder")
    model = load_dgae(ckpt, dist.device)
    source = ImageSource(val_data, model.cfg.resolution, builtin_limit=num_images)
    print(json.dumps({"ckpt": ckpt, **diagnostics(model, data, source, dist.device)}, indent=1))


# -----------------------------------------------------------------------------
# shared by the modes: the runs, their scores, tables and verdicts


def seed_list():
    return [int(s) for s in seeds.split(",")]


def lr_list():
    return [float(v) for v in lrs.split(",")]


def run_name(kind, channels, lr, seed, factor=1, f=None):
    """The run's folder name; f is given only by fcurve, whose runs differ in compression."""
    return ((f"{kind}_f{f}c{channels}" if f else f"{kind}_c{channels}") + f"_lr{lr:g}_s{seed}"
            + (f"_x{factor}" if factor > 1 else ""))


def script(name, *args):
    """Run one of this repository's scripts as a real subprocess. If it fails, stop with one line:
    its own message is printed just above, and the finished parts are kept for the next call."""
    cmd = [sys.executable, os.path.join(ROOT, name), *map(str, args)]
    print("$ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
    status = subprocess.run(cmd).returncode
    if status != 0:
        hint = (' (flags for every run go in --train-args, e.g. --train-args "--lpips-weight 0")'
                if name == "train_ae.py" else "")
        raise SystemExit(f"error: {name} stopped with exit status {status}: its message is "
                         f"above{hint}. Run the same claims.py command again once it is fixed: the "
                         "finished parts are kept")


def resume_flag(run_dir):
    return ["--resume", "true"] if os.path.exists(os.path.join(run_dir, "ckpt.pt")) else []


def kind_flags(kind):
    """train_ae.py's flags for a decoder kind."""
    return [a.replace("ANCHOR", str(anchor_ch)) for a in KIND_FLAGS[kind]]


def step_flops(kind, channels):
    """(total, decoder) FLOPs per image of a training step of this kind, forward and backward,
    counted on the meta device; the decoder's share is the step less the encoder's."""
    flags = kind_flags(kind)
    overrides = {k[2:].replace("-", "_"): int(v) if v.isdigit() else v
                 for k, v in zip(flags[::2], flags[1::2])}
    with torch.device("meta"):
        net = DGAE(make_config(preset, latent_channels=channels, **overrides))
        x = torch.zeros(2, 3, net.cfg.resolution, net.cfg.resolution)
    step = count_flops(lambda: net(x)[0].backward())
    encoder = count_flops(lambda: net.encode(x, sample=True).sum().backward())
    return step / x.shape[0], (step - encoder) / x.shape[0]


def decoder_step_flops(kind, channels):
    """What "equal decoder compute" equalises: step_flops' decoder share."""
    return step_flops(kind, channels)[1]


def train(run_dir, kind, channels, lr, seed, steps, extra=()):
    """One real `python train_ae.py` run (resumed if a checkpoint is there; a finished one just
    reloads). Its wall clock, summed over the calls, goes to train_seconds.txt."""
    t0 = time.perf_counter()
    script("train_ae.py", *kind_flags(kind), *extra, "--preset", preset, "--latent-channels",
           channels, "--lr", f"{lr:g}", "--seed", seed, "--max-steps", steps, "--data", data,
           "--out-dir", run_dir, *shlex.split(train_args), *resume_flag(run_dir))
    path = os.path.join(run_dir, "train_seconds.txt")
    before = float(open(path).read()) if os.path.exists(path) else 0.0
    write_text(path, f"{before + time.perf_counter() - t0:.1f}")


def scored_model(run_dir, source, dist, **kw):
    """(the run's EMA model, whether it decodes by diffusion, its score_reconstructions: at the
    checkpoint's decode steps, with E[x|z] from --mean-of decodes for a diffusion decoder)."""
    model = load_dgae(os.path.join(run_dir, "ckpt.pt"), dist.device)
    diffusion = model.cfg.decoder == "diffusion"
    scores = score_reconstructions(model, source, 0, dist, num_images, batch_size, 0,
                                   mean_of=mean_of if diffusion else 0, **kw)
    return model, diffusion, scores


def finished_scores(name):
    """A run's scores.json, None before it is scored; a damaged one is one line naming it."""
    path = os.path.join(out, name, "scores.json")
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            scores = json.load(f)
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {path} cannot be read ({type(e).__name__}); delete it and run "
                         "the same command again to score that run anew") from None
    if not isinstance(scores, dict):
        raise SystemExit(f"error: {path} is not a dict of scores; delete it and run the same "
                         "command again")
    return scores


def scored_seeds(name_of_seed):
    """[(seed, scores)] for each seed of --seeds whose run name_of_seed(seed) is scored."""
    rows = [(s, finished_scores(name_of_seed(s))) for s in seed_list()]
    return [(s, r) for s, r in rows if r is not None]


def best_lr(kind, channels, f=None, key="ez_lowfreq_psnr"):
    """The sweep's best rate (at the first seed) by `key`; None until every rate is scored."""
    scored = [(finished_scores(run_name(kind, channels, lr, seed_list()[0], f=f)), lr)
              for lr in lr_list()]
    if any(s is None for s, _ in scored):
        return None
    return max(scored, key=lambda p: p[0][key])[1]


def run_plan(make_plan, run_one):
    """Train and score (run_one) the runs of make_plan() [(name, ...)] one at a time, skipping the
    finished ones and those --only leaves out; the plan is made anew after each run, as later parts
    need the sweep's scores."""
    done = set()
    while not report_only:
        todo = [p for p in make_plan() if p[0] not in done and only in p[0]]
        if not todo:
            break
        if finished_scores(todo[0][0]) is None:
            run_one(*todo[0])
        done.add(todo[0][0])
    if only and not done and not report_only:
        raise SystemExit(f"error: --only {only!r} matches no run of the plan; its names look like "
                         f"{make_plan()[0][0]}")


def check_one_process_and_data(mode, dist):
    if dist.ddp:
        raise SystemExit(f"{mode} runs its training jobs one after another; start it with plain "
                         "python")
    if bool(data) != bool(val_data):
        raise SystemExit(f"error: {mode} needs both --data (training folder) and --val-data "
                         "(held-out folder), or neither (the built-in data and its held-out "
                         "images)")


def mean_sd(values):
    v = np.asarray(values, dtype=float)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def mean_se(values):
    """(mean, standard error of the mean over seeds); the SE is nan with one seed."""
    m, sd = mean_sd(values)
    return m, sd / math.sqrt(len(values)) if len(values) > 1 else math.nan


def decide(margin, se):
    """A rule's verdict from its margin (how far past the rule's threshold, > 0 on the good side)
    and the margin's standard error: "holds" beyond +2 SE, "fails" beyond -2 SE, "undecided"
    between, and with one seed (no SE)."""
    if not math.isfinite(se):
        return "undecided"
    return "holds" if margin > 2 * se else "fails" if margin < -2 * se else "undecided"


def mean_sd_text(values):
    m, sd = mean_sd(values)
    return f"{m:.3f} +- {sd:.3f}" if len(values) > 1 else f"{m:.3f}"


def md_row(cells):
    return "| " + " | ".join(str(c) for c in cells) + " |"


def md_table(columns):
    """A markdown table's header and separator lines."""
    return [md_row(columns), "|" + "---|" * len(columns)]


def write_outputs(path, lines, result):
    """Print the report and write it to path.md, the numbers to path.json."""
    report = "\n".join(lines) + "\n"
    print(report)
    write_text(path + ".md", report)
    write_text(path + ".json", json.dumps(result, indent=1))


# -----------------------------------------------------------------------------
# compare: claims 1 and 2

COLUMNS = ("psnr", "psnr_1step", "lowfreq_psnr", "ez_lowfreq_psnr", "highfreq_ratio", "spectral_fd",
           "judge_accuracy", "judge_fd", "zgap_t1", "zgap_t0.5", "probe_r2", "train_seconds")


def plan(c):
    """The runs in the order they are trained: [(name, kind, channels, lr, seed, factor)]; the parts
    after the sweep need its scores (best_lr), so plan() is called again as runs finish."""
    first, kind_list = seed_list()[0], kinds.split(",")
    parts = [(k, ch, lr, first, 1) for lr in lr_list() for ch in (c // 2, c) for k in kind_list]
    for k in kind_list:
        for ch in (c // 2, c):
            lr = best_lr(k, ch)
            if lr is not None:
                parts += [(k, ch, lr, s, 1) for s in seed_list()[1:]]
    if compute_factor > 1:
        for k in LONG_KINDS:
            lr = best_lr(k, c) if k in kind_list else None
            if lr is not None:
                parts += [(k, c, lr, s, compute_factor) for s in seed_list()[:compute_seeds]]
    return [(run_name(*p), *p) for p in parts]


def score(run_dir, heldout_source, judge, dist):
    """Write scores.json of a finished run: the reconstruction measures at the checkpoint's decode
    steps (and the 1-step decode of a diffusion decoder), E[x|z] and the diagnostics."""
    model, diffusion, s = scored_model(run_dir, heldout_source, dist, judge=judge)
    # E[x|z]: the decoder's conditional mean, its sampling variance removed (conditional_mean_mse)
    s["ez_lowfreq_psnr"] = s["lowfreq_psnr_ez"] if diffusion else s["lowfreq_psnr"]
    if diffusion:
        s["psnr_1step"] = score_reconstructions(model, heldout_source, 1, dist, num_images,
                                                batch_size, 0)["psnr"]
    s.update(diagnostics(model, data, heldout_source, dist.device))
    log = [json.loads(line) for line in open(os.path.join(run_dir, "log.jsonl"))]
    s["psnr_t1_log"] = [(r["step"], round(r["psnr_t1"], 2)) for r in log if "psnr_t1" in r]
    seconds = os.path.join(run_dir, "train_seconds.txt")
    if os.path.exists(seconds):
        s["train_seconds"] = float(open(seconds).read())
    ck = torch.load(os.path.join(run_dir, "ckpt.pt"), map_location="cpu", weights_only=True)
    s["lpips_used"] = bool(ck["lpips_used"])
    params = common.count_params(model.decoder) / 1e6
    if model.anchor is not None:
        params += common.count_params(model.anchor) / 1e6
    s["decoder_params_M"] = round(params, 3)
    write_text(os.path.join(run_dir, "scores.json"), json.dumps(s, indent=1))


def summarise(c):
    """{(kind, channels, factor): {"lr", "seeds", column: [per-seed values]}} at each decoder's best
    rate (the first of --lrs while the sweep is unfinished)."""
    groups = {}
    for kind in kinds.split(","):
        for ch, factor in ((c // 2, 1), (c, 1), (c, compute_factor)):
            if factor != 1 and (kind not in LONG_KINDS or compute_factor <= 1):
                continue
            lr = best_lr(kind, ch) or lr_list()[0]
            rows = scored_seeds(lambda s: run_name(kind, ch, lr, s, factor))
            if rows:
                groups[(kind, ch, factor)] = {
                    "lr": lr, "seeds": [s for s, _ in rows],
                    "lpips_used": any(r["lpips_used"] for _, r in rows),
                    "decoder_params_M": rows[0][1]["decoder_params_M"],
                    **{col: [r[col] for _, r in rows if col in r] for col in COLUMNS}}
    return groups


def difference(a, b, measure):
    """mean(a) - mean(b) of two rows' per-seed values and its SE (independent runs)."""
    (mean_a, se_a), (mean_b, se_b) = mean_se(a[measure]), mean_se(b[measure])
    return mean_a - mean_b, math.hypot(se_a, se_b)


def best_reference(refs):
    return max(refs, key=lambda r: np.mean(r["ez_lowfreq_psnr"]))


def claim_rules(claim, g, refs, db):
    """[(label, value, rule, margin, SE)] of one claim for the row g against the reference rows;
    a margin's SE comes from the seeds' spreads of the two rows it compares (independent runs)."""
    lf, lf_se = difference(g, best_reference(refs), "ez_lowfreq_psnr")
    rules = [("E[x|z] low-freq PSNR", lf, f"(rule: >= -{db:g} dB)", lf + db, lf_se)]
    for r in refs:
        fd, fd_se = difference(r, g, "spectral_fd")
        rules.append(("spectral FD below a reference's", fd, "(rule: > 0)", fd, fd_se))
    if claim == "claim 1":
        hf, hf_se = mean_se(g["highfreq_ratio"])
        lo, hi = HIGHFREQ_RANGE
        rules.append(("high-frequency ratio", hf, f"(rule: {lo}-{hi})", min(hf - lo, hi - hf),
                      hf_se))
    return rules


def verdicts(groups, c):
    """{"claim N, kind, equal steps|compute (xF)": (verdict, why)} for dgae and anchored against
    the references at equal steps and at --compute-factor times their steps, and claim 1 for dgae
    and the references all at --compute-factor times the steps. Verdict: "holds" if
    every rule holds, "fails" if any fails, "undecided" (a margin within 2 SE, or one seed), "open"
    (runs missing). Claim 1 (at c): E[x|z] low-frequency PSNR within 1 dB of the best deterministic
    decoder (gauss, unet), a spectral FD below each of theirs, a high-frequency ratio in 0.85-1.15.
    Claim 2 (at c/2): against gauss at c, within 2 dB and a spectral FD below."""
    out = {}
    factors = [(1, 1)] + ([(1, compute_factor)] if compute_factor > 1 else [])
    rule_sets = (("claim 1", c, ("gauss", "unet"), CLAIM1_LOWFREQ_DB),
                 ("claim 2", c // 2, ("gauss",), CLAIM2_LOWFREQ_DB))
    kind_list = kinds.split(",")
    judged = [k for k in ("dgae", "anchored") if k in kind_list]  # no verdict for a kind not run
    cases = list(itertools.product(judged, rule_sets, factors))
    # DGAE trained as long as the references: costlier or under-trained?
    if compute_factor > 1 and "dgae" in judged:
        cases.append(("dgae", rule_sets[0], (compute_factor, compute_factor)))
    for kind, rule_set, (own, factor) in cases:
        claim, ch, ref_kinds, db = rule_set
        name = f"{claim}, {kind}, " + ("equal steps" if own == factor == 1 else
                                       f"equal steps (x{factor})" if own == factor else
                                       f"equal compute (x{factor})")
        g = groups.get((kind, ch, own))
        wanted = [(k, c, factor) for k in ref_kinds if k in kind_list]
        refs = [groups[key] for key in wanted if key in groups]
        if g is None or not wanted or len(refs) < len(wanted):
            out[name] = ("open", "not all runs are finished")
            continue
        rules = claim_rules(claim, g, refs, db)
        each = [decide(margin, se) for *_, margin, se in rules]
        verdict = ("fails" if "fails" in each
                   else "holds" if all(v == "holds" for v in each) else "undecided")
        why = "; ".join(f"{label} {value:+.2f} +- {se:.2f} SE {rule}: {v}"
                        for (label, value, rule, _, se), v in zip(rules, each))
        best = best_reference(refs)
        if g.get("lowfreq_psnr") and best.get("lowfreq_psnr"):
            # what one decode shows (sample.py, the grids) beside the rule's conditional mean
            one, one_se = difference(g, best, "lowfreq_psnr")
            why += f"; one decode's low-freq PSNR {one:+.2f} +- {one_se:.2f} SE (not in the rule)"
        if min(len(g["seeds"]), *(len(r["seeds"]) for r in refs)) < 2:
            why = f"1 seed, no standard error: {why}"  # no spread, nothing is decided
        out[name] = (verdict, why)
    return out


def equal_compute_note(groups, flops, c):
    """The report's line on equal compute: each reference's FLOPs (and wall clock) beside DGAE's."""
    dgae_total, dgae_dec = flops["dgae"]
    seconds = {k: np.mean(g["train_seconds"]) for (k, ch, fac), g in groups.items()
               if ch == c and g.get("train_seconds")
               and fac == (1 if k == "dgae" else compute_factor)}
    given = [f"{k} {dec / 1e9:.3f} ({total / 1e9:.3f} with the encoder), so x{compute_factor} its "
             f"steps is {compute_factor * dec / dgae_dec:.2f}x DGAE's decoder compute and "
             f"{compute_factor * total / dgae_total:.2f}x its total training compute"
             + (f", {seconds[k] / seconds['dgae']:.2f}x its wall clock on this machine"
                if k in seconds and "dgae" in seconds else "")
             for k, (total, dec) in flops.items() if k in ("gauss", "unet")]
    return (f"equal compute: one training step of DGAE does {dgae_dec / 1e9:.3f} GFLOP per image "
            f"in its decoder, {dgae_total / 1e9:.3f} with the encoder (forward and backward); "
            + "; ".join(given) + ". At equal compute DGAE has also trained for fewer steps; its "
            f"own x{compute_factor} rows, beside the references', separate the two")


def write_report(c, heldout):
    groups = summarise(c)
    lpips = any(g["lpips_used"] for g in groups.values())
    lines = [f"# stage 1 on {data or 'the built-in data'}: every decoder at c = {c} and c/2 = "
             f"{c // 2}", "",
             f"{preset} preset, {max_steps} steps"
             + (f" (x{compute_factor} for the equal-compute rows)" if compute_factor > 1 else "")
             + f", seeds {seeds}, learning rates swept {lrs} (seed {seeds.split(',')[0]}, best by "
             f"E[x|z] low-frequency PSNR), {heldout.count(num_images)} held-out images, {mean_of} "
             "decodes for E[x|z]; LPIPS "
             + ("on" if lpips else "off (no weight files, or --lpips-weight 0)"),
             ""]
    flops = {k: step_flops(k, c) for k in kinds.split(",")}  # (total, decoder) per image, at c
    if compute_factor > 1 and "dgae" in flops:
        lines += [equal_compute_note(groups, flops, c), ""]
    lines += md_table(["decoder", "latent", "steps", "lr", "seeds", "params M", *COLUMNS])
    for (kind, ch, factor), g in groups.items():
        cells = [mean_sd_text(g[col]) if g[col] else "" for col in COLUMNS]
        lines.append(md_row([kind, f"c={ch}", f"x{factor}", f"{g['lr']:g}", len(g["seeds"]),
                             g["decoder_params_M"], *cells]))
    real = first_pixels(heldout, num_images)  # (N, 3, H, W) uint8
    baseline = float(meancolour_psnr(real).mean())
    cell = make_config(preset).compression
    codes = {ch: colour_code_psnr(real, cell, ch) for ch in (c // 2, c)}
    lines.append(f"\neach image's mean colour: PSNR {baseline:.2f} dB. Each {cell}x{cell} cell's "
                 f"mean colour coded linearly in c/2 = {c // 2} numbers: low-frequency PSNR "
                 f"{codes[c // 2]:.2f} dB; in c = {c}: {codes[c]:.2f} dB "
                 "(claims.colour_code_psnr: how much of the coarse image the data lets a latent of "
                 "each size hold without packing colour nonlinearly)")
    lines += ["", "## verdicts (rules in claims.verdicts; each margin +- its standard error over "
                  "seeds: holds or fails only beyond 2 SE, else undecided)"]
    results = verdicts(groups, c)
    lines += [f"- {claim}: {holds}: {why}" for claim, (holds, why) in results.items()]
    write_outputs(os.path.join(out, "report"), lines, {
        "meancolour_psnr": baseline,
        "decoder_step_flops_per_image": {k: v[1] for k, v in flops.items()},
        "step_flops_per_image": {k: v[0] for k, v in flops.items()},
        "colour_code_psnr": {f"c={ch}": v for ch, v in codes.items()},
        "groups": [{"kind": k, "channels": ch, "steps_factor": fac, **g}
                   for (k, ch, fac), g in groups.items()],
        "verdicts": {k: {"verdict": h, "why": w} for k, (h, w) in results.items()}})


def judge_folder(res, heldout):
    """--data, the labelled images a judge learns, its classes checked against the held-out
    folder's; None where there is nothing to judge by: held-out images without classes (an .npz)
    or a --data of one class (every image would be named right)."""
    learn = ImageFolderDataset(data, res)
    if not isinstance(heldout.dataset, ImageFolderDataset) or len(learn.classes) < 2:
        return None
    check_judge_classes(learn, heldout.dataset, f"--val-data {val_data}")
    return learn


def make_judge(res, learn, dist):
    """The pattern classifier that judges what class a reconstruction or sample shows, trained on
    the built-in data's classes, or with --data on learn, judge_folder's images (None: no judge)."""
    if not data:  # the built-in data's classes, train_dit.py's
        return train_pattern_classifier(res, steps=judge_steps, device=dist.device)
    return None if learn is None else train_pattern_classifier(
        res, len(learn.classes), steps=judge_steps, device=dist.device, images=learn)


def run_compare(dist):
    check_one_process_and_data("compare", dist)
    unknown = set(kinds.split(",")) - set(KIND_FLAGS)
    if unknown:
        raise SystemExit(f"error: --kinds: unknown decoder {sorted(unknown)}; choose from "
                         f"{','.join(KIND_FLAGS)}")
    c, res = make_config(preset).latent_channels, make_config(preset).resolution
    if c < 2:
        raise SystemExit(f"compare halves the latent channels; the preset {preset!r} has {c}")
    heldout = ImageSource(val_data, res, builtin_limit=num_images or HELDOUT_SIZE)
    # held-out classes that are not --data's: refused before any run
    learn = judge_folder(res, heldout) if data else None
    if data and learn is None:
        print("no judge: --val-data has no classes or --data has one, so the report has no "
              "judge_accuracy or judge_fd")
    os.makedirs(out, exist_ok=True)
    judge = []  # trained when the first run is scored, not for a call with nothing to score

    def run_one(name, kind, ch, lr, seed, factor):
        train(os.path.join(out, name), kind, ch, lr, seed, max_steps * factor)
        if not judge:
            judge.append(make_judge(res, learn, dist))
        score(os.path.join(out, name), heldout, judge[0], dist)

    run_plan(lambda: plan(c), run_one)
    write_report(c, heldout)


# -----------------------------------------------------------------------------
# converge: claim 3


def converge_latents(c, seed):
    """[(label, stage-1 run name, its scores.json)] at this seed: the claim's two latents first,
    then the controls, each decoder at its sweep winner (as in compare)."""
    found, pairs = [], [("gauss", c), ("dgae", c // 2)]
    for kind, ch in pairs + ([("dgae", c), ("gauss", c // 2)] if controls else []):
        lr, first = best_lr(kind, ch), seed_list()[0]
        if lr is None:  # the sweep is unfinished: name its first missing run
            run = next(r for r in (run_name(kind, ch, v, first) for v in lr_list())
                       if finished_scores(r) is None)
        else:
            run = run_name(kind, ch, lr, seed)
        if finished_scores(run) is None:
            extra = f" --train-args {shlex.quote(train_args)}" if train_args else ""
            if data:
                extra += f" --data {shlex.quote(data)} --val-data {shlex.quote(val_data)}"
            raise SystemExit(
                f"error: converge needs the stage-1 run {os.path.join(out, run)} (each decoder at "
                f"its rate of the lr sweep at seed {first}, the first of --seeds; to repeat "
                f"claim 3 at another seed, start --seeds with the seed compare swept at, e.g. "
                f"--seeds 0,{seed}); train it with `python experiments/claims.py compare --out "
                f"{out} --preset {preset} --max-steps {max_steps} --seeds {seeds} --lrs {lrs} "
                f"--compute-factor 0{extra} --only {run}`")
        found.append((f"{kind} c={ch}", run, finished_scores(run)))
    return found


def curve_speedup(ref, curve, levels=20):
    """How many times fewer steps `curve` needs than `ref` to reach the same accuracy, read from the
    whole curves [(step, accuracy)]: each made monotone (its running maximum) and inverted by
    interpolation in log steps at `levels` accuracies that both reach; exp(the mean shift in log
    steps), > 1 if `curve` is faster. None if their ranges do not overlap."""
    def inverse(c):
        return np.log([s for s, _ in c]), np.maximum.accumulate([a for _, a in c])

    def rising(s, a):  # np.interp needs increasing x: a flat stretch keeps its first step
        keep = np.r_[True, np.diff(a) > 0]
        return a[keep], s[keep]

    (s_ref, a_ref), (s_cur, a_cur) = inverse(ref), inverse(curve)
    lo, hi = max(a_ref[0], a_cur[0]), min(a_ref[-1], a_cur[-1])
    if not hi > lo:
        return None
    grid = np.linspace(lo, hi, levels)
    shift = np.interp(grid, *rising(s_ref, a_ref)) - np.interp(grid, *rising(s_cur, a_cur))
    return float(np.exp(shift.mean()))


def steps_to_reach(curve, target):
    """The first DiT step whose score reaches target, from [(step, score)]; None if none does."""
    return next((step for step, v in curve if v >= target), None)


def accuracy_curve(row):
    return [(p["step"], p["accuracy"]) for p in row["curve"]]


def line_plot(series, path, title, xlabel, y_range=None, hlines=None, size=(640, 400)):
    """A line plot against log x drawn with PIL: series {label: [(x, y, err)]}, err drawn as a bar
    of +- err (0: none); hlines {label: y}: a thin line in the label's colour (e.g. a ceiling)."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    left, top, right, bottom = 60, 20, size[0] - 170, size[1] - 40
    xs = sorted({p[0] for c in series.values() for p in c})
    x0, x1 = math.log(xs[0]), math.log(xs[-1]) if xs[-1] > xs[0] else math.log(xs[0]) + 1
    ys = ([y + e * sgn for c in series.values() for _, y, e in c for sgn in (-1, 1)]
          + list((hlines or {}).values()))
    y0, y1 = y_range or (min(ys), max(ys))
    y0, y1 = (y0, y1) if y1 > y0 else (y0 - 1, y1 + 1)

    def px(v):
        return left + (math.log(v) - x0) / (x1 - x0) * (right - left)

    def py(v):
        return bottom - (v - y0) / (y1 - y0) * (bottom - top)

    d.rectangle([left, top, right, bottom], outline="black")
    d.text((left, 4), title, fill="black")
    for i in range(5):
        v = y0 + i * (y1 - y0) / 4
        d.line([left - 4, py(v), left, py(v)], fill="black")
        d.text((4, py(v) - 6), f"{v:.3g}", fill="black")
    for v in xs:
        d.line([px(v), bottom, px(v), bottom + 4], fill="black")
        d.text((px(v) - 12, bottom + 8), str(v), fill="black")
    d.text((left, size[1] - 16), xlabel, fill="black")
    colours = ["#d62728", "#1f77b4", "#ff7f0e", "#2ca02c"]
    for i, (label, curve) in enumerate(series.items()):
        col = colours[i % len(colours)]
        d.line([(px(x), py(y)) for x, y, _ in curve], fill=col, width=3)
        for x, y, e in [p for p in curve if p[2]]:
            d.line([px(x), py(y - e), px(x), py(y + e)], fill=col, width=1)
            for end in (y + e, y - e):
                d.line([px(x) - 4, py(end), px(x) + 4, py(end)], fill=col)
        if hlines and label in hlines:
            d.line([left, py(hlines[label]), right, py(hlines[label])], fill=col, width=1)
        d.text((right + 10, top + 18 * i), label, fill=col)
    if hlines:
        d.text((right + 10, top + 18 * len(series) + 6), "thin: ceiling", fill="black")
    atomic_write(path, lambda fh: img.save(fh, format="PNG"))


def write_converge_report(path, lines, result, curves):
    """path.md (the table, its first line the plot's title), path.json and path.png (the accuracy
    curves {label: [(step, accuracy)]}, each latent's ceiling a thin line)."""
    write_outputs(path, lines, result)
    ceilings = {k: r["ceiling_accuracy"] for k, r in result["latents"].items()}
    line_plot({k: [(x, y, 0) for x, y in c] for k, c in curves.items()}, path + ".png",
              lines[0].lstrip("# "), "DiT steps (log scale); y: share of samples the pattern "
              "classifier names right", y_range=(0, 1), hlines=ceilings)
    print(f"wrote {path}.png")


@functools.cache
def folder_classes(path, res):
    """A folder's class names, scanned once per call of claims.py (an ImageNet folder is slow)."""
    return tuple(ImageFolderDataset(path, res).classes)


def sample_settings():
    """What a latent's samples and their judging depend on besides its stage-1 run and the step:
    recorded in each DiT folder and in each seed's report."""
    return {"num_samples": num_samples, "judge_steps": judge_steps, "dit_args": dit_args,
            # the judge's classes (the DiT's too); a folder's names, as paths differ by machine
            "data_classes": list(folder_classes(data, make_config(preset).resolution))
            if data else "built-in"}


def converge_settings(step_list):
    """What a seed's report depends on: recorded in it, so that a later call takes the finished
    seed from the report only if they are unchanged."""
    return {"dit_steps": step_list, "controls": controls, "preset": preset,
            "max_steps": max_steps, "lrs": lrs, "train_args": train_args, **sample_settings()}


def check_settings(path, made, now, remedy):
    """Refuse, naming each difference, where the settings `made` (read from path) are not `now`."""
    def text(v):  # as typed: a list comma-separated, a string quoted
        return ("not recorded" if v is None else ",".join(map(str, v)) if isinstance(v, list)
                else shlex.quote(v) if isinstance(v, str) else str(v))
    made = made if isinstance(made, dict) else {}
    differ = [f"{'--data' if k == 'data_classes' else '--' + k.replace('_', '-')} "
              f"{text(made.get(k))}, now {text(v)}" for k, v in now.items() if made.get(k) != v]
    if differ:
        raise SystemExit(f"error: {path} was made with other settings ({'; '.join(differ)}); run "
                         f"with those, or {remedy}")


def finished_seed(root, seed, step_list):
    """A seed's rows from its converge_s<seed>.json where a call with these settings finished it
    (its stage-1 and DiT runs need not be kept, e.g. reports copied from another machine); None
    where there is none, or it predates recorded settings (the seed is made anew from its runs).
    One with other settings is refused, not silently mixed in."""
    path = os.path.join(root, f"converge_s{seed}.json")
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            result = json.load(f)
        made, rows = result.get("settings"), result["latents"]
        if not rows or not all(isinstance(r, dict) and r.get("curve") for r in rows.values()):
            raise ValueError("no latents")
    except (OSError, ValueError, KeyError, AttributeError) as e:
        raise SystemExit(f"error: {path} cannot be read ({type(e).__name__}); delete it to run "
                         f"seed {seed} again") from None
    if made is None:
        return None
    check_settings(path, made, converge_settings(step_list), f"delete it to run seed {seed} again")
    with_speedups(rows)  # derived anew, as for a seed made from its runs
    return rows


def with_speedups(rows):
    """Adds to each latent's row (the claim's reference first) its steps to the target, the ratio
    of the reference's steps to those, and the whole-curve shift; returns the target accuracy,
    what the reference reaches at its last step (fixed before the runs)."""
    ref = next(iter(rows))
    target = rows[ref]["curve"][-1]["accuracy"]
    ref_steps = steps_to_reach(accuracy_curve(rows[ref]), target)
    for r in rows.values():
        reach = steps_to_reach(accuracy_curve(r), target)
        r["steps_to_target"], r["speedup"] = reach, (ref_steps / reach if reach else None)
        r["curve_speedup"] = curve_speedup(accuracy_curve(rows[ref]), accuracy_curve(r))
    return target


def converge_one_seed(dist, c, seed, step_list, root):
    """Claim 3 at one seed (the stage-1 runs' and the DiT's): trains, samples and judges each
    latent's DiT up to every step of step_list, then writes converge_s<seed>.md, .json and .png."""
    rows = {}
    for label, ae_run, ae_scores in converge_latents(c, seed):
        ae_path = os.path.join(out, ae_run, "ckpt.pt")
        run_dir = os.path.join(root, ae_run)  # named by its stage-1 run: a new best rate, a new DiT
        # its samples are reused on resume only if made as this call would make them
        made = os.path.join(run_dir, "settings.json")
        if os.path.exists(made):
            check_settings(made, json.load(open(made)), sample_settings(),
                           f"delete {run_dir} to train its DiT again")
        else:
            os.makedirs(run_dir, exist_ok=True)
            write_text(made, json.dumps(sample_settings()))
        todo = []  # samples not yet judged: one eval.py call judges them all (one judge, one recon)
        for step in step_list:
            samples = os.path.join(run_dir, f"samples_{step}.npz")
            if os.path.exists(os.path.join(run_dir, f"samples_{step}_classes.json")):
                continue
            if not os.path.exists(samples):
                script("train_dit.py", "--ae-ckpt", ae_path, "--out-dir", run_dir,
                       "--max-steps", step, "--ckpt-every", step, "--sample-every", step,
                       "--seed", seed, "--data", data, *resume_flag(run_dir),
                       # the built-in data's DiT on a folder too (train_dit.py would take DiT-XL)
                       *(("--preset", "DiT-Tiny/1") if data else ()), *shlex.split(dit_args))
                dit_path = os.path.join(run_dir, "ckpt.pt")
                # a DiT already past this step (its samples deleted) would be sampled as this step
                at = load_checkpoint(dit_path, "dit")["step"]  # memory-mapped, not read whole
                if at != step:
                    raise SystemExit(f"{dit_path} is at step {at}, not {step}, and "
                                     f"{samples} is missing; delete {run_dir} to train it again")
                script("sample.py", "--ckpt", dit_path, "--num-samples", num_samples, "--out",
                       samples, "--device", dist.device.type)
            todo.append(samples)
        if todo:
            script("eval.py", "classes", "--samples", ",".join(todo), "--device",
                   dist.device.type, "--judge-steps", judge_steps, "--data", data,
                   "--val-data", val_data, "--ae-ckpt", ae_path)
        curve = []
        for step in step_list:
            r = json.load(open(os.path.join(run_dir, f"samples_{step}_classes.json")))
            # judge_fd: to the real held-out images; judge_fd_recon: to the latent's reconstructions
            curve.append({"step": step, "accuracy": r["accuracy"], "judge_fd": r["judge_fd"],
                          "judge_fd_recon": r.get("judge_fd_recon"),
                          "recon_accuracy": r.get("recon_accuracy")})
        # the ceiling: the judge on this autoencoder's reconstructions, as eval.py measured it
        # beside the samples (compare's score where a result predates that)
        ceiling = curve[-1]["recon_accuracy"]
        rows[label] = {"curve": curve, "ceiling_accuracy": ae_scores["judge_accuracy"]
                       if ceiling is None else ceiling,
                       "ceiling_judge_fd": ae_scores["judge_fd"], "ae_ckpt": ae_path}
    ref, target = next(iter(rows)), with_speedups(rows)
    lines = [f"# claim 3, seed {seed}: the same DiT on each latent ({data or 'built-in data'}, "
             f"{num_samples} samples per point)", "",
             f"target (fixed before the run): accuracy {target:.3f}, what the {ref} latents "
             f"reach at step {step_list[-1]}; ratio = DiT steps {ref} needs / steps the "
             "latent needs (> 1: faster); shift = the same ratio read from the whole curves "
             "(claims.curve_speedup)", "",
             "fd@s: the judge's Frechet distance from the samples to the latent's own "
             "reconstructions of the held-out images (0: the DiT reached its ceiling)", "",
             *md_table(["latent", *(f"acc@{s}" for s in step_list), "ceiling acc",
                        *(f"fd@{s}" for s in step_list), "steps to target", "ratio", "shift"])]
    for label, r in rows.items():
        reach = r["steps_to_target"]
        lines.append(md_row([label, *(f"{p['accuracy']:.3f}" for p in r["curve"]),
                             f"{r['ceiling_accuracy']:.3f}",
                             *("-" if p["judge_fd_recon"] is None else f"{p['judge_fd_recon']:.2f}"
                               for p in r["curve"]),
                             reach or "not reached",
                             f"{r['speedup']:.2f}" if r["speedup"] else "-",
                             f"{r['curve_speedup']:.2f}" if r["curve_speedup"] else "-"]))
    write_converge_report(os.path.join(root, f"converge_s{seed}"), lines,
                          {"target_accuracy": target, "latents": rows,
                           "settings": converge_settings(step_list)},
                          {k: accuracy_curve(r) for k, r in rows.items()})
    return rows


def summarise_converge(per_seed):
    """{label: {"steps", "accuracy_mean", "accuracy_sd", "ceiling_accuracy", "speedups", ...}} over
    the seeds' results {seed: converge_one_seed's rows}; a speed-up is None where a latent never
    reached its seed's target."""
    summary = {}
    for label in next(iter(per_seed.values())):
        runs = [rows[label] for rows in per_seed.values()]
        curves = np.array([[p["accuracy"] for p in r["curve"]] for r in runs])  # (seeds, steps)
        s = summary[label] = {
            "steps": [p["step"] for p in runs[0]["curve"]],
            "accuracy_mean": curves.mean(0).tolist(), "accuracy_sd": curves.std(0, ddof=1).tolist(),
            "ceiling_accuracy": float(np.mean([r["ceiling_accuracy"] for r in runs])),
            "speedups": [r["speedup"] for r in runs],
            "curve_speedups": [r.get("curve_speedup") for r in runs],
            # the judge's FD to the latent's own reconstructions at the last step, per seed
            "final_fd_recon": [r["curve"][-1].get("judge_fd_recon") for r in runs]}
        logs = [math.log(v) for v in s["curve_speedups"] if v]
        m, se = mean_se(logs) if logs else (math.nan, math.nan)
        # claim 3 ("converges faster"): the mean log speed-up over seeds against 0, beyond 2 SE
        s.update(speedup_mean=math.exp(m) if logs else None, log_speedup_se=se,
                 verdict=decide(m, se) if len(logs) == len(per_seed) else "undecided")
    return summary


def times(v):
    return f"{v:.2f}x" if v else "not reached"


def run_converge(dist):
    check_one_process_and_data("converge", dist)
    cfg = make_config(preset)
    c = cfg.latent_channels
    if data:  # refused before any run: a judge cannot name classes by these folders
        check_judge_classes(ImageFolderDataset(data, cfg.resolution),
                            ImageFolderDataset(val_data, cfg.resolution, "val"),
                            f"--val-data {val_data}")
    step_list = sorted({int(v) for v in dit_steps.split(",")})
    root = os.path.join(out, "converge")
    seed_order = list(dict.fromkeys(seed_list()))
    done = {seed: finished_seed(root, seed, step_list) for seed in seed_order}
    for seed in seed_order:  # every stage-1 run is there before the first DiT trains
        if done[seed] is None:
            converge_latents(c, seed)
    os.makedirs(root, exist_ok=True)
    per_seed = {seed: converge_one_seed(dist, c, seed, step_list, root) if done[seed] is None
                else done[seed] for seed in seed_order}
    if len(seed_order) < 2:
        return
    summary = summarise_converge(per_seed)
    lines = [f"# claim 3 over seeds {seeds}: each step's accuracy, mean over the seeds (+- their "
             "standard deviation)", "",
             *md_table(["latent", *(f"acc@{s}" for s in step_list), "ceiling acc",
                        f"fd to own recon @{step_list[-1]}", "speed-up per seed (target)",
                        "per seed (shift)", "shift over seeds", "faster?"])]
    for label, r in summary.items():
        over = (f"{r['speedup_mean']:.2f}x (log +- {r['log_speedup_se']:.2f} SE)"
                if r["speedup_mean"] else "-")
        lines.append(md_row([label, *(f"{m:.3f} +- {sd:.3f}" for m, sd
                                      in zip(r["accuracy_mean"], r["accuracy_sd"])),
                             f"{r['ceiling_accuracy']:.3f}",
                             "-" if None in r["final_fd_recon"]
                             else mean_sd_text(r["final_fd_recon"]),
                             ", ".join(map(times, r["speedups"])),
                             ", ".join(map(times, r["curve_speedups"])), over, r["verdict"]]))
    write_converge_report(os.path.join(root, "converge_summary"), lines,
                          {"seeds": seed_order, "latents": summary},
                          {k: list(zip(r["steps"], r["accuracy_mean"]))
                           for k, r in summary.items()})


# -----------------------------------------------------------------------------
# fcurve: claim 1 against the spatial compression f

FCURVE_KINDS = ("dgae", "gauss")
# each measure and its loss (higher is worse), whose growth from the first to the last f is a drop
FCURVE_MEASURES = {"psnr_ez": ("PSNR of E[x|z] (dB)", lambda v: -v),
                   "lowfreq_psnr_ez": ("low-frequency PSNR of E[x|z] (dB)", lambda v: -v),
                   "highfreq_ratio": ("high-frequency ratio", lambda v: abs(v - 1)),
                   "spectral_fd": ("spectral FD", lambda v: v)}


def fcurve_points():
    """[(f, c)] in --fs order: c grows as f^2, so the latent keeps the smallest f's size; with
    --fixed-c, c stays the preset's at every f."""
    f_list = [int(v) for v in fs.split(",")]
    f0, c0 = min(f_list), make_config(preset).latent_channels
    if any(f % f0 for f in f_list) or len(set(f_list)) < 2:
        raise SystemExit(f"error: --fs {fs}: give two or more compressions, each a multiple of the "
                         "smallest")
    return [(f, c0 if fixed_c else c0 * (f // f0) ** 2) for f in f_list]


def fcurve_plan(points):
    """[(name, kind, f, c, lr, seed)] in training order: the sweep at the first seed, then each seed
    at every f, each decoder at its rate of the sweep (by E[x|z] PSNR) once the sweep is scored."""
    parts = [(k, f, c, lr, seed_list()[0]) for f, c in points for k in FCURVE_KINDS
             for lr in lr_list()]
    for seed, (f, c), k in itertools.product(seed_list()[1:], points, FCURVE_KINDS):
        lr = best_lr(k, c, f=f, key="psnr_ez")
        if lr is not None:
            parts.append((k, f, c, lr, seed))
    return [(run_name(k, c, lr, seed, f=f), k, f, c, lr, seed) for k, f, c, lr, seed in parts]


def fcurve_table(points):
    """{(kind, f): {"c", "lr", "seeds", measure: [per-seed values]}} of the finished runs."""
    table = {}
    for (f, c), k in itertools.product(points, FCURVE_KINDS):
        lr = best_lr(k, c, f=f, key="psnr_ez") or lr_list()[0]
        rows = scored_seeds(lambda s: run_name(k, c, lr, s, f=f))
        if rows:
            table[(k, f)] = {"c": c, "lr": lr, "seeds": [s for s, _ in rows],
                             **{m: [r[m] for _, r in rows] for m in FCURVE_MEASURES}}
    return table


def drop_verdict(table, measure, f_lo, f_hi):
    """(D, SE, verdict): D = the Gaussian decoder's drop from f_lo to f_hi minus DGAE's, each drop
    the growth of the measure's loss between the seed means, SE from the four seed spreads
    (D > 0: DGAE loses less). Holds beyond +2 SE, fails beyond -2 SE, else undecided."""
    loss = FCURVE_MEASURES[measure][1]
    drops, variances = {}, {}
    for k in FCURVE_KINDS:
        cells = [table.get((k, f)) for f in (f_lo, f_hi)]
        if any(cell is None for cell in cells):
            return None, None, "undecided: runs missing"
        lo, hi = ([loss(v) for v in cell[measure]] for cell in cells)
        drops[k] = np.mean(hi) - np.mean(lo)
        variances[k] = sum(np.var(v, ddof=1) / len(v) if len(v) > 1 else math.nan for v in (lo, hi))
    d, se = drops["gauss"] - drops["dgae"], math.sqrt(variances["gauss"] + variances["dgae"])
    return d, se, decide(d, se) + ("" if math.isfinite(se) else ": one seed, no standard error")


def run_fcurve(dist):
    check_one_process_and_data("fcurve", dist)
    points = fcurve_points()
    os.makedirs(out, exist_ok=True)
    res = make_config(preset).resolution
    heldout = ImageSource(val_data, res, builtin_limit=num_images or HELDOUT_SIZE)

    def run_one(name, kind, f, c, lr, seed):
        run_dir = os.path.join(out, name)
        train(run_dir, kind, c, lr, seed, max_steps, ("--compression", f, "--resolution", res))
        _, diffusion, s = scored_model(run_dir, heldout, dist, pool=pool)  # one pool at every f
        if not diffusion:  # a deterministic decode is its own conditional mean
            s["psnr_ez"], s["lowfreq_psnr_ez"] = s["psnr"], s["lowfreq_psnr"]
        s["pool"] = pool
        write_text(os.path.join(run_dir, "scores.json"), json.dumps(s, indent=1))

    run_plan(lambda: fcurve_plan(points), run_one)
    table = fcurve_table(points)
    f_list = sorted(f for f, _ in points)
    side, c0 = res // f_list[0], dict(points)[f_list[0]]
    lines = [f"# claim 1 against f: {data or 'the built-in data'}, {preset} preset, "
             + (f"c = {c0} at every f" if fixed_c else
                f"a {side}x{side}x{c0} latent's size at every f"),
             "", f"{max_steps} steps, seeds {seeds}, lrs {lrs} (swept at the first seed, best by "
             f"E[x|z] PSNR), {heldout.count(num_images)} held-out images, E[x|z] from {mean_of} "
             "decodes without their sampling variance, low/high frequencies split at pooling "
             f"factor {pool}; mean +- sd over seeds", "",
             *md_table(["decoder", "f", "c", "lr", "seeds", *FCURVE_MEASURES])]
    for (k, f), g in sorted(table.items()):
        cells = ["{:.3f} +- {:.3f}".format(*mean_sd(g[m])) for m in FCURVE_MEASURES]
        lines.append(md_row([k, f, g["c"], f"{g['lr']:g}", len(g["seeds"]), *cells]))
    lines += ["", f"## verdicts: D = the Gaussian decoder's drop from f={f_list[0]} to "
                  f"f={f_list[-1]} minus DGAE's (> 0: DGAE loses less); holds if D > 2 SE, fails "
                  "if D < -2 SE, else undecided. The claim's rule is the first row; the others are "
                  "reported beside it"]
    verdict_json = {}
    for m, (label, _) in FCURVE_MEASURES.items():
        d, se, verdict = drop_verdict(table, m, f_list[0], f_list[-1])
        verdict_json[m] = {"D": d, "se": se, "verdict": verdict}
        lines.append(f"- {label}: "
                     + (f"D = {d:+.3f} +- {se:.3f} (SE): {verdict}" if d is not None else verdict))
    path = os.path.join(out, "fcurve_fixed_c" if fixed_c else "fcurve")
    write_outputs(path, lines, {"groups": [{"kind": k, "f": f, **g} for (k, f), g in table.items()],
                                "verdicts": verdict_json})
    for m, (label, _) in FCURVE_MEASURES.items():
        series = {k: [(f, *mean_sd(table[(k, f)][m])) for f in f_list if (k, f) in table]
                  for k in FCURVE_KINDS}
        series = {k: v for k, v in series.items() if v}
        if series:
            line_plot(series, f"{path}_{m}.png", f"{label} against f (mean +- sd over seeds)",
                      "spatial compression f (log scale), "
                      + ("channels fixed" if fixed_c else "latent size fixed"))
    print(f"wrote {path}.md, .json and one plot per measure")


MODES = {"compare": run_compare, "diagnose": run_diagnose, "converge": run_converge,
         "fcurve": run_fcurve}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    global max_steps, seeds, lrs, num_images, mean_of, compute_factor, dit_steps, num_samples, \
        judge_steps
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        common.configure(SETTINGS, ["--help"])
    mode = argv[0]
    if mode not in MODES:
        raise SystemExit(f"error: unknown mode {mode!r}; usage: python experiments/claims.py "
                         f"{{{','.join(MODES)}}} --name value ...")
    settings, _ = common.configure(SETTINGS, argv[1:])
    globals().update(settings)
    if quick:
        max_steps, seeds, lrs, num_images, mean_of, compute_factor = (
            4, "0", lrs.split(",")[0], 16, 2, 2)
        dit_steps, num_samples, judge_steps = "2,4", 20, 60
    common.check_settings(
        globals(), count=("max_steps", "num_images", "mean_of", "batch_size", "anchor_ch",
                          "num_samples", "judge_steps", "compute_seeds", "pool"),
        count_or_0=("compute_factor",), positive=("dist_timeout",),
        at_most={"max_steps": common.MAX_STEPS, "num_images": common.MAX_SIZE,
                 "num_samples": common.MAX_SAMPLES, "batch_size": common.MAX_BATCH,
                 "judge_steps": common.MAX_STEPS, "dist_timeout": common.MAX_SECONDS})
    dist = common.setup_distributed(device, dist_timeout)
    with common.user_errors():
        MODES[mode](dist)
    common.shutdown(dist)


if __name__ == "__main__":
    main()
