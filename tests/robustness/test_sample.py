"""Tests for sample.py: the sampler is Euler + guidance on all channels + un-normalise + decode,
a seed fixes the images, the .npz has the evaluator's format and the right contents, the
reconstruction grid, and the errors. Runs sample.main() in-process on tiny random models."""

import errno
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from dit import build_dit
import sample
from support import checkpoints, common
from support.checkpoints import load_dgae
from support.data import ImageFolderDataset, to_model_range, to_uint8
from test_latents import save_tiny_ae

MEAN, STD = torch.tensor([0.1, -0.2, 0.3, 0.0]), torch.tensor([0.5, 1.0, 2.0, 1.5])


@pytest.fixture
def ckpts(tmp_path):
    """(DiT checkpoint path, stage-1 checkpoint path): a random DiT-Tiny/1 on 4 x 2 x 2 latents, 10 classes."""
    ae = save_tiny_ae(tmp_path / "ae.pt")
    torch.manual_seed(0)
    dit = build_dit("DiT-Tiny/1", (2, 2), 4, 10)
    for p in dit.parameters():  # leave the zero init, so the velocity depends on x, t and y
        torch.nn.init.normal_(p, std=0.05)
    checkpoints.save_checkpoint(str(tmp_path / "dit.pt"), dict(
        kind="dit", step=3, model=dit.state_dict(), ema=dit.state_dict(), model_args=dit.config,
        ae_ckpt=str(tmp_path / "ae.pt"), ae_step=7, ae_fingerprint=sample.checkpoints.encoder_fingerprint(ae.state_dict()),
        latent_shape=[4, 2, 2], latent_mean=MEAN, latent_std=STD, num_classes=10, class_names=list("abcdefghij")))
    return str(tmp_path / "dit.pt"), str(tmp_path / "ae.pt")


def run_sample(monkeypatch, *args):
    monkeypatch.setattr(sys, "argv", ["sample.py", *args])
    sample.main()


def test_generate_is_euler_with_guidance_on_all_channels_then_decode(ckpts):
    dit, ae, _ = sample.load_models(ckpts[0], "cpu")
    y, noise = torch.tensor([1, 4, 9]), torch.randn(3, 4, 2, 2)
    with torch.no_grad():
        x = noise
        for t0, t1 in [(1.0, 0.5), (0.5, 0.0)]:  # two Euler steps from t=1 to t=0, by hand
            t = torch.full((3,), t0)
            v_cond, v_uncond = dit(x, t, y), dit(x, t, torch.full((3,), 10))  # 10 = the null class
            x = x + (t1 - t0) * (v_uncond + 3.0 * (v_cond - v_uncond))  # guidance on all 4 channels
        expected = ae.decode(x * STD.view(1, 4, 1, 1) + MEAN.view(1, 4, 1, 1), 2, seed=5)
    got = sample.generate(dit, ae, y, noise, 2, 3.0, MEAN, STD, decode_steps=2, decode_seed=5)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    unguided = sample.generate(dit, ae, y, noise, 2, 1.0, MEAN, STD, decode_steps=2, decode_seed=5)
    assert (unguided - got).abs().max() > 1e-3  # the guidance scale matters


