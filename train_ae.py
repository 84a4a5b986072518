"""
Stage 1 training: the DGAE autoencoder (encoder + diffusion decoder), or the Gaussian baseline.

    python train_ae.py                                          # tiny model, built-in data, CPU
    python train_ae.py --data /path/imagenet --compression 32   # one GPU
    torchrun --nproc_per_node=8 train_ae.py --data /path/imagenet --compression 32  # one node
Every setting below can be overridden with --name value (dashes or underscores).
Writes to out_dir: ckpt.pt (everything needed to resume or sample), log.jsonl, recon_*.png.
The whole training step is the `while` loop at the end of main(); the loss is DGAE.loss in ae.py.
"""

import copy
import os
from contextlib import nullcontext
from dataclasses import fields, replace

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from ae import PRESETS, AEConfig, DGAE, config_to_dict, make_config
from support import checkpoints, common
from support.data import (Loader, build_dataset, first_good, random_hflip, save_image_grid,
                          to_model_range)
from support.optim import ema_decay_at, lr_at, make_optimizer, update_ema
from support.perceptual import load_lpips

# -----------------------------------------------------------------------------
# settings
# data
data = ""  # ImageNet-style folder (train/<class>/*.JPEG); "" = the built-in procedural dataset
dataset_size = 10000  # images in the built-in dataset
num_workers = -1  # data-loading processes per rank; -1 = up to 8 with --data (core-bounded), else 0
# model, loss and learning rate: None = the preset's value (ae.PRESETS)
preset = None  # tiny | small | base | large; None = tiny on the built-in data, base with --data
resolution = None  # image size in px (32 tiny, 256 base; built-in data: 8 f given --compression)
compression = None  # spatial compression f in {4, 8, 16, 32, 64}
latent_channels = None  # c; by default 4, 4, 8, 16, 64 at f = 4, 8, 16, 32, 64
decoder = "diffusion"  # diffusion (DGAE) | gaussian (SD-VAE-like) | unet (deterministic DGAE U-Net)
anchor_ch = 0  # anchored decoder: width of deterministic decode x~ = D(z) the U-Net sees (0 = off)
anchor_weight = 1.0  # weight of the anchor's pixel (and perceptual) loss
cond = "latent_decoder"  # how z guides the U-Net: latent_decoder | concat
t_dist = "uniform"  # training t distribution: uniform | logit_normal
t_shift = 1.0  # shift of the training times and the decoder's Euler grid towards t = 1 (1 = none)
decode_steps = 10  # Euler steps when decoding for the reconstruction grids
attn_impl = "math"  # math | sdpa
dropout = 0.0  # dropout inside the diffusion decoder's residual blocks (0 = none)
grad_checkpoint = "auto"  # activation checkpointing: less memory, a forward more; auto: base, large
lpips_weight = 0.5  # 0 disables LPIPS (then no weight files are needed)
kl_weight = 1e-6  # on the KL per pixel value (SD-VAE's 1e-6 on a per-image sum)
recon_weight = 1.0  # L1 on the flow loss's one-step estimate x0_hat
consistency_weight = 1.0  # L1 on the one-step decode from pure noise, one more U-Net pass
lr = None  # AdamW; the presets': 1e-3 tiny, 5e-4 small, 1e-4 base/large (at a global batch of 256)
vgg_path = ""  # vgg16-397923af.pth (or $DGAE_VGG16, or $DGAE_WEIGHTS/)
lpips_path = ""  # LPIPS v0.1 vgg.pth (or $DGAE_LPIPS, or $DGAE_WEIGHTS/)
# optimisation
batch_size = None  # per process and micro-step (16 tiny, 32 others); global = batch * accum * world
grad_accum = 1  # micro-batches per optimizer step
max_steps = 1350  # optimizer steps of the run (the cool-down is its last lr_cooldown share)
warmup_steps = 100  # steps of linear learning-rate warm-up from 0
lr_cooldown = 0.25  # share of max_steps at the end over which the learning rate falls linearly to 0
weight_decay = 0.0  # AdamW decay on weight matrices and kernels (not on norms and biases)
grad_clip = 1.0  # clip the global gradient norm to this
ema_decay = 0.999  # the EMA's final decay (it warms up to it, see ema_decay_at); ImageNet: 0.9999
max_nonfinite_steps = 5  # skipped steps in a row (non-finite loss or gradient) before the run stops
# bookkeeping
out_dir = "out/ae"  # the run's folder: ckpt.pt, log.jsonl, recon_*.png (one run at a time holds it)
log_every = 25  # steps between rows of log.jsonl
sample_every = 400  # steps between reconstruction grids
ckpt_every = 400  # steps between checkpoints (also at the end and at a stop signal)
resume = False  # continue the run in --out-dir exactly where it stopped, with its own settings
seed = 0  # initial weights, data order and noise
device = ""  # "" = cuda, then mps, then cpu
dist_timeout = 1800  # collective timeout (s) ending a hung job; covers a 10.8 GB checkpoint write
compile = False  # torch.compile the model (worth it on GPUs for long runs)
deterministic = False  # deterministic CUDA: bit-for-bit resumes on GPUs too (slower; CPU always is)
channels_last = "auto"  # NHWC; auto: on CPU (faster, docs/NOTES.md), off on CUDA (GroupNorm copies)
# -----------------------------------------------------------------------------
SETTINGS = common.settings_block(globals())  # the defaults above: every main() starts from them

