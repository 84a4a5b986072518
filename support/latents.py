"""
The latent cache: step 1 of stage 2 (train_dit.py), once per stage-1 checkpoint and dataset. Every
image and its mirror image are encoded with the stage-1 encoder (posterior mean) into a folder
(train_dit.py's cache_dir, out_dir/latents by default):
    meta.json            what the cache was built from: stage-1 encoder fingerprint (and its path
                         and step), dataset, resolution, image count. A mismatch is refused, never
                         used.
    shard_00000.pt, ...  shard_size images each: z (n, 2, C, h, w) float16 [image, mirror image],
                         labels y (n,), and per-channel sums for the statistics. Written atomically,
                         so an interrupted build keeps its finished shards and resumes after them.
    stats.pt             per-channel mean and std over all cached latents; written last.
Each time it is opened, the cache checks itself against meta.json: the shard list, each shard's
image count, keys and shapes, and stats.pt against the shards. Anything wrong is refused with one
line that names the file and what to delete; it is never trusted or rebuilt silently.
Shards are encoded in parallel across ranks under torchrun. Size: ImageNet train (1,281,167
images) at f32c16 (16 x 8 x 8 latents) is 1.28M x 2 x 1024 x 2 bytes = 5.2 GB in float16
(10.5 GB at f16c8). Training memory-maps the shards (LatentCache), so all ranks on a node share
one copy.

In reading order: what a cache is built from (stage1_info, cache_meta), the checks that opening
it makes (read_meta, open_shard, read_stats), the build (encode_shard, build_latent_cache), and
LatentCache, the dataset that training reads.
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

# -----------------------------------------------------------------------------
# what a cache is built from


def stage1_info(path):
    """(what the DiT needs to know about a stage-1 checkpoint, the checkpoint as read), without
    building the model (only a copy without storage, to check that the weights fit it). The file is
    read once: the caller builds the encoder and the decoder from the returned dict
    (checkpoints.dgae_from_checkpoint), so the fingerprint recorded is that of the weights used,
    even if the file is rewritten meanwhile."""
    if not os.path.isfile(path):
        raise SystemExit(f"error: stage-1 checkpoint {path} not found. Train one with train_ae.py "
                         "(it writes out/ae/ckpt.pt) or pass its path with --ae-ckpt PATH.")
    # a file of the wrong kind: ValueError, reported by user_errors
    ck = checkpoints.load_checkpoint(path, "ae", mmap=False)
    args = ck["model_args"]
    # the weights must fit the model that model_args describes. Checked now, before the cache's
    # meta.json is written (a cache recorded from a damaged file would be stale for the good one),
    # on a model without storage (meta device), so no second full model is built.
    cfg = checkpoints.config_from_dict(args)
    checkpoints.check_weights_fit(lambda: DGAE(cfg), ck["ema"], path)
    r, f = args["resolution"], args["compression"]
    return dict(ae_ckpt=os.path.abspath(path), ae_step=ck["step"],
                ae_fingerprint=checkpoints.encoder_fingerprint(ck["ema"]), resolution=r,
                latent_shape=[args["latent_channels"], r // f, r // f]), ck


def cache_meta(stage1, dataset, data, dataset_seed, shard_size):
    """The record of what a cache is built from; the keys in STALE_KEYS decide whether it is still
    valid."""
    names = list(getattr(dataset, "classes", None) or dataset.class_names)
    return dict(stage1, data=os.path.abspath(data) if data else "built-in",
                dataset_seed=None if data else dataset_seed, num_images=len(dataset),
                num_classes=len(names), class_names=names, shard_size=shard_size, dtype="float16")


# the stage-1 path and step are informative only: a moved but identical checkpoint keeps its cache
STALE_KEYS = ("ae_fingerprint", "resolution", "latent_shape", "data", "dataset_seed", "num_images",
              "shard_size", "dtype")


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
        if problem is None and (not _is_int(meta.get(k))
                                or meta[k] < (1 if k == "shard_size" else 0)):
            problem = f"{k} is {meta.get(k)!r}"
    shape = meta.get("latent_shape") if problem is None else None
    if problem is None and not (isinstance(shape, list) and len(shape) == 3
                                and all(_is_int(v) and v > 0 for v in shape)):
        problem = f"latent_shape is {shape!r}"
    if problem is not None:
        raise SystemExit(f"error: {path} is damaged ({problem}); delete the folder {cache} to "
                         "encode the latents again")
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
    fix = (f"delete {' and '.join(redo)} and run again to encode it again" if redo else
           "run again to encode it")
    fix += f", or delete the folder {cache} to encode all the latents again"
    if not os.path.exists(path):
        raise SystemExit(f"error: latent shard {path} is missing (meta.json lists {n_shards} "
                         f"shards for {meta['num_images']} images); {fix}")
    try:
        s = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # never relay torch's message: it suggests weights_only=False
        raise SystemExit(f"error: latent shard {path} cannot be read ({type(e).__name__}: damaged, "
                         f"truncated or not a shard); {fix}") from None
    C, h, w = meta["latent_shape"]
    if not isinstance(s, dict) or any(key not in s for key in SHARD_KEYS):
        found = sorted(s) if isinstance(s, dict) else type(s).__name__
        problem = f"holds {found}, not the keys {', '.join(SHARD_KEYS)}"
    else:
        m = len(s["y"]) if isinstance(s["y"], torch.Tensor) and s["y"].dim() == 1 else -1
        if not _tensor_is(s["z"], (m, 2, C, h, w), (torch.float16,)) or s["y"].dtype != torch.long:
            problem = (f"has z {tuple(getattr(s['z'], 'shape', ()))} "
                       f"{getattr(s['z'], 'dtype', '')} and y "
                       f"{tuple(getattr(s['y'], 'shape', ()))}, not z (n, 2, {C}, {h}, {w}) "
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
        raise SystemExit(f"error: {path} cannot be read ({type(e).__name__}: damaged, truncated or "
                         f"not a stats file); {fix}") from None
    C = meta["latent_shape"][0]
    if not isinstance(stats, dict) or any(key not in stats for key in STATS_KEYS):
        found = sorted(stats) if isinstance(stats, dict) else type(stats).__name__
        problem = f"holds {found}, not the keys {', '.join(STATS_KEYS)}"
    elif not all(_tensor_is(stats[key], (C,), (torch.float32,))
                 and bool(stats[key].isfinite().all())
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
    None if `stop` (checkpoints.StopSignals) received a signal first: the shard is dropped
    unfinished.

    Encoded in fp32 (no autocast): it happens once and the latents should be the encoder's own.
    """
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
    # statistics of exactly what training will read (the float16 values), in float64
    z64 = z.double()
    return dict(z=z, y=torch.cat(ys), sum=z64.sum((0, 1, 3, 4)), sumsq=z64.pow(2).sum((0, 1, 3, 4)),
                count=z64[:, :, 0].numel(), n_bad=batches.n_bad)


