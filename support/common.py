"""
Plumbing shared by every script: command-line settings, devices and precision, torch.distributed
start-up and shutdown. How a run is saved, stopped and resumed is in checkpoints.py; the training
steps are written out in train_ae.py and train_dit.py. A reader of the method can skip this file.
"""

import datetime
import errno
import json
import math
import os
import re
import sys
import tempfile
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist
from tqdm import tqdm

# -----------------------------------------------------------------------------
# settings: plain variables at the top of each script, overridden from the command line


def _parse_like(value, default, name):
    """The command-line string `value` as the type of the setting's default. A default of None ("the
    preset's") takes the value as written: a whole number, else a number, else the text."""
    if default is None:
        for kind in (int, float):
            try:
                return kind(value)
            except ValueError:
                pass
        return value
    if isinstance(default, bool):
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
        raise SystemExit(f"error: --{name} takes true or false, got {value!r}")
    try:
        return type(default)(value)
    except ValueError:
        kind = {"int": "a whole number", "float": "a number"}.get(type(default).__name__,
                                                                  type(default).__name__)
        raise SystemExit(f"error: --{name} takes {kind}, got {value!r}") from None


def setting_comments(path):
    """{name: comment} for each `name = value  # comment` line at the top level of the script at
    `path`: --help prints the comment beside each setting, so a setting's one line of documentation
    lives next to its default and nowhere else."""
    notes = {}
    try:
        lines = open(path).read().splitlines()
    except OSError:
        return notes
    for line in lines:
        # the last "  # ": a string may hold one
        m = re.match(r"([a-z_][a-z0-9_]*) = .*  # (.*)$", line)
        if m:
            notes[m.group(1)] = m.group(2)
    return notes


def settings_block(namespace):
    """The settings a script defines at its top (pass `globals()` right after the block): lower-case
    names with a bool, int, float, str or None default, not _private names, not CONSTANTS. Taken
    once at import, so that every call of the script's main() starts from these defaults."""
    settings = {k: v for k, v in namespace.items()
                if not k.startswith("_") and not k.isupper()
                and (v is None or isinstance(v, (bool, int, float, str)))}
    return dict(settings, __file__=namespace.get("__file__", ""))


def configure(defaults, argv=None):
    """The settings of one run: `defaults` (common.settings_block) overridden by `--name value` or
    `--name=value` arguments, each parsed to the type of its default (`--compression 32` is an int,
    `--compile false` a bool); `--latent-channels` sets latent_channels. `defaults` is not changed.
    Returns (every setting, as a checkpoint records them; the set of names given on the command
    line).
    """
    settings = dict(defaults)
    keys = sorted(k for k, v in settings.items()  # not _private names, not CONSTANTS
                  if not k.startswith("_") and not k.isupper()
                  and (v is None or isinstance(v, (bool, int, float, str))))
    argv = sys.argv[1:] if argv is None else list(argv)
    given = set()
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-h", "--help"):
            notes = setting_comments(settings.get("__file__", ""))
            print("settings (override with --name value; the default, then what it is):")
            width = max(len(f"--{k.replace('_', '-')} {settings[k]!r}") for k in keys)
            for k in keys:
                print(f"  {f'--{k.replace(chr(95), chr(45))} {settings[k]!r}':<{width}}  "
                      f"{notes.get(k, '')}".rstrip())
            sys.exit(0)
        if not arg.startswith("--"):
            raise SystemExit(f"error: unexpected argument {arg!r}; "
                             "settings are given as --name value")
        name, eq, value = arg[2:].partition("=")
        if not eq:  # the value is the next argument
            if i + 1 >= len(argv):
                raise SystemExit(f"error: {arg} needs a value")
            value = argv[i + 1]
            i += 1
        i += 1
        key = name.replace("-", "_")
        if key not in keys:
            raise SystemExit(f"error: unknown setting --{name}; valid settings: "
                             + " ".join("--" + k.replace("_", "-") for k in keys))
        settings[key] = _parse_like(value, settings[key], name)
        given.add(key)
    return {k: settings[k] for k in keys}, given


