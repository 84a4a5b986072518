"""The latent cache, step 1 of stage 2 (train_dit.py): every image and its mirror image encoded once
by the stage-1 encoder (posterior mean) into a folder (--cache-dir, out_dir/latents by default):
    meta.json            what it was built from: stage-1 encoder fingerprint (path and step too),
                         dataset, resolution, image count. A mismatch is refused, never used.
    shard_00000.pt, ...  shard_size images each: z (n, 2, C, h, w) float16 [image, mirror image],
                         labels y (n,) and per-channel sums. Written atomically, so an interrupted
                         build keeps its finished shards and resumes after them.
    stats.pt             per-channel mean and std over all cached latents; written last.
Each time it is opened it checks itself against meta.json (the shard list, each shard's image
count, keys and shapes, stats.pt against the shards): anything wrong is one line naming the file
and what to delete, never trusted or rebuilt silently. Ranks encode shards in parallel. ImageNet
train at f32c16 (16 x 8 x 8 latents) is 1.28M x 2 x 1024 x 2 bytes = 5.2 GB (10.5 GB at f16c8);
training memory-maps the shards, so all ranks on a node share one copy.
"""

import bisect
import glob
import json
import os

import torch
from torch.utils.data import Dataset, Subset
from tqdm import tqdm

from ae import DGAE
from support import checkpoints, common
from support.data import InOrder, to_model_range, unreadable_error

# the stage-1 path and step are informative only: a moved but identical checkpoint keeps its cache
STALE_KEYS = ("ae_fingerprint", "resolution", "latent_shape", "data", "dataset_seed", "num_images",
              "shard_size", "dtype")
SHARD_KEYS = ("z", "y", "sum", "sumsq", "count", "n_bad")
STATS_KEYS = ("mean", "std", "count", "n_bad")

# -----------------------------------------------------------------------------
# what a cache is built from


