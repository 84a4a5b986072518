"""
Benchmarks: what a training step, a decode and a sample cost, and how close each comes to the
machine's limit. Every time is the median of `reps` calls after `warmup` untimed ones (compilation,
allocator growth, caches), the GPU synchronised after each. MFU = FLOPs of one call (torch's
FlopCounterMode) / its time, over the FLOP/s of an n x n matmul timed in the same run: machines of
one kind differ by up to 2x, so quote ratios measured in one run, not bare times.

    python experiments/bench.py  # tiny DGAE + DiT-Tiny/1 on this machine (CPU included), fp32
    python experiments/bench.py --quick true  # tiny sizes: every path runs, < 1 min on 2 cores
    python experiments/bench.py --ae-preset base --compression 8 --dit-preset DiT-XL/2 \\
        --batch-size 32 --checkpoint true --json gpu.json  # GPU, bf16
    python experiments/bench.py --compare a.json,b.json  # two saved runs side by side
    python experiments/bench.py --parts dit --official-dit ~/DiT  # + the official DiT's step
    python experiments/bench.py --parts memory --ae-preset base --compression 32 --batch-size 32

--parts memory needs no GPU: it predicts torch.cuda.max_memory_allocated over two stage-1 training
steps in bf16 by running them on the meta device (shapes, no data) under CUDA's autocast rules
(CudaAutocastRules) and counting the bytes of every live tensor (LiveBytes).
"""

import copy
import importlib.util
import json as jsonlib
import os
import resource
import statistics
import sys
import time
import weakref
from contextlib import contextmanager, nullcontext

# the repository root
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from ae import DEFAULT_LATENT_CHANNELS, DGAE, PRESETS, make_config
import decoder_diffusion
from decoder_diffusion import attention, euler_sample, flow_matching_loss
from dit import DIT_PRESETS, build_dit
from support import common
from support.checkpoints import write_text
from support.data import Loader, build_dataset
from support.optim import make_optimizer, update_ema
from support.perceptual import LPIPS, load_lpips

# -----------------------------------------------------------------------------
# what to measure
parts = "ae,dit,attn,data"  # any of ae, dit (step; decoding, sampling), attn, data; or memory alone
gpu_gib = 80.0  # memory: GPU memory the largest fitting batch is sought for (GiB; H100 80GB: 79.6)
ae_preset = "tiny"  # ae.PRESETS name
compression = 0  # 0 = the preset's
lpips = False  # include the LPIPS term in the stage-1 step (needs the weight files, see README)
dit_preset = "DiT-Tiny/1"  # dit.DIT_PRESETS name, on latents of the stage-1 model's shape
attn_impl = "math"  # the models' attention: math | sdpa
batch_size = 16  # images (or latents) per timed step
decode_steps = "1,3,10,50"  # decoder Euler steps at which decoding is timed
sample_steps = 50  # DiT Euler steps per sample
cfg_scale = 4.0  # guidance runs the DiT on a doubled batch; 1 = no guidance
attn_seq = "64,256,1024"  # attention sequence lengths; batch, heads and head size are the DiT's
data = ""  # image folder for the data-pipeline row; "" = the built-in procedural dataset
num_workers = 2  # data-loading processes
data_batches = 50  # batches timed for the data pipeline
matmul_size = 0  # n of the peak n x n matmul; 0 = 2048 on CPU, 8192 on GPU (smaller stay below it)
# fast paths: run with and without, then --compare the two JSON files
precision = "auto"  # fp32 | bf16; auto = bf16 autocast on CUDA (as the trainers), fp32 elsewhere
compile = False  # torch.compile the training steps, the decoder and the DiT sampler
checkpoint = False  # activation checkpointing, as --grad-checkpoint (DiT blocks, U-Net layers)
channels_last = "auto"  # NHWC for the stage-1 convnet; auto = as train_ae.py: on CPU, off on CUDA
fused_adamw = True  # one fused AdamW kernel instead of a loop over the tensors
official_dit = ""  # a checkout of facebookresearch/DiT (needs timm): its step timed beside ours
# how
warmup = 3  # untimed repetitions before timing
reps = 7  # timed repetitions (the median is reported)
quick = False  # QUICK's sizes, except those given: checks that every path runs, not how fast
device = ""  # "" = cuda, then mps, then cpu
seed = 0  # the random inputs and weights
json = ""  # write every field to this file
compare = ""  # "a.json,b.json": print two saved runs side by side and exit
QUICK = dict(batch_size=2, sample_steps=2, attn_seq="16,64", num_workers=1, data_batches=4,
             matmul_size=256, warmup=1, reps=2)
