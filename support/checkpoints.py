"""
How a run is saved, stopped and resumed, and where pretrained files are found: the run folder
(one run at a time, through an OS lock), atomic writes, checkpoints of a known kind with every
rank's RNG state (so --resume continues bit-identically), stop signals that end a run at a step
boundary with a checkpoint, and the lookup of the VGG16, LPIPS and InceptionV3 weight files. The
settings and torch.distributed live in common.py. A reader of the method can skip this file: the
trainers call start_run (with the resume rule, MAY_CHANGE_ON_RESUME), save_training,
restore_training, StopSignals and StepGuard; sample.py and eval.py call load_dgae.
"""

import dataclasses
import hashlib
import inspect
import os
import random
import re
import signal
from contextlib import contextmanager

import numpy as np
import torch
import torch.distributed as torch_dist

from ae import TRAINER_SETTINGS, AEConfig, DGAE
from support import common

# -----------------------------------------------------------------------------
# checkpoints


def _os_error(e):
    """The OSError behind `e`, or None. torch's zip writer (torch.save) turns an OSError of the file
    it writes (a full disk, a file-size limit) into a RuntimeError ("[enforce fail at
    inline_container.cc] unexpected pos"), with the OSError as its context."""
    while e is not None and not isinstance(e, OSError):
        e = e.__context__
    return e


def atomic_write(path, write):
    """Write a file atomically: write(fh) fills a .tmp beside the file, which then replaces it in
    one step.

    A crash mid-write leaves the previous file intact, never half a file. A write that fails (disk
    full, read-only folder) also keeps the previous file, removes its .tmp (a 20 MB leftover per
    try otherwise) and stops with one line naming the file. A symbolic link (a ckpt.pt that points
    to a persistent volume) is written through: its target is replaced, and the link stays.
    """
    target = os.path.realpath(path)  # a rename onto the link would replace the link itself
    os.makedirs(os.path.dirname(target), exist_ok=True)
    tmp = target + ".tmp"
    try:
        with _fresh_file(tmp) as fh:
            write(fh)
        os.replace(tmp, target)
    except BaseException as e:  # an interrupt too: no .tmp is left behind
        try:
            os.remove(tmp)
        except OSError:
            pass
        cause = _os_error(e) if isinstance(e, Exception) else None
        if cause is not None:
            kept = "the previous file is kept" if os.path.exists(target) else "nothing was written"
            raise SystemExit(f"error: could not write {path} ({cause.strerror or cause}); {kept}. "
                             "Free some space or choose a folder you can write to.") from None
        raise


def _fresh_file(path):
    """`path` opened for writing as a new file. Whatever is there already (a .tmp left by a killed
    write, or a symbolic link planted in its place) is removed first, never written through: the
    file is created with O_EXCL, which fails rather than follow a link or reuse a file."""
    try:
        os.unlink(path)  # a link itself, not its target
    except FileNotFoundError:
        pass
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o666)
    return os.fdopen(fd, "wb")


def write_text(path, text):
    """A text file written atomically (atomic_write): a report, a JSON file, a table."""
    atomic_write(path, lambda fh: fh.write(text.encode()))


def save_checkpoint(path, ckpt):
    """Write atomically (see atomic_write): never half a checkpoint, and a failed write keeps the
    old one."""
    atomic_write(path, lambda fh: torch.save(ckpt, fh))


# The lock file of a run folder (see claim_out_dir).
LOCK_FILE = ".lock"
_held = {}  # run folder (real path) -> its open lock file, held until this process ends


def _lock_exclusive(fh):
    """An exclusive, non-blocking OS lock on the open file fh (OSError if another process holds it):
    flock on Linux and macOS, msvcrt's lock on Windows. Imported here, not at the top, so that the
    modules that import this one (the models' loaders) import on every OS."""
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt

        fh.seek(0)
        msvcrt.locking(fh.fileno(), msvcrt.LK_NBLCK, 1)
        return
    fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)


