"""
Datasets and the data loader shared by every script of the pipeline.

train_ae.py, train_dit.py (latent caching), sample.py (reconstructions) and eval.py (rFID)
all read images through this file, so they all see the same pixels:

- build_dataset: --data "" is the built-in ProceduralDataset of coloured shapes and textures
  (procedural.py), any other --data an ImageFolderDataset.
- ImageFolderDataset: an ImageNet-style folder (`train/<class>/*.JPEG`) with the ADM center
  crop. Unreadable files, and images too large to decode or crop safely (MAX_IMAGE_PIXELS,
  MAX_ASPECT_RATIO), are reported and skipped (the item is None), never a crash; a folder where
  none can be read is a one-line error (unreadable_error), not an empty run.
- collate_skip_bad: batches the good items and counts the bad ones; the two iterators below add
  the counts up in their `.n_bad`, the one number a script reports.
- InOrder: one pass over a fixed set of images, in order (the latent cache, evaluation).
- Loader: an infinite, resumable, per-rank batch iterator. Its state_dict() goes into the
  checkpoint so that `--resume` replays exactly the batches the interrupted run would have seen.
- random_hflip: the training augmentation, applied to the batch in the trainer so that it draws
  from the (checkpointed) global torch RNG instead of from worker processes.
- first_good, to_uint8, save_image_grid, default_classes: images going out (grids, uint8 arrays)
  and the classes a sample grid shows.

Images are float32 tensors (3, H, W) in [-1, 1]; labels are Python ints.
"""

import math
import os
import stat
import sys
import warnings

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from support.checkpoints import atomic_write, loader_worker_init
from support.procedural import ProceduralDataset

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")

# -----------------------------------------------------------------------------
# ImageNet-style image folders


# Single-channel 16-bit modes (a 16-bit greyscale PNG opens as I;16, as I in older Pillows).
# convert("RGB") clips their 0..65535 values at 255, so such an image would become near-white.
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def to_rgb(pil_image):
    """A PIL image as 8-bit RGB; 16-bit greyscale is scaled 0..65535 -> 0..255 first (v / 257)."""
    if pil_image.mode in SIXTEEN_BIT_MODES:
        arr = np.asarray(pil_image).astype(np.float64)  # uint16 (I;16) or int32 (I)
        pil_image = Image.fromarray(np.clip(np.rint(arr / 257), 0, 255).astype(np.uint8))  # mode L
    return pil_image if pil_image.mode == "RGB" else pil_image.convert("RGB")


def center_crop_arr(pil_image, image_size):
    """ADM center crop (guided-diffusion, image_datasets.py) -> np.uint8
    (image_size, image_size, 3).

    The field's standard preprocessing for ImageNet 256 (ADM, DiT, and the rFID protocol), kept
    identical so numbers are comparable: halve with a BOX filter while the short side is still
    >= 2x the target (cheap and alias-free for huge JPEGs), then one BICUBIC resize that makes
    the short side exactly image_size, then cut the central square.
    """
    pil_image = to_rgb(pil_image)
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(s // 2 for s in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(s * scale) for s in pil_image.size),
                                 resample=Image.BICUBIC)
    arr = np.array(pil_image)  # (h, w, 3); PIL sizes are (w, h)
    top = (arr.shape[0] - image_size) // 2
    left = (arr.shape[1] - image_size) // 2
    return arr[top: top + image_size, left: left + image_size]


def _is_image(name):
    return name.lower().endswith(IMG_EXTENSIONS) and not name.startswith(".")


# The largest image (width x height) decoded. Image.open reads only the header, so the size of a
# larger file is known before any pixel is decoded: such a file is skipped like an unreadable one.
# A 12000 x 12000 PNG takes 1.8 GB to decode for one item; ImageNet's largest photos are ~ 20 MP.
# (PIL's own guard, Image.MAX_IMAGE_PIXELS = 89 MP, only warns below 179 MP and then decodes.)
MAX_IMAGE_PIXELS = 8192 * 8192
# The longest side an image may have, in units of its shortest (read from the header too). The crop
# first resizes the short side to the resolution, so a 1 x 10000 PNG (35 KB, well under
# MAX_IMAGE_PIXELS) would become 256 x 2,560,000 pixels: 6.5 GB for one item. At 32:1 the resize
# holds at most 32 x resolution^2 pixels (6 MB at 256 px), and photos, panoramas included, stay
# below it.
MAX_ASPECT_RATIO = 32
# unreadable images named in a warning, per process; the rest are only counted
MAX_IMAGE_WARNINGS = 20


