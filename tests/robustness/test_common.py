"""The shared plumbing: settings and the CPU side of the CUDA-only features (common.py), checkpoints (checkpoints.py)."""

import errno
import json
import re
import subprocess
import sys
import os

import numpy as np
import pytest
import torch

from support import checkpoints, common, optim


def test_configure_parses_types_dashes_and_rejects_unknown_names():
    s = dict(compression=0, lr=1e-3, compile=False, data="", seed=0, _private=1)
    settings, given = common.configure(s, ["--compression", "32", "--lr=2e-4", "--compile", "true", "--data", "/x"])
    assert settings == dict(compression=32, lr=2e-4, compile=True, data="/x", seed=0)
    assert isinstance(settings["compression"], int) and given == {"compression", "lr", "compile", "data"}
    assert s == dict(compression=0, lr=1e-3, compile=False, data="", seed=0, _private=1)  # the defaults stay
    # None ("the preset's") takes the value as written: a whole number, a number, or the text
    none = dict(batch_size=None, lr=None, preset=None)
    assert common.configure(none, ["--batch-size", "8", "--lr", "3e-4", "--preset", "base"])[0] == \
        dict(batch_size=8, lr=3e-4, preset="base")
    assert common.configure(none, [])[0] == none
    with pytest.raises(SystemExit, match="unknown setting --compresion"):
        common.configure(dict(compression=0), ["--compresion", "32"])
    with pytest.raises(SystemExit, match="takes a whole number"):
        common.configure(dict(compression=0), ["--compression", "big"])
    with pytest.raises(SystemExit, match="true or false"):
        common.configure(dict(compile=False), ["--compile", "maybe"])


def test_check_settings_names_the_flag_and_its_range():
    ok = dict(max_steps=1, num_images=0, lr=1e-4, kl_weight=0.0, ema_decay=0.0, cfg_scale=-2.0)
    kinds = dict(count=("max_steps",), count_or_0=("num_images",), positive=("lr",), non_negative=("kl_weight",),
                 fraction=("ema_decay",), finite=("cfg_scale",))
    common.check_settings(ok, **kinds)  # every value at the edge of its range passes
    for name, bad, message in [("max_steps", 0, "--max-steps must be at least 1, got 0"),
                               ("num_images", -1, "--num-images must be at least 0, got -1"),
                               ("lr", float("inf"), "--lr must be a finite number above 0, got inf"),
                               ("kl_weight", float("nan"), "--kl-weight must be a finite number at least 0, got nan"),
                               ("ema_decay", 1.0, "--ema-decay must be in [0, 1), got 1.0"),
                               ("cfg_scale", float("nan"), "--cfg-scale must be a finite number, got nan")]:
        with pytest.raises(SystemExit) as e:
            common.check_settings({**ok, name: bad}, **kinds)
        assert str(e.value) == "error: " + message


def test_writable_dir_creates_the_folder_or_refuses_in_one_line(tmp_path):
    common.writable_dir(str(tmp_path / "a" / "b"), "--out-dir")
    assert os.listdir(tmp_path / "a" / "b") == []  # created, and the probe file is gone
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit, match=r"^error: --out-dir .*file/run: cannot write there \(Not a directory\)"):
        common.writable_dir(str(tmp_path / "file" / "run"), "--out-dir")


def test_writable_file_refuses_a_folder_in_its_place_or_beside_it_and_a_path_under_a_file(tmp_path):
    common.writable_file(str(tmp_path / "new" / "r.json"), "--out", also=(str(tmp_path / "new" / "r.txt"),))
    assert os.listdir(tmp_path / "new") == []  # the folder is created, nothing is left in it
    (tmp_path / "r.txt").mkdir()
    (tmp_path / "file").write_text("")
    for path, also, message in [(tmp_path / "r.txt", (), "r.txt is a folder, where a file is to be written"),
                                (f"{tmp_path}{os.sep}", (), "is a folder, where a file is to be written"),
                                (tmp_path / "r.json", (str(tmp_path / "r.txt"),), "r.txt is a folder"),  # the table's place
                                (tmp_path / "file" / "r.json", (), "its folder .*file: cannot write there")]:
        with pytest.raises(SystemExit, match=f"^error: --out {re.escape(str(path))}: .*{message}") as e:
            common.writable_file(str(path), "--out", also=also)
        assert "\n" not in str(e.value)


