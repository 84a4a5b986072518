"""
Evaluation: the numbers papers report, computed the way the field computes them.

    python eval.py recon --ckpt out/ae/ckpt.pt --data /imagenet/val  # stage 1: PSNR SSIM LPIPS rFID
    # stage 2: FID sFID IS P/R
    python eval.py gen --samples samples.npz --ref VIRTUAL_imagenet256_labeled.npz
    python eval.py stats --images /path/to/images --out stats.npz    # reusable FID statistics
    # built-in data: samples of the right class?
    python eval.py classes --samples out/dit/samples.npz
    torchrun --nproc_per_node=8 eval.py <mode> ...                   # same, sharded over GPUs

recon: every image of --data is ADM center-cropped to the model's resolution, encoded and decoded
(--decode-steps Euler steps, seeded noise), and compared with the same cropped original.
gen: the samples (.npz with arr_0, what sample.py writes, or a folder) against a reference: an
.npz of precomputed statistics (mu, sigma, and mu_s, sigma_s for sFID; the ADM ImageNet 256
reference batch also holds 10K images in arr_0, used for precision/recall), or images.
stats: the FID statistics of a set of images, to pass as --ref later.
(experiments/claims.py compare trains every decoder at c and c/2 and scores them with
score_reconstructions.)
classes: stage 2 on the built-in data, where FID's ImageNet Inception means little: a small CNN
(procedural.PatternClassifier) is trained on built-in images, then names the pattern of each sample;
the share named as the class it was sampled for, against chance and the CNN's accuracy on real
images.
Where the images come from, how the processes share them and how results are written is
support/eval_data.py.

Conventions, chosen to match published numbers (the formulas are in support/metrics.py):
  - Everything is measured on uint8 images, i.e. what a saved PNG holds: reconstructions are
    rounded to uint8 exactly like the originals (data.to_uint8's rounding) before any metric.
  - PSNR per image on [0, 255] (MSE over pixels and channels), averaged over images.
  - SSIM per image (Wang et al. 2004): Gaussian window 11, sigma 1.5, K1 = 0.01, K2 = 0.03,
    L = 255, over the 'valid' window positions, per channel, averaged; then over images.
  - LPIPS VGG16 v0.1 (support/perceptual.py, the module the stage-1 loss uses), averaged over
    images.
  - FID / rFID on the 2048-d pool features of the FID InceptionV3 (support/inception.py); mean and
    covariance (N - 1) in float64. sFID the same on the 2023-d mixed_6/conv features. IS over 10
    splits. Precision / recall with k = 3 nearest neighbours in pool-feature space (Kynkaanniemi
    et al. 2019, as the ADM evaluator computes them).
  - The ADM reference statistics were computed with the TF graph; our PyTorch port of the same
    network resizes differently (support/inception.py), so gFID against them is close to, not
    identical with, the ADM evaluator's. For a paper table, also run that evaluator on the same
    samples.npz.
  - Under torchrun each rank takes a contiguous run of the single-process batches; features are
    gathered in rank order (support/eval_data.py), so rank 0 sees the single-process arrays (and
    recon the same decoder noise) on any number of GPUs, and alone computes and writes the results.
"""

import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from support import checkpoints, common
from support.data import InOrder
from support.eval_data import (FEATURE_DIMS, HELDOUT_SEED, HELDOUT_SIZE, ImageSource, at_least_two,
                               check_reference_stats, frechet_entries, gather_rows,
                               inception_features, inception_score_entries, readable_or_refuse,
                               require_zip, stats_of, table_path, to_pixels, total, write_results)
from support.inception import load_inception
from support.metrics import (band_power, conditional_mean_mse, feature_stats, frechet_distance,
                             highfreq_energy, highfreq_ratio, lowfreq_psnr,
                             precision_recall, psnr, psnr_of_mse, ssim)
from support.perceptual import load_lpips
from support.procedural import ProceduralDataset, train_pattern_classifier