def claim_out_dir(out_dir, data=""):
    """Make the run folder out_dir ready and make it this run's alone, before any other work.

    Refused in one line: an out_dir inside data (see common.refuse_out_dir_in_data), one that cannot
    be written, and one that another process holds. Two runs in one folder (a job submitted twice, a
    restart script too eager) would write the same ckpt.pt, .tmp and log.jsonl in turn. Rank 0 (the
    only rank that writes) holds an exclusive flock on out_dir/.lock until it ends: an OS lock, not
    a marker file, so the kernel releases it on any exit, SIGKILL and a crash included, and no stale
    lock ever blocks a resume. Holding it twice in one process is allowed (in-process tests)."""
    common.refuse_out_dir_in_data(out_dir, data)
    if common.launch_rank() != 0:
        return
    common.writable_dir(out_dir, "--out-dir")  # found now, not at the first save
    key = os.path.realpath(out_dir)
    if key in _held:
        return
    try:
        fh = open(os.path.join(out_dir, LOCK_FILE), "a")
    except OSError as e:  # e.g. a folder named .lock
        raise SystemExit(f"error: --out-dir {out_dir}: cannot open its lock file "
                         f"{os.path.join(out_dir, LOCK_FILE)} ({e.strerror or e}); remove whatever "
                         "is at that path") from None
    try:
        _lock_exclusive(fh)
    except OSError:  # held by another process
        fh.close()
        raise SystemExit(f"error: --out-dir {out_dir} is in use by another run that is still alive "
                         f"(it holds {os.path.join(out_dir, LOCK_FILE)}); wait for it to end or "
                         "stop it, or choose another --out-dir") from None
    _held[key] = fh


def dataset_changed(ckpt, num_images):
    """On --resume, a line saying that the data folder holds another number of images than when the
    checkpoint was written (its settings record the count), else None: the saved data position then
    points into another dataset, so the order of the images differs from the run's own."""
    saved = ckpt.get("config", {}).get("num_images")
    if saved is None or saved == num_images:
        return None
    return (f"warning: the data now holds {num_images} images, the run had {saved} when it was "
            "checkpointed: the images it sees from here on follow another order than the "
            "interrupted run's")


MADE_BY = {"ae": "train_ae.py", "dit": "train_dit.py"}
# what the code that reads each kind of checkpoint looks up in it (a training run needs more:
# TRAINING_KEYS)
REQUIRED_KEYS = {"ae": ("model_args", "ema"),
                 "dit": ("step", "model_args", "ema", "ae_ckpt", "ae_step", "ae_fingerprint",
                         "latent_shape", "latent_mean", "latent_std", "num_classes", "class_names")}
TRAINING_KEYS = ("step", "model", "ema", "optimizer", "loader", "rng")


