"""Tests for train_dit.py: the latent cache (equal to a direct encode, resumable, refused when stale),
exact --resume of DiT training, and (slow) the whole pipeline train_ae -> train_dit -> sample."""

import importlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import common
import train_dit
from ae import DGAE, config_to_dict, make_config
from data import ImageFolderDataset, ProceduralDataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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
    common.save_checkpoint(str(path), dict(kind="ae", step=step, model=model.state_dict(), ema=model.state_dict(),
                                           model_args=config_to_dict(cfg), config={}))
    return model


def build(tmp_path, ae_path, dataset, cache="cache", data="", shard_size=4):
    """Step 1 as train_dit.main runs it; returns the cache folder."""
    meta = train_dit.cache_meta(train_dit.stage1_info(str(ae_path)), dataset, data, 0, shard_size)
    cache = str(tmp_path / cache)
    train_dit.build_latent_cache(cache, meta, dataset, lambda: train_dit.load_dgae(str(ae_path)), SOLO, batch_size=3)
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
    lat = train_dit.LatentCache(cache)
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
    assert meta["ae_fingerprint"] == train_dit.encoder_fingerprint(ae.state_dict())


def test_interrupted_cache_build_resumes_after_finished_shards(tmp_path, ae, monkeypatch):
    ds = ProceduralDataset(16, size=10)
    encode, calls = train_dit.encode_shard, []

    def crash_on_second_shard(ae, subset, *args):
        if len(calls) == 1:
            raise KeyboardInterrupt  # killed while encoding shard 1
        calls.append(subset.indices)
        return encode(ae, subset, *args)

    monkeypatch.setattr(train_dit, "encode_shard", crash_on_second_shard)
    with pytest.raises(KeyboardInterrupt):
        build(tmp_path, tmp_path / "ae.pt", ds)
    assert sorted(os.listdir(tmp_path / "cache")) == ["meta.json", "shard_00000.pt"]  # no half-written file, no stats

    def count(ae, subset, *args):
        calls.append(subset.indices)
        return encode(ae, subset, *args)

    monkeypatch.setattr(train_dit, "encode_shard", count)
    before = torch.load(tmp_path / "cache/shard_00000.pt", weights_only=True)
    cache = build(tmp_path, tmp_path / "ae.pt", ds)
    assert calls == [range(0, 4), range(4, 8), range(8, 10)]  # shard 0 was not encoded again
    fresh = train_dit.LatentCache(build(tmp_path, tmp_path / "ae.pt", ds, cache="fresh"))
    resumed = train_dit.LatentCache(cache)
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
    lat = train_dit.LatentCache(cache)
    assert len(lat) == 6 and [lat[i][1] for i in range(6)] == [0, 0, 0, 1, 1, 1]
    assert torch.load(os.path.join(cache, "stats.pt"), weights_only=True)["n_bad"] == 1
    assert json.load(open(os.path.join(cache, "meta.json")))["class_names"] == ["a", "b"]