def _regular_file(path):
    """True for a regular file (or a link to one): a FIFO or a device named like an image would
    block or never end a read."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:  # a broken link, a file removed meanwhile: not an image to read
        return False


def _images_under(top, walked):
    """Image files under the folder `top`, following links to folders, each real folder once (those
    in `walked`, other than top itself, are skipped; the ones read here are added to it)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(top, followlinks=True):
        real = os.path.realpath(dirpath)
        if dirpath != top and real in walked:
            dirnames[:] = []  # nor anything below it
            continue
        walked.add(real)
        found += [os.path.join(dirpath, f) for f in filenames
                  if _is_image(f) and _regular_file(os.path.join(dirpath, f))]
    return found


class ImageTooLarge(ValueError):
    pass


def unreadable_error(dataset, tried, in_a_row=False):
    """The one-line refusal of a dataset whose images cannot be read: the first `tried` failed, or
    (in_a_row: a loader, whose epochs repeat images) `tried` draws in a row failed; each failure was
    reported with a warning. A SystemExit, so it reads the same in any script."""
    where = getattr(dataset, "root", "the dataset")
    what = (f"{tried} of its {len(dataset)} images in a row could not be read" if in_a_row else
            f"none of its {tried} images could be read" if tried >= len(dataset) else
            f"none of its first {tried} images (of {len(dataset)}) could be read")
    return SystemExit(f"error: {where}: {what} (the warnings above say why); fix or replace the "
                      "files, or pass another folder")


_EXPECTED = ("expected an ImageNet-style folder: <root>/train/<class>/*.JPEG "
             "(or <root>/<class>/*.JPEG, or a flat folder of images); set it with --data")


