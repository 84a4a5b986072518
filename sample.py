"""
Sampling: class-conditional images from a trained DiT (stage 2), and stage-1 reconstructions.

    python sample.py --ckpt out/dit/ckpt.pt                       # grid PNG, one row per class
    python sample.py --ckpt out/dit/ckpt.pt --classes 207,360 --cfg-scale 4
    torchrun --nproc_per_node=8 sample.py --ckpt out/dit/ckpt.pt --num-samples 50000 \\
        --out samples.npz
    python sample.py --ckpt out/ae/ckpt.pt --images /path/to/val  # inputs next to reconstructions

A sample: noise (C, h, w) -> Euler ODE of the DiT's velocity, classifier-free guidance on all
channels -> un-normalised latent -> the stage-1 DGAE decoder (a diffusion model: it draws noise
too). The DiT checkpoint names its stage-1 checkpoint and holds the latent mean/std: --ckpt is all
it takes. train_dit.py's grids are made by the same functions, from the EMA DiT.
Samples are made in chunks of --batch-size; chunk c takes its labels, DiT noise and decoder seed
from (seed, c) alone and rank r makes chunks r, r + W, ...: the images depend on --seed and
--batch-size, never on the number of processes.
The .npz: uint8 N x H x W x 3 under `arr_0` (what the ADM ImageNet evaluator reads), and `labels`.
"""

import os

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from decoder_diffusion import euler_sample
from dit import DiT
from support import checkpoints, common
from support.data import (ImageFolderDataset, default_classes, first_good, save_image_grid,
                          to_model_range, to_uint8)

# -----------------------------------------------------------------------------
# settings (override with --name value)
ckpt = "out/dit/ckpt.pt"  # a train_dit.py checkpoint; or a train_ae.py one together with --images
out = ""  # output file; "" = samples.png / .npz / recon.png beside --ckpt; .npz with --num-samples
classes = ""  # grid's comma-separated class indices; "" = the first 10 (ImageNet: 8 well-known)
per_class = 8  # samples per class in the grid (one row per class)
num_samples = 0  # > 0: that many samples, uniform labels, into an .npz (FID); recon: images to show
num = 0  # the same as --num-samples; fine with plain python, but torchrun takes --num for itself
cfg_scale = 4.0  # classifier-free guidance scale; 1 = no guidance (half the compute)
steps = 50  # Euler steps of the DiT's ODE
decode_steps = None  # Euler steps of the DGAE decoder; None = the stage-1 checkpoint's default
seed = 0  # the noise and labels: the same seed and --batch-size give the same images
batch_size = 64  # samples per chunk (per forward pass); part of what --seed reproduces
ae_ckpt = ""  # "" = the stage-1 checkpoint the DiT checkpoint records (pass it if that file moved)
images = ""  # a folder of images: with a stage-1 --ckpt, write reconstructions next to the inputs
attn_impl = None  # math | sdpa; None = as trained (sdpa is faster on GPUs)
device = ""  # "" = cuda, then mps, then cpu
dist_timeout = 3600  # torchrun: seconds a rank waits; covers rank 0's merge of 50K samples (~10 GB)
# -----------------------------------------------------------------------------
SETTINGS = common.settings_block(globals())  # the defaults above: every main() starts from them


def chunk_inputs(seed, chunk, n, num_classes, latent_shape, labels=None):
    """Everything random about chunk `chunk`, from (seed, chunk) alone: n labels (uniform unless
    given), the DiT's starting noise (n, C, h, w) at t=1, and the seed of the decoder's noise."""
    chunk_seed = int(np.random.SeedSequence([seed, chunk]).generate_state(1)[0])
    g = torch.Generator().manual_seed(chunk_seed)
    y = torch.randint(num_classes, (n,), generator=g) if labels is None else labels
    noise = torch.randn(n, *latent_shape, generator=g)
    return y, noise, int(torch.randint(2**31, (1,), generator=g))


@torch.inference_mode()  # images for files only: no autograd bookkeeping
def generate(dit, ae, y, noise, steps, cfg_scale, latent_mean, latent_std, decode_steps=None,
             decode_seed=0):
    """Labels y (B,) and noise (B, C, h, w) on the model's device -> images (B, 3, H, W) in [-1, 1]:
    the decoder's Euler sampler (decoder_diffusion.euler_sample) on the DiT's velocity, with
    guidance v = v_uncond + s (v_cond - v_uncond) on every channel."""
    z = euler_sample(lambda x, t: dit.forward_with_cfg(x, t, y, cfg_scale), noise, steps)  # t = 0
    z = z.float() * latent_std.view(1, -1, 1, 1) + latent_mean.view(1, -1, 1, 1)  # encoder's scale
    return ae.decode(z, decode_steps, seed=decode_seed)  # None: the stage-1 default


