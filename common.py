"""
Plumbing shared by every script: command-line settings, devices and precision, torch.distributed
start-up and shutdown, the shared optimisation step and its log, checkpoints, EMA, the learning-rate
schedule, and the lookup of pretrained weight files. (Image grids and datasets live in data.py.)

Nothing here is specific to DGAE; it is the part of train_ae.py / train_dit.py / sample.py /
eval.py that would otherwise be copied between them. Read the training scripts first and come
here when they call something.
"""

import json
import os
import random
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as torch_dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

# -----------------------------------------------------------------------------
# settings: plain variables at the top of each script, overridden from the command line


def configure(settings, argv=None):
    """Override a script's settings in place from `--name value` or `--name=value` arguments.

    `settings` is the dict of the script's top-level variables (pass `globals()`); only names that
    already exist with a bool/int/float/str default can be set, and values are parsed to the type
    of that default, so `--compression 32` gives an int and `--compile false` a bool. Dashes in
    names are read as underscores (`--latent-channels` sets `latent_channels`). Returns the dict
    of all settings, which is what the checkpoint records.
    """
    keys = sorted(k for k, v in settings.items() if not k.startswith("_") and isinstance(v, (bool, int, float, str)))
    argv = sys.argv[1:] if argv is None else list(argv)
    settings["_given"] = set()  # the names set on the command line (e.g. to check them against a checkpoint)
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
        settings["_given"].add(key)
    return {k: settings[k] for k in keys}


def _parse_like(value, default, name):
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
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def setup_distributed(device=""):
    """Start torch.distributed when torchrun set the environment, else run as a single process.

    torchrun exports RANK / LOCAL_RANK / WORLD_SIZE (and MASTER_ADDR/PORT), so the same script runs
    on a laptop, one GPU, or many nodes. NCCL talks between GPUs; gloo is the CPU backend.
    """
    device = device or default_device()
    if "RANK" not in os.environ:
        return Dist(False, 0, 0, 1, torch.device(device), True)
    rank, local_rank, world = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    if device.startswith("cuda"):
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
        torch_dist.init_process_group("nccl", device_id=dev)
    else:
        dev = torch.device(device)
        torch_dist.init_process_group("gloo")
    return Dist(True, rank, local_rank, world, dev, rank == 0)


def shutdown(dist):
    """End a DDP worker so that it cannot crash on the way out.

    With gloo on CPU, a worker that simply returns from the script intermittently aborts in the
    interpreter's teardown ("terminate called without an active exception": gloo's threads die
    while Python destroys objects in no particular order). So every rank waits for the others,
    tears the process group down explicitly, flushes its output, and leaves with os._exit(0),
    which skips the fragile teardown altogether. Everything worth keeping was written before.
    """
    if not dist.ddp:
        return
    torch_dist.barrier()
    torch_dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@contextmanager
def user_errors():
    """Report the errors of bad input (a missing folder or file, an impossible flag, a checkpoint
    of the wrong kind) as one line saying what is wrong, instead of a traceback."""
    try:
        yield
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None


def barrier(dist):
    """Wait until every rank gets here (e.g. until rank 0 has written a file the others read)."""
    if dist.ddp:
        torch_dist.barrier()


def all_reduce_sum(t, dist):
    if dist.ddp:
        torch_dist.all_reduce(t, op=torch_dist.ReduceOp.SUM)
    return t


@torch.no_grad()
def check_replicas_identical(model, dist):
    """Raise if the ranks' copies of the weights have drifted apart (DDP must keep them equal).

    Every rank computes the same fingerprint of its parameters; rank 0 compares them all.
    Returns True when all ranks agree (always True in a single process).
    """
    if not dist.ddp:
        return True
    fp = torch.stack([p.detach().double().pow(2).sum() + p.detach().double().sum() for p in model.parameters()])
    prints = [None] * dist.world_size
    torch_dist.all_gather_object(prints, fp.cpu())
    if not all(torch.equal(prints[0], p) for p in prints):
        raise RuntimeError("model weights differ between DDP ranks; training is not synchronised")
    return True


def all_reduce_mean(t, dist):
    """Average a tensor over ranks, so the logged loss is the whole batch's, not rank 0's share."""
    return all_reduce_sum(t, dist) / dist.world_size


def autocast_context(device):
    """bf16 autocast and TF32 matmuls on CUDA; plain fp32 elsewhere (CPU bf16 is slow and lossy).

    bf16 has fp32's exponent range, so unlike fp16 it needs no gradient scaler.
    """
    if device.type != "cuda":
        return nullcontext()
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    return torch.autocast("cuda", dtype=torch.bfloat16)


