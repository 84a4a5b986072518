"""Fault injection for the data path: a latent cache that no longer matches its meta.json,
damaged cache files, a data folder where no image can be read, an image too large to decode.

Every fault is a real file on disk. Every refusal must be one line that names the file and what to
do, never a traceback and never torch's advice to load with weights_only=False; where the line
says what to delete, the test deletes exactly that and checks that the next run gives the cache a
fresh build would give.
"""

import importlib
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import warnings
import zlib

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

import eval as ev
import train_ae
from support import data, eval_data
from support.data import ImageFolderDataset, Loader, collate_skip_bad, first_good
from support.latents import LatentCache
from support.procedural import ProceduralDataset
from test_latents import SOLO, build, save_tiny_ae
from test_train_dit import DIT_FAST, ROOT

# -----------------------------------------------------------------------------
# the latent cache checks itself against meta.json


@pytest.fixture
def ae(tmp_path):
    return save_tiny_ae(tmp_path / "ae.pt")


def refused(call):
    """Run call(); return the one-line message it stops with."""
    with pytest.raises(SystemExit) as e:
        call()
    message = str(e.value)
    assert message.startswith("error: ") and "\n" not in message and "weights_only" not in message, message
    return message


def assert_same_cache(a, b):
    a, b = LatentCache(a), LatentCache(b)
    assert len(a.shards) == len(b.shards) and len(a) == len(b)
    for sa, sb in zip(a.shards, b.shards):
        assert torch.equal(sa["z"], sb["z"]) and torch.equal(sa["y"], sb["y"])
    assert torch.equal(a.mean, b.mean) and torch.equal(a.std, b.std)


def test_a_missing_shard_is_refused_not_trained_on_half_the_data(tmp_path, ae):
    # 64 images in 2 shards, one deleted while stats.pt remains: train_dit.py must refuse, not train
    # on the 32 left and exit 0
    good = build(tmp_path, tmp_path / "ae.pt", ProceduralDataset(16, size=64), cache="cache", shard_size=32)
    shutil.copytree(good, tmp_path / "pristine")
    os.remove(tmp_path / "cache/shard_00001.pt")
    args = [*DIT_FAST, "--dataset-size", "64", "--shard-size", "32", "--max-steps", "1"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "train_dit.py"), *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: latent shard cache/shard_00001.pt is missing (meta.json lists 2 shards for 64 images); delete "
        "cache/stats.pt and run again to encode it again, or delete the folder cache to encode all the latents again")
    assert not os.path.exists(tmp_path / "out/dit/ckpt.pt")
    # the advice works: with stats.pt gone, only shard 1 is encoded again, and the cache is whole
    os.remove(tmp_path / "cache/stats.pt")
    build(tmp_path, tmp_path / "ae.pt", ProceduralDataset(16, size=64), cache="cache", shard_size=32)
    assert_same_cache(tmp_path / "cache", tmp_path / "pristine")
    assert len(LatentCache(str(tmp_path / "cache"))) == 64


def _random_bytes(path):
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8).tobytes())


def _edit(path, change):
    """Load a cache .pt file, change(d) it, save it back (a well-formed file with wrong contents)."""
    torch.save(change(torch.load(path, weights_only=True)), path)


def _fewer_images(d):
    z, y = d["z"][:1], d["y"][:1]
    z64 = z.double()
    return dict(d, z=z, y=y, sum=z64.sum((0, 1, 3, 4)), sumsq=z64.pow(2).sum((0, 1, 3, 4)), count=z64[:, :, 0].numel())


def _write(text):
    return lambda path: path.write_text(text)