def _or_exit(load, *args):
    """load(*args); a missing or wrong-kind file: a one-line error, not a traceback."""
    try:
        return load(*args)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}. sample.py takes a train_dit.py checkpoint, or a train_ae.py "
                         "one with --images FOLDER (reconstructions).") from None


def load_models(path, device, ae_path="", attn=""):
    """A train_dit.py checkpoint -> (EMA DiT, its stage-1 DGAE, the checkpoint), in eval mode."""
    ck = _or_exit(checkpoints.load_checkpoint, path, "dit")
    args = ({**ck["model_args"], **({"attn_impl": attn} if attn else {})}
            if isinstance(ck["model_args"], dict) else None)
    with common.user_errors():  # settings, weights or sizes edited: one line naming the file
        dit = checkpoints.model_from_args(DiT, args, ck["ema"], path)
    checkpoints.load_weights(dit, ck["ema"], path)
    ae_path = ae_path or ck["ae_ckpt"]
    if not os.path.isfile(ae_path):
        raise SystemExit(f"error: stage-1 checkpoint {ae_path} not found. The DiT in {path} "
                         "generates latents of that autoencoder and needs its decoder; pass "
                         "--ae-ckpt PATH if the file moved.")
    ae = checkpoints.load_dgae(ae_path, device)
    # the DiT learned the latents of one encoder; another autoencoder's decoder would turn its
    # samples into plausible-looking garbage, so this is refused, not warned about
    if checkpoints.encoder_fingerprint(ae.state_dict()) != ck["ae_fingerprint"]:
        raise SystemExit(f"error: {ae_path} holds another stage-1 encoder than the one whose "
                         f"latents the DiT in {path} learned (step {ck['ae_step']} of "
                         f"{ck['ae_ckpt']}); pass that checkpoint with --ae-ckpt")
    return dit.to(device).eval(), ae, ck


def grid_labels(classes, per_class, num_classes):
    """--classes ("" = the default ones), each repeated per_class times: a grid row per class."""
    try:
        cls = [int(c) for c in classes.split(",")] if classes else default_classes(num_classes)
    except ValueError:
        raise SystemExit(f"error: --classes takes comma-separated class indices, got "
                         f"{classes!r}") from None
    for c in cls:
        if not 0 <= c < num_classes:
            raise SystemExit(f"error: class {c} is out of range: this model has {num_classes} "
                             f"classes (0 to {num_classes - 1})")
    return torch.tensor(cls).repeat_interleave(per_class)


def in_index_order(parts, total, n_chunks, batch_size, dist, path):
    """Every rank's chunks -> (images (N, H, W, 3) uint8, labels (N,)) in sample order, on rank 0.
    Ranks hand their parts over as files beside `path` (50K samples at 256 px are ~10 GB, too much
    for a collective): with several nodes the output must be on a shared file system."""
    imgs, ys = ((np.concatenate(a) for a in zip(*parts)) if parts
                else (np.zeros(0, np.uint8), np.zeros(0, np.int64)))
    if not dist.ddp:
        return imgs, ys
    np.savez(f"{path}.rank{dist.rank}.npz", images=imgs, labels=ys)
    common.barrier(dist)
    if not dist.master:
        return None, None
    # rank 0 made chunk 0
    imgs, ys = np.zeros((total, *imgs.shape[1:]), np.uint8), np.zeros(total, np.int64)
    for r in range(dist.world_size):
        with np.load(f"{path}.rank{r}.npz") as f:
            part_imgs, part_ys = f["images"], f["labels"]
        os.remove(f"{path}.rank{r}.npz")
        pos = 0
        for c in range(r, n_chunks, dist.world_size):  # rank r made chunks r, r + W, ... in order
            lo, hi = c * batch_size, min(total, (c + 1) * batch_size)
            imgs[lo:hi], ys[lo:hi] = part_imgs[pos:pos + hi - lo], part_ys[pos:pos + hi - lo]
            pos += hi - lo
    return imgs, ys


