"""Optimisation: Adam / AdamW, global-norm gradient clipping, and the learning-rate schedule.

The arithmetic lives in the kernel module handed in (`charrnn.kernels.reference`, `.cpu` or
the CUDA twin): `adam_update_all` updates every parameter in place and `sum_squares_total`
feeds the global norm. This module only keeps the state (moments, step count) and decides which
parameters are decayed, so every backend runs the same optimizer.
"""

from __future__ import annotations

import math
from types import ModuleType

import numpy as np

from charrnn.config import SCHEDULES

M_PREFIX = "train.adam.m."  # checkpoint names of the first moments
V_PREFIX = "train.adam.v."  # and of the second moments


def _host(a) -> np.ndarray:
    # cupy arrays copy to the host with .get(); numpy arrays are copied so the caller's
    # checkpoint does not change under it when the next step updates the moments.
    return a.get() if hasattr(a, "get") and not isinstance(a, np.ndarray) else np.array(a)


class Adam:
    """Adam / AdamW over a dict of named parameter arrays, updated in place.

    decoupled=True is AdamW (p *= 1 - lr*weight_decay before the Adam step); False is
    classic Adam with an L2 term (weight_decay * p added to the gradient). Either way only
    weight matrices (ndim >= 2) are decayed, never biases. Matches torch.optim.AdamW / Adam
    with the biases in a weight_decay=0 group.

    xp is the array module of the parameters (numpy, or cupy on the GPU); the moments are
    created with it so they live where the parameters do.
    """

    def __init__(self, params: dict, kernels: ModuleType, lr: float = 2e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, decoupled: bool = True, xp: ModuleType = np):
        beta1, beta2 = betas
        for name, value in (("beta1", beta1), ("beta2", beta2)):
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {value}; "
                                 "hint: 0.9 and 0.999 are usual")
        if eps <= 0:
            raise ValueError(f"eps must be > 0, got {eps}; hint: 1e-8 is usual")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        self.params = params
        self.k = kernels
        self.lr = float(lr)
        self.beta1, self.beta2 = float(beta1), float(beta2)
        self.eps = float(eps)
        self.weight_decay = float(weight_decay)
        self.decoupled = bool(decoupled)
        self.t = 0  # steps taken
        self.m = {n: xp.zeros_like(p) for n, p in params.items()}  # first moments
        self.v = {n: xp.zeros_like(p) for n, p in params.items()}  # second moments
        self.xp = xp

    @classmethod
    def from_config(cls, params: dict, kernels: ModuleType, cfg, xp: ModuleType = np) -> Adam:
        """Build from a TrainConfig: optimizer 'adamw' is decoupled, 'adam' uses L2."""
        return cls(params, kernels, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                   weight_decay=cfg.weight_decay, decoupled=cfg.optimizer == "adamw", xp=xp)

    def _decay(self, p) -> tuple[float, float]:
        """(l2, decay) for one parameter: weight matrices only."""
        wd = self.weight_decay if p.ndim >= 2 else 0.0
        return (0.0, wd) if self.decoupled else (wd, 0.0)

    def step(self, grads: dict, lr: float | None = None) -> None:
        """One update of every parameter from `grads` (same names and shapes); lr defaults
        to the constructor's (the trainer passes lr_at(step, cfg))."""
        if grads.keys() != self.params.keys():
            missing = sorted(set(self.params) - set(grads))
            extra = sorted(set(grads) - set(self.params))
            raise ValueError(f"gradients do not match parameters (missing {missing}, unknown "
                             f"{extra}); hint: pass one gradient per parameter, as "
                             "model.backward returns")
        lr = self.lr if lr is None else float(lr)
        self.t += 1
        bc1 = 1.0 - self.beta1**self.t
        bc2 = 1.0 - self.beta2**self.t
        for name, p in self.params.items():
            g = grads[name]
            if g.shape != p.shape:
                raise ValueError(f"gradient {name} has shape {tuple(g.shape)}, parameter has "
                                 f"{tuple(p.shape)}; hint: gradients must match their parameters")
        names = list(self.params)
        l2s, decays = [], []
        for n in names:
            l2, decay = self._decay(self.params[n])
            l2s.append(l2)
            decays.append(decay)
        self.k.adam_update_all([self.params[n] for n in names], [grads[n] for n in names],
                               [self.m[n] for n in names], [self.v[n] for n in names], lr,
                               self.beta1, self.beta2, self.eps, bc1, bc2, l2s, decays)

    def state_tensors(self) -> dict[str, np.ndarray]:
        """Host copies of the moments, named for the checkpoint ("train." is never halved)."""
        out = {}
        for name in self.params:
            out[M_PREFIX + name] = _host(self.m[name])
            out[V_PREFIX + name] = _host(self.v[name])
        return out

    def load_state_tensors(self, tensors: dict, t: int) -> None:
        """Restore moments and step count. `tensors` may be a whole checkpoint's tensors:
        names outside "train.adam." are ignored; unknown or misshapen moments raise."""
        if isinstance(t, bool) or not isinstance(t, (int, np.integer)) or t < 0:
            raise ValueError(f"optimizer step t must be an integer >= 0, got {t!r}")
        ours = {n for n in tensors if n.startswith((M_PREFIX, V_PREFIX))}
        expected = {M_PREFIX + n for n in self.params} | {V_PREFIX + n for n in self.params}
        if ours != expected:
            missing, extra = sorted(expected - ours), sorted(ours - expected)
            raise ValueError(f"optimizer state does not match the model (missing {missing}, "
                             f"unknown {extra}); hint: resume with the model config the "
                             "checkpoint was trained with")
        for name, p in self.params.items():
            for prefix in (M_PREFIX, V_PREFIX):
                a = tensors[prefix + name]
                if tuple(a.shape) != tuple(p.shape):
                    raise ValueError(f"optimizer state {prefix + name} has shape "
                                     f"{tuple(a.shape)}, parameter has {tuple(p.shape)}; "
                                     "hint: resume with the same model config")
        # Validated everything first, so a bad checkpoint leaves the optimizer untouched.
        for name, p in self.params.items():
            self.m[name] = self.xp.array(tensors[M_PREFIX + name], dtype=p.dtype)
            self.v[name] = self.xp.array(tensors[V_PREFIX + name], dtype=p.dtype)
        self.t = int(t)


