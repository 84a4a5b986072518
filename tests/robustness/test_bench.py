"""bench.py: its FLOP counts equal the hand-computed ones, and a --quick run writes every field.

No timing is asserted: speeds depend on the machine and on what else runs on it; that is bench.py's job.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from ae import PRESETS, make_config
from decoder_diffusion import attention
from experiments import bench

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_linear_flops_equal_hand_count():
    # y = x W^T + b: B * out dot products of length `in`, 2 FLOPs per multiply-add (the bias add is not counted)
    B, n_in, n_out = 5, 12, 7
    lin = torch.nn.Linear(n_in, n_out)
    x = torch.randn(B, n_in, requires_grad=True)
    assert bench.count_flops(lambda: lin(x)) == 2 * B * n_in * n_out
    # the backward is two matmuls of the same size: grad of the input and of the weight
    assert bench.count_flops(lambda: lin(x).sum().backward()) == 3 * 2 * B * n_in * n_out
    # tokens: (B, T, in) is B * T rows
    assert bench.count_flops(lambda: lin(torch.randn(B, 3, n_in))) == 2 * B * 3 * n_in * n_out


def test_attention_flops_equal_hand_count():
    # math attention: q k^T is (T x D) @ (D x T) and att v is (T x T) @ (T x D) per head, 2 B H T T D each
    B, H, T, D = 2, 3, 10, 4
    q, k, v = (torch.randn(B, H, T, D, requires_grad=True) for _ in range(3))
    fwd = 4 * B * H * T * T * D
    assert bench.attention_flops(B, H, T, D) == fwd
    assert bench.count_flops(lambda: attention(q, k, v, "math")) == fwd
    # backward: both operands of both matmuls get a gradient, one matmul each, so 2x the forward
    g = torch.randn(B, H, T, D)
    counted = bench.count_flops(lambda: torch.autograd.grad(attention(q, k, v, "math"), (q, k, v), g))
    assert counted == 3 * fwd == bench.attention_flops(B, H, T, D, backward=True)


def test_math_attention_counts_the_model_flops_of_any_impl():
    # the counter has no formula for the CPU fused kernel; bench counts every model through the math path
    from dit import SelfAttention
    layer = SelfAttention(16, 2, "sdpa")
    x = torch.randn(3, 5, 16)
    with bench.math_attention(layer):
        counted = bench.count_flops(lambda: layer(x))
    assert layer.attn_impl == "sdpa"  # restored
    linears = 2 * 3 * 5 * 16 * (3 * 16) + 2 * 3 * 5 * 16 * 16  # qkv and output projections
    assert counted == linears + bench.attention_flops(3, 2, 5, 8)


def test_checkpointed_step_uses_the_models_checkpointing_and_counts_model_flops_only(monkeypatch):
    # --checkpoint true switches on the model's own activation checkpointing, what the trainers'
    # --grad-checkpoint sets. The backward then recomputes each block's forward: hardware work, not model
    # FLOPs, so bench counts before switching it on, and the two rows carry the same count
    from decoder_diffusion import flow_matching_loss
    from dit import build_dit
    for name, value in dict(warmup=0, reps=1, compile=False, peak_flops_per_s=1.0, results={}).items():
        monkeypatch.setattr(bench, name, value)
    z, y = torch.randn(2, 4, 4, 4), torch.randint(0, 10, (2,))
    flow = lambda m, z, y: flow_matching_loss(lambda x_t, t: m(x_t, t, y), z)[0]  # noqa: E731
    for on in (False, True):
        monkeypatch.setattr(bench, "checkpoint", on)
        dit = build_dit("DiT-Tiny/2", 4, 4, 10)
        ema = bench.train_row(f"step_{on}", dit, flow, (z, y), torch.device("cpu"), bench.nullcontext())
        assert dit.grad_checkpoint == on and not ema.grad_checkpoint  # the EMA copy samples without it
        starts = []  # block forwards begun in one step: each twice when checkpointed (the replay)
        for block in dit.blocks:
            block.register_forward_pre_hook(lambda *_: starts.append(1))
        flow(dit, z, y).backward()
        assert len(starts) == len(dit.blocks) * (2 if on else 1)
    assert bench.results["step_True"]["flops"] == bench.results["step_False"]["flops"] > 0


def test_official_dit_step_is_timed_beside_ours(tmp_path, monkeypatch, capsys):
    # --official-dit loads models.py from a checkout by its path. A stand-in for facebookresearch/DiT's (which
    # needs timm): the same table and constructor, DiT_models[name](input_size, in_channels, num_classes, learn_sigma)
    (tmp_path / "models.py").write_text(
        "from dit import build_dit\n\n\n"
        "def tiny(input_size, in_channels, num_classes, learn_sigma):\n"
        "    assert not learn_sigma  # bench asks for our output: the velocity only\n"
        "    return build_dit('DiT-Tiny/1', input_size, in_channels, num_classes)\n\n\n"
        "DiT_models = {'DiT-Tiny/1': tiny}\n")
    settings = dict(warmup=0, reps=1, batch_size=2, sample_steps=1, official_dit=str(tmp_path), peak_flops_per_s=1.0,
                    results={})
    for name, value in settings.items():
        monkeypatch.setattr(bench, name, value)
    bench.stage2(make_config("tiny"), torch.device("cpu"), bench.nullcontext(), torch.no_grad)
    rows = bench.results
    assert rows["dit_official_train_step"]["flops"] == rows["dit_train_step"]["flops"] > 0  # the same model FLOPs
    bench.print_table(rows)
    assert "the official code's" in capsys.readouterr().out
    # no models.py there, or no such preset: one line each
    monkeypatch.setattr(bench, "official_dit", str(tmp_path / "elsewhere"))
    with pytest.raises(SystemExit, match="error: --official-dit: cannot import DiT_models from .*elsewhere"):
        bench.official_model(8, 4)
    monkeypatch.setattr(bench, "official_dit", str(tmp_path))
    monkeypatch.setattr(bench, "dit_preset", "DiT-S/2")
    with pytest.raises(SystemExit, match="has no DiT-S/2; its presets: DiT-Tiny/1"):
        bench.official_model(8, 4)


@pytest.mark.slow  # a whole bench.py run: about 25 s
def test_quick_run_writes_every_field(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "bench.py"), "--quick", "true", "--json", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = json.loads(out.read_text())
    assert run["device"] and run["settings"]["quick"] is True
    rows = run["results"]
    expected = ["matmul_256", "ae_train_step", "dit_train_step", "dit_sample", "data_pipeline"]
    expected += [f"ae_decode_{n}" for n in (1, 3, 10, 50)]
    expected += [f"attn_{impl}_T{T}_{p}" for impl in ("math", "math_compiled", "sdpa") for T in (16, 64)
                 for p in ("fwd", "fwd_bwd")]
    assert sorted(rows) == sorted(expected)
    fields = {"ms", "ms_per_img", "img_per_s", "flops", "flops_per_s", "mfu", "peak_mib"}
    for name, row in rows.items():
        assert fields <= set(row), name
        assert row["ms"] > 0, name
        if name != "data_pipeline":  # every model row has a FLOP count, a utilisation and a memory peak
            assert row["flops"] > 0 and 0 < row["mfu"] and row["peak_mib"] > 0, name
    for name in ("ae_train_step", "dit_train_step", "dit_sample", "data_pipeline", "ae_decode_10"):
        assert rows[name]["img_per_s"] > 0, name
    assert rows["matmul_256"]["mfu"] == 1.0
    assert rows["dit_train_step"]["tokens"] == rows["dit_sample"]["tokens"] == 64  # DiT-Tiny/1 on an 8x8 latent
    assert rows["data_pipeline"]["num_workers"] == 1
    # the same model FLOPs for every attention implementation (so their MFUs compare)
    assert rows["attn_sdpa_T64_fwd_bwd"]["flops"] == rows["attn_math_T64_fwd_bwd"]["flops"]
    # the decoder's FLOPs grow with the number of steps it runs
    assert rows["ae_decode_50"]["flops"] == 50 * rows["ae_decode_1"]["flops"]
    # --compare reads two saved runs
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "bench.py"), "--compare", f"{out},{out}"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "dit_train_step" in proc.stdout, proc.stderr[-2000:]


def test_an_unavailable_device_is_one_line(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["bench.py", "--device", "foo", "--quick", "true"])
    with pytest.raises(SystemExit, match="^error: --device foo is not available on this machine, which has: cpu"):
        bench.main()


# -----------------------------------------------------------------------------
# the memory model (bench.py --parts memory)


def test_cuda_autocast_rules_cast_as_cuda_autocast_does():
    """Known answers from CUDA autocast's lists: a convolution and a linear layer run in bf16, GroupNorm and
    softmax in fp32, and an op on neither list (nearest upsampling, an add) keeps its input's dtype."""
    x = torch.randn(2, 4, 8, 8, device="meta")
    conv, lin, gn = torch.nn.Conv2d(4, 4, 3, padding=1, device="meta"), torch.nn.Linear(8, 3, device="meta"), torch.nn.GroupNorm(2, 4, device="meta")
    with bench.CudaAutocastRules():
        h = conv(x)
        assert h.dtype == torch.bfloat16 and lin(x).dtype == torch.bfloat16
        assert gn(h).dtype == torch.float32 and h.softmax(-1).dtype == torch.float32
        assert torch.nn.functional.interpolate(h, scale_factor=2.0).dtype == torch.bfloat16
        assert (h + x).dtype == torch.float32  # type promotion, as under autocast
    assert conv(x).dtype == torch.float32  # nothing outside the mode