def test_cpu_paths_of_the_cuda_only_features():
    # bf16 autocast and TF32 are CUDA-only: on the CPU the context changes nothing
    with common.autocast_context(torch.device("cpu")):
        y = torch.nn.Linear(4, 4)(torch.randn(2, 4))
    assert y.dtype == torch.float32
    # without torchrun's environment there is no process group and shutdown is a no-op
    env = {k: os.environ.pop(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK") if k in os.environ}
    try:
        dist = common.setup_distributed("cpu")
        assert not dist.ddp and dist.world_size == 1 and dist.master
        common.shutdown(dist)
    finally:
        os.environ.update(env)


def test_checkpoints_are_atomic_stripped_and_checked_for_their_kind(tmp_path):
    path = str(tmp_path / "run" / "ckpt.pt")
    sd = {"_orig_mod.module.w": torch.ones(2), "module.b": torch.zeros(1)}
    checkpoints.save_checkpoint(path, dict(kind="ae", model=sd, ema=sd, step=3, rng=[checkpoints.rng_state()], model_args={}))
    assert os.listdir(tmp_path / "run") == ["ckpt.pt"]  # no temp file left behind
    ck = checkpoints.load_checkpoint(path, "ae")
    assert set(ck["model"]) == {"w", "b"} and set(ck["ema"]) == {"w", "b"}
    checkpoints.set_rng_state(ck["rng"][0])  # the saved generator states load back under weights_only
    with pytest.raises(ValueError, match="'ae' checkpoint .* but a 'dit' checkpoint"):
        checkpoints.load_checkpoint(path, "dit")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="could not read checkpoint"):
        checkpoints.load_checkpoint(str(tmp_path / "junk.pt"), "ae")
    with pytest.raises(FileNotFoundError):
        checkpoints.load_checkpoint(str(tmp_path / "nope.pt"), "ae")


def test_bad_checkpoint_files_are_one_line_naming_the_file(tmp_path):
    good = dict(kind="ae", model_args={}, ema={}, model={}, step=1)
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "random.pt").write_bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    checkpoints.save_checkpoint(str(tmp_path / "no_args.pt"), {k: v for k, v in good.items() if k != "model_args"})
    checkpoints.save_checkpoint(str(tmp_path / "truncated.pt"), dict(good, ema={"w": torch.zeros(1000)}))
    (tmp_path / "truncated.pt").write_bytes((tmp_path / "truncated.pt").read_bytes()[:1500])
    for name, message in [("empty.pt", "is empty \\(0 bytes\\)"), ("random.pt", "could not read checkpoint"),
                          ("truncated.pt", "could not read checkpoint"),
                          ("no_args.pt", "has no 'model_args': it is not a complete 'ae' checkpoint")]:
        with pytest.raises(ValueError, match=message) as e:
            checkpoints.load_checkpoint(str(tmp_path / name), "ae")
        text = str(e.value)
        assert str(tmp_path / name) in text and "\n" not in text  # one line, naming the file
        assert "weights_only" not in text  # never relay torch's advice to load unsafely
    # a checkpoint without the training state cannot be resumed, but says so
    checkpoints.save_checkpoint(str(tmp_path / "weights_only.pt"), good)
    with pytest.raises(ValueError, match="has no 'optimizer', 'loader', 'rng', so its run cannot be resumed"):
        checkpoints.resume_or_refuse(str(tmp_path / "weights_only.pt"), True, "ae")


def test_weights_of_edited_shapes_are_one_line_naming_the_file():
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    sd = net.state_dict()
    sd["0.weight"] = torch.zeros(5, 4)  # an edited shape
    with pytest.raises(ValueError) as e:
        checkpoints.load_weights(net, sd, "run/ckpt.pt")
    assert str(e.value).startswith("run/ckpt.pt: its weights do not fit the model its model_args describe "
                                   "(size mismatch for 0.weight: copying a param with shape torch.Size([5, 4])")
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="run/ckpt.pt: .*Missing key"):
        checkpoints.load_weights(net, {}, "run/ckpt.pt")