# Samplers take tens to a few hundred Euler steps; far more only costs time: 100000 steps take
# over ten minutes for one grid, past any scheduler's grace period after SIGTERM.
MAX_EULER_STEPS = 1000
# Classifier-free guidance multiplies the DiT's velocity difference by the scale. Useful scales are
# 1 to 10; one far beyond them leaves float32's range (inf, then NaN: black images, with exit 0).
MAX_GUIDANCE = 100.0

# The kinds of numeric setting check_settings knows: a test on the value, and the valid range as the
# error message states it. NaN fails every comparison, so it is refused by each kind.
SETTING_KINDS = {
    "count": (lambda v: v >= 1, "must be at least 1"),
    "count_or_0": (lambda v: v >= 0, "must be at least 0"),
    "positive": (lambda v: math.isfinite(v) and v > 0, "must be a finite number above 0"),
    "non_negative": (lambda v: math.isfinite(v) and v >= 0, "must be a finite number at least 0"),
    "fraction": (lambda v: 0 <= v < 1, "must be in [0, 1)"),
    "finite": (lambda v: math.isfinite(v), "must be a finite number"),
    "steps": (lambda v: 1 <= v <= MAX_EULER_STEPS, f"must be from 1 to {MAX_EULER_STEPS}"),
    "guidance": (lambda v: abs(v) <= MAX_GUIDANCE,
                 f"must be a number from -{MAX_GUIDANCE:g} to {MAX_GUIDANCE:g}"),
}


WHOLE_KINDS = ("count", "count_or_0", "steps")


def auto_flag(value, name, auto):
    """A setting of true | false | auto as a bool; auto gives `auto`. A resumed run may hold a
    bool."""
    text = str(value).lower()
    if text not in ("auto", "true", "false"):
        raise SystemExit(f"error: --{name.replace('_', '-')} takes auto, true or false, got "
                         f"{value!r}")
    return auto if text == "auto" else text == "true"


def channels_last_on(setting, device):
    """--channels-last true | false | auto: on the CPU NHWC convolutions are faster (docs/NOTES.md);
    on CUDA PyTorch's GroupNorm reads its input NCHW-contiguous (a copy into every norm, and NCHW
    out of it), so auto is off there."""
    return auto_flag(setting, "channels_last", device.type != "cuda")


def default_workers(settings):
    """--num-workers -1, resolved in `settings`: for an image folder (--data) up to 8 loading
    processes per rank, bounded by this rank's share of the cores (JPEG decoding in the trainer
    would starve the GPU); 0 on the built-in data, which is drawn in the process."""
    if settings["num_workers"] == -1:
        per_rank = (os.cpu_count() or 1) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        settings["num_workers"] = max(0, min(8, per_rank - 1)) if settings["data"] else 0
    return settings


# Upper bounds of sizes, for at_most: past them a setting only allocates without end (a 65536 px
# image, 10^12 built-in images) or outlives any job (a collective timeout of 10^14 s overflows).
MAX_SIZE = 10**8  # images in a dataset
MAX_RESOLUTION = 4096  # px
MAX_SECONDS = 7 * 24 * 3600  # a week
MAX_SAMPLES = 200_000  # samples into one .npz (the FID protocol takes 50,000)
# Images (or latents) one process holds in one forward pass, and micro-batches summed into one step:
# the largest batch that fits 80 GB is 1433 at 64 px (README), so 2^16 is far past any real one;
# 10^9 made bench.py ask for 12 TB of random images and eval.py put a whole folder into one forward
# pass.
MAX_BATCH = 65_536
# data-loading processes per process: more than any machine has cores; each is a process
MAX_WORKERS = 256
# optimizer steps of one run (the DiT-XL recipe takes 4 x 10^5; at 10 steps/s 10^8 is 4 months)
MAX_STEPS = 10**8
# seeds: numpy's range; derived seeds (seed x 1000 + rank, seed + image index) stay in torch's
MAX_SEED = 2**32 - 1
# sample.py: samples of a class in one grid row (256 of 256 px make a 66,000 px wide PNG)
MAX_GRID_ROW = 256
# bench.py: untimed and timed repetitions, timed data batches (a median of 10^4 is exact enough)
MAX_REPEATS = 10_000
# bench.py: tokens of an attention row; 4x the longest sequence of any preset (f=4 latents at
# 256 px, patch 1: 4096), where the math kernel already holds batch x heads x 2^28 scores
MAX_SEQUENCE = 16_384
# bench.py: n of the n x n peak matmul (two 4 GiB float32 operands; 10^6 would be 4 TB each)
MAX_MATMUL = 32_768