# -----------------------------------------------------------------------------
SETTINGS = common.settings_block(globals())  # the defaults above: every main() starts from them

results = {}  # row name -> fields: the JSON's "results" and the printed table
peak_flops_per_s = None  # the matmul's, measured first


def reset_peak(dev):
    if dev.type == "cuda":
        return torch.cuda.reset_peak_memory_stats(dev)
    # Linux: writing 5 to clear_refs resets the RSS high-water mark that getrusage reports, so each
    # row gets its own peak; where that fails the figure is the process's peak so far
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_mib(dev):
    """CUDA: the caching allocator's peak of live tensors. CPU: the process's peak resident size."""
    if dev.type == "cuda":
        return torch.cuda.max_memory_allocated(dev) / 2**20
    unit = 2**20 if sys.platform == "darwin" else 2**10  # ru_maxrss: bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / unit


def timed(fn, dev):
    """(median seconds per call over `reps` calls after `warmup` calls, peak MiB while timed)."""
    # CUDA calls only queue the work
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    reset_peak(dev)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), peak_mib(dev)


def count_flops(fn):
    """FLOPs of one call of fn (forward and backward) by torch's counter: matmuls and convolutions,
    2 per multiply-add. Elementwise work (norms, activations, AdamW) is left out, as in MFU."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def attention_flops(B, H, T, D, backward=False):
    """Model FLOPs of softmax(q k^T / sqrt(D)) v on (B, H, T, D): q k^T and att v are 2 B H T T D
    each; the backward of a matmul is two matmuls of its size, so forward + backward is 3x."""
    return 4 * B * H * T * T * D * (3 if backward else 1)


@contextmanager
def math_attention(model):
    """Count the model's attention as the math path, so every implementation's MFU compares: the
    counter counts 0 for the CPU fused kernel, and flash's backward recomputation on CUDA."""
    math_path = {"attn_impl": "math", "fused_attn": False}  # our models' switch; timm's
    saved = [(m, k, getattr(m, k)) for m in model.modules() for k in math_path if hasattr(m, k)]
    for m, k, _ in saved:
        setattr(m, k, math_path[k])
    try:
        yield
    finally:
        for m, k, v in saved:
            setattr(m, k, v)


def record(name, seconds, mem, images=None, flops=None, **extra):
    results[name] = dict(ms=seconds * 1e3, ms_per_img=seconds * 1e3 / images if images else None,
                         img_per_s=images / seconds if images else None, flops=flops,
                         flops_per_s=flops / seconds if flops else None,
                         mfu=flops / seconds / peak_flops_per_s if flops else None, peak_mib=mem,
                         **extra)


def graph_breaks():
    return sum(torch._dynamo.utils.counters["graph_break"].values())


def flow_loss(net, z, y):
    """train_dit.py's loss: flow matching of the class-conditional DiT on latents z."""
    return flow_matching_loss(lambda x_t, t: net(x_t, t, y), z)[0]


def train_row(name, net, loss_fn, batch, dev, autocast, **extra):
    """Time the trainers' step on one micro-batch: forward + backward of loss_fn(net, *batch), grad
    clip, AdamW, EMA update. Returns the EMA copy, which decodes and samples."""

    def fwd_bwd(forward, inputs=batch):
        with autocast:
            loss = forward(*inputs)
        loss.backward()  # outside autocast, as in the trainers

    # counted before checkpointing (recomputation is not model FLOPs), on one item: every op is per
    # item, so the batch has B times its FLOPs, and an un-checkpointed step never runs at full size
    one = tuple(t[:1] for t in batch)
    with math_attention(net):
        flops = batch[0].shape[0] * count_flops(lambda: fwd_bwd(lambda *b: loss_fn(net, *b), one))
    net.zero_grad(set_to_none=True)
    ema = copy.deepcopy(net).requires_grad_(False).eval()
    net.grad_checkpoint = checkpoint  # as the trainers set it: only each block's input kept
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, fused=fused_adamw)
    forward = lambda *b: loss_fn(net, *b)  # noqa: E731  (compiled as one graph: model and loss)
    forward = torch.compile(forward) if compile else forward

    def step():
        fwd_bwd(forward)
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        update_ema(ema, net, 0.999)

    breaks = graph_breaks()
    s, mem = timed(step, dev)
    record(name, s, mem, images=batch[0].shape[0], flops=flops,
           graph_breaks=graph_breaks() - breaks if compile else None, **extra)
    return ema


