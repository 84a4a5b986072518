"""
Benchmarks: how fast a training step and a reconstruction are, and what they cost in memory.

    python bench.py                                   # tiny sizes, any machine (CPU included)
    python bench.py --ae-preset base --dit-preset DiT-XL/1 --batch-size 32 --compile true   # one GPU, paper scale
Prints numbers; asserts nothing. Speed targets live here, not in the tests. Quote these numbers
(with the device line) in a commit message that claims a speed-up.
"""

import time

import torch

import common
from ae import DGAE, make_config
from decoder_diffusion import attention, flow_matching_loss
from dit import build_dit
from train_ae import make_optimizer

# -----------------------------------------------------------------------------
ae_preset = "tiny"  # ae.PRESETS name
compression = 0  # the preset's unless given
dit_preset = "DiT-Tiny/1"
batch_size = 16
decode_steps = 10
steps = 10  # timed iterations (after `warmup` untimed ones)
warmup = 3
compile = False
device = ""
seed = 0
# -----------------------------------------------------------------------------


def timed(fn, dev):
    """Mean seconds per call of fn over `steps` calls, after `warmup` calls (compile, allocator, caches)."""
    for _ in range(warmup):
        fn()
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps


def memory(dev):
    return f", peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB" if dev.type == "cuda" else ""


def train_step_fn(model, batch_fn, dev):
    """One forward + backward + AdamW step of `model`, whose forward returns (loss, terms)."""
    opt = make_optimizer(model, 1e-4, 0.0, (0.9, 0.99), dev)
    autocast = common.autocast_context(dev)
    step_model = torch.compile(model) if compile else model

    def step():
        with autocast:
            loss, _ = step_model(*batch_fn())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def main():
    settings, given = common.configure(globals())
    torch.manual_seed(seed)
    dev = torch.device(device or common.default_device())
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"{dev.type}, {torch.get_num_threads()} threads"
    print(f"device: {name}; torch {torch.__version__}; compile {compile}; batch {batch_size}")

    # stage 1: a DGAE training step and a reconstruction
    cfg = make_config(ae_preset, **({"compression": compression} if "compression" in given else {}))
    ae = DGAE(cfg).to(dev)
    x = torch.rand(batch_size, 3, cfg.resolution, cfg.resolution, device=dev) * 2 - 1
    s = timed(train_step_fn(ae, lambda: (x,), dev), dev)
    print(f"DGAE {ae_preset} f{cfg.compression} {cfg.resolution}px train step: {s * 1e3:.1f} ms, "
          f"{batch_size / s:.1f} img/s{memory(dev)}")
    ae.eval()
    with torch.no_grad(), common.autocast_context(dev):
        s = timed(lambda: ae.reconstruct(x, steps=decode_steps), dev)
    print(f"DGAE reconstruction ({decode_steps} Euler steps): {s * 1e3:.1f} ms, {batch_size / s:.1f} img/s{memory(dev)}")

    # stage 2: a DiT training step on latents of that autoencoder
    h = cfg.resolution // cfg.compression
    dit = build_dit(dit_preset, h, cfg.latent_channels, 1000).to(dev)

    class Loss(torch.nn.Module):  # forward = the rectified-flow loss, like train_dit.py's micro-step
        def __init__(self):
            super().__init__()
            self.dit = dit

        def forward(self, z, y):
            return flow_matching_loss(lambda x_t, t: self.dit(x_t, t, y), z)[0], {}

    z = torch.randn(batch_size, cfg.latent_channels, h, h, device=dev)
    y = torch.randint(0, 1000, (batch_size,), device=dev)
    s = timed(train_step_fn(Loss(), lambda: (z, y), dev), dev)
    print(f"{dit_preset} on {cfg.latent_channels}x{h}x{h} latents train step: {s * 1e3:.1f} ms, "
          f"{batch_size / s:.1f} latents/s{memory(dev)}")

    # the two attention paths, forward + backward, at the DiT's width
    heads, hs, T = dit.blocks[0].attn.num_heads, dit.config["hidden_size"] // dit.blocks[0].attn.num_heads, 256
    q, k, v = (torch.randn(batch_size, heads, T, hs, device=dev, requires_grad=True) for _ in range(3))
    for impl in ("math", "sdpa"):
        fn = torch.compile(lambda: attention(q, k, v, impl)) if compile else (lambda: attention(q, k, v, impl))
        with common.autocast_context(dev):
            s = timed(lambda: fn().sum().backward(), dev)
        print(f"attention {impl:4s} ({batch_size}x{heads}x{T}x{hs}) fwd+bwd: {s * 1e3:.2f} ms{memory(dev)}")


if __name__ == "__main__":
    main()
