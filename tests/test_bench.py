"""bench.py runs and reports every number it promises (it asserts no speed: that is its job)."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_prints_all_measurements():
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench.py"), "--steps", "1", "--warmup", "0",
                           "--batch-size", "2", "--decode-steps", "2"], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    for line in ("device:", "train step:", "reconstruction (2 Euler steps)", "DiT-Tiny/1", "attention math", "attention sdpa"):
        assert line in proc.stdout
    assert "img/s" in proc.stdout and "latents/s" in proc.stdout
