"""
Plumbing shared by every script: command-line settings, devices and precision, torch.distributed
start-up and shutdown, checkpoints with every RNG state, and the lookup of pretrained weight files.
The training steps are written out in train_ae.py and train_dit.py.
"""

import datetime
import math
import os
import random
import re
import signal
import sys
import tempfile
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as torch_dist

# -----------------------------------------------------------------------------
# settings: plain variables at the top of each script, overridden from the command line


def _parse_like(value, default, name):
    """The command-line string `value` as the type of the setting's default."""
    if isinstance(default, bool):
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
        raise SystemExit(f"error: --{name} takes true or false, got {value!r}")
    try:
        return type(default)(value)
    except ValueError:
        raise SystemExit(f"error: --{name} takes a {type(default).__name__}, got {value!r}") from None

def configure(settings, argv=None):
    """Override a script's settings in place from `--name value` or `--name=value` arguments.

    `settings` is the dict of the script's top-level variables (pass `globals()`); only lower-case
    names that exist with a bool/int/float/str default can be set, parsed to the type of that default
    (`--compression 32` is an int, `--compile false` a bool); `--latent-channels` sets latent_channels.
    Returns (every setting, as a checkpoint records them; the set of names given on the command line).
    """
    keys = sorted(k for k, v in settings.items()  # not _private names, not CONSTANTS
                  if not k.startswith("_") and not k.isupper() and isinstance(v, (bool, int, float, str)))
    argv = sys.argv[1:] if argv is None else list(argv)
    given = set()
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-h", "--help"):
            print("settings (override with --name value):")
            for k in keys:
                print(f"  --{k.replace('_', '-')} {settings[k]!r}")
            sys.exit(0)
        if not arg.startswith("--"):
            raise SystemExit(f"error: unexpected argument {arg!r}; settings are given as --name value")
        name, eq, value = arg[2:].partition("=")
        if not eq:  # the value is the next argument
            if i + 1 >= len(argv):
                raise SystemExit(f"error: {arg} needs a value")
            value = argv[i + 1]
            i += 1
        i += 1
        key = name.replace("-", "_")
        if key not in keys:
            raise SystemExit(f"error: unknown setting --{name}; valid settings: " + " ".join("--" + k.replace("_", "-") for k in keys))
        settings[key] = _parse_like(value, settings[key], name)
        given.add(key)
    return {k: settings[k] for k in keys}, given


# The kinds of numeric setting check_settings knows: a test on the value, and the valid range as the
# error message states it. NaN fails every comparison, so it is refused by each kind.
SETTING_KINDS = {
    "count": (lambda v: v >= 1, "must be at least 1"),
    "count_or_0": (lambda v: v >= 0, "must be at least 0"),
    "positive": (lambda v: math.isfinite(v) and v > 0, "must be a finite number above 0"),
    "non_negative": (lambda v: math.isfinite(v) and v >= 0, "must be a finite number at least 0"),
    "fraction": (lambda v: 0 <= v < 1, "must be in [0, 1)"),
    "finite": (lambda v: math.isfinite(v), "must be a finite number"),
}


def check_settings(settings, **kinds):
    """Refuse a numeric setting out of its range, before any work, with one line naming the flag.

    `kinds` maps a kind of SETTING_KINDS to the names of the settings of that kind, e.g.
    check_settings(settings, count=("max_steps", "grad_accum"), fraction=("ema_decay",)). A step
    count of 0 or a NaN guidance scale would otherwise run, and write noise or nothing with exit 0.
    """
    for kind, names in kinds.items():
        ok, valid = SETTING_KINDS[kind]
        for name in names:
            if not ok(settings[name]):
                raise SystemExit(f"error: --{name.replace('_', '-')} {valid}, got {settings[name]}")


def writable_dir(path, flag):
    """Create the folder `path` if needed and prove that a file can be written in it, so that a run
    or a sampler is refused at start-up rather than after hours of work with nowhere to save it."""
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write_test_"):
            pass
    except OSError as e:
        raise SystemExit(f"error: {flag} {path}: cannot write there ({e.strerror or e}); "
                         "choose a folder you can write to") from None


@contextmanager
def user_errors():
    """Report the errors of bad input (a missing folder or file, an impossible flag, a checkpoint
    of the wrong kind) as one line saying what is wrong, instead of a traceback."""
    try:
        yield
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None


# -----------------------------------------------------------------------------
# devices, distributed training and precision


@dataclass
class Dist:
    ddp: bool  # launched by torchrun with more than one process (or explicitly as a process group)
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    master: bool  # rank 0: the only process that writes files and prints


def default_device():
    has_mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    return "cuda" if torch.cuda.is_available() else "mps" if has_mps else "cpu"


