"""Tests for procedural.py, the built-in dataset, and data.py: image folders, bad-file skipping,
the resumable distributed Loader and the flip augmentation."""

import io
import os
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from support.data import (ImageFolderDataset, InOrder, Loader, build_dataset, center_crop_arr, check_judge_classes, collate_skip_bad, random_hflip,
                  to_model_range)
from support.procedural import ProceduralDataset

# -----------------------------------------------------------------------------
# ProceduralDataset


@pytest.mark.parametrize("res", [32, 64])
def test_procedural_shape_range_labels(res):
    ds = ProceduralDataset(resolution=res, num_classes=10, size=37)
    assert len(ds) == 37 and len(ds.class_names) == 10 and len(set(ds.class_names)) == 10
    for i in range(37):
        x, y = ds[i]
        assert x.shape == (3, res, res) and x.dtype == torch.float32
        assert x.min() >= -1 and x.max() <= 1
        assert y == i % 10 and isinstance(y, int)
        assert x.std() > 0.05  # never a blank image: the pattern always has contrast


def test_procedural_is_deterministic_in_seed_and_index():
    a, b = ProceduralDataset(32, seed=0), ProceduralDataset(32, seed=0)
    c = ProceduralDataset(32, seed=1)
    for i in [0, 5, 123, 9999]:
        assert torch.equal(a[i][0], b[i][0])  # a fresh dataset object draws the same image
        assert not torch.equal(a[i][0], c[i][0])  # another seed draws another one
    _ = a[7]  # the order of access must not matter (per-index RNG)
    assert torch.equal(a[3][0], b[3][0])
    assert not torch.equal(a[3][0], a[13][0])  # same class, different instance


def test_procedural_same_picture_at_every_resolution():
    # shapes live in continuous coordinates: 64 px averaged down 2x2 is close to the 32 px image
    lo = ProceduralDataset(32).image(42)
    hi = ProceduralDataset(64).image(42).reshape(32, 2, 32, 2, 3).mean((1, 3))
    assert np.abs(lo - hi).mean() < 0.1
    assert np.abs(lo - ProceduralDataset(32).image(43)).mean() > 0.1  # a real difference is larger


@pytest.mark.parametrize("res,k", [(32, 10), (64, 10)])
def test_procedural_classes_are_mutually_distinct(res, k):
    # Colours and positions are random, so compare classes with a colour- and translation-free
    # descriptor: the magnitude spectrum of the standardised grey image. A 1-nearest-neighbour
    # classifier on it must recognise the classes, and no two classes may be confused with each
    # other (two classes drawn by the same pattern would give ~50% confusion each way).
    ds = ProceduralDataset(res, num_classes=k)
    n = 40 * k

    def feature(i):
        g = ds.image(i).mean(-1)
        g = (g - g.mean()) / (g.std() + 1e-6)
        return np.abs(np.fft.fft2(g)).ravel()

    f = np.stack([feature(i) for i in range(n)])
    y = np.arange(n) % k
    train = np.arange(n) < n // 2
    d = ((f[~train, None] - f[None, train]) ** 2).sum(-1)
    pred = y[train][d.argmin(1)]
    assert (pred == y[~train]).mean() > 0.9
    conf = np.zeros((k, k))
    np.add.at(conf, (y[~train], pred), 1)
    conf /= conf.sum(1, keepdims=True)
    pair = conf + conf.T
    np.fill_diagonal(pair, 0)
    assert pair.max() < 0.7, np.unravel_index(pair.argmax(), pair.shape)


def test_procedural_rejects_too_many_classes_and_out_of_range_indices():
    with pytest.raises(ValueError):
        ProceduralDataset(32, num_classes=1000)
    with pytest.raises(IndexError):
        ProceduralDataset(32, size=5)[5]


# -----------------------------------------------------------------------------
# image folders


