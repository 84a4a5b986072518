"""
The images eval.py scores (ImageSource: an .npz, a folder, or held-out built-in images), how the
ranks share them (each takes a contiguous run of the single-process batches, and the results are
gathered back in rank order, so rank 0 sees a single process's arrays on any number of GPUs), and
what eval.py writes and checks: its results file and table, the reference statistics, the report's
entries with a note where a number means nothing.
"""

import json
import math
import os
import zipfile

import numpy as np
import torch
import torch.distributed as torch_dist
from torch.utils.data import Subset
from tqdm import tqdm

from support import checkpoints, common
from support.data import ImageFolderDataset, InOrder, unreadable_error
from support.metrics import feature_stats, inception_score
from support.procedural import ProceduralDataset

# the widths of the three InceptionV3 feature sets (inception.py): FID, sFID, IS
FEATURE_DIMS = {"pool": 2048, "spatial": 2023, "logits": 1008}

# Held-out images: the built-in dataset with this seed. train_ae.py draws its images from --seed
# (default 0), so a run never trains on these.
HELDOUT_SEED = 999_999
HELDOUT_SIZE = 500  # images scored when --data is empty and --num-images is 0

# -----------------------------------------------------------------------------
# image sources


def to_pixels(x):
    """(B, 3, H, W) in [-1, 1] -> the uint8 values a PNG would store, as floats in [0, 255]."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round()


def require_zip(path):
    """Refuse, in one line, an .npz that is not a zip archive (what np.savez writes)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path} is not an .npz file (not a zip archive); write it with np.savez "
                         "(sample.py --num-samples does) or pass a folder of images")


