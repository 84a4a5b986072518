"""
How a run is saved, stopped and resumed: atomic writes, the run folder's OS lock, checkpoints with
every rank's RNG state, the one resume rule (MAY_CHANGE_ON_RESUME), stop signals that end a run at
a step boundary, and pretrained weight files. A reader of the method can skip this file.
"""

import dataclasses
import hashlib
import inspect
import os
import random
import re
import signal
from contextlib import contextmanager, suppress

import numpy as np
import torch
import torch.distributed as torch_dist

from ae import TRAINER_SETTINGS, AEConfig, DGAE
from support import common

# -----------------------------------------------------------------------------
# files: atomic writes and the run folder's lock


def atomic_write(path, write):
    """write(fh) fills a fresh .tmp that then replaces the file in one step: a crash or a failed
    write keeps the previous file and leaves no .tmp. A symbolic link's target is replaced."""
    target = os.path.realpath(path)  # a rename onto the link would replace the link itself
    os.makedirs(os.path.dirname(target), exist_ok=True)
    tmp = target + ".tmp"
    try:
        with suppress(FileNotFoundError):
            os.unlink(tmp)  # a killed write's .tmp or a planted link, never written through
        # O_EXCL: a new file, or an error rather than following a link
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
        with os.fdopen(os.open(tmp, flags, 0o666), "wb") as fh:
            write(fh)
        os.replace(tmp, target)
    except BaseException as e:  # an interrupt too: no .tmp is left behind
        with suppress(OSError):
            os.remove(tmp)
        # torch.save turns an OSError (a full disk) into a RuntimeError, the OSError its context
        cause = e if isinstance(e, Exception) else None
        while cause is not None and not isinstance(cause, OSError):
            cause = cause.__context__
        if cause is not None:
            kept = "the previous file is kept" if os.path.exists(target) else "nothing was written"
            raise SystemExit(f"error: could not write {path} ({cause.strerror or cause}); {kept}. "
                             "Free some space or choose a folder you can write to.") from None
        raise


def write_text(path, text):
    atomic_write(path, lambda fh: fh.write(text.encode()))


def save_checkpoint(path, ckpt):
    atomic_write(path, lambda fh: torch.save(ckpt, fh))


LOCK_FILE = ".lock"  # in the run folder (claim_out_dir)
_held = {}  # run folder (real path) -> its open lock file, held until this process ends


def _lock_exclusive(fh):
    """An exclusive, non-blocking OS lock on the open file fh, or OSError."""
    try:
        import fcntl  # here, not at the top: Windows has none, and this module imports there too
    except ImportError:  # Windows
        import msvcrt
        fh.seek(0)
        msvcrt.locking(fh.fileno(), msvcrt.LK_NBLCK, 1)
    else:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)


def claim_out_dir(out_dir, data=""):
    """Make the run folder ready and this run's alone. Rank 0, the only writer, holds an OS lock on
    out_dir/.lock until it ends: the kernel releases it on any exit (SIGKILL too), so no stale lock
    blocks a resume. Holding it twice in one process is allowed (in-process tests)."""
    common.refuse_out_dir_in_data(out_dir, data)
    if common.launch_rank() != 0:
        return
    common.writable_dir(out_dir, "--out-dir")  # found now, not at the first save
    key, lock = os.path.realpath(out_dir), os.path.join(out_dir, LOCK_FILE)
    if key in _held:
        return
    try:
        fh = open(lock, "a")
    except OSError as e:  # e.g. a folder named .lock
        raise SystemExit(f"error: --out-dir {out_dir}: cannot open its lock file {lock} "
                         f"({e.strerror or e}); remove whatever is at that path") from None
    try:
        _lock_exclusive(fh)
    except OSError:  # held by another process
        fh.close()
        raise SystemExit(f"error: --out-dir {out_dir} is in use by another run that is still alive "
                         f"(it holds {lock}); wait for it to end or stop it, or choose another "
                         "--out-dir") from None
    _held[key] = fh


# -----------------------------------------------------------------------------
# checkpoints and the one resume rule