def make_optimizer(model, lr, weight_decay, betas, device):
    """AdamW with weight decay on matrices/kernels only (norm gains and biases are not decayed).

    The fused CUDA kernel is used on GPUs; on CPU the default implementation.
    """
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=device.type == "cuda")


def lr_at(step, base_lr, warmup_steps):
    """Linear warm-up from 0 to base_lr over warmup_steps, then constant (as DiT trains)."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    return base_lr


def ema_decay_at(step, decay):
    """EMA warm-up: min(decay, (1 + step) / (10 + step)).

    With a fixed 0.999 the average still holds 0.999^1200 = 30% of the random initial weights after
    1200 steps, and a short run's EMA model is mostly noise. The warm-up lets early steps move the
    average quickly and reaches the nominal decay after a few thousand steps.
    """
    return min(decay, (1 + step) / (10 + step))


@torch.no_grad()
def update_ema(ema_model, model, decay):
    """ema = decay * ema + (1 - decay) * model, for every parameter and buffer.

    The EMA weights are smoother than the raw ones and are what we sample and evaluate with.
    """
    for e, p in zip(ema_model.state_dict().values(), model.state_dict().values()):
        if e.dtype.is_floating_point:
            e.lerp_(p.to(e.dtype), 1.0 - decay)
        else:
            e.copy_(p)


def count_params(model):
    return sum(p.numel() for p in model.parameters())


# -----------------------------------------------------------------------------
# the optimisation step and its log row, shared by train_ae.py and train_dit.py


def wrap_for_training(net, dist, compile):
    """The module the loop calls: net, optionally torch.compile'd, then DDP-wrapped under torchrun.

    `net` itself stays unwrapped: the optimizer, the EMA and the checkpoints use its parameters.
    """
    model = torch.compile(net) if compile else net
    if dist.ddp:
        model = DDP(model, device_ids=[dist.device.index] if dist.device.type == "cuda" else None)
    return model


def train_step(model, net, ema, optimizer, micro_step, dist, autocast, lr, grad_accum, grad_clip, ema_decay):
    """One optimizer step: grad_accum micro-batches, gradient clipping, AdamW, then the EMA update.

    micro_step(model) fetches one micro-batch and returns (loss, {name: 0-d tensor}); it runs under
    autocast, and under DDP's no_sync() on every micro-step but the last, so the gradients are
    all-reduced once per step, not once per micro-batch. `model` is the wrapped module,
    `net` the plain one (see wrap_for_training). Returns (means, grad_norm): this rank's mean of
    "loss" and every term over the micro-batches (0-d tensors, not yet averaged over ranks; see
    TrainingProgress) and the gradient norm before clipping.
    """
    for group in optimizer.param_groups:
        group["lr"] = lr
    means = {}
    for micro in range(grad_accum):
        sync = micro == grad_accum - 1 or not dist.ddp
        with (nullcontext() if sync else model.no_sync()), autocast:
            loss, terms = micro_step(model)
        (loss / grad_accum).backward()
        for k, v in [("loss", loss), *terms.items()]:
            means[k] = means.get(k, 0.0) + v.detach().float().to(loss.device) / grad_accum
    grad_norm = torch.nn.utils.clip_grad_norm_(net.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    update_ema(ema, net, ema_decay)
    return means, grad_norm


class TrainingProgress:
    """A training loop's progress bar, throughput and log.jsonl (written by rank 0 alone).

    update() is called once per optimizer step. On logging steps it writes one row: the step's
    terms averaged over ranks (one all-reduce, so the row describes the whole global batch rather
    than rank 0's share), the counts named in `totals` (e.g. skipped images) summed over
    micro-batches and ranks instead, and step, lr, grad_norm and img_per_s.
    """

    def __init__(self, path, step, max_steps, images_per_step, dist, totals=(), grad_accum=1):
        self.path = path if dist.master else None  # one JSON object per line: easy to tail, grep, load
        if self.path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.pbar = tqdm(total=max_steps, initial=step, disable=not dist.master, dynamic_ncols=True)
        self.dist, self.totals, self.grad_accum = dist, totals, grad_accum
        self.images_per_step, self.images, self.t0 = images_per_step, 0, time.time()

    def update(self, step, means, grad_norm, lr, log):
        self.images += self.images_per_step
        if log:
            names = list(means)
            vals = all_reduce_mean(torch.stack([means[k] for k in names]), self.dist)
            row = {k: v.item() for k, v in zip(names, vals)}
            for k in self.totals:
                row[k] *= self.dist.world_size * self.grad_accum
            row.update(step=step, lr=lr, grad_norm=grad_norm.item(), img_per_s=self.images / (time.time() - self.t0))
            if self.path:
                with open(self.path, "a") as f:
                    f.write(json.dumps(row) + "\n")
            self.pbar.set_postfix({k: f"{row[k]:.4g}" for k in (*names, "img_per_s") if k not in self.totals})
        self.pbar.update(1)

    def close(self):
        self.pbar.close()


# -----------------------------------------------------------------------------
# checkpoints


def save_checkpoint(path, ckpt):
    """Write atomically: a crash mid-write leaves the previous checkpoint intact, never half a file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    torch.save(ckpt, tmp)
    os.replace(tmp, path)


def strip_prefixes(state_dict):
    """Remove the `_orig_mod.` (torch.compile) and `module.` (DDP) prefixes wrappers add to keys."""
    out = {}
    for k, v in state_dict.items():
        while k.startswith(("_orig_mod.", "module.")):
            k = k.split(".", 1)[1]
        out[k] = v
    return out


def load_checkpoint(path, kind):
    """Load a checkpoint dict onto the CPU, refusing a file of the wrong stage.

    weights_only=True: loading a checkpoint never runs code from it.
    kind: "ae" (train_ae.py) or "dit" (train_dit.py).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file
        raise ValueError(f"could not read checkpoint {path}: {e}") from e
    if not isinstance(ckpt, dict) or "kind" not in ckpt:
        raise ValueError(f"{path} is not a DGAE checkpoint (no 'kind' field)")
    if ckpt["kind"] != kind:
        made_by = {"ae": "train_ae.py", "dit": "train_dit.py"}
        raise ValueError(
            f"{path} is a '{ckpt['kind']}' checkpoint (written by {made_by.get(ckpt['kind'], '?')}), "
            f"but a '{kind}' checkpoint (written by {made_by.get(kind, '?')}) is needed here"
        )
    for key in ("model", "ema"):
        if key in ckpt:
            ckpt[key] = strip_prefixes(ckpt[key])
    return ckpt


def resume_or_refuse(ckpt_path, resume, kind):
    """--resume: the run's checkpoint. Otherwise None, and an existing checkpoint is an error, so a
    finished or running job is never overwritten by accident."""
    if resume:
        return load_checkpoint(ckpt_path, kind)
    if os.path.exists(ckpt_path):
        raise SystemExit(f"error: {ckpt_path} exists. Pass --resume true to continue that run, "
                         "or choose another --out-dir.")
    return None


def save_training(path, dist, kind, step, net, ema, optimizer, loader, **extra):
    """Checkpoint a training run: weights, EMA, optimizer, data position and every rank's RNG state
    (each rank draws its own noise), plus `extra` (model args, settings, ...). Call it on every
    rank, since the RNG states are gathered; rank 0 alone writes."""
    rngs = gather_rng_states(dist)
    if dist.master:
        save_checkpoint(path, dict(kind=kind, step=step, model=net.state_dict(), ema=ema.state_dict(),
                                   optimizer=optimizer.state_dict(), loader=loader.state_dict(), rng=rngs, **extra))


def restore_training(ckpt, dist, net, ema, optimizer, loader):
    """The inverse of save_training, for --resume; returns the step to continue from."""
    net.load_state_dict(ckpt["model"])
    ema.load_state_dict(ckpt["ema"])
    optimizer.load_state_dict(ckpt["optimizer"])
    loader.load_state_dict(ckpt["loader"])
    set_rng_state(ckpt["rng"][dist.rank])
    return ckpt["step"]


def rng_state():
    """Every random generator a training step touches, so --resume continues bit-identically."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": _numpy_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def gather_rng_states(dist):
    """rng_state() of every rank, as a list indexed by rank (each rank draws its own noise)."""
    if not dist.ddp:
        return [rng_state()]
    states = [None] * dist.world_size
    torch_dist.all_gather_object(states, rng_state())
    return states


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(("MT19937", state["numpy"]["key"].numpy(), *state["numpy"]["rest"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _numpy_state():
    # numpy's state holds an ndarray, which weights_only loading refuses; store it as a tensor
    _, key, *rest = np.random.get_state()
    return {"key": torch.from_numpy(key.astype(np.int64)), "rest": rest}


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