def check_settings(settings, choices=None, at_most=None, **kinds):
    """Refuse a setting out of its range, before any work, with one line naming the flag.

    `kinds` maps a kind of SETTING_KINDS to the names of the settings of that kind, e.g.
    check_settings(settings, count=("max_steps", "grad_accum"), fraction=("ema_decay",)). A step
    count of 0 or a NaN guidance scale would otherwise run, and write noise or nothing with exit 0.
    choices: {name: the values it may take}; at_most: {name: its largest value}.
    """
    for kind, names in kinds.items():
        ok, valid = SETTING_KINDS[kind]
        for name in names:
            value, flag = settings[name], "--" + name.replace("_", "-")
            if value is None:  # the preset's, checked once resolved
                continue
            # a setting whose default is None takes what was typed: its type is checked here
            if kind in WHOLE_KINDS and type(value) is not int:
                raise SystemExit(f"error: {flag} takes a whole number, got {value!r}")
            if type(value) not in (int, float):
                raise SystemExit(f"error: {flag} takes a number, got {value!r}")
            if not ok(value):
                raise SystemExit(f"error: {flag} {valid}, got {value}")
    for name, allowed in (choices or {}).items():
        if settings[name] not in allowed:
            shown = ", ".join(repr(a) if a == "" else str(a) for a in allowed if a is not None)
            raise SystemExit(f"error: --{name.replace('_', '-')} must be one of {shown}, got "
                             f"{settings[name]!r}")
    for name, limit in (at_most or {}).items():
        if settings[name] is not None and not settings[name] <= limit:
            raise SystemExit(f"error: --{name.replace('_', '-')} must be at most {limit}, got "
                             f"{settings[name]}")


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


def writable_file(path, flag, also=()):
    """Refuse, at start-up, an output file that could not be written at the end: a folder given as
    the file (or a name ending in a slash), a path under a file, a folder without write permission.
    `also`: the files written beside it (eval.py's .txt table). Its folder is created if missing;
    what a link points to is checked, since the write goes through the link
    (checkpoints.atomic_write)."""
    for p in (path, *also):
        if p.endswith(os.sep) or os.path.isdir(p):
            raise SystemExit(f"error: {flag} {path}: {p} is a folder, where a file is to be "
                             "written; name a file (in that folder or elsewhere)")
    writable_dir(os.path.dirname(os.path.realpath(path)), f"{flag} {path}: its folder")


def refuse_out_dir_in_data(out_dir, data):
    """Refuse an --out-dir that is the --data folder or inside it: the run's own image grids would
    be read as training images (and more of them after each resume)."""
    if not data:
        return
    inside = os.path.realpath(data)
    if os.path.commonpath([inside, os.path.realpath(out_dir)]) == inside:
        raise SystemExit(f"error: --out-dir {out_dir} is inside --data {data}, so the run's image "
                         "grids would become training images; choose an --out-dir outside the "
                         "data folder")


def json_line(row):
    """A log row as one line of strict JSON: a non-finite number (a skipped NaN step) is written as
    null, since the bare NaN that json.dumps writes is refused by strict JSON readers."""
    return json.dumps({k: None if isinstance(v, float) and not math.isfinite(v) else v
                       for k, v in row.items()})