# A resumed run takes every setting from its checkpoint but these (checkpoints.settings_for_resume):
# the trainers' common list, and an image folder that moved (its image count is checked).
MAY_CHANGE_ON_RESUME = checkpoints.MAY_CHANGE_ON_RESUME + ("data",)

# the presets whose step at their default batch fits an 80 GB GPU only with activation
# checkpointing (experiments/bench.py --parts memory; README's memory table)
CHECKPOINTED_PRESETS = ("base", "large")

# the settings that are fields of ae.AEConfig (the rest of the model comes from the preset)
MODEL_SETTINGS = tuple(f.name for f in fields(AEConfig) if f.name in SETTINGS)


def checkpointing_on(setting, preset_name):
    """--grad-checkpoint true | false | auto (on for CHECKPOINTED_PRESETS)."""
    return common.auto_flag(setting, "grad_checkpoint", preset_name in CHECKPOINTED_PRESETS)


def check(settings):
    """Every setting in range, before any work (a 0-step run would say "done" and write nothing);
    the preset's values (None) once main has resolved them."""
    common.check_settings(
        settings, count=("dataset_size", "grad_accum", "max_steps", "log_every", "sample_every",
                         "ckpt_every", "max_nonfinite_steps", "resolution", "batch_size"),
        count_or_0=("num_workers", "warmup_steps", "seed"), steps=("decode_steps",),
        positive=("grad_clip", "dist_timeout", "lr", "t_shift"),
        fraction=("ema_decay", "lr_cooldown", "dropout"),
        non_negative=("weight_decay", "lpips_weight", "kl_weight", "recon_weight",
                      "consistency_weight", "anchor_weight"),
        choices={"decoder": ("diffusion", "gaussian", "unet"), "cond": ("latent_decoder", "concat"),
                 "t_dist": ("uniform", "logit_normal"), "attn_impl": ("math", "sdpa"),
                 "preset": (None, *PRESETS)},
        at_most={"dataset_size": common.MAX_SIZE, "resolution": common.MAX_RESOLUTION,
                 "dist_timeout": common.MAX_SECONDS, "batch_size": common.MAX_BATCH,
                 "grad_accum": common.MAX_BATCH, "num_workers": common.MAX_WORKERS,
                 "max_steps": common.MAX_STEPS, "warmup_steps": common.MAX_STEPS,
                 "seed": common.MAX_SEED})