MADE_BY = {"ae": "train_ae.py", "dit": "train_dit.py"}
# what the readers of each kind look up in it (resuming a run needs TRAINING_KEYS too)
REQUIRED_KEYS = {"ae": ("model_args", "ema"),
                 "dit": ("step", "model_args", "ema", "ae_ckpt", "ae_step", "ae_fingerprint",
                         "latent_shape", "latent_mean", "latent_std", "num_classes", "class_names")}
TRAINING_KEYS = ("step", "model", "ema", "optimizer", "loader", "rng")


def load_checkpoint(path, kind, mmap=True):
    """A checkpoint of `kind` ("ae", "dit") on the CPU, or one line naming the file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if os.path.getsize(path) == 0:  # e.g. a copy or a write interrupted by a full disk
        raise ValueError(f"checkpoint {path} is empty (0 bytes); copy it again or use another "
                         "checkpoint")
    try:
        # weights_only: never runs code from the file. mmap: the tensors stay in the file's pages,
        # shared by a node's ranks (mmap=False: a copy that a rewrite of the file cannot change)
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # a truncated or foreign file
        # only the kind of error: torch's message advises weights_only=False, which runs the file
        raise ValueError(f"could not read checkpoint {path} ({type(e).__name__}): it is damaged, "
                         "truncated or not a PyTorch checkpoint; copy it again or use another "
                         "checkpoint") from None
    if not isinstance(ckpt, dict) or "kind" not in ckpt:
        raise ValueError(f"{path} is not a DGAE checkpoint (no 'kind' field)")
    if ckpt["kind"] != kind:
        raise ValueError(f"{path} is a '{ckpt['kind']}' checkpoint (written by "
                         f"{MADE_BY.get(ckpt['kind'], '?')}), but a '{kind}' checkpoint (written "
                         f"by {MADE_BY.get(kind, '?')}) is needed here")
    missing = [k for k in REQUIRED_KEYS.get(kind, ()) if k not in ckpt]
    if missing:
        raise ValueError(f"{path} has no {', '.join(repr(k) for k in missing)}: it is not a "
                         f"complete '{kind}' checkpoint (edited, or not written by "
                         f"{MADE_BY[kind]}); use one that {MADE_BY[kind]} wrote")
    for key in ("model", "ema"):  # drop the prefixes torch.compile and DDP add
        if key in ckpt:
            ckpt[key] = {re.sub(r"^((_orig_mod|module)\.)+", "", k): v
                         for k, v in ckpt[key].items()}
    return ckpt


def upgrade_config(ckpt, kind):
    """An older checkpoint's settings with its placeholders ("", 0, -1, the DiT's decode_steps 0)
    replaced by the values the run used, so that it resumes under the one rule."""
    config, args = ckpt.get("config"), ckpt.get("model_args")
    if not isinstance(config, dict):
        return ckpt
    if config.get("preset") == "":
        config["preset"] = ckpt.get("model_name", "")
    if kind == "ae" and isinstance(args, dict):  # stage 1's model_args recorded them resolved
        for k, v in args.items():
            if k in config and config[k] in ("", 0, -1.0) and type(config[k]) is not bool:
                config[k] = v
    if kind == "dit" and config.get("decode_steps") == 0:
        config["decode_steps"] = None
    return ckpt


def resume_or_refuse(ckpt_path, resume, kind):
    """--resume: the run's checkpoint. Else None, and an existing checkpoint is an error."""
    if resume:
        ckpt = load_checkpoint(ckpt_path, kind)
        missing = [k for k in TRAINING_KEYS if k not in ckpt]
        if missing:
            raise ValueError(f"{ckpt_path} has no {', '.join(repr(k) for k in missing)}, so its "
                             "run cannot be resumed; start a new run in another --out-dir")
        if (type(ckpt["step"]) is not int or ckpt["step"] < 0
                or not isinstance(ckpt.get("config", {}), dict)):
            raise ValueError(f"{ckpt_path}: its step ({ckpt['step']!r}) or its settings are not "
                             "what the training script writes (an edited file); resume from a "
                             "checkpoint as it was written")
        return upgrade_config(ckpt, kind)
    if os.path.exists(ckpt_path):
        raise SystemExit(f"error: {ckpt_path} exists. Pass --resume true to continue that run, "
                         "or choose another --out-dir.")
    return None