class StepLog:
    """The training log: a row every --log-every steps, one JSON object per line in `path` (rank 0
    writes it: easy to tail, grep and load) and the same figures on the progress bar."""

    def __init__(self, path, dist, pbar, images_per_step, first_step):
        self.path, self.dist, self.pbar, self.images_per_step = path, dist, pbar, images_per_step
        self.first_step, self.t0 = first_step, time.time()
        # one row per step: a new run starts an empty log, a resumed one drops the rows written
        # after its checkpoint (by a run killed later)
        if dist.master:
            from support.checkpoints import write_text

            kept = []
            if first_step > 0 and os.path.exists(path):
                for line in open(path):
                    try:
                        if json.loads(line)["step"] <= first_step:
                            kept.append(line if line.endswith("\n") else line + "\n")
                    # a row cut short by a full disk: dropped
                    except (ValueError, KeyError, TypeError):
                        pass
            if kept:
                write_text(path, "".join(kept))
            elif os.path.exists(path):  # the log appears with its first row, as a fresh run's does
                os.remove(path)

    def write(self, step, means, counts=(), **values):
        """means: {name: 0-dim tensor}, this rank's mean over its micro-batches, averaged over the
        ranks so that the row describes the whole global batch; counts: {name: number}, summed over
        the ranks (one all-reduce for both); values: {name: number}, the same on every rank."""
        counts = dict(counts)
        dev = self.dist.device
        vals = all_reduce_sum(torch.stack([*(v.float() for v in means.values()),
                                           *(torch.tensor(float(v), device=dev)
                                             for v in counts.values())]), self.dist)
        row = {k: v.item() for k, v in zip(means, vals[:len(means)] / self.dist.world_size)}
        row.update({k: v.item() for k, v in zip(counts, vals[len(means):])})
        row.update(step=step,
                   **{k: v.item() if torch.is_tensor(v) else v for k, v in values.items()},
                   img_per_s=(step - self.first_step) * self.images_per_step
                             / (time.time() - self.t0))
        # the row in one write; one that fails (a full disk) is taken back whole
        if self.dist.master:
            data = (json_line(row) + "\n").encode()
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
            size = os.fstat(fd).st_size
            try:
                if os.write(fd, data) != len(data):
                    raise OSError(errno.ENOSPC, "short write")
            except OSError as e:
                os.ftruncate(fd, size)
                close_bars()
                raise SystemExit(f"error: could not write {self.path} ({e.strerror or e}); the "
                                 "rows before this step are kept. Free some space and run again "
                                 "with --resume true.") from None
            finally:
                os.close(fd)
        self.pbar.set_postfix({k: f"{row[k]:.4g}" for k in (*means, "img_per_s", "skipped_steps")
                               if k in row})


@contextmanager
def bars_closed_first():
    """Close the open progress bars before an error that ends the script is printed (a full disk at
    a save, an unreadable data folder mid-run), so that its one-line message stands on a line of its
    own instead of at the end of the bar's."""
    try:
        yield
    except BaseException:
        close_bars()
        raise


def close_bars():
    """Close every open progress bar, so that the next line printed stands on a line of its own."""
    for bar in list(tqdm._instances):
        bar.close()


@contextmanager
def user_errors():
    """Report the errors of bad input (a missing folder or file, an impossible flag, a checkpoint
    of the wrong kind) as one line saying what is wrong, instead of a traceback. With DGAE_DEBUG=1
    in the environment the error goes on with its full traceback: a ValueError raised by a bug in
    code you changed is then not mistaken for a bad input."""
    try:
        yield
    except (FileNotFoundError, ValueError) as e:
        if os.environ.get("DGAE_DEBUG", "") not in ("", "0"):
            raise
        raise SystemExit(f"error: {e} (DGAE_DEBUG=1 shows the traceback)") from None


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


def launch_rank():
    """This process's rank as torchrun set it (0 when run alone), known before torch.distributed
    starts."""
    rank = os.environ.get("RANK", "0")
    return int(rank) if rank.isdigit() else 0  # a malformed RANK is refused by setup_distributed


