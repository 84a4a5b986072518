"""The folder and the machine a training run is given: one run at a time in an --out-dir (two real
processes), an --out-dir inside the data, a full disk (a real file-size limit), a --device that
this machine lacks. Each ends the run in one line, before any work where it can be known before."""

import fcntl
import os
import resource
import signal
import subprocess
import sys

import pytest

import train_ae
import train_dit
from support import common, data
from test_latents import save_tiny_ae
from test_stop_signals import finish, start, wait_for
from test_train_ae import FAST, _env, _image_folder, load, run_train
from test_train_dit import DIT_FAST

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ARGS = [*FAST, "--lpips-weight", "0"]


def in_use(folder):
    return (f"error: --out-dir {folder} is in use by another run that is still alive (it holds {folder}/.lock); wait "
            "for it to end or stop it, or choose another --out-dir")


def test_a_second_run_into_a_folder_in_use_is_refused_and_the_lock_ends_with_the_first(tmp_path):
    # two runs into one folder would both train, write the same ckpt.pt.tmp and interleave their
    # log.jsonl rows, and so would a resume started while the run is alive: the second is refused
    first = start(tmp_path, "train_ae.py", *ARGS, "--max-steps", "100000", "--ckpt-every", "1", "--num-workers", "1")
    try:
        wait_for(first, tmp_path / "out/ae/ckpt.pt", tmp_path)
        for again in ([], ["--resume", "true"]):
            proc = run_train(tmp_path, *ARGS, "--max-steps", "3", *again, check=False)
            assert proc.returncode == 1 and proc.stderr.strip() == in_use("out/ae"), proc.stderr
            assert "model:" not in proc.stdout
        # SIGKILL to the trainer alone, which no process can handle: the kernel releases the lock
        # with it, at once, though its data-loading worker lives on for seconds
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
        with open(tmp_path / "out/ae/.lock") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises BlockingIOError if anything holds it
    finally:
        try:
            os.killpg(first.pid, signal.SIGKILL)  # the worker too
        except ProcessLookupError:
            pass
        finish(first, tmp_path)
    step = load(tmp_path / "out/ae/ckpt.pt")["step"]
    run_train(tmp_path, "--resume", "true", "--max-steps", str(step + 1))
    assert load(tmp_path / "out/ae/ckpt.pt")["step"] == step + 1


def run_in_process(monkeypatch, module, *args):
    monkeypatch.setattr(sys, "argv", [f"{module.__name__}.py", *args])
    module.main()


def test_an_out_dir_inside_the_data_is_refused_and_a_changed_data_folder_is_said_on_resume(tmp_path, monkeypatch,
                                                                                           capsys):
    # the run's reconstruction grids must not become training images (16 images, then 18 after a resume)
    _image_folder(tmp_path / "imgs")
    monkeypatch.chdir(tmp_path)
    recipe = ["--data", "imgs", "--preset", "tiny", "--resolution", "32", *ARGS]
    for out_dir in ("imgs", "imgs/train/runs"):
        with pytest.raises(SystemExit) as e:
            run_in_process(monkeypatch, train_ae, *recipe, "--out-dir", out_dir, "--max-steps", "1")
        assert str(e.value) == (f"error: --out-dir {out_dir} is inside --data imgs, so the run's image grids would "
                                "become training images; choose an --out-dir outside the data folder")
    assert not (tmp_path / "imgs/train/runs").exists()
    # the folder's image count is recorded; a resume on a folder that has changed says so in one line
    run_in_process(monkeypatch, train_ae, *recipe, "--out-dir", "run", "--max-steps", "1")
    assert load(tmp_path / "run/ckpt.pt")["config"]["num_images"] == 10
    (tmp_path / "imgs/train/cat/9.png").write_bytes((tmp_path / "imgs/train/cat/0.png").read_bytes())
    capsys.readouterr()
    run_in_process(monkeypatch, train_ae, "--out-dir", "run", "--resume", "true", "--max-steps", "2")
    assert ("warning: the data now holds 11 images, the run had 10 when it was checkpointed: the images it sees from "
            "here on follow another order than the interrupted run's") in capsys.readouterr().out.splitlines()


def capped(limit):
    """preexec_fn: files of this process may not grow beyond `limit` bytes, as on a full disk. SIGXFSZ
    ignored, so that a write past the limit fails with EFBIG instead of killing the process."""
    def set_limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return set_limit


def test_a_full_disk_during_a_checkpoint_or_a_latent_shard_write_is_one_line(tmp_path):
    # torch's zip writer re-raises the OSError as a RuntimeError ("unexpected pos"): a 31-line traceback
    save_tiny_ae(tmp_path / "ae.pt")
    env = dict(_env(tmp_path), PYTHONDONTWRITEBYTECODE="1")
    for script, args, limit, path in [
        ("train_ae.py", [*ARGS, "--max-steps", "1"], 1_000_000, "out/ae/ckpt.pt"),  # the checkpoint: 37 MB
        ("train_dit.py", [*DIT_FAST, "--max-steps", "1"], 2500, "cache/shard_00000.pt"),  # a shard: 3.4 KB
    ]:
        proc = subprocess.run([sys.executable, os.path.join(ROOT, script), *args], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300, preexec_fn=capped(limit))
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        assert proc.stderr.replace("\r", "\n").splitlines()[-1] == (
            f"error: could not write {path} (File too large); nothing was written. Free some space or choose a folder "
            "you can write to.")
        assert not os.path.exists(tmp_path / path) and not os.path.exists(tmp_path / (path + ".tmp"))


@pytest.mark.parametrize("module", [train_ae, train_dit])
def test_an_unavailable_device_is_refused_before_the_out_dir_or_the_data_is_touched(tmp_path, monkeypatch, module):
    # --device cuda on a CPU machine is one line up front: no traceback after the dataset scan, no empty --out-dir
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(data, "ProceduralDataset", lambda *a, **k: pytest.fail("built the dataset"))
    has = common.available_devices()
    for name in ["foo", "cuda:99"] + [d for d in ("cuda", "mps") if d not in has]:
        with pytest.raises(SystemExit) as e:
            run_in_process(monkeypatch, module, "--device", name, "--out-dir", "run")
        assert str(e.value) == (f"error: --device {name} is not available on this machine, which has: {', '.join(has)}; "
                                "pass one of those, or leave --device out to pick one")
        assert os.listdir(tmp_path) == []


def test_a_lock_path_that_is_a_folder_is_one_line(tmp_path):
    (tmp_path / "run" / ".lock").mkdir(parents=True)
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "train_ae.py"), "--out-dir", "run", "--max-steps", "1"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: --out-dir run: cannot open its lock file")