def stage1(cfg, dev, autocast, no_grad):
    """A DGAE training step, then decoding with the EMA weights at each of `decode_steps`."""
    fmt = (torch.channels_last if common.channels_last_on(channels_last, dev)
           else torch.contiguous_format)
    ae = DGAE(cfg).to(dev, memory_format=fmt)
    perceptual = None
    if lpips:
        with common.user_errors():  # a missing weight file is a one-line error
            perceptual = load_lpips(device=dev)
    x = torch.rand(batch_size, 3, cfg.resolution, cfg.resolution, device=dev) * 2 - 1
    x = x.contiguous(memory_format=fmt)
    ema = train_row("ae_train_step", ae, lambda m, x: m(x, perceptual)[0], (x,), dev, autocast)
    del ae  # decoding's peak memory: the EMA weights, not the trained copy too
    with no_grad(), autocast, math_attention(ema):
        z = ema.encode(x)
        step_flops = count_flops(lambda: ema.decode(z, steps=1))  # n steps: n such U-Net passes
    if compile:
        ema.decoder = torch.compile(ema.decoder)
    for steps in [int(s) for s in decode_steps.split(",")]:
        def decode():
            with no_grad(), autocast:
                ema.decode(z, steps=steps)
        record(f"ae_decode_{steps}", *timed(decode, dev), images=batch_size,
               flops=steps * step_flops)