def dataset_changed(ckpt, num_images):
    """A warning if the data holds another image count than the checkpoint's, else None."""
    saved = ckpt.get("config", {}).get("num_images")
    if saved is None or saved == num_images:
        return None
    return (f"warning: the data now holds {num_images} images, the run had {saved} when it was "
            "checkpointed: the images it sees from here on follow another order than the "
            "interrupted run's")


# The one resume rule. A resumed run takes every setting from its checkpoint. Only these may differ
# on the command line: how long and how often it runs, how it computes, and where its other files
# are (each checked where it is read); a flag that gives any other setting another value is refused.
# The device, the run folder and --resume itself are never taken from a checkpoint (NEVER_RESUMED).
MAY_CHANGE_ON_RESUME = (
    # how long, how often
    "max_steps", "log_every", "sample_every", "ckpt_every", "max_nonfinite_steps",
    # how it computes
    "attn_impl", "compile", "grad_checkpoint", "channels_last", "deterministic", "num_workers",
    "encode_batch_size", "dist_timeout", "decode_steps", "sample_steps", "cfg_scale",
    # where files are: train_dit checks the encoder's fingerprint
    "ae_ckpt", "cache_dir", "vgg_path", "lpips_path")
NEVER_RESUMED = ("resume", "out_dir", "device")


COMPILE_NOTE = ("torch.compile: the first step waits for the compilation, which takes minutes "
                "(longest on a CPU)")


def schedule_notes(warmup_steps, max_steps, step=0):
    """Lines about a schedule that cannot do what its flags ask (the run goes on anyway)."""
    if step >= max_steps:
        return [f"note: --max-steps {max_steps} is at or below the checkpoint's step {step}, so "
                "there is nothing to train; pass a higher --max-steps to continue the run"]
    if warmup_steps > max_steps:
        return [f"warning: --warmup-steps {warmup_steps} is longer than --max-steps {max_steps}, "
                f"so the learning rate never exceeds {max_steps / warmup_steps:.0%} of --lr; lower "
                "--warmup-steps"]
    return []


def settings_for_resume(ckpt, settings, given, may_change):
    """(the checkpoint's settings with those of `may_change` given on the command line, lines)."""
    changed = []
    for name, value in ckpt.get("config", {}).items():
        if name not in settings or name in NEVER_RESUMED:
            continue
        want, number = type(settings[name]), (int, float)
        if not (settings[name] is None or value is None or type(value) is want
                or want in number and type(value) in number or want is str and type(value) is bool):
            raise ValueError(f"{os.path.join(settings['out_dir'], 'ckpt.pt')}: its setting "
                             f"{name}={value!r} is not a {want.__name__} (an edited file); resume "
                             "from a checkpoint as it was written")
        if name in given and settings[name] != value:
            flag = common.flag_of(name)
            if name not in may_change:
                raise SystemExit(
                    f"error: {flag} {settings[name]} does not match the checkpoint being resumed "
                    f"({value}); a resumed run keeps its settings, except "
                    f"{', '.join(common.flag_of(n) for n in MAY_CHANGE_ON_RESUME[:4])} "
                    "and how it computes: drop the flag, or start a new run in another --out-dir")
            changed.append(f"{flag} {value} -> {settings[name]}")
        settings[name] = settings[name] if name in given else value
    return settings, (["resumed with changed settings: " + ", ".join(changed)] if changed else [])


