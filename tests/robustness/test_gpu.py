"""The CUDA paths, run for real on a GPU: skipped where there is none (every CI machine so far).

    python -m pytest tests/robustness/test_gpu.py -m slow -v      # about 10 minutes on one GPU

Each trainer a few steps in bf16, compiled, under a 1-GPU torchrun with NCCL; a resume compared bit for
bit with --deterministic; the base preset's training step at its default batch, its measured peak beside
the memory model's prediction (printed, and within 15%); sample.py alone and under torchrun giving the same
samples; bench.py's GPU rows. What ran on which GPU is recorded in NOTES.md and the README.
"""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = ["--batch-size", "8", "--log-every", "1", "--sample-every", "1000", "--ckpt-every", "1000", "--decode-steps", "2"]


def script(tmp_path, name, *args, torchrun=False):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"] if torchrun else [sys.executable]
    proc = subprocess.run(launcher + [os.path.join(ROOT, name), *map(str, args)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=900, env=dict(os.environ, DGAE_WEIGHTS=str(tmp_path / "none")))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def test_both_trainers_compiled_in_bf16_under_torchrun_with_nccl_then_sample_alone_and_under_torchrun(tmp_path):
    script(tmp_path, "train_ae.py", "--out-dir", "ae", "--max-steps", "6", "--compile", "true", *TINY, torchrun=True)
    assert load(tmp_path / "ae/ckpt.pt")["step"] == 6
    script(tmp_path, "train_dit.py", "--ae-ckpt", "ae/ckpt.pt", "--out-dir", "dit", "--max-steps", "6", "--compile", "true",
           "--batch-size", "8", "--log-every", "1", "--sample-every", "1000", "--ckpt-every", "1000", "--attn-impl", "sdpa",
           torchrun=True)
    args = ["--ckpt", "dit/ckpt.pt", "--num-samples", "16", "--batch-size", "8", "--steps", "4"]
    script(tmp_path, "sample.py", *args, "--out", "alone.npz")
    script(tmp_path, "sample.py", *args, "--out", "torchrun.npz", torchrun=True)
    with np.load(tmp_path / "alone.npz") as a, np.load(tmp_path / "torchrun.npz") as b:
        assert a["arr_0"].shape == (16, 32, 32, 3) and np.array_equal(a["arr_0"], b["arr_0"])


def test_a_resume_with_deterministic_kernels_continues_bit_for_bit(tmp_path):
    common = ["--deterministic", "true", "--lpips-weight", "0", *TINY]
    script(tmp_path, "train_ae.py", "--out-dir", "straight", "--max-steps", "6", *common)
    script(tmp_path, "train_ae.py", "--out-dir", "resumed", "--max-steps", "3", *common)
    script(tmp_path, "train_ae.py", "--out-dir", "resumed", "--max-steps", "6", "--resume", "true")
    a, b = load(tmp_path / "straight/ckpt.pt"), load(tmp_path / "resumed/ckpt.pt")
    for key in ("model", "ema"):
        for name, t in a[key].items():
            assert torch.equal(t, b[key][name]), f"{key}.{name} differs after the resume"


def test_the_base_preset_step_fits_and_its_measured_peak_is_near_the_prediction():
    from experiments import bench
    from ae import PRESETS, DGAE, make_config
    from support.optim import make_optimizer

    cfg = make_config("base", compression=32)
    predicted = bench.predict_train_peak(cfg, PRESETS["base"]["batch_size"], True, False)
    dev = torch.device("cuda")
    torch.cuda.reset_peak_memory_stats(dev)
    net = DGAE(cfg).to(dev, memory_format=torch.channels_last)
    net.grad_checkpoint = True  # train_ae.py's default for base
    ema = DGAE(cfg).to(dev).requires_grad_(False)
    opt = make_optimizer(net, 1e-4, 0.0, (0.9, 0.99), dev)
    x = torch.randn(PRESETS["base"]["batch_size"], 3, 256, 256, device=dev).contiguous(memory_format=torch.channels_last)
    for _ in range(2):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss, _ = net(x, None)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    measured = torch.cuda.max_memory_allocated(dev) / 2**30
    print(f"\n{torch.cuda.get_device_name(dev)}: base f=32 batch {PRESETS['base']['batch_size']}, checkpointing on: measured "
          f"{measured:.1f} GiB, predicted {predicted:.1f} GiB")
    assert abs(measured - predicted) <= 0.15 * measured


def test_bench_runs_its_gpu_rows(tmp_path):
    out = script(tmp_path, "experiments/bench.py", "--quick", "true", "--json", "gpu.json")
    assert "bfloat16" in out and (tmp_path / "gpu.json").exists()