def test_same_seed_same_images_other_seed_other_images(ckpts, tmp_path, monkeypatch):
    for name, s in [("a.png", "0"), ("b.png", "0"), ("c.png", "1")]:
        run_sample(monkeypatch, "--ckpt", ckpts[0], "--steps", "2", "--per-class", "3", "--classes", "2,5",
                   "--seed", s, "--out", str(tmp_path / name))
    a, b, c = (np.asarray(Image.open(tmp_path / n)) for n in ("a.png", "b.png", "c.png"))
    assert a.shape == (2 * 18 + 2, 3 * 18 + 2, 3)  # one row per class, 16 px tiles + 2 px padding
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_npz_has_the_evaluator_format_and_the_chunks_contents(ckpts, tmp_path, monkeypatch):
    run_sample(monkeypatch, "--ckpt", ckpts[0], "--steps", "2", "--num-samples", "10", "--batch-size", "4",
               "--cfg-scale", "2", "--seed", "3", "--out", str(tmp_path / "s.npz"))
    f = np.load(tmp_path / "s.npz")
    assert f["arr_0"].shape == (10, 16, 16, 3) and f["arr_0"].dtype == np.uint8
    # sample i lives in chunk i // 4; recompute the last chunk (samples 8 and 9) from (seed, chunk) alone
    dit, ae, _ = sample.load_models(ckpts[0], "cpu")
    y, noise, dseed = sample.chunk_inputs(3, 2, 2, 10, (4, 2, 2))
    x = sample.generate(dit, ae, y, noise, 2, 2.0, MEAN, STD, decode_seed=dseed)
    assert np.array_equal(f["arr_0"][8:], to_uint8(x)) and np.array_equal(f["labels"][8:], y.numpy())
    assert not np.array_equal(f["arr_0"][0], f["arr_0"][4])


def test_num_is_the_same_as_num_samples(ckpts, tmp_path, monkeypatch):
    for flag, name in [("--num", "a.npz"), ("--num-samples", "b.npz")]:
        run_sample(monkeypatch, "--ckpt", ckpts[0], "--steps", "1", flag, "5", "--out", str(tmp_path / name))
    a, b = np.load(tmp_path / "a.npz"), np.load(tmp_path / "b.npz")
    assert a["arr_0"].shape[0] == 5 and np.array_equal(a["arr_0"], b["arr_0"])


def test_labels_are_uniform_over_classes():
    labels = torch.cat([sample.chunk_inputs(0, c, 100, 10, (4, 2, 2))[0] for c in range(50)])  # 5000 labels
    counts = torch.bincount(labels, minlength=10)
    assert counts.sum() == 5000 and counts.min() > 400 and counts.max() < 600  # 500 +- 4.5 sigma


def test_reconstructions_stand_beside_their_inputs(ckpts, tmp_path, monkeypatch):
    (tmp_path / "imgs").mkdir()
    for i in range(3):
        Image.fromarray(np.full((16, 16, 3), 60 * i, np.uint8)).save(tmp_path / "imgs" / f"{i}.png")
    run_sample(monkeypatch, "--ckpt", ckpts[1], "--images", str(tmp_path / "imgs"), "--out", str(tmp_path / "r.png"))
    grid = np.asarray(Image.open(tmp_path / "r.png"))
    assert grid.shape == (18 + 2, 6 * 18 + 2, 3)  # (input, reconstruction) x 3 in one row
    ds = ImageFolderDataset(str(tmp_path / "imgs"), 16)
    for i in range(3):  # inputs at tiles 0, 2, 4; the decoder's outputs at 1, 3, 5
        assert np.array_equal(grid[2:18, 2 + 36 * i: 18 + 36 * i], ds[i][0].permute(1, 2, 0).numpy())  # uint8 items
    ae = load_dgae(ckpts[1])
    recon = to_uint8(ae.reconstruct(to_model_range(ds[0][0][None]), seed=0))[0]
    assert np.array_equal(grid[2:18, 20:36], recon)


def test_clear_errors(ckpts, tmp_path, monkeypatch):
    with pytest.raises(SystemExit, match="class 12 is out of range: this model has 10 classes"):
        run_sample(monkeypatch, "--ckpt", ckpts[0], "--classes", "3,12")
    with pytest.raises(SystemExit, match="comma-separated"):
        run_sample(monkeypatch, "--ckpt", ckpts[0], "--classes", "dog")
    with pytest.raises(SystemExit, match="'ae' checkpoint.*--images"):
        run_sample(monkeypatch, "--ckpt", ckpts[1])
    with pytest.raises(SystemExit, match="'dit' checkpoint"):
        run_sample(monkeypatch, "--ckpt", ckpts[0], "--images", str(tmp_path))
    save_tiny_ae(tmp_path / "other.pt", seed=1)  # another encoder: refused, as the README says
    with pytest.raises(SystemExit, match=r"other.pt holds another stage-1 encoder .*\(step 7 of .*ae.pt.*--ae-ckpt"):
        run_sample(monkeypatch, "--ckpt", ckpts[0], "--ae-ckpt", str(tmp_path / "other.pt"), "--steps", "1",
                   "--per-class", "1", "--out", str(tmp_path / "w.png"))
    assert not (tmp_path / "w.png").exists()
    (tmp_path / "ae.pt").unlink()
    with pytest.raises(SystemExit, match="stage-1 checkpoint .*ae.pt not found.*--ae-ckpt"):
        run_sample(monkeypatch, "--ckpt", ckpts[0])