class ImageFolderDataset(Dataset):
    """Images under `root/<split>/<class>/` (or `root/<class>/`, or flat `root/`), ADM
    center-cropped.
    split: "train" for training; evaluation reads "val" (an ImageNet root holds both)."""

    def __init__(self, root, resolution, split="train"):
        if not os.path.isdir(root):
            raise FileNotFoundError(f"--data {root!r}: no such folder; {_EXPECTED}")
        base = os.path.join(root, split) if os.path.isdir(os.path.join(root, split)) else root
        self.root, self.resolution = base, resolution
        # classes = sorted sub-folder names, so label k means the same class on every machine
        # (for ImageNet: the sorted wnids n01440764, ... -> 0..999, the usual indexing)
        subdirs = sorted(d for d in os.listdir(base)
                         if not d.startswith(".") and os.path.isdir(os.path.join(base, d)))
        samples = []
        # every real folder is read once: the root and the class folders count as read, so a link up
        # to them (`up -> ..`) is not walked into another class's label, nor a link loop for ever
        walked = ({os.path.realpath(base)}
                  | {os.path.realpath(os.path.join(base, d)) for d in subdirs})
        for label, d in enumerate(subdirs):
            found = _images_under(os.path.join(base, d), walked)
            # sorted: same order on every machine
            samples += [(path, label) for path in sorted(found)]
        if samples:
            self.classes = subdirs
        else:
            # no class folders with images: a flat folder (e.g. ImageNet val as 50K loose JPEGs)
            # is one class with label 0; eval.py and sample.py read such folders.
            self.classes = [os.path.basename(os.path.normpath(base))]
            samples = [(os.path.join(base, f), 0) for f in sorted(os.listdir(base))
                       if _is_image(f) and _regular_file(os.path.join(base, f))]
        if not samples:
            raise ValueError(f"--data {root!r}: found no images ({', '.join(IMG_EXTENSIONS)}) "
                             f"in {base!r}; {_EXPECTED}")
        self.samples = samples  # [(path, label)], sorted by label then path
        self._warned = set()  # bad files already reported (per process: each worker keeps its
        # own), at most MAX_IMAGE_WARNINGS of them, and then one warning that the rest go unreported

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        path, label = self.samples[i]
        try:
            with Image.open(path) as im:  # reads the header only; converting below decodes fully
                w, h = im.size
                if w * h > MAX_IMAGE_PIXELS:
                    raise ImageTooLarge(f"{w}x{h} pixels, more than data.MAX_IMAGE_PIXELS = "
                                        f"{MAX_IMAGE_PIXELS}; not decoded")
                if max(w, h) > MAX_ASPECT_RATIO * min(w, h):
                    raise ImageTooLarge(f"{w}x{h} pixels, longer than data.MAX_ASPECT_RATIO = "
                                        f"{MAX_ASPECT_RATIO} times its short side (the crop's "
                                        f"resize to {self.resolution} px would be "
                                        f"{round(max(w, h) * self.resolution / min(w, h))} px "
                                        "long); not decoded")
                arr = center_crop_arr(to_rgb(im), self.resolution)
        # truncated JPEG, not an image, too large, permissions, ...: skip, never crash
        except Exception as e:
            if path not in self._warned and len(self._warned) <= MAX_IMAGE_WARNINGS:
                self._warned.add(path)  # a folder of 100,000 bad files must not print 100,000 lines
                warnings.warn(f"skipping image {path}: {type(e).__name__}: {e}"
                              if len(self._warned) <= MAX_IMAGE_WARNINGS
                              else f"more than {MAX_IMAGE_WARNINGS} unreadable images: the others "
                                   "are skipped without a warning (the log's bad_images counts "
                                   "them all)", stacklevel=2)
            return None
        # (3, H, W) uint8: a quarter of float32's bytes through the workers' shared memory (Docker's
        # 64 MB /dev/shm) and the copy to the GPU; to_model_range makes it [-1, 1] floats where the
        # batch lands
        return torch.from_numpy(arr).permute(2, 0, 1), label


def build_dataset(data, resolution, num_classes=10, size=10000, seed=0):
    """--data "" -> the built-in ProceduralDataset, else an ImageFolderDataset at `data`."""
    if data == "" or data is None:
        return ProceduralDataset(resolution, num_classes=num_classes, size=size, seed=seed)
    return ImageFolderDataset(data, resolution)


# -----------------------------------------------------------------------------
# batching and the resumable loader


def collate_skip_bad(batch):
    """[(x, y) or None] -> (x (B, 3, H, W), y (B,) long, n_bad). Runs inside the worker, so
    n_bad travels back with the batch; the iterators below add it to their own .n_bad."""
    good = [item for item in batch if item is not None]
    n_bad = len(batch) - len(good)
    if not good:  # every image of the batch was bad; Loader skips such batches
        return torch.empty(0, 3, 0, 0), torch.empty(0, dtype=torch.long), n_bad
    x = torch.stack([item[0] for item in good])  # (B, 3, H, W)
    y = torch.tensor([int(item[1]) for item in good], dtype=torch.long)  # (B,)
    return x, y, n_bad


class InOrder:
    """The readable items of `dataset`, in order, in batches: for x (B, 3, H, W), y (B,) in
    InOrder(...).

    For one pass over a fixed set of images (the latent cache, evaluation). Unreadable images are
    skipped and counted in .n_bad, so a caller that reports them reads one number.
    """

    def __init__(self, dataset, batch_size, num_workers=0, pin_memory=False):
        self.loader = DataLoader(dataset, batch_size, collate_fn=collate_skip_bad,
                                 num_workers=num_workers, pin_memory=pin_memory,
                                 worker_init_fn=loader_worker_init)
        self.n_bad = 0

    def __iter__(self):
        for x, y, n_bad in self.loader:
            self.n_bad += n_bad
            if len(y):
                yield x, y