def run(tmp_path, script, *args, torchrun=False, check=True):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2"] if torchrun else [sys.executable]
    env = dict(os.environ, OMP_NUM_THREADS="1", DGAE_WEIGHTS=str(tmp_path / "no_weights_here"))
    proc = subprocess.run(cmd + [os.path.join(ROOT, script), *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


DIT_FAST = ["--ae-ckpt", "ae.pt", "--dataset-size", "40", "--shard-size", "16", "--batch-size", "8",
            "--log-every", "1", "--sample-every", "1000", "--ckpt-every", "1000", "--cache-dir", "cache"]


def test_resume_is_bit_identical(tmp_path, ae):
    args = DIT_FAST + ["--grad-accum", "2", "--warmup-steps", "2"]
    run(tmp_path, "train_dit.py", "--out-dir", "full", "--max-steps", "4", *args)
    # the split run's first half checkpoints its activations (see tests/test_train_ae.py): nothing may change
    run(tmp_path, "train_dit.py", "--out-dir", "split", "--max-steps", "2", "--grad-checkpoint", "true", *args)
    run(tmp_path, "train_dit.py", "--out-dir", "split", "--max-steps", "4", "--resume", "true", *args)
    full, split = (torch.load(tmp_path / d / "ckpt.pt", weights_only=True) for d in ("full", "split"))
    assert full["step"] == split["step"] == 4 and full["loader"] == split["loader"]
    for key in ("model", "ema"):
        assert all(torch.equal(full[key][k], split[key][k]) for k in full[key]), key
    torch.manual_seed(0)  # the initial weights train_dit.py starts from (seed 0)
    init = train_dit.build_dit("DiT-Tiny/1", (2, 2), 4, 10).state_dict()
    assert not all(torch.equal(init[k], v) for k, v in full["model"].items())  # training moved them
    # the checkpoint is all sample.py needs: the stage-1 file, its encoder and the latent statistics
    lat = train_dit.LatentCache(str(tmp_path / "cache"))
    assert full["ae_ckpt"] == str(tmp_path / "ae.pt") and full["ae_step"] == 7
    assert full["ae_fingerprint"] == train_dit.encoder_fingerprint(ae.state_dict())
    assert torch.equal(full["latent_mean"], lat.mean) and torch.equal(full["latent_std"], lat.std)
    assert full["latent_shape"] == [4, 2, 2] and full["num_classes"] == 10 and full["model_name"] == "DiT-Tiny/1"


def test_setup_errors_are_one_line_messages(tmp_path, ae):
    torch.save({"kind": "dit"}, tmp_path / "dit.pt")
    (tmp_path / "empty.pt").write_bytes(b"")
    good = torch.load(tmp_path / "ae.pt", weights_only=True)  # a stage-1 file with an edited shape
    torch.save(dict(good, ema={**good["ema"], "encoder.conv_in.weight": torch.zeros(1)}), tmp_path / "edited.pt")
    for args, message in [(["--ae-ckpt", "nope.pt"], "stage-1 checkpoint nope.pt not found. Train one with train_ae.py"),
                          (["--ae-ckpt", "dit.pt"], "is a 'dit' checkpoint (written by train_dit.py), but a 'ae'"),
                          (["--ae-ckpt", "empty.pt"], "checkpoint empty.pt is empty (0 bytes)"),
                          (["--ae-ckpt", "edited.pt"], "edited.pt: its weights do not fit the model its model_args"),
                          (["--ae-ckpt", "ae.pt", "--preset", "DiT-M/3"], "unknown --preset DiT-M/3"),
                          (["--ae-ckpt", "ae.pt", "--data", "no/such/folder"], "no/such/folder")]:
        proc = run(tmp_path, "train_dit.py", *args, check=False)
        assert proc.returncode != 0 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert not os.path.exists(tmp_path / "out/dit/latents")  # refused before encoding anything


BAD_SETTINGS = [  # (flags, the one line expected)
    (["--shard-size", "0"], "--shard-size must be at least 1, got 0"),
    (["--max-steps", "0"], "--max-steps must be at least 1, got 0"),
    (["--max-steps", "-1"], "--max-steps must be at least 1, got -1"),
    (["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
    (["--grad-accum", "0"], "--grad-accum must be at least 1, got 0"),
    (["--log-every", "0"], "--log-every must be at least 1, got 0"),
    (["--ckpt-every", "0"], "--ckpt-every must be at least 1, got 0"),
    (["--sample-steps", "0"], "--sample-steps must be at least 1, got 0"),
    (["--decode-steps", "-1"], "--decode-steps must be at least 0, got -1"),  # 0: the stage-1 default
    (["--class-dropout", "1"], "--class-dropout must be in [0, 1), got 1.0"),
    (["--ema-decay", "-0.5"], "--ema-decay must be in [0, 1), got -0.5"),
    (["--cfg-scale", "nan"], "--cfg-scale must be a finite number, got nan"),
    (["--lr", "0"], "--lr must be a finite number above 0, got 0.0"),
    (["--max-nonfinite-steps", "0"], "--max-nonfinite-steps must be at least 1, got 0"),
    (["--dist-timeout", "-1"], "--dist-timeout must be a finite number above 0, got -1"),
]


@pytest.mark.parametrize("flags,message", BAD_SETTINGS, ids=[" ".join(f) for f, _ in BAD_SETTINGS])
def test_bad_settings_are_refused_before_any_work(tmp_path, ae, monkeypatch, flags, message):
    monkeypatch.chdir(tmp_path)
    importlib.reload(train_dit)  # fresh settings: configure() writes them into the module
    monkeypatch.setattr(sys, "argv", ["train_dit.py", *DIT_FAST, *flags])
    with pytest.raises(SystemExit) as e:
        train_dit.main()
    assert str(e.value) == "error: " + message  # one line, naming the flag and its range
    # nothing written: no meta.json that would mark a later cache stale, no checkpoint
    assert sorted(os.listdir(tmp_path)) == ["ae.pt"]


def test_an_out_dir_that_cannot_be_written_is_refused_before_encoding(tmp_path, ae):
    (tmp_path / "file").write_text("a file, not a folder")
    proc = run(tmp_path, "train_dit.py", *DIT_FAST, "--out-dir", "file/run", check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: --out-dir file/run: cannot write there")
    assert not os.path.exists(tmp_path / "cache")  # refused before the latent cache


@pytest.mark.slow
def test_pipeline_train_ae_train_dit_sample(tmp_path):
    # the README's three commands at toy size, then the .npz under torchrun equals the single-process one
    run(tmp_path, "train_ae.py", "--max-steps", "2", "--batch-size", "4", "--dataset-size", "48",
        "--decode-steps", "2", "--lpips-weight", "0")
    run(tmp_path, "train_dit.py", "--max-steps", "3", "--batch-size", "8", "--dataset-size", "48",
        "--shard-size", "20", "--sample-steps", "2", "--decode-steps", "2", "--log-every", "1")
    lat = train_dit.LatentCache(str(tmp_path / "out/dit/latents"))
    assert len(lat) == 48 and len(lat.shards) == 3
    Image.open(tmp_path / "out/dit/samples_000003.png").verify()
    assert [json.loads(r)["step"] for r in open(tmp_path / "out/dit/log.jsonl")] == [1, 2, 3]
    run(tmp_path, "sample.py", "--ckpt", "out/dit/ckpt.pt", "--steps", "2", "--decode-steps", "2", "--per-class", "2")
    grid = Image.open(tmp_path / "out/dit/samples.png")
    assert grid.size == (2 * 34 + 2, 10 * 34 + 2)  # 2 samples of each of the 10 classes, 32 px + 2 px padding
    args = ["--ckpt", "out/dit/ckpt.pt", "--steps", "2", "--decode-steps", "2", "--num-samples", "13", "--batch-size", "4"]
    run(tmp_path, "sample.py", *args, "--out", "one.npz")
    run(tmp_path, "sample.py", *args, "--out", "two.npz", torchrun=True)
    one, two = np.load(tmp_path / "one.npz"), np.load(tmp_path / "two.npz")
    assert one["arr_0"].shape == (13, 32, 32, 3) and one["arr_0"].dtype == np.uint8 and one["arr_0"].std() > 0
    assert np.array_equal(one["arr_0"], two["arr_0"]) and np.array_equal(one["labels"], two["labels"])
    assert sorted(os.listdir(tmp_path)) == sorted(["out", "one.npz", "two.npz"])  # the per-rank parts are gone
    # the cache encoded by two ranks equals the single-process one
    run(tmp_path, "train_dit.py", "--max-steps", "1", "--batch-size", "8", "--dataset-size", "48", "--shard-size",
        "20", "--out-dir", "ddp", "--sample-every", "1000", torchrun=True)
    ddp = train_dit.LatentCache(str(tmp_path / "ddp/latents"))
    assert all(torch.equal(a["z"], b["z"]) for a, b in zip(ddp.shards, lat.shards))
    assert torch.equal(ddp.mean, lat.mean) and torch.equal(ddp.std, lat.std)


# -----------------------------------------------------------------------------
# Reliability: non-finite latents and statistics, the recipe on --resume


def error_lines(proc):
    return [line for line in proc.stderr.replace("\r", "\n").splitlines() if line.startswith("error:")]


def poison_latents(cache, items, shard=0):
    """NaN latents for the given items of a shard (a bad shard, a diverged encoder); stats.pt unchanged."""
    path = os.path.join(cache, f"shard_{shard:05d}.pt")
    content = torch.load(path, weights_only=True)
    content["z"] = content["z"].detach().clone()
    content["z"][items] = float("nan")
    torch.save(content, path)


def test_nonfinite_latents_are_skipped_and_a_run_of_them_stops_the_run_unsaved(tmp_path, ae):
    run(tmp_path, "train_dit.py", *DIT_FAST, "--max-steps", "2")
    path = tmp_path / "out/dit/ckpt.pt"
    # one NaN latent among 40: the step whose batch holds it is skipped, the run goes on
    poison_latents(tmp_path / "cache", [0])
    run(tmp_path, "train_dit.py", *DIT_FAST, "--resume", "true", "--max-steps", "12")
    rows = [json.loads(line) for line in open(tmp_path / "out/dit/log.jsonl")]
    # item 0 is in one batch of each epoch of 5: steps 3-12 meet it in epoch 1 and maybe in epochs 0 and 2
    assert 1 <= sum(r["skipped_steps"] for r in rows) <= 3
    assert all(np.isfinite(r["loss"]) == (r["skipped_steps"] == 0) for r in rows)
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["step"] == 12
    assert all(t.isfinite().all() for sd in (ckpt["model"], ckpt["ema"]) for t in sd.values())
    good = path.read_bytes()
    # every latent NaN: 5 steps in a row, then a one-line stop that leaves the checkpoint as it was
    for k in (0, 1, 2):
        poison_latents(tmp_path / "cache", slice(None), shard=k)
    proc = run(tmp_path, "train_dit.py", *DIT_FAST, "--resume", "true", "--max-steps", "30", check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert error_lines(proc) == ["error: 5 steps in a row (to step 17) had a non-finite loss or gradient "
                                 "(--max-nonfinite-steps 5); stopped without saving, so out/dit/ckpt.pt is left as "
                                 "it was. Lower --lr or check the latent cache."]
    assert path.read_bytes() == good


def test_latent_statistics_with_std_0_are_refused_in_one_line(tmp_path, ae):
    cache = build(tmp_path, tmp_path / "ae.pt", ProceduralDataset(16, size=10))
    stats = torch.load(os.path.join(cache, "stats.pt"), weights_only=True)
    stats["std"][1] = 0.0  # a constant latent channel: z / std would make every DiT step NaN
    torch.save(stats, os.path.join(cache, "stats.pt"))
    with pytest.raises(ValueError, match=r"stats.pt: latent channel\(s\) \[1\] have std 0"):
        train_dit.LatentCache(cache)
    proc = run(tmp_path, "train_dit.py", "--ae-ckpt", "ae.pt", "--dataset-size", "10", "--shard-size", "4",
               "--cache-dir", str(cache), "--max-steps", "2", check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and len(error_lines(proc)) == 1
    assert "latent channel(s) [1] have std 0" in proc.stderr and f"delete {cache}" in proc.stderr
    assert not os.path.exists(tmp_path / "out/dit/ckpt.pt")


def test_nonfinite_latents_are_refused_while_encoding(tmp_path, ae, monkeypatch):
    monkeypatch.setattr(DGAE, "encode", lambda self, x: torch.full((len(x), 4, 2, 2), float("nan")))
    with pytest.raises(ValueError, match="latent values non-finite or beyond the float16 range"):
        build(tmp_path, tmp_path / "ae.pt", ProceduralDataset(16, size=10))
    assert not os.path.exists(tmp_path / "cache/stats.pt") and not os.path.exists(tmp_path / "cache/shard_00000.pt")


def test_resume_takes_the_whole_recipe_from_the_checkpoint(tmp_path, ae):
    recipe = [*DIT_FAST, "--batch-size", "4", "--grad-accum", "2", "--lr", "2e-3", "--warmup-steps", "3",
              "--ema-decay", "0.99", "--class-dropout", "0.2", "--t-dist", "uniform", "--seed", "3",
              "--weight-decay", "0.01", "--grad-clip", "0.5"]
    run(tmp_path, "train_dit.py", *recipe, "--out-dir", "full", "--max-steps", "3")
    run(tmp_path, "train_dit.py", *recipe, "--out-dir", "split", "--max-steps", "2")
    # resumed with no recipe flag at all: not even the stage-1 file, the data or the cache
    run(tmp_path, "train_dit.py", "--out-dir", "split", "--resume", "true", "--max-steps", "3", "--log-every", "1")
    full, split = (torch.load(tmp_path / d / "ckpt.pt", weights_only=True) for d in ("full", "split"))
    assert full["step"] == split["step"] == 3 and full["loader"] == split["loader"]
    for key in ("model", "ema"):
        assert all(torch.equal(full[key][k], split[key][k]) for k in full[key]), key
    assert [json.loads(r)["lr"] for r in open(tmp_path / "split/log.jsonl")][-1] == 2e-3
    assert not os.path.exists(tmp_path / "split/latents")  # the run's own cache, not a new one


def test_a_flag_that_contradicts_the_resumed_checkpoint_is_refused(tmp_path, ae, monkeypatch):
    run(tmp_path, "train_dit.py", *DIT_FAST, "--max-steps", "1")
    good = (tmp_path / "out/dit/ckpt.pt").read_bytes()
    monkeypatch.chdir(tmp_path)
    for flags in (["--lr", "1e6"], ["--batch-size", "4"], ["--grad-accum", "2"], ["--warmup-steps", "7"],
                  ["--ema-decay", "0.9"], ["--class-dropout", "0.3"], ["--t-dist", "uniform"], ["--seed", "1"],
                  ["--weight-decay", "0.1"], ["--grad-clip", "2"], ["--preset", "DiT-S/1"]):
        importlib.reload(train_dit)  # fresh settings: configure() writes them into the module
        monkeypatch.setattr(sys, "argv", ["train_dit.py", "--resume", "true", "--max-steps", "2", *flags])
        with pytest.raises(SystemExit) as e:
            train_dit.main()
        assert str(e.value).startswith(f"error: {flags[0]} ")
        assert "does not match the checkpoint being resumed" in str(e.value)
    assert (tmp_path / "out/dit/ckpt.pt").read_bytes() == good
