"""
Stage 1 training: the DGAE autoencoder (encoder + diffusion decoder), or the Gaussian baseline.

One script for every scale:
    python train_ae.py                                   # tiny model, built-in data, laptop CPU, minutes
    python train_ae.py --data /path/imagenet --compression 32              # one GPU
    torchrun --nproc_per_node=8 train_ae.py --data /path/imagenet --compression 32   # one node
Every setting below can be overridden with --name value (dashes or underscores).
Writes to out_dir: ckpt.pt (everything needed to resume or sample), log.jsonl, recon_*.png.
"""

import copy
import os

import torch

import common
from ae import DGAE, config_from_dict, config_to_dict, make_config
from data import Loader, build_dataset, first_good, random_hflip, save_image_grid
from lpips import load_lpips

# -----------------------------------------------------------------------------
# settings
# data
data = ""  # ImageNet-style folder (train/<class>/*.JPEG); "" = the built-in procedural dataset
dataset_size = 10000  # images in the built-in dataset
num_workers = 0  # data-loading processes per rank (use 8+ for ImageNet)
# model (0 / "" = the preset's value; see ae.PRESETS)
model = ""  # tiny | small | base | large; "" = tiny on the built-in data, base with --data
resolution = 0
compression = 0  # spatial compression f in {8, 16, 32, 64}
latent_channels = 0  # 0 = the preset's, else the default for f: 4, 8, 16, 64 at f = 8, 16, 32, 64
decoder = "diffusion"  # diffusion (DGAE) | gaussian (SD-VAE style baseline)
cond = "latent_decoder"  # how z guides the U-Net: latent_decoder | concat
t_dist = ""  # training t distribution: uniform | logit_normal; "" = the preset's (see ae.PRESETS)
decode_steps = 10  # Euler steps when decoding for the reconstruction grids
attn_impl = "math"  # math | sdpa
# loss
lpips_weight = 0.5  # 0 disables LPIPS (then no weight files are needed)
kl_weight = 1e-6  # on the KL per pixel value (SD-VAE's 1e-6 on a per-image sum)
recon_weight = -1.0  # L1 on the flow loss's one-step estimate x0_hat; -1 = the preset's
consistency_weight = -1.0  # L1 on the one-step decode from pure noise (one more U-Net pass); -1 = the preset's
vgg_path = ""  # vgg16-397923af.pth (or $DGAE_VGG16, or $DGAE_WEIGHTS/)
lpips_path = ""  # LPIPS v0.1 vgg.pth (or $DGAE_LPIPS, or $DGAE_WEIGHTS/)
# optimisation
batch_size = 32  # per process and micro-step; the global batch is batch_size * grad_accum * world size
grad_accum = 1
max_steps = 1200
lr = 0.0  # 0 = the preset's: 1e-3 for tiny, 5e-4 small, 1e-4 base/large (at a global batch of 256)
warmup_steps = 100
weight_decay = 0.0
grad_clip = 1.0
ema_decay = 0.999
# bookkeeping
out_dir = "out/ae"
log_every = 25
sample_every = 400
ckpt_every = 400
resume = False
seed = 0
device = ""  # "" = cuda, then mps, then cpu
compile = False  # torch.compile the model (worth it on GPUs for long runs)
channels_last = True  # NHWC memory layout for the convolutions (measured: a tiny CPU step 300 -> 253 ms)
settings = common.configure(globals())  # also sets _given: the names set on the command line
# -----------------------------------------------------------------------------

# learning rate per preset (--lr overrides): the small models tolerate, and in a few CPU minutes
# need, a much larger step than the paper-scale ones
PRESET_LR = {"tiny": 1e-3, "small": 5e-4, "base": 1e-4, "large": 1e-4}


