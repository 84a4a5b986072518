"""Datasets and the data loader: every script reads its images through this file, so all see the
same pixels. build_dataset gives the built-in ProceduralDataset for --data "", else an
ImageFolderDataset; InOrder makes one pass in order, Loader an infinite, resumable, per-rank one.
Images are float32 (3, H, W) in [-1, 1] (uint8 from a folder until to_model_range), labels ints.
"""

import itertools
import math
import os
import stat
import sys
import warnings

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from support.checkpoints import atomic_write, loader_worker_init
from support.procedural import ProceduralDataset

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
# Image.open reads only the header, so both limits are checked before any pixel is decoded: a
# 12000 x 12000 PNG takes 1.8 GB (PIL's own guard only warns); ImageNet's largest are ~20 MP.
MAX_IMAGE_PIXELS = 8192 * 8192
# The crop resizes the short side to the resolution, so a 1 x 10000 PNG would become 256 x 2.56M
# pixels (6.5 GB); at 32:1 the resize holds at most 32 x resolution^2 pixels.
MAX_ASPECT_RATIO = 32
MAX_IMAGE_WARNINGS = 20  # unreadable images named in a warning, per process; the rest are counted
# a 16-bit greyscale PNG opens as I;16 (I in older Pillows); convert("RGB") would clip it at 255
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_EXPECTED = ("expected an ImageNet-style folder: <root>/train/<class>/*.JPEG "
             "(or <root>/<class>/*.JPEG, or a flat folder of images); set it with --data")

# -----------------------------------------------------------------------------
# ImageNet-style image folders


def to_rgb(pil_image):
    """A PIL image as 8-bit RGB; 16-bit greyscale is scaled 0..65535 -> 0..255 first (v / 257)."""
    if pil_image.mode in SIXTEEN_BIT_MODES:
        arr = np.asarray(pil_image).astype(np.float64)  # uint16 (I;16) or int32 (I)
        pil_image = Image.fromarray(np.clip(np.rint(arr / 257), 0, 255).astype(np.uint8))  # mode L
    return pil_image if pil_image.mode == "RGB" else pil_image.convert("RGB")


def center_crop_arr(pil_image, image_size):
    """ADM's center crop (guided-diffusion), the standard for ImageNet 256 and rFID -> np.uint8
    (image_size, image_size, 3): halve with a BOX filter while the short side is >= 2x the target,
    one BICUBIC resize of the short side to image_size, then the central square."""
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


def _is_image_file(folder, name):
    """An image by its name, and a regular file: a FIFO named like an image would block a read."""
    if not name.lower().endswith(IMG_EXTENSIONS) or name.startswith("."):
        return False
    try:
        return stat.S_ISREG(os.stat(os.path.join(folder, name)).st_mode)
    except OSError:  # a broken link, a file removed meanwhile
        return False


def _images_under(top, walked):
    """Yields the image files under `top`, following links, each real folder once (those in
    `walked` other than top are skipped; the ones read here are added)."""
    for dirpath, dirnames, filenames in os.walk(top, followlinks=True):
        real = os.path.realpath(dirpath)
        if dirpath != top and real in walked:
            dirnames[:] = []  # nor anything below it
            continue
        walked.add(real)
        yield from (os.path.join(dirpath, f) for f in filenames if _is_image_file(dirpath, f))


class ImageTooLarge(ValueError):
    pass


def unreadable_error(dataset, tried, in_a_row=False):
    """The one-line SystemExit for a dataset whose first `tried` images could not be read (or, for
    a loader, whose epochs repeat images: `tried` draws in a row)."""
    where = getattr(dataset, "root", "the dataset")
    what = (f"{tried} of its {len(dataset)} images in a row could not be read" if in_a_row else
            f"none of its {tried} images could be read" if tried >= len(dataset) else
            f"none of its first {tried} images (of {len(dataset)}) could be read")
    return SystemExit(f"error: {where}: {what} (the warnings above say why); fix or replace the "
                      "files, or pass another folder")


def check_judge_classes(learn, heldout, heldout_flag):
    """Refuses image folders (ImageFolderDatasets) a class judge cannot score by: `learn` with one
    class (every image would be named right) or held-out images whose class sub-folders are not
    `learn`'s (a judge trained on `learn` calls class k what k is there)."""
    if len(learn.classes) < 2:
        raise ValueError(f"--data {learn.root}: one class, so every image would be named right; "
                         "the judge needs two or more class sub-folders")
    if heldout.classes != learn.classes:
        raise ValueError(f"{heldout_flag}: classes {heldout.classes[:5]}... differ from --data's "
                         f"{learn.classes[:5]}...; give both the same sub-folders")