def start_run(kind, settings, given, may_change, log):
    """What a trainer does before it builds a model (a bad flag or file is one line): check the
    device, take the run folder, on --resume load the checkpoint and take its settings back, start
    torch.distributed. Returns (the checkpoint or None, the settings, common.Dist)."""
    out_dir = settings["out_dir"]
    common.check_device(settings["device"])  # before any folder is made or image read
    with common.user_errors():
        claim_out_dir(out_dir, settings["data"])
        ckpt = resume_or_refuse(os.path.join(out_dir, "ckpt.pt"), settings["resume"], kind)
        notes = []
        if ckpt is not None:
            settings, notes = settings_for_resume(ckpt, settings, given, may_change)
            common.refuse_out_dir_in_data(settings["out_dir"], settings["data"])  # the ckpt's data
        notes += schedule_notes(settings["warmup_steps"], settings["max_steps"],
                                ckpt["step"] if ckpt is not None else 0)
    dist = common.setup_distributed(settings["device"], settings["dist_timeout"],
                                    settings["deterministic"])
    for line in notes:
        log(line)
    return ckpt, settings, dist


# -----------------------------------------------------------------------------
# the training state: weights, optimizer, data position and every rank's RNG


def rng_state():
    """Every random generator a training step touches, so --resume continues bit-identically."""
    # numpy's state holds an ndarray, which weights_only loading refuses; store it as a tensor
    _, key, *rest = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": {"key": torch.from_numpy(key.astype(np.int64)), "rest": rest}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        # this process's own GPU only: a resume may see other GPUs, or fewer
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(("MT19937", state["numpy"]["key"].numpy(), *state["numpy"]["rest"]))
    cuda = state.get("cuda")
    if isinstance(cuda, (list, tuple)):  # a checkpoint that saved every visible GPU's: this one's
        cuda = (cuda[torch.cuda.current_device()]
                if torch.cuda.is_available() and torch.cuda.current_device() < len(cuda) else None)
    if cuda is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda)


def seed_rank(seed, rank, step=0):
    """Seed every generator for `rank`; a resume on another rank count mixes in the step."""
    s = seed + 1000 * (rank + 1) + 7919 * step
    torch.manual_seed(s)  # the CPU and every GPU
    random.seed(s)
    np.random.seed(s % 2**32)


def save_training(path, dist, kind, step, net, ema, optimizer, loader, **extra):
    """Checkpoint a run, with every rank's RNG state (call it on every rank) and `extra`."""
    rngs = [rng_state()]
    if dist.ddp:
        rngs = [None] * dist.world_size  # indexed by rank
        torch_dist.all_gather_object(rngs, rng_state())
    if dist.master:
        save_checkpoint(path, dict(kind=kind, step=step, model=net.state_dict(),
                                   ema=ema.state_dict(), optimizer=optimizer.state_dict(),
                                   loader=loader.state_dict(), rng=rngs, **extra))


def restore_training(ckpt, dist, net, ema, optimizer, loader, path, seed, log):
    """The inverse of save_training; returns the step to continue from."""
    load_weights(net, ckpt["model"], path)
    load_weights(ema, ckpt["ema"], path)
    try:
        optimizer.load_state_dict(ckpt["optimizer"])
    except ValueError as e:  # a parameter group of another size: weights of another model
        raise ValueError(f"{path}: its optimizer state does not fit the model ({e})") from None
    loader.load_state_dict(ckpt["loader"])
    saved_ranks = len(ckpt["rng"])
    if saved_ranks == dist.world_size:
        set_rng_state(ckpt["rng"][dist.rank])
    else:
        seed_rank(seed, dist.rank, ckpt["step"])
        log(f"resumed on {dist.world_size} process{'es' if dist.world_size > 1 else ''}, saved on "
            f"{saved_ranks}: the data continues at the next unused image; each rank's noise is "
            f"seeded anew from --seed {seed} and step {ckpt['step']} (bit-for-bit continuation "
            "holds only on the same number of processes)")
    return ckpt["step"]


# -----------------------------------------------------------------------------
# models from checkpoints, every edit refused in one line naming the file


def load_weights(module, state_dict, path, assign=False):
    """module.load_state_dict, with weights that do not fit one line naming `path`."""
    try:
        module.load_state_dict(state_dict, assign=assign)
    except RuntimeError as e:
        details = [line.strip().rstrip(".") for line in str(e).splitlines()[1:] if line.strip()]
        first = (details[0] if details else str(e))[:200]
        raise ValueError(f"{path}: its weights do not fit the model its model_args describe "
                         f"({first}); the file was edited or damaged, use a checkpoint as the "
                         "training script wrote it") from None


