"""Tests for eval.py and inception.py: the FID InceptionV3 against a listing of the published weight
file, and the recon / gen / stats / classes modes end to end on tiny inputs, their numbers against
metrics.py (tested on its own in test_metrics.py). Seeded random weights; nothing downloads."""

import importlib
import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import eval as ev
from support import checkpoints, eval_data
from support import inception as inception_module
from support import metrics
from support.inception import INCEPTION_FILE, INCEPTION_URL, InceptionV3, load_inception, pool3x3
from support.perceptual import LPIPS, load_lpips

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "pt_inception_keys.txt")

# -----------------------------------------------------------------------------
# the FID InceptionV3


def read_fixture():
    rows = []
    for line in open(FIXTURE):
        if line.strip() and not line.startswith("#"):
            key, shape = line.split()
            rows.append((key, tuple(int(s) for s in shape.strip("()").split(",") if s)))
    return rows


def he_init(model, seed=0):
    """Kaiming-normal convs, so activations keep their scale through the 94 conv layers. (PyTorch's
    default init shrinks them layer after layer: pool features would be ~0 and every FID trivially 0.)"""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d):
            m.weight.copy_(torch.randn(m.weight.shape, generator=g) * math.sqrt(2 / m.weight[0].numel()))
    return model


@pytest.fixture(scope="module")
def inception():
    torch.manual_seed(0)
    return he_init(InceptionV3())


def test_inception_state_dict_matches_the_published_file_listing(inception):
    mine = [(k, tuple(v.shape)) for k, v in inception.state_dict().items()]
    assert mine == read_fixture()


def test_fixture_parameter_count_matches_torchvisions_documented_count():
    # torchvision documents 27,161,264 parameters for inception_v3 (aux head, 1000 classes). The FID
    # file has no aux head (conv0 768*128 + BN 2*128, conv1 128*768*25 + BN 2*768, fc 768*1000 + 1000
    # = 3,326,696) and a 1008-way fc (+8 * 2048 + 8).
    expected = 27_161_264 - (768 * 128 + 256 + 128 * 768 * 25 + 1536 + 768 * 1000 + 1000) + 8 * 2049
    buffers = ("running_mean", "running_var", "num_batches_tracked")
    n = sum(math.prod(s) for k, s in read_fixture() if not k.endswith(buffers))
    assert n == expected == 23_850_960


def test_inception_runs_on_299_and_other_sizes_and_is_batch_independent(inception):
    g = torch.Generator().manual_seed(0)
    x299, x64 = torch.rand(2, 3, 299, 299, generator=g), torch.rand(2, 3, 48, 64, generator=g)
    for x in (x299, x64):
        out = inception(x)
        assert {k: tuple(v.shape) for k, v in out.items()} == {"pool": (2, 2048), "spatial": (2, 2023), "logits": (2, 1008)}
        assert all(torch.isfinite(v).all() for v in out.values())
    inception.train()  # must stay in eval mode: BN statistics are the stored ones, not the batch's
    alone = inception(x64[1:])
    assert torch.allclose(alone["pool"], inception(x64)["pool"][1:], atol=1e-5)


def test_spatial_features_are_mixed_6d_1x1_branch_first_7_channels_in_hwc_order(inception):
    seen = {}
    hook = inception.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: seen.setdefault("x", o))
    out = inception(torch.rand(1, 3, 64, 64))
    hook.remove()
    assert seen["x"].shape == (1, 192, 17, 17)
    assert torch.equal(out["spatial"], seen["x"][:, :7].permute(0, 2, 3, 1).reshape(1, -1))


def test_logits_are_pool_times_fc_weight_without_the_bias(inception):
    x = torch.rand(1, 3, 64, 64)
    out = inception(x)
    assert torch.allclose(out["logits"], out["pool"] @ inception.fc.weight.t())
    assert not torch.allclose(out["logits"], inception.fc(out["pool"]))  # the bias is random, not 0


def test_pool_branches_follow_the_fid_graph(inception):
    kinds = {n: getattr(inception, n).pool for n in ("Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6b", "Mixed_6c",
                                                      "Mixed_6d", "Mixed_6e", "Mixed_7b", "Mixed_7c")}
    assert kinds == {**{n: "avg" for n in kinds}, "Mixed_7c": "max"}
    # TF average pooling ignores the padding: a flat map stays flat up to the borders
    assert torch.equal(pool3x3(torch.ones(1, 1, 5, 5), "avg"), torch.ones(1, 1, 5, 5))
    x = torch.arange(9.0).view(1, 1, 3, 3)
    assert torch.equal(pool3x3(x, "max"), torch.tensor([[[[4.0, 5, 5], [7, 8, 8], [7, 8, 8]]]]))


def test_load_inception_is_strict_and_a_missing_file_names_it_and_its_url(inception, tmp_path, monkeypatch):
    path = tmp_path / INCEPTION_FILE
    torch.save(inception.state_dict(), path)
    x = torch.rand(1, 3, 40, 40)
    assert torch.equal(load_inception(str(path))(x)["pool"], inception(x)["pool"])
    sd = inception.state_dict()
    del sd["fc.bias"]
    torch.save(sd, tmp_path / "broken.pth")
    with pytest.raises(ValueError, match="broken.pth: not the published weights of this network .*fc.bias"):
        load_inception(str(tmp_path / "broken.pth"))
    monkeypatch.delenv("DGAE_INCEPTION", raising=False)
    monkeypatch.setenv("DGAE_WEIGHTS", str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError) as err:
        load_inception()
    assert INCEPTION_FILE in str(err.value) and INCEPTION_URL in str(err.value) and "--inception-path" in str(err.value)