# -----------------------------------------------------------------------------
# settings (override with --name value)
ckpt = ""  # recon: stage-1 checkpoint written by train_ae.py
data = ""  # recon: folder of images to reconstruct (ImageNet val: 50K images)
samples = ""  # gen: generated images, an .npz with arr_0 (N, H, W, 3) uint8 or a folder
ref = ""  # gen: reference .npz with mu/sigma[/mu_s/sigma_s][/arr_0], or images (.npz or folder)
images = ""  # stats: images to summarise (.npz or folder)
out = ""  # results .json (the table goes beside it as .txt); stats: the .npz to write
resolution = 256  # gen/stats: folder images are ADM center-cropped to this size
num_images = 0  # recon/gen/stats: use only the first N images (0 = all)
batch_size = 50  # images per forward pass (per process)
num_workers = min(4, os.cpu_count() or 1)  # data-loader workers for folders (fewer on fewer cores)
decode_steps = None  # recon: Euler steps of the diffusion decoder (None = the checkpoint's default)
seed = 0  # recon: decoder noise seed (each batch uses seed + the index of its first image)
prec_recall = True  # gen: precision/recall when the reference holds images (10K for ADM's batch)
inception_path = ""  # pt_inception-2015-12-05-6726825d.pth (or $DGAE_INCEPTION, $DGAE_WEIGHTS)
vgg_path = ""  # vgg16-397923af.pth (or $DGAE_VGG16)
lpips_path = ""  # LPIPS v0.1 vgg.pth (or $DGAE_LPIPS)
num_classes = 10  # classes: how many built-in classes the DiT was trained on (train_dit.py: 10)
judge_steps = 600  # classes: training steps of the pattern classifier that judges the samples
device = ""  # "" = auto (cuda, mps, cpu)
dist_timeout = 600  # torchrun: seconds a rank waits for others (rank 0 computes distances alone)
# -----------------------------------------------------------------------------
SETTINGS = common.settings_block(globals())  # the defaults above: every main() starts from them


def default_out(mode, steps=None):
    """Where `mode` writes its results without --out: beside its input (stats has no default: --out
    is needed)."""
    if mode == "recon":
        return os.path.join(os.path.dirname(os.path.abspath(ckpt)), f"eval_recon_steps{steps}.json")
    return os.path.splitext(samples.rstrip("/"))[0] + ("_eval.json" if mode == "gen"
                                                       else "_classes.json")


def check_output(mode, dist):
    """Refuse, before anything is loaded or scored, a results file that could not be written at the
    end (common.writable_file): an --out that is a folder, lies under a file, or in a folder without
    write permission, and the same for the default file beside the input; minutes or hours of
    scoring would be lost. Rank 0 writes, so rank 0 checks. A mode whose inputs are missing refuses
    them itself."""
    if not dist.master:
        return
    if out:
        if mode != "stats" and table_path(out) == out:  # the table would overwrite the results
            raise SystemExit(f"error: --out {out}: the table is written beside the results as "
                             ".txt, so the results cannot be a .txt file; name it e.g. "
                             f"{os.path.splitext(out)[0]}.json")
        common.writable_file(out, "--out", also=() if mode == "stats" else (table_path(out),))
    # the file name holds the decode steps, known once the checkpoint is read
    elif mode == "recon" and ckpt:
        common.writable_dir(os.path.dirname(os.path.abspath(ckpt)),
                            "--out (not given, so beside --ckpt)")
    elif mode in ("gen", "classes") and samples:
        path = default_out(mode)
        common.writable_file(path, "--out (not given, so beside --samples)",
                             also=(table_path(path),))


# -----------------------------------------------------------------------------
# the four modes


def optional_measures(dist, vgg_path="", lpips_path="", inception_path=""):
    """The LPIPS and Inception networks when their weight files are present, and why each is
    missing.

    Returns (lpips_net or None, inception or None, {metric: reason it was skipped}). A path the
    user typed must exist (find_weights raises); a default location that is empty just skips.
    """
    lpips_net = load_lpips(vgg_path, lpips_path, required=False, device=dist.device)
    inception = load_inception(inception_path, dist.device, required=False)
    skipped = {}
    if lpips_net is None:
        skipped["lpips"] = "VGG16 / LPIPS weight files not found (--vgg-path, --lpips-path)"
    if inception is None:
        skipped["rfid"] = "FID Inception weight file not found (--inception-path)"
    return lpips_net, inception, skipped


def meancolour_psnr(real):
    """(B,) PSNR of the trivial baseline that paints each image its own mean colour: the floor a
    reconstruction must beat to show that the decoder uses z at all."""
    return psnr(real, real.double().mean(dim=(2, 3), keepdim=True).expand_as(real))