def check_weights_fit(build, state_dict, path):
    """Refuse weights that do not fit build()'s model, on the meta device (no memory taken)."""
    with torch.device("meta"):
        load_weights(build(), state_dict, path, assign=True)


def model_from_args(cls, args, state_dict, path):
    """cls(**args) from a checkpoint's model_args, checked against its weights first."""
    if not isinstance(args, dict):
        raise ValueError(f"{path}: model_args is not a dict; use a checkpoint as the training "
                         "script wrote it")
    unknown = sorted(set(args) - set(inspect.signature(cls).parameters))
    if unknown:
        raise ValueError(f"{path}: model_args has settings this version's model does not take: "
                         f"{', '.join(unknown)}; use a checkpoint this version wrote")
    try:
        check_weights_fit(lambda: cls(**args), state_dict, path)
        return cls(**args)
    except (TypeError, ValueError, RuntimeError, ZeroDivisionError, AssertionError) as e:
        if isinstance(e, ValueError) and str(e).startswith(str(path)):
            raise
        raise ValueError(f"{path}: its model_args do not build the model ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:160] if str(e) else ''}); use a checkpoint as "
                         "the training script wrote it") from None


def config_from_dict(d):
    """The AEConfig of a checkpoint's model_args; an unknown key or a wrong type is a ValueError."""
    if not isinstance(d, dict):
        raise ValueError(f"model_args is a {type(d).__name__}, not a dict of the model's settings")
    defaults = {f.name: f.default for f in dataclasses.fields(AEConfig)}
    d = {k: v for k, v in d.items() if k not in TRAINER_SETTINGS}  # older checkpoints had them
    unknown = sorted(set(d) - set(defaults))
    if unknown:
        raise ValueError(f"model_args has settings this version's model does not know: "
                         f"{', '.join(unknown)}")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
    kinds = {"int": "a whole number", "float": "a number", "str": "a string", "tuple": "a list",
             "bool": "true/false"}
    for k, v in values.items():
        want = type(defaults[k])
        fits = isinstance(v, want) and (want is bool or not isinstance(v, bool))
        if not (fits or want is float and type(v) is int):  # 1 stands for 1.0
            raise ValueError(f"model_args {k}={v!r} is not "
                             f"{kinds.get(want.__name__, want.__name__)}")
    return AEConfig(**values)