def test_a_failed_checkpoint_write_keeps_the_old_file_and_removes_the_tmp(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.pt")
    checkpoints.save_checkpoint(path, {"kind": "ae", "step": 1})
    before = open(path, "rb").read()
    real_save = torch.save

    def disk_full(obj, fh):
        real_save(obj, fh)  # most of the file is written, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(SystemExit) as e:
        checkpoints.save_checkpoint(path, {"kind": "ae", "step": 2, "w": torch.zeros(10000)})
    assert str(e.value) == (f"error: could not write {path} (No space left on device); the previous file is kept. "
                            "Free some space or choose a folder you can write to.")
    assert open(path, "rb").read() == before and os.listdir(tmp_path) == ["ckpt.pt"]  # no ckpt.pt.tmp left
    # an interrupt mid-write (Ctrl-C) is passed on, and leaves no .tmp either
    monkeypatch.setattr(torch, "save", lambda obj, fh: (fh.write(b"half"), (_ for _ in ()).throw(KeyboardInterrupt)))
    with pytest.raises(KeyboardInterrupt):
        checkpoints.save_checkpoint(path, {"kind": "ae", "step": 3})
    assert open(path, "rb").read() == before and os.listdir(tmp_path) == ["ckpt.pt"]


def test_a_symlinked_checkpoint_is_written_through_the_link(tmp_path):
    # ckpt.pt as a link to a file on a persistent volume: a save must update the file on the volume and
    # keep the link, not replace the link by a regular file and leave the volume's copy a step behind
    (tmp_path / "volume").mkdir()
    (tmp_path / "run").mkdir()
    checkpoints.save_checkpoint(str(tmp_path / "volume/ckpt.pt"), {"kind": "ae", "step": 1})
    os.symlink(tmp_path / "volume/ckpt.pt", tmp_path / "run/ckpt.pt")
    checkpoints.save_checkpoint(str(tmp_path / "run/ckpt.pt"), {"kind": "ae", "step": 2})
    assert os.path.islink(tmp_path / "run/ckpt.pt")
    assert torch.load(tmp_path / "volume/ckpt.pt", weights_only=True)["step"] == 2
    assert sorted(os.listdir(tmp_path / "volume")) == ["ckpt.pt"] and os.listdir(tmp_path / "run") == ["ckpt.pt"]


def test_an_unavailable_device_is_one_line_listing_the_devices_this_machine_has():
    has = common.available_devices()
    assert has[0] == "cpu"
    common.check_device("")  # automatic: always fine
    for name in has:
        common.check_device(name)
    missing = ["foo", "cuda:99"] + [d for d in ("cuda", "mps") if d not in has]
    for name in missing:
        with pytest.raises(SystemExit) as e:
            common.check_device(name)
        assert str(e.value) == (f"error: --device {name} is not available on this machine, which has: {', '.join(has)}; "
                                "pass one of those, or leave --device out to pick one")
        with pytest.raises(SystemExit, match=f"--device {name} is not available"):  # what every script starts with
            common.setup_distributed(name)


def test_rng_state_round_trip_reproduces_the_same_draws():
    state = checkpoints.rng_state()
    a = (torch.rand(3), torch.randn(2))
    checkpoints.set_rng_state(state)
    b = (torch.rand(3), torch.randn(2))
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_find_weights_order_and_error(tmp_path, monkeypatch):
    monkeypatch.setenv("DGAE_WEIGHTS", str(tmp_path))
    monkeypatch.delenv("DGAE_X", raising=False)
    args = ("x.pth", "https://example.org/x.pth", "--x-path", "DGAE_X")
    with pytest.raises(FileNotFoundError, match=r"x\.pth.*https://example\.org/x\.pth.*--x-path.*DGAE_X"):
        checkpoints.find_weights(None, *args)
    assert checkpoints.find_weights(None, *args, required=False) is None
    (tmp_path / "x.pth").write_bytes(b"")
    assert checkpoints.find_weights(None, *args) == str(tmp_path / "x.pth")
    with pytest.raises(FileNotFoundError):  # a path the user typed must exist, even for an optional file
        checkpoints.find_weights(str(tmp_path / "typo.pth"), *args, required=False)


def test_a_collective_timeout_or_a_lost_peer_is_one_line_naming_the_rank(monkeypatch):
    gloo = RuntimeError("[/pytorch/third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting "
                        "5000ms for recv operation to complete")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "8")
    with pytest.raises(SystemExit) as e:
        with common.collective_timeouts():
            raise gloo
    assert str(e.value).startswith("error: rank 3 of 8: a collective operation timed out (Timed out waiting 5000ms "
                                   "for recv operation to complete): another rank stopped responding")
    # a peer that ended (e.g. stopped by a signal while this rank waited at a barrier), as gloo words it
    peer_gone = RuntimeError("[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer "
                             "[127.0.0.1]:17078. This is typically caused by a remote worker crashing.")
    with pytest.raises(SystemExit) as e:
        with common.collective_timeouts():
            raise peer_gone
    assert str(e.value).startswith("error: rank 3 of 8: a collective operation failed (Connection closed by peer "
                                   "[127.0.0.1]:17078.") and "another rank ended" in str(e.value)
    with pytest.raises(RuntimeError, match="DataLoader timed out"):  # not a collective: passed on as it is
        with common.collective_timeouts():
            raise RuntimeError("DataLoader timed out after 5 seconds")
    monkeypatch.delenv("RANK")
    with pytest.raises(RuntimeError, match="Timed out waiting"):  # not under torchrun
        with common.collective_timeouts():
            raise gloo


