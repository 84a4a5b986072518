"""
The optimizer, the learning-rate schedule and the EMA of the weights, which both trainers use.

    optimizer = make_optimizer(model, lr, weight_decay, betas, device)  # AdamW
    group["lr"] = lr_at(step, lr, warmup_steps, ...)  # each group: warm-up, constant, cool-down
    update_ema(ema, model, ema_decay_at(step, decay))  # ema = d ema + (1 - d) w

All three are our choices (the paper gives no schedule); docs/NOTES.md has the runs that chose them.
"""

import torch


def make_optimizer(model, lr, weight_decay, betas, device):
    """AdamW, fused on CUDA, with weight decay on matrices and kernels, not on gains and biases."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=device.type == "cuda")


def lr_at(step, base_lr, warmup_steps, max_steps=0, cooldown_steps=0):
    """The learning rate of `step`: a linear warm-up from 0 over warmup_steps, constant (as DiT
    trains), then a linear cool-down to 0 over the last cooldown_steps of max_steps. The cool-down
    makes the last weights good ones (at a constant rate they keep jumping around the optimum); as
    it is tied to max_steps, extend a run from a checkpoint taken before its cool-down began."""
    warmup = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
    cooldown = min(1.0, (max_steps - step) / cooldown_steps) if cooldown_steps > 0 else 1.0
    return base_lr * min(warmup, cooldown)


def ema_decay_at(step, decay, warmup=34):
    """EMA warm-up: min(decay, (1 + step) / (warmup + step)), an average over roughly the last
    step / (warmup - 1) steps until it reaches decay's own span of 1 / (1 - decay) steps. A fixed
    0.999 would still hold 0.999^1200 = 30% of the random initial weights after 1200 steps."""
    return min(decay, (1 + step) / (warmup + step))


@torch.no_grad()
def update_ema(ema_model, model, decay):
    """ema = decay * ema + (1 - decay) * model for every parameter and float buffer (others copied),
    as one multi-tensor lerp. decay: a number, or a 0-dim tensor on the model's device
    (checkpoints.StepGuard.ema_decay: 1 for a skipped step, without a host sync)."""
    ema_t, model_t = [], []
    for e, p in zip(ema_model.state_dict().values(), model.state_dict().values()):
        if e.dtype.is_floating_point:
            ema_t.append(e)
            model_t.append(p.to(e.dtype))
        else:
            e.copy_(p)
    torch._foreach_lerp_(ema_t, model_t, 1.0 - decay)
