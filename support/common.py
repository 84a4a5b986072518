"""
Plumbing shared by every script: command-line settings, devices and precision, torch.distributed
start-up and shutdown. How a run is saved, stopped and resumed is in checkpoints.py. A reader of the
method can skip this file.
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


def flag_of(name):
    """The command-line flag of a setting: batch_size -> --batch-size."""
    return "--" + name.replace("_", "-")


def _is_setting(name, value):
    """Lower-case names with a bool, int, float, str or None value; not _private, not CONSTANTS."""
    return (not name.startswith("_") and not name.isupper()
            and (value is None or isinstance(value, (bool, int, float, str))))


def _parse_like(value, default, name):
    """The command-line text `value` as the type of the setting's default. A default of None (the
    preset's) takes a whole number, else a number, else the text."""
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
        kind = {int: "a whole number", float: "a number"}.get(type(default), type(default).__name__)
        raise SystemExit(f"error: --{name} takes {kind}, got {value!r}") from None


def setting_comments(path):
    """{name: comment} for each top-level `name = value  # comment` line of the script at `path`:
    --help prints it, so a setting's documentation lives beside its default and nowhere else."""
    try:
        lines = open(path).read().splitlines()
    except OSError:
        return {}
    # the last "  # ": a string may hold one
    found = (re.match(r"([a-z_][a-z0-9_]*) = .*  # (.*)$", line) for line in lines)
    return {m.group(1): m.group(2) for m in found if m}


def settings_block(namespace):
    """The settings a script defines at its top (pass `globals()` right after the block). Taken once
    at import, so that every call of the script's main() starts from these defaults."""
    settings = {k: v for k, v in namespace.items() if _is_setting(k, v)}
    return dict(settings, __file__=namespace.get("__file__", ""))


def configure(defaults, argv=None):
    """`defaults` overridden by `--name value` or `--name=value`, each parsed to its default's type
    (--latent-channels sets latent_channels). Returns (every setting; the set of names given)."""
    settings = dict(defaults)
    keys = sorted(k for k, v in settings.items() if _is_setting(k, v))
    args = iter(sys.argv[1:] if argv is None else argv)
    given = set()
    for arg in args:
        if arg in ("-h", "--help"):
            notes = setting_comments(settings.get("__file__", ""))
            print("settings (override with --name value; the default, then what it is):")
            shown = {k: f"{flag_of(k)} {settings[k]!r}" for k in keys}
            width = max(len(s) for s in shown.values())
            for k in keys:
                print(f"  {shown[k]:<{width}}  {notes.get(k, '')}".rstrip())
            sys.exit(0)
        if not arg.startswith("--"):
            raise SystemExit(f"error: unexpected argument {arg!r}; "
                             "settings are given as --name value")
        name, eq, value = arg[2:].partition("=")
        if not eq:  # the value is the next argument
            value = next(args, None)
            if value is None:
                raise SystemExit(f"error: {arg} needs a value")
        key = name.replace("-", "_")
        if key not in keys:
            raise SystemExit(f"error: unknown setting --{name}; valid settings: "
                             + " ".join(flag_of(k) for k in keys))
        settings[key] = _parse_like(value, settings[key], name)
        given.add(key)
    return {k: settings[k] for k in keys}, given


# Samplers take tens to a few hundred Euler steps; 10^5 steps outlast a scheduler's SIGTERM grace.
MAX_EULER_STEPS = 1000
# Useful guidance scales are 1 to 10; far beyond, float32 overflows (NaN: black images, exit 0).
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