def load_checkpoint(path, kind, mmap=True):
    """Load a checkpoint dict onto the CPU, refusing a file of the wrong kind: "ae" (train_ae.py) or
    "dit" (train_dit.py), or one that lacks what the kind needs. weights_only=True: loading a
    checkpoint never runs code from it. Every refusal is one line naming the file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if os.path.getsize(path) == 0:  # e.g. a copy or a write interrupted by a full disk
        raise ValueError(f"checkpoint {path} is empty (0 bytes); copy it again or use another "
                         "checkpoint")
    try:
        # mmap: the tensors stay in the file's pages, shared by every rank of a node that reads it,
        # instead of one full copy in each process's memory (mmap=False: a copy that a file
        # rewritten in place meanwhile cannot change)
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # a truncated or foreign file
        # torch's message for a file it cannot unpickle safely suggests weights_only=False, which
        # would run whatever code the file holds; only the kind of error is passed on
        raise ValueError(f"could not read checkpoint {path} ({type(e).__name__}): it is damaged, "
                         "truncated or not a PyTorch checkpoint; copy it again or use another "
                         "checkpoint") from None
    if not isinstance(ckpt, dict) or "kind" not in ckpt:
        raise ValueError(f"{path} is not a DGAE checkpoint (no 'kind' field)")
    if ckpt["kind"] != kind:
        raise ValueError(
            f"{path} is a '{ckpt['kind']}' checkpoint (written by "
            f"{MADE_BY.get(ckpt['kind'], '?')}), but a '{kind}' checkpoint (written by "
            f"{MADE_BY.get(kind, '?')}) is needed here"
        )
    missing = [k for k in REQUIRED_KEYS.get(kind, ()) if k not in ckpt]
    if missing:
        raise ValueError(f"{path} has no {', '.join(repr(k) for k in missing)}: it is not a "
                         f"complete '{kind}' checkpoint (edited, or not written by "
                         f"{MADE_BY[kind]}); use one that {MADE_BY[kind]} wrote")
    # drop the prefixes torch.compile (_orig_mod.) and DDP (module.) add
    for key in ("model", "ema"):
        if key in ckpt:
            ckpt[key] = {re.sub(r"^((_orig_mod|module)\.)+", "", k): v
                         for k, v in ckpt[key].items()}
    return ckpt


def upgrade_config(ckpt, kind):
    """The settings of a checkpoint written before the preset's values became None: those held
    placeholders ("" for the preset and t_dist, 0 for sizes and the lr, -1 for loss weights, the
    DiT's decode_steps 0). Put in their place the values the run used (model_name, and stage 1's
    model_args, which recorded them resolved), so that such a run resumes under the one rule."""
    config, args = ckpt.get("config"), ckpt.get("model_args")
    if not isinstance(config, dict):
        return ckpt
    if config.get("preset") == "":
        config["preset"] = ckpt.get("model_name", "")
    if kind == "ae" and isinstance(args, dict):
        for k, v in args.items():
            if k in config and config[k] in ("", 0, -1.0) and type(config[k]) is not bool:
                config[k] = v
    if kind == "dit" and config.get("decode_steps") == 0:
        config["decode_steps"] = None
    return ckpt


def resume_or_refuse(ckpt_path, resume, kind):
    """--resume: the run's checkpoint. Otherwise None, and an existing checkpoint is an error, so a
    finished or running job is never overwritten by accident."""
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


def mismatch(name, value, saved):
    return SystemExit(f"error: --{name.replace('_', '-')} {value} does not match the checkpoint "
                      f"being resumed ({saved}); a resumed run keeps its settings, except "
                      f"{', '.join('--' + n.replace('_', '-') for n in MAY_CHANGE_ON_RESUME[:4])} "
                      "and how it computes: drop the flag, or start a new run in another --out-dir")


COMPILE_NOTE = ("torch.compile: the first step waits for the compilation, which takes minutes "
                "(longest on a CPU)")


def schedule_notes(warmup_steps, max_steps, step=0):
    """Lines about a schedule that cannot do what its flags ask (the run goes on): a resumed
    --max-steps at or below the checkpoint's step (nothing to train), a warm-up longer than the run
    (the learning rate never reaches --lr)."""
    if step >= max_steps:
        return [f"note: --max-steps {max_steps} is at or below the checkpoint's step {step}, so "
                "there is nothing to train; pass a higher --max-steps to continue the run"]
    if warmup_steps > max_steps:
        return [f"warning: --warmup-steps {warmup_steps} is longer than --max-steps {max_steps}, "
                f"so the learning rate never exceeds {max_steps / warmup_steps:.0%} of --lr; lower "
                "--warmup-steps"]
    return []


def settings_for_resume(ckpt, settings, given, may_change):
    """The settings of a resumed run (see MAY_CHANGE_ON_RESUME): the checkpoint's, except those of
    `may_change` given on the command line. Returns (settings, lines to log naming what changed)."""
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
            if name not in may_change:
                raise mismatch(name, settings[name], value)
            changed.append(f"--{name.replace('_', '-')} {value} -> {settings[name]}")
        settings[name] = settings[name] if name in given else value
    return settings, (["resumed with changed settings: " + ", ".join(changed)] if changed else [])


def start_run(kind, settings, given, may_change, log):
    """Everything a trainer does before it builds a model: check the device, take the run folder
    (one run at a time), load its checkpoint on --resume (or refuse to overwrite one), take the
    run's own settings back from it (settings_for_resume), start torch.distributed on the run's
    device and log the notes on its settings and schedule (schedule_notes). A bad flag or file
    stops here with one line. Returns (the checkpoint or None, the settings, common.Dist)."""
    out_dir = settings["out_dir"]
    common.check_device(settings["device"])  # before any folder is made or image read
    with common.user_errors():
        claim_out_dir(out_dir, settings["data"])  # this run's alone while it lives
        # never overwrite a run
        ckpt = resume_or_refuse(os.path.join(out_dir, "ckpt.pt"), settings["resume"], kind)
        notes = []
        if ckpt is not None:
            settings, notes = settings_for_resume(ckpt, settings, given, may_change)
            # the checkpoint's --data
            common.refuse_out_dir_in_data(settings["out_dir"], settings["data"])
        notes += schedule_notes(settings["warmup_steps"], settings["max_steps"],
                                ckpt["step"] if ckpt is not None else 0)
    # (the checkpoint's, if not given)
    dist = common.setup_distributed(settings["device"], settings["dist_timeout"],
                                    settings["deterministic"])
    for line in notes:
        log(line)
    return ckpt, settings, dist


def rng_state():
    """Every random generator a training step touches, so --resume continues bit-identically."""
    # numpy's state holds an ndarray, which weights_only loading refuses; store it as a tensor
    _, key, *rest = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": {"key": torch.from_numpy(key.astype(np.int64)), "rest": rest}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        # this process's own GPU only: a resume may see other GPUs, or fewer (a smaller node,
        # SLURM's per-task CUDA_VISIBLE_DEVICES), and the rank's noise is drawn on its current
        # device
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(("MT19937", state["numpy"]["key"].numpy(), *state["numpy"]["rest"]))
    cuda = state.get("cuda")
    # a checkpoint that saved every visible GPU's: this device's
    if isinstance(cuda, (list, tuple)):
        cuda = (cuda[torch.cuda.current_device()]
                if torch.cuda.is_available() and torch.cuda.current_device() < len(cuda) else None)
    if cuda is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda)


def seed_rank(seed, rank, step=0):
    """Every generator a training step touches, for `rank`: seed + 1000 (rank + 1) at the start of a
    run; on a resume at another number of ranks, where no saved state belongs to the rank, the step
    is mixed in too, so that the noise after the resume differs from the noise the run began
    with."""
    s = seed + 1000 * (rank + 1) + 7919 * step
    torch.manual_seed(s)  # the CPU and every GPU
    random.seed(s)
    np.random.seed(s % 2**32)


def save_training(path, dist, kind, step, net, ema, optimizer, loader, **extra):
    """Checkpoint a training run: weights, EMA, optimizer, data position and every rank's RNG state
    (each rank draws its own noise), plus `extra` (model args, settings, ...). Call it on every
    rank, since the RNG states are gathered; rank 0 alone writes."""
    rngs = [rng_state()]
    if dist.ddp:
        rngs = [None] * dist.world_size  # indexed by rank
        torch_dist.all_gather_object(rngs, rng_state())
    if dist.master:
        save_checkpoint(path, dict(kind=kind, step=step, model=net.state_dict(),
                                   ema=ema.state_dict(), optimizer=optimizer.state_dict(),
                                   loader=loader.state_dict(), rng=rngs, **extra))


def load_weights(module, state_dict, path, assign=False):
    """module.load_state_dict(state_dict), where weights that do not fit the model (shapes edited,
    tensors missing or extra) are one line naming the file, not torch's list of every mismatch.
    assign=True: take the tensors themselves (to check a model built on the meta device)."""
    try:
        module.load_state_dict(state_dict, assign=assign)
    except RuntimeError as e:
        details = [line.strip().rstrip(".") for line in str(e).splitlines()[1:] if line.strip()]
        first = (details[0] if details else str(e))[:200]
        raise ValueError(f"{path}: its weights do not fit the model its model_args describe "
                         f"({first}); the file was edited or damaged, use a checkpoint as the "
                         "training script wrote it") from None


def check_weights_fit(build, state_dict, path):
    """Refuse, in one line naming `path`, weights that do not fit the model build() makes; the model
    is built on the meta device (shapes, no storage), so an edited width of 10^5 channels takes no
    memory."""
    with torch.device("meta"):
        load_weights(build(), state_dict, path, assign=True)


def model_from_args(cls, args, state_dict, path):
    """cls(**args) from a checkpoint's model_args, its weights `state_dict` checked first on the
    meta device (no memory taken: an edited width of 10^5 channels is one line, not a 64 GB
    allocation). A key the class does not take, a value of the wrong kind or weights that do not
    fit: one line naming `path`."""
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
    """The AEConfig a checkpoint's model_args describe. A key AEConfig lacks, or a value of another
    type than the field's (an edited file, another version's), is a ValueError naming it."""
    if not isinstance(d, dict):
        raise ValueError(f"model_args is a {type(d).__name__}, not a dict of the model's settings")
    defaults = {f.name: f.default for f in dataclasses.fields(AEConfig)}
    # older checkpoints recorded them here
    d = {k: v for k, v in d.items() if k not in TRAINER_SETTINGS}
    unknown = sorted(set(d) - set(defaults))
    if unknown:
        raise ValueError(f"model_args has settings this version's model does not know: "
                         f"{', '.join(unknown)}")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
    for k, v in values.items():
        want = type(defaults[k])
        fits = isinstance(v, want) and (want is bool or not isinstance(v, bool))
        if not (fits or want is float and type(v) is int):  # 1 stands for 1.0
            kinds = {"int": "a whole number", "float": "a number", "str": "a string",
                     "tuple": "a list", "bool": "true/false"}
            raise ValueError(f"model_args {k}={v!r} is not "
                             f"{kinds.get(want.__name__, want.__name__)}")
    return AEConfig(**values)


def encoder_fingerprint(state_dict):
    """A short hash of the stage-1 encoder's weights (the `encoder.*` entries of a DGAE state dict).

    Latents, their statistics and every DiT trained on them are only valid with this encoder;
    train_dit.py records the hash in the latent cache and the DiT checkpoint, and sample.py
    compares it with the stage-1 checkpoint it decodes with.
    """
    h = hashlib.sha256()
    for k in sorted(k for k in state_dict if k.startswith("encoder.")):
        h.update(k.encode())
        h.update(state_dict[k].detach().cpu().contiguous().reshape(-1)
                 .view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def load_dgae(path, device="cpu", ema=True):
    """Rebuild a trained DGAE from a train_ae.py checkpoint (EMA weights by default), in eval
    mode."""
    return dgae_from_checkpoint(load_checkpoint(path, "ae"), path, device, ema)


def dgae_from_checkpoint(ckpt, path, device="cpu", ema=True):
    """load_dgae of a checkpoint already read (`path`: its file, for the messages): a caller that
    must use one file's contents throughout reads it once."""
    try:
        cfg = config_from_dict(ckpt["model_args"])
    except ValueError as e:
        raise ValueError(f"{path}: {e}; use a checkpoint as train_ae.py wrote it") from None
    # before any memory is taken
    check_weights_fit(lambda: DGAE(cfg), ckpt["ema" if ema else "model"], path)
    model = DGAE(cfg)
    load_weights(model, ckpt["ema" if ema else "model"], path)
    return model.to(device).eval()


