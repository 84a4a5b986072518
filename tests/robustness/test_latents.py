"""Tests for latents.py, the latent cache: equal to a direct encode of the images and their mirror
images, resumable after an interrupted build, refused when stale, unreadable images skipped and
counted, non-finite latents refused. The faults injected into its files are in test_data_faults.py."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from ae import DGAE, config_to_dict, make_config
from support import checkpoints, common, latents
from support.checkpoints import encoder_fingerprint, load_dgae
from support.data import ImageFolderDataset
from support.procedural import ProceduralDataset

SOLO = common.Dist(False, 0, 0, 1, torch.device("cpu"), True)  # a single process


def save_tiny_ae(path, seed=0, step=7):
    """A random stage-1 checkpoint at 16 px (latents 4 x 2 x 2), laid out as train_ae.py writes it."""
    torch.manual_seed(seed)
    cfg = make_config("tiny", resolution=16, compression=8, enc_ch=8, unet_ch=8, cond_ch=8, decode_steps=2)
    model = DGAE(cfg).eval()
    with torch.no_grad():  # undo the decoder's zero init, so that what it decodes depends on z
        for p in model.decoder.parameters():
            if not p.any():
                p.normal_(std=0.1)
    checkpoints.save_checkpoint(str(path), dict(kind="ae", step=step, model=model.state_dict(), ema=model.state_dict(),
                                           model_args=config_to_dict(cfg), config={}))
    return model


def build(tmp_path, ae_path, dataset, cache="cache", data="", shard_size=4):
    """Step 1 as train_dit.main runs it; returns the cache folder."""
    meta = latents.cache_meta(latents.stage1_info(str(ae_path))[0], dataset, data, 0, shard_size)
    cache = str(tmp_path / cache)
    latents.build_latent_cache(cache, meta, dataset, lambda: load_dgae(str(ae_path)), SOLO, batch_size=3)
    return cache


@pytest.fixture
def ae(tmp_path):
    return save_tiny_ae(tmp_path / "ae.pt")


def test_cache_equals_direct_encode_of_images_and_mirror_images(tmp_path, ae):
    ds = ProceduralDataset(16, size=10)
    cache = build(tmp_path, tmp_path / "ae.pt", ds)
    assert sorted(os.listdir(cache)) == ["meta.json", "shard_00000.pt", "shard_00001.pt", "shard_00002.pt", "stats.pt"]
    x = torch.stack([ds[i][0] for i in range(10)])
    with torch.no_grad():
        direct = torch.stack([ae.encode(x), ae.encode(x.flip(-1))], dim=1)  # (10, 2, 4, 2, 2)
    lat = latents.LatentCache(cache)
    assert len(lat) == 10
    cached = torch.stack([lat[i][0] for i in range(10)])
    assert cached.dtype == torch.float16 and cached.shape == (10, 2, 4, 2, 2)
    # float16 storage: equal up to its rounding (relative 2^-11)
    torch.testing.assert_close(cached.float(), direct, rtol=2 ** -10, atol=1e-5)
    assert (direct[:, 0] - direct[:, 1]).abs().max() > 1e-3  # the mirror image really is another latent
    assert [lat[i][1] for i in range(10)] == [i % 10 for i in range(10)]
    # statistics over all cached latents (both copies), per channel
    per_channel = direct.transpose(0, 2).reshape(4, -1).double()  # (C, N * 2 * h * w)
    torch.testing.assert_close(lat.mean.double(), per_channel.mean(1), rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(lat.std.double(), per_channel.std(1, unbiased=False), rtol=1e-3, atol=1e-4)
    meta = json.load(open(os.path.join(cache, "meta.json")))
    assert meta["ae_step"] == 7 and meta["num_images"] == 10 and meta["data"] == "built-in"
    assert meta["ae_fingerprint"] == encoder_fingerprint(ae.state_dict())


def test_interrupted_cache_build_resumes_after_finished_shards(tmp_path, ae, monkeypatch):
    ds = ProceduralDataset(16, size=10)
    encode, calls = latents.encode_shard, []

    def crash_on_second_shard(ae, subset, *args):
        if len(calls) == 1:
            raise KeyboardInterrupt  # killed while encoding shard 1
        calls.append(subset.indices)
        return encode(ae, subset, *args)

    monkeypatch.setattr(latents, "encode_shard", crash_on_second_shard)
    with pytest.raises(KeyboardInterrupt):
        build(tmp_path, tmp_path / "ae.pt", ds)
    assert sorted(os.listdir(tmp_path / "cache")) == ["meta.json", "shard_00000.pt"]  # no half-written file, no stats

    def count(ae, subset, *args):
        calls.append(subset.indices)
        return encode(ae, subset, *args)

    monkeypatch.setattr(latents, "encode_shard", count)
    before = torch.load(tmp_path / "cache/shard_00000.pt", weights_only=True)
    cache = build(tmp_path, tmp_path / "ae.pt", ds)
    assert calls == [range(0, 4), range(4, 8), range(8, 10)]  # shard 0 was not encoded again
    fresh = latents.LatentCache(build(tmp_path, tmp_path / "ae.pt", ds, cache="fresh"))
    resumed = latents.LatentCache(cache)
    assert torch.equal(resumed.shards[0]["z"], before["z"])
    assert all(torch.equal(a["z"], b["z"]) for a, b in zip(resumed.shards, fresh.shards))
    assert torch.equal(resumed.mean, fresh.mean) and torch.equal(resumed.std, fresh.std)


def test_stale_cache_is_refused_and_a_moved_checkpoint_is_not_stale(tmp_path, ae):
    ds = ProceduralDataset(16, size=10)
    build(tmp_path, tmp_path / "ae.pt", ds)
    os.replace(tmp_path / "ae.pt", tmp_path / "moved.pt")  # same weights, new place: the cache stays valid
    build(tmp_path, tmp_path / "moved.pt", ds)
    save_tiny_ae(tmp_path / "retrained.pt", seed=1)  # another encoder
    with pytest.raises(SystemExit, match="stale.*ae_fingerprint"):
        build(tmp_path, tmp_path / "retrained.pt", ds)
    with pytest.raises(SystemExit, match="num_images .was 10, now 12"):
        build(tmp_path, tmp_path / "moved.pt", ProceduralDataset(16, size=12))


def test_unreadable_images_are_skipped_and_counted(tmp_path, ae):
    for c in ("a", "b"):
        os.makedirs(tmp_path / "imgs" / c)
        for i in range(3):
            Image.fromarray(np.full((20, 24, 3), 40 * i, np.uint8)).save(tmp_path / "imgs" / c / f"{i}.png")
    (tmp_path / "imgs/b/broken.png").write_bytes(b"not a png")
    ds = ImageFolderDataset(str(tmp_path / "imgs"), 16)
    with pytest.warns(UserWarning, match="broken.png"):
        cache = build(tmp_path, tmp_path / "ae.pt", ds, data=str(tmp_path / "imgs"))
    lat = latents.LatentCache(cache)
    assert len(lat) == 6 and [lat[i][1] for i in range(6)] == [0, 0, 0, 1, 1, 1]
    assert torch.load(os.path.join(cache, "stats.pt"), weights_only=True)["n_bad"] == 1
    assert json.load(open(os.path.join(cache, "meta.json")))["class_names"] == ["a", "b"]


def test_nonfinite_latents_are_refused_while_encoding(tmp_path, ae, monkeypatch):
    monkeypatch.setattr(DGAE, "encode", lambda self, x: torch.full((len(x), 4, 2, 2), float("nan")))
    with pytest.raises(ValueError, match="latent values non-finite or beyond the float16 range"):
        build(tmp_path, tmp_path / "ae.pt", ProceduralDataset(16, size=10))
    assert not os.path.exists(tmp_path / "cache/stats.pt") and not os.path.exists(tmp_path / "cache/shard_00000.pt")


def test_the_stage1_file_is_read_once_so_a_rewrite_meanwhile_cannot_mix_two_encoders(tmp_path):
    """train_dit.py records the encoder's fingerprint and encodes with the model built from the same
    read: a stage-1 run that rewrites the file in between (here: another encoder, in place) changes
    neither."""
    from support.checkpoints import dgae_from_checkpoint

    path = tmp_path / "ae.pt"
    save_tiny_ae(path, seed=0)
    info, ck = latents.stage1_info(str(path))
    other = tmp_path / "other.pt"
    save_tiny_ae(other, seed=1)
    path.write_bytes(other.read_bytes())  # rewritten in place, not replaced
    model = dgae_from_checkpoint(ck, str(path))
    assert encoder_fingerprint(model.state_dict()) == info["ae_fingerprint"]
    assert info["ae_fingerprint"] != latents.stage1_info(str(path))[0]["ae_fingerprint"]