def setup_distributed(device="", timeout=600):
    """Start torch.distributed when torchrun set RANK / LOCAL_RANK / WORLD_SIZE, else run as a
    single process: the same script runs on a laptop, one GPU or many nodes (NCCL on GPUs, gloo on CPU).

    `timeout`: seconds a rank waits in a collective (all-reduce, barrier) for the others. Without it
    one stopped or hung rank leaves every other waiting for ever; with it the job ends (gloo raises,
    see collective_timeouts; NCCL's watchdog ends the process with a "[Rank k] ... timeout" message)."""
    device = device or default_device()
    timeout = datetime.timedelta(seconds=timeout)
    if "RANK" not in os.environ:
        return Dist(False, 0, 0, 1, torch.device(device), True)
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ["LOCAL_RANK"])
    world = int(os.environ["WORLD_SIZE"])
    if device.startswith("cuda"):
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
        torch_dist.init_process_group("nccl", device_id=dev, timeout=timeout)
    else:
        dev = torch.device(device)
        torch_dist.init_process_group("gloo", timeout=timeout)
    return Dist(True, rank, local_rank, world, dev, rank == 0)


@contextmanager
def collective_timeouts():
    """Report a collective that failed because of another rank as one line naming this rank, instead
    of gloo's traceback: one that timed out (a rank stopped responding: see setup_distributed's
    timeout), or one whose peer ended (it stopped on an error or a signal, with a message of its own)."""
    try:
        yield
    except RuntimeError as e:
        message = str(e)
        from_backend = isinstance(e, torch_dist.DistBackendError) or "gloo" in message
        timed_out = "timed out" in message.lower()
        if "RANK" not in os.environ or not from_backend or not (timed_out or "closed by peer" in message):
            raise
        detail = re.sub(r"^\[[^\]]*\] ", "", message.splitlines()[0])[:200]  # without gloo's source path
        why = ("timed out ({}): another rank stopped responding (stopped, hung or on a lost host). The job ends; resume "
               "it with --resume true. --dist-timeout sets the limit." if timed_out else
               "failed ({}): another rank ended; its own message says why. The job ends.")
        raise SystemExit(f"error: rank {os.environ['RANK']} of {os.environ['WORLD_SIZE']}: a collective operation "
                         + why.format(detail)) from None


def barrier(dist):
    """Wait until every rank gets here (e.g. until rank 0 has written a file the others read)."""
    if dist.ddp:
        torch_dist.barrier()


def all_reduce_sum(t, dist):
    """Sum a tensor over ranks, in place; every rank gets the total."""
    if dist.ddp:
        torch_dist.all_reduce(t, op=torch_dist.ReduceOp.SUM)
    return t


def shutdown(dist, status=0):
    """End the process with exit status `status` (0: done; EXIT_STOPPED: stopped by a signal, saved),
    so that a DDP worker cannot crash on the way out.

    With gloo on CPU, a worker that simply returns intermittently aborts in the interpreter's
    teardown ("terminate called without an active exception"). So every rank waits for the others,
    destroys the process group, flushes its output and leaves with os._exit, skipping that
    teardown. Everything worth keeping was written before.
    """
    if not dist.ddp:
        if status:
            raise SystemExit(status)
        return
    torch_dist.barrier()
    torch_dist.destroy_process_group()
    exit_now(dist, status)


def exit_now(dist, status):
    """Leave at once with `status`: as a DDP worker with os._exit (see shutdown), else with SystemExit."""
    if not dist.ddp:
        raise SystemExit(status)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


# -----------------------------------------------------------------------------
# preemption: a stop signal ends the run at the next step boundary, with a checkpoint

# sysexits.h's EX_TEMPFAIL, "try again later": the run was stopped by a signal after writing its
# checkpoint (or, while encoding latents, its finished shards); run the same command with
# --resume true (the cache build needs no flag) to continue where it stopped
EXIT_STOPPED = 75
# SIGTERM: what schedulers (SLURM, Kubernetes) send before they kill a job, and what torchrun passes
# on to its workers when it is sent SIGTERM or SIGINT; SIGUSR1: SLURM's --signal=USR1@seconds
# warning; SIGINT: Ctrl-C
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class StopSignals:
    """From construction on, a stop signal no longer ends the process where it stands (losing up
    to ckpt_every steps): the handler only records it, and the loops ask `flag()` at each step
    boundary, agree over all ranks (one all-reduce, so a signal to one rank stops them all at the
    same step), save and exit with EXIT_STOPPED. A repeated signal changes nothing: Ctrl-C on a
    torchrun job reaches each worker twice, from the terminal and from torchrun. To quit without
    saving, use Ctrl-\\ (SIGQUIT) or SIGKILL."""

    def __init__(self):
        self.received = None  # the name of the first stop signal this process received
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        # only record it: printing here could re-enter a write to stderr that the signal interrupted
        self.received = self.received or signal.Signals(signum).name

    def flag(self, device):
        """1.0 if this process received a stop signal, as a tensor to all-reduce with the step's other flags."""
        return torch.tensor(float(self.received is not None), device=device)