def restore_training(ckpt, dist, net, ema, optimizer, loader, path, seed, log):
    """The inverse of save_training, for --resume (`path`: the checkpoint's, for the messages);
    returns the step to continue from. On another number of ranks than the run was saved with, the
    data continues at the next unused image (data.Loader) and each rank's generators are seeded anew
    from the seed and the step (seed_rank), which `log` reports."""
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
# preemption: a stop signal ends the run at the next step boundary, with a checkpoint

# sysexits.h's EX_TEMPFAIL, "try again later": the run was stopped by a signal after writing its
# checkpoint (or, while encoding latents, its finished shards); run the same command with
# --resume true (the cache build needs no flag) to continue where it stopped
EXIT_STOPPED = 75
# SIGTERM: what schedulers (SLURM, Kubernetes) send before they kill a job, and what torchrun passes
# on to its workers when it is sent SIGTERM or SIGINT; SIGUSR1: SLURM's --signal=USR1@seconds
# warning; SIGINT: Ctrl-C
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class Stopped(Exception):
    """Raised inside work that a stop signal gives up (StepGuard.given_up_at_stop)."""


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

    def pending(self):
        """True once this process received a stop signal (see StepGuard.given_up_at_stop)."""
        return self.received is not None

    def flag(self, device):
        """1.0 if this process received a stop signal, as a tensor to all-reduce with the step's
        other flags."""
        # torch.full fills on the device; torch.tensor would copy a host value over every step
        return torch.full((), float(self.received is not None), device=device)