def _save(path, arr, fmt=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(arr).save(path, format=fmt)


def test_center_crop_matches_hand_computed_crop():
    # 6x4 (w x h) to 4: short side 4 < 8, no halving, scale 1 (PIL returns an exact copy),
    # then crop columns (6 - 4) // 2 = 1 .. 4
    a = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3)
    out = center_crop_arr(Image.fromarray(a), 4)
    assert out.dtype == np.uint8 and out.shape == (4, 4, 3)
    np.testing.assert_array_equal(out, a[:, 1:5])

    # 16x8 to 4: short side 8 >= 8, so one BOX halving to 8x4 = the mean of each 2x2 block
    # then crop columns 2 .. 5 of the halved image. PIL resamples rows then columns with uint8
    # rounding in between, so each block is [[v-1, v+1], [v+1, v-1]]: every pass averages to v.
    base = np.random.default_rng(0).integers(1, 250, (4, 8, 3))
    b = np.repeat(np.repeat(base, 2, 0), 2, 1)  # (8, 16, 3): each value fills a 2x2 block
    b[0::2, 0::2] -= 1
    b[1::2, 1::2] -= 1
    b[0::2, 1::2] += 1
    b[1::2, 0::2] += 1
    out = center_crop_arr(Image.fromarray(b.astype(np.uint8)), 4)
    np.testing.assert_array_equal(out, base[:, 2:6].astype(np.uint8))

    # 7x11 (w x h) to 5: scale 5/7 -> bicubic to (5, round(55/7) = 8), crop rows (8 - 5) // 2 = 1
    c = np.random.default_rng(1).integers(0, 256, (11, 7, 3), dtype=np.uint8)
    ref = np.array(Image.fromarray(c).resize((5, 8), resample=Image.BICUBIC))[1:6]
    np.testing.assert_array_equal(center_crop_arr(Image.fromarray(c), 5), ref)

    # grey-scale input is converted to RGB
    assert center_crop_arr(Image.fromarray(a[:, :, 0]), 4).shape == (4, 4, 3)


def test_image_folder_labels_by_sorted_class_name(tmp_path):
    red, blue = np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8, 3), np.uint8)
    red[..., 0], blue[..., 2] = 255, 255
    _save(str(tmp_path / "train" / "n02_zebra" / "a.PNG"), blue)
    _save(str(tmp_path / "train" / "n01_ant" / "b.JPEG"), red, "JPEG")
    _save(str(tmp_path / "train" / "n01_ant" / "sub" / "c.png"), red)  # nested is found too
    _save(str(tmp_path / "train" / "n02_zebra" / "d.webp"), blue, "WEBP")
    (tmp_path / "train" / "n01_ant" / "notes.txt").write_text("not an image")
    ds = ImageFolderDataset(str(tmp_path), 8)  # root/train is picked automatically
    assert ds.classes == ["n01_ant", "n02_zebra"]
    names = [(os.path.relpath(p, tmp_path / "train"), y) for p, y in ds.samples]
    assert names == [("n01_ant/b.JPEG", 0), ("n01_ant/sub/c.png", 0),
                     ("n02_zebra/a.PNG", 1), ("n02_zebra/d.webp", 1)]
    x, y = ds[2]  # lossless PNG: exact values, blue = (0, 0, 255), as uint8 (a quarter of float32's bytes)
    assert y == 1 and x.shape == (3, 8, 8) and x.dtype == torch.uint8
    assert torch.equal(x, torch.tensor([0, 0, 255], dtype=torch.uint8).view(3, 1, 1).expand(3, 8, 8))
    # in the models' range where the batch lands: blue = (-1, -1, 1), exactly
    assert torch.equal(to_model_range(x[None]), torch.tensor([-1.0, -1.0, 1.0]).view(1, 3, 1, 1).expand(1, 3, 8, 8))
    x, y = to_model_range(ds[0][0]), ds[0][1]  # JPEG: red, approximately
    assert y == 0 and x[0].min() > 0.9 and x[1:].max() < -0.8
    # the same folder given without "train/" also works (root/<class>/...)
    assert ImageFolderDataset(str(tmp_path / "train"), 8).samples == ds.samples
    # a held-out split must hold the same classes for a judge trained on this one
    _save(str(tmp_path / "val" / "n01_ant" / "e.png"), red)
    with pytest.raises(ValueError, match=r"--val-data V: classes \['n01_ant'\]\.\.\. differ from --data's"):
        check_judge_classes(ds, ImageFolderDataset(str(tmp_path), 8, split="val"), "--val-data V")
    _save(str(tmp_path / "val" / "n02_zebra" / "f.png"), blue)
    check_judge_classes(ds, ImageFolderDataset(str(tmp_path), 8, split="val"), "--val-data V")


