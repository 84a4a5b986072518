"""
Runs a training script under torchrun and checks that DDP keeps the weights of every rank identical:

    torchrun --nproc_per_node=2 tests/robustness/ddp_replicas.py train_ae.py --max-steps 2 ...

At every checkpoint (checkpoints.save_training, which every rank calls) the ranks first compare a
hash of their model and EMA weights. Rank 0 prints "weights identical on all N ranks at step S";
weights that differ stop the run with an AssertionError on every rank. Apart from that the script
runs as it does from the command line (its __main__ block). The check lives here, with the tests,
so that the training scripts do not carry it.
"""

import hashlib
import os
import runpy
import sys

import torch
import torch.distributed as torch_dist

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def command(script, nproc=2):
    """The command that runs `script` (a path) on `nproc` ranks through this check; its arguments follow."""
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", os.path.abspath(__file__), script]


def digest(module):
    """A hash of every tensor in the module's state_dict, bit for bit (equal hashes: equal weights)."""
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def check_replicas(dist, step, *modules):
    """Assert that every rank holds the same `modules`; rank 0 says so. Call it on every rank."""
    digests = [None] * dist.world_size  # indexed by rank
    torch_dist.all_gather_object(digests, [digest(m) for m in modules])
    assert all(d == digests[0] for d in digests), f"weights differ between ranks at step {step}: {digests}"
    if dist.master:  # printed now: common.shutdown ends the workers with os._exit
        print(f"weights identical on all {dist.world_size} ranks at step {step}", flush=True)


def main():
    script, *args = sys.argv[1:]
    # the script's folder first on the path, as `python script.py` puts it, then the repository
    sys.path[0] = os.path.dirname(os.path.abspath(script))
    sys.path.insert(1, ROOT)
    from support import checkpoints

    save_training = checkpoints.save_training

    def checked_save_training(path, dist, kind, step, net, ema, *rest, **extra):
        if dist.ddp:
            check_replicas(dist, step, net, ema)
        return save_training(path, dist, kind, step, net, ema, *rest, **extra)

    # the scripts call checkpoints.save_training through the module, so every call is the checked one
    checkpoints.save_training = checked_save_training
    sys.argv = [script, *args]
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