@torch.inference_mode()  # the reconstructions only feed the metrics
def score_reconstructions(model, source, steps, dist, limit, bs, seed, lpips_net=None,
                          inception=None, mean_of=0, judge=None, pool=0):
    """Reconstruct the first `limit` (0 = all) images of `source` and measure them against the
    originals.

    Returns {metric: value} (complete on rank 0): per-image means of PSNR, SSIM, low-frequency PSNR,
    the mean-colour baseline's PSNR and LPIPS (if given), the dataset's high-frequency ratio, the
    spectral Frechet distance (metrics.band_power), rFID (if given), and the decoding time per
    image.
    Batch k is decoded with noise seed seed + (index of its first image), so the numbers do not
    depend on the number of processes.
    mean_of = K > 1 (a diffusion decoder): also the PSNR and low-frequency PSNR of the mean of K
    decodes from different noise (psnr_mean: it keeps 1/K of the sampling variance), and of the
    decoder's conditional mean E[x | z] itself, without that variance (psnr_ez, lowfreq_psnr_ez:
    metrics.conditional_mean_mse on the unrounded decodes). A single sample pays for its detail in
    PSNR.
    pool: the pooling factor of the low-/high-frequency split (0 = the model's f; fixed across
    models of different f, the measures keep one meaning).
    judge (built-in data only: a procedural.PatternClassifier): its accuracy on the reconstructions
    (the label of held-out image i is i mod its class count) and the Frechet distance in its feature
    space.
    """
    f = pool or model.cfg.compression
    lo, hi = source.shard(limit, bs, dist)
    per_image = {"psnr": [], "ssim": [], "lowfreq_psnr": [], "meancolour_psnr": [], "lpips": [],
                 "psnr_mean": [], "lowfreq_psnr_mean": [], "psnr_ez": [], "lowfreq_psnr_ez": [],
                 "judge_correct": []}
    hf = {"real": [], "recon": []}  # per-image high-frequency energies
    pools = {"real": [], "recon": []}
    spectra = {"real": [], "recon": []}
    judged = {"real": [], "recon": []}
    n_bands = 3 * (model.cfg.resolution // 2)
    decode_s = 0.0
    batches = source.batches(lo, hi, bs)
    for i, real in enumerate(tqdm(batches, total=math.ceil((hi - lo) / bs), desc="recon",
                                  disable=not dist.master)):
        real = real.to(dist.device)  # (B, 3, res, res) uint8 values
        t0 = time.perf_counter()
        with common.autocast_context(dist.device):
            rec = model.reconstruct(real / 127.5 - 1, steps=steps, seed=seed + lo + i * bs)
        if dist.device.type == "cuda":
            torch.cuda.synchronize()
        decode_s += time.perf_counter() - t0
        rec = to_pixels(rec)  # quantised like the originals: what a saved reconstruction PNG holds
        per_image["psnr"].append(psnr(real, rec).cpu().numpy())
        per_image["ssim"].append(ssim(real, rec).cpu().numpy())
        per_image["lowfreq_psnr"].append(lowfreq_psnr(real, rec, f).cpu().numpy())
        per_image["meancolour_psnr"].append(meancolour_psnr(real).cpu().numpy())
        hf["real"].append(highfreq_energy(real, f).cpu().numpy())
        hf["recon"].append(highfreq_energy(rec, f).cpu().numpy())
        spectra["real"].append(band_power(real).cpu().numpy())
        spectra["recon"].append(band_power(rec).cpu().numpy())
        if mean_of > 1:
            with common.autocast_context(dist.device):
                z = model.encode(real / 127.5 - 1)
                decodes = [model.decode(z, steps, seed=seed + lo + i * bs + 7919 * k).float()
                           for k in range(mean_of)]
            decodes = torch.stack(decodes)  # (K, B, 3, H, W)
            mean_rec = to_pixels(decodes.mean(0))  # (B, 3, H, W): the mean of K decodes, rounded
            per_image["psnr_mean"].append(psnr(real, mean_rec).cpu().numpy())
            per_image["lowfreq_psnr_mean"].append(lowfreq_psnr(real, mean_rec, f).cpu().numpy())
            px = (decodes.clamp(-1, 1) + 1) * 127.5  # (K, B, 3, H, W) pixel values, unrounded
            ez_mse = conditional_mean_mse(px, real)
            pooled = F.avg_pool2d(px.flatten(0, 1).double(), f).unflatten(0, px.shape[:2])
            ez_lowfreq_mse = conditional_mean_mse(pooled, F.avg_pool2d(real.double(), f))
            per_image["psnr_ez"].append(psnr_of_mse(ez_mse).cpu().numpy())
            per_image["lowfreq_psnr_ez"].append(psnr_of_mse(ez_lowfreq_mse).cpu().numpy())
        if judge is not None:
            labels = (torch.arange(lo + i * bs, lo + i * bs + len(real), device=real.device)
                      % judge.head.out_features)
            judged["real"].append(judge.embed(real / 127.5 - 1).double().cpu().numpy())
            feats = judge.embed(rec / 127.5 - 1)
            judged["recon"].append(feats.double().cpu().numpy())
            per_image["judge_correct"].append(
                (judge.head(feats).argmax(1) == labels).double().cpu().numpy())
        if lpips_net is not None:
            per_image["lpips"].append(
                lpips_net(real / 127.5 - 1, rec / 127.5 - 1).double().cpu().numpy())
        if inception is not None:
            pools["real"].append(inception(real / 255)["pool"].cpu().numpy())
            pools["recon"].append(inception(rec / 255)["pool"].cpu().numpy())
    per_image = {k: gather_rows(v, (), dist) for k, v in per_image.items()}
    hf = {k: gather_rows(v, (), dist) for k, v in hf.items()}
    pools = {k: gather_rows(v, (FEATURE_DIMS["pool"],), dist) for k, v in pools.items()}
    spectra = {k: gather_rows(v, (n_bands,), dist) for k, v in spectra.items()}
    judged = {k: gather_rows(v, (judge.head.in_features if judge is not None else 0,), dist)
              for k, v in judged.items()}
    n = len(per_image["psnr"])
    # the FDs are of covariances
    readable_or_refuse(source, n, hi - lo, dist, at_least=2, needs=RECON_NEEDS)
    results = {"num_images": n, "num_unreadable": total(source.n_bad, dist)}
    results.update({k: float(v.mean()) for k, v in per_image.items() if len(v)})
    results["highfreq_ratio"] = highfreq_ratio(hf["recon"], hf["real"])
    if dist.master:
        results["spectral_fd"] = frechet_distance(*feature_stats(spectra["real"]),
                                                  *feature_stats(spectra["recon"]))
    if judge is not None and dist.master:
        results["judge_accuracy"] = results.pop("judge_correct")
        results["judge_fd"] = frechet_distance(*feature_stats(judged["real"]),
                                               *feature_stats(judged["recon"]))
    if inception is not None and dist.master:
        real_stats, recon_stats = (feature_stats(pools["real"], dist.device),
                                   feature_stats(pools["recon"], dist.device))
        results["rfid"] = frechet_distance(*real_stats, *recon_stats)
    results["decode_ms_per_image"] = 1000 * decode_s / max(hi - lo, 1)  # this rank's
    return results


# what recon's least of 2 images is for, as its refusals say it
RECON_NEEDS = "the spectral FD and rFID need"


def run_recon(dist):
    """Stage-1 reconstruction quality: PSNR, SSIM, low-frequency PSNR and high-frequency ratio
    always; LPIPS and rFID when their weight files are present (the report names what it
    skipped)."""

    if not ckpt:
        raise SystemExit("recon needs --ckpt (a train_ae.py checkpoint); --data is an image "
                         "folder, or empty for held-out images of the built-in dataset")
    if num_images == 1:  # the spectral FD (and rFID) are distances between covariances
        raise SystemExit("error: recon --num-images 1: the spectral FD and rFID need at least 2 "
                         "images; give 2 or more, or 0 for all")
    model = checkpoints.load_dgae(ckpt, dist.device)
    steps = decode_steps or model.cfg.decode_steps
    lpips_net, inception, skipped = optional_measures(dist, vgg_path, lpips_path, inception_path)
    source = at_least_two(ImageSource(data, model.cfg.resolution, num_workers,
                                      builtin_limit=num_images),
                          "--data", num_images, needs=RECON_NEEDS)
    scores = score_reconstructions(model, source, steps, dist, num_images, batch_size, seed,
                                   lpips_net, inception)
    if dist.master:
        results = {"mode": "recon", "ckpt": ckpt,
                   "data": data or f"built-in, held-out (seed {HELDOUT_SEED})",
                   "resolution": model.cfg.resolution, "compression": model.cfg.compression,
                   "decode_steps": steps, "seed": seed, **scores}
        if skipped:
            results["skipped"] = skipped
        write_results(results, out or default_out("recon", steps))


# k of precision / recall's nearest-neighbour balls (metrics.precision_recall's default)
PR_NEIGHBOURS = 3


def run_gen(dist):
    if not samples or not ref:
        raise SystemExit("gen needs --samples (.npz with arr_0, or a folder) and --ref (reference "
                         ".npz or images)")
    # The reference: precomputed statistics if the file has them, plus its images (if any) for P/R.
    ref_stats, has_images = {}, not ref.endswith(".npz")
    if ref.endswith(".npz"):
        require_zip(ref)
        with np.load(ref) as z:
            ref_stats = {k: z[k] for k in ("mu", "sigma", "mu_s", "sigma_s") if k in z.files}
            has_images = "arr_0" in z.files
    if "mu" not in ref_stats and not has_images:
        raise SystemExit(f"--ref {ref} has neither statistics (mu, sigma) nor images (arr_0)")
    check_reference_stats(ref, ref_stats)  # before the samples' features take minutes
    fake_src = at_least_two(ImageSource(samples, resolution, num_workers=num_workers), "--samples",
                            num_images)
    ref_src = None
    if has_images and (prec_recall or "mu" not in ref_stats):
        ref_src = at_least_two(ImageSource(ref, resolution, num_workers=num_workers), "--ref")
    inception = load_inception(inception_path, dist.device)
    fake = inception_features(fake_src, inception, dist, batch_size, num_images, "samples")
    ref_feats = None
    if ref_src is not None:
        ref_feats = inception_features(ref_src, inception, dist, batch_size, 0, "reference")
    # every rank: collectives
    unreadable = total(fake_src.n_bad, dist), total(ref_src.n_bad if ref_src else 0, dist)
    if not dist.master:
        return
    n = len(fake["pool"])
    counts = {"samples": n}  # what each distance's statistics are computed from
    if "mu" not in ref_stats:  # the reference's statistics come from its images
        ref_stats = stats_of(ref_feats, dist.device)
        counts["reference images"] = len(ref_feats["pool"])
    if n != 50000:
        print(f"note: {n} samples; the ImageNet protocol uses 50K, and FID is biased upwards "
              "for fewer")
    results = {"mode": "gen", "samples": samples, "ref": ref, "num_samples": n,
               "num_unreadable": unreadable[0]}
    # the files of a folder that could not be read were skipped (and named in warnings)
    if ref_src is not None:
        results["num_unreadable_ref"] = unreadable[1]
    fid = frechet_distance(*feature_stats(fake["pool"], dist.device), ref_stats["mu"],
                           ref_stats["sigma"])
    results.update(frechet_entries("fid", fid, counts, FEATURE_DIMS["pool"]))
    if "mu_s" in ref_stats:
        fake_stats = feature_stats(fake["spatial"], dist.device)
        sfid = frechet_distance(*fake_stats, ref_stats["mu_s"], ref_stats["sigma_s"])
        results.update(frechet_entries("sfid", sfid, counts, FEATURE_DIMS["spatial"]))
    results.update(inception_score_entries(fake["logits"]))
    if (prec_recall and ref_feats is not None
            and min(len(ref_feats["pool"]), len(fake["pool"])) <= PR_NEIGHBOURS):
        results.setdefault("skipped", {})["precision/recall"] = (
            f"needs more than {PR_NEIGHBOURS} images on each side (k = {PR_NEIGHBOURS} nearest "
            f"neighbours); the reference has {len(ref_feats['pool'])}, the samples "
            f"{len(fake['pool'])}")
    elif prec_recall and ref_feats is not None:
        results["num_ref_images"] = len(ref_feats["pool"])
        results["precision"], results["recall"] = precision_recall(ref_feats["pool"], fake["pool"],
                                                                   device=dist.device)
    write_results(results, out or default_out("gen"))


def run_stats(dist):
    if not images or not out:
        raise SystemExit("stats needs --images (.npz with arr_0, or a folder) and --out (the .npz "
                         "to write)")
    source = at_least_two(ImageSource(images, resolution, num_workers=num_workers), "--images",
                          num_images)
    inception = load_inception(inception_path, dist.device)
    feats = inception_features(source, inception, dist, batch_size, num_images, "images")
    # skipped, each named in a warning (the first data.MAX_IMAGE_WARNINGS)
    unreadable = total(source.n_bad, dist)
    if dist.master:
        # written atomically: a failed write keeps an existing reference whole
        stats = stats_of(feats, dist.device)
        checkpoints.atomic_write(out, lambda fh: np.savez(
            fh, **stats, num_images=len(feats["pool"]), num_unreadable=unreadable))
        skipped = (f" ({unreadable} unreadable skipped, see the warnings above)" if unreadable
                   else "")
        print(f"wrote FID statistics of {len(feats['pool'])} images{skipped} to {out}")


def run_classes(dist):
    if not samples.endswith(".npz"):
        raise SystemExit("classes needs --samples, an .npz of samples and their labels (sample.py "
                         "--num-samples writes one)")
    require_zip(samples)
    with np.load(samples) as f:
        if "labels" not in f.files:
            raise SystemExit(f"--samples {samples} has no labels; classes needs the .npz of "
                             "sample.py --num-samples")
        labels = f["labels"]
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise SystemExit(f"--samples {samples}: labels of shape {labels.shape} and type "
                         f"{labels.dtype}; classes needs one whole-number label per image, shape "
                         "(N,), as sample.py --num-samples writes them")
    labels = torch.from_numpy(labels).long()
    source = ImageSource(samples, 0)
    n, res = source.count(num_images), source.shape[1]
    if len(labels) != source.n or source.n == 0:
        raise SystemExit(f"--samples {samples}: {source.n} images and {len(labels)} labels; "
                         "classes needs one label per image")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise SystemExit(f"--samples {samples}: labels in [{labels.min()}, {labels.max()}], not in "
                         f"[0, --num-classes {num_classes})")
    if not dist.master:  # small work (the built-in data is small): rank 0 does it all
        return
    judge = train_pattern_classifier(res, num_classes, steps=judge_steps, device=dist.device)

    # uint8 pixel values (as floats in [0, 255]) -> the judge's (features (N, D), class (N,))
    @torch.no_grad()
    def judged(batches):
        feats = torch.cat([judge.embed(x.to(dist.device) / 127.5 - 1).cpu() for x in batches])
        return feats, judge.head(feats).argmax(1)

    feats, pred = judged(source.batches(0, n, batch_size))  # (n, D), (n,)
    heldout = ProceduralDataset(res, num_classes, size=HELDOUT_SIZE, seed=HELDOUT_SEED)
    # rounded to uint8 like the samples
    real_feats, real_pred = judged(to_pixels(x) for x, _ in InOrder(heldout, batch_size))
    # item i of the built-in data is of class i mod K
    real_labels = torch.arange(HELDOUT_SIZE) % num_classes
    y = labels[:n]
    names = heldout.class_names
    results = {"mode": "classes", "samples": samples, "num_samples": n, "resolution": res,
               "num_classes": num_classes, "accuracy": (pred == y).float().mean().item(),
               "chance": 1 / num_classes,
               "real_accuracy": (real_pred == real_labels).float().mean().item(),
               # the Frechet distance between the samples and held-out real images in the judge's
               # feature space
               "judge_fd": frechet_distance(*feature_stats(feats), *feature_stats(real_feats)),
               "per_class_accuracy": {names[c]: round((pred[y == c] == c).float().mean().item(), 3)
                                      for c in range(num_classes) if (y == c).any()}}
    write_results(results, out or default_out("classes"))


MODES = {"recon": run_recon, "gen": run_gen, "stats": run_stats, "classes": run_classes}


def main():
    if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help"):
        print(__doc__)
        common.configure(SETTINGS, ["--help"])  # lists the settings and exits
    mode = sys.argv[1]
    if mode not in MODES:
        raise SystemExit(f"error: unknown mode {mode!r}; usage: python eval.py "
                         f"{{{','.join(MODES)}}} --name value ...")
    settings, _ = common.configure(SETTINGS, sys.argv[2:])  # the settings follow the mode
    globals().update(settings)
    # out of range: refused before any work, a size past its bound before any allocation
    common.check_settings(
        settings, count=("resolution", "batch_size", "judge_steps", "num_classes"),
        count_or_0=("num_images", "num_workers", "seed"), steps=("decode_steps",),
        positive=("dist_timeout",),
        at_most={"resolution": common.MAX_RESOLUTION, "num_images": common.MAX_SIZE,
                 "batch_size": common.MAX_BATCH, "num_workers": common.MAX_WORKERS,
                 "judge_steps": common.MAX_STEPS, "seed": common.MAX_SEED,
                 "dist_timeout": common.MAX_SECONDS})
    # an unavailable --device is refused here, before any work
    dist = common.setup_distributed(device, dist_timeout)
    check_output(mode, dist)  # and an output that cannot be written, before anything is loaded
    with common.user_errors():  # a missing weight file, folder or checkpoint: one line saying which
        MODES[mode](dist)
    common.shutdown(dist)


if __name__ == "__main__":
    main()