def official_model(h, c):
    """The official DiT `dit_preset` from `official_dit`/models.py, learn_sigma off: ours, layer for
    layer. Its attention is timm's fused kernel by default: compare it with our --attn-impl sdpa."""
    path = os.path.join(official_dit, "models.py")
    try:
        spec = importlib.util.spec_from_file_location("official_dit_models", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # torch.compile re-imports the module of the code it traces
        spec.loader.exec_module(module)
        table = module.DiT_models
    except Exception as e:  # no such file, timm missing, another repository
        raise SystemExit(f"error: --official-dit: cannot import DiT_models from {path} "
                         f"({type(e).__name__}: {e}); give a checkout of facebookresearch/DiT, "
                         "with timm installed") from None
    if dit_preset not in table:
        raise SystemExit(f"error: the official DiT code has no {dit_preset}; its presets: "
                         f"{', '.join(table)}")
    return table[dit_preset](input_size=h, in_channels=c, num_classes=1000, learn_sigma=False)


def stage2(cfg, dev, autocast, no_grad):
    """A DiT training step on latents of the stage-1 shape (train_dit.py's cache), then sampling."""
    h, c = cfg.resolution // cfg.compression, cfg.latent_channels
    dit = build_dit(dit_preset, h, c, 1000, attn_impl=attn_impl).to(dev)
    tokens = dit.grid[0] * dit.grid[1]
    z = torch.randn(batch_size, c, h, h, device=dev)
    y = torch.randint(0, 1000, (batch_size,), device=dev)
    ema = train_row("dit_train_step", dit, flow_loss, (z, y), dev, autocast, tokens=tokens)
    del dit  # sampling's peak memory: the EMA weights, not the trained copy too
    if official_dit:  # the same step (batch, loss, AdamW, clip, EMA) of the official code's model
        train_row("dit_official_train_step", official_model(h, c).to(dev), flow_loss, (z, y), dev,
                  autocast, tokens=tokens)

    def velocity(x_t, t):  # with guidance, one pass of a doubled batch (DiT.forward_with_cfg)
        return ema.forward_with_cfg(x_t, t, y, cfg_scale) if cfg_scale != 1 else ema(x_t, t, y)

    with no_grad(), autocast, math_attention(ema):
        step_flops = count_flops(lambda: velocity(z, torch.ones(batch_size, device=dev)))
    sampler = torch.compile(velocity) if compile else velocity

    def sample():
        with no_grad(), autocast:
            euler_sample(sampler, z, sample_steps)
    record("dit_sample", *timed(sample, dev), images=batch_size, flops=sample_steps * step_flops,
           tokens=tokens)


def seq_lengths():
    return [int(t) for t in attn_seq.split(",")]


def attention_rows(dev, dtype):
    """Attention alone with the DiT's heads and head size: eager math, compiled math, sdpa."""
    H = DIT_PRESETS[dit_preset]["num_heads"]
    D = DIT_PRESETS[dit_preset]["hidden_size"] // H
    math = lambda q, k, v: attention(q, k, v, "math")  # noqa: E731
    impls = {"math": math, "math_compiled": torch.compile(math, dynamic=False),
             "sdpa": lambda q, k, v: attention(q, k, v, "sdpa")}
    torch._dynamo.config.recompile_limit = 64  # one static graph per length and grad mode
    for T in seq_lengths():
        shape = [batch_size, H, T, D]
        q, k, v = (torch.randn(*shape, device=dev, dtype=dtype, requires_grad=True)
                   for _ in range(3))
        g = torch.randn_like(q)  # the output's gradient
        for impl, fn in impls.items():
            def fwd():
                with torch.no_grad():
                    fn(q, k, v)

            def fwd_bwd():  # autograd.grad: no .grad accumulation in the timing
                torch.autograd.grad(fn(q, k, v), (q, k, v), g)
            record(f"attn_{impl}_T{T}_fwd", *timed(fwd, dev), flops=attention_flops(*shape),
                   shape=shape)
            record(f"attn_{impl}_T{T}_fwd_bwd", *timed(fwd_bwd, dev),
                   flops=attention_flops(*shape, True), shape=shape)


def matmul_row(dev, dtype):
    """The n x n matmul (2 n^3 FLOPs in the compute dtype): the peak FLOP/s of every MFU."""
    global peak_flops_per_s
    n = matmul_size or (8192 if dev.type == "cuda" else 2048)
    a, b = (torch.randn(n, n, device=dev, dtype=dtype) for _ in range(2))
    s, mem = timed(lambda: a @ b, dev)
    peak_flops_per_s = 2 * n**3 / s
    record(f"matmul_{n}", s, mem, flops=2 * n**3)


def data_row(cfg):
    """Images/s of the trainers' Loader with `num_workers` processes: is training input-bound?"""
    loader = Loader(build_dataset(data, cfg.resolution), batch_size, num_workers=num_workers,
                    seed=seed)
    for _ in range(max(warmup, 1)):  # starts the workers
        next(loader)
    t0 = time.perf_counter()
    for _ in range(data_batches):
        next(loader)
    record("data_pipeline", (time.perf_counter() - t0) / data_batches, None, images=batch_size,
           num_workers=num_workers)


# -----------------------------------------------------------------------------
# the memory model: one training step's peak GPU memory, predicted on the meta device

# what a GPU holds beyond torch's live tensors, subtracted before a prediction "fits" (our margin):
# the CUDA context (about 0.5 GiB), cuDNN/cuBLAS workspaces, NCCL buffers, allocator fragmentation
MEMORY_HEADROOM = dict(fixed_gib=3.0, share=0.10)

# CUDA autocast's cast lists (PyTorch's AMP docs, "CUDA Ops that can autocast to float16 /
# float32"), by the name of the torch function as Python calls it; ops on neither list run in the
# dtype of their inputs
AUTOCAST_LOWER = {"conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d",
                  "conv_transpose3d", "linear", "matmul", "__matmul__", "__rmatmul__", "mm", "bmm",
                  "baddbmm", "addmm", "addbmm", "einsum", "scaled_dot_product_attention"}
AUTOCAST_FP32 = {"group_norm", "layer_norm", "softmax", "log_softmax", "mse_loss", "l1_loss",
                 "smooth_l1_loss", "exp", "log", "pow", "__pow__", "rsqrt", "norm", "normalize",
                 "sum", "prod", "cumsum", "cross_entropy", "nll_loss", "softplus",
                 "cosine_similarity"}


class CudaAutocastRules(TorchFunctionMode):
    """torch.autocast("cuda", bfloat16)'s casts on any device (the meta device has no autocast of
    its own): floating inputs of a function in AUTOCAST_LOWER go to bf16, in AUTOCAST_FP32 to fp32.
    Like autocast it acts above autograd, so backward saves the cast copies."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        dtype = (torch.bfloat16 if name in AUTOCAST_LOWER
                 else torch.float32 if name in AUTOCAST_FP32 else None)
        if dtype is not None:
            cast = lambda t: (t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point()
                              else t)  # noqa: E731
            args = [[cast(a) for a in arg] if isinstance(arg, (list, tuple)) else cast(arg)
                    for arg in args]
            kwargs = {k: cast(v) for k, v in (kwargs or {}).items()}
        return func(*args, **(kwargs or {}))


class LiveBytes(TorchDispatchMode):
    """The bytes of all tensor storages alive (`now`) and their maximum (`peak`) over the ops run
    inside it: a storage counts from the op that makes it until it is freed, rounded up to the CUDA
    caching allocator's 512-byte blocks."""

    def __init__(self):
        super().__init__()
        self.now = self.peak = 0
        self.live = set()

    def _add(self, t):
        storage = t.untyped_storage()
        key = id(storage)
        if key in self.live:
            return
        size = -(-storage.nbytes() // 512) * 512
        self.live.add(key)
        self.now += size
        self.peak = max(self.peak, self.now)
        weakref.finalize(storage, self._free, key, size)

    def _free(self, key, size):
        self.live.discard(key)
        self.now -= size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (list, tuple)) else [out]):
            if isinstance(t, torch.Tensor):
                self._add(t)
        return out