# (what is done to which file of a 10-image cache in shards of 4, the start of the line, the files
# the line says to delete: deleting exactly those must lead to the cache a fresh build gives)
CACHE_FAULTS = {
    "shard missing": ("shard_00001.pt", os.remove, "latent shard {c}/shard_00001.pt is missing (meta.json lists 3 "
                      "shards for 10 images); delete {c}/stats.pt and run", ["stats.pt"]),
    "shard empty file": ("shard_00001.pt", lambda p: p.write_bytes(b""), "latent shard {c}/shard_00001.pt cannot "
                         "be read", ["shard_00001.pt", "stats.pt"]),
    "shard random bytes": ("shard_00002.pt", _random_bytes, "latent shard {c}/shard_00002.pt cannot be read",
                           ["shard_00002.pt", "stats.pt"]),
    "shard truncated": ("shard_00000.pt", lambda p: p.write_bytes(p.read_bytes()[:500]),
                        "latent shard {c}/shard_00000.pt cannot be read", ["shard_00000.pt", "stats.pt"]),
    "shard wrong keys": ("shard_00001.pt", lambda p: _edit(p, lambda d: {"latents": d["z"], "labels": d["y"]}),
                         "latent shard {c}/shard_00001.pt is damaged (holds ['labels', 'latents'], not the keys z, y",
                         ["shard_00001.pt", "stats.pt"]),
    "shard not a dict": ("shard_00001.pt", lambda p: torch.save([1, 2], p), "latent shard {c}/shard_00001.pt is "
                         "damaged (holds list", ["shard_00001.pt", "stats.pt"]),
    "shard other latent shape": ("shard_00001.pt", lambda p: _edit(p, lambda d: dict(d, z=d["z"][:, :, :2])),
                                 "latent shard {c}/shard_00001.pt is damaged (has z (4, 2, 2, 2, 2) torch.float16",
                                 ["shard_00001.pt", "stats.pt"]),
    "shard fewer images": ("shard_00001.pt", lambda p: _edit(p, _fewer_images), "latent shard {c}/shard_00001.pt is "
                           "damaged (holds 1 latents and 0 skipped images, but meta.json gives it images 4..7 (4))",
                           ["shard_00001.pt", "stats.pt"]),
    "shard labels past the classes": ("shard_00001.pt", lambda p: _edit(p, lambda d: dict(d, y=d["y"] + 99)),
                                      "latent shard {c}/shard_00001.pt is damaged (has class labels",
                                      ["shard_00001.pt", "stats.pt"]),
    "stats random bytes": ("stats.pt", _random_bytes, "{c}/stats.pt cannot be read (UnpicklingError", ["stats.pt"]),
    "stats empty file": ("stats.pt", lambda p: p.write_bytes(b""), "{c}/stats.pt cannot be read", ["stats.pt"]),
    "stats wrong keys": ("stats.pt", lambda p: _edit(p, lambda d: {"mu": d["mean"], "sigma": d["std"]}),
                         "{c}/stats.pt is damaged (holds ['mu', 'sigma'], not the keys mean, std", ["stats.pt"]),
    "stats NaN": ("stats.pt", lambda p: _edit(p, lambda d: dict(d, mean=d["mean"] * float("nan"))),
                  "{c}/stats.pt is damaged (mean and std must be 4 finite float32 values", ["stats.pt"]),
    "stats of other shards": ("stats.pt", lambda p: _edit(p, lambda d: dict(d, count=d["count"] // 2)),
                              "{c}/stats.pt is damaged (its counts do not match the shards)", ["stats.pt"]),
    "meta not JSON": ("meta.json", _write("{bad"), "{c}/meta.json is damaged (JSONDecodeError", ["."]),
    "meta empty": ("meta.json", _write(""), "{c}/meta.json is damaged (JSONDecodeError", ["."]),
    "meta a list": ("meta.json", _write("[1, 2]"), "{c}/meta.json is damaged (holds a JSON list", ["."]),
    "meta shard_size 0": ("meta.json", lambda p: p.write_text(p.read_text().replace('"shard_size": 4', '"shard_size": 0')),
                          "{c}/meta.json is damaged (shard_size is 0)", ["."]),
    "meta missing": ("meta.json", os.remove, "the latent cache {c} has latent files but no meta.json", ["."]),
}


@pytest.mark.parametrize("case", list(CACHE_FAULTS))
def test_a_damaged_latent_cache_is_one_line_naming_the_file_and_the_fix_works(tmp_path, ae, case):
    name, inject, start, fix = CACHE_FAULTS[case]
    ds = ProceduralDataset(16, size=10)
    pristine = build(tmp_path, tmp_path / "ae.pt", ds, cache="pristine")
    shutil.copytree(pristine, tmp_path / "cache")
    c = str(tmp_path / "cache")
    inject(tmp_path / "cache" / name)

    def start_training():  # what train_dit.main does: step 1, then open the cache
        build(tmp_path, tmp_path / "ae.pt", ds, cache="cache")
        LatentCache(c)

    message = refused(start_training)
    assert message.startswith("error: " + start.format(c=c)), message
    for f in fix:  # the line names what to delete (the folder itself: ".")
        assert (os.path.join(c, f) if f != "." else f"the folder {c}") in message, message
    for f in fix:
        path = tmp_path / "cache" / f
        shutil.rmtree(path) if path.is_dir() else os.remove(path) if path.exists() else None
    start_training()  # encodes what was deleted, no more, and recomputes the statistics
    assert_same_cache(c, pristine)


def test_a_stray_shard_beyond_meta_json_is_not_read(tmp_path, ae):
    ds = ProceduralDataset(16, size=10)
    cache = build(tmp_path, tmp_path / "ae.pt", ds)
    shutil.copy(os.path.join(cache, "shard_00000.pt"), os.path.join(cache, "shard_00003.pt"))
    assert len(LatentCache(cache)) == 10  # meta.json lists shards 0..2; a glob would have read 14


# -----------------------------------------------------------------------------
# a data folder where no image can be read


def bad_folder(root, n=3):
    """Two classes of files with image names that no decoder can read: text, empty, truncated PNG."""
    buf = io.BytesIO()
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(buf, format="PNG")
    for c in ("a", "b"):
        os.makedirs(root / c)
        for i in range(n):
            (root / c / f"text{i}.jpg").write_text("not an image")
        (root / c / "empty.png").write_bytes(b"")
        (root / c / "truncated.png").write_bytes(buf.getvalue()[:40])
    return root


def test_no_readable_image_is_one_line_in_first_good_and_the_loader(tmp_path):
    ds = ImageFolderDataset(str(bad_folder(tmp_path / "bad")), 16)
    expected = f"error: {tmp_path / 'bad'}: none of its 10 images could be read (the warnings above say why)"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert refused(lambda: first_good(ds, 8)).startswith(expected)  # train_ae.py's grid, sample.py's recon
        # the loader stops after an epoch's share of unreadable images, rather than loop for ever in silence
        line = refused(lambda: next(Loader(ds, batch_size=4)))  # 2 batches of 4 per epoch
        assert line.startswith(f"error: {tmp_path / 'bad'}: 8 of its 10 images in a row could not be read")
    # one readable image is enough: it is found however late it comes, and the loader yields it
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(tmp_path / "bad/b/zz.png")
    ds = ImageFolderDataset(str(tmp_path / "bad"), 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert first_good(ds, 8) == [10]
        loader = Loader(ds, batch_size=11)
        x, y = next(loader)
    assert len(y) == 1 and loader.n_bad == 10


def test_unreadable_images_are_named_in_at_most_max_image_warnings_then_only_counted(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "MAX_IMAGE_WARNINGS", 3)
    ds = ImageFolderDataset(str(bad_folder(tmp_path / "bad")), 16)  # 10 unreadable files
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert all(ds[i] is None for i in range(10)) and ds[0] is None  # every one skipped, the first twice
    lines = [str(w.message) for w in caught]
    assert len(lines) == 4 and all(line.startswith("skipping image") for line in lines[:3])
    assert lines[3].startswith("more than 3 unreadable images: the others are skipped without a warning")


def test_no_readable_image_stops_train_ae_before_training(tmp_path, monkeypatch):
    bad_folder(tmp_path / "bad")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["train_ae.py", "--data", "bad", "--preset", "tiny", "--resolution", "16",
                                      "--batch-size", "4", "--lpips-weight", "0", "--max-steps", "2"])
    with pytest.warns(UserWarning, match="skipping image"):
        line = refused(train_ae.main)  # one line, not a traceback from stacking an empty batch
    assert line.startswith("error: bad: none of its 10 images could be read")
    assert not os.path.exists(tmp_path / "out/ae/ckpt.pt")


def test_no_readable_image_stops_the_latent_cache_and_fixed_images_are_encoded_next_time(tmp_path, ae):
    # the cache must not report itself complete with a NaN stats.pt and no latents: it stops at the encoding
    root = bad_folder(tmp_path / "bad")
    ds = ImageFolderDataset(str(root), 16)
    with pytest.warns(UserWarning, match="skipping image"):
        line = refused(lambda: build(tmp_path, tmp_path / "ae.pt", ds, data=str(root)))
    assert line.startswith(f"error: {root}: none of its 10 images could be read")
    assert os.listdir(tmp_path / "cache") == ["meta.json"]  # no NaN stats.pt, no empty shards kept
    for path, _ in ds.samples:  # the files are repaired in place: the next run encodes them
        Image.fromarray(np.full((20, 20, 3), 90, np.uint8)).save(path, format="PNG")
    lat = LatentCache(build(tmp_path, tmp_path / "ae.pt", ds, data=str(root)))
    assert len(lat) == 10 and lat.mean.isfinite().all()


def test_no_readable_image_stops_eval_recon_without_writing_results(tmp_path, ae, monkeypatch):
    # no exit 0 and no results file scored on 0 images
    bad_folder(tmp_path / "bad")
    importlib.reload(ev)
    monkeypatch.setattr(sys, "argv", ["eval.py", "recon", "--ckpt", str(tmp_path / "ae.pt"), "--data",
                                      str(tmp_path / "bad"), "--out", str(tmp_path / "r.json"), "--device", "cpu", "--num-workers", "0"])
    with pytest.warns(UserWarning, match="skipping image"):
        line = refused(ev.main)
    assert line.startswith(f"error: {tmp_path / 'bad'}: none of its 10 images could be read")
    assert not os.path.exists(tmp_path / "r.json")


def test_fid_features_of_a_folder_with_one_readable_image_are_refused(tmp_path):
    # at_least_two counts the files; with one of two readable the covariance would be NaN
    (tmp_path / "imgs").mkdir()
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(tmp_path / "imgs/a.png")
    (tmp_path / "imgs/b.png").write_text("not a png")
    src = eval_data.at_least_two(eval_data.ImageSource(str(tmp_path / "imgs"), 16), "--images")

    def features(x):
        return {k: torch.zeros(len(x), d) for k, d in eval_data.FEATURE_DIMS.items()}

    with pytest.warns(UserWarning, match="b.png"), pytest.raises(ValueError) as e:
        eval_data.inception_features(src, features, SOLO, 2)
    assert str(e.value) == (f"{tmp_path / 'imgs'}: only 1 of its 2 images could be read (the warnings above say why); "
                            "FID statistics need at least 2")


def zero_size_png(path):
    """A PNG whose header says 0 x 0 pixels, written chunk by chunk (PIL refuses to write an empty image):
    PIL's Image.open refuses it (UnidentifiedImageError), as it does any image of a side 0."""
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", 0, 0, 8, 2, 0, 0, 0)  # 0 x 0, 8-bit RGB
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


class _PixelFeatures(torch.nn.Module):
    """Stands in for the FID InceptionV3: features of the right widths from each image's pixels."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.proj = {k: torch.randn(3 * 4 * 4, d, generator=g) for k, d in eval_data.FEATURE_DIMS.items()}

    def forward(self, x):
        x = torch.nn.functional.adaptive_avg_pool2d(x, 4).flatten(1)
        return {k: x @ p for k, p in self.proj.items()}


def test_a_zero_size_or_undecodable_image_is_skipped_counted_and_named_by_every_eval_mode(tmp_path, ae, monkeypatch):
    """eval.py recon --data, gen --samples/--ref and stats --images on a folder holding a 0 x 0 PNG and a truncated
    one beside 3 good images: each mode skips both, names them in warnings and counts them in its results. With one
    readable image left, one line, never a traceback (recon's spectral FD raised a linear-algebra error on one
    image); an .npz of 0 x 0 images is one line naming the file (was a traceback from the first network)."""
    import support.inception
    import support.perceptual

    monkeypatch.setattr(support.inception, "load_inception", lambda *a, **k: _PixelFeatures())
    monkeypatch.setattr(support.perceptual, "load_lpips", lambda *a, **k: None)
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(folder / f"g{i}.png")
    zero_size_png(folder / "zero.png")
    with Image.open(folder / "g0.png") as im:
        buf = io.BytesIO()
        im.save(buf, format="PNG")
    (folder / "cut.png").write_bytes(buf.getvalue()[:60])  # the header whole, the pixels cut off

    def run(*argv):
        importlib.reload(ev)  # fresh settings, and the stand-ins above
        monkeypatch.setattr(sys, "argv", ["eval.py", *argv, "--device", "cpu", "--num-workers", "0"])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ev.main()
        named = " ".join(str(w.message) for w in caught if "skipping image" in str(w.message))
        assert "zero.png" in named and "cut.png" in named, named

    run("stats", "--images", str(folder), "--resolution", "16", "--out", str(tmp_path / "s.npz"))
    with np.load(tmp_path / "s.npz") as z:
        assert (int(z["num_images"]), int(z["num_unreadable"])) == (3, 2)
    run("gen", "--samples", str(folder), "--ref", str(folder), "--resolution", "16", "--out", str(tmp_path / "g.json"))
    res = json.load(open(tmp_path / "g.json"))
    assert (res["num_samples"], res["num_unreadable"], res["num_unreadable_ref"]) == (3, 2, 2)
    run("recon", "--ckpt", str(tmp_path / "ae.pt"), "--data", str(folder), "--out", str(tmp_path / "r.json"))
    res = json.load(open(tmp_path / "r.json"))
    assert (res["num_images"], res["num_unreadable"]) == (3, 2) and np.isfinite(res["spectral_fd"])
    # one readable image of three: one line for every mode, and no results file
    os.remove(folder / "g1.png")
    os.remove(folder / "g2.png")
    for argv, needs in [(["recon", "--ckpt", str(tmp_path / "ae.pt"), "--data", str(folder)], "the spectral FD and rFID"),
                        (["stats", "--images", str(folder), "--resolution", "16"], "FID statistics"),
                        (["gen", "--samples", str(folder), "--ref", str(tmp_path / "s.npz"), "--resolution", "16"],
                         "FID statistics")]:
        line = refused(lambda: run(*argv, "--out", str(tmp_path / "one.json")))
        assert line.startswith(f"error: {folder}: only 1 of its 3 images could be read (the warnings above say why); "
                               f"{needs} need at least 2"), line
        assert not (tmp_path / "one.json").exists()
    # an .npz of 0 x 0 images (no decoder to skip them: the array is what it is)
    np.savez(tmp_path / "empty.npz", arr_0=np.zeros((4, 0, 0, 3), np.uint8), labels=np.zeros(4, np.int64))
    for argv in (["stats", "--images", str(tmp_path / "empty.npz"), "--out", str(tmp_path / "e.npz")],
                 ["gen", "--samples", str(tmp_path / "empty.npz"), "--ref", str(tmp_path / "s.npz")],
                 ["classes", "--samples", str(tmp_path / "empty.npz")]):
        importlib.reload(ev)
        monkeypatch.setattr(sys, "argv", ["eval.py", *argv, "--device", "cpu"])
        line = refused(ev.main)
        assert line.startswith(f"error: {tmp_path / 'empty.npz'}: its images are 0 x 0 pixels"), line


# -----------------------------------------------------------------------------
# an image too large to decode


def huge_png(path, width, height):
    """A real, valid 1-bit greyscale PNG of width x height pixels, written chunk by chunk: all-black
    rows deflate ~1000:1, so a 12000 x 12000 image is ~20 KB on disk (and 432 MB decoded to RGB)."""
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    row = b"\0" * (1 + (width + 7) // 8)  # filter byte 0, then the packed bits
    comp = zlib.compressobj(9)
    idat = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1 bit, greyscale, deflate, no interlace
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # PIL's own: it warns, then decodes
def test_an_image_too_large_is_skipped_from_its_header_without_decoding(tmp_path, monkeypatch):
    (tmp_path / "c").mkdir()
    huge_png(tmp_path / "c/huge.png", 12000, 12000)
    with Image.open(tmp_path / "c/huge.png") as im:  # a real PNG: PIL reads its header and checks its chunks
        assert im.size == (12000, 12000) and im.mode == "1"
        im.verify()
    assert os.path.getsize(tmp_path / "c/huge.png") < 100_000
    Image.fromarray(np.full((24, 20, 3), 200, np.uint8)).save(tmp_path / "c/small.png")
    decoded = []  # every image PIL decodes passes through ImageFile.load
    load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda im: decoded.append(im.size) or load(im))
    ds = ImageFolderDataset(str(tmp_path), 16)
    with pytest.warns(UserWarning, match=r"huge.png: ImageTooLarge: 12000x12000 pixels, more than "
                                         r"data.MAX_IMAGE_PIXELS = 67108864; not decoded"):
        items = [ds[i] for i in range(len(ds))]
    assert decoded == [(20, 24)]  # the small image only
    x, y, n_bad = collate_skip_bad(items)  # counted like an unreadable image
    assert n_bad == 1 and x.shape == (1, 3, 16, 16)
    # the bound is inclusive: an image of exactly MAX_IMAGE_PIXELS is decoded, one pixel row more is not
    monkeypatch.setattr(data, "MAX_IMAGE_PIXELS", 24 * 20)
    assert ImageFolderDataset(str(tmp_path), 16)[1] is not None
    Image.fromarray(np.zeros((25, 20, 3), np.uint8)).save(tmp_path / "c/small.png")
    with pytest.warns(UserWarning, match="20x25 pixels"):
        assert ImageFolderDataset(str(tmp_path), 16)[1] is None


def test_an_image_of_extreme_aspect_ratio_is_skipped_from_its_header_without_decoding(tmp_path, monkeypatch):
    # 1 x 10000 pixels passes MAX_IMAGE_PIXELS, but the crop's resize of its short side to the
    # resolution would make it 256 x 2,560,000 pixels (6.5 GB for one 35 KB file)
    (tmp_path / "c").mkdir()
    huge_png(tmp_path / "c/strip.png", 1, 10000)
    Image.fromarray(np.full((24, 20, 3), 200, np.uint8)).save(tmp_path / "c/small.png")
    decoded = []
    load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda im: decoded.append(im.size) or load(im))
    ds = ImageFolderDataset(str(tmp_path), 256)
    with pytest.warns(UserWarning, match=r"strip.png: ImageTooLarge: 1x10000 pixels, longer than "
                                         r"data.MAX_ASPECT_RATIO = 32 times its short side \(the crop's resize to 256 px "
                                         r"would be 2560000 px long\); not decoded"):
        items = [ds[i] for i in range(len(ds))]
    assert decoded == [(20, 24)]  # the small image only
    assert collate_skip_bad(items)[2] == 1  # counted like an unreadable image
    # the bound is inclusive: 32:1 is cropped, a pixel longer is not
    huge_png(tmp_path / "c/strip.png", 2, 64)
    assert ImageFolderDataset(str(tmp_path), 16)[1][0].shape == (3, 16, 16)  # item 1: strip.png, after small.png
    huge_png(tmp_path / "c/strip.png", 2, 65)
    with pytest.warns(UserWarning, match="2x65 pixels"):
        assert ImageFolderDataset(str(tmp_path), 16)[1] is None


def test_each_real_folder_is_read_once_and_only_regular_files(tmp_path):
    """Links in an image folder: a loop (`self -> .`), a link up to the root (`up -> ..`) and a link to another
    class must not count images twice or give them another class's label; a FIFO named like an image is
    not read (it would block for ever)."""
    root = tmp_path / "data"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.full((8, 8, 3), 100, np.uint8)).save(root / c / f"{i}.png")
    os.symlink(".", root / "a" / "self")
    os.symlink("..", root / "a" / "up")
    os.symlink(str(root / "b"), root / "a" / "b_link")
    os.mkfifo(root / "b" / "pipe.png")
    ds = ImageFolderDataset(str(root), 8)
    names = sorted((os.path.relpath(p, root), y) for p, y in ds.samples)
    assert names == [("a/0.png", 0), ("a/1.png", 0), ("b/0.png", 1), ("b/1.png", 1)]
    # a linked folder of new images is still read, once
    extra = tmp_path / "more"
    extra.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(extra / "x.png")
    os.symlink(str(extra), root / "b" / "more")
    os.symlink(str(extra), root / "b" / "more_again")
    assert sum(1 for p, y in ImageFolderDataset(str(root), 8).samples if p.endswith("x.png")) == 1