def test_flat_folder_is_one_class(tmp_path):
    for name in ["ILSVRC2012_val_00000002.JPEG", "ILSVRC2012_val_00000001.JPEG"]:
        _save(str(tmp_path / "val" / name), np.full((12, 10, 3), 100, np.uint8), "JPEG")
    ds = build_dataset(str(tmp_path / "val"), 8)
    assert [os.path.basename(p) for p, _ in ds.samples] == [
        "ILSVRC2012_val_00000001.JPEG", "ILSVRC2012_val_00000002.JPEG"]
    assert {y for _, y in ds.samples} == {0} and len(ds.classes) == 1
    assert ds[1][0].shape == (3, 8, 8)
    # a judge of classes would name every image of it right: refused
    with pytest.raises(ValueError, match="val: one class, so every image would be named right"):
        check_judge_classes(ds, ds, "--val-data V")
    assert isinstance(build_dataset("", 16, num_classes=10, size=5), ProceduralDataset)


def test_16_bit_greyscale_pngs_are_scaled_to_8_bit_not_clipped_to_white(tmp_path):
    # a 16-bit ramp: PIL's own convert("RGB") clips every value above 255 to white
    ramp = np.tile(np.array([0, 257, 32896, 65535], np.uint16).repeat(2), (8, 1))  # (8, 8): 0, 1, 128, 255 in 8 bit
    os.makedirs(tmp_path / "imgs")
    Image.fromarray(ramp).save(tmp_path / "imgs" / "deep.png")
    Image.fromarray((ramp // 257).astype(np.uint8)).convert("RGB").save(tmp_path / "imgs" / "eight.png")
    with Image.open(tmp_path / "imgs" / "deep.png") as im:
        assert im.mode == "I;16"  # the fault is real: this file is 16 bit
    ds = ImageFolderDataset(str(tmp_path / "imgs"), 8)
    deep, eight = ds[0][0], ds[1][0]  # sorted names: deep.png, then eight.png
    assert torch.equal(deep, eight)  # the same picture as its 8-bit version, on all 3 channels
    assert deep[:, 0, ::2].tolist() == [[0, 1, 128, 255]] * 3  # not 0, 255, 255, 255
    # mode I (older Pillows open 16-bit PNGs so) is scaled the same way
    as_int = Image.fromarray(ramp.astype(np.int32), "I")
    assert np.array_equal(center_crop_arr(as_int, 8), center_crop_arr(Image.open(tmp_path / "imgs" / "eight.png"), 8))


def test_missing_and_empty_folders_say_what_to_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="--data") as e:
        build_dataset(str(tmp_path / "nope"), 32)
    assert "train/<class>/*.JPEG" in str(e.value) and "nope" in str(e.value)
    (tmp_path / "empty" / "train" / "n01").mkdir(parents=True)
    (tmp_path / "empty" / "train" / "n01" / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match="--data") as e:
        ImageFolderDataset(str(tmp_path / "empty"), 32)
    assert "train/<class>/*.JPEG" in str(e.value)


def test_bad_images_are_skipped_with_a_warning_and_counted(tmp_path):
    good = np.random.default_rng(0).integers(0, 256, (48, 48, 3), dtype=np.uint8)
    _save(str(tmp_path / "c0" / "good.png"), good)
    buf = io.BytesIO()
    Image.fromarray(good).save(buf, format="JPEG")
    (tmp_path / "c0" / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (tmp_path / "c1").mkdir()
    (tmp_path / "c1" / "text.jpg").write_text("this is not a JPEG")
    _save(str(tmp_path / "c1" / "good2.jpg"), good, "JPEG")
    ds = ImageFolderDataset(str(tmp_path), 16)
    assert len(ds) == 4  # bad files are found at construction; they fail only when read
    bad = [i for i, (p, _) in enumerate(ds.samples) if "truncated" in p or "text" in p]
    for i in bad:
        with pytest.warns(UserWarning, match=os.path.basename(ds.samples[i][0])):
            assert ds[i] is None
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a second read of the same bad file stays quiet
            assert ds[i] is None
    x, y, n_bad = collate_skip_bad([ds[i] for i in range(len(ds))])
    assert n_bad == 2 and x.shape == (2, 3, 16, 16) and y.dtype == torch.long
    assert y.tolist() == [0, 1]
    # through the Loader: one epoch of one batch of 4 holds both bad files; the loader counts them
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loader = Loader(ds, batch_size=4)
        xb, yb = next(loader)
        assert loader.n_bad == 2 and xb.shape[0] == 2
        next(loader)
        assert loader.n_bad == 4  # the next epoch reads them again
        # one pass in order (the latent cache, evaluation): the readable ones, the rest counted
        batches = InOrder(ds, batch_size=3)
        ys = [y.tolist() for _, y in batches]
    assert ys == [[0, 1]] and batches.n_bad == 2  # the second batch (text.jpg alone) is empty: not yielded
    x, y, n_bad = collate_skip_bad([None, None])  # an all-bad batch is empty, not an error
    assert n_bad == 2 and x.shape[0] == 0 and y.shape == (0,)


# -----------------------------------------------------------------------------
# Loader


class IndexDataset(torch.utils.data.Dataset):
    """Item i is the image filled with i, so batches reveal which indices they hold."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return torch.full((3, 2, 2), float(i)), i % 3


def _indices(x):
    return x[:, 0, 0, 0].long().tolist()


def test_ranks_get_disjoint_shards_of_the_seeded_permutation():
    n, bs, seed = 50, 4, 3
    loaders = [Loader(IndexDataset(n), bs, rank=r, world_size=2, seed=seed) for r in range(2)]
    assert loaders[0].batches_per_epoch == 6  # 25 per rank -> 6 full batches
    for epoch in range(2):
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        seen = []
        for r, ld in enumerate(loaders):
            idx = [i for _ in range(6) for i in _indices(next(ld)[0])]
            assert idx == perm[r::2][:24]  # rank r takes every other index of the permutation
            seen.append(set(idx))
        assert not seen[0] & seen[1] and len(seen[0] | seen[1]) == 48
        assert all(ld.state_dict()["epoch"] == epoch and ld.state_dict()["batch"] == 6 for ld in loaders)
    # labels come along with the images
    x, y = next(loaders[0])
    assert y.tolist() == [i % 3 for i in _indices(x)] and loaders[0].n_bad == 0 and x.shape == (4, 3, 2, 2)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_from_state_dict_replays_the_next_batches(num_workers):
    rng_before = torch.get_rng_state()
    ds = ProceduralDataset(16, size=30)  # 7 batches of 4 per epoch
    a = Loader(ds, 4, seed=1, num_workers=num_workers)
    for _ in range(9):  # into the second epoch
        next(a)
    state = a.state_dict()
    assert (state["epoch"], state["batch"]) == (1, 2)
    expected = [next(a) for _ in range(8)]  # runs across the next epoch boundary
    b = Loader(ds, 4, seed=1, num_workers=num_workers)
    b.load_state_dict(state)
    for (xe, ye), (xb, yb) in zip(expected, [next(b) for _ in range(8)]):
        assert torch.equal(xe, xb) and torch.equal(ye, yb)
    assert b.n_bad == 0
    # rewinding a loader that is mid-epoch (workers hold prefetched batches) works too
    a.load_state_dict(state)
    assert all(torch.equal(e[0], next(a)[0]) for e in expected[:3])
    # and another seed gives another order
    c = Loader(ds, 4, seed=2, num_workers=num_workers)
    c.load_state_dict(state)
    assert not torch.equal(next(c)[0], expected[0][0])
    assert torch.equal(rng_before, torch.get_rng_state())  # worker seeds come from the Loader's own generator


def test_iterating_does_not_touch_the_global_rng():
    torch.manual_seed(123)
    before = torch.get_rng_state()
    ld = Loader(IndexDataset(10), 3)
    for _ in range(7):  # 3 batches per epoch: crosses two epoch boundaries
        next(ld)
    ld.load_state_dict({"epoch": 0, "batch": 1})
    next(ld)
    assert torch.equal(before, torch.get_rng_state())


def test_dataset_smaller_than_a_global_batch_is_an_error():
    with pytest.raises(ValueError, match="batch"):
        Loader(IndexDataset(7), 4, rank=0, world_size=2)


# -----------------------------------------------------------------------------
# augmentation


def test_random_hflip_mirrors_about_half_exactly():
    x = torch.randn(400, 3, 4, 5)
    out = random_hflip(x, generator=torch.Generator().manual_seed(0))
    flipped = torch.tensor([torch.equal(o, xi.flip(-1)) for o, xi in zip(out, x)])
    kept = torch.tensor([torch.equal(o, xi) for o, xi in zip(out, x)])
    assert torch.all(flipped ^ kept)  # every image is either exactly mirrored or untouched
    assert 160 < flipped.sum() < 240  # p = 1/2 (binomial sd = 10)
    assert torch.equal(out[flipped][..., 0], x[flipped][..., -1])  # mirrored left-right, not up-down
    # without a generator the coin flips come from the global RNG, so seeding reproduces them
    torch.manual_seed(5)
    a = random_hflip(x)
    torch.manual_seed(5)
    assert torch.equal(a, random_hflip(x))


@pytest.mark.parametrize("new_world", [1, 3])
def test_resume_on_another_rank_count_continues_at_the_next_image(new_world):
    """Saved at 2 ranks after 3 batches each (24 images of the epoch's order used), resumed at 1 or 3
    ranks: together the new ranks take the images from position 24 on, each exactly once."""
    n, bs, seed = 100, 4, 5
    old = [Loader(IndexDataset(n), bs, rank=r, world_size=2, seed=seed) for r in range(2)]
    used = [i for ld in old for _ in range(3) for i in _indices(next(ld)[0])]
    state = old[0].state_dict()
    assert state["images"] == 24
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    assert sorted(used) == sorted(perm[:24])
    new = [Loader(IndexDataset(n), bs, rank=r, world_size=new_world, seed=seed) for r in range(new_world)]
    for ld in new:
        ld.load_state_dict(state)
    rounds = (n - 24) // (bs * new_world)  # whole global batches left in the epoch
    taken = [[i for _ in range(rounds) for i in _indices(next(ld)[0])] for ld in new]
    for r, idx in enumerate(taken):
        assert idx == perm[24 + r::new_world][:rounds * bs]  # rank r: every new_world-th image from position 24
    assert new[0].state_dict()["images"] == 24 + rounds * bs * new_world
    # the epoch then ends for every rank alike and the next starts at its own order's first image
    nxt = _indices(next(new[0])[0])
    assert nxt == torch.randperm(n, generator=torch.Generator().manual_seed(seed + 1)).tolist()[0::new_world][:bs]