@contextmanager
def recompute_under_rules(on):
    """Checkpointing's recomputation in backward under CudaAutocastRules, as torch.utils.checkpoint
    re-enters a real autocast for it: decoder_diffusion's checkpoint gets them as its context."""
    if not on:
        yield
        return
    original = decoder_diffusion.checkpoint
    decoder_diffusion.checkpoint = lambda *a, **k: original(
        *a, context_fn=lambda: (nullcontext(), CudaAutocastRules()), **k)
    try:
        yield
    finally:
        decoder_diffusion.checkpoint = original


def two_steps_peak(build, dev, bf16, grad_checkpoint):
    """Peak bytes of live tensors over two steps of the trainers' loop on `dev` (meta: predicted;
    cpu: counted): model, EMA, AdamW state, gradients and activations, under bf16 autocast rules if
    bf16. build() makes (model, inputs, loss_fn) on the current device, loss_fn(model, *inputs)."""
    with LiveBytes() as mem:
        with torch.device(dev):
            net, inputs, loss_fn = build()
            ema = copy.deepcopy(net).requires_grad_(False)
        net.grad_checkpoint = grad_checkpoint
        opt = make_optimizer(net, 1e-4, 0.0, (0.9, 0.99), torch.device("cpu"))
        # the meta device has neither fused nor foreach kernels: the CUDA trainer's fused AdamW,
        # like this per-tensor loop, makes no full-size temporaries
        for group in opt.param_groups:
            group["foreach"] = False
        for _ in range(2):
            with CudaAutocastRules() if bf16 else nullcontext(), recompute_under_rules(bf16):
                loss = loss_fn(net, *inputs)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            opt.step()
            update_ema(ema, net, 0.999)
            opt.zero_grad(set_to_none=True)
    return mem.peak


def train_step_peak(cfg, batch, dev, bf16, grad_checkpoint, with_lpips):
    """two_steps_peak of train_ae.py's step: DGAE's loss on a batch of images, with LPIPS or not."""

    def build():
        lp = LPIPS().requires_grad_(False) if with_lpips else None
        x = torch.randn(batch, 3, cfg.resolution, cfg.resolution)
        return DGAE(cfg), (x,), lambda net, x: net(x, lp)[0]
    return two_steps_peak(build, dev, bf16, grad_checkpoint)