# Upper bounds of sizes, for check_settings' at_most: past them a setting only allocates without end
# (a 65536 px image, 10^12 built-in images) or outlives any job.
MAX_SIZE = 10**8  # images in a dataset
MAX_RESOLUTION = 4096  # px
MAX_SECONDS = 7 * 24 * 3600  # a week
MAX_SAMPLES = 200_000  # samples into one .npz (the FID protocol takes 50,000)
# images (or latents) in one forward pass, and micro-batches in one step: 80 GB holds 1433 at 64 px
MAX_BATCH = 65_536
MAX_WORKERS = 256  # data-loading processes per process: more than any machine has cores
MAX_STEPS = 10**8  # optimizer steps of one run (the DiT-XL recipe takes 4 x 10^5)
# seeds: numpy's range; derived seeds (seed x 1000 + rank, seed + image index) stay in torch's
MAX_SEED = 2**32 - 1
MAX_GRID_ROW = 256  # sample.py: samples of a class in one grid row (256 of 256 px: 66,000 px wide)
MAX_REPEATS = 10_000  # bench.py: untimed and timed repetitions, timed data batches
# bench.py: tokens of an attention row; 4x the longest sequence of any preset (f=4 at 256 px: 4096)
MAX_SEQUENCE = 16_384
MAX_MATMUL = 32_768  # bench.py: n of the n x n peak matmul (two 4 GiB float32 operands)


def auto_flag(value, name, auto):
    """A true | false | auto setting (or a resumed run's bool) as a bool; auto gives `auto`."""
    text = str(value).lower()
    if text not in ("auto", "true", "false"):
        raise SystemExit(f"error: {flag_of(name)} takes auto, true or false, got {value!r}")
    return auto if text == "auto" else text == "true"


def channels_last_on(setting, device):
    """--channels-last: auto is on for the CPU, where NHWC convolutions are faster, and off on CUDA,
    where PyTorch's GroupNorm would copy its input back to NCHW in every norm."""
    return auto_flag(setting, "channels_last", device.type != "cuda")


def default_workers(settings):
    """--num-workers -1 resolved in `settings`: 0 on the built-in data (drawn in the process); for
    --data up to 8 loaders within this rank's cores, so that JPEG decoding cannot starve the GPU."""
    if settings["num_workers"] == -1:
        per_rank = (os.cpu_count() or 1) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        settings["num_workers"] = max(0, min(8, per_rank - 1)) if settings["data"] else 0
    return settings


def check_settings(settings, choices=None, at_most=None, **kinds):
    """Refuse a setting out of its range, before any work, in one line naming the flag. `kinds`:
    {kind of SETTING_KINDS: names}, e.g. count=("max_steps",); choices: {name: the values it may
    take}; at_most: {name: its largest value}."""
    for kind, names in kinds.items():
        ok, valid = SETTING_KINDS[kind]
        for name in names:
            value, flag = settings[name], flag_of(name)
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
            raise SystemExit(f"error: {flag_of(name)} must be one of {shown}, "
                             f"got {settings[name]!r}")
    for name, limit in (at_most or {}).items():
        if settings[name] is not None and not settings[name] <= limit:
            raise SystemExit(f"error: {flag_of(name)} must be at most {limit}, "
                             f"got {settings[name]}")


def writable_dir(path, flag):
    """Create the folder `path` if needed and prove that a file can be written in it, so that a run
    is refused at start-up rather than after hours of work with nowhere to save it."""
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write_test_"):
            pass
    except OSError as e:
        raise SystemExit(f"error: {flag} {path}: cannot write there ({e.strerror or e}); "
                         "choose a folder you can write to") from None


def writable_file(path, flag, also=()):
    """Refuse, at start-up, an output file that could not be written at the end: a folder in its
    place (or in that of a file of `also`, written beside it), a path under a file, a folder without
    write permission. The folder is created if missing; a link is checked where it points."""
    for p in (path, *also):
        if p.endswith(os.sep) or os.path.isdir(p):
            raise SystemExit(f"error: {flag} {path}: {p} is a folder, where a file is to be "
                             "written; name a file (in that folder or elsewhere)")
    writable_dir(os.path.dirname(os.path.realpath(path)), f"{flag} {path}: its folder")