class ImageFolderDataset(Dataset):
    """Images under `root/<split>/<class>/` (or `root/<class>/`, or flat `root/`), ADM
    center-cropped; evaluation reads split "val" (an ImageNet root holds both)."""

    def __init__(self, root, resolution, split="train"):
        if not os.path.isdir(root):
            raise FileNotFoundError(f"--data {root!r}: no such folder; {_EXPECTED}")
        base = os.path.join(root, split) if os.path.isdir(os.path.join(root, split)) else root
        self.root, self.resolution = base, resolution
        # classes = sorted sub-folder names, so label k is the same class on every machine
        # (ImageNet's sorted wnids -> 0..999, the usual indexing)
        self.classes = sorted(d for d in os.listdir(base)
                              if not d.startswith(".") and os.path.isdir(os.path.join(base, d)))
        # each real folder is read once: the root and the class folders count as read, so neither
        # a link up to them (`up -> ..`) nor a link loop gives an image twice or another's label
        walked = {os.path.realpath(base)} | {os.path.realpath(os.path.join(base, d))
                                             for d in self.classes}
        samples = []
        for label, d in enumerate(self.classes):
            found = _images_under(os.path.join(base, d), walked)
            samples += [(path, label) for path in sorted(found)]  # the same order on every machine
        if not samples:  # a flat folder (e.g. ImageNet val as loose JPEGs): one class, label 0
            self.classes = [os.path.basename(os.path.normpath(base))]
            samples = [(os.path.join(base, f), 0) for f in sorted(os.listdir(base))
                       if _is_image_file(base, f)]
        if not samples:
            raise ValueError(f"--data {root!r}: found no images ({', '.join(IMG_EXTENSIONS)}) "
                             f"in {base!r}; {_EXPECTED}")
        self.samples = samples  # [(path, label)], sorted by label then path
        self._warned = set()  # bad files reported by this process, at most MAX_IMAGE_WARNINGS + 1

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
        except Exception as e:  # truncated, not an image, too large, permissions: skip, never crash
            if path not in self._warned and len(self._warned) <= MAX_IMAGE_WARNINGS:
                self._warned.add(path)  # a folder of 100,000 bad files must not print 100,000 lines
                warnings.warn(f"skipping image {path}: {type(e).__name__}: {e}"
                              if len(self._warned) <= MAX_IMAGE_WARNINGS
                              else f"more than {MAX_IMAGE_WARNINGS} unreadable images: the others "
                                   "are skipped without a warning (the log's bad_images counts "
                                   "them all)", stacklevel=2)
            return None
        # (3, H, W) uint8: a quarter of float32's bytes through the workers' shared memory and the
        # copy to the GPU
        return torch.from_numpy(arr).permute(2, 0, 1), label


def build_dataset(data, resolution, num_classes=10, size=10000, seed=0):
    if data == "" or data is None:
        return ProceduralDataset(resolution, num_classes=num_classes, size=size, seed=seed)
    return ImageFolderDataset(data, resolution)


# -----------------------------------------------------------------------------
# batching and the resumable loader


def collate_skip_bad(batch):
    """[(x, y) or None] -> (x (B, 3, H, W), y (B,) long, n_bad), computed in the worker."""
    good = [item for item in batch if item is not None]
    n_bad = len(batch) - len(good)
    if not good:
        return torch.empty(0, 3, 0, 0), torch.empty(0, dtype=torch.long), n_bad
    x = torch.stack([item[0] for item in good])  # (B, 3, H, W)
    y = torch.tensor([int(item[1]) for item in good], dtype=torch.long)  # (B,)
    return x, y, n_bad


class InOrder:
    """The readable items of `dataset`, in order: for x (B, 3, H, W), y (B,) in InOrder(...).
    .first: the dataset index of the batch just given, where it would start had nothing been
    skipped (a batch of unreadable items only is left out, and the next keeps its own index)."""

    def __init__(self, dataset, batch_size, num_workers=0, pin_memory=False):
        self.loader = DataLoader(dataset, batch_size, collate_fn=collate_skip_bad,
                                 num_workers=num_workers, pin_memory=pin_memory,
                                 worker_init_fn=loader_worker_init)
        self.n_bad, self.first = 0, None

    def __iter__(self):
        for k, (x, y, n_bad) in enumerate(self.loader):
            self.n_bad += n_bad
            if len(y):
                self.first = k * self.loader.batch_size
                yield x, y