class ImageSource:
    """Images from an .npz (arr_0: (N, H, W, 3) uint8), a folder (ADM center crop to `res`, read by
    `num_workers` loader processes; unreadable files skipped and counted in n_bad), or, for recon
    with no path, the first `builtin_limit` (0: HELDOUT_SIZE) held-out built-in images. An .npz is
    streamed (50K 256^2 samples are 9.8 GB): each rank seeks to its shard inside the uncompressed
    arr_0.npy member and reads one batch at a time."""

    def __init__(self, path, res, num_workers=0, builtin_limit=None):
        self.path, self.n_bad, self.num_workers, self.first = path, 0, num_workers, None
        if not path and builtin_limit is not None:  # recon without --data: held-out built-in images
            self.dataset = ProceduralDataset(res, size=builtin_limit or HELDOUT_SIZE,
                                             seed=HELDOUT_SEED)
            self.n = len(self.dataset)
        elif path.endswith(".npz"):
            require_zip(path)
            with zipfile.ZipFile(path) as zf:
                if "arr_0.npy" not in zf.namelist():
                    raise ValueError(f"{path} has no arr_0 (images); it holds {zf.namelist()}")
                with zf.open("arr_0.npy") as f:
                    fmt = np.lib.format
                    read_header = (fmt.read_array_header_1_0 if fmt.read_magic(f) == (1, 0)
                                   else fmt.read_array_header_2_0)
                    self.shape, fortran, dtype = read_header(f)
                    self.offset = f.tell()
            if fortran or dtype != np.uint8 or len(self.shape) != 4 or self.shape[3] != 3:
                raise ValueError(f"{path}: arr_0 must be a C-order (N, H, W, 3) uint8 array, got "
                                 f"{self.shape} {dtype}")
            # 0 x 0 images: no network or metric takes them
            if self.shape[0] and 0 in self.shape[1:3]:
                raise ValueError(f"{path}: its images are {self.shape[1]} x {self.shape[2]} pixels "
                                 f"(arr_0 {self.shape}); write the samples again "
                                 "(sample.py --num-samples)")
            self.dataset, self.n = None, self.shape[0]
        else:  # evaluation: root/val, never root/train
            self.dataset = ImageFolderDataset(path, res, split="val")
            self.n = len(self.dataset)

    def count(self, limit):
        """How many images --num-images `limit` uses: the first `limit`, or all if it is 0."""
        return self.n if limit <= 0 else min(limit, self.n)

    def shard(self, limit, bs, dist):
        """This rank's index range [lo, hi) of the first `limit` (0 = all) images: whole batches of
        the single-process batching, so that recon's per-batch decoder seeds, and the numbers, do
        not depend on the world size."""
        n = self.count(limit)
        n_batches = math.ceil(n / bs)
        lo, hi = (n_batches * r // dist.world_size for r in (dist.rank, dist.rank + 1))
        return min(lo * bs, n), min(hi * bs, n)

    def batches(self, lo, hi, bs, labels=False):
        """Images lo..hi-1 as (B, 3, H, W) floats in [0, 255] (unreadable ones skipped); with
        labels, (images, their classes (B,)), which a folder or the built-in data has. .first:
        the index of the batch just given (InOrder.first: a skipped batch moves no other)."""
        if self.dataset is None:
            if labels:
                raise ValueError(f"{self.path}: an .npz of images holds no classes; give a folder "
                                 "with one sub-folder per class")
            item = int(np.prod(self.shape[1:]))  # bytes per image
            with zipfile.ZipFile(self.path) as zf, zf.open("arr_0.npy") as f:
                f.seek(self.offset + lo * item)
                for i in range(lo, hi, bs):
                    b = min(bs, hi - i)
                    arr = np.frombuffer(f.read(b * item), np.uint8).reshape(b, *self.shape[1:])
                    self.first = i
                    yield torch.from_numpy(arr.copy()).permute(0, 3, 1, 2).float()
        else:
            shard = InOrder(Subset(self.dataset, range(lo, hi)), bs, self.num_workers)
            for x, y in shard:
                x = x.float() if x.dtype == torch.uint8 else to_pixels(x)
                self.first = lo + shard.first
                yield (x, y) if labels else x
            self.n_bad += shard.n_bad


def at_least_two(source, flag, limit=0, needs="FID statistics need"):
    """Refuse, in one line naming the input, fewer than 2 images, of which FID statistics (a mean
    and a covariance) would be NaN or a traceback. `needs`: what needs the two."""
    n = source.count(limit)
    if n < 2:
        raise ValueError(f"{flag} {source.path}: {n} image{'' if n == 1 else 's'}; {needs} at "
                         "least 2 (the ImageNet protocol uses 50K)")
    return source


# -----------------------------------------------------------------------------
# what the ranks computed, back in one place


def gather_rows(parts, width, dist):
    """This rank's list of row arrays concatenated, then all ranks' in rank order (global order)."""
    a = np.concatenate(parts) if parts else np.zeros((0,) + width, np.float32)
    if not dist.ddp:
        return a
    everything = [None] * dist.world_size
    torch_dist.all_gather_object(everything, a)
    return np.concatenate(everything)


def total(count, dist):
    """A count summed over the ranks."""
    return int(common.all_reduce_sum(torch.tensor([count], device=dist.device), dist).item())


def readable_or_refuse(source, n_read, n_tried, dist, at_least=1, needs="FID statistics need"):
    """Refuse, on every rank, a source of which fewer than `at_least` images could be read (none
    would give made-up numbers, one NaN FID statistics). n_read: the global count; n_tried: this
    rank's share; `needs`: what needs them."""
    if n_read >= at_least:
        return
    tried = total(n_tried, dist)
    if n_read == 0 and source.dataset is not None:
        raise unreadable_error(source.dataset, tried)
    what = (f"only {n_read} of its {tried} images could be read (the warnings above say why)"
            if n_read < tried else f"{n_read} image{'' if n_read == 1 else 's'}")
    raise ValueError(f"{source.path or 'the held-out built-in images'}: {what}; {needs} at least "
                     f"{at_least}")


@torch.no_grad()
def inception_features(source, model, dist, batch_size, limit=0, desc=""):
    """Pool, spatial and logit features of the first `limit` (0 = all) images, gathered."""
    lo, hi = source.shard(limit, batch_size, dist)
    feats = {k: [] for k in FEATURE_DIMS}
    batches = tqdm(source.batches(lo, hi, batch_size), total=math.ceil((hi - lo) / batch_size),
                   desc=desc, disable=not dist.master)
    for x in batches:
        for k, v in model(x.to(dist.device) / 255).items():
            feats[k].append(v.float().cpu().numpy())
    feats = {k: gather_rows(v, (FEATURE_DIMS[k],), dist) for k, v in feats.items()}
    readable_or_refuse(source, len(feats["pool"]), hi - lo, dist, at_least=2)  # FID statistics
    return feats


# -----------------------------------------------------------------------------
# what eval.py reports and checks: its results file and table, the FID statistics' entries


def table_path(path):
    """The .txt table written beside the results file `path`."""
    return os.path.splitext(path)[0] + ".txt"


def write_results(results, path):
    """The results as JSON at `path`, and as a two-column table beside it (.txt) and on stdout."""
    checkpoints.write_text(path, json.dumps(results, indent=2))  # atomic: never half a file
    width = max(len(k) for k in results)

    def show(v):
        if isinstance(v, dict):  # e.g. the skipped metrics and why
            return "; ".join(f"{k}: {w}" for k, w in v.items())
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    table = "\n".join(f"{k:<{width}}  {show(v)}" for k, v in results.items())
    checkpoints.write_text(table_path(path), table + "\n")
    print(table)
    print(f"wrote {path}")


def stats_of(feats, device="cpu"):
    """FID statistics (mu, sigma) and sFID statistics (mu_s, sigma_s): the reference format."""
    mu, sigma = feature_stats(feats["pool"], device)
    mu_s, sigma_s = feature_stats(feats["spatial"], device)
    return {"mu": mu.numpy(), "sigma": sigma.numpy(),
            "mu_s": mu_s.numpy(), "sigma_s": sigma_s.numpy()}


def frechet_entries(name, value, counts, dims):
    """{name: value, name_note: why it means nothing, if it does not}: fewer than `dims` images on a
    side (counts: {what: number}) make the covariance singular; a negative value (round-off on
    singular covariances) is reported as None, never as a result, nor clamped to 0."""
    why = [f"{n} {what}, fewer than the {dims} feature dimensions (the covariance is singular; the "
           "protocol uses 50,000)" for what, n in counts.items() if n < dims]
    if value < 0:
        why.append(f"computed {value:.4g}, below 0, which a distance cannot be (round-off)")
    entries = {name: None if value < 0 else value}
    if why:
        entries[f"{name}_note"] = "not meaningful: " + "; ".join(why)
    return entries


def inception_score_entries(logits, splits=10):
    """The Inception Score (mean, std over `splits` chunks), with a note where a chunk holds a
    single image, whose score is exactly 1."""
    mean, std = inception_score(logits, splits)
    entries = {"inception_score": mean, "inception_score_std": std}
    if len(logits) < 2 * splits:
        entries["inception_score_note"] = (
            f"not meaningful: {len(logits)} samples in {min(splits, len(logits))} splits, some of "
            f"a single image, which scores exactly 1 (the protocol: {splits} splits of 5,000)")
    return entries


def check_reference_stats(path, stats):
    """Refuse, in one line naming the file, FID statistics that cannot give a number: a mean without
    its covariance (or the reverse), strings, unpaired shapes, or a value that is not finite."""
    for m, s in (("mu", "sigma"), ("mu_s", "sigma_s")):
        if (m in stats) != (s in stats):
            raise SystemExit(f"error: --ref {path} has {m if m in stats else s} but not "
                             f"{s if m in stats else m}; FID statistics need both (eval.py stats "
                             "writes them)")
        if m not in stats:
            continue
        mu, sigma = stats[m], stats[s]
        if mu.dtype.kind not in "fiu" or sigma.dtype.kind not in "fiu":
            raise SystemExit(f"error: --ref {path}: {m}/{s} are not numbers ({mu.dtype}, "
                             f"{sigma.dtype})")
        if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
            raise SystemExit(f"error: --ref {path}: {m} {mu.shape} and {s} {sigma.shape} do not "
                             "pair; a mean (D,) and a covariance (D, D) are needed")
        if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
            raise SystemExit(f"error: --ref {path}: {m} or {s} holds a value that is not finite; "
                             "recompute the reference with eval.py stats")


def labelled_samples(path):
    """(ImageSource, labels (N,) long) of one .npz of sample.py --num-samples; refused in one line
    if it is not one."""
    if not path.endswith(".npz"):
        raise SystemExit("classes needs --samples, an .npz of samples and their labels (sample.py "
                         f"--num-samples writes one), or several joined by commas; got {path!r}")
    require_zip(path)
    with np.load(path) as f:
        if "labels" not in f.files:
            raise SystemExit(f"--samples {path} has no labels; classes needs the .npz of "
                             "sample.py --num-samples")
        labels = f["labels"]
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise SystemExit(f"--samples {path}: labels of shape {labels.shape} and type "
                         f"{labels.dtype}; classes needs one whole-number label per image, shape "
                         "(N,), as sample.py --num-samples writes them")
    source = ImageSource(path, 0)
    if len(labels) != source.n or source.n == 0:
        raise SystemExit(f"--samples {path}: {source.n} images and {len(labels)} labels; "
                         "classes needs one label per image")
    return source, torch.from_numpy(labels).long()


def sample_files(arg):
    """eval.py classes' --samples as a list: one .npz, or several joined by commas (a file whose
    name holds a comma counts as one); each file once."""
    if not arg or os.path.isfile(arg):
        return [arg]
    paths = [p.strip() for p in arg.split(",")]
    if "" in paths:
        raise SystemExit(f"error: --samples {arg}: an empty name between commas; join the .npz "
                         "files with single commas")
    return list(dict.fromkeys(paths))