def global_norm(grads: dict, kernels: ModuleType) -> float:
    """sqrt of the sum of squares of every gradient (accumulated in float64 by the kernel;
    on the GPU one reduction over all of them, so one sync with the host per step)."""
    return math.sqrt(kernels.sum_squares_total(list(grads.values())))


def clip_grad_norm(grads: dict, max_norm: float, kernels: ModuleType) -> float:
    """Scale every gradient in place by max_norm / norm when the global norm exceeds max_norm
    (> 0; 0 disables), so the clipped norm equals max_norm. Returns the norm before clipping.
    A non-finite norm leaves the gradients untouched: scaling by 0 or nan would hide the
    blow-up, so the caller sees it in the returned value and decides (skip, stop)."""
    norm = global_norm(grads, kernels)
    if max_norm > 0 and math.isfinite(norm) and norm > max_norm:
        scale = max_norm / norm
        for g in grads.values():
            g *= scale
    return norm


def lr_at(step: int, cfg, total_steps: int | None = None) -> float:
    """Learning rate for optimizer step `step` (counting from 0) under a TrainConfig.

    Warm-up: while step < cfg.warmup, lr * (step + 1) / warmup (linear, reaching lr on the
    last warm-up step). After it, with s = step - warmup:
      constant  lr
      step      lr * decay_rate ** (s // decay_every)
      cosine    half-cosine from lr at s = 0 down to lr * min_lr_frac at step == total_steps
                (cfg.steps unless given, e.g. when epochs set the length), constant after.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if cfg.schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {cfg.schedule!r}; valid: {', '.join(SCHEDULES)}")
    lr, warmup = float(cfg.lr), int(cfg.warmup)
    if step < warmup:
        return lr * (step + 1) / warmup
    s = step - warmup
    if cfg.schedule == "constant":
        return lr
    if cfg.schedule == "step":
        return lr * cfg.decay_rate ** (s // cfg.decay_every)
    total = (cfg.steps if total_steps is None else total_steps) - warmup
    progress = 1.0 if total <= 0 else min(s / total, 1.0)
    floor = lr * cfg.min_lr_frac
    return floor + (lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


__all__ = ["Adam", "clip_grad_norm", "global_norm", "lr_at"]