@torch.inference_mode()
def reconstruct(ckpt_path, folder, n, decode_steps, seed, path, device):
    """Stage 1: the first n readable images of `folder` beside their reconstructions, in `path`."""
    ae = _or_exit(checkpoints.load_dgae, ckpt_path, device)
    with common.user_errors():  # no such folder, no images in it
        dataset = ImageFolderDataset(folder, ae.cfg.resolution)
    x = to_model_range(torch.stack([dataset[i][0] for i in first_good(dataset, n)]).to(device))
    recon = ae.reconstruct(x, decode_steps, seed=seed)  # (N, 3, H, W); None: the stage-1 default
    # 4 (input, recon) pairs a row
    save_image_grid(torch.stack([x, recon], 1).flatten(0, 1), path, nrow=8)
    print(f"wrote {path}: inputs (left) beside reconstructions (right), {x.shape[0]} images",
          flush=True)


def check_output(path, npz, master):
    """Refuse, before any sampling, an output that could not be written: an .npz not named .npz
    (np.savez would append .npz, and the file written would not be the one printed), a grid without
    an image extension PIL knows, a path that is not writable (common.writable_file)."""
    ext = os.path.splitext(path)[1].lower()
    if npz and ext != ".npz":
        raise SystemExit(f"error: --out {path}: with --num-samples the output is an .npz; name it "
                         f"e.g. {os.path.splitext(path)[0]}.npz")
    if not npz and ext not in Image.registered_extensions():
        raise SystemExit(f"error: --out {path}: the grid is an image; give it an image extension "
                         "such as .png")
    if master:
        common.writable_file(path, "--out")


def main(argv=None):
    settings, _ = common.configure(SETTINGS, argv)
    globals().update(settings)
    # out of range: refused before any work (--cfg-scale nan would write black images, exit 0)
    common.check_settings(settings, count=("per_class", "batch_size"),
                          count_or_0=("num_samples", "num", "seed"),
                          steps=("steps", "decode_steps"), guidance=("cfg_scale",),
                          positive=("dist_timeout",), choices={"attn_impl": (None, "math", "sdpa")},
                          at_most={"num_samples": common.MAX_SAMPLES, "num": common.MAX_SAMPLES,
                                   "per_class": common.MAX_GRID_ROW, "batch_size": common.MAX_BATCH,
                                   "seed": common.MAX_SEED, "dist_timeout": common.MAX_SECONDS})
    n_samples = num_samples or num  # --num is another name for --num-samples
    dist = common.setup_distributed(device, dist_timeout)  # an unavailable --device: refused here
    default = "recon.png" if images else "samples.npz" if n_samples > 0 else "samples.png"
    path = out or os.path.join(os.path.dirname(ckpt), default)
    check_output(path, npz=n_samples > 0 and not images, master=dist.master)  # before any sampling
    if images:  # stage 1: reconstructions, on rank 0
        if dist.master:
            reconstruct(ckpt, images, n_samples or 8, decode_steps, seed, path, dist.device)
        return common.shutdown(dist)
    with common.user_errors():  # a damaged or edited checkpoint: one line naming it
        dit, ae, ck = load_models(ckpt, dist.device, ae_ckpt, attn_impl)
    mean, std = ck["latent_mean"].to(dist.device), ck["latent_std"].to(dist.device)
    labels = None if n_samples > 0 else grid_labels(classes, per_class, ck["num_classes"])
    total = n_samples if n_samples > 0 else len(labels)
    n_chunks = -(-total // batch_size)
    if dist.master:
        print(f"{total} samples from {ckpt} (step {ck['step']}), cfg {cfg_scale}, {steps} DiT "
              f"steps, decoder {decode_steps or ae.cfg.decode_steps} steps, seed {seed}",
              flush=True)
    parts = []
    with common.autocast_context(dist.device):
        for c in tqdm(range(dist.rank, n_chunks, dist.world_size), disable=not dist.master,
                      desc="sampling"):
            lo, hi = c * batch_size, min(total, (c + 1) * batch_size)
            y, noise, dseed = chunk_inputs(seed, c, hi - lo, ck["num_classes"], ck["latent_shape"],
                                           None if labels is None else labels[lo:hi])
            x = generate(dit, ae, y.to(dist.device), noise.to(dist.device), steps, cfg_scale, mean,
                         std, decode_steps, dseed)
            parts.append((to_uint8(x), y.numpy()))
    imgs, ys = in_index_order(parts, total, n_chunks, batch_size, dist, path)
    if dist.master:
        if n_samples > 0:  # atomic, like the checkpoints: never half an .npz under the final name
            checkpoints.atomic_write(path, lambda fh: np.savez(fh, arr_0=imgs, labels=ys))
        else:
            save_image_grid(torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 127.5 - 1, path,
                            nrow=per_class)
            print("rows: " + ", ".join(ck["class_names"][c] for c in labels[::per_class].tolist()))
        print(f"wrote {path}", flush=True)
    common.shutdown(dist)


if __name__ == "__main__":
    main()
