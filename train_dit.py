"""
Stage 2 training: a class-conditional DiT on the latents of a trained DGAE (stage 1).

    python train_dit.py  # built-in data + out/ae/ckpt.pt, laptop CPU, minutes
    torchrun --nproc_per_node=8 train_dit.py --ae-ckpt out/ae/ckpt.pt --data /path/imagenet \\
        --preset DiT-XL/1 --batch-size 32 --lr 1e-4 --ema-decay 0.9999 --max-steps 400000
Every setting below can be overridden with --name value (dashes or underscores).

Step 1 (once per stage-1 checkpoint and dataset; support/latents.py): encode every image and its
mirror image with the stage-1 encoder into a latent cache (cache_dir = out_dir/latents by default).
Step 2: train the DiT on z_norm = (z - mean_c) / std_c with the decoder's rectified-flow loss and
sample with its Euler sampler (decoder_diffusion.py). The checkpoint records the stage-1 path,
its encoder fingerprint and the latent statistics, so `python sample.py --ckpt out/dit/ckpt.pt`
needs nothing else. Writes out_dir/ckpt.pt, log.jsonl and samples_*.png (one row per class).
"""

import copy
import os
from contextlib import nullcontext

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from decoder_diffusion import flow_matching_loss
from dit import DIT_PRESETS, DiT, build_dit
from sample import chunk_inputs, generate, grid_labels
from support import checkpoints, common
from support.data import Loader, build_dataset, save_image_grid
from support.latents import LatentCache, build_latent_cache, cache_meta, stage1_info
from support.optim import ema_decay_at, lr_at, make_optimizer, update_ema

# -----------------------------------------------------------------------------
# settings
# stage 1 and data
ae_ckpt = "out/ae/ckpt.pt"  # train_ae.py checkpoint: encoder makes the latents, decoder the samples
data = ""  # ImageNet-style folder (train/<class>/*.JPEG); "" = the built-in procedural dataset
dataset_size = 10000  # images in the built-in dataset
cache_dir = ""  # "" = <out_dir>/latents; share one cache across runs of the same stage-1 checkpoint
shard_size = 10000  # images per cache shard
encode_batch_size = 64  # images per batch while encoding the latent cache
num_workers = -1  # data-loading processes per rank; -1 = up to 8 with --data (core-bounded), else 0
# model
preset = None  # preset (dit.DIT_PRESETS); None = DiT-Tiny/1 on built-in data, DiT-XL/p with --data
class_dropout = 0.1  # share of labels set to the null class, giving guidance an unconditional model
t_dist = "logit_normal"  # training t distribution: logit_normal | uniform
attn_impl = "math"  # math | sdpa
grad_checkpoint = False  # activation checkpointing of every DiT block: less memory, a forward more
# optimisation
batch_size = 64  # per process and micro-step; global batch = batch_size * grad_accum * world size
grad_accum = 1  # micro-batches per optimizer step
max_steps = 3000  # optimizer steps of the run (lr constant after warm-up, so a run can be extended)
lr = 1e-3  # DiT at ImageNet scale: 1e-4 at a global batch of 256
warmup_steps = 100  # steps of linear learning-rate warm-up from 0
weight_decay = 0.0  # AdamW decay on weight matrices (not on norms and biases)
grad_clip = 1.0  # clip the global gradient norm to this
ema_decay = 0.999  # ImageNet: 0.9999
max_nonfinite_steps = 5  # skipped steps in a row (non-finite loss or gradient) before the run stops
# sample grids
sample_steps = 50  # Euler steps of the DiT
cfg_scale = 4.0  # classifier-free guidance scale of the sample grids (1 = none)
decode_steps = None  # DGAE decoder steps; None = the stage-1 checkpoint's default
# bookkeeping
out_dir = "out/dit"  # run folder: ckpt.pt, log.jsonl, samples_*.png, latents/ (one run holds it)
log_every = 50  # steps between rows of log.jsonl
sample_every = 1000  # steps between sample grids
ckpt_every = 1000  # steps between checkpoints (also at the end and at a stop signal)
resume = False  # continue the run in --out-dir exactly where it stopped, with its own settings
seed = 0  # initial weights, data order and noise
device = ""  # "" = cuda, then mps, then cpu
dist_timeout = 1800  # collective timeout (s) ending a hung job; covers a 10.8 GB checkpoint write
compile = False  # torch.compile the DiT (worth it on GPUs for long runs)
deterministic = False  # deterministic CUDA: bit-for-bit resumes on GPUs too (slower; CPU always is)
# -----------------------------------------------------------------------------
SETTINGS = common.settings_block(globals())  # the defaults above: every main() starts from them