def stage1_info(path):
    """(what the DiT needs to know about a stage-1 checkpoint, the checkpoint as read). The file is
    read once and the caller builds the models from the returned dict, so the fingerprint recorded
    is that of the weights used, even if the file is rewritten meanwhile."""
    if not os.path.isfile(path):
        raise SystemExit(f"error: stage-1 checkpoint {path} not found. Train one with train_ae.py "
                         "(it writes out/ae/ckpt.pt) or pass its path with --ae-ckpt PATH.")
    ck = checkpoints.load_checkpoint(path, "ae", mmap=False)  # the wrong kind of file: ValueError
    args = ck["model_args"]
    # the weights must fit the model before meta.json records them (a cache recorded from a damaged
    # file would be stale for the good one); checked on the meta device, so no second model is built
    cfg = checkpoints.config_from_dict(args)
    checkpoints.check_weights_fit(lambda: DGAE(cfg), ck["ema"], path)
    r, f = args["resolution"], args["compression"]
    return dict(ae_ckpt=os.path.abspath(path), ae_step=ck["step"],
                ae_fingerprint=checkpoints.encoder_fingerprint(ck["ema"]), resolution=r,
                latent_shape=[args["latent_channels"], r // f, r // f]), ck


def cache_meta(stage1, dataset, data, dataset_seed, shard_size):
    """The record of what a cache is built from (meta.json)."""
    names = list(getattr(dataset, "classes", None) or dataset.class_names)
    return dict(stage1, data=os.path.abspath(data) if data else "built-in",
                dataset_seed=None if data else dataset_seed, num_images=len(dataset),
                num_classes=len(names), class_names=names, shard_size=shard_size, dtype="float16")


def _shard(cache, k):
    return os.path.join(cache, f"shard_{k:05d}.pt")


def shard_ranges(meta):
    """The image range [lo, hi) of each shard that meta.json's num_images and shard_size imply."""
    n, size = meta["num_images"], meta["shard_size"]
    return [(lo, min(n, lo + size)) for lo in range(0, n, size)]


# -----------------------------------------------------------------------------
# the checks made each time the cache is opened


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _tensor_is(t, shape, dtypes):
    return isinstance(t, torch.Tensor) and tuple(t.shape) == tuple(shape) and t.dtype in dtypes


def _meta_problem(meta):
    """What is wrong with meta.json's contents, or None."""
    if not isinstance(meta, dict):
        return f"holds a JSON {type(meta).__name__}, not an object"
    for k, least in (("num_images", 0), ("shard_size", 1)):
        if not _is_int(meta.get(k)) or meta[k] < least:
            return f"{k} is {meta.get(k)!r}"
    shape = meta.get("latent_shape")
    if not (isinstance(shape, list) and len(shape) == 3
            and all(_is_int(v) and v > 0 for v in shape)):
        return f"latent_shape is {shape!r}"


def read_meta(cache):
    """The cache's meta.json, or a one-line refusal if it is damaged."""
    path = os.path.join(cache, "meta.json")
    try:
        with open(path) as fh:
            meta = json.load(fh)
        problem = _meta_problem(meta)
    except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        problem = e.strerror if isinstance(e, OSError) else f"{type(e).__name__}: {e}"
    if problem is not None:
        raise SystemExit(f"error: {path} is damaged ({problem}); delete the folder {cache} to "
                         "encode the latents again")
    return meta


def _load(name, path, kind, keys, fix, mmap=False):
    """torch.load of a cache file holding `keys`, or a one-line refusal naming it."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # never relay torch's message: it suggests weights_only=False
        raise SystemExit(f"error: {name} cannot be read ({type(e).__name__}: damaged, truncated or "
                         f"not {kind}); {fix}") from None
    if not isinstance(obj, dict) or any(key not in obj for key in keys):
        found = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
        raise SystemExit(f"error: {name} is damaged (holds {found}, not the keys "
                         f"{', '.join(keys)}); {fix}")
    return obj


def open_shard(cache, meta, k):
    """Shard k, memory-mapped, once it is checked against meta.json; else a one-line refusal."""
    path = _shard(cache, k)
    name = f"latent shard {path}"
    (lo, hi), n_shards = shard_ranges(meta)[k], len(shard_ranges(meta))
    # the way out: encode that shard again (the build does it once stats.pt is gone), or everything
    redo = [p for p in (path, os.path.join(cache, "stats.pt")) if os.path.exists(p)]
    fix = (f"delete {' and '.join(redo)} and run again to encode it again" if redo else
           "run again to encode it")
    fix += f", or delete the folder {cache} to encode all the latents again"
    if not os.path.exists(path):
        raise SystemExit(f"error: {name} is missing (meta.json lists {n_shards} shards for "
                         f"{meta['num_images']} images); {fix}")
    s = _load(name, path, "a shard", SHARD_KEYS, fix, mmap=True)
    C, h, w = meta["latent_shape"]
    m = len(s["y"]) if isinstance(s["y"], torch.Tensor) and s["y"].dim() == 1 else -1
    if not _tensor_is(s["z"], (m, 2, C, h, w), (torch.float16,)) or s["y"].dtype != torch.long:
        problem = (f"has z {tuple(getattr(s['z'], 'shape', ()))} {getattr(s['z'], 'dtype', '')} "
                   f"and y {tuple(getattr(s['y'], 'shape', ()))}, not z (n, 2, {C}, {h}, {w}) "
                   "float16 and y (n,) int64")
    elif not all(_tensor_is(s[key], (C,), (torch.float64,)) for key in ("sum", "sumsq")) \
            or s["count"] != m * 2 * h * w or not _is_int(s["n_bad"]):
        problem = "has sums or counts that do not fit its latents"
    elif m + s["n_bad"] != hi - lo:
        problem = (f"holds {m} latents and {s['n_bad']} skipped images, but meta.json gives it "
                   f"images {lo}..{hi - 1} ({hi - lo})")
    elif m and not 0 <= int(s["y"].min()) <= int(s["y"].max()) < meta["num_classes"]:
        problem = (f"has class labels {int(s['y'].min())}..{int(s['y'].max())}, outside the "
                   f"{meta['num_classes']} classes of meta.json")
    else:
        return s
    raise SystemExit(f"error: {name} is damaged ({problem}); {fix}")


def open_shards(cache, meta):
    """Every shard meta.json lists, checked (a stray extra shard_*.pt file is not read)."""
    return [open_shard(cache, meta, k) for k in range(len(shard_ranges(meta)))]


def read_stats(cache, meta, shards):
    """stats.pt, checked against the shards it was computed from; else a one-line refusal."""
    path = os.path.join(cache, "stats.pt")
    fix = "delete it and run again to compute it again from the shards (nothing is encoded again)"
    stats = _load(path, path, "a stats file", STATS_KEYS, fix)
    C = meta["latent_shape"][0]
    if not all(_tensor_is(stats[key], (C,), (torch.float32,)) and bool(stats[key].isfinite().all())
               for key in ("mean", "std")) or bool((stats["std"] < 0).any()):
        problem = f"mean and std must be {C} finite float32 values (std >= 0)"
    elif (stats["count"] != sum(s["count"] for s in shards)
          or stats["n_bad"] != sum(s["n_bad"] for s in shards)):
        problem = "its counts do not match the shards"
    else:
        return stats
    raise SystemExit(f"error: {path} is damaged ({problem}); {fix}")


# -----------------------------------------------------------------------------
# the build: every rank encodes its share of the shards, then rank 0 writes stats.pt


@torch.no_grad()
def encode_shard(ae, subset, latent_shape, batch_size, num_workers, pbar, stop=None):
    """Posterior means of the images in `subset` and of their mirror images, with per-channel sums;
    None if `stop` (checkpoints.StopSignals) received a signal first. In fp32 (no autocast): it
    happens once, and the latents should be the encoder's own."""
    dev = next(ae.parameters()).device
    batches = InOrder(subset, batch_size, num_workers, pin_memory=dev.type == "cuda")
    zs, ys = ([torch.zeros(0, 2, *latent_shape, dtype=torch.float16)],
              [torch.zeros(0, dtype=torch.long)])
    for x, y in batches:
        if stop is not None and stop.received:
            return None
        x = to_model_range(x.to(dev, non_blocking=True))  # (B, 3, H, W) in [-1, 1]
        z = ae.encode(torch.cat([x, x.flip(-1)]))  # (2B, C, h, w): images, then their mirror images
        if not z.isfinite().all() or z.abs().max() > 60000:
            raise ValueError("latent values non-finite or beyond the float16 range; "
                             "the stage-1 encoder has diverged")
        zs.append(torch.stack(z.chunk(2), dim=1).half().cpu())  # (B, 2, C, h, w)
        ys.append(y)
        pbar.update(len(y))
    pbar.update(batches.n_bad)  # the progress bar counts images, read or skipped
    z = torch.cat(zs)
    z64 = z.double()  # statistics of exactly what training reads (the float16 values), in float64
    return dict(z=z, y=torch.cat(ys), sum=z64.sum((0, 1, 3, 4)), sumsq=z64.pow(2).sum((0, 1, 3, 4)),
                count=z64[:, :, 0].numel(), n_bad=batches.n_bad)


def build_latent_cache(cache, meta, dataset, load_ae, dist, batch_size=64, num_workers=0,
                       stop=None):
    """Encode `dataset` into `cache`, resuming after the finished shards: rank r encodes shards r,
    r + W, ..., then rank 0 combines their sums into stats.pt. load_ae() builds the stage-1 model,
    only if a shard is missing. Every rank checks the same files, so a refusal stops them all."""
    meta_path, stats_path = os.path.join(cache, "meta.json"), os.path.join(cache, "stats.pt")
    # latents without a meta.json: what they were encoded from is unknown, so they cannot be used
    orphans = not os.path.exists(meta_path) and (
        os.path.exists(stats_path) or glob.glob(os.path.join(cache, "shard_*.pt")))
    common.barrier(dist)  # every rank has looked before rank 0 writes a meta.json
    if orphans:
        raise SystemExit(f"error: the latent cache {cache} has latent files but no meta.json, so "
                         f"what they were encoded from is unknown; delete the folder {cache} to "
                         "encode the latents again")
    if dist.master and not os.path.exists(meta_path):
        os.makedirs(cache, exist_ok=True)
        checkpoints.write_text(meta_path, json.dumps(meta, indent=1))
    common.barrier(dist)
    old = read_meta(cache)
    stale = [k for k in STALE_KEYS if old.get(k) != meta[k]]
    if stale:
        raise SystemExit(f"error: the latent cache {cache} is stale: it was built from "
                         f"{old.get('ae_ckpt')} (step {old.get('ae_step')}) and {old.get('data')}, "
                         "and differs now in: "
                         + ", ".join(f"{k} (was {old.get(k)}, now {meta[k]})" for k in stale)
                         + f". Delete {cache} or pass another --cache-dir to encode again.")
    if os.path.exists(stats_path):
        return  # complete; LatentCache checks it against meta.json when it opens it
    ranges = shard_ranges(old)
    todo = [k for k in range(dist.rank, len(ranges), dist.world_size)
            if not os.path.exists(_shard(cache, k))]
    if todo:
        ae = load_ae()
        rank_note = f" (rank 0 of {dist.world_size})" if dist.ddp else ""
        pbar = tqdm(total=sum(ranges[k][1] - ranges[k][0] for k in todo), disable=not dist.master,
                    desc="encoding latents" + rank_note, dynamic_ncols=True)
        for k in todo:
            shard = encode_shard(ae, Subset(dataset, range(*ranges[k])), old["latent_shape"],
                                 batch_size, num_workers, pbar, stop)
            if shard is None:  # a stop signal: keep the finished shards, drop this one
                pbar.close()
                done = sum(os.path.exists(_shard(cache, j)) for j in range(len(ranges)))
                print(f"stopped by {stop.received} while encoding latents"
                      f"{f' (rank {dist.rank})' if dist.ddp else ''}: {done} of {len(ranges)} "
                      f"shards are complete in {cache}. Run the same command again to encode the "
                      f"rest (exit status {checkpoints.EXIT_STOPPED})", flush=True)
                # no collective: the other ranks stop on their own
                common.exit_now(dist, checkpoints.EXIT_STOPPED)
            checkpoints.save_checkpoint(_shard(cache, k), shard)  # atomic: a file only when whole
        pbar.close()
    common.barrier(dist)
    shards = open_shards(cache, old)  # on every rank (see above); memory-mapped, so cheap
    count, n_bad = sum(s["count"] for s in shards), sum(s["n_bad"] for s in shards)
    if count == 0:  # not one readable image: no (NaN) statistics, and no empty shards kept
        common.barrier(dist)  # every rank has read the shards before rank 0 removes them
        if dist.master:
            for k in range(len(shards)):
                os.remove(_shard(cache, k))
        raise unreadable_error(dataset, old["num_images"])
    if dist.master:
        mean = sum(s["sum"] for s in shards) / count  # (C,) float64
        std = (sum(s["sumsq"] for s in shards) / count - mean ** 2).clamp_min(0).sqrt()
        checkpoints.save_checkpoint(stats_path, dict(mean=mean.float(), std=std.float(),
                                                     count=count, n_bad=n_bad))
        print(f"latent cache complete: {cache}"
              + (f" ({n_bad} unreadable images skipped)" if n_bad else ""), flush=True)
    common.barrier(dist)


class LatentCache(Dataset):
    """The checked cache as a dataset: item i -> (z (2, C, h, w) float16 [image, mirror image],
    label). Shards are memory-mapped: the OS pages them in on demand, shared by a node's ranks."""

    def __init__(self, cache):
        meta = read_meta(cache)
        self.shards = open_shards(cache, meta)
        stats = read_stats(cache, meta, self.shards)
        self.mean, self.std = stats["mean"], stats["std"]  # (C,) each
        # training divides by std: a channel with std 0 (constant) would make every DiT step NaN
        bad = (~(self.mean.isfinite() & self.std.isfinite()
                 & (self.std > 0))).nonzero().flatten().tolist()
        if bad:
            raise ValueError(f"{os.path.join(cache, 'stats.pt')}: latent channel(s) {bad} have std "
                             "0 or a non-finite mean or std, which would make every DiT step NaN; "
                             f"delete {cache} to encode again, and if that recurs, the stage-1 "
                             "encoder leaves the channel unused: train it longer")
        self.ends = [int(x) for x in torch.tensor([len(s["y"]) for s in self.shards]).cumsum(0)]

    def __len__(self):
        return self.ends[-1]

    def __getitem__(self, i):
        k = bisect.bisect_right(self.ends, i)  # the shard that holds item i
        j = i - (self.ends[k - 1] if k else 0)
        return self.shards[k]["z"][j], int(self.shards[k]["y"][j])