def main():
    dist = common.setup_distributed(device)
    dev = dist.device
    ckpt_path = os.path.join(out_dir, "ckpt.pt")
    log = (lambda *a: print(*a, flush=True)) if dist.master else (lambda *a: None)

    # set-up: a bad path, flag or file stops here with a one-line message, before any model is built
    with common.user_errors():
        ckpt = common.resume_or_refuse(ckpt_path, resume, "ae")  # never overwrite a run by accident

        # the model config, then the data: both can be wrong on the command line
        preset = model or ("base" if data else "tiny")
        cfg = make_config(preset, resolution=resolution or None, compression=compression or None,
                          latent_channels=latent_channels or None, decoder=decoder, cond=cond, t_dist=t_dist or None,
                          decode_steps=decode_steps, attn_impl=attn_impl, lpips_weight=lpips_weight, kl_weight=kl_weight,
                          recon_weight=None if recon_weight < 0 else recon_weight,
                          consistency_weight=None if consistency_weight < 0 else consistency_weight)
        if ckpt is not None:
            cfg = _check_resume_config(ckpt, cfg)
        dataset = build_dataset(data, cfg.resolution, size=dataset_size, seed=seed)
        loader = Loader(dataset, batch_size, dist.rank, dist.world_size, seed, num_workers)
        log(f"data: {data or 'built-in procedural dataset'} ({len(dataset)} images) at {cfg.resolution} px")

        # the perceptual loss needs the VGG16 + LPIPS files; the built-in run works without them
        lpips = None
        if cfg.lpips_weight > 0:
            lpips = load_lpips(vgg_path or None, lpips_path or None, required=bool(data), device=dev)
        log("perceptual loss: " + ("LPIPS (VGG16) on x0_hat" if lpips is not None else
            "off (" + ("--lpips-weight 0" if cfg.lpips_weight == 0 else
                       "weight files not found; see README 'Pretrained weight files'") + ")"))

    base_lr = lr or PRESET_LR[preset]
    torch.manual_seed(seed)  # the same initial weights on every rank
    net = DGAE(cfg).to(dev, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    ema = copy.deepcopy(net).requires_grad_(False).eval()
    optimizer = common.make_optimizer(net, base_lr, weight_decay, (0.9, 0.99), dev)
    log(f"model: {preset}, {cfg.decoder} decoder, f={cfg.compression}, latent "
        f"{cfg.latent_channels}x{cfg.resolution // cfg.compression}x{cfg.resolution // cfg.compression}; "
        f"encoder {common.count_params(net.encoder) / 1e6:.2f}M, decoder {common.count_params(net.decoder) / 1e6:.2f}M params")

    step = 0
    if ckpt is not None:
        step = common.restore_training(ckpt, dist, net, ema, optimizer, loader)
        log(f"resumed from {ckpt_path} at step {step}")
    else:
        torch.manual_seed(seed + 1000 * (dist.rank + 1))  # different noise and t on every rank

    train_model = common.wrap_for_training(net, dist, compile)
    autocast = common.autocast_context(dev)
    fixed = torch.stack([dataset[i][0] for i in first_good(dataset, 8)]).to(dev)  # images for the grids

    def micro_step(model):
        x, _, n_bad = next(loader)
        x = random_hflip(x).to(dev, non_blocking=True)  # (B, 3, H, W) in [-1, 1]
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        loss, terms = model(x, lpips)
        return loss, {**terms, "bad_images": torch.tensor(float(n_bad))}

    # log rows: averaged over ranks (the bad-image count summed), so they describe the whole batch
    progress = common.TrainingProgress(os.path.join(out_dir, "log.jsonl"), step, max_steps,
                                       batch_size * grad_accum * dist.world_size, dist, ("bad_images",), grad_accum)
    while step < max_steps:
        # grad_accum micro-batches (gradients all-reduced on the last only), clip, AdamW, EMA
        means, grad_norm = common.train_step(train_model, net, ema, optimizer, micro_step, dist, autocast,
                                             common.lr_at(step, base_lr, warmup_steps), grad_accum, grad_clip,
                                             common.ema_decay_at(step, ema_decay))
        step += 1
        progress.update(step, means, grad_norm, optimizer.param_groups[0]["lr"], step % log_every == 0 or step == max_steps)
        if step % sample_every == 0 or step == max_steps:
            _save_grid(ema, fixed, cfg, os.path.join(out_dir, f"recon_{step:06d}.png"), dist)
        if step % ckpt_every == 0 or step == max_steps:
            common.save_training(ckpt_path, dist, "ae", step, net, ema, optimizer, loader, model_args=config_to_dict(cfg),
                                 config=settings, lpips_used=lpips is not None)
    progress.close()
    if common.check_replicas_identical(net, dist) and dist.ddp:
        log(f"weights identical on all {dist.world_size} ranks")
    log(f"done: {ckpt_path}")
    common.shutdown(dist)


def _check_resume_config(ckpt, cfg):
    """On --resume the checkpoint defines the model; a model flag that disagrees is an error."""
    saved = config_from_dict(ckpt["model_args"])
    for name in ("compression", "latent_channels", "resolution", "decoder", "cond"):
        flag = globals()[name]
        if name in _given and flag != getattr(saved, name):
            raise SystemExit(f"error: --{name.replace('_', '-')} {flag} does not match the checkpoint being resumed "
                             f"({getattr(saved, name)}); drop the flag or choose another --out-dir")
    return saved


@torch.no_grad()
def _save_grid(ema, x, cfg, path, dist):
    """Inputs in the top row, EMA reconstructions (fixed decoder seed) below them."""
    if not dist.master:
        return
    recon = ema.reconstruct(x, steps=cfg.decode_steps, seed=0)
    save_image_grid(torch.cat([x, recon]), path, nrow=x.shape[0])


if __name__ == "__main__":
    main()