def encoder_fingerprint(state_dict):
    """A short hash of a DGAE's encoder weights: latents, and a DiT, fit this encoder only."""
    h = hashlib.sha256()
    for k in sorted(k for k in state_dict if k.startswith("encoder.")):
        h.update(k.encode())
        h.update(state_dict[k].detach().cpu().contiguous().reshape(-1)
                 .view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def load_dgae(path, device="cpu", ema=True):
    """A trained DGAE from a train_ae.py checkpoint (EMA weights by default), in eval mode."""
    return dgae_from_checkpoint(load_checkpoint(path, "ae"), path, device, ema)


def dgae_from_checkpoint(ckpt, path, device="cpu", ema=True):
    """load_dgae of a checkpoint already read (`path`: for the messages)."""
    try:
        cfg = config_from_dict(ckpt["model_args"])
    except ValueError as e:
        raise ValueError(f"{path}: {e}; use a checkpoint as train_ae.py wrote it") from None
    weights = ckpt["ema" if ema else "model"]
    check_weights_fit(lambda: DGAE(cfg), weights, path)  # before any memory is taken
    model = DGAE(cfg)
    load_weights(model, weights, path)
    return model.to(device).eval()


# -----------------------------------------------------------------------------
# preemption: a stop signal ends the run at the next step boundary, with a checkpoint

EXIT_STOPPED = 75  # sysexits.h's EX_TEMPFAIL, "try again later": stopped, checkpoint saved
# SIGTERM: schedulers' and torchrun's before a kill; SIGUSR1: SLURM's warning; SIGINT: Ctrl-C
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class Stopped(Exception):
    """Raised inside work that a stop signal gives up (StepGuard.given_up_at_stop)."""


class StopSignals:
    """From construction on, a stop signal is only recorded: the loops ask flag() at each step,
    agree over the ranks, save and exit. To quit without saving: Ctrl-\\ (SIGQUIT) or SIGKILL."""

    def __init__(self):
        self.received = None  # the name of the first stop signal this process received
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        # only record it: printing could re-enter a write to stderr that the signal interrupted. A
        # repeat (Ctrl-C under torchrun reaches each worker twice) changes nothing
        self.received = self.received or signal.Signals(signum).name

    def pending(self):
        return self.received is not None

    def flag(self, device):
        # 1.0 if a stop signal came; torch.full fills on the device, torch.tensor would copy
        return torch.full((), float(self.received is not None), device=device)


class StepGuard:
    """After each backward pass: may the update reach the weights, and does the run stop? A step
    with a non-finite loss or gradient is skipped and counted; `max_in_a_row` in a row stop the run
    without saving. All ranks decide alike (one all-reduce of the loss check and the stop flag).
    With a fused optimizer (CUDA) the decision stays on the device, so the GPU never waits: AdamW
    skips itself through `found_inf` (as AMP's scaler does), the EMA through ema_decay, and the
    flags are read back every `check_every` steps and at `last_step` only."""

    def __init__(self, stop, dist, max_in_a_row, ckpt_path, hint, optimizer=None, check_every=1,
                 last_step=0):
        self.stop, self.dist, self.max_in_a_row = stop, dist, max_in_a_row
        self.ckpt_path = ckpt_path
        self.hint = hint  # the end of the message that stops the run, e.g. "Lower --lr ..."
        self.skipped = 0  # steps skipped since the last log row (take_skipped)
        self.in_a_row = 0
        self.stopping = False  # a stop signal reached some rank: save after this step and exit
        self.optimizer, self.check_every, self.last_step = optimizer, check_every, last_step
        self.on_device = (optimizer is not None
                          and any(g.get("fused") for g in optimizer.param_groups))
        if self.on_device:
            # (skipped, in a row, the most in a row since the last check) as device tensors
            self.counts = torch.zeros(3, device=dist.device)
            self.bad = torch.zeros((), dtype=torch.bool, device=dist.device)

    def update_ok(self, loss, grad_norm, step):
        """May the step to step + 1 update the weights? (On the device path it skips itself.)"""
        if self.on_device:
            return self._update_on_device(loss, grad_norm, step)
        flags = torch.stack([(~torch.isfinite(loss)).float(), self.stop.flag(self.dist.device)])
        loss_nonfinite, stopping = common.all_reduce_sum(flags, self.dist).tolist()
        self.stopping = stopping > 0
        if torch.isfinite(grad_norm) and loss_nonfinite == 0:
            self.in_a_row = 0
            return True
        self.skipped, self.in_a_row = self.skipped + 1, self.in_a_row + 1
        self._stop_if_too_many(step)
        return False

    def _stop_if_too_many(self, step):
        if self.in_a_row >= self.max_in_a_row:
            common.close_bars()  # the message on a line of its own
            raise SystemExit(f"error: {self.in_a_row} steps in a row (to step {step + 1}) had a "
                             "non-finite loss or gradient (--max-nonfinite-steps "
                             f"{self.max_in_a_row}); stopped without saving, so {self.ckpt_path} "
                             f"is left as it was. {self.hint}")

    def _update_on_device(self, loss, grad_norm, step):
        loss_nonfinite = common.all_reduce_sum((~torch.isfinite(loss)).float().reshape(1),
                                               self.dist)[0]
        self.bad = (loss_nonfinite > 0) | ~torch.isfinite(grad_norm)  # () bool, on the device
        self.optimizer.found_inf = self.bad.float()  # the fused AdamW step leaves everything alone
        skipped, run, worst = self.counts.unbind()
        run = torch.where(self.bad, run + 1, torch.zeros_like(run))
        self.counts = torch.stack([skipped + self.bad, run, torch.maximum(worst, run)])
        if (step + 1) % self.check_every == 0 or step + 1 == self.last_step:
            flags = torch.cat([self.counts, self.stop.flag(self.dist.device).reshape(1)])
            flags[3:] = common.all_reduce_sum(flags[3:], self.dist)  # the stop flag, over the ranks
            skipped, run, worst, stopping = flags.tolist()  # the one read back of check_every steps
            self.stopping = stopping > 0
            self.skipped += int(skipped)
            self.counts = torch.tensor([0.0, run, run], device=self.dist.device)
            self.in_a_row = int(worst)
            self._stop_if_too_many(step)
            self.in_a_row = int(run)
        return True

    def ema_decay(self, decay):
        """This step's decay: on the device path a tensor, 1 (no change) if the step was skipped."""
        if not self.on_device:
            return decay
        return torch.where(self.bad, torch.ones((), device=self.bad.device),
                           torch.full((), decay, device=self.bad.device))

    def take_skipped(self):
        """The steps skipped since the last call, the same on every rank."""
        n, self.skipped = self.skipped, 0
        return n

    @contextmanager
    def given_up_at_stop(self, what, log, *modules):
        """Around work between steps (a grid's decode): a forward pre-hook on `modules` gives it up
        at a stop signal, within a scheduler's grace period, and logs that `what` was skipped."""

        def ask(module, args):
            if self.stop.pending():
                raise Stopped

        hooks = [m.register_forward_pre_hook(ask) for m in modules]
        try:
            yield
        except Stopped:
            log(f"\n{what} skipped: stop signal {self.stop.received}")
        finally:
            for h in hooks:
                h.remove()

    def exit_saved(self, step, log):
        """End the process after a stop signal, the checkpoint of `step` saved."""
        common.close_bars()
        by = self.stop.received or "a stop signal to another rank"
        log(f"stopped by {by} after step {step}: saved {self.ckpt_path}. Run the same command with "
            f"--resume true to continue (exit status {EXIT_STOPPED})")
        common.shutdown(self.dist, EXIT_STOPPED)


def loader_worker_init(worker_id=None):
    """DataLoader worker_init_fn: ignore the stop signals (the trainer finishes its step with the
    workers), and close this fork's copy of the lock, which would outlive a killed trainer."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    for fh in _held.values():
        fh.close()
    _held.clear()


# -----------------------------------------------------------------------------
# pretrained weight files (VGG16 + LPIPS heads, InceptionV3)


def load_weight_file(path, flag, url):
    """A pretrained weight file as a dict of tensors, or one line (ValueError) naming it."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{flag} {path}: could not read it as weights ({type(e).__name__}): it is "
                         "damaged, truncated or not the published file; download it again from "
                         f"{url}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{flag} {path}: not a state dict of tensors; download the published file "
                         f"from {url}")
    return state