def refuse_out_dir_in_data(out_dir, data):
    """Refuse an --out-dir in the --data folder, whose image grids would become training images."""
    inside = os.path.realpath(data) if data else None
    if inside and os.path.commonpath([inside, os.path.realpath(out_dir)]) == inside:
        raise SystemExit(f"error: --out-dir {out_dir} is inside --data {data}, so the run's image "
                         "grids would become training images; choose an --out-dir outside the "
                         "data folder")


def json_line(row):
    """A log row as one line of strict JSON: a non-finite number (a skipped NaN step) is written as
    null, since strict JSON readers refuse the bare NaN of json.dumps."""
    return json.dumps({k: None if isinstance(v, float) and not math.isfinite(v) else v
                       for k, v in row.items()})


class StepLog:
    """The training log: a row every --log-every steps, one JSON object per line in `path` (written
    by rank 0) and the same figures on the progress bar."""

    def __init__(self, path, dist, pbar, images_per_step, first_step):
        self.path, self.dist, self.pbar, self.images_per_step = path, dist, pbar, images_per_step
        self.first_step, self.t0 = first_step, time.time()
        if not dist.master:
            return
        # one row per step: a new run starts with no log, a resumed one drops the rows written after
        # its checkpoint (by a run killed later) and a row cut short by a full disk
        kept = []
        if first_step > 0 and os.path.exists(path):
            for line in open(path):
                try:
                    if json.loads(line)["step"] <= first_step:
                        kept.append(line if line.endswith("\n") else line + "\n")
                except (ValueError, KeyError, TypeError):
                    pass
        if kept:
            from support.checkpoints import write_text

            write_text(path, "".join(kept))
        elif os.path.exists(path):  # the log appears with its first row, as a fresh run's does
            os.remove(path)

    def write(self, step, means, counts=(), **values):
        """means: {name: 0-dim tensor}, this rank's mean, averaged over the ranks so that the row
        describes the global batch; counts: {name: number}, summed over the ranks (one all-reduce
        for both); values: {name: number}, the same on every rank."""
        counts = dict(counts)
        local = [v.float() for v in means.values()]
        local += [torch.tensor(float(v), device=self.dist.device) for v in counts.values()]
        vals = all_reduce_sum(torch.stack(local), self.dist)
        row = {k: v.item() for k, v in zip(means, vals[:len(means)] / self.dist.world_size)}
        row.update({k: v.item() for k, v in zip(counts, vals[len(means):])})
        row["step"] = step
        row.update({k: v.item() if torch.is_tensor(v) else v for k, v in values.items()})
        row["img_per_s"] = (step - self.first_step) * self.images_per_step / (time.time() - self.t0)
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
    """Close the progress bars before an error that ends the script is printed, so that its one-line
    message stands on a line of its own instead of at the end of the bar's."""
    try:
        yield
    except BaseException:
        close_bars()
        raise


def close_bars():
    for bar in list(tqdm._instances):
        bar.close()


def _debugging():
    """DGAE_DEBUG=1: errors keep their traceback, so that a bug is not mistaken for a bad input."""
    return os.environ.get("DGAE_DEBUG", "") not in ("", "0")


@contextmanager
def user_errors():
    """Report the errors of bad input (a missing file, an impossible flag, a checkpoint of the wrong
    kind) as one line saying what is wrong instead of a traceback, unless DGAE_DEBUG=1."""
    try:
        yield
    except (FileNotFoundError, ValueError) as e:
        if _debugging():
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
    """This process's rank as torchrun set it (0 alone), known before torch.distributed starts."""
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
    """Refuse, before any work, a --device this machine does not have (torch would fail at the first
    tensor moved there, with a traceback); "" (cuda, mps or cpu, what it has) always passes."""
    if device and device not in available_devices():
        raise SystemExit(f"error: --device {device} is not available on this machine, which has: "
                         f"{', '.join(available_devices())}; pass one of those, or leave --device "
                         "out to pick one")