def dit_step_peak(preset, latent_shape, batch, dev, bf16, grad_checkpoint, num_classes=1000):
    """two_steps_peak of train_dit.py's step on a batch of latents of shape (c, h, w)."""
    c, h, _ = latent_shape

    def build():
        z, y = torch.randn(batch, *latent_shape), torch.randint(0, num_classes, (batch,))
        return build_dit(preset, h, c, num_classes), (z, y), flow_loss
    return two_steps_peak(build, dev, bf16, grad_checkpoint)


def memory_available_gib(gib):
    """What the live tensors may take of a GPU of `gib` GiB, after MEMORY_HEADROOM."""
    return gib * (1 - MEMORY_HEADROOM["share"]) - MEMORY_HEADROOM["fixed_gib"]


def predict_train_peak(cfg, batch, grad_checkpoint, with_lpips):
    """Predicted peak GiB of live tensors of one train_ae.py step on a CUDA GPU in bf16."""
    return train_step_peak(cfg, batch, torch.device("meta"), True, grad_checkpoint,
                           with_lpips) / 2**30


def largest_batch(cfg, grad_checkpoint, with_lpips, gib, known=None):
    """The largest batch per GPU (at most 4096) whose predicted peak fits memory_available_gib(gib),
    0 if not even 1. The peak is the weights' and optimizer's bytes plus activations linear in the
    batch: the line through batch 1 and `known` = (batch, its peak GiB) gives the candidate, checked
    and lowered until it fits."""
    peak = lambda b: predict_train_peak(cfg, b, grad_checkpoint, with_lpips)  # noqa: E731
    room = memory_available_gib(gib)
    p1 = peak(1)
    if p1 > room:
        return 0
    b2, p2 = known if known and known[0] > 1 else (8, peak(8))
    candidate = min(4096, 1 + int((room - p1) / max((p2 - p1) / (b2 - 1), 1e-9)))
    while candidate > 1 and peak(candidate) > room:
        candidate = int(candidate * 0.95)
    return candidate


def memory_rows(cfg):
    """--parts memory: the predicted peaks and largest batches of the stage-1 and DiT steps."""
    room = memory_available_gib(gpu_gib)
    print(f"stage-1 training step on a CUDA GPU in bf16, predicted on the meta device: "
          f"{ae_preset}, f={cfg.compression}, {cfg.resolution} px, LPIPS "
          f"{'on' if lpips else 'off'}; a GPU of {gpu_gib:g} GiB leaves {room:.1f} GiB for tensors "
          "after the headroom")
    print(f"{'checkpointing':>14s}{'batch':>7s}{'peak GiB':>10s}{'fits':>6s}{'largest batch':>15s}")
    for ckpt in (False, True):
        peak = predict_train_peak(cfg, batch_size, ckpt, lpips)
        best = largest_batch(cfg, ckpt, lpips, gpu_gib, known=(batch_size, peak))
        print(f"{'on' if ckpt else 'off':>14s}{batch_size:7d}{peak:10.1f}"
              f"{'yes' if peak <= room else 'no':>6s}{best:15d}")
        results[f"memory_checkpoint_{'on' if ckpt else 'off'}"] = dict(
            batch=batch_size, peak_gib=peak, fits=peak <= room, largest_batch=best, gpu_gib=gpu_gib)
    h = cfg.resolution // cfg.compression
    shape = (cfg.latent_channels, h, h)
    peak = dit_step_peak(dit_preset, shape, batch_size, torch.device("meta"), True,
                         checkpoint) / 2**30
    print(f"train_dit.py step, {dit_preset} on {shape[0]}x{h}x{h} latents, batch {batch_size}, "
          f"checkpointing {'on' if checkpoint else 'off'}: {peak:.1f} GiB predicted, "
          f"{'fits' if peak <= room else 'does not fit'}")
    results["memory_dit"] = dict(batch=batch_size, peak_gib=peak, fits=peak <= room,
                                 gpu_gib=gpu_gib, preset=dit_preset)