def available_devices():
    """The --device values this machine can run on."""
    found = ["cpu"]
    if torch.cuda.is_available():
        found += ["cuda"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        found.append("mps")
    return found


def check_device(device):
    """Refuse a --device that this machine does not have, or a misspelt one, in one line that lists
    those it has; "" (the first of cuda, mps, cpu that it has) always passes. Called before any
    work: torch would fail only at the first tensor moved there, with a traceback."""
    if device and device not in available_devices():
        raise SystemExit(f"error: --device {device} is not available on this machine, which has: "
                         f"{', '.join(available_devices())}; pass one of those, or leave --device "
                         "out to pick one")


def default_device():
    has_mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    return "cuda" if torch.cuda.is_available() else "mps" if has_mps else "cpu"


def use_deterministic_kernels(on):
    """--deterministic: kernels that give the same bits on every run, so a resumed CUDA run
    continues bit-for-bit (on the CPU it always does). cuBLAS needs CUBLAS_WORKSPACE_CONFIG before
    its first matmul; cuDNN gives up autotuning and its nondeterministic convolution backward; an op
    with no deterministic CUDA kernel warns (warn_only) rather than stopping a week-long run. Costs
    speed."""
    if not on:
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    torch.use_deterministic_algorithms(True, warn_only=True)


def setup_distributed(device="", timeout=600, deterministic=False):
    """Start torch.distributed when torchrun set RANK / LOCAL_RANK / WORLD_SIZE, else run as a
    single process: the same script runs on a laptop, one GPU or many nodes (NCCL on GPUs, gloo on
    CPU).

    `timeout`: seconds a rank waits in a collective (all-reduce, barrier) for the others. Without it
    one stopped or hung rank leaves every other waiting for ever; with it the job ends (gloo raises,
    see collective_timeouts; NCCL's watchdog ends the process with a "[Rank k] ... timeout"
    message)."""
    check_device(device)
    use_deterministic_kernels(deterministic)
    device = device or default_device()
    seconds, timeout = timeout, datetime.timedelta(seconds=timeout)
    if "RANK" not in os.environ:
        return Dist(False, 0, 0, 1, torch.device(device), True)
    missing = [v for v in ("LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
               if v not in os.environ]
    bad = [v for v in ("RANK", "LOCAL_RANK", "WORLD_SIZE")
           if v in os.environ and not os.environ[v].isdigit()]
    problems = (([f"{', '.join(missing)} not set"] if missing else [])
                + ([f"{', '.join(bad)} not a whole number"] if bad else []))
    if problems:
        raise SystemExit(f"error: RANK is set, so this is a distributed launch, but "
                         f"{' and '.join(problems)}; start it with torchrun (which sets them all), "
                         "or unset RANK to run one process")
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ["LOCAL_RANK"])
    world = int(os.environ["WORLD_SIZE"])
    if device.startswith("cuda"):
        if local_rank >= torch.cuda.device_count():
            raise SystemExit(f"error: process {local_rank} of this node needs GPU {local_rank}, "
                             f"but it sees {torch.cuda.device_count()} GPU(s) "
                             "(CUDA_VISIBLE_DEVICES: "
                             f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); start at most "
                             "that many processes per node (--nproc_per_node)")
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device(device)
    # Every rank first meets at rank 0's store (MASTER_ADDR:MASTER_PORT) and waits up to `timeout`
    # for the others there: a process that never started (a node not launched, a wrong WORLD_SIZE or
    # MASTER_ADDR) ends in torch's DistError after that wait, which becomes one line saying who is
    # missing and what to check.
    try:
        if dev.type == "cuda":
            torch_dist.init_process_group("nccl", device_id=dev, timeout=timeout)
        else:
            torch_dist.init_process_group("gloo", timeout=timeout)
    except torch_dist.DistError as e:
        if os.environ.get("DGAE_DEBUG", "") not in ("", "0"):
            raise
        raise SystemExit(group_not_formed(e, rank, world, seconds)) from None
    return Dist(True, rank, local_rank, world, dev, rank == 0)