# -----------------------------------------------------------------------------
# inputs and the command-line modes, end to end


def test_npz_images_are_streamed_slice_by_slice(tmp_path):
    arr = np.random.default_rng(0).integers(0, 256, (7, 5, 6, 3), dtype=np.uint8)
    for save in (np.savez, np.savez_compressed):
        save(tmp_path / "s.npz", arr_0=arr)
        src = eval_data.ImageSource(str(tmp_path / "s.npz"), 0)
        got = torch.cat(list(src.batches(2, 7, 2)))
        assert src.n == 7 and torch.equal(got, torch.from_numpy(arr[2:7]).permute(0, 3, 1, 2).float())


def run_eval_in_process(monkeypatch, *argv):
    importlib.reload(ev)  # eval.py binds support's functions at import: the stand-ins patched there
    monkeypatch.setattr(sys, "argv", ["eval.py", *argv])
    ev.main()


@pytest.mark.parametrize("flags,message", [
    (["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
    (["--num-images", "-1"], "--num-images must be at least 0, got -1"),
    (["--resolution", "0"], "--resolution must be at least 1, got 0"),
    (["--decode-steps", "-2"], "--decode-steps must be from 1 to 1000, got -2"),
    (["--decode-steps", "1001"], "--decode-steps must be from 1 to 1000, got 1001"),
    (["--device", "foo"], "--device foo is not available on this machine, which has: "),
])
def test_bad_settings_are_refused_before_any_work(tmp_path, monkeypatch, flags, message):
    with pytest.raises(SystemExit) as e:
        run_eval_in_process(monkeypatch, "stats", "--images", str(tmp_path / "x.npz"), "--out", str(tmp_path / "o.npz"), *flags)
    assert str(e.value).startswith("error: " + message)  # one line, before the (missing) input is even opened
    assert "\n" not in str(e.value)


def _unwritable_folder(tmp_path):
    """A folder this process cannot create a file in: without write permission, or, for root (whom permissions do
    not stop), /sys, where the kernel refuses new files to everyone."""
    folder = tmp_path / "read_only"
    folder.mkdir()
    folder.chmod(0o500)
    for candidate in (str(folder), "/sys"):
        try:
            open(os.path.join(candidate, "probe"), "w").close()
            os.remove(os.path.join(candidate, "probe"))
        except OSError:
            return candidate
    pytest.skip("no folder here refuses a new file")


@pytest.mark.parametrize("mode", ["recon", "gen", "stats", "classes"])
def test_an_unwritable_out_is_refused_in_one_line_before_anything_is_loaded(tmp_path, monkeypatch, mode):
    """--out under a file, a folder given as the file, a folder without write permission (and, without --out, a
    default beside the input that cannot be written): one line naming --out, before a checkpoint, an image or a
    network is read. Before, each mode scored everything first and failed at the write."""
    import support.procedural

    for module, name in ((checkpoints, "load_dgae"), (inception_module, "load_inception"), (eval_data, "ImageSource"),
                         (support.procedural, "train_pattern_classifier")):
        monkeypatch.setattr(module, name, lambda *a, _n=name, **k: pytest.fail(f"{_n} was called"))
    np.savez(tmp_path / "s.npz", arr_0=random_images(4, 0, size=16), labels=np.zeros(4, np.int64))
    (tmp_path / "ckpt.pt").write_bytes(b"never read")
    inputs = {"recon": ["--ckpt", str(tmp_path / "ckpt.pt")], "stats": ["--images", str(tmp_path / "s.npz")],
              "gen": ["--samples", str(tmp_path / "s.npz"), "--ref", str(tmp_path / "s.npz")],
              "classes": ["--samples", str(tmp_path / "s.npz")]}[mode]
    (tmp_path / "file").write_text("a file, not a folder")
    (tmp_path / "folder.json").mkdir()
    read_only = _unwritable_folder(tmp_path)
    for out, message in [(tmp_path / "file/r.json", "cannot write there"),
                         (tmp_path / "folder.json", "is a folder, where a file is to be written"),
                         (os.path.join(read_only, "r.json"), "cannot write there")]:
        with pytest.raises(SystemExit) as e:
            run_eval_in_process(monkeypatch, mode, *inputs, "--out", str(out), "--device", "cpu")
        line = str(e.value)
        assert line.startswith(f"error: --out {out}: ") and message in line and "\n" not in line, line
    if mode != "stats":  # the default beside the input (stats has none): an input under a file cannot have one
        inputs[1] = str(tmp_path / "file" / os.path.basename(inputs[1]))
        with pytest.raises(SystemExit, match=r"^error: --out \(not given, so beside --(ckpt|samples)\) .*cannot write"):
            run_eval_in_process(monkeypatch, mode, *inputs, "--device", "cpu")
    assert not os.path.exists(tmp_path / "file" / "r.json")


def test_unusable_npz_inputs_are_one_line_before_any_model_is_loaded(tmp_path, monkeypatch):
    # eval.py is reloaded for each run and imports load_inception from here: the guard must sit here
    monkeypatch.setattr(inception_module, "load_inception", lambda *a: pytest.fail("loaded InceptionV3"))
    (tmp_path / "text.npz").write_text("not a zip")
    np.savez(tmp_path / "none.npz", arr_0=random_images(0, 0))
    np.savez(tmp_path / "one.npz", arr_0=random_images(1, 0))
    np.savez(tmp_path / "two.npz", arr_0=random_images(2, 0))
    out = ["--out", str(tmp_path / "o.npz")]
    for argv, message in [
        (["stats", "--images", str(tmp_path / "text.npz"), *out], r"text.npz is not an .npz file \(not a zip archive\)"),
        (["stats", "--images", str(tmp_path / "none.npz"), *out], "--images .*none.npz: 0 images; FID statistics need at least 2"),
        (["stats", "--images", str(tmp_path / "one.npz"), *out], "--images .*one.npz: 1 image; FID statistics need at least 2"),
        (["stats", "--images", str(tmp_path / "two.npz"), "--num-images", "1", *out], "two.npz: 1 image;"),
        (["gen", "--samples", str(tmp_path / "one.npz"), "--ref", str(tmp_path / "two.npz")], "--samples .*one.npz: 1 image"),
        (["gen", "--samples", str(tmp_path / "two.npz"), "--ref", str(tmp_path / "text.npz")], "text.npz is not an .npz"),
        (["gen", "--samples", str(tmp_path / "two.npz"), "--ref", str(tmp_path / "one.npz")], "--ref .*one.npz: 1 image"),
    ]:
        with pytest.raises(SystemExit, match="^error: .*" + message) as e:
            run_eval_in_process(monkeypatch, *argv)
        assert "\n" not in str(e.value)
    assert not (tmp_path / "o.npz").exists()


@pytest.fixture(scope="module")
def weights(tmp_path_factory, inception):
    """Seeded random weights in the published layouts, so the scripts load 'real' files offline."""
    d = tmp_path_factory.mktemp("weights")
    torch.save(inception.state_dict(), d / "inception.pth")
    torch.manual_seed(0)
    sd = LPIPS().state_dict()
    torch.save({k: v for k, v in sd.items() if k.startswith("features.")}, d / "vgg16.pth")
    torch.save({k: v for k, v in sd.items() if k.startswith("lin")}, d / "lpips.pth")
    return ["--inception-path", str(d / "inception.pth"), "--vgg-path", str(d / "vgg16.pth"), "--lpips-path", str(d / "lpips.pth")]


def run_eval(args, nproc=1):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launch = [sys.executable] + (["-m", "torch.distributed.run", "--nproc_per_node", str(nproc)] if nproc > 1 else [])
    cmd = launch + ["eval.py"] + args + ["--num-workers", "0", "--device", "cpu"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def random_images(n, seed, size=32, smooth=False):
    x = np.random.default_rng(seed).integers(0, 256, (n, size, size, 3)).astype(np.float64)
    if smooth:  # a visibly different distribution: 4x4 blocks instead of pixel noise
        x = x[:, ::4, ::4].repeat(4, 1).repeat(4, 2)
    return x.astype(np.uint8)


def test_gen_with_few_samples_says_which_numbers_mean_nothing_and_never_reports_a_negative_fid(tmp_path, monkeypatch):
    # 8 images against themselves: singular covariances (8 samples, 2048 and 2023 dimensions) can give a
    # negative FID and sFID, and IS over 8 splits of one image each is exactly 1.0 +- 0. Features
    # of the widths InceptionV3 gives (its own run is tested end to end below, marked slow)
    g = torch.Generator().manual_seed(0)
    feats = {k: torch.randn(8, d, generator=g).double().numpy() for k, d in eval_data.FEATURE_DIMS.items()}
    monkeypatch.setattr(inception_module, "load_inception", lambda *a, **k: None)
    monkeypatch.setattr(eval_data, "inception_features", lambda *a: feats)
    np.savez(tmp_path / "s.npz", arr_0=random_images(8, 0))
    run_eval_in_process(monkeypatch, "gen", "--samples", str(tmp_path / "s.npz"), "--ref", str(tmp_path / "s.npz"),
                        "--out", str(tmp_path / "r.json"), "--num-workers", "0", "--device", "cpu")
    res = json.load(open(tmp_path / "r.json"))
    few = "8 {}, fewer than the {} feature dimensions (the covariance is singular; the protocol uses 50,000)"
    for name, dims in (("fid", 2048), ("sfid", 2023)):
        note = res[f"{name}_note"]
        assert note.startswith(f"not meaningful: {few.format('samples', dims)}; {few.format('reference images', dims)}")
        assert res[name] is None or res[name] >= 0  # a negative distance is never reported as one ...
        assert (res[name] is None) == ("below 0, which a distance cannot be" in note)  # ... but said
    assert res["inception_score"] == 1.0 and res["inception_score_note"].startswith(
        "not meaningful: 8 samples in 8 splits, some of a single image, which scores exactly 1")
    table = open(tmp_path / "r.txt").read()  # each note stands right under its number
    assert table.index("\nfid ") < table.index("\nfid_note ") < table.index("\nsfid ") < table.index("\nsfid_note ")
    # a negative value, whatever the round-off on this machine: None and the computed value in the note
    entries = ev.frechet_entries("fid", -0.92, {"samples": 50000}, 2048)
    assert entries == {"fid": None, "fid_note": "not meaningful: computed -0.92, below 0, which a distance cannot be "
                                                "(round-off)"}
    assert ev.frechet_entries("fid", 3.5, {"samples": 2048}, 2048) == {"fid": 3.5}  # enough samples: no note


@pytest.mark.slow
def test_gen_and_stats_modes_run_end_to_end_single_process_and_under_torchrun(tmp_path, weights):
    np.savez(tmp_path / "samples.npz", arr_0=random_images(11, 0))  # 11: uneven shards over 2 ranks
    np.savez(tmp_path / "ref_images.npz", arr_0=random_images(9, 1, smooth=True))
    # against reference images, on 2 ranks: FID, sFID, IS and precision/recall
    run_eval(["gen", "--samples", str(tmp_path / "samples.npz"), "--ref", str(tmp_path / "ref_images.npz"),
              "--batch-size", "4"] + weights[:2], nproc=2)
    res = json.load(open(tmp_path / "samples_eval.json"))
    assert (res["num_samples"], res["num_ref_images"]) == (11, 9)
    assert res["fid"] > 1 and res["sfid"] > 1 and res["inception_score"] >= 1
    assert 0 <= res["precision"] <= 1 and 0 <= res["recall"] <= 1
    assert "inception_score" in open(tmp_path / "samples_eval.txt").read()
    # the reference statistics saved once (reference-batch format), then reused by a single process:
    # the same numbers, so no image was lost or repeated when 2 ranks gathered their features
    run_eval(["stats", "--images", str(tmp_path / "ref_images.npz"), "--out", str(tmp_path / "ref_stats.npz")] + weights[:2])
    with np.load(tmp_path / "ref_stats.npz") as z:
        assert z["mu"].shape == (2048,) and z["sigma"].shape == (2048, 2048) and z["sigma_s"].shape == (2023, 2023)
    run_eval(["gen", "--samples", str(tmp_path / "samples.npz"), "--ref", str(tmp_path / "ref_stats.npz"),
              "--out", str(tmp_path / "g2.json")] + weights[:2])
    res2 = json.load(open(tmp_path / "g2.json"))
    assert "precision" not in res2 and res2["num_samples"] == 11
    for k in ("fid", "sfid", "inception_score"):
        assert res2[k] == pytest.approx(res[k], rel=1e-5), k


@pytest.mark.slow
def test_recon_mode_runs_end_to_end_and_measures_the_quantised_reconstructions(tmp_path, weights):
    from ae import DGAE, config_to_dict, make_config
    from support.checkpoints import load_dgae

    cfg = make_config("tiny")
    torch.manual_seed(0)
    sd = DGAE(cfg).state_dict()
    checkpoints.save_checkpoint(str(tmp_path / "ckpt.pt"), {"kind": "ae", "model": sd, "ema": sd, "model_args": config_to_dict(cfg)})
    folder = tmp_path / "val"
    folder.mkdir()
    for i, img in enumerate(np.random.default_rng(0).integers(0, 256, (5, 40, 48, 3), dtype=np.uint8)):
        Image.fromarray(img).save(folder / f"img{i}.png")
    (folder / "zz_broken.png").write_bytes(b"not a png")  # sorts last: alone with image 4 in the last batch
    # on 2 ranks: rank 0 takes batch 0 (images 0, 1), rank 1 batches 1, 2 (images 2, 3 and 4, broken)
    run_eval(["recon", "--ckpt", str(tmp_path / "ckpt.pt"), "--data", str(folder), "--decode-steps", "2",
              "--batch-size", "2", "--out", str(tmp_path / "recon.json")] + weights, nproc=2)
    res = json.load(open(tmp_path / "recon.json"))
    assert (res["num_images"], res["num_unreadable"], res["decode_steps"], res["resolution"]) == (5, 1, 2, 32)
    assert math.isfinite(res["rfid"]) and res["rfid"] > 1  # an untrained decoder: far from the originals
    # the same numbers by hand, as one process would get them: ADM crop, reconstruct with the documented seeds, round to uint8, measure
    from support.data import ImageFolderDataset, to_model_range

    model = load_dgae(str(tmp_path / "ckpt.pt"))
    lp = load_lpips(weights[3], weights[5])
    ds = ImageFolderDataset(str(folder), 32)
    x = to_model_range(torch.stack([ds[i][0] for i in range(5)]))  # the items are uint8 pixels
    with torch.no_grad():  # as eval.py decodes
        rec = torch.cat([model.reconstruct(x[lo : lo + 2], steps=2, seed=lo) for lo in (0, 2, 4)])
    real, fake = eval_data.to_pixels(x), eval_data.to_pixels(rec)
    assert res["psnr"] == pytest.approx(metrics.psnr(real, fake).mean().item(), rel=1e-6)
    assert res["ssim"] == pytest.approx(metrics.ssim(real, fake).mean().item(), rel=1e-6)
    assert res["lpips"] == pytest.approx(lp(real / 127.5 - 1, fake / 127.5 - 1).mean().item(), rel=1e-4)


@pytest.mark.slow
def test_recon_mode_scores_builtin_heldout_images_without_any_weight_file(tmp_path):
    from ae import DGAE, config_to_dict, make_config
    from support.checkpoints import load_dgae
    from support.procedural import ProceduralDataset

    cfg = make_config("tiny", decode_steps=2)
    torch.manual_seed(0)
    sd = DGAE(cfg).state_dict()
    checkpoints.save_checkpoint(str(tmp_path / "ckpt.pt"), {"kind": "ae", "model": sd, "ema": sd, "model_args": config_to_dict(cfg)})
    env_weights = {**os.environ, "DGAE_WEIGHTS": str(tmp_path / "no_weights_here")}
    cmd = [sys.executable, "eval.py", "recon", "--ckpt", str(tmp_path / "ckpt.pt"), "--num-images", "6",
           "--batch-size", "4", "--out", str(tmp_path / "recon.json"), "--device", "cpu", "--num-workers", "0"]
    proc = subprocess.run(cmd, cwd=ROOT, env={k: v for k, v in env_weights.items() if not k.startswith("DGAE_") or k == "DGAE_WEIGHTS"},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    res = json.load(open(tmp_path / "recon.json"))
    assert set(res["skipped"]) == {"lpips", "rfid"} and "lpips" not in res and "rfid" not in res
    assert res["num_images"] == 6 and res["compression"] == 4
    # the numbers by hand: held-out items 0..5 of the built-in data, batches decoded with seeds 0 and 4
    model = load_dgae(str(tmp_path / "ckpt.pt"))
    ds = ProceduralDataset(32, size=6, seed=eval_data.HELDOUT_SEED)
    x = torch.stack([ds[i][0] for i in range(6)])
    real = eval_data.to_pixels(x)
    with torch.no_grad():  # as eval.py decodes
        fake = eval_data.to_pixels(torch.cat([model.reconstruct(x[:4], steps=2, seed=0),
                                              model.reconstruct(x[4:], steps=2, seed=4)]))
    for key, value in (("psnr", metrics.psnr(real, fake)), ("ssim", metrics.ssim(real, fake)), ("lowfreq_psnr", metrics.lowfreq_psnr(real, fake, 4)),
                       ("meancolour_psnr", metrics.psnr(real, real.mean(dim=(2, 3), keepdim=True).expand_as(real)))):
        assert res[key] == pytest.approx(value.mean().item(), rel=1e-6), key
    hf = metrics.highfreq_ratio(metrics.highfreq_energy(fake, 4).numpy(), metrics.highfreq_energy(real, 4).numpy())
    assert res["highfreq_ratio"] == pytest.approx(hf, rel=1e-6)


@pytest.mark.slow
def test_classes_mode_scores_the_labels_the_judge_agrees_with_and_refuses_bad_samples(tmp_path, monkeypatch, both_cores):
    # "samples" that are real built-in images (not the judge's training images): the first half carry
    # their own class, the second half the next class. The judge names held-out real images right, so
    # the score is about half of its real accuracy plus its rare confusions into the next class.
    from support.data import to_uint8
    from support.procedural import ProceduralDataset

    ds = ProceduralDataset(32, size=200, seed=777)
    x = torch.stack([ds[i][0] for i in range(200)])  # (200, 3, 32, 32)
    y = np.arange(200) % 10
    y[100:] = (y[100:] + 1) % 10
    np.savez(tmp_path / "s.npz", arr_0=to_uint8(x), labels=y)
    np.savez(tmp_path / "noise.npz", arr_0=to_uint8(torch.rand_like(x) * 2 - 1), labels=y)
    from support import procedural  # one judge for both calls (eval.py is reloaded and imports it)
    judges, train_judge = [], procedural.train_pattern_classifier
    monkeypatch.setattr(procedural, "train_pattern_classifier",
                        lambda *a, **k: judges[0] if judges else judges.append(train_judge(*a, **k)) or judges[0])
    run_eval_in_process(monkeypatch, "classes", "--samples", str(tmp_path / "s.npz"), "--device", "cpu")
    run_eval_in_process(monkeypatch, "classes", "--samples", str(tmp_path / "noise.npz"), "--device", "cpu")
    res, noise = json.load(open(tmp_path / "s_classes.json")), json.load(open(tmp_path / "noise_classes.json"))
    # real images of another seed lie close to the held-out ones in the judge's feature space; noise far away
    assert 0 < res["judge_fd"] and 20 * res["judge_fd"] < noise["judge_fd"], (res["judge_fd"], noise["judge_fd"])
    assert res["num_samples"] == 200 and res["resolution"] == 32 and res["chance"] == 0.1
    assert res["real_accuracy"] >= 0.9  # the judge recognises the built-in patterns
    assert 0.5 * res["real_accuracy"] - 0.1 <= res["accuracy"] <= 0.6, res
    assert set(res["per_class_accuracy"]) == set(ds.class_names)
    # refused in one line before any training: no labels, labels beyond --num-classes, not an .npz
    np.savez(tmp_path / "unlabelled.npz", arr_0=to_uint8(x))
    np.savez(tmp_path / "k12.npz", arr_0=to_uint8(x), labels=np.arange(200) % 12)
    np.savez(tmp_path / "empty.npz", arr_0=np.zeros((0, 32, 32, 3), np.uint8), labels=np.zeros(0, np.int64))
    for path, message in [("unlabelled.npz", "has no labels"), ("k12.npz", r"not in \[0, --num-classes 10\)"),
                          ("empty.npz", "0 images and 0 labels"),
                          ("samples_dir", "an .npz of samples and their labels")]:
        with pytest.raises(SystemExit, match=message):
            run_eval_in_process(monkeypatch, "classes", "--samples", str(tmp_path / path), "--device", "cpu")


@pytest.mark.parametrize("stats, message", [
    ({"mu": np.zeros(4)}, "has mu but not sigma"),
    ({"mu": np.array(["a"] * 4), "sigma": np.eye(4)}, "are not numbers"),
    ({"mu": np.zeros(4), "sigma": np.eye(3)}, "do not pair"),
    ({"mu": np.full(4, np.nan), "sigma": np.eye(4)}, "not finite"),
])
def test_reference_statistics_that_cannot_give_a_number_are_refused(stats, message):
    with pytest.raises(SystemExit, match=message):
        ev.check_reference_stats("ref.npz", stats)
    ev.check_reference_stats("ref.npz", {"mu": np.zeros(4), "sigma": np.eye(4)})  # a good one passes


def test_evaluation_of_an_imagenet_root_reads_val_not_train(tmp_path):
    for split, value in (("train", 0), ("val", 200)):
        (tmp_path / split / "n01").mkdir(parents=True)
        Image.fromarray(np.full((16, 16, 3), value, np.uint8)).save(tmp_path / split / "n01" / "a.png")
    src = eval_data.ImageSource(str(tmp_path), 16)
    (x,) = list(src.batches(0, 1, 1))
    assert x.float().mean().item() == 200  # the val image


class _FakeInception(torch.nn.Module):
    """Features of the right sizes from each image's pixels (a seeded random projection): what eval.py gen
    needs to run end to end without the weight file."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.proj = {k: torch.randn(3 * 8 * 8, d, generator=g) for k, d in eval_data.FEATURE_DIMS.items()}

    def forward(self, x):
        x = torch.nn.functional.adaptive_avg_pool2d(x, 8).flatten(1)
        return {k: x @ p for k, p in self.proj.items()}


def test_gen_with_a_reference_of_three_images_skips_precision_recall_and_says_why(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "s.npz", arr_0=rng.integers(0, 256, (6, 16, 16, 3), dtype=np.uint8))
    np.savez(tmp_path / "ref.npz", arr_0=rng.integers(0, 256, (3, 16, 16, 3), dtype=np.uint8))
    fresh = importlib.reload(ev)  # support's own functions, not a stand-in an earlier test bound at reload
    monkeypatch.setattr(fresh, "load_inception", lambda *a, **k: _FakeInception())
    monkeypatch.setattr(sys, "argv", ["eval.py", "gen", "--samples", str(tmp_path / "s.npz"), "--ref",
                                      str(tmp_path / "ref.npz"), "--resolution", "16", "--out", str(tmp_path / "r.json")])
    fresh.main()
    results = json.load(open(tmp_path / "r.json"))
    assert "precision" not in results and "more than 3 images" in results["skipped"]["precision/recall"]
    assert math.isfinite(results["fid"])
    # main(argv) from a notebook: its own arguments, not sys.argv's, and a second call starts from the defaults
    fresh.main(["gen", "--samples", str(tmp_path / "s.npz"), "--ref", str(tmp_path / "ref.npz"), "--resolution", "16",
                "--out", str(tmp_path / "r2.json")])
    assert json.load(open(tmp_path / "r2.json"))["fid"] == results["fid"]


def _colour_folder(root, n, seed):
    """n 16-px images per class of three classes, each noise around its own colour."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for k, name in enumerate(("blue", "green", "red")):  # sorted, so class k is this colour
        (root / name).mkdir(parents=True)
        for i in range(n):
            arr = np.clip(rng.normal(60, 30, (16, 16, 3)), 0, 255)
            arr[..., 2 - k] += 150
            arr = arr.clip(0, 255).astype(np.uint8)
            Image.fromarray(arr).save(root / name / f"{i}.png")
            images.append(arr)
            labels.append(k)
    return np.stack(images), np.array(labels)


def test_classes_on_a_folder_trains_the_judge_on_its_classes(tmp_path, monkeypatch):
    _colour_folder(tmp_path / "train", 30, seed=0)
    (tmp_path / "train" / "red" / "broken.png").write_bytes(b"not a png")  # skipped, not fatal
    x, y = _colour_folder(tmp_path / "val", 10, seed=1)
    np.savez(tmp_path / "right.npz", arr_0=x, labels=y)
    np.savez(tmp_path / "wrong.npz", arr_0=x, labels=(y + 1) % 3)
    flags = ["--data", str(tmp_path / "train"), "--val-data", str(tmp_path / "val"), "--judge-steps", "40",
             "--device", "cpu"]
    run_eval_in_process(monkeypatch, "classes", "--samples", str(tmp_path / "right.npz"), *flags)
    run_eval_in_process(monkeypatch, "classes", "--samples", str(tmp_path / "wrong.npz"), *flags)
    right, wrong = (json.load(open(tmp_path / f"{n}_classes.json")) for n in ("right", "wrong"))
    assert right["num_classes"] == 3 and right["chance"] == pytest.approx(1 / 3)
    assert right["real_accuracy"] >= 0.9 and right["accuracy"] >= 0.9 and wrong["accuracy"] <= 0.1, (right, wrong)
    assert set(right["per_class_accuracy"]) == {"blue", "green", "red"}
    assert math.isfinite(right["judge_fd"]) and right["judge_fd"] == wrong["judge_fd"]  # images, not labels
    # labels past the folder's classes, and a held-out folder with other classes: one line each
    np.savez(tmp_path / "k4.npz", arr_0=x, labels=np.arange(len(x)) % 4)
    with pytest.raises(SystemExit, match=r"not in \[0, 3\): --data has 3 classes"):
        run_eval_in_process(monkeypatch, "classes", "--samples", str(tmp_path / "k4.npz"), *flags)
    (tmp_path / "val" / "violet").mkdir()
    with pytest.raises(SystemExit, match="differ from --data's"):
        run_eval_in_process(monkeypatch, "classes", "--samples", str(tmp_path / "right.npz"), *flags)
    # a flat folder is one class, which every sample would match: refused, nothing written
    flat = ["--data", str(tmp_path / "train" / "red"), "--val-data", str(tmp_path / "val" / "red")]
    with pytest.raises(SystemExit, match="red: one class, so every image would be named right"):
        run_eval_in_process(monkeypatch, "classes", "--samples", str(tmp_path / "k4.npz"), *flat,
                            "--out", str(tmp_path / "flat.json"))
    assert not (tmp_path / "flat.json").exists()


def test_classes_refuses_labels_that_are_not_one_per_image(tmp_path):
    np.savez(tmp_path / "s.npz", arr_0=np.zeros((4, 16, 16, 3), np.uint8), labels=np.zeros((4, 1), np.int64))
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "eval.py"), "classes", "--samples", str(tmp_path / "s.npz")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "labels of shape (4, 1)" in proc.stderr.strip().splitlines()[-1]



def test_a_batch_of_unreadable_images_moves_no_other_batchs_decoder_seed(tmp_path, monkeypatch):
    # Each batch decodes with seed + the index of its first image in the folder: a batch left out
    # because none of its images could be read must not shift the next (else a torchrun shard,
    # which starts at its own index, would decode other noise than one process).
    from ae import DGAE, config_to_dict, make_config
    from support.checkpoints import load_dgae
    from support.data import ImageFolderDataset, InOrder, to_model_range

    cfg = make_config("tiny", resolution=16, decode_steps=2)
    torch.manual_seed(0)  # weights jittered off the init, whose zero output layers make every decode its noise
    sd = {k: v + 0.2 * torch.randn_like(v) if v.is_floating_point() else v for k, v in DGAE(cfg).state_dict().items()}
    ckpt = str(tmp_path / "ae.pt")
    checkpoints.save_checkpoint(ckpt, {"kind": "ae", "model": sd, "ema": sd, "model_args": config_to_dict(cfg)})
    folder = tmp_path / "val"
    folder.mkdir()
    for i, img in enumerate(np.random.default_rng(0).integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)):
        Image.fromarray(img).save(folder / f"{'ad'[i // 2]}{i}.png")  # a0 a1 | b c (unreadable) | d2 d3
    for name in ("b.png", "c.png"):
        (folder / name).write_bytes(b"not a png")
    for workers in (0, 2):  # loader processes prefetch, and still hand the batches over in order
        batches = InOrder(ImageFolderDataset(str(folder), 16), 2, num_workers=workers)
        assert [batches.first for _ in batches] == [0, 4]
    monkeypatch.setenv("DGAE_WEIGHTS", str(tmp_path / "no_weights_here"))  # no LPIPS, no rFID: pixels only
    for var in ("DGAE_INCEPTION", "DGAE_VGG16", "DGAE_LPIPS"):
        monkeypatch.delenv(var, raising=False)
    run_eval_in_process(monkeypatch, "recon", "--ckpt", ckpt, "--data", str(folder), "--batch-size", "2",
                        "--seed", "7", "--out", str(tmp_path / "r.json"), "--device", "cpu", "--num-workers", "0")
    res = json.load(open(tmp_path / "r.json"))
    assert (res["num_images"], res["num_unreadable"]) == (4, 2)
    ds = ImageFolderDataset(str(folder), 16)
    x = to_model_range(torch.stack([ds[i][0] for i in (0, 1, 4, 5)]))  # (4, 3, 16, 16)
    model = load_dgae(ckpt)
    with torch.no_grad():  # the second readable batch starts at image 4: seed 7 + 4
        rec = torch.cat([model.reconstruct(x[:2], steps=2, seed=7), model.reconstruct(x[2:], steps=2, seed=11)])
    assert res["psnr"] == pytest.approx(metrics.psnr(eval_data.to_pixels(x), eval_data.to_pixels(rec)).mean().item(), rel=1e-6)


def test_sample_files_splits_on_commas_once_each_and_keeps_a_comma_named_file_whole(tmp_path):
    assert eval_data.sample_files("a.npz, b.npz,a.npz") == ["a.npz", "b.npz"]
    assert eval_data.sample_files("") == [""]  # not given: classes says what it needs
    odd = tmp_path / "x,y.npz"
    odd.write_bytes(b"")
    assert eval_data.sample_files(str(odd)) == [str(odd)]
    with pytest.raises(SystemExit, match="an empty name between commas"):
        eval_data.sample_files("a.npz,")

def test_recon_of_one_image_is_refused_not_a_nan():
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "eval.py"), "recon", "--ckpt", "x.pt", "--num-images", "1"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and proc.stderr.strip().splitlines()[-1].startswith("error: recon --num-images 1")


def test_classes_with_the_autoencoder_measures_samples_against_its_reconstructions(tmp_path, monkeypatch):
    # Known answers: samples that ARE the autoencoder's reconstructions of the held-out images (decoded
    # with the documented seeds: seed + the index of each batch's first image) lie at FD 0 from them and
    # score the reconstructions' accuracy; the real held-out images lie at FD 0 from the real images.
    from ae import DGAE, config_to_dict, make_config
    from support.checkpoints import load_dgae
    from support.data import ImageFolderDataset, to_model_range

    _colour_folder(tmp_path / "train", 30, seed=0)
    x, y = _colour_folder(tmp_path / "val", 10, seed=1)
    cfg = make_config("tiny", resolution=16, decode_steps=2)
    torch.manual_seed(0)
    sd = DGAE(cfg).state_dict()
    ckpt = str(tmp_path / "ae.pt")
    checkpoints.save_checkpoint(ckpt, {"kind": "ae", "model": sd, "ema": sd, "model_args": config_to_dict(cfg)})
    model = load_dgae(ckpt)
    heldout = ImageFolderDataset(str(tmp_path / "val"), 16, split="val")
    real = to_model_range(torch.stack([heldout[i][0] for i in range(len(heldout))]))  # (30, 3, 16, 16)
    labels = np.array([heldout[i][1] for i in range(len(heldout))])
    with torch.no_grad():
        rec = torch.cat([model.reconstruct(real[lo : lo + 8], seed=5 + lo) for lo in range(0, 30, 8)])
    np.savez(tmp_path / "recon.npz", arr_0=eval_data.to_pixels(rec).permute(0, 2, 3, 1).numpy().astype(np.uint8), labels=labels)
    np.savez(tmp_path / "real.npz", arr_0=x, labels=y)
    flags = ["--data", str(tmp_path / "train"), "--val-data", str(tmp_path / "val"), "--judge-steps", "40",
             "--device", "cpu", "--ae-ckpt", ckpt, "--seed", "5", "--batch-size", "8"]
    run_eval_in_process(monkeypatch, "classes", "--samples", str(tmp_path / "recon.npz"), *flags)
    run_eval_in_process(monkeypatch, "classes", "--samples", str(tmp_path / "real.npz"), *flags)
    as_recon, as_real = (json.load(open(tmp_path / f"{n}_classes.json")) for n in ("recon", "real"))
    assert as_recon["judge_fd_recon"] == pytest.approx(0, abs=1e-4) and as_recon["judge_fd"] > 1e-3
    assert as_recon["accuracy"] == pytest.approx(as_recon["recon_accuracy"]) and as_recon["ae_ckpt"] == ckpt
    assert as_real["judge_fd"] == pytest.approx(0, abs=1e-4)  # sqrtm noise against FDs of ~60
    assert as_real["judge_fd_recon"] == pytest.approx(as_recon["judge_fd"], rel=1e-6)  # the same two sets
    # several sample files in one call share the judge and the reconstructions: each result is the
    # one its file gets alone, written beside it
    both = tmp_path / "both"
    both.mkdir()
    for n in ("recon", "real"):
        shutil.copy(tmp_path / f"{n}.npz", both / f"{n}.npz")
    run_eval_in_process(monkeypatch, "classes", "--samples", f"{both / 'recon.npz'},{both / 'real.npz'}", *flags)
    for n, alone in (("recon", as_recon), ("real", as_real)):
        together = json.load(open(both / f"{n}_classes.json"))
        assert together.pop("samples") == str(both / f"{n}.npz") and alone.pop("samples")
        assert together == alone
    with pytest.raises(SystemExit, match="with several --samples each result goes beside its samples"):
        run_eval_in_process(monkeypatch, "classes", "--samples", f"{both / 'recon.npz'},{both / 'real.npz'}",
                            "--out", str(tmp_path / "r.json"), *flags)
    with pytest.raises(SystemExit, match="an empty name between commas"):
        run_eval_in_process(monkeypatch, "classes", "--samples", f"{both / 'recon.npz'},,{both / 'real.npz'}", *flags)
    np.savez(tmp_path / "s8.npz", arr_0=x[:, ::2, ::2], labels=y)
    with pytest.raises(SystemExit, match="s8.npz: 8 px, .*real.npz: 16 px; score samples of one resolution"):
        run_eval_in_process(monkeypatch, "classes", "--samples", f"{tmp_path / 'real.npz'},{tmp_path / 's8.npz'}", *flags)
    # another decoder seed gives other reconstructions: no longer the samples
    run_eval_in_process(monkeypatch, "classes", "--samples", str(tmp_path / "recon.npz"), *flags[:-4], "--batch-size", "8")
    assert json.load(open(tmp_path / "recon_classes.json"))["judge_fd_recon"] > 1e-3
    # a stage-1 model of another resolution than the samples: one line before the judge trains
    cfg32 = make_config("tiny")
    sd32 = DGAE(cfg32).state_dict()
    checkpoints.save_checkpoint(str(tmp_path / "ae32.pt"), {"kind": "ae", "model": sd32, "ema": sd32, "model_args": config_to_dict(cfg32)})
    with pytest.raises(SystemExit, match="works at 32 px, --samples are 16 px"):
        run_eval_in_process(monkeypatch, "classes", "--samples", str(tmp_path / "real.npz"), *flags[:-6], "--ae-ckpt", str(tmp_path / "ae32.pt"))


def test_classes_on_builtin_data_reconstructs_the_rounded_heldout_images_the_samples_are_compared_with(tmp_path, monkeypatch):
    # The built-in held-out images are floats; the judge sees them rounded to uint8 like every sample, and
    # the autoencoder must reconstruct those same rounded images: samples made that way lie at FD 0.
    from ae import DGAE, config_to_dict, make_config
    from support.checkpoints import load_dgae
    from support.procedural import ProceduralDataset

    cfg = make_config("tiny", decode_steps=2)
    torch.manual_seed(0)  # weights jittered off the init, whose zero output layers make every decode its noise
    sd = {k: v + 0.2 * torch.randn_like(v) if v.is_floating_point() else v for k, v in DGAE(cfg).state_dict().items()}
    ckpt = str(tmp_path / "ae.pt")
    checkpoints.save_checkpoint(ckpt, {"kind": "ae", "model": sd, "ema": sd, "model_args": config_to_dict(cfg)})
    model = load_dgae(ckpt)
    ds = ProceduralDataset(32, 10, size=eval_data.HELDOUT_SIZE, seed=eval_data.HELDOUT_SEED)
    px = eval_data.to_pixels(torch.stack([ds[i][0] for i in range(len(ds))]))  # (500, 3, 32, 32) rounded
    with torch.no_grad():
        rec = torch.cat([eval_data.to_pixels(model.reconstruct(px[lo : lo + 250] / 127.5 - 1, seed=lo)) for lo in (0, 250)])
    labels = np.array([ds[i][1] for i in range(len(ds))])
    np.savez(tmp_path / "s.npz", arr_0=rec.permute(0, 2, 3, 1).numpy().astype(np.uint8), labels=labels)
    run_eval_in_process(monkeypatch, "classes", "--samples", str(tmp_path / "s.npz"), "--judge-steps", "30",
                        "--batch-size", "250", "--device", "cpu", "--ae-ckpt", ckpt)
    res = json.load(open(tmp_path / "s_classes.json"))
    assert res["judge_fd_recon"] == pytest.approx(0, abs=1e-4) and res["judge_fd"] > 1e-2, res
    assert res["accuracy"] == pytest.approx(res["recon_accuracy"])
    # --decode-steps reaches the reconstructions: other steps, other images
    run_eval_in_process(monkeypatch, "classes", "--samples", str(tmp_path / "s.npz"), "--judge-steps", "30",
                        "--batch-size", "250", "--device", "cpu", "--ae-ckpt", ckpt, "--decode-steps", "3")
    other = json.load(open(tmp_path / "s_classes.json"))
    assert other["judge_fd_recon"] > 1e-4, other  # ~2e-3 here; the same decodes give ~1e-9
