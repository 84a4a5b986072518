"""Preemption: SIGTERM, SIGUSR1 or SIGINT (Ctrl-C) to a training process, to one torchrun worker or to
the torchrun launcher. Every rank finishes its step, rank 0 saves, the process exits with
checkpoints.EXIT_STOPPED, and --resume continues bit-identically. Each test sends the real signal to a
real subprocess run of the script."""

import os
import signal
import subprocess
import sys
import time

import pytest

from support import checkpoints
from test_train_ae import FAST, _env, _workers, assert_same_tensors, load, run_train
from test_latents import save_tiny_ae
from test_train_dit import DIT_FAST

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STOPPED = checkpoints.EXIT_STOPPED
MAX_STEPS = 8
AE_ARGS = [*FAST, "--lpips-weight", "0", "--max-steps", str(MAX_STEPS)]


def start(tmp_path, script, *args, torchrun=False):
    """Popen the script (its own process group, as a terminal job is); output goes to files."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2"] if torchrun else [sys.executable]
    with open(tmp_path / "stdout", "w") as out, open(tmp_path / "stderr", "w") as err:
        return subprocess.Popen(cmd + [os.path.join(ROOT, script), *args], cwd=tmp_path, env=_env(tmp_path),
                                stdout=out, stderr=err, start_new_session=True)


def wait_for(proc, path, tmp_path, timeout=240):
    """Block until `path` exists (the run got that far), failing if the process ended first."""
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None and time.time() < deadline, (tmp_path / "stderr").read_text()[-3000:]
        time.sleep(0.05)


def finish(proc, tmp_path, timeout=240):
    """The process's exit status and its stdout + stderr (killed, and the test failed, if it hangs)."""
    try:
        code = proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return code, (tmp_path / "stdout").read_text() + (tmp_path / "stderr").read_text()