BAD_SETTINGS = [  # (flags, the one line expected); unchecked, each would write garbage and exit 0
    (["--steps", "-1"], "--steps must be from 1 to 1000, got -1"),
    (["--steps", "0"], "--steps must be from 1 to 1000, got 0"),
    (["--steps", "100000"], "--steps must be from 1 to 1000, got 100000"),  # hours, and no better images
    (["--decode-steps", "-1"], "--decode-steps must be from 1 to 1000, got -1"),  # no flag: the stage-1 default
    (["--decode-steps", "1001"], "--decode-steps must be from 1 to 1000, got 1001"),
    (["--cfg-scale", "nan"], "--cfg-scale must be a number from -100 to 100, got nan"),
    (["--cfg-scale", "inf"], "--cfg-scale must be a number from -100 to 100, got inf"),
    # finite in float64, inf in the float32 of the sampler: all-zero images
    (["--cfg-scale", "1e300"], "--cfg-scale must be a number from -100 to 100, got 1e+300"),
    (["--device", "foo"], "--device foo is not available on this machine, which has: "
                          + ", ".join(common.available_devices()) + "; pass one of those, or leave --device out to pick one"),
    (["--per-class", "0"], "--per-class must be at least 1, got 0"),
    (["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
    (["--num-samples", "-5"], "--num-samples must be at least 0, got -5"),
    (["--seed", "-1"], "--seed must be at least 0, got -1"),
]


@pytest.mark.parametrize("flags,message", BAD_SETTINGS, ids=[" ".join(f) for f, _ in BAD_SETTINGS])
def test_bad_settings_are_refused_before_any_work(ckpts, tmp_path, monkeypatch, flags, message):
    monkeypatch.setattr(checkpoints, "load_checkpoint", lambda *a: pytest.fail("read a checkpoint"))
    with pytest.raises(SystemExit) as e:
        run_sample(monkeypatch, "--ckpt", ckpts[0], "--out", str(tmp_path / "x.png"), *flags)
    assert str(e.value) == "error: " + message  # one line, naming the flag and its range
    assert not (tmp_path / "x.png").exists()


def test_the_output_is_checked_before_sampling(ckpts, tmp_path, monkeypatch, capsys):
    # a folder that does not exist yet is created, so the save cannot fail after all the sampling
    run_sample(monkeypatch, "--ckpt", ckpts[0], "--steps", "1", "--num-samples", "2", "--out", str(tmp_path / "new/s.npz"))
    assert np.load(tmp_path / "new/s.npz")["arr_0"].shape == (2, 16, 16, 3)
    assert f"wrote {tmp_path / 'new/s.npz'}" in capsys.readouterr().out  # the printed path is the written one
    monkeypatch.setattr(checkpoints, "load_checkpoint", lambda *a: pytest.fail("read a checkpoint"))
    (tmp_path / "file").write_text("a file, not a folder")
    (tmp_path / "folder.npz").mkdir()
    for out, message in [(tmp_path / "file/s.npz", "--out .*file: cannot write there"),
                         # the folder passed as the file: the write would fail only after the sampling
                         (tmp_path / "folder.npz", "--out .*folder.npz: .*folder.npz is a folder, where a file is to be written"),
                         # np.savez would have written x.png.npz while sample.py printed x.png
                         (tmp_path / "x.png", "--out .*x.png: with --num-samples the output is an .npz; name it e.g. .*x.npz")]:
        with pytest.raises(SystemExit, match="^error: " + message):
            run_sample(monkeypatch, "--ckpt", ckpts[0], "--num-samples", "2", "--out", str(out))
    with pytest.raises(SystemExit, match="the grid is an image; give it an image extension"):
        run_sample(monkeypatch, "--ckpt", ckpts[0], "--out", str(tmp_path / "grid"))
    assert sorted(os.listdir(tmp_path)) == ["ae.pt", "dit.pt", "file", "folder.npz", "new"]
    assert os.listdir(tmp_path / "folder.npz") == []


def test_a_failed_npz_write_keeps_the_previous_file_and_leaves_no_tmp(ckpts, tmp_path, monkeypatch):
    (tmp_path / "s.npz").write_bytes(b"the previous samples")

    def disk_full(fh, **arrays):
        fh.write(b"half an npz")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "savez", disk_full)
    with pytest.raises(SystemExit) as e:
        run_sample(monkeypatch, "--ckpt", ckpts[0], "--steps", "1", "--num-samples", "2", "--out", str(tmp_path / "s.npz"))
    assert str(e.value) == (f"error: could not write {tmp_path / 's.npz'} (No space left on device); the previous file "
                            "is kept. Free some space or choose a folder you can write to.")
    assert (tmp_path / "s.npz").read_bytes() == b"the previous samples" and not (tmp_path / "s.npz.tmp").exists()


def test_damaged_or_edited_checkpoints_are_one_line_naming_the_file(ckpts, tmp_path, monkeypatch):
    dit_path, ae_path = ckpts
    good = torch.load(dit_path, weights_only=True)
    edited = dict(good, ema={**good["ema"], "final_layer.linear.weight": torch.zeros(3, 3)})
    checkpoints.save_checkpoint(str(tmp_path / "edited.pt"), edited)
    checkpoints.save_checkpoint(str(tmp_path / "no_args.pt"), {k: v for k, v in good.items() if k != "model_args"})
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "random.pt").write_bytes(np.random.default_rng(1).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    ae = torch.load(ae_path, weights_only=True)  # a stage-1 file with an edited shape, found through --ae-ckpt
    checkpoints.save_checkpoint(str(tmp_path / "ae_edited.pt"), dict(ae, ema={**ae["ema"], "encoder.conv_in.weight": torch.zeros(1)}))
    checkpoints.save_checkpoint(str(tmp_path / "knob.pt"), dict(good, model_args=dict(good["model_args"], new_knob=1)))
    checkpoints.save_checkpoint(str(tmp_path / "wide.pt"), dict(good, model_args=dict(good["model_args"], hidden_size=10**6)))
    for args, message in [
        (["--ckpt", str(tmp_path / "knob.pt")], "knob.pt: model_args has settings this version's model does not take: new_knob"),
        (["--ckpt", str(tmp_path / "wide.pt")], "wide.pt: its weights do not fit"),  # checked on meta, never allocated
        (["--ckpt", str(tmp_path / "edited.pt")], "edited.pt: its weights do not fit the model its model_args describe "
                                                 r"\(size mismatch for final_layer.linear.weight"),
        (["--ckpt", str(tmp_path / "no_args.pt")], "no_args.pt has no 'model_args'"),
        (["--ckpt", str(tmp_path / "empty.pt")], r"empty.pt is empty \(0 bytes\)"),
        (["--ckpt", str(tmp_path / "random.pt")], "could not read checkpoint .*random.pt"),
        (["--ckpt", dit_path, "--ae-ckpt", str(tmp_path / "ae_edited.pt")], "ae_edited.pt: its weights do not fit"),
    ]:
        with pytest.raises(SystemExit, match="^error: .*" + message) as e:
            run_sample(monkeypatch, *args, "--steps", "1", "--per-class", "1", "--out", str(tmp_path / "x.png"))
        assert "\n" not in str(e.value) and "weights_only" not in str(e.value)
    assert not (tmp_path / "x.png").exists()
