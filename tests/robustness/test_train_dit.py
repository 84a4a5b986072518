"""Tests for train_dit.py: exact --resume of DiT training, its one-line errors, non-finite latents and
statistics, and (slow) the whole pipeline train_ae -> train_dit -> sample. The latent cache it
builds in step 1 is tested in test_latents.py."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import ddp_replicas
import train_dit
from support.checkpoints import encoder_fingerprint
from support.latents import LatentCache
from support.procedural import ProceduralDataset
from test_latents import build, save_tiny_ae
from test_train_ae import strict_json

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def ae(tmp_path):
    return save_tiny_ae(tmp_path / "ae.pt")


def run(tmp_path, script, *args, torchrun=False, check=True):
    # under torchrun on 2 ranks through tests/robustness/ddp_replicas.py: a run stops if the ranks' weights differ at a checkpoint
    path = os.path.join(ROOT, script)
    cmd = ddp_replicas.command(path) if torchrun else [sys.executable, path]
    env = dict(os.environ, OMP_NUM_THREADS="1", DGAE_WEIGHTS=str(tmp_path / "no_weights_here"))
    proc = subprocess.run(cmd + list(args), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


DIT_FAST = ["--ae-ckpt", "ae.pt", "--dataset-size", "40", "--shard-size", "16", "--batch-size", "8",
            "--log-every", "1", "--sample-every", "1000", "--ckpt-every", "1000", "--cache-dir", "cache"]


@pytest.mark.slow  # whole-script runs: 15 to 22 s
def test_resume_is_bit_identical(tmp_path, ae):
    args = DIT_FAST + ["--grad-accum", "2", "--warmup-steps", "2"]
    run(tmp_path, "train_dit.py", "--out-dir", "full", "--max-steps", "4", *args)
    # the split run's first half checkpoints its activations (see tests/robustness/test_train_ae.py): nothing may change
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
    lat = LatentCache(str(tmp_path / "cache"))
    assert full["ae_ckpt"] == str(tmp_path / "ae.pt") and full["ae_step"] == 7
    assert full["ae_fingerprint"] == encoder_fingerprint(ae.state_dict())
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
    (["--sample-steps", "0"], "--sample-steps must be from 1 to 1000, got 0"),
    (["--sample-steps", "1001"], "--sample-steps must be from 1 to 1000, got 1001"),
    (["--decode-steps", "-1"], "--decode-steps must be from 1 to 1000, got -1"),  # no flag: the stage-1 default
    (["--decode-steps", "1001"], "--decode-steps must be from 1 to 1000, got 1001"),
    (["--class-dropout", "1"], "--class-dropout must be in [0, 1), got 1.0"),
    (["--ema-decay", "-0.5"], "--ema-decay must be in [0, 1), got -0.5"),
    (["--cfg-scale", "nan"], "--cfg-scale must be a number from -100 to 100, got nan"),
    (["--cfg-scale", "1e300"], "--cfg-scale must be a number from -100 to 100, got 1e+300"),  # inf in float32
    (["--lr", "0"], "--lr must be a finite number above 0, got 0.0"),
    (["--max-nonfinite-steps", "0"], "--max-nonfinite-steps must be at least 1, got 0"),
    (["--dist-timeout", "-1"], "--dist-timeout must be a finite number above 0, got -1"),
]


@pytest.mark.parametrize("flags,message", BAD_SETTINGS, ids=[" ".join(f) for f, _ in BAD_SETTINGS])
def test_bad_settings_are_refused_before_any_work(tmp_path, ae, monkeypatch, flags, message):
    monkeypatch.chdir(tmp_path)
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
    lat = LatentCache(str(tmp_path / "out/dit/latents"))
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
    proc = run(tmp_path, "train_dit.py", "--max-steps", "1", "--batch-size", "8", "--dataset-size", "48",
               "--shard-size", "20", "--out-dir", "ddp", "--sample-every", "1000", torchrun=True)
    assert "weights identical on all 2 ranks at step 1" in proc.stdout  # the DiT's DDP keeps the ranks equal
    ddp = LatentCache(str(tmp_path / "ddp/latents"))
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


@pytest.mark.slow  # two stage-2 runs
def test_nonfinite_latents_are_skipped_and_a_run_of_them_stops_the_run_unsaved(tmp_path, ae):
    run(tmp_path, "train_dit.py", *DIT_FAST, "--max-steps", "2")
    path = tmp_path / "out/dit/ckpt.pt"
    # one NaN latent among 40: the step whose batch holds it is skipped, the run goes on
    poison_latents(tmp_path / "cache", [0])
    run(tmp_path, "train_dit.py", *DIT_FAST, "--resume", "true", "--max-steps", "12")
    rows = [strict_json(line) for line in open(tmp_path / "out/dit/log.jsonl")]
    # item 0 is in one batch of each epoch of 5: steps 3-12 meet it in epoch 1 and maybe in epochs 0 and 2
    assert 1 <= sum(r["skipped_steps"] for r in rows) <= 3
    assert all((r["loss"] is None) == (r["skipped_steps"] > 0) for r in rows)  # a NaN loss is written as null
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
        LatentCache(cache)
    proc = run(tmp_path, "train_dit.py", "--ae-ckpt", "ae.pt", "--dataset-size", "10", "--shard-size", "4",
               "--cache-dir", str(cache), "--max-steps", "2", check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and len(error_lines(proc)) == 1
    assert "latent channel(s) [1] have std 0" in proc.stderr and f"delete {cache}" in proc.stderr
    assert not os.path.exists(tmp_path / "out/dit/ckpt.pt")


@pytest.mark.slow  # three stage-2 runs
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


def test_resume_keeps_the_bookkeeping_too_and_says_what_the_command_line_changed(tmp_path, ae, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for args in ([*DIT_FAST, "--max-steps", "2", "--ckpt-every", "2", "--sample-steps", "2"],
                 ["--resume", "true", "--max-steps", "3", "--sample-every", "3", "--decode-steps", "2"]):
        monkeypatch.setattr(sys, "argv", ["train_dit.py", *args])
        train_dit.main()
    # (--decode-steps was the stage-1 default, None, and may be set on a resume: the grids' steps)
    assert ("resumed with changed settings: --decode-steps None -> 2, --max-steps 2 -> 3, "
            "--sample-every 1000 -> 3") in capsys.readouterr().out
    config = torch.load(tmp_path / "out/dit/ckpt.pt", weights_only=True)["config"]
    assert (config["ckpt_every"], config["log_every"], config["sample_every"], config["sample_steps"]) == (2, 1, 3, 2)
    assert [json.loads(r)["step"] for r in open(tmp_path / "out/dit/log.jsonl")] == [1, 2, 3]


def test_a_flag_that_contradicts_the_resumed_checkpoint_is_refused(tmp_path, ae, monkeypatch):
    run(tmp_path, "train_dit.py", *DIT_FAST, "--max-steps", "1")
    good = (tmp_path / "out/dit/ckpt.pt").read_bytes()
    monkeypatch.chdir(tmp_path)
    for flags in (["--lr", "1e6"], ["--batch-size", "4"], ["--grad-accum", "2"], ["--warmup-steps", "7"],
                  ["--ema-decay", "0.9"], ["--class-dropout", "0.3"], ["--t-dist", "uniform"], ["--seed", "1"],
                  ["--weight-decay", "0.1"], ["--grad-clip", "2"], ["--preset", "DiT-S/1"],
                  ["--data", str(tmp_path / "elsewhere")], ["--shard-size", "8"]):  # the latent cache's own: it would be stale
        monkeypatch.setattr(sys, "argv", ["train_dit.py", "--resume", "true", "--max-steps", "2", *flags])
        with pytest.raises(SystemExit) as e:
            train_dit.main()
        assert str(e.value).startswith(f"error: {flags[0]} ")
        assert "does not match the checkpoint being resumed" in str(e.value)
    assert (tmp_path / "out/dit/ckpt.pt").read_bytes() == good


def test_a_cache_dir_that_cannot_be_written_is_refused_before_any_encoding(tmp_path, ae):
    (tmp_path / "a_file").write_text("not a folder")
    proc = run(tmp_path, "train_dit.py", *DIT_FAST, "--max-steps", "1", "--cache-dir", "a_file", check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: --cache-dir a_file: cannot write there")