def load_published_weights(load, path, flag, url):
    """load() fills a network from a weight file; its failure is one line naming the file."""
    try:
        return load()
    except (RuntimeError, KeyError, ValueError) as e:
        lines = [line.strip().rstrip(".") for line in str(e).strip().splitlines() if line.strip()]
        first = (lines[1] if len(lines) > 1 and lines[0].endswith(":") else
                 lines[0] if lines else type(e).__name__)[:160]
        raise ValueError(f"{flag} {path}: not the published weights of this network ({first}); "
                         f"download the published file from {url}") from None


def find_weights(path, filename, url, flag, env_var, required=True):
    """`path`, else $env_var, else $DGAE_WEIGHTS/filename (./weights); nothing is downloaded."""
    candidate = (path or os.environ.get(env_var)
                 or os.path.join(os.environ.get("DGAE_WEIGHTS", "weights"), filename))
    if os.path.isfile(candidate):
        return candidate
    if not required and not path:  # a path the user typed must exist, even for an optional file
        return None
    raise FileNotFoundError(f"pretrained weight file {filename} not found (looked at {candidate}). "
                            f"Download it once from {url} and pass its path with {flag} PATH, or "
                            f"set {env_var}=PATH, or put it in $DGAE_WEIGHTS (default ./weights/).")