def cell(v, spec):
    """v formatted as spec ("10.2f"), or a dash of the same width where there is no value."""
    return format("-" if v is None else v, spec if v is not None else ">" + spec.split(".")[0])


def print_table(rows):
    """One line per row (ms per call and per image, GFLOP/s, MFU, peak memory), then the ratios:
    attention against sdpa, our DiT step against the official code's, data against training."""
    print(f"{'':32s}{'ms':>10s}{'ms/img':>9s}{'GFLOP/s':>10s}{'MFU':>6s}{'peak MiB':>10s}")
    for name, r in rows.items():
        print(f"{name:32s}{cell(r['ms'], '10.2f')}{cell(r['ms_per_img'], '9.3f')}"
              f"{cell(r['flops_per_s'] and r['flops_per_s'] / 1e9, '10.1f')}"
              f"{cell(r['mfu'], '6.0%')}{cell(r['peak_mib'], '10.0f')}")
    breaks = {n: r["graph_breaks"] for n, r in rows.items() if r.get("graph_breaks") is not None}
    if breaks:
        print("graph breaks while compiling: " + ", ".join(f"{n} {b}" for n, b in breaks.items()))
    for T in [T for T in seq_lengths() if f"attn_sdpa_T{T}_fwd_bwd" in rows]:
        ms = {impl: rows[f"attn_{impl}_T{T}_fwd_bwd"]["ms"]
              for impl in ("math", "math_compiled", "sdpa")}
        print(f"attention T={T} fwd+bwd time over sdpa's: math {ms['math'] / ms['sdpa']:.2f}x, "
              f"math compiled {ms['math_compiled'] / ms['sdpa']:.2f}x")
    if "dit_official_train_step" in rows:
        ours, theirs = rows["dit_train_step"]["ms"], rows["dit_official_train_step"]["ms"]
        print(f"DiT train step: ours {ours:.2f} ms, the official code's {theirs:.2f} ms: ours "
              f"takes {ours / theirs:.2f}x its time")
    if "data_pipeline" in rows and "ae_train_step" in rows:
        data_rate = rows["data_pipeline"]["img_per_s"]
        train_rate = rows["ae_train_step"]["img_per_s"]
        print(f"data pipeline {data_rate:.0f} img/s with {num_workers} workers vs stage-1 step "
              f"{train_rate:.0f} img/s: "
              + ("input-bound, add workers" if data_rate < train_rate else "not input-bound"))


def compare_runs(path_a, path_b):
    """Two saved runs row by row: time, time ratio A/B, and MFU and peak memory of each."""
    with open(path_a) as fa, open(path_b) as fb:
        a, b = jsonlib.load(fa), jsonlib.load(fb)
    print(f"A: {path_a}: {a['device']}\nB: {path_b}: {b['device']}")
    diff = [f"{k} {a['settings'].get(k)} {v}" for k, v in b["settings"].items()
            if a["settings"].get(k) != v and k not in ("json", "compare")]
    print("settings that differ (A, B): " + (", ".join(diff) or "none"))
    print(f"{'':32s}{'A ms':>10s}{'B ms':>10s}{'A/B':>7s}{'A MFU':>7s}{'B MFU':>7s}{'A MiB':>9s}"
          f"{'B MiB':>9s}")
    for name, ra in a["results"].items():
        rb = b["results"].get(name)
        if rb is not None:
            print(f"{name:32s}{ra['ms']:10.2f}{rb['ms']:10.2f}{ra['ms'] / rb['ms']:7.2f}"
                  f"{cell(ra['mfu'], '7.0%')}{cell(rb['mfu'], '7.0%')}"
                  f"{cell(ra['peak_mib'], '9.0f')}{cell(rb['peak_mib'], '9.0f')}")