def test_live_bytes_counts_what_is_alive_and_the_peak():
    with bench.LiveBytes() as mem:
        a = torch.empty(1000, device="meta")  # 4000 B -> 4096 in 512-byte blocks
        b = torch.empty(256, device="meta")  # 1024 B
        view = a[10:]  # a view: no new storage
        del b
        c = torch.empty(100, device="meta")  # 400 B -> 512
    assert mem.peak == 4096 + 1024 and mem.now == 4096 + 512
    del a, view, c


def test_the_meta_prediction_equals_the_bytes_of_a_real_cpu_step():
    """The same two training steps on the meta device and on real CPU tensors (fp32, small sizes) hold the same
    tensors, so the prediction equals the count on the CPU within 1% (a few CPU kernels make temporaries of
    their own: 0.1% here), checkpointing on and off. (Against the
    process's measured resident memory it is within 7% for the small preset and 36% (88 MiB) for tiny with
    checkpointing: README, 'Memory on a GPU'; that measurement needs seconds and GBs, so bench.py reports it.)"""
    cfg = make_config("tiny", unet_ch=16, enc_ch=16, cond_ch=16)
    meta = {ckpt: bench.train_step_peak(cfg, 4, torch.device("meta"), False, ckpt, False) for ckpt in (False, True)}
    for ckpt in (False, True):
        cpu = bench.train_step_peak(cfg, 4, torch.device("cpu"), False, ckpt, False)
        assert abs(meta[ckpt] - cpu) <= 0.01 * cpu, (ckpt, meta[ckpt], cpu)
    # and checkpointing saves memory, bf16 rules too
    assert meta[True] < meta[False]
    assert bench.train_step_peak(cfg, 4, torch.device("meta"), True, False, False) < meta[False]


def test_the_readme_imagenet_commands_fit_an_80gb_gpu_by_the_model():
    """`train_ae.py --data IMAGENET --compression 32` (one GPU, one node, many nodes: the same per-GPU step)
    runs the base preset at batch 32 with LPIPS, checkpointing on by default for base: its predicted peak fits
    80 GB after the headroom, with at least 25% of the room to spare. Without checkpointing it would not fit."""
    import train_ae

    cfg = make_config("base", compression=32)
    assert train_ae.checkpointing_on("auto", "base") and not train_ae.checkpointing_on("auto", "tiny")
    room = bench.memory_available_gib(80)
    peak = bench.predict_train_peak(cfg, PRESETS["base"]["batch_size"], True, True)
    assert peak < 0.75 * room, (peak, room)
    assert bench.predict_train_peak(cfg, PRESETS["base"]["batch_size"], False, False) > room
    # stage 2's README command: DiT-XL/1 on those 16x8x8 latents at batch 32 per GPU
    dit = bench.dit_step_peak("DiT-XL/1", (16, 8, 8), 32, torch.device("meta"), True, False) / 2**30
    assert dit < 0.75 * room, (dit, room)