@pytest.mark.parametrize("script", ["train_ae.py", "train_dit.py", "sample.py", "eval.py", "experiments/claims.py", "experiments/bench.py"])
def test_every_setting_explains_itself_in_help(script):
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.run([sys.executable, os.path.join(root, script), "--help"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("  --")]
    assert len(rows) >= 6
    # each row: the flag, its default, then at least a few words saying what it is
    bare = [row.split()[0] for row in rows if len(row.split()) < 4]
    assert not bare, f"{script}: settings without a description: {bare}"


def test_setting_comments_are_read_from_the_script(tmp_path):
    path = tmp_path / "s.py"
    path.write_text('steps = 5  # how many\nname = "a  # b"  # the name\nplain = 1\n  indented = 2  # no\n')
    assert common.setting_comments(str(path)) == {"steps": "how many", "name": "the name"}
    assert common.setting_comments(str(tmp_path / "missing.py")) == {}


def test_deterministic_kernels_are_selected_with_the_cublas_workspace(monkeypatch):
    """--deterministic: cuBLAS's workspace setting (needed before its first matmul), cuDNN without autotuning
    and in its deterministic mode, and torch's deterministic algorithms (warning where none exists)."""
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    before = (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic,
              torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    try:
        common.use_deterministic_kernels(False)
        assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ and torch.are_deterministic_algorithms_enabled() == before[2]
        common.use_deterministic_kernels(True)
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = before[:2]
        torch.use_deterministic_algorithms(before[2], warn_only=before[3])


def test_workers_default_to_up_to_8_per_rank_with_an_image_folder(monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert common.default_workers({"num_workers": -1, "data": "/imagenet"})["num_workers"] == 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert common.default_workers({"num_workers": -1, "data": "/imagenet"})["num_workers"] == 7  # 8 cores a rank
    assert common.default_workers({"num_workers": -1, "data": ""})["num_workers"] == 0  # the built-in data
    assert common.default_workers({"num_workers": 3, "data": "/imagenet"})["num_workers"] == 3  # as given


def test_work_between_steps_is_given_up_at_a_stop_signal_and_the_model_is_left_clean():
    """A grid's decode (a network called many times) stops at the first call after a stop signal: the log
    says what was skipped, nothing propagates, and the model carries no hook afterwards."""
    class Signal:
        received = None

        def pending(self):
            return self.received is not None

    stop, logged, calls = Signal(), [], []
    net = torch.nn.Linear(2, 2)
    net.register_forward_hook(lambda m, a, out: calls.append(1))
    dist = common.Dist(False, 0, 0, 1, torch.device("cpu"), True)
    guard = checkpoints.StepGuard(stop, dist, 5, "ckpt.pt", "hint")
    with guard.given_up_at_stop("grid of step 7", logged.append, net):
        for i in range(1000):
            if i == 3:
                stop.received = "SIGTERM"
            net(torch.zeros(1, 2))
    assert len(calls) == 3 and logged == ["\ngrid of step 7 skipped: stop signal SIGTERM"]
    assert not net._forward_pre_hooks
    net(torch.zeros(1, 2))  # and it runs again
    assert len(calls) == 4
    # the DiT's guided sampling goes through the module's call (hooks see it), with and without guidance
    from dit import build_dit

    dit, logged = build_dit("DiT-Tiny/1", (4, 4), 4, 10), []
    with guard.given_up_at_stop("DiT grid", logged.append, dit):
        for scale in (1.0, 4.0):
            dit.forward_with_cfg(torch.randn(2, 4, 4, 4), torch.rand(2), torch.tensor([0, 1]), scale)
    assert logged == ["\nDiT grid skipped: stop signal SIGTERM"]


class _NoSignal:
    """StopSignals without the process-wide handlers: no signal ever arrives."""
    received = None

    def flag(self, device):
        return torch.zeros((), device=device)


def _guarded_steps(losses, check_every, max_in_a_row=5):
    """One parameter vector trained by a fused AdamW (the trainers' optimizer on CUDA) under StepGuard's device
    path, one step per loss factor (nan: a non-finite step). Returns (weights and EMA after each step, guard)."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(4))
    ema = torch.nn.Module()
    ema.w = torch.nn.Parameter(w.detach().clone(), requires_grad=False)
    net = torch.nn.Module()
    net.w = w
    opt = torch.optim.AdamW([w], lr=0.1, fused=True)
    dist = common.Dist(False, 0, 0, 1, torch.device("cpu"), True)
    guard = checkpoints.StepGuard(_NoSignal(), dist, max_in_a_row, "ckpt.pt", "hint", optimizer=opt,
                                  check_every=check_every, last_step=len(losses))
    history = []
    for step, factor in enumerate(losses):
        loss = (w ** 2).sum() * factor
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_([w], 1.0)
        if guard.update_ok(loss.detach(), grad_norm, step):
            opt.step()
            optim.update_ema(ema, net, guard.ema_decay(0.5))
        opt.zero_grad(set_to_none=True)
        history.append((w.detach().clone(), ema.w.detach().clone(), opt.state[w]["step"].clone()))
    return history, guard


def test_the_device_side_guard_skips_a_nonfinite_step_without_reading_anything_back(monkeypatch):
    """With a fused optimizer the guard decides on the device: the non-finite step leaves the weights, the
    optimizer's step count and the EMA exactly as they were, and no value is read back to the host between
    checks (counted by patching every way a tensor reaches a Python number)."""
    reads = []
    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _o=original, _n=name, **k: reads.append(_n) or _o(self, *a, **k))
    history, guard = _guarded_steps([1.0, float("nan"), 1.0], check_every=100)
    assert reads == ["tolist"]  # the one check, at the last step, and nothing else in three steps
    monkeypatch.undo()
    (w0, e0, s0), (w1, e1, s1), (w2, e2, s2) = history
    assert torch.equal(w1, w0) and torch.equal(e1, e0) and s1 == s0 == 1  # step 1 skipped on the device
    assert not torch.equal(w2, w1) and s2 == 2  # step 2 updates again
    assert guard.take_skipped() == 1 and guard.in_a_row == 0


def test_the_device_side_guard_stops_at_the_check_after_too_many_nonfinite_steps():
    nan = float("nan")
    with pytest.raises(SystemExit, match="3 steps in a row .*--max-nonfinite-steps 3"):
        _guarded_steps([1.0, nan, nan, nan, 1.0, 1.0], check_every=5, max_in_a_row=3)
    history, guard = _guarded_steps([1.0, nan, nan, 1.0, nan, nan], check_every=3, max_in_a_row=3)  # never 3 in a row
    assert guard.take_skipped() == 4 and guard.in_a_row == 2


def test_auto_settings_resolve_per_device_and_preset():
    import train_ae

    assert common.channels_last_on("auto", torch.device("cpu")) and not common.channels_last_on("auto", torch.device("cuda"))
    assert common.channels_last_on("true", torch.device("cuda")) and not common.channels_last_on(False, torch.device("cpu"))
    assert train_ae.checkpointing_on("auto", "large") and not train_ae.checkpointing_on("auto", "small")
    with pytest.raises(SystemExit, match="--channels-last takes auto, true or false, got 'maybe'"):
        common.auto_flag("maybe", "channels_last", True)


def test_a_planted_symlink_at_the_temporary_name_is_never_written_through(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    os.symlink(victim, tmp_path / "ckpt.pt.tmp")
    checkpoints.save_checkpoint(str(tmp_path / "ckpt.pt"), {"kind": "ae", "step": 1})
    assert victim.read_text() == "keep me"
    assert not os.path.islink(tmp_path / "ckpt.pt") and torch.load(tmp_path / "ckpt.pt", weights_only=True)["step"] == 1
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pt", "victim.txt"]


_CAPPED_WRITERS = r'''
import os, resource, signal, sys
import numpy as np, torch
sys.path.insert(0, sys.argv[1])
import eval as ev
from support import checkpoints, data
out = sys.argv[2]
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # past the cap a write fails with EFBIG instead of killing us
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
writers = {
    "grid.png": lambda p: data.save_image_grid(torch.rand(64, 3, 32, 32) * 2 - 1, p),
    "results.json": lambda p: ev.write_results({f"k{i}": float(i) for i in range(400)}, p),
    "stats.npz": lambda p: checkpoints.atomic_write(p, lambda fh: np.savez(fh, mu=np.zeros(5000))),
}
for name, write in writers.items():
    try:
        write(os.path.join(out, name))
        print(name, "written")
    except SystemExit as e:
        print(name, "refused:", e)
'''


def test_every_output_is_written_whole_or_not_at_all_under_a_file_size_cap(tmp_path):
    """The class 'writes that are not atomic': an image grid, eval's JSON and its table, FID statistics,
    written past a 4 KB file-size cap over good files of the same names: each is refused in one line and
    the good file is kept byte for byte, with no temporary file left."""
    good = {"grid.png": b"good grid", "results.json": b"{}", "results.txt": b"good table", "stats.npz": b"good stats"}
    for name, content in good.items():
        (tmp_path / name).write_bytes(content)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.run([sys.executable, "-c", _CAPPED_WRITERS, root, str(tmp_path)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 3 and all("refused: error: could not write" in line for line in lines), lines
    for name, content in good.items():
        assert (tmp_path / name).read_bytes() == content, name
    assert sorted(os.listdir(tmp_path)) == sorted(good)  # no .tmp left


def test_the_log_holds_one_row_per_step_after_a_fresh_start_and_after_a_resume(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (1, 2, 3, 4, 5, 6)) + '{"step": 7, "lo')
    dist = common.Dist(False, 0, 0, 1, torch.device("cpu"), True)

    class Bar:
        def set_postfix(self, d):
            pass

    log = common.StepLog(str(path), dist, Bar(), 4, first_step=4)  # resumed from the checkpoint of step 4
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3, 4]
    log.write(5, {"loss": torch.tensor(0.5)})
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3, 4, 5]
    common.StepLog(str(path), dist, Bar(), 4, first_step=0).write(1, {"loss": torch.tensor(0.5)})  # a new run: a new log
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1]


@pytest.mark.parametrize("script, args, message", [
    ("train_ae.py", ["--cond", "foo"], "--cond must be one of latent_decoder, concat, got 'foo'"),
    ("train_ae.py", ["--t-dist", "foo"], "--t-dist must be one of uniform, logit_normal, got 'foo'"),
    ("train_ae.py", ["--attn-impl", "flash"], "--attn-impl must be one of math, sdpa, got 'flash'"),
    ("train_ae.py", ["--dataset-size", "1000000000000"], "--dataset-size must be at most 100000000, got 1000000000000"),
    ("train_ae.py", ["--resolution", "65536"], "--resolution must be at most 4096, got 65536"),
    ("train_ae.py", ["--dist-timeout", "100000000000000"], "--dist-timeout must be at most 604800, got 100000000000000"),
    ("train_ae.py", ["--batch-size", "1000000000"], "--batch-size must be at most 65536, got 1000000000"),
    ("train_ae.py", ["--seed", "10000000000000"], "--seed must be at most 4294967295, got 10000000000000"),
    ("train_dit.py", ["--t-dist", "foo"], "--t-dist must be one of logit_normal, uniform, got 'foo'"),
    ("train_dit.py", ["--batch-size", "1000000000"], "--batch-size must be at most 65536, got 1000000000"),
    ("train_dit.py", ["--encode-batch-size", "1000000000"], "--encode-batch-size must be at most 65536, got 1000000000"),
    ("train_dit.py", ["--shard-size", "1000000000000"], "--shard-size must be at most 100000000, got 1000000000000"),
    ("train_dit.py", ["--num-workers", "1000000"], "--num-workers must be at most 256, got 1000000"),
    ("train_dit.py", ["--seed", "18446744073709551616"], "--seed must be at most 4294967295, got 18446744073709551616"),
    ("sample.py", ["--ckpt", "x.pt", "--num-samples", "100000000"], "--num-samples must be at most 200000, got 100000000"),
    ("sample.py", ["--ckpt", "x.pt", "--batch-size", "1000000000"], "--batch-size must be at most 65536, got 1000000000"),
    ("sample.py", ["--ckpt", "x.pt", "--per-class", "1000000000"], "--per-class must be at most 256, got 1000000000"),
    ("eval.py", ["stats", "--images", "x.npz", "--out", "s.npz", "--batch-size", "1000000000"],
     "--batch-size must be at most 65536, got 1000000000"),
    ("eval.py", ["recon", "--ckpt", "x.pt", "--num-images", "1000000000000"],
     "--num-images must be at most 100000000, got 1000000000000"),
    ("eval.py", ["recon", "--ckpt", "x.pt", "--resolution", "65536"], "--resolution must be at most 4096, got 65536"),
    ("eval.py", ["classes", "--samples", "x.npz", "--judge-steps", "1000000000000"],
     "--judge-steps must be at most 100000000, got 1000000000000"),
    ("eval.py", ["gen", "--samples", "x.npz", "--ref", "r.npz", "--num-workers", "1000000"],
     "--num-workers must be at most 256, got 1000000"),
    ("experiments/bench.py", ["--reps", "0"], "--reps must be at least 1, got 0"),
    ("experiments/bench.py", ["--attn-seq", "abc"], "--attn-seq takes comma-separated whole numbers from 1 to 16384, got 'abc'"),
    ("experiments/bench.py", ["--attn-seq", "64,1000000000"],
     "--attn-seq takes comma-separated whole numbers from 1 to 16384, got '64,1000000000'"),
    ("experiments/bench.py", ["--batch-size", "1000000000"], "--batch-size must be at most 65536, got 1000000000"),
    ("experiments/bench.py", ["--matmul-size", "1000000"], "--matmul-size must be at most 32768, got 1000000"),
    ("experiments/bench.py", ["--sample-steps", "1000000000"], "--sample-steps must be from 1 to 1000, got 1000000000"),
    ("experiments/bench.py", ["--compression", "3"], "--compression must be one of 0, 4, 8, 16, 32, 64, got 3"),
    ("experiments/bench.py", ["--compression", "64"], "--resolution 32 is not divisible by --compression 64"),
    ("experiments/bench.py", ["--parts", "data", "--data", "/no/such/folder"], "--data '/no/such/folder': no such folder"),
])
def test_a_bad_choice_or_an_absurd_size_is_refused_in_one_line_before_any_work(tmp_path, script, args, message):
    """The class 'any bad setting': a value outside its choices or past its size limit stops the script at
    once, with one line naming the flag, before a folder is made or a model built."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.run([sys.executable, os.path.join(root, script), *args], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: " + message)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("env, message", [
    ({"RANK": "0"}, "LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT not set"),
    ({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_PORT": "29500"}, "MASTER_ADDR not set"),
    ({"RANK": "a", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "x", "MASTER_PORT": "1"}, "RANK not a whole number"),
])
def test_a_half_set_distributed_environment_is_one_line(monkeypatch, env, message):
    for v in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(v, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(SystemExit, match=f"distributed launch, but {message}; start it with torchrun"):
        common.setup_distributed("cpu")


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_peer_that_never_joins_or_a_taken_port_is_one_line_after_the_timeout(tmp_path):
    """Rank 0 of 2 under torchrun's environment, and rank 1 never starts: sample.py waits --dist-timeout for it
    at the store, then says in one line who never joined and what to check, with no traceback (gloo's
    DistStoreError before). The port held by another process fails at once, also in one line; with
    DGAE_DEBUG=1 the traceback is shown."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    port = _free_port()
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port), "DGAE_DEBUG": ""}

    def run(code, **extra):
        import time

        t0 = time.monotonic()
        proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env={**env, **extra}, capture_output=True,
                              text=True, timeout=60)
        return proc, time.monotonic() - t0

    sample_main = f"import sys; sys.path.insert(0, {root!r}); sys.argv = ['sample.py', '--ckpt', 'x.pt', " \
                  "'--device', 'cpu', '--dist-timeout', '3']; import sample; sample.main()"
    proc, took = run(sample_main)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("error: rank 0 of 2: rank 1 of 2 never joined within 3 s"), line
    assert f"MASTER_ADDR:MASTER_PORT 127.0.0.1:{port}" in line and "--dist-timeout" in line
    assert took < 20 and os.listdir(tmp_path) == []  # after the timeout, and before any file was touched
    # a port another process holds: at once, in one line, and the traceback with DGAE_DEBUG=1
    import socket

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        env["MASTER_PORT"] = str(holder.getsockname()[1])
        setup = f"import sys; sys.path.insert(0, {root!r}); from support import common; common.setup_distributed('cpu', 3)"
        proc, took = run(setup)
        line = proc.stderr.strip().splitlines()[-1]
        assert proc.returncode != 0 and "Traceback" not in proc.stderr and took < 20, proc.stderr[-2000:]
        assert line.startswith(f"error: rank 0 of 2: MASTER_ADDR:MASTER_PORT 127.0.0.1:{holder.getsockname()[1]} is "
                               "in use by another process on this node"), line
        proc, _ = run(setup, DGAE_DEBUG="1")
        assert proc.returncode != 0 and "Traceback" in proc.stderr and "DistNetworkError" in proc.stderr


def test_every_script_imports_where_the_os_has_no_fcntl():
    """Windows has no fcntl: the run folder's lock imports it where it is used, so `import ae` and the
    scripts import on every OS (a course's students on Windows)."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    code = ("import builtins, sys\nreal = builtins.__import__\n"
            "def no_fcntl(name, *a, **k):\n    if name == 'fcntl': raise ImportError('no fcntl')\n    return real(name, *a, **k)\n"
            f"builtins.__import__ = no_fcntl\nsys.path.insert(0, {root!r})\n"
            "import ae, decoder_diffusion, dit, train_ae, train_dit, sample, eval\nfrom experiments import bench, claims\nprint('ok')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_dgae_debug_shows_the_traceback_a_user_error_would_hide(monkeypatch):
    with pytest.raises(SystemExit, match=r"^error: bad value \(DGAE_DEBUG=1 shows the traceback\)$"):
        with common.user_errors():
            raise ValueError("bad value")
    monkeypatch.setenv("DGAE_DEBUG", "1")
    with pytest.raises(ValueError, match="^bad value$"):  # the original error, traceback and all
        with common.user_errors():
            raise ValueError("bad value")