def build_latent_cache(cache, meta, dataset, load_ae, dist, batch_size=64, num_workers=0,
                       stop=None):
    """Step 1: encode `dataset` into `cache` (see the module docstring), resuming after finished
    shards.

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
        pbar = tqdm(total=sum(ranges[k][1] - ranges[k][0] for k in todo), disable=not dist.master,
                    desc="encoding latents" + (f" (rank 0 of {dist.world_size})"
                                               if dist.ddp else ""), dynamic_ncols=True)
        for k in todo:
            shard = encode_shard(ae, Subset(dataset, range(*ranges[k])), old["latent_shape"],
                                 batch_size, num_workers, pbar, stop)
            # a stop signal: keep the finished shards (at most one shard's work is lost)
            if shard is None:
                pbar.close()
                done = sum(os.path.exists(_shard(cache, j)) for j in range(len(ranges)))
                print(f"stopped by {stop.received} while encoding latents"
                      f"{f' (rank {dist.rank})' if dist.ddp else ''}: {done} of {len(ranges)} "
                      f"shards are complete in {cache}. Run the same command again to encode the "
                      f"rest (exit status {checkpoints.EXIT_STOPPED})", flush=True)
                # no collective: the other ranks stop on their own
                common.exit_now(dist, checkpoints.EXIT_STOPPED)
            # atomic: a shard file exists only when complete
            checkpoints.save_checkpoint(_shard(cache, k), shard)
        pbar.close()
    common.barrier(dist)
    # on every rank (see above); the shards are memory-mapped, so it is cheap
    shards = open_shards(cache, old)
    count, n_bad = sum(s["count"] for s in shards), sum(s["n_bad"] for s in shards)
    # not one readable image: no statistics (they would be NaN), and no empty shards kept
    if count == 0:
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


# -----------------------------------------------------------------------------
# the dataset that training reads


class LatentCache(Dataset):
    """The cached latents as a dataset: item i -> (z (2, C, h, w) float16 [image, mirror image],
    label).

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