class StepGuard:
    """What the training loops ask after each backward pass: may this step's update reach the
    weights, and does the run stop after it? A non-finite loss or gradient (too high a learning
    rate, a bad batch) must never reach the weights, the optimizer state, the EMA or a checkpoint:
    that step is skipped and counted, and `max_in_a_row` skipped steps in a row stop the run
    without saving. Every rank decides alike: the gradient norm is of the all-reduced gradients,
    and one all-reduce sums the loss check over the ranks together with the stop flag (a stop
    signal on any rank: every rank saves and stops after this step).

    With a fused optimizer (the trainers' AdamW on CUDA) the decision stays on the device, so the
    GPU never waits for the host: the optimizer skips its own update through `found_inf` (as AMP's
    gradient scaler has it do), the EMA through ema_decay, and the counts and the stop flag are
    read back only every `check_every` steps and at `last_step` (a stop signal then ends the run
    within check_every steps). Elsewhere reading a flag costs nothing and it is read every step."""

    def __init__(self, stop, dist, max_in_a_row, ckpt_path, hint, optimizer=None, check_every=1,
                 last_step=0):
        self.stop, self.dist, self.max_in_a_row, self.ckpt_path = (
            stop, dist, max_in_a_row, ckpt_path)
        # the end of the message that stops the run, e.g. "Lower --lr or check the data."
        self.hint = hint
        self.skipped = 0  # steps skipped since the last log row (take_skipped)
        self.in_a_row = 0
        self.stopping = False  # a stop signal reached some rank: save after this step and exit
        self.optimizer, self.check_every, self.last_step = optimizer, check_every, last_step
        self.on_device = (optimizer is not None
                          and any(g.get("fused") for g in optimizer.param_groups))
        # (skipped, in a row, the most in a row since the last check) as device tensors
        if self.on_device:
            self.counts = torch.zeros(3, device=dist.device)
            self.bad = torch.zeros((), dtype=torch.bool, device=dist.device)

    def update_ok(self, loss, grad_norm, step):
        """True if the step from `step` to step + 1 may update the weights; raises SystemExit after
        max_in_a_row non-finite steps in a row. `loss`: this rank's mean loss, a 0-dim tensor. On
        the device path it is always True: the update then skips itself (found_inf, ema_decay)."""
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
        # the fused AdamW step leaves weights and state alone
        self.optimizer.found_inf = self.bad.float()
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
        """The EMA's decay for this step: `decay`, or on the device path 1 (no change) where the
        step was skipped, as a 0-dim device tensor (no host sync)."""
        if not self.on_device:
            return decay
        return torch.where(self.bad, torch.ones((), device=self.bad.device),
                           torch.full((), decay, device=self.bad.device))

    def take_skipped(self):
        """The steps skipped since the last call (for the log row), the same on every rank."""
        n, self.skipped = self.skipped, 0
        return n

    @contextmanager
    def given_up_at_stop(self, what, log, *modules):
        """Around work between steps that a stop signal should not hold up past a scheduler's grace
        period (a grid's decode: up to --decode-steps passes of a network): each call of one of
        `modules` first asks whether a stop signal came, and if one did the work is given up, the
        log says that `what` was skipped, and the loop goes on to save and stop. The models know
        nothing of it: a forward pre-hook does the asking while the block runs."""

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
        """End the process after a stop signal, the checkpoint of `step` saved: --resume continues
        bit-identically from it."""
        common.close_bars()
        by = self.stop.received or "a stop signal to another rank"
        log(f"stopped by {by} after step {step}: saved {self.ckpt_path}. Run the same command with "
            f"--resume true to continue (exit status {EXIT_STOPPED})")
        common.shutdown(self.dist, EXIT_STOPPED)


