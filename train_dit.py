"""
Stage 2 training: a class-conditional DiT on the latents of a trained DGAE (stage 1).

    python train_dit.py                                     # built-in data + out/ae/ckpt.pt, laptop CPU, minutes
    torchrun --nproc_per_node=8 train_dit.py --ae-ckpt out/ae/ckpt.pt --data /path/imagenet \\
        --preset DiT-XL/1 --batch-size 32 --lr 1e-4 --ema-decay 0.9999 --max-steps 400000
Every setting below can be overridden with --name value (dashes or underscores).

Step 1 (once per stage-1 checkpoint and dataset): encode every image and its mirror image with the
stage-1 encoder (posterior mean) into a latent cache, cache_dir = out_dir/latents by default:
    meta.json             what the cache was built from: stage-1 encoder fingerprint (and its path and
                          step), dataset, resolution, image count. A mismatch is refused, never used.
    shard_00000.pt, ...   shard_size images each: z (n, 2, C, h, w) float16 [image, mirror image],
                          labels y (n,), and per-channel sums for the statistics. Written atomically,
                          so an interrupted build keeps its finished shards and resumes after them.
    stats.pt              per-channel mean and std over all cached latents; written last.
Each time it is opened, the cache checks itself against meta.json: the shard list, each shard's
image count, keys and shapes, and stats.pt against the shards. Anything wrong is refused with one
line that names the file and what to delete; it is never trusted or rebuilt silently.
Shards are encoded in parallel across ranks under torchrun. Size: ImageNet train (1,281,167
images) at f32c16 (16 x 8 x 8 latents) is 1.28M x 2 x 1024 x 2 bytes = 5.2 GB in float16
(10.5 GB at f16c8). Training memory-maps the shards, so all ranks on a node share one copy.

Step 2: train the DiT on z_norm = (z - mean_c) / std_c with the decoder's rectified-flow loss and
sample with its Euler sampler (decoder_diffusion.py). The checkpoint records the stage-1 path,
its encoder fingerprint and the latent statistics, so `python sample.py --ckpt out/dit/ckpt.pt`
needs nothing else. Writes out_dir/ckpt.pt, log.jsonl and samples_*.png (one row per class).
"""

import bisect
import copy
import glob
import json
import os
import time
from contextlib import nullcontext

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

import common
from ae import DGAE, config_from_dict, encoder_fingerprint, load_dgae
from data import Loader, build_dataset, collate_skip_bad, default_classes, save_image_grid, unreadable_error
from decoder_diffusion import euler_sample, flow_matching_loss
from dit import DIT_PRESETS, DiT, build_dit
from train_ae import ema_decay_at, lr_at, make_optimizer, settings_for_resume, update_ema

# -----------------------------------------------------------------------------
# settings
# stage 1 and data
ae_ckpt = "out/ae/ckpt.pt"  # train_ae.py checkpoint: its encoder makes the latents, its decoder the samples
data = ""  # ImageNet-style folder (train/<class>/*.JPEG); "" = the built-in procedural dataset
dataset_size = 10000  # images in the built-in dataset
cache_dir = ""  # "" = <out_dir>/latents; share one cache between runs of the same stage-1 checkpoint
shard_size = 10000  # images per cache shard
encode_batch_size = 64
num_workers = 0  # image-loading processes per rank while encoding (use 8+ for ImageNet)
# model
preset = ""  # DiT preset (dit.DIT_PRESETS); "" = DiT-Tiny/1 on the built-in data, DiT-XL/p with --data
class_dropout = 0.1  # fraction of labels replaced by the null class, so that guidance has an unconditional model
t_dist = "logit_normal"  # training t distribution: logit_normal | uniform
attn_impl = "math"  # math | sdpa
grad_checkpoint = False  # activation checkpointing of every DiT block: less memory for one more forward pass a step
# optimisation
batch_size = 64  # per process and micro-step; global batch = batch_size * grad_accum * world size
grad_accum = 1
max_steps = 3000
lr = 1e-3  # DiT at ImageNet scale: 1e-4 at a global batch of 256
warmup_steps = 100
weight_decay = 0.0
grad_clip = 1.0
ema_decay = 0.999  # ImageNet: 0.9999
max_nonfinite_steps = 5  # steps in a row with a non-finite loss or gradient (each skipped) before the run stops
# sample grids
sample_steps = 50  # Euler steps of the DiT
cfg_scale = 4.0
decode_steps = 0  # DGAE decoder steps; 0 = the stage-1 checkpoint's default
# bookkeeping
out_dir = "out/dit"
log_every = 50
sample_every = 1000
ckpt_every = 1000
resume = False
seed = 0
device = ""  # "" = cuda, then mps, then cpu
dist_timeout = 600  # seconds a rank waits for the others in a collective before the job stops (a hung rank)
compile = False
# -----------------------------------------------------------------------------