def check(settings):
    """The stage-1 config, every setting checked before any work: a bad value is one line, not a
    traceback after minutes (nor --matmul-size 10**6 asking for two 4 TB matrices)."""
    common.check_settings(
        settings, count=("batch_size", "reps", "data_batches"), steps=("sample_steps",),
        count_or_0=("warmup", "num_workers", "matmul_size", "seed"), positive=("gpu_gib",),
        guidance=("cfg_scale",),
        choices={"attn_impl": ("math", "sdpa"), "ae_preset": tuple(PRESETS),
                 "dit_preset": tuple(DIT_PRESETS), "compression": (0, *DEFAULT_LATENT_CHANNELS)},
        at_most={"batch_size": common.MAX_BATCH, "reps": common.MAX_REPEATS,
                 "warmup": common.MAX_REPEATS, "data_batches": common.MAX_REPEATS,
                 "num_workers": common.MAX_WORKERS, "matmul_size": common.MAX_MATMUL,
                 "seed": common.MAX_SEED})
    for name, limit in (("attn_seq", common.MAX_SEQUENCE),
                        ("decode_steps", common.MAX_EULER_STEPS)):
        if not all(v.strip().isdigit() and 1 <= int(v) <= limit for v in settings[name].split(",")):
            raise SystemExit(f"error: {common.flag_of(name)} takes comma-separated whole "
                             f"numbers from 1 to {limit}, got {settings[name]!r}")
    with common.user_errors():  # a compression the preset's resolution does not divide
        cfg = make_config(ae_preset, attn_impl=attn_impl,
                          **({"compression": compression} if compression else {}))
    wanted = parts.split(",")
    if "data" in wanted and data and not os.path.isdir(data):
        raise SystemExit(f"error: --data {data!r}: no such folder (an image folder, or leave it "
                         "out for the built-in data)")
    if (not set(wanted) <= {"ae", "dit", "attn", "data", "memory"}
            or precision not in ("auto", "fp32", "bf16")):
        raise SystemExit(f"error: --parts takes some of ae,dit,attn,data, or memory alone (got "
                         f"{parts!r}); --precision auto, fp32 or bf16 (got {precision!r})")
    return cfg


def main(argv=None):
    # in main, not at import time: the tests import this file
    settings, given = common.configure(SETTINGS, argv)
    globals().update(settings)
    if quick:  # QUICK's sizes, except those given on the command line
        globals().update({k: v for k, v in QUICK.items() if k not in given})
        settings = {k: globals()[k] for k in settings}
    if compare:
        return compare_runs(*compare.split(","))
    cfg = check(settings)
    wanted = parts.split(",")
    if "memory" in wanted:
        memory_rows(cfg)
        if json:
            write_text(json, jsonlib.dumps(dict(device="meta (predicted)", settings=settings,
                                                results=results), indent=1))
        return
    if official_dit and ("dit" not in wanted or checkpoint):
        raise SystemExit("error: --official-dit times the official DiT's step beside ours: it "
                         "needs dit in --parts, and no --checkpoint (the official code has no "
                         "activation checkpointing)")
    common.check_device(device)  # one line listing this machine's devices, not a traceback
    torch.manual_seed(seed)
    dev = torch.device(device or common.default_device())
    dtype = (torch.bfloat16 if precision == "bf16" or (precision == "auto" and dev.type == "cuda")
             else torch.float32)
    # fp32 matmuls in TF32, as common.autocast_context sets for training (the peak too)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    autocast = torch.autocast(dev.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
    no_grad = torch.inference_mode  # what the scripts decode and sample under
    name = (torch.cuda.get_device_name(dev) if dev.type == "cuda"
            else f"{dev.type}, {torch.get_num_threads()} threads")
    device_line = f"{name}; torch {torch.__version__}; {str(dtype)[6:]}"
    print(f"device: {device_line}; " + ", ".join(f"{k} {settings[k]}" for k in (
        "batch_size", "compile", "checkpoint", "channels_last", "fused_adamw", "attn_impl")))
    matmul_row(dev, dtype)
    if "ae" in wanted:
        stage1(cfg, dev, autocast, no_grad)
    if "dit" in wanted:
        stage2(cfg, dev, autocast, no_grad)
    if "attn" in wanted:
        attention_rows(dev, dtype)
    if "data" in wanted:
        data_row(cfg)
    print_table(results)
    if json:
        write_text(json, jsonlib.dumps(dict(device=device_line, settings=settings, results=results),
                                       indent=1))
        print(f"wrote {json}")


if __name__ == "__main__":
    main()