def loader_worker_init(worker_id=None):
    """DataLoader worker_init_fn. A loading process ignores the stop signals (Ctrl-C and SLURM send
    them to every process), so that the trainer can finish its step with them. A worker still ends
    with its trainer: at the loader's shutdown, or by its watchdog when the trainer is gone (seconds
    later). And it closes its copy of the run folder's lock (forked with the trainer's open files):
    a flock lives while any copy is open, so a killed trainer's folder would stay locked until
    then."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    for fh in _held.values():
        fh.close()
    _held.clear()


# -----------------------------------------------------------------------------
# pretrained weight files (VGG16 + LPIPS heads, InceptionV3)


def load_weight_file(path, flag, url):
    """A pretrained weight file as a dict of tensors, or one line (ValueError) naming it: a file
    that is truncated, not a PyTorch file, or a pickle of other objects (weights_only refuses to run
    its code; torch's advice to load it with weights_only=False is never passed on)."""
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
    """load(): fill a network from a weight file, whose failure (another network's weights, shapes
    that differ) is one line naming the file."""
    try:
        return load()
    except (RuntimeError, KeyError, ValueError) as e:
        lines = [line.strip().rstrip(".") for line in str(e).strip().splitlines() if line.strip()]
        first = (lines[1] if len(lines) > 1 and lines[0].endswith(":") else
                 lines[0] if lines else type(e).__name__)[:160]
        raise ValueError(f"{flag} {path}: not the published weights of this network ({first}); "
                         f"download the published file from {url}") from None


def find_weights(path, filename, url, flag, env_var, required=True):
    """Resolve a pretrained weight file: `path` if given (not ""), else $env_var, else
    $DGAE_WEIGHTS/filename.

    $DGAE_WEIGHTS defaults to ./weights. Nothing is ever downloaded: if the file is missing and
    required, the error says which file, where it is published and how to point us at it.
    """
    candidate = (path or os.environ.get(env_var)
                 or os.path.join(os.environ.get("DGAE_WEIGHTS", "weights"), filename))
    if os.path.isfile(candidate):
        return candidate
    if not required and not path:  # a path the user typed must exist, even for an optional file
        return None
    raise FileNotFoundError(
        f"pretrained weight file {filename} not found (looked at {candidate}). Download it once "
        f"from {url} and pass its path with {flag} PATH, or set {env_var}=PATH, or put it in "
        "$DGAE_WEIGHTS (default ./weights/)."
    )