def assert_stopped_and_saved(code, out, ckpt_path, max_steps, ranks=1):
    """The run stopped with EXIT_STOPPED (under torchrun: torchrun failed, reporting it) after a step
    short of the end, said so in one line, and left a complete checkpoint of that step."""
    ckpt = load(ckpt_path)
    if ranks == 1:
        assert code == STOPPED and "Traceback" not in out, out[-3000:]
    else:  # torchrun exits 1 and prints its own report (or, itself signalled, its SignalException)
        assert code == 1, out[-3000:]
    assert 0 < ckpt["step"] < max_steps and len(ckpt["rng"]) == ranks
    assert f"after step {ckpt['step']}: saved" in out and "--resume true" in out
    assert not os.path.exists(str(ckpt_path) + ".tmp")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The run that no signal interrupts, which every resumed run must equal bit for bit."""
    tmp_path = tmp_path_factory.mktemp("ae_full")
    run_train(tmp_path, *AE_ARGS)
    return load(tmp_path / "out/ae/ckpt.pt")


def assert_resumes_to(tmp_path, full, *args, torchrun=False):
    run_train(tmp_path, *args, "--resume", "true", torchrun=torchrun)
    resumed = load(tmp_path / "out/ae/ckpt.pt")
    assert resumed["step"] == full["step"]
    for key in ("model", "ema", "optimizer", "loader"):
        assert_same_tensors(full[key], resumed[key], key)


@pytest.mark.slow  # whole-script runs: 15 to 22 s
def test_sigterm_saves_the_step_and_resume_is_bit_identical(tmp_path, uninterrupted):
    # (SIGUSR1 takes the same path: see the torchrun test)
    proc = start(tmp_path, "train_ae.py", *AE_ARGS)
    wait_for(proc, tmp_path / "out/ae/log.jsonl", tmp_path)  # step 1 is done: the loop is running
    os.kill(proc.pid, signal.SIGTERM)
    code, out = finish(proc, tmp_path)
    assert_stopped_and_saved(code, out, tmp_path / "out/ae/ckpt.pt", MAX_STEPS)
    assert "stopped by SIGTERM" in out
    assert_resumes_to(tmp_path, uninterrupted, *AE_ARGS)


@pytest.mark.slow  # whole-script runs: 15 to 22 s
def test_ctrl_c_to_the_process_group_spares_the_loader_workers(tmp_path, uninterrupted):
    # Ctrl-C in a terminal sends SIGINT to every process of the job: the trainer and its data-loading
    # workers. The workers ignore it, so the trainer can finish its step with them and save.
    args = [*AE_ARGS, "--num-workers", "1"]
    proc = start(tmp_path, "train_ae.py", *args)
    wait_for(proc, tmp_path / "out/ae/log.jsonl", tmp_path)
    os.killpg(proc.pid, signal.SIGINT)
    code, out = finish(proc, tmp_path)
    assert_stopped_and_saved(code, out, tmp_path / "out/ae/ckpt.pt", MAX_STEPS)
    assert "stopped by SIGINT" in out
    assert_resumes_to(tmp_path, uninterrupted, *args)


def test_sigterm_while_the_end_of_run_grid_decodes_ends_the_run_at_once_with_its_checkpoint(tmp_path):
    # a long end-of-run decode must not outlast a scheduler's grace period after SIGTERM: the last step
    # is saved before its grid is decoded, and the decode gives up at the signal. 1000 Euler steps (the
    # most allowed) take over a minute for this grid of 8 images on one CPU thread, far past the 15 s allowed.
    proc = start(tmp_path, "train_ae.py", *FAST[:-2], "--lpips-weight", "0", "--max-steps", "1", "--decode-steps", "1000")
    wait_for(proc, tmp_path / "out/ae/ckpt.pt", tmp_path)  # saved: the grid is being decoded
    time.sleep(0.5)
    os.kill(proc.pid, signal.SIGTERM)
    signalled = time.time()
    code, out = finish(proc, tmp_path)
    assert time.time() - signalled < 15 and code == 0, out[-3000:]
    assert "reconstruction grid of step 1 skipped: stop signal SIGTERM" in out and "done: out/ae/ckpt.pt" in out
    assert load(tmp_path / "out/ae/ckpt.pt")["step"] == 1 and not (tmp_path / "out/ae/recon_000001.png").exists()


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds the worker processes in /proc")
def test_under_torchrun_a_signal_to_one_worker_or_to_the_launcher_stops_every_rank_at_the_same_step(tmp_path):
    # SIGUSR1 to rank 1 alone: the step's all-reduce tells rank 0, and both save one checkpoint (with
    # both ranks' RNG states) and exit EXIT_STOPPED. SIGTERM to torchrun: it passes SIGTERM on to its
    # workers and waits for them. Ctrl-C: SIGINT reaches every process of the job, and each worker
    # twice (from the terminal, then from torchrun). The first then resumes to the uninterrupted run,
    # bit for bit; the others save through the same code.
    full_dir = tmp_path / "full"
    full_dir.mkdir()
    run_train(full_dir, *AE_ARGS, torchrun=True)
    full = load(full_dir / "out/ae/ckpt.pt")
    for case in ("usr1_to_rank_1", "term_to_launcher", "ctrl_c"):
        case_dir = tmp_path / case
        case_dir.mkdir()
        launcher = start(case_dir, "train_ae.py", *AE_ARGS, torchrun=True)
        wait_for(launcher, case_dir / "out/ae/log.jsonl", case_dir)
        if case == "usr1_to_rank_1":
            workers = _workers(launcher.pid)
            assert sorted(workers) == [0, 1]
            os.kill(workers[1], signal.SIGUSR1)
        elif case == "term_to_launcher":
            os.kill(launcher.pid, signal.SIGTERM)
        else:
            os.killpg(launcher.pid, signal.SIGINT)
        code, out = finish(launcher, case_dir)
        assert_stopped_and_saved(code, out, case_dir / "out/ae/ckpt.pt", MAX_STEPS, ranks=2)
        by = {"usr1_to_rank_1": "a stop signal to another rank", "term_to_launcher": "SIGTERM", "ctrl_c": "SIGINT"}
        assert f"stopped by {by[case]}" in out
        if case == "usr1_to_rank_1":  # torchrun's report names both workers' status ...
            assert out.count(f"exitcode  : {STOPPED}") == 2, out[-3000:]
            assert_resumes_to(case_dir, full, *AE_ARGS, torchrun=True)  # ... and the run resumes exactly


@pytest.mark.slow  # whole-script runs: 15 to 22 s
def test_train_dit_a_signal_saves_the_step_and_resume_is_bit_identical(tmp_path):
    save_tiny_ae(tmp_path / "ae.pt")
    args = [*DIT_FAST, "--max-steps", str(MAX_STEPS)]
    run_train_dit = lambda d, *a: subprocess.run([sys.executable, os.path.join(ROOT, "train_dit.py"), *args, *a],
                                                 cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True,
                                                 timeout=300, check=True)
    run_train_dit("full", "--out-dir", "full")
    proc = start(tmp_path, "train_dit.py", *args, "--out-dir", "split")
    wait_for(proc, tmp_path / "split/log.jsonl", tmp_path)
    os.kill(proc.pid, signal.SIGTERM)
    code, out = finish(proc, tmp_path)
    assert_stopped_and_saved(code, out, tmp_path / "split/ckpt.pt", MAX_STEPS)
    run_train_dit("split", "--out-dir", "split", "--resume", "true")
    full, split = load(tmp_path / "full/ckpt.pt"), load(tmp_path / "split/ckpt.pt")
    assert full["step"] == split["step"] == MAX_STEPS
    for key in ("model", "ema", "optimizer", "loader"):
        assert_same_tensors(full[key], split[key], key)


@pytest.mark.slow  # two stage-2 runs
def test_train_dit_a_signal_while_encoding_keeps_the_finished_shards_and_the_next_run_completes_them(tmp_path):
    # 40 shards of 200 images: the signal comes when the first is written, long before the last
    save_tiny_ae(tmp_path / "ae.pt")
    args = [*DIT_FAST, "--dataset-size", "8000", "--shard-size", "200", "--max-steps", "1"]
    proc = start(tmp_path, "train_dit.py", *args, "--cache-dir", "cache")
    cache = tmp_path / "cache"
    wait_for(proc, cache / "shard_00000.pt", tmp_path)
    os.kill(proc.pid, signal.SIGTERM)
    code, out = finish(proc, tmp_path)
    done = sorted(p.name for p in cache.glob("shard_*.pt"))
    assert code == STOPPED and "Traceback" not in out, out[-3000:]
    assert f"stopped by SIGTERM while encoding latents: {len(done)} of 40 shards are complete" in out
    assert 0 < len(done) < 40 and done == [f"shard_{k:05d}.pt" for k in range(len(done))]  # in order, no gaps
    assert not (cache / "stats.pt").exists() and not list(cache.glob("*.tmp")) and not (tmp_path / "out/dit/ckpt.pt").exists()
    # the same command encodes the rest; the cache equals one built without a stop, bit for bit
    for folder in ("cache", "uninterrupted"):
        subprocess.run([sys.executable, os.path.join(ROOT, "train_dit.py"), *args, "--cache-dir", folder,
                        "--out-dir", f"out_{folder}"], cwd=tmp_path, env=_env(tmp_path), capture_output=True,
                       timeout=300, check=True)
    for k in range(40):
        assert_same_tensors(load(tmp_path / "uninterrupted" / f"shard_{k:05d}.pt"), load(cache / f"shard_{k:05d}.pt"))
    assert_same_tensors(load(tmp_path / "uninterrupted/stats.pt"), load(cache / "stats.pt"))


@pytest.mark.slow  # several killed runs
def test_sigkill_at_any_point_leaves_a_loadable_checkpoint_and_resume_stays_bit_identical(tmp_path, uninterrupted):
    # SIGKILL cannot be handled: what protects the run is the atomic checkpoint write. With a
    # checkpoint every step, kills alternate between a moment inside a step and the moment a
    # checkpoint's .tmp file appears (a write under way). After each one ckpt.pt is a whole file,
    # and the run resumed after all of them ends bit-identical to the run never stopped (how often
    # it saved changes nothing).
    args = [*AE_ARGS, "--ckpt-every", "1"]
    ckpt, tmp = tmp_path / "out/ae/ckpt.pt", tmp_path / "out/ae/ckpt.pt.tmp"
    steps, in_a_write = [], []
    for cycle in range(4):
        proc = start(tmp_path, "train_ae.py", *args, *(["--resume", "true"] if ckpt.exists() else []))
        wait_for(proc, tmp_path / "out/ae/log.jsonl", tmp_path)  # a step done (the log comes before the save)
        (tmp_path / "out/ae/log.jsonl").unlink()  # so that the next run's first step is waited for too
        if cycle % 2 == 0:  # inside a step, once a checkpoint exists
            wait_for(proc, ckpt, tmp_path)
            time.sleep(0.05)
        else:  # inside a write: no sleep between seeing the .tmp and the kill
            deadline = time.time() + 60
            while not tmp.exists():
                assert proc.poll() is None and time.time() < deadline, (tmp_path / "stderr").read_text()[-3000:]
        os.killpg(proc.pid, signal.SIGKILL)
        finish(proc, tmp_path)
        steps.append(load(ckpt)["step"])  # loads: never half a file
        in_a_write.append(tmp.exists())  # the write was cut short: its .tmp is left (and never read)
    assert steps == sorted(steps) and steps[-1] < MAX_STEPS, steps
    assert any(in_a_write[1::2]), in_a_write  # at least one kill did land inside a write
    assert_resumes_to(tmp_path, uninterrupted, *args)