class Loader:
    """Infinite batch iterator for one rank: next(loader) -> (x (B, 3, H, W), y (B,)).

    An epoch's order is DistributedSampler's: torch.randperm seeded by seed + epoch, the same on
    every rank and restart. `offset` counts the images of that order all ranks together have used;
    rank r takes positions offset + r, offset + r + W, ..., so every rank gets the same number of
    batches (as DDP needs), and state_dict() (epoch, images used) resumes at the very next image,
    also on another rank count or batch size. .n_bad counts this rank's skipped images since this
    Loader was made (not in the state: the checkpoint holds rank 0's, and the ranks' differ).
    """

    def __init__(self, dataset, batch_size, rank=0, world_size=1, seed=0, num_workers=0):
        if len(dataset) < batch_size * world_size:
            raise ValueError(f"dataset has {len(dataset)} images, fewer than one global batch "
                             f"(batch_size {batch_size} x world_size {world_size}); "
                             f"use a smaller batch size or a bigger dataset (--data)")
        self.dataset, self.batch_size, self.rank, self.world_size, self.seed = (
            dataset, batch_size, rank, world_size, seed)
        self.batches_per_epoch = len(dataset) // world_size // batch_size
        # the DataLoader's sampler: this rank's indices from `offset` on, refilled in place each
        # time an epoch (re)starts; iter(self.loader) reads it in this process
        self.order = []
        # the workers' base seed comes from this generator, not from the global torch RNG, so the
        # trainer's (checkpointed) noise does not depend on how often the loader was (re)started
        generator = torch.Generator().manual_seed(seed * 1000 + rank)
        self.loader = DataLoader(
            dataset, batch_size=batch_size, sampler=self.order, drop_last=True,
            collate_fn=collate_skip_bad, num_workers=num_workers, generator=generator,
            persistent_workers=num_workers > 0, pin_memory=torch.cuda.is_available(),
            worker_init_fn=loader_worker_init)  # stop signals and the folder's lock: the trainer's
        self.epoch, self.offset, self.batch, self.n_bad = 0, 0, 0, 0  # batch: since `offset` images
        self._it = None

    def __iter__(self):
        return self

    def __next__(self):
        n_empty = 0
        while True:
            if self._it is None:  # (re)start the epoch at the current position
                self.offset, self.batch = self.images_used(), 0
                rng = torch.Generator().manual_seed(self.seed + self.epoch)
                rest = torch.randperm(len(self.dataset), generator=rng).tolist()[self.offset:]
                W = self.world_size
                self.order[:] = rest[self.rank:len(rest) // W * W:W]
                self._it = iter(self.loader)
            try:
                x, y, bad = next(self._it)
            except StopIteration:
                self.epoch, self.offset, self.batch, self._it = self.epoch + 1, 0, 0, None
                continue
            self.batch += 1
            self.n_bad += bad
            if len(y) > 0:  # a batch of unreadable images only is skipped
                return x, y
            # a whole epoch's share without one readable image (bad files, a storage mount gone
            # mid-run) would loop here forever: stop with one line instead
            n_empty += 1
            if n_empty >= self.batches_per_epoch:
                raise unreadable_error(self.dataset, n_empty * self.batch_size, in_a_row=True)

    def images_used(self):
        """Images of this epoch's order used so far, by all ranks together."""
        return self.offset + self.batch * self.batch_size * self.world_size

    def state_dict(self):
        # a resume continues from "images"; "batch" (at this batch size and rank count) is to read
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
    """A batch (B, 3, H, W) as the models take it: uint8 pixels -> floats in [-1, 1] on x's device;
    floats (the built-in data) are returned as they are."""
    return x.float().div_(127.5).sub_(1.0) if x.dtype == torch.uint8 else x


def random_hflip(x, generator=None):
    """Mirror each image of x (B, 3, H, W) left-right with probability 1/2.

    Done in the trainer, not the dataset, so the coins come from the trainer's RNG (the global one
    unless a generator is given), which the checkpoint saves: a resumed run flips the same images.
    They are drawn on the CPU (or the generator's device), the same whatever device x lives on."""
    device = generator.device if generator is not None else torch.device("cpu")
    flip = torch.rand(x.shape[0], generator=generator, device=device) < 0.5  # (B,)
    flip = flip.to(x.device).view(-1, 1, 1, 1)
    return torch.where(flip, x.flip(-1), x)


# -----------------------------------------------------------------------------
# images out: grids, their classes and uint8 arrays


def first_good(dataset, n):
    """Indices of the first n readable items, for a grid; none at all is a one-line refusal."""
    out = list(itertools.islice((i for i in range(len(dataset)) if dataset[i] is not None), n))
    if not out and len(dataset):
        raise unreadable_error(dataset, len(dataset))
    return out


def default_classes(num_classes):
    """The classes of a sample grid, one row each: for ImageNet, DiT's sample.py favourites (golden
    retriever, otter, red panda, geyser, macaw, valley, balloon, arctic fox)."""
    if num_classes == 1000:
        return [207, 360, 387, 974, 88, 979, 417, 279]
    return list(range(min(num_classes, 10)))


def to_uint8(x):
    """(N, 3, H, W) floats in [-1, 1] -> (N, H, W, 3) uint8 numpy, rounded as evaluators do."""
    x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def save_image_grid(x, path, nrow=8, pad=2):
    """Tile a batch (N, 3, H, W) in [-1, 1] into one image file, nrow images per row."""
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
    atomic_write(path, lambda fh: Image.fromarray(grid).save(fh, format=image_format))