def default_device():
    found = available_devices()
    return next(d for d in ("cuda", "mps", "cpu") if d in found)


def use_deterministic_kernels(on):
    """--deterministic: the same bits on every run, so that a resumed CUDA run continues bit-for-bit
    (slower); an op with no deterministic CUDA kernel warns rather than stopping the run."""
    if not on:
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before cuBLAS's first matmul
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    torch.use_deterministic_algorithms(True, warn_only=True)


def setup_distributed(device="", timeout=600, deterministic=False):
    """Start torch.distributed (NCCL on GPUs, gloo on CPU) when torchrun set RANK, else run as a
    single process. `timeout`: seconds a rank waits in a collective for the others; past it the job
    ends (collective_timeouts; NCCL's watchdog), where one hung rank would leave all waiting."""
    check_device(device)
    use_deterministic_kernels(deterministic)
    device = device or default_device()
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
    rank, local_rank, world = (int(os.environ[v]) for v in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    dev = torch.device(device)
    if device.startswith("cuda"):
        if local_rank >= torch.cuda.device_count():
            raise SystemExit(f"error: process {local_rank} of this node needs GPU {local_rank}, "
                             f"but it sees {torch.cuda.device_count()} GPU(s) "
                             "(CUDA_VISIBLE_DEVICES: "
                             f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); start at most "
                             "that many processes per node (--nproc_per_node)")
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    # Every rank first meets at rank 0's store (MASTER_ADDR:MASTER_PORT) and waits up to `timeout`
    # for the others: a process that never started ends in a DistError, which becomes one line.
    wait = datetime.timedelta(seconds=timeout)
    try:
        if dev.type == "cuda":
            torch_dist.init_process_group("nccl", device_id=dev, timeout=wait)
        else:
            torch_dist.init_process_group("gloo", timeout=wait)
    except torch_dist.DistError as e:
        if _debugging():
            raise
        raise SystemExit(group_not_formed(e, rank, world, timeout)) from None
    return Dist(True, rank, local_rank, world, dev, rank == 0)


def _first_line(message):
    """The first line of a torch.distributed error, without its "[source path] " prefix."""
    return re.sub(r"^\[[^\]]*\] ", "", message.splitlines()[0])[:200]


def group_not_formed(error, rank, world, seconds):
    """The one line for a process group that could not be formed: rank 0's store waited `seconds`
    and not every rank joined, another rank could not reach it, or its port is taken."""
    detail = _first_line(str(error) or type(error).__name__)
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
    """Report a collective that failed because of another rank (it timed out, or its peer ended) as
    one line naming this rank, instead of gloo's traceback."""
    try:
        yield
    except RuntimeError as e:
        message = str(e)
        from_backend = isinstance(e, torch_dist.DistBackendError) or "gloo" in message
        timed_out = "timed out" in message.lower()
        if ("RANK" not in os.environ or not from_backend
                or not (timed_out or "closed by peer" in message)):
            raise
        why = ("timed out ({}): another rank stopped responding (stopped, hung or on a lost host). "
               "The job ends; resume it with --resume true. --dist-timeout sets the limit."
               if timed_out else
               "failed ({}): another rank ended; its own message says why. The job ends.")
        raise SystemExit(f"error: rank {os.environ['RANK']} of {os.environ['WORLD_SIZE']}: a "
                         "collective operation " + why.format(_first_line(message))) from None


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
    """Leave at once with `status`: a single process by SystemExit, a DDP worker by os._exit, which
    skips the interpreter's teardown, where gloo can abort (see shutdown)."""
    if not dist.ddp:
        raise SystemExit(status)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def shutdown(dist, status=0):
    """End the process with `status` (0: done; EXIT_STOPPED: stopped by a signal, saved). With gloo
    a worker that simply returns can abort in the interpreter's teardown ("terminate called without
    an active exception"), so every rank meets, destroys the group and leaves by exit_now."""
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