# -----------------------------------------------------------------------------
# step 1: the latent cache


def stage1_info(path):
    """What the DiT needs to know about a stage-1 checkpoint, without building the model (only a
    copy without storage, to check that the weights fit it)."""
    if not os.path.isfile(path):
        raise SystemExit(f"error: stage-1 checkpoint {path} not found. Train one with train_ae.py "
                         "(it writes out/ae/ckpt.pt) or pass its path with --ae-ckpt PATH.")
    ck = common.load_checkpoint(path, "ae")  # a file of the wrong kind: ValueError, reported by user_errors
    args = ck["model_args"]
    # the weights must fit the model that model_args describes. Checked now, before the cache's
    # meta.json is written (a cache recorded from a damaged file would be stale for the good one),
    # on a model without storage (meta device), so no second full model is built.
    with torch.device("meta"):
        shell = DGAE(config_from_dict(args))
    common.load_weights(shell, ck["ema"], path, assign=True)
    r, f = args["resolution"], args["compression"]
    return dict(ae_ckpt=os.path.abspath(path), ae_step=ck["step"], ae_fingerprint=encoder_fingerprint(ck["ema"]),
                resolution=r, latent_shape=[args["latent_channels"], r // f, r // f])


def cache_meta(stage1, dataset, data, dataset_seed, shard_size):
    """The record of what a cache is built from; the keys in STALE_KEYS decide whether it is still valid."""
    names = list(getattr(dataset, "classes", None) or dataset.class_names)
    return dict(stage1, data=os.path.abspath(data) if data else "built-in", dataset_seed=None if data else dataset_seed,
                num_images=len(dataset), num_classes=len(names), class_names=names, shard_size=shard_size,
                dtype="float16")


# the stage-1 path and step are informative only: a moved but identical checkpoint keeps its cache
STALE_KEYS = ("ae_fingerprint", "resolution", "latent_shape", "data", "dataset_seed", "num_images", "shard_size", "dtype")


def _shard(cache, k):
    return os.path.join(cache, f"shard_{k:05d}.pt")


def _shard_paths(cache):
    return sorted(glob.glob(os.path.join(cache, "shard_*.pt")))


# -----------------------------------------------------------------------------
# the cache checks itself against its meta.json: the shard list, each shard's image count, keys and
# shapes, and stats.pt against the shards. Whatever is wrong is refused in one line naming the file
# and what to delete; nothing is trusted, or rebuilt, silently.

SHARD_KEYS = ("z", "y", "sum", "sumsq", "count", "n_bad")
STATS_KEYS = ("mean", "std", "count", "n_bad")


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def read_meta(cache):
    """The cache's meta.json, or a one-line refusal if it is damaged."""
    path = os.path.join(cache, "meta.json")
    try:
        with open(path) as fh:
            meta = json.load(fh)
        problem = None
    except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        meta, problem = None, e.strerror if isinstance(e, OSError) else f"{type(e).__name__}: {e}"
    if problem is None and not isinstance(meta, dict):
        problem = f"holds a JSON {type(meta).__name__}, not an object"
    for k in ("num_images", "shard_size"):
        if problem is None and (not _is_int(meta.get(k)) or meta[k] < (1 if k == "shard_size" else 0)):
            problem = f"{k} is {meta.get(k)!r}"
    shape = meta.get("latent_shape") if problem is None else None
    if problem is None and not (isinstance(shape, list) and len(shape) == 3 and all(_is_int(v) and v > 0 for v in shape)):
        problem = f"latent_shape is {shape!r}"
    if problem is not None:
        raise SystemExit(f"error: {path} is damaged ({problem}); delete the folder {cache} to encode the latents again")
    return meta


def shard_ranges(meta):
    """The image range [lo, hi) of each shard that meta.json's num_images and shard_size imply."""
    n, size = meta["num_images"], meta["shard_size"]
    return [(lo, min(n, lo + size)) for lo in range(0, n, size)]


def _tensor_is(t, shape, dtypes):
    return isinstance(t, torch.Tensor) and tuple(t.shape) == tuple(shape) and t.dtype in dtypes


def open_shard(cache, meta, k):
    """Shard k, memory-mapped, once it is checked against meta.json; else a one-line refusal."""
    path, stats_path = _shard(cache, k), os.path.join(cache, "stats.pt")
    (lo, hi), n_shards = shard_ranges(meta)[k], len(shard_ranges(meta))
    # the way out: encode that shard again (the build does it once stats.pt is gone), or everything
    redo = [p for p in (path, stats_path) if os.path.exists(p)]
    fix = (f"delete {' and '.join(redo)} and run again to encode it again" if redo else "run again to encode it")
    fix += f", or delete the folder {cache} to encode all the latents again"
    if not os.path.exists(path):
        raise SystemExit(f"error: latent shard {path} is missing (meta.json lists {n_shards} shards for "
                         f"{meta['num_images']} images); {fix}")
    try:
        s = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # never relay torch's message: it suggests weights_only=False
        raise SystemExit(f"error: latent shard {path} cannot be read ({type(e).__name__}: damaged, truncated "
                         f"or not a shard); {fix}") from None
    C, h, w = meta["latent_shape"]
    if not isinstance(s, dict) or any(key not in s for key in SHARD_KEYS):
        found = sorted(s) if isinstance(s, dict) else type(s).__name__
        problem = f"holds {found}, not the keys {', '.join(SHARD_KEYS)}"
    else:
        m = len(s["y"]) if isinstance(s["y"], torch.Tensor) and s["y"].dim() == 1 else -1
        if not _tensor_is(s["z"], (m, 2, C, h, w), (torch.float16,)) or s["y"].dtype != torch.long:
            problem = (f"has z {tuple(getattr(s['z'], 'shape', ()))} {getattr(s['z'], 'dtype', '')} and y "
                       f"{tuple(getattr(s['y'], 'shape', ()))}, not z (n, 2, {C}, {h}, {w}) float16 and y (n,) int64")
        elif not all(_tensor_is(s[key], (C,), (torch.float64,)) for key in ("sum", "sumsq")) \
                or s["count"] != m * 2 * h * w or not _is_int(s["n_bad"]):
            problem = "has sums or counts that do not fit its latents"
        elif m + s["n_bad"] != hi - lo:
            problem = (f"holds {m} latents and {s['n_bad']} skipped images, but meta.json gives it images "
                       f"{lo}..{hi - 1} ({hi - lo})")
        else:
            return s
    raise SystemExit(f"error: latent shard {path} is damaged ({problem}); {fix}")


def open_shards(cache, meta):
    """Every shard meta.json lists, checked (a stray extra shard_*.pt file is not read)."""
    return [open_shard(cache, meta, k) for k in range(len(shard_ranges(meta)))]


def read_stats(cache, meta, shards):
    """stats.pt, checked against the shards it was computed from; else a one-line refusal."""
    path = os.path.join(cache, "stats.pt")
    fix = "delete it and run again to compute it again from the shards (nothing is encoded again)"
    try:
        stats = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise SystemExit(f"error: {path} cannot be read ({type(e).__name__}: damaged, truncated or not a "
                         f"stats file); {fix}") from None
    C = meta["latent_shape"][0]
    if not isinstance(stats, dict) or any(key not in stats for key in STATS_KEYS):
        found = sorted(stats) if isinstance(stats, dict) else type(stats).__name__
        problem = f"holds {found}, not the keys {', '.join(STATS_KEYS)}"
    elif not all(_tensor_is(stats[key], (C,), (torch.float32,)) and bool(stats[key].isfinite().all())
                 for key in ("mean", "std")) or bool((stats["std"] < 0).any()):
        problem = f"mean and std must be {C} finite float32 values (std >= 0)"
    elif stats["count"] != sum(s["count"] for s in shards) or stats["n_bad"] != sum(s["n_bad"] for s in shards):
        problem = "its counts do not match the shards"
    else:
        return stats
    raise SystemExit(f"error: {path} is damaged ({problem}); {fix}")


@torch.no_grad()
def encode_shard(ae, subset, latent_shape, batch_size, num_workers, pbar):
    """Posterior means of the images in `subset` and of their mirror images, with per-channel sums.

    Encoded in fp32 (no autocast): it happens once and the latents should be the encoder's own.
    """
    dev = next(ae.parameters()).device
    loader = DataLoader(subset, batch_size=batch_size, collate_fn=collate_skip_bad, num_workers=num_workers,
                        pin_memory=dev.type == "cuda")
    zs, ys, n_bad = [torch.zeros(0, 2, *latent_shape, dtype=torch.float16)], [torch.zeros(0, dtype=torch.long)], 0
    for x, y, bad in loader:
        n_bad += bad
        if len(y):
            x = x.to(dev, non_blocking=True)  # (B, 3, H, W)
            z = ae.encode(torch.cat([x, x.flip(-1)]))  # (2B, C, h, w): images, then their mirror images
            if not z.isfinite().all() or z.abs().max() > 60000:
                raise ValueError("latent values non-finite or beyond the float16 range; "
                                 "the stage-1 encoder has diverged")
            zs.append(torch.stack(z.chunk(2), dim=1).half().cpu())  # (B, 2, C, h, w)
            ys.append(y)
        pbar.update(len(y) + bad)
    z = torch.cat(zs)
    z64 = z.double()  # statistics of exactly what training will read (the float16 values), in float64
    return dict(z=z, y=torch.cat(ys), sum=z64.sum((0, 1, 3, 4)), sumsq=z64.pow(2).sum((0, 1, 3, 4)),
                count=z64[:, :, 0].numel(), n_bad=n_bad)


def build_latent_cache(cache, meta, dataset, load_ae, dist, batch_size=64, num_workers=0):
    """Step 1: encode `dataset` into `cache` (see the module docstring), resuming after finished shards.

    Every rank encodes shards rank, rank + W, ...; rank 0 then combines the per-shard sums into
    stats.pt. A cache built from another encoder or dataset is refused. load_ae() builds the
    stage-1 model, only if some shard is still missing. Every rank checks the same files and
    reaches the same verdict, so a refusal stops all of them, not rank 0 alone.
    """
    meta_path, stats_path = os.path.join(cache, "meta.json"), os.path.join(cache, "stats.pt")
    # latents without a meta.json: what they were encoded from is unknown, so they cannot be used
    orphans = not os.path.exists(meta_path) and (os.path.exists(stats_path) or _shard_paths(cache))
    common.barrier(dist)  # every rank has looked before rank 0 writes a meta.json
    if orphans:
        raise SystemExit(f"error: the latent cache {cache} has latent files but no meta.json, so what they were "
                         f"encoded from is unknown; delete the folder {cache} to encode the latents again")
    if dist.master and not os.path.exists(meta_path):
        os.makedirs(cache, exist_ok=True)
        with open(meta_path + ".tmp", "w") as fh:
            json.dump(meta, fh, indent=1)
        os.replace(meta_path + ".tmp", meta_path)
    common.barrier(dist)
    old = read_meta(cache)
    stale = [k for k in STALE_KEYS if old.get(k) != meta[k]]
    if stale:
        raise SystemExit(f"error: the latent cache {cache} is stale: it was built from {old.get('ae_ckpt')} (step "
                         f"{old.get('ae_step')}) and {old.get('data')}, and differs now in: "
                         + ", ".join(f"{k} (was {old.get(k)}, now {meta[k]})" for k in stale)
                         + f". Delete {cache} or pass another --cache-dir to encode again.")
    if os.path.exists(stats_path):
        return  # complete; LatentCache checks it against meta.json when it opens it
    ranges = shard_ranges(old)
    todo = [k for k in range(dist.rank, len(ranges), dist.world_size) if not os.path.exists(_shard(cache, k))]
    if todo:
        ae = load_ae()
        pbar = tqdm(total=sum(ranges[k][1] - ranges[k][0] for k in todo), disable=not dist.master,
                    desc="encoding latents" + (f" (rank 0 of {dist.world_size})" if dist.ddp else ""), dynamic_ncols=True)
        for k in todo:
            shard = encode_shard(ae, Subset(dataset, range(*ranges[k])), old["latent_shape"], batch_size,
                                 num_workers, pbar)
            common.save_checkpoint(_shard(cache, k), shard)  # atomic: a shard file exists only when complete
        pbar.close()
    common.barrier(dist)
    shards = open_shards(cache, old)  # on every rank (see above); the shards are memory-mapped, so it is cheap
    count, n_bad = sum(s["count"] for s in shards), sum(s["n_bad"] for s in shards)
    if count == 0:  # not one readable image: no statistics (they would be NaN), and no empty shards kept
        common.barrier(dist)  # every rank has read the shards before rank 0 removes them
        if dist.master:
            for k in range(len(shards)):
                os.remove(_shard(cache, k))
        raise unreadable_error(dataset, old["num_images"])
    if dist.master:
        mean = sum(s["sum"] for s in shards) / count  # (C,) float64
        std = (sum(s["sumsq"] for s in shards) / count - mean ** 2).clamp_min(0).sqrt()
        common.save_checkpoint(stats_path, dict(mean=mean.float(), std=std.float(), count=count, n_bad=n_bad))
        print(f"latent cache complete: {cache}" + (f" ({n_bad} unreadable images skipped)" if n_bad else ""), flush=True)
    common.barrier(dist)


class LatentCache(Dataset):
    """The cached latents as a dataset: item i -> (z (2, C, h, w) float16 [image, mirror image], label).

    Opening it checks it against its meta.json (shard list, image counts, keys, shapes) and
    stats.pt against the shards. Shards are memory-mapped, not read: the OS pages them in on
    demand and shares the pages between all the ranks of a node.
    """

    def __init__(self, cache):
        meta = read_meta(cache)
        self.shards = open_shards(cache, meta)
        stats = read_stats(cache, meta, self.shards)
        self.mean, self.std = stats["mean"], stats["std"]  # (C,) each
        # training divides by std: a channel with std 0 (constant) would make every DiT step NaN
        bad = (~(self.mean.isfinite() & self.std.isfinite() & (self.std > 0))).nonzero().flatten().tolist()
        if bad:
            raise ValueError(f"{os.path.join(cache, 'stats.pt')}: latent channel(s) {bad} have std 0 or a "
                             f"non-finite mean or std, which would make every DiT step NaN; delete {cache} to encode "
                             "again, and if that recurs, the stage-1 encoder leaves the channel unused: train it longer")
        self.ends = [int(x) for x in torch.tensor([len(s["y"]) for s in self.shards]).cumsum(0)]

    def __len__(self):
        return self.ends[-1]

    def __getitem__(self, i):
        k = bisect.bisect_right(self.ends, i)  # the shard that holds item i
        j = i - (self.ends[k - 1] if k else 0)
        return self.shards[k]["z"][j], int(self.shards[k]["y"][j])


# -----------------------------------------------------------------------------
# the script: step 1 (the cache), then step 2 (the training loop)


# the settings of the run that --resume keeps (see train_ae.settings_for_resume); the model's are in model_args.
# Those in MAY_CHANGE are the checkpoint's unless given: a moved dataset or cache, a longer run.
RESUMED_SETTINGS = ("data", "dataset_size", "seed", "cache_dir", "shard_size", "batch_size", "grad_accum", "max_steps",
                    "lr", "warmup_steps", "weight_decay", "grad_clip", "ema_decay", "class_dropout", "t_dist")
MAY_CHANGE = ("data", "cache_dir", "shard_size", "max_steps")


def main():
    settings, given = common.configure(globals())
    # numbers out of range stop here, before any work (--shard-size 0 used to leave a meta.json
    # behind that marked later caches stale; --max-steps 0 printed "done" and wrote nothing)
    common.check_settings(settings, count=("dataset_size", "shard_size", "encode_batch_size", "batch_size", "grad_accum",
                                           "max_steps", "log_every", "sample_every", "ckpt_every", "sample_steps",
                                           "max_nonfinite_steps"),
                          count_or_0=("num_workers", "warmup_steps", "decode_steps", "seed"),
                          positive=("lr", "grad_clip", "dist_timeout"), non_negative=("weight_decay",),
                          fraction=("class_dropout", "ema_decay"), finite=("cfg_scale",))
    dist = common.setup_distributed(device, dist_timeout)
    dev = dist.device
    ckpt_path = os.path.join(out_dir, "ckpt.pt")
    log = (lambda *a: print(*a, flush=True)) if dist.master else (lambda *a: None)
    # set-up: a bad path, flag or file stops here with a one-line message
    with common.user_errors():
        if dist.master:  # a folder that cannot take the checkpoint is found now, not at the first save
            common.writable_dir(out_dir, "--out-dir")
        ckpt = common.resume_or_refuse(ckpt_path, resume, "dit")  # never overwrite a run by accident
        if ckpt is not None:  # the run's own settings, not this command line's defaults
            settings = settings_for_resume(ckpt, settings, given, RESUMED_SETTINGS, MAY_CHANGE)
            globals().update(settings)
        ae_path = ckpt["ae_ckpt"] if ckpt is not None and "ae_ckpt" not in given else ae_ckpt
        stage1 = stage1_info(ae_path)
        if ckpt is not None and ckpt["ae_fingerprint"] != stage1["ae_fingerprint"]:
            raise SystemExit(f"error: {ae_path} holds another stage-1 encoder than the run being resumed was trained on")
        dataset = build_dataset(data, stage1["resolution"], size=dataset_size, seed=seed)
        C, h, w = stage1["latent_shape"]
        name = preset or ("DiT-Tiny/1" if not data else f"DiT-XL/{max(1, min(4, h // 16))}")  # <= 16x16 tokens
        if ckpt is not None and "preset" in given and preset != ckpt["model_name"]:
            raise SystemExit(f"error: --preset {preset} does not match the checkpoint being resumed ({ckpt['model_name']})")
        if name not in DIT_PRESETS:
            raise SystemExit(f"error: unknown --preset {name}; valid: {', '.join(DIT_PRESETS)}")

    # step 1: the latent cache (a no-op once it is complete and matches)
    cache = cache_dir or os.path.join(out_dir, "latents")
    meta = cache_meta(stage1, dataset, data, seed, shard_size)
    num_classes = meta["num_classes"]
    log(f"data: {data or 'built-in procedural dataset'} ({len(dataset)} images, {num_classes} classes) "
        f"at {stage1['resolution']} px -> latents {tuple(stage1['latent_shape'])}, cache {cache}")
    with common.user_errors():  # a stage-1 file whose weights do not fit its model_args: one line
        build_latent_cache(cache, meta, dataset, lambda: load_dgae(ae_path, dev), dist, encode_batch_size, num_workers)
    with common.user_errors():  # e.g. a stats.pt with std 0
        latents = LatentCache(cache)
    mean, std = latents.mean.to(dev).view(1, -1, 1, 1), latents.std.to(dev).view(1, -1, 1, 1)
    with common.user_errors():  # e.g. fewer latents than one global batch
        loader = Loader(latents, batch_size, dist.rank, dist.world_size, seed)
    log(f"latents: {len(latents)} images x 2 (with mirror images), per-channel mean "
        f"{[round(v, 3) for v in latents.mean.tolist()]}, std {[round(v, 3) for v in latents.std.tolist()]}")

    # step 2: the DiT. The stage-1 decoder (for the grids) is built first: its random init must not
    # draw from the RNG stream that the checkpoint saves and --resume restores.
    with common.user_errors():
        ae = load_dgae(ae_path, dev) if dist.master else None
    torch.manual_seed(seed)  # the same initial weights on every rank
    if ckpt is not None:
        # the checkpoint's model; only --attn-impl (how attention is computed) may change
        args = dict(ckpt["model_args"], **({"attn_impl": attn_impl} if "attn_impl" in given else {}))
        name, net = ckpt["model_name"], DiT(**args).to(dev)
    else:
        net = build_dit(name, (h, w), C, num_classes, class_dropout_prob=class_dropout, attn_impl=attn_impl).to(dev)
    ema = copy.deepcopy(net).requires_grad_(False).eval()
    net.grad_checkpoint = grad_checkpoint  # how this run computes: never saved, so free to change on --resume
    optimizer = make_optimizer(net, lr, weight_decay, (0.9, 0.999), dev)
    log(f"model: {name}, {net.grid[0] * net.grid[1]} tokens, {common.count_params(net) / 1e6:.2f}M params")

    step = 0
    if ckpt is not None:
        with common.user_errors():  # weights that do not fit (an edited file): one line naming it
            step = common.restore_training(ckpt, dist, net, ema, optimizer, loader, ckpt_path)
        log(f"resumed from {ckpt_path} at step {step}")
    else:
        torch.manual_seed(seed + 1000 * (dist.rank + 1))  # different noise, t and flips on every rank

    # the module the loop calls (see train_ae.py); `net` is the plain one
    train_model = torch.compile(net) if compile else net
    if dist.ddp:
        train_model = DDP(train_model, device_ids=[dev.index] if dev.type == "cuda" else None)
    autocast = common.autocast_context(dev)
    # the grids: a row of 8 samples per class, from noise and a decoder seed fixed for the whole run
    # (drawn like chunk 0 of sample.py, from a generator of their own, not from the training RNG)
    grid_y = torch.tensor(default_classes(num_classes)).repeat_interleave(8).to(dev)
    g = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, 0]).generate_state(1)[0]))
    grid_noise = torch.randn(len(grid_y), C, h, w, generator=g).to(dev)  # the DiT's start at t = 1
    grid_seed = int(torch.randint(2**31, (1,), generator=g))
    log_path = os.path.join(out_dir, "log.jsonl")  # one JSON object per step logged
    if dist.master:
        os.makedirs(out_dir, exist_ok=True)
    pbar = tqdm(total=max_steps, initial=step, disable=not dist.master, dynamic_ncols=True)
    first_step, t0 = step, time.time()
    n_skipped, skipped_in_a_row = 0, 0  # steps skipped for a non-finite loss or gradient: since the last row, in a row

    while step < max_steps:
        # learning rate of this step: linear warm-up, then constant
        step_lr = lr_at(step, lr, warmup_steps)
        for group in optimizer.param_groups:
            group["lr"] = step_lr

        # grad_accum micro-batches; DDP all-reduces the gradients on the last one only (see train_ae.py)
        mean_loss = 0.0  # this rank's mean over the micro-batches
        for micro in range(grad_accum):
            z2, y, _ = next(loader)  # z2 (B, 2, C, h, w) float16: each image's latent and its mirror image's
            pick = torch.randint(0, 2, (len(y),))  # the horizontal-flip augmentation: one of the two at random
            z = z2[torch.arange(len(y)), pick].to(dev, non_blocking=True).float()  # (B, C, h, w)
            z = (z - mean) / std  # per-channel zero mean, unit variance: the scale the noise has
            y = y.to(dev, non_blocking=True)
            sync = micro == grad_accum - 1 or not dist.ddp
            with (nullcontext() if sync else train_model.no_sync()), autocast:
                # the decoder's rectified-flow loss, here on latents with the class as the condition
                loss, *_ = flow_matching_loss(lambda x_t, t: train_model(x_t, t, y), z, t_dist)
            (loss / grad_accum).backward()
            mean_loss = mean_loss + loss.detach().float() / grad_accum

        # clip, AdamW step, then the EMA of the weights (what the grids and sample.py use), unless the
        # loss or a gradient is not finite: then the step is skipped and counted, and
        # max_nonfinite_steps in a row stop the run without saving (why and how: see train_ae.py)
        grad_norm = torch.nn.utils.clip_grad_norm_(net.parameters(), grad_clip)
        loss_nonfinite = common.all_reduce_sum((~torch.isfinite(mean_loss)).float(), dist)
        if torch.isfinite(grad_norm) and loss_nonfinite == 0:
            optimizer.step()
            update_ema(ema, net, ema_decay_at(step, ema_decay, warmup=10))
            skipped_in_a_row = 0
        else:
            n_skipped, skipped_in_a_row = n_skipped + 1, skipped_in_a_row + 1
            if skipped_in_a_row >= max_nonfinite_steps:
                pbar.close()  # the message on a line of its own
                raise SystemExit(f"error: {skipped_in_a_row} steps in a row (to step {step + 1}) had a non-finite loss "
                                 f"or gradient (--max-nonfinite-steps {max_nonfinite_steps}); stopped without saving, "
                                 f"so {ckpt_path} is left as it was. Lower --lr or check the latent cache.")
        optimizer.zero_grad(set_to_none=True)
        step += 1

        if step % log_every == 0 or step == max_steps:
            # the loss averaged over ranks: the whole global batch's, not rank 0's share
            row = {"loss": (common.all_reduce_sum(mean_loss, dist) / dist.world_size).item()}
            row["skipped_steps"] = n_skipped  # the same on every rank
            n_skipped = 0
            images_per_step = batch_size * grad_accum * dist.world_size
            row.update(step=step, lr=step_lr, grad_norm=grad_norm.item(),
                       img_per_s=(step - first_step) * images_per_step / (time.time() - t0))
            if dist.master:
                with open(log_path, "a") as f:
                    f.write(json.dumps(row) + "\n")
            pbar.set_postfix({k: f"{row[k]:.4g}" for k in ("loss", "img_per_s", "skipped_steps")})
        pbar.update(1)

        if (step % sample_every == 0 or step == max_steps) and dist.master:
            # guided Euler with the EMA DiT from the fixed noise, back to the encoder's scale, decode
            with autocast:
                z = euler_sample(lambda x_t, t: ema.forward_with_cfg(x_t, t, grid_y, cfg_scale), grid_noise, sample_steps)
                x = ae.decode(z.float() * std + mean, decode_steps or None, seed=grid_seed)  # (N, 3, H, W)
            save_image_grid(x, os.path.join(out_dir, f"samples_{step:06d}.png"), nrow=8)
        if step % ckpt_every == 0 or step == max_steps:
            common.save_training(
                ckpt_path, dist, "dit", step, net, ema, optimizer, loader, model_args=net.config, model_name=name,
                config=settings, ae_ckpt=stage1["ae_ckpt"], ae_step=stage1["ae_step"],
                ae_fingerprint=stage1["ae_fingerprint"], latent_shape=[C, h, w], latent_mean=latents.mean,
                latent_std=latents.std, num_classes=num_classes, class_names=meta["class_names"])
    pbar.close()
    if common.check_replicas_identical(net, dist) and dist.ddp:
        log(f"weights identical on all {dist.world_size} ranks")
    log(f"done: {ckpt_path}")
    common.shutdown(dist)


if __name__ == "__main__":
    with common.collective_timeouts():  # a rank that stopped responding: one line, not a traceback
        main()