def main(argv=None):
    settings, given = common.configure(SETTINGS, argv)
    settings = common.default_workers(settings)
    checkpointing_on(settings["grad_checkpoint"], "")  # a bad value stops here, before any work
    common.auto_flag(settings["channels_last"], "channels_last", True)
    check(settings)
    log = (lambda *a: print(*a, flush=True)) if common.launch_rank() == 0 else (lambda *a: None)
    ckpt, settings, dist = checkpoints.start_run("ae", settings, given, MAY_CHANGE_ON_RESUME, log)
    globals().update(settings)
    ckpt_path = os.path.join(out_dir, "ckpt.pt")
    dev = dist.device

    with common.user_errors():
        # the model: a resumed run's is its checkpoint's (its weights checked to fit before any
        # memory is taken); a new one's is the preset's, with each setting that is not None over it
        if ckpt is not None:
            name = ckpt["model_name"]
            cfg = replace(checkpoints.config_from_dict(ckpt["model_args"]), attn_impl=attn_impl,
                          decode_steps=decode_steps)
            checkpoints.check_weights_fit(lambda: DGAE(cfg), ckpt["model"], ckpt_path)
        else:
            name = preset or ("base" if data else "tiny")
            overrides = {k: settings[k] for k in MODEL_SETTINGS if settings[k] is not None}
            if not data and compression is not None and resolution is None:
                # the built-in data is drawn at any size: at the one where f leaves an 8x8 latent
                overrides["resolution"] = 8 * compression
                log(f"built-in data at {8 * compression} px, so that f={compression} leaves an 8x8 "
                    "latent grid (--resolution sets another size)")
            cfg = make_config(name, **overrides)
        latent_size = cfg.resolution // cfg.compression
        if latent_size < 2:
            raise SystemExit(f"error: --resolution {cfg.resolution} with --compression "
                             f"{cfg.compression} leaves a {latent_size}x{latent_size} latent; "
                             "raise --resolution (the built-in data is drawn at any size; with "
                             "--data, images are cropped to it)")
        # every setting resolved, as the checkpoint records them, and checked (an edited one may
        # hold --ckpt-every 0)
        settings.update({k: getattr(cfg, k) for k in MODEL_SETTINGS}, preset=name,
                        lr=PRESETS[name]["lr"] if lr is None else lr,
                        batch_size=(PRESETS[name]["batch_size"] if batch_size is None
                                    else batch_size))
        check(settings)
        globals().update(settings)
        dataset = build_dataset(data, cfg.resolution, size=dataset_size, seed=seed)
        loader = Loader(dataset, batch_size, dist.rank, dist.world_size, seed, num_workers)
        log(f"data: {data or 'built-in procedural dataset'} ({len(dataset)} images) at "
            f"{cfg.resolution} px")
        changed = checkpoints.dataset_changed(ckpt, len(dataset)) if ckpt is not None else None
        if changed:
            log(changed)
        # the perceptual loss needs the VGG16 + LPIPS files; the built-in run works without them
        lpips = None
        if cfg.lpips_weight > 0:
            lpips = load_lpips(vgg_path, lpips_path, required=bool(data), device=dev)
        log("perceptual loss: " + ("LPIPS (VGG16) on x0_hat" if lpips is not None else
            "off (" + ("--lpips-weight 0" if cfg.lpips_weight == 0 else
                       "weight files not found; see README 'Weight files'") + ")"))

    torch.manual_seed(seed)  # the same initial weights on every rank
    nhwc = common.channels_last_on(channels_last, dev)
    memory_format = torch.channels_last if nhwc else torch.contiguous_format
    net = DGAE(cfg).to(dev, memory_format=memory_format)
    ema = copy.deepcopy(net).requires_grad_(False).eval()
    net.grad_checkpoint = checkpointing_on(grad_checkpoint, name)  # may change on --resume
    optimizer = make_optimizer(net, lr, weight_decay, (0.9, 0.99), dev)
    log(f"model: {name}, {cfg.decoder} decoder, f={cfg.compression}, latent {cfg.latent_channels}x"
        f"{latent_size}x{latent_size}; encoder {common.count_params(net.encoder) / 1e6:.2f}M, "
        f"decoder {common.count_params(net.decoder) / 1e6:.2f}M params; "
        f"activation checkpointing {'on' if net.grad_checkpoint else 'off'}")

    step = 0
    if ckpt is not None:
        with common.user_errors():  # weights that do not fit (an edited file): one line naming it
            step = checkpoints.restore_training(ckpt, dist, net, ema, optimizer, loader, ckpt_path,
                                                seed, log)
        log(f"resumed from {ckpt_path} at step {step}")
    else:
        checkpoints.seed_rank(seed, dist.rank)  # different noise and t on every rank

    # the module the loop calls, compiled if asked, DDP-wrapped under torchrun; `net` stays the
    # plain module, whose parameters and names the optimizer, the EMA and the checkpoints use
    train_model = torch.compile(net) if compile else net
    if compile:
        log(checkpoints.COMPILE_NOTE)
    if dist.ddp:
        train_model = DDP(train_model, device_ids=[dev.index] if dev.type == "cuda" else None)
    autocast = common.autocast_context(dev)
    # the inputs of the reconstruction grids
    fixed = to_model_range(torch.stack([dataset[i][0] for i in first_good(dataset, 8)]).to(dev))
    pbar = tqdm(total=max_steps, initial=step, disable=not dist.master, dynamic_ncols=True)
    steplog = common.StepLog(os.path.join(out_dir, "log.jsonl"), dist, pbar,
                             batch_size * grad_accum * dist.world_size, first_step=step)
    # from here on SIGTERM, SIGUSR1 or Ctrl-C: finish the step, save, exit. The guard also skips the
    # update of a step whose loss or gradient is not finite (checkpoints.StepGuard).
    guard = checkpoints.StepGuard(checkpoints.StopSignals(), dist, max_nonfinite_steps, ckpt_path,
                                  hint="Lower --lr or check the data.", optimizer=optimizer,
                                  check_every=log_every, last_step=max_steps)

    def save(step):  # every rank calls it (the RNG states are gathered); rank 0 writes
        checkpoints.save_training(ckpt_path, dist, "ae", step, net, ema, optimizer, loader,
                                  model_args=config_to_dict(cfg), model_name=name,
                                  config=dict(settings, num_images=len(dataset)),
                                  lpips_used=lpips is not None)

    while step < max_steps:
        # the learning rate: linear warm-up, constant, linear cool-down at the end (optim.lr_at)
        step_lr = lr_at(step, lr, warmup_steps, max_steps, round(lr_cooldown * max_steps))
        for group in optimizer.param_groups:
            group["lr"] = step_lr

        # grad_accum micro-batches, each (B, 3, H, W). DDP all-reduces the gradients once per step:
        # no_sync() on every micro-batch but the last (DDP decides at the forward pass).
        means = {}  # this rank's mean over the micro-batches of the loss and of each term
        position = loader.state_dict()  # where this step's data starts
        for micro in range(grad_accum):
            try:
                x, _ = next(loader)
            except SystemExit:
                # no image readable any more (a folder gone, a mount lost): keep the finished
                # steps (one process only: under torchrun the others are mid-step)
                if not dist.ddp and step % ckpt_every:
                    loader.load_state_dict(position)
                    save(step)
                    log(f"\nsaved {ckpt_path} at step {step}, the last finished one; --resume true "
                        "continues from it")
                raise
            # in [-1, 1]; copied from pinned memory while the GPU works, then flipped there (the
            # coins come from the checkpointed CPU RNG: a seed flips the same images on any device)
            x = random_hflip(to_model_range(x.to(dev, non_blocking=True)))
            if nhwc:
                x = x.contiguous(memory_format=torch.channels_last)
            sync = micro == grad_accum - 1 or not dist.ddp
            with (nullcontext() if sync else train_model.no_sync()), autocast:
                loss, terms = train_model(x, lpips)  # DGAE.loss (DDP syncs what runs in forward)
            (loss / grad_accum).backward()
            for k, v in [("loss", loss), *terms.items()]:
                means[k] = means.get(k, 0.0) + v.detach().float() / grad_accum

        # clip, AdamW step, then the EMA of the weights (what grids, sampling and evaluation use);
        # a non-finite loss or gradient never reaches them: the guard skips that update
        grad_norm = torch.nn.utils.clip_grad_norm_(net.parameters(), grad_clip)
        if guard.update_ok(means["loss"], grad_norm, step):
            optimizer.step()
            update_ema(ema, net, guard.ema_decay(ema_decay_at(step, ema_decay)))
        optimizer.zero_grad(set_to_none=True)
        step += 1

        # the terms averaged over ranks, bad images summed
        if step % log_every == 0 or step == max_steps:
            steplog.write(step, means, counts={"bad_images": loader.n_bad},
                          skipped_steps=guard.take_skipped(), lr=step_lr, grad_norm=grad_norm)
        pbar.update(1)
        if step % ckpt_every == 0 or step == max_steps or guard.stopping:
            save(step)
        if (step % sample_every == 0 or step == max_steps) and dist.master and not guard.stopping:
            # inputs in the top row, the EMA model's reconstructions (fixed decoder seed) below;
            # after the save, and given up at a stop signal (the next step boundary saves and stops)
            with guard.given_up_at_stop(f"reconstruction grid of step {step}", log,
                                        ema.decoder), torch.no_grad():
                recon = ema.reconstruct(fixed, steps=cfg.decode_steps, seed=0)
                save_image_grid(torch.cat([fixed, recon]),
                                os.path.join(out_dir, f"recon_{step:06d}.png"), nrow=len(fixed))
        if guard.stopping and step < max_steps:  # preempted: saved, --resume continues exactly
            guard.exit_saved(step, log)
    pbar.close()
    log(f"done: {ckpt_path}")
    common.shutdown(dist)


if __name__ == "__main__":
    # a rank that stopped responding: one line; an error's line never after a progress bar
    with common.collective_timeouts(), common.bars_closed_first():
        main()