def stopped_message(stop, step, ckpt_path):
    by = stop.received or "a stop signal to another rank"
    return (f"stopped by {by} after step {step}: saved {ckpt_path}. Run the same command with --resume true "
            f"to continue (exit status {EXIT_STOPPED})")


def ignore_stop_signals(worker_id=None):
    """DataLoader worker_init_fn: a loading process ignores the stop signals (Ctrl-C and SLURM send
    them to every process), so that the trainer can finish its step with them. A worker still
    ends with its trainer: at the loader's shutdown, or by its watchdog when the trainer is gone."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def count_params(model):
    return sum(p.numel() for p in model.parameters())


def autocast_context(device):
    """bf16 autocast and TF32 matmuls on CUDA; plain fp32 elsewhere (CPU bf16 is slow and lossy).
    bf16 has fp32's exponent range, so unlike fp16 it needs no gradient scaler."""
    if device.type != "cuda":
        return nullcontext()
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    return torch.autocast("cuda", dtype=torch.bfloat16)


# -----------------------------------------------------------------------------
# checkpoints


def atomic_write(path, write):
    """Write a file atomically: write(fh) fills `path`.tmp, which then replaces `path` in one step.

    A crash mid-write leaves the previous file intact, never half a file. A write that fails (disk
    full, read-only folder) also keeps the previous file, removes its .tmp (a 20 MB leftover per
    try otherwise) and stops with one line naming the file.
    """
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as fh:
            write(fh)
        os.replace(tmp, path)
    except BaseException as e:  # an interrupt too: no .tmp is left behind
        try:
            os.remove(tmp)
        except OSError:
            pass
        if isinstance(e, OSError):
            kept = "the previous file is kept" if os.path.exists(path) else "nothing was written"
            raise SystemExit(f"error: could not write {path} ({e.strerror or e}); {kept}. "
                             "Free some space or choose a folder you can write to.") from None
        raise


def save_checkpoint(path, ckpt):
    """Write atomically (see atomic_write): never half a checkpoint, and a failed write keeps the old one."""
    atomic_write(path, lambda fh: torch.save(ckpt, fh))


MADE_BY = {"ae": "train_ae.py", "dit": "train_dit.py"}
# what the code that reads each kind of checkpoint looks up in it (a training run needs more: TRAINING_KEYS)
REQUIRED_KEYS = {"ae": ("model_args", "ema"),
                 "dit": ("step", "model_args", "ema", "ae_ckpt", "ae_step", "ae_fingerprint", "latent_shape",
                         "latent_mean", "latent_std", "num_classes", "class_names")}
TRAINING_KEYS = ("step", "model", "ema", "optimizer", "loader", "rng")