class ResumableDistributedSampler(Sampler):
    """DistributedSampler's shuffled, drop_last shards, able to start `offset` images into the
    epoch.

    The permutation of an epoch comes from torch.randperm with a generator seeded by seed + epoch
    (DistributedSampler's own rule), the same on every rank and every restart. `offset` counts the
    images of that permutation all ranks together have used; rank r takes positions offset + r,
    offset + r + W, ..., so shards are disjoint and equal, and a run resumed on another number of
    ranks W continues at the very next image of the permutation.
    """

    def __init__(self, dataset, rank, world_size, seed):
        self.n, self.rank, self.world_size, self.seed = len(dataset), rank, world_size, seed
        self.epoch, self.offset = 0, 0
        self.num_samples = self.n // world_size  # per rank, over a whole epoch

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __iter__(self):
        perm = torch.randperm(
            self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()
        rest = perm[self.offset:]
        return iter(rest[self.rank:len(rest) // self.world_size * self.world_size:self.world_size])

    def __len__(self):
        return (self.n - self.offset) // self.world_size


class Loader:
    """Infinite batch iterator for one rank: next(loader) -> (x (B, 3, H, W), y (B,)).

    Every rank gets the same number of batches per epoch (num_samples // batch_size), which DDP
    needs. state_dict() = (epoch, images of the epoch's order all ranks have used); a new Loader
    given it continues with exactly the batches the old one would have produced next, and on
    another number of ranks or another batch size at the next unused image. Unreadable images are
    skipped and counted in .n_bad: this rank's, since this Loader was made, which the log reports.
    (Not in the state: the checkpoint holds rank 0's state, and the ranks' counts differ.)
    """

    def __init__(self, dataset, batch_size, rank=0, world_size=1, seed=0, num_workers=0):
        if len(dataset) < batch_size * world_size:
            raise ValueError(f"dataset has {len(dataset)} images, fewer than one global batch "
                             f"(batch_size {batch_size} x world_size {world_size}); "
                             f"use a smaller batch size or a bigger dataset (--data)")
        self.dataset, self.batch_size, self.rank, self.world_size, self.seed = (
            dataset, batch_size, rank, world_size, seed)
        self.sampler = ResumableDistributedSampler(dataset, rank, world_size, seed)
        self.batches_per_epoch = self.sampler.num_samples // batch_size
        # The DataLoader draws its workers' base seed from `generator`; without one it would draw
        # from the global torch RNG, and the trainer's noise (saved/restored for --resume) would
        # depend on how many times the loader was (re)started.
        generator = torch.Generator().manual_seed(seed * 1000 + rank)
        self.loader = DataLoader(
            dataset, batch_size=batch_size, sampler=self.sampler, drop_last=True,
            collate_fn=collate_skip_bad, num_workers=num_workers, generator=generator,
            persistent_workers=num_workers > 0, pin_memory=torch.cuda.is_available(),
            # stop signals and the folder's lock are the trainer's
            worker_init_fn=loader_worker_init,
        )
        self.epoch, self.offset, self.batch, self.n_bad = 0, 0, 0, 0  # batch: since `offset` images
        self._it = None

    def __iter__(self):
        return self

    def __next__(self):
        n_empty = 0
        while True:
            if self._it is None:
                # (re)start the epoch at the current position; the sampler is read in this
                # process when the iterator is created, so persistent workers see the change.
                self.sampler.set_epoch(self.epoch)
                self.sampler.offset = self.images_used()
                self.offset, self.batch = self.sampler.offset, 0
                self._it = iter(self.loader)
            try:
                x, y, bad = next(self._it)
            except StopIteration:
                self.epoch, self.offset, self.batch, self._it = self.epoch + 1, 0, 0, None
                continue
            self.batch += 1
            self.n_bad += bad
            # A batch whose images were all unreadable is skipped. (Only then can ranks drift apart
            # by a batch; with real data it does not happen.)
            if len(y) > 0:
                return x, y
            # a whole epoch's share without one readable image (a folder of bad files, a storage
            # mount gone mid-run) would loop here forever, in silence: stop with one line instead
            n_empty += 1
            if n_empty >= self.batches_per_epoch:
                raise unreadable_error(self.dataset, n_empty * self.batch_size, in_a_row=True)

    def images_used(self):
        """Images of this epoch's order used so far, by all ranks together."""
        return self.offset + self.batch * self.batch_size * self.world_size

    def state_dict(self):
        # "batch" (this epoch's batches at this batch size and rank count) is for reading only; a
        # resume continues from "images", which stays exact when the rank count or the batch size
        # changes
        return {"epoch": self.epoch, "images": self.images_used(),
                "batch": self.images_used() // (self.batch_size * self.world_size),
                "seed": self.seed, "batch_size": self.batch_size, "world_size": self.world_size}

    def load_state_dict(self, d):
        if "seed" in d and d["seed"] != self.seed:
            print(f"data: resuming with seed={self.seed} (was {d['seed']}): the data order will "
                  "not match the interrupted run's", file=sys.stderr)
        # a state without "images" counts batches of its own batch size and world size
        images = d.get("images", int(d["batch"]) * d.get("batch_size", self.batch_size) *
                       d.get("world_size", self.world_size))
        self.epoch, self.offset, self.batch = int(d["epoch"]), int(images), 0
        self._it = None  # the next batch restarts the epoch at the loaded position


def to_model_range(x):
    """A batch (B, 3, H, W) as the models take it: uint8 pixels (an image folder's items) -> floats
    in [-1, 1] on x's device; floats (the built-in data, drawn in [-1, 1]) are returned as they
    are."""
    return x.float().div_(127.5).sub_(1.0) if x.dtype == torch.uint8 else x


def random_hflip(x, generator=None):
    """Mirror each image of x (B, 3, H, W) left-right with probability 1/2.

    Done on the batch in the trainer, not in the dataset: the coin flips then come from the
    trainer's RNG (the global torch RNG unless a generator is given), which the checkpoint saves,
    so a resumed run flips exactly the same images. The coins are drawn on the CPU (or on the
    generator's device), so a seed flips the same images whatever device x lives on.
    """
    device = generator.device if generator is not None else torch.device("cpu")
    flip = torch.rand(x.shape[0], generator=generator, device=device) < 0.5  # (B,)
    flip = flip.to(x.device).view(-1, 1, 1, 1)
    return torch.where(flip, x.flip(-1), x)


# -----------------------------------------------------------------------------
# images out: grids, their classes and uint8 arrays


def first_good(dataset, n):
    """Indices of the first n readable items (an unreadable image is None and must not break a
    grid). A dataset with none at all is refused in one line (unreadable_error)."""
    out = []
    for i in range(len(dataset)):
        if len(out) == n:
            break
        if dataset[i] is not None:
            out.append(i)
    if not out and len(dataset):
        raise unreadable_error(dataset, len(dataset))
    return out


# DiT's sample.py favourites: golden retriever, otter, red panda, geyser, macaw, valley, balloon,
# arctic fox
IMAGENET_GRID_CLASSES = [207, 360, 387, 974, 88, 979, 417, 279]


def default_classes(num_classes):
    """The classes a class-conditional sample grid shows unless told otherwise (one row each)."""
    return IMAGENET_GRID_CLASSES if num_classes == 1000 else list(range(min(num_classes, 10)))


def to_uint8(x):
    """(N, 3, H, W) floats in [-1, 1] -> (N, H, W, 3) uint8 numpy, rounding like the reference
    evaluators."""
    x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def save_image_grid(x, path, nrow=8, pad=2):
    """Tile a batch (N, 3, H, W) in [-1, 1] into one PNG, nrow images per row."""
    imgs = to_uint8(x)  # (N, H, W, 3)
    n, h, w, _ = imgs.shape
    ncol = min(nrow, n)
    nrows = math.ceil(n / ncol)
    grid = np.full((nrows * (h + pad) + pad, ncol * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for i in range(n):
        r, c = divmod(i, ncol)
        grid[pad + r * (h + pad) : pad + r * (h + pad) + h,
             pad + c * (w + pad) : pad + c * (w + pad) + w] = imgs[i]
    image_format = Image.registered_extensions().get(os.path.splitext(path)[1].lower(), "PNG")
    # never half an image
    atomic_write(path, lambda fh: Image.fromarray(grid).save(fh, format=image_format))