def group_not_formed(error, rank, world, seconds):
    """The one line for a process group that could not be formed (setup_distributed), from torch's
    error: rank 0's store waited `seconds` and not every rank joined ("1/2 clients joined"), another
    rank could not reach that store, or rank 0 could not open it (the port is taken)."""
    detail = re.sub(r"^\[[^\]]*\] ", "",
                    str(error).splitlines()[0] if str(error) else type(error).__name__)[:200]
    store = (f"MASTER_ADDR:MASTER_PORT {os.environ.get('MASTER_ADDR')}:"
             f"{os.environ.get('MASTER_PORT')}")
    joined = re.search(r"(\d+)/(\d+) clients joined", detail)
    check = (f"check that all {world} processes were started (every node, --nnodes and "
             f"--nproc_per_node agree with WORLD_SIZE {world}) and that {store} reaches rank 0, or "
             f"raise --dist-timeout ({seconds:g} s now)")
    if "EADDRINUSE" in detail or "address already in use" in detail.lower():
        return (f"error: rank {rank} of {world}: {store} is in use by another process on this node "
                f"({detail}); choose a free MASTER_PORT (torchrun --master-port) or end the "
                "process that holds it")
    if joined:
        missing = world - int(joined.group(1))
        who = f"rank {1 - rank} of {world}" if world == 2 else f"{missing} of the {world} processes"
        return (f"error: rank {rank} of {world}: {who} never joined within {seconds:g} s "
                f"({detail}); {check}")
    if "timed out" in detail.lower():
        return (f"error: rank {rank} of {world}: rank 0 could not be reached at {store} within "
                f"{seconds:g} s ({detail}); {check}")
    return (f"error: rank {rank} of {world}: the process group could not be formed ({detail}); "
            f"{check}")


@contextmanager
def collective_timeouts():
    """Report a collective that failed because of another rank as one line naming this rank, instead
    of gloo's traceback: one that timed out (a rank stopped responding: see setup_distributed's
    timeout), or one whose peer ended (it stopped on an error or a signal, with a message of its
    own)."""
    try:
        yield
    except RuntimeError as e:
        message = str(e)
        from_backend = isinstance(e, torch_dist.DistBackendError) or "gloo" in message
        timed_out = "timed out" in message.lower()
        if ("RANK" not in os.environ or not from_backend
                or not (timed_out or "closed by peer" in message)):
            raise
        # without gloo's source path
        detail = re.sub(r"^\[[^\]]*\] ", "", message.splitlines()[0])[:200]
        why = ("timed out ({}): another rank stopped responding (stopped, hung or on a lost host). "
               "The job ends; resume it with --resume true. --dist-timeout sets the limit."
               if timed_out else
               "failed ({}): another rank ended; its own message says why. The job ends.")
        raise SystemExit(f"error: rank {os.environ['RANK']} of {os.environ['WORLD_SIZE']}: a "
                         "collective operation " + why.format(detail)) from None


def barrier(dist):
    """Wait until every rank gets here (e.g. until rank 0 has written a file the others read)."""
    if dist.ddp:
        torch_dist.barrier()


def all_reduce_sum(t, dist):
    """Sum a tensor over ranks, in place; every rank gets the total."""
    if dist.ddp:
        torch_dist.all_reduce(t, op=torch_dist.ReduceOp.SUM)
    return t


def exit_now(dist, status):
    """Leave at once with `status`: a single process with SystemExit; a DDP worker with os._exit,
    which skips the interpreter's teardown, where gloo can abort (shutdown, below, says more)."""
    if not dist.ddp:
        raise SystemExit(status)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def shutdown(dist, status=0):
    """End the process with exit status `status` (0: done; EXIT_STOPPED: stopped by a signal,
    saved), so that a DDP worker cannot crash on the way out.

    With gloo on CPU, a worker that simply returns intermittently aborts in the interpreter's
    teardown ("terminate called without an active exception"). So every rank waits for the others,
    destroys the process group, flushes its output and leaves with os._exit, skipping that
    teardown. Everything worth keeping was written before.
    """
    if dist.ddp:
        torch_dist.barrier()
        torch_dist.destroy_process_group()
    if dist.ddp or status:  # a single process that is done simply returns
        exit_now(dist, status)


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