def load_checkpoint(path, kind):
    """Load a checkpoint dict onto the CPU, refusing a file of the wrong kind: "ae" (train_ae.py) or
    "dit" (train_dit.py), or one that lacks what the kind needs. weights_only=True: loading a
    checkpoint never runs code from it. Every refusal is one line naming the file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if os.path.getsize(path) == 0:  # e.g. a copy or a write interrupted by a full disk
        raise ValueError(f"checkpoint {path} is empty (0 bytes); copy it again or use another checkpoint")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file
        # torch's message for a file it cannot unpickle safely suggests weights_only=False, which
        # would run whatever code the file holds; only the kind of error is passed on
        raise ValueError(f"could not read checkpoint {path} ({type(e).__name__}): it is damaged, truncated or "
                         "not a PyTorch checkpoint; copy it again or use another checkpoint") from None
    if not isinstance(ckpt, dict) or "kind" not in ckpt:
        raise ValueError(f"{path} is not a DGAE checkpoint (no 'kind' field)")
    if ckpt["kind"] != kind:
        raise ValueError(
            f"{path} is a '{ckpt['kind']}' checkpoint (written by {MADE_BY.get(ckpt['kind'], '?')}), "
            f"but a '{kind}' checkpoint (written by {MADE_BY.get(kind, '?')}) is needed here"
        )
    missing = [k for k in REQUIRED_KEYS.get(kind, ()) if k not in ckpt]
    if missing:
        raise ValueError(f"{path} has no {', '.join(repr(k) for k in missing)}: it is not a complete '{kind}' "
                         f"checkpoint (edited, or not written by {MADE_BY[kind]}); use one that {MADE_BY[kind]} wrote")
    for key in ("model", "ema"):  # drop the prefixes torch.compile (_orig_mod.) and DDP (module.) add
        if key in ckpt:
            ckpt[key] = {re.sub(r"^((_orig_mod|module)\.)+", "", k): v for k, v in ckpt[key].items()}
    return ckpt


def resume_or_refuse(ckpt_path, resume, kind):
    """--resume: the run's checkpoint. Otherwise None, and an existing checkpoint is an error, so a
    finished or running job is never overwritten by accident."""
    if resume:
        ckpt = load_checkpoint(ckpt_path, kind)
        missing = [k for k in TRAINING_KEYS if k not in ckpt]
        if missing:
            raise ValueError(f"{ckpt_path} has no {', '.join(repr(k) for k in missing)}, so its run cannot be "
                             "resumed; start a new run in another --out-dir")
        return ckpt
    if os.path.exists(ckpt_path):
        raise SystemExit(f"error: {ckpt_path} exists. Pass --resume true to continue that run, "
                         "or choose another --out-dir.")
    return None


def rng_state():
    """Every random generator a training step touches, so --resume continues bit-identically."""
    # numpy's state holds an ndarray, which weights_only loading refuses; store it as a tensor
    _, key, *rest = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": {"key": torch.from_numpy(key.astype(np.int64)), "rest": rest}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(("MT19937", state["numpy"]["key"].numpy(), *state["numpy"]["rest"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_training(path, dist, kind, step, net, ema, optimizer, loader, **extra):
    """Checkpoint a training run: weights, EMA, optimizer, data position and every rank's RNG state
    (each rank draws its own noise), plus `extra` (model args, settings, ...). Call it on every
    rank, since the RNG states are gathered; rank 0 alone writes."""
    rngs = [rng_state()]
    if dist.ddp:
        rngs = [None] * dist.world_size  # indexed by rank
        torch_dist.all_gather_object(rngs, rng_state())
    if dist.master:
        save_checkpoint(path, dict(kind=kind, step=step, model=net.state_dict(), ema=ema.state_dict(),
                                   optimizer=optimizer.state_dict(), loader=loader.state_dict(), rng=rngs, **extra))


def load_weights(module, state_dict, path, assign=False):
    """module.load_state_dict(state_dict), where weights that do not fit the model (shapes edited,
    tensors missing or extra) are one line naming the file, not torch's list of every mismatch.
    assign=True: take the tensors themselves (to check a model built on the meta device)."""
    try:
        module.load_state_dict(state_dict, assign=assign)
    except RuntimeError as e:
        details = [line.strip().rstrip(".") for line in str(e).splitlines()[1:] if line.strip()]
        first = (details[0] if details else str(e))[:200]
        raise ValueError(f"{path}: its weights do not fit the model its model_args describe ({first}); "
                         "the file was edited or damaged, use a checkpoint as the training script wrote it") from None


def restore_training(ckpt, dist, net, ema, optimizer, loader, path):
    """The inverse of save_training, for --resume (`path`: the checkpoint's, for the messages);
    returns the step to continue from."""
    load_weights(net, ckpt["model"], path)
    load_weights(ema, ckpt["ema"], path)
    try:
        optimizer.load_state_dict(ckpt["optimizer"])
    except ValueError as e:  # a parameter group of another size: weights of another model
        raise ValueError(f"{path}: its optimizer state does not fit the model ({e})") from None
    loader.load_state_dict(ckpt["loader"])
    set_rng_state(ckpt["rng"][dist.rank])
    return ckpt["step"]


# -----------------------------------------------------------------------------
# pretrained weight files (VGG16 + LPIPS heads, InceptionV3)


def find_weights(path, filename, url, flag, env_var, required=True):
    """Resolve a pretrained weight file: `path` if given, else $env_var, else $DGAE_WEIGHTS/filename.

    $DGAE_WEIGHTS defaults to ./weights. Nothing is ever downloaded: if the file is missing and
    required, the error says which file, where it is published and how to point us at it.
    """
    candidate = path or os.environ.get(env_var) or os.path.join(os.environ.get("DGAE_WEIGHTS", "weights"), filename)
    if os.path.isfile(candidate):
        return candidate
    if not required and not path:  # a path the user typed must exist, even for an optional file
        return None
    raise FileNotFoundError(
        f"pretrained weight file {filename} not found (looked at {candidate}). Download it once from {url} "
        f"and pass its path with {flag} PATH, or set {env_var}=PATH, or put it in $DGAE_WEIGHTS (default ./weights/)."
    )
