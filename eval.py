"""
Evaluation: the numbers papers report, computed the way the field computes them.

    python eval.py recon --ckpt out/ae/ckpt.pt --data /imagenet/val  # stage 1: PSNR SSIM LPIPS rFID
    # stage 2: FID sFID IS P/R
    python eval.py gen --samples samples.npz --ref VIRTUAL_imagenet256_labeled.npz
    python eval.py stats --images /path/to/images --out stats.npz    # FID statistics, for --ref
    python eval.py classes --samples out/dit/samples.npz  # built-in data: samples of their class?
    python eval.py classes --samples S.npz --data photos/train --val-data photos/val  # a folder's
    torchrun --nproc_per_node=8 eval.py <mode> ...                   # same, sharded over GPUs

recon: each image of --data, ADM center-cropped to the model's resolution, against its
reconstruction. gen: the samples (.npz with arr_0, as sample.py writes, or a folder) against a
reference .npz of statistics (mu, sigma; mu_s, sigma_s for sFID; ADM's batch also holds 10K images
in arr_0, for precision/recall), or images. classes: where FID's ImageNet Inception means little,
a small CNN (procedural.PatternClassifier) trained on built-in images names each sample's pattern;
with --ae-ckpt (the stage-1 model) it also scores that autoencoder's reconstructions of the held-out
images, the latent's ceiling, and gives the samples' FD to them. Several sample files (--samples
a.npz,b.npz) share one judge and one reconstruction; each result goes beside its file.

Conventions, chosen to match published numbers (formulas and constants in support/metrics.py):
  - Every metric is computed on uint8 images, what a saved PNG holds: reconstructions are rounded
    like the originals. PSNR, SSIM and LPIPS are per image, then averaged over images.
  - FID statistics: InceptionV3 pool features (sFID: mixed_6/conv), float64, covariance over N - 1.
    Our PyTorch port of the TF network resizes differently (support/inception.py), so gFID is
    close to, not identical with, the ADM evaluator's: for a paper table, also run theirs.
  - Under torchrun each rank takes a contiguous run of the single-process batches, gathered in rank
    order (support/eval_data.py): rank 0 sees the single-process arrays (and recon the same decoder
    noise) on any number of GPUs, and alone computes and writes the results.
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
from support.data import ImageFolderDataset, InOrder, check_judge_classes, to_model_range
from support.eval_data import (FEATURE_DIMS, HELDOUT_SEED, HELDOUT_SIZE, ImageSource, at_least_two,
                               check_reference_stats, frechet_entries, gather_rows,
                               inception_features, inception_score_entries, labelled_samples,
                               readable_or_refuse, require_zip, sample_files, stats_of, table_path,
                               to_pixels, total, write_results)
from support.inception import load_inception
from support.metrics import (band_power, conditional_mean_mse, feature_stats, frechet_distance,
                             highfreq_energy, highfreq_ratio, lowfreq_psnr,
                             precision_recall, psnr, psnr_of_mse, ssim)
from support.perceptual import load_lpips
from support.procedural import ProceduralDataset, train_pattern_classifier

# -----------------------------------------------------------------------------
# settings (override with --name value)
ckpt = ""  # recon: stage-1 checkpoint written by train_ae.py
data = ""  # recon: folder of images to reconstruct (ImageNet val: 50K images); classes: see below
samples = ""  # gen: images, .npz with arr_0 (N, H, W, 3) uint8 or folder; classes: .npz[,.npz...]
ref = ""  # gen: reference .npz with mu/sigma[/mu_s/sigma_s][/arr_0], or images (.npz or folder)
images = ""  # stats: images to summarise (.npz or folder)
out = ""  # results .json (the table goes beside it as .txt); stats: the .npz to write
resolution = 256  # gen/stats: folder images are ADM center-cropped to this size
num_images = 0  # recon/gen/stats: use only the first N images (0 = all)
batch_size = 50  # images per forward pass (per process)
num_workers = min(4, os.cpu_count() or 1)  # data-loader workers for folders (fewer on fewer cores)
decode_steps = None  # recon, classes: the diffusion decoder's Euler steps (None = the checkpoint's)
seed = 0  # recon, classes: decoder noise seed (each batch: seed + the index of its first image)
prec_recall = True  # gen: precision/recall when the reference holds images (10K for ADM's batch)
inception_path = ""  # pt_inception-2015-12-05-6726825d.pth (or $DGAE_INCEPTION, $DGAE_WEIGHTS)
vgg_path = ""  # vgg16-397923af.pth (or $DGAE_VGG16)
lpips_path = ""  # LPIPS v0.1 vgg.pth (or $DGAE_LPIPS)
num_classes = 10  # classes: how many built-in classes the DiT was trained on (train_dit.py: 10)
judge_steps = 600  # classes: training steps of the pattern classifier that judges the samples
# classes on natural images: the judge learns --data (a sub-folder per class, two or more, as
# train_dit.py read it) and is scored on --val-data's held-out images
val_data = ""  # classes: held-out images of --data's classes ("" = --data's val split, else --data)
ae_ckpt = ""  # classes: the stage-1 checkpoint the DiT's latents came from ("" = none)
device = ""  # "" = auto (cuda, mps, cpu)
dist_timeout = 600  # torchrun: seconds a rank waits for others (rank 0 alone computes distances)
# -----------------------------------------------------------------------------
SETTINGS = common.settings_block(globals())  # the defaults above: every main() starts from them


def default_out(mode, steps=None, path=None):
    """Where `mode` writes its results without --out, beside its input (path: one of classes'
    samples; stats needs --out)."""
    if mode == "recon":
        return os.path.join(os.path.dirname(os.path.abspath(ckpt)), f"eval_recon_steps{steps}.json")
    return os.path.splitext((path or samples).rstrip("/"))[0] + ("_eval.json" if mode == "gen"
                                                                 else "_classes.json")


def check_output(mode, dist):
    """Refuse, before minutes of loading and scoring, a results file (--out, or the default beside
    the input) that rank 0 could not write at the end (common.writable_file)."""
    if not dist.master:
        return
    if out:
        if mode == "classes" and len(sample_files(samples)) > 1:
            raise SystemExit("error: --out names one results file; with several --samples each "
                             "result goes beside its samples (leave --out out)")
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
        for each in sample_files(samples) if mode == "classes" else [samples]:
            path = default_out(mode, path=each)
            common.writable_file(path, "--out (not given, so beside --samples)",
                                 also=(table_path(path),))


# -----------------------------------------------------------------------------
# the four modes


def meancolour_psnr(real):
    """(B,) PSNR of the trivial baseline that paints each image its own mean colour: the floor a
    reconstruction must beat to show that the decoder uses z at all."""
    return psnr(real, real.double().mean(dim=(2, 3), keepdim=True).expand_as(real))


@torch.inference_mode()  # the reconstructions only feed the metrics
def score_reconstructions(model, source, steps, dist, limit, bs, seed, lpips_net=None,
                          inception=None, mean_of=0, judge=None, pool=0):
    """Reconstruct the first `limit` (0 = all) images of `source` and measure them against the
    originals -> {metric: value} (complete on rank 0): per-image means of PSNR, SSIM, low-frequency
    PSNR, the mean-colour floor and LPIPS (if given), the high-frequency ratio, the spectral Frechet
    distance (metrics.band_power), rFID (if given), the decoding time. The batch of images i.. is
    decoded with noise seed seed + i: the numbers do not depend on the number of processes.
    mean_of = K > 1 (a diffusion decoder): also the PSNR and low-frequency PSNR of the mean of K
    decodes (psnr_mean: 1/K of the sampling variance left) and of the decoder's conditional mean
    E[x | z] (psnr_ez, lowfreq_psnr_ez: metrics.conditional_mean_mse on the unrounded decodes).
    pool: the low-/high-frequency split's pooling (0 = the model's f; fixed: one meaning across f).
    judge (a procedural.PatternClassifier; `source` a folder or the built-in data, which give
    each image's class): its accuracy on the reconstructions and the Frechet distance of its
    features."""
    f = pool or model.cfg.compression
    lo, hi = source.shard(limit, bs, dist)
    per_image = {k: [] for k in ("psnr", "ssim", "lowfreq_psnr", "meancolour_psnr", "lpips",
                                 "psnr_mean", "lowfreq_psnr_mean", "psnr_ez", "lowfreq_psnr_ez",
                                 "judge_correct")}
    # per-image features of the originals and of their reconstructions, and their widths
    widths = {"hf": (), "spectrum": (3 * (model.cfg.resolution // 2),),
              "pool": (FEATURE_DIMS["pool"],),
              "judge": (judge.head.in_features if judge is not None else 0,)}
    feats = {side: {k: [] for k in widths} for side in ("real", "recon")}

    def add(rows, key, values):  # a batch's (B, ...) values, kept as numpy
        rows[key].append(values.cpu().numpy())

    decode_s = 0.0
    batches = source.batches(lo, hi, bs, labels=judge is not None)
    for real in tqdm(batches, total=math.ceil((hi - lo) / bs), desc="recon",
                     disable=not dist.master):
        real, labels = real if judge is not None else (real, None)  # labels: (B,) classes
        real = real.to(dist.device)  # (B, 3, res, res) uint8 values
        first = source.first  # the index of the batch's first image
        t0 = time.perf_counter()
        with common.autocast_context(dist.device):
            rec = model.reconstruct(real / 127.5 - 1, steps=steps, seed=seed + first)
        if dist.device.type == "cuda":
            torch.cuda.synchronize()
        decode_s += time.perf_counter() - t0
        rec = to_pixels(rec)  # quantised like the originals: what a saved reconstruction PNG holds
        add(per_image, "psnr", psnr(real, rec))
        add(per_image, "ssim", ssim(real, rec))
        add(per_image, "lowfreq_psnr", lowfreq_psnr(real, rec, f))
        add(per_image, "meancolour_psnr", meancolour_psnr(real))
        if lpips_net is not None:
            add(per_image, "lpips", lpips_net(real / 127.5 - 1, rec / 127.5 - 1).double())
        for side, images in (("real", real), ("recon", rec)):
            add(feats[side], "hf", highfreq_energy(images, f))
            add(feats[side], "spectrum", band_power(images))
            if inception is not None:
                add(feats[side], "pool", inception(images / 255)["pool"])
        if mean_of > 1:
            with common.autocast_context(dist.device):
                z = model.encode(real / 127.5 - 1)
                decodes = [model.decode(z, steps, seed=seed + first + 7919 * k).float()
                           for k in range(mean_of)]
            decodes = torch.stack(decodes)  # (K, B, 3, H, W)
            mean_rec = to_pixels(decodes.mean(0))  # (B, 3, H, W): the mean of K decodes, rounded
            add(per_image, "psnr_mean", psnr(real, mean_rec))
            add(per_image, "lowfreq_psnr_mean", lowfreq_psnr(real, mean_rec, f))
            px = (decodes.clamp(-1, 1) + 1) * 127.5  # (K, B, 3, H, W) pixel values, unrounded
            pooled = F.avg_pool2d(px.flatten(0, 1).double(), f).unflatten(0, px.shape[:2])
            add(per_image, "psnr_ez", psnr_of_mse(conditional_mean_mse(px, real)))
            add(per_image, "lowfreq_psnr_ez", psnr_of_mse(
                conditional_mean_mse(pooled, F.avg_pool2d(real.double(), f))))
        if judge is not None:
            add(feats["real"], "judge", judge.embed(real / 127.5 - 1).double())
            embedded = judge.embed(rec / 127.5 - 1)
            add(feats["recon"], "judge", embedded.double())
            correct = judge.head(embedded).argmax(1) == labels.to(real.device)
            add(per_image, "judge_correct", correct.double())
    per_image = {k: gather_rows(v, (), dist) for k, v in per_image.items()}
    real_feats, recon_feats = [{k: gather_rows(v, widths[k], dist) for k, v in feats[side].items()}
                               for side in ("real", "recon")]
    n = len(per_image["psnr"])
    # the FDs are of covariances
    readable_or_refuse(source, n, hi - lo, dist, at_least=2, needs=RECON_NEEDS)
    results = {"num_images": n, "num_unreadable": total(source.n_bad, dist)}
    results.update({k: float(v.mean()) for k, v in per_image.items() if len(v)})
    results["highfreq_ratio"] = highfreq_ratio(recon_feats["hf"], real_feats["hf"])

    def frechet(key, device="cpu"):  # between the originals' features and the reconstructions'
        return frechet_distance(*feature_stats(real_feats[key], device),
                                *feature_stats(recon_feats[key], device))

    if dist.master:
        results["spectral_fd"] = frechet("spectrum")
        if judge is not None:
            results["judge_accuracy"] = results.pop("judge_correct")
            results["judge_fd"] = frechet("judge")
        if inception is not None:
            results["rfid"] = frechet("pool", dist.device)
    results["decode_ms_per_image"] = 1000 * decode_s / max(hi - lo, 1)  # this rank's
    return results


# what recon's least of 2 images is for, as its refusals say it
RECON_NEEDS = "the spectral FD and rFID need"


def run_recon(dist):
    """Stage-1 reconstruction quality; LPIPS and rFID when their weight files are present."""
    if not ckpt:
        raise SystemExit("recon needs --ckpt (a train_ae.py checkpoint); --data is an image "
                         "folder, or empty for held-out images of the built-in dataset")
    if num_images == 1:  # the spectral FD (and rFID) are distances between covariances
        raise SystemExit("error: recon --num-images 1: the spectral FD and rFID need at least 2 "
                         "images; give 2 or more, or 0 for all")
    model = checkpoints.load_dgae(ckpt, dist.device)
    steps = decode_steps or model.cfg.decode_steps
    # a weight file's path the user typed must exist (find_weights raises); none at the default
    # location skips its measure
    lpips_net = load_lpips(vgg_path, lpips_path, required=False, device=dist.device)
    inception = load_inception(inception_path, dist.device, required=False)
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
        skipped = {}
        if lpips_net is None:
            skipped["lpips"] = "VGG16 / LPIPS weight files not found (--vgg-path, --lpips-path)"
        if inception is None:
            skipped["rfid"] = "FID Inception weight file not found (--inception-path)"
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
    if prec_recall and ref_feats is not None:
        n_ref = len(ref_feats["pool"])
        if min(n_ref, n) <= PR_NEIGHBOURS:
            results["skipped"] = {"precision/recall": (
                f"needs more than {PR_NEIGHBOURS} images on each side (k = {PR_NEIGHBOURS} nearest "
                f"neighbours); the reference has {n_ref}, the samples {n}")}
        else:
            results["num_ref_images"] = n_ref
            results["precision"], results["recall"] = precision_recall(
                ref_feats["pool"], fake["pool"], device=dist.device)
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
    # several sample files (e.g. one per training step) share one judge and one reconstruction
    paths = sample_files(samples)
    sets = [labelled_samples(path) for path in paths]  # every file checked before any work
    res = sets[0][0].shape[1]
    for path, (source, _) in zip(paths, sets):
        if source.shape[1] != res:
            raise SystemExit(f"--samples {path}: {source.shape[1]} px, {paths[0]}: {res} px; "
                             "score samples of one resolution together")
    if data:  # the judge learns the labelled folder; the real images are its held-out split
        learn = ImageFolderDataset(data, res)
        heldout = ImageFolderDataset(val_data or data, res, split="val")
        check_judge_classes(learn, heldout, f"--val-data {val_data or data}")
        names = learn.classes
    else:
        learn = None
        heldout = ProceduralDataset(res, num_classes, size=HELDOUT_SIZE, seed=HELDOUT_SEED)
        names = heldout.class_names
    k = len(names)
    for path, (_, labels) in zip(paths, sets):
        if labels.min() < 0 or labels.max() >= k:
            raise SystemExit(f"--samples {path}: labels in [{labels.min()}, {labels.max()}], not "
                             + (f"in [0, {k}): --data has {k} classes" if data else
                                f"in [0, --num-classes {k})"))
    # the stage-1 model is read (and a wrong one refused) on every rank, before any work
    model = checkpoints.load_dgae(ae_ckpt, dist.device) if ae_ckpt else None
    if model is not None and model.cfg.resolution != res:
        raise SystemExit(f"--ae-ckpt {ae_ckpt} works at {model.cfg.resolution} px, --samples are "
                         f"{res} px; give the stage-1 checkpoint the DiT's latents came from")
    if not dist.master:  # small work (the built-in data is small): rank 0 does it all
        return
    judge = train_pattern_classifier(res, k, steps=judge_steps, device=dist.device, images=learn)

    # uint8 pixel values (as floats in [0, 255]) -> the judge's (features (N, D), class (N,))
    @torch.no_grad()
    def judged(batches):
        feats = torch.cat([judge.embed(x.to(dist.device) / 127.5 - 1).cpu() for x in batches])
        return feats, judge.head(feats).argmax(1)

    @torch.inference_mode()
    def reconstructed(px, first):  # (B, 3, H, W) pixel values -> their reconstructions, rounded
        with common.autocast_context(dist.device):  # decoder noise: seed + the batch's first index
            x = px.to(dist.device) / 127.5 - 1
            return to_pixels(model.reconstruct(x, steps=decode_steps, seed=seed + first))

    # the held-out real images, rounded to uint8 like the samples, and their classes; with
    # --ae-ckpt the same rounded images through the autoencoder too (the latent's ceiling)
    real, rec = [], []
    batches = InOrder(heldout, batch_size)
    for x, y in batches:
        px = to_pixels(to_model_range(x))  # (B, 3, H, W)
        real.append((*judged([px]), y))
        if model is not None:
            rec.append(judged([reconstructed(px, batches.first)]))  # the same labels as real
    if not real:
        raise SystemExit(f"--val-data {val_data or data}: none of its images could be read")
    real_feats, real_pred, real_labels = (torch.cat(parts) for parts in zip(*real))
    real_stats = feature_stats(real_feats)  # once, for every sample file
    real_accuracy = (real_pred == real_labels).float().mean().item()
    if model is not None:
        rec_feats, rec_pred = (torch.cat(parts) for parts in zip(*rec))
        rec_stats = feature_stats(rec_feats)
        recon_accuracy = (rec_pred == real_labels).float().mean().item()
    for path, (source, labels) in zip(paths, sets):
        n = source.count(num_images)
        feats, pred = judged(source.batches(0, n, batch_size))  # (n, D), (n,)
        y = labels[:n]
        stats = feature_stats(feats)
        ceiling = {} if model is None else {
            "ae_ckpt": ae_ckpt, "recon_accuracy": recon_accuracy,
            # the samples against the reconstructions: 0 = the DiT reached its ceiling
            "judge_fd_recon": frechet_distance(*stats, *rec_stats)}
        results = {"mode": "classes", "samples": path, "num_samples": n, "resolution": res,
                   "num_classes": k, "judged_on": data or "built-in data",
                   "accuracy": (pred == y).float().mean().item(), "chance": 1 / k,
                   "real_accuracy": real_accuracy,
                   # the Frechet distance to held-out real images in the judge's feature space
                   "judge_fd": frechet_distance(*stats, *real_stats),
                   **ceiling,
                   "per_class_accuracy": {names[c]: round((pred[y == c] == c).float().mean()
                                                          .item(), 3)
                                          for c in range(k) if (y == c).any()}}
        write_results(results, out or default_out("classes", path=path))


MODES = {"recon": run_recon, "gen": run_gen, "stats": run_stats, "classes": run_classes}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        common.configure(SETTINGS, ["--help"])  # lists the settings and exits
    mode = argv[0]
    if mode not in MODES:
        raise SystemExit(f"error: unknown mode {mode!r}; usage: python eval.py "
                         f"{{{','.join(MODES)}}} --name value ...")
    settings, _ = common.configure(SETTINGS, argv[1:])  # the settings follow the mode
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
    dist = common.setup_distributed(device, dist_timeout)  # an unavailable --device: refused here
    check_output(mode, dist)  # and an output that cannot be written, before anything is loaded
    with common.user_errors():  # a missing weight file, folder or checkpoint: one line saying which
        MODES[mode](dist)
    common.shutdown(dist)


if __name__ == "__main__":
    main()