def main(argv=None):
    settings, given = common.configure(SETTINGS, argv)
    settings = common.default_workers(settings)
    # out of range: refused before any work (--shard-size 0 would leave a meta.json that marks later
    # caches stale; --max-steps 0 would say "done" and write nothing)
    common.check_settings(
        settings, count=("dataset_size", "shard_size", "encode_batch_size", "batch_size",
                         "grad_accum", "max_steps", "log_every", "sample_every", "ckpt_every",
                         "max_nonfinite_steps"),
        count_or_0=("num_workers", "warmup_steps", "seed"), steps=("sample_steps", "decode_steps"),
        positive=("lr", "grad_clip", "dist_timeout"), non_negative=("weight_decay",),
        fraction=("class_dropout", "ema_decay"), guidance=("cfg_scale",),
        choices={"t_dist": ("logit_normal", "uniform"), "attn_impl": ("math", "sdpa")},
        at_most={"dataset_size": common.MAX_SIZE, "shard_size": common.MAX_SIZE,
                 "encode_batch_size": common.MAX_BATCH, "batch_size": common.MAX_BATCH,
                 "grad_accum": common.MAX_BATCH, "num_workers": common.MAX_WORKERS,
                 "max_steps": common.MAX_STEPS, "warmup_steps": common.MAX_STEPS,
                 "seed": common.MAX_SEED, "dist_timeout": common.MAX_SECONDS})
    log = (lambda *a: print(*a, flush=True)) if common.launch_rank() == 0 else (lambda *a: None)
    # a resumed run takes its settings back; the cache's own (--data, --shard-size) may not change
    ckpt, settings, dist = checkpoints.start_run("dit", settings, given,
                                                 checkpoints.MAY_CHANGE_ON_RESUME, log)
    globals().update(settings)
    ckpt_path = os.path.join(out_dir, "ckpt.pt")
    dev = dist.device

    with common.user_errors():  # a bad path, flag or file: one line
        ae_path = ckpt["ae_ckpt"] if ckpt is not None and "ae_ckpt" not in given else ae_ckpt
        # read once: the encoder, decoder and fingerprint all come from it
        stage1, stage1_ckpt = stage1_info(ae_path)
        if ckpt is not None and ckpt["ae_fingerprint"] != stage1["ae_fingerprint"]:
            raise SystemExit(f"error: {ae_path} holds another stage-1 encoder than the run being "
                             "resumed was trained on")
        dataset = build_dataset(data, stage1["resolution"], size=dataset_size, seed=seed)
        changed = checkpoints.dataset_changed(ckpt, len(dataset)) if ckpt is not None else None
        if changed:
            log(changed)
        C, h, w = stage1["latent_shape"]
        if ckpt is not None:
            name = ckpt["model_name"]
        else:  # at most 16x16 tokens
            name = preset or ("DiT-Tiny/1" if not data else f"DiT-XL/{max(1, min(4, h // 16))}")
        settings["preset"] = name  # as the checkpoint records it
        if name not in DIT_PRESETS:
            raise SystemExit(f"error: unknown --preset {name}; valid: {', '.join(DIT_PRESETS)}")

    # step 1: the latent cache (a no-op once complete); one still to write is refused now if the
    # folder cannot be written
    cache = cache_dir or os.path.join(out_dir, "latents")
    if dist.master and not os.path.exists(os.path.join(cache, "meta.json")):
        common.writable_dir(cache, "--cache-dir")
    meta = cache_meta(stage1, dataset, data, seed, shard_size)
    num_classes = meta["num_classes"]
    log(f"data: {data or 'built-in procedural dataset'} ({len(dataset)} images, {num_classes} "
        f"classes) at {stage1['resolution']} px -> latents {tuple(stage1['latent_shape'])}, cache "
        f"{cache}")
    # from here on SIGTERM, SIGUSR1 or Ctrl-C stop the run at the next safe point, losing nothing
    # finished: while encoding after the batch (finished shards kept), while training after the step
    stop = checkpoints.StopSignals()
    # one line for stage-1 weights that do not fit, a stats.pt with std 0, too few latents
    with common.user_errors():
        build_latent_cache(cache, meta, dataset,
                           lambda: checkpoints.dgae_from_checkpoint(stage1_ckpt, ae_path, dev),
                           dist, encode_batch_size, num_workers, stop)
        latents = LatentCache(cache)
        loader = Loader(latents, batch_size, dist.rank, dist.world_size, seed)
    mean, std = latents.mean.to(dev).view(1, -1, 1, 1), latents.std.to(dev).view(1, -1, 1, 1)
    log(f"latents: {len(latents)} images x 2 (with mirror images), per-channel mean "
        f"{[round(v, 3) for v in latents.mean.tolist()]}, std "
        f"{[round(v, 3) for v in latents.std.tolist()]}")

    # step 2: the DiT. The stage-1 decoder (for the grids) is built first: its random init must not
    # draw from the RNG stream that the checkpoint saves and --resume restores.
    with common.user_errors():
        ae = checkpoints.dgae_from_checkpoint(stage1_ckpt, ae_path, dev) if dist.master else None
    torch.manual_seed(seed)  # the same initial weights on every rank
    if ckpt is not None:  # the checkpoint's model; only --attn-impl (how it computes) may change
        args = dict(ckpt["model_args"],
                    **({"attn_impl": attn_impl} if "attn_impl" in given else {}))
        with common.user_errors():  # settings, weights or sizes edited: one line naming the file
            net = checkpoints.model_from_args(DiT, args, ckpt["model"], ckpt_path).to(dev)
    else:
        net = build_dit(name, (h, w), C, num_classes, class_dropout_prob=class_dropout,
                        attn_impl=attn_impl).to(dev)
    ema = copy.deepcopy(net).requires_grad_(False).eval()
    net.grad_checkpoint = grad_checkpoint  # how it computes: never saved, may change on --resume
    optimizer = make_optimizer(net, lr, weight_decay, (0.9, 0.999), dev)
    log(f"model: {name}, {net.grid[0] * net.grid[1]} tokens, "
        f"{common.count_params(net) / 1e6:.2f}M params")

    step = 0
    if ckpt is not None:
        with common.user_errors():  # weights that do not fit (an edited file): one line naming it
            step = checkpoints.restore_training(ckpt, dist, net, ema, optimizer, loader, ckpt_path,
                                                seed, log)
        log(f"resumed from {ckpt_path} at step {step}")
    else:
        checkpoints.seed_rank(seed, dist.rank)  # different noise, t and flips on every rank

    # the module the loop calls (see train_ae.py); `net` is the plain one
    train_model = torch.compile(net) if compile else net
    if compile:
        log(checkpoints.COMPILE_NOTE)
    if dist.ddp:
        train_model = DDP(train_model, device_ids=[dev.index] if dev.type == "cuda" else None)
    autocast = common.autocast_context(dev)
    # the grids: sample.py's default grid (a row of 8 samples per class), from noise and a decoder
    # seed fixed for the whole run, drawn like its chunk 0 (a generator of their own, not the RNG's)
    grid_y = grid_labels("", 8, num_classes)
    _, grid_noise, grid_seed = chunk_inputs(seed, 0, len(grid_y), num_classes, (C, h, w), grid_y)
    pbar = tqdm(total=max_steps, initial=step, disable=not dist.master, dynamic_ncols=True)
    steplog = common.StepLog(os.path.join(out_dir, "log.jsonl"), dist, pbar,
                             batch_size * grad_accum * dist.world_size, first_step=step)
    guard = checkpoints.StepGuard(stop, dist, max_nonfinite_steps, ckpt_path,
                                  hint="Lower --lr or check the latent cache.", optimizer=optimizer,
                                  check_every=log_every, last_step=max_steps)

    while step < max_steps:
        # the learning rate: linear warm-up, then constant
        step_lr = lr_at(step, lr, warmup_steps)
        for group in optimizer.param_groups:
            group["lr"] = step_lr

        # grad_accum micro-batches; DDP all-reduces the gradients on the last one only (train_ae.py)
        means = {"loss": 0.0}  # this rank's mean over the micro-batches
        for micro in range(grad_accum):
            z2, y = next(loader)  # z2 (B, 2, C, h, w) float16: each image's latent, its mirror's
            pick = torch.randint(0, 2, (len(y),))  # the horizontal flip: one of the two at random
            z = z2[torch.arange(len(y)), pick].to(dev, non_blocking=True).float()  # (B, C, h, w)
            z = (z - mean) / std  # per-channel zero mean, unit variance: the scale the noise has
            y = y.to(dev, non_blocking=True)
            sync = micro == grad_accum - 1 or not dist.ddp
            with (nullcontext() if sync else train_model.no_sync()), autocast:
                # the decoder's rectified-flow loss, here on latents with the class as the condition
                loss, *_ = flow_matching_loss(lambda x_t, t: train_model(x_t, t, y), z, t_dist)
            (loss / grad_accum).backward()
            means["loss"] = means["loss"] + loss.detach().float() / grad_accum

        # clip, AdamW step, then the EMA of the weights (what the grids and sample.py use), unless
        # the loss or a gradient is not finite (checkpoints.StepGuard)
        grad_norm = torch.nn.utils.clip_grad_norm_(net.parameters(), grad_clip)
        if guard.update_ok(means["loss"], grad_norm, step):
            optimizer.step()
            update_ema(ema, net, guard.ema_decay(ema_decay_at(step, ema_decay, warmup=10)))
        optimizer.zero_grad(set_to_none=True)
        step += 1

        if step % log_every == 0 or step == max_steps:  # the loss averaged over ranks
            steplog.write(step, means, skipped_steps=guard.take_skipped(), lr=step_lr,
                          grad_norm=grad_norm)
        pbar.update(1)
        if step % ckpt_every == 0 or step == max_steps or guard.stopping:
            checkpoints.save_training(
                ckpt_path, dist, "dit", step, net, ema, optimizer, loader, model_args=net.config,
                model_name=name, config=dict(settings, num_images=len(dataset)),
                ae_ckpt=stage1["ae_ckpt"], ae_step=stage1["ae_step"],
                ae_fingerprint=stage1["ae_fingerprint"], latent_shape=[C, h, w],
                latent_mean=latents.mean, latent_std=latents.std, num_classes=num_classes,
                class_names=meta["class_names"])
        if (step % sample_every == 0 or step == max_steps) and dist.master and not guard.stopping:
            # guided Euler with the EMA DiT from the fixed noise, then the decoder (sample.py);
            # after the save, and given up at a stop signal (see train_ae.py)
            with guard.given_up_at_stop(f"sample grid of step {step}", log, ema,
                                        ae.decoder), autocast:
                x = generate(ema, ae, grid_y.to(dev), grid_noise.to(dev), sample_steps, cfg_scale,
                             mean, std, decode_steps, grid_seed)  # (N, 3, H, W)
                save_image_grid(x, os.path.join(out_dir, f"samples_{step:06d}.png"), nrow=8)
        if guard.stopping and step < max_steps:  # preempted: the step is saved (see train_ae.py)
            guard.exit_saved(step, log)
    pbar.close()
    log(f"done: {ckpt_path}")
    common.shutdown(dist)


if __name__ == "__main__":
    # a rank that stopped responding: one line; an error's line never after a progress bar
    with common.collective_timeouts(), common.bars_closed_first():
        main()
