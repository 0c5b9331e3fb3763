"""Dynamic evaluation (Krause et al. 2018, "Dynamic Evaluation of Neural Sequence Models").

The model reads the text once, in order, as one stream (batch 1, hidden state carried from
window to window). Each window of seq_len characters is first scored with the current
weights, and only then is one gradient step taken on that window's loss, so the model
adapts to the text it has already read (names, words and turns of phrase that recur) and
never to the characters it is about to be scored on. The update is Krause's "SGD with a
decay to the static weights":

    theta <- theta - lr * clip(g) + decay * (theta0 - theta)

with g the gradient of the window's mean loss, its global norm clipped to max_norm.

The number is not a static loss: the model has learned from the evaluation text itself
(causally), so it is reported beside the static loss, never in place of it.

Dimension letters: T=time (one window), N=characters of the stream.
"""

from __future__ import annotations

import math

import numpy as np

from charrnn.data import stream_windows
from charrnn.optim import clip_grad_norm

# Defaults picked on the shipped Shakespeare LSTM (3x512) on characters 20,000-40,000 of the
# validation split (not the first 20,000, which the README reports), batch-1 static loss
# 1.4861 there. Dynamic, seq_len 50, clip 1.0: lr 0.05 -> 1.4472, 0.1 -> 1.4384, 0.2 -> 1.4387;
# at lr 0.1, decay 0 -> 1.4384, 1e-3 -> 1.4379, 1e-2 -> 1.4413. On 5,000 characters, clip 1.0
# beat no clipping (1.4287 vs 1.4381 at lr 0.1), lr 0.3 unclipped did worse than static
# (1.4811 vs 1.4557), and seq_len 20 gained 0.011 more than 50 at twice the time per character.
DYN_SEQ_LEN = 50  # T: characters scored between two updates
DYN_LR = 0.1  # step on the gradient of the window's MEAN loss (0.002 per character summed)
DYN_DECAY = 1e-3  # pull towards the static weights per update (0: none)
DYN_CLIP = 1.0  # global-norm clip of each window's gradient (0: off); lr * clip bounds a step


def check_options(seq_len: int, lr: float, decay: float, max_norm: float) -> None:
    """ValueError naming the first bad setting (callers check before any long work)."""
    if isinstance(seq_len, bool) or not isinstance(seq_len, (int, np.integer)) or seq_len < 1:
        raise ValueError(f"dynamic evaluation: seq-len must be an integer >= 1, got {seq_len!r}")
    if not (math.isfinite(lr) and lr >= 0):
        raise ValueError(f"dynamic evaluation: lr must be >= 0, got {lr}; hint: {DYN_LR:g} is the default")
    if not (math.isfinite(decay) and 0 <= decay <= 1):
        raise ValueError(f"dynamic evaluation: decay must be in [0, 1], got {decay}; "
                         f"hint: {DYN_DECAY:g} is the default")
    if not (math.isfinite(max_norm) and max_norm >= 0):
        raise ValueError(f"dynamic evaluation: clip must be >= 0 (0: no clipping), got {max_norm}")


def evaluate_dynamic(model, ids, seq_len: int = DYN_SEQ_LEN, lr: float = DYN_LR, decay: float = DYN_DECAY,
                     max_norm: float = DYN_CLIP, max_chars: int = 0, on_window=None):
    """ids (N,) of one stream (a prose model) -> (mean nats per predicted char, count).

    Every window's loss is taken before the update made from it (see the module docstring).
    on_window(index, loss, count), if given, is called with each window's mean loss as
    scored, e.g. to watch the adaptation or to check causality.

    The model's parameters are updated in place while it runs (with its backend's array
    module, so any backend works) and restored bit for bit at the end, also on error.

    Defaults (seq_len 50, lr 0.1, decay 1e-3, clip 1.0; the experiment is beside the
    constants) were picked on the shipped Shakespeare model on validation text that is not
    reported: about 0.05 nats/char below the static loss on 20,000 characters. The gradient
    is that of the window's mean loss, so lr 0.1 is 0.002 on the summed loss of a 50-char
    window. The clip bounds one window's step (lr * clip) and mattered more than lr: a
    window of unusual text otherwise throws the weights far off. The small decay gained
    little here (0.0005) but bounds how far a long text can pull the weights from the
    trained ones; 1e-2 already forgot too fast. A shorter window adapts sooner but costs
    more per character (seq_len 20: ~2x the time, ~0.01 nats/char better).
    """
    check_options(seq_len, lr, decay, max_norm)
    if not (hasattr(ids, "ndim") and ids.ndim == 1 and ids.dtype.kind in "iu"):
        raise ValueError("dynamic evaluation needs one stream of character ids (a prose model); "
                         "lines (names) models score every line from a fresh state, so there is "
                         "no running text to adapt to")
    if len(ids) < 2:
        raise ValueError(f"dynamic evaluation needs at least 2 characters, got {len(ids)}")
    if max_chars:
        ids = ids[: max_chars + 1]
    params, kernels = model.params, model.backend.k
    static = {n: p.copy() for n, p in params.items()}  # theta0: the decay target and the restore point
    total, count, state = 0.0, 0, model.zero_state(1)
    try:
        for i, (x, y) in enumerate(stream_windows(ids, 1, seq_len)):  # x, y (T,1)
            logits, next_state, cache = model.forward(x, state)
            loss, dlogits, n = model.loss(logits, y)
            # Scored before any update from this window: its own characters never help it.
            total += loss * n
            count += int(n)
            if on_window is not None:
                on_window(i, loss, int(n))
            grads = model.backward(cache, dlogits)
            norm = clip_grad_norm(grads, max_norm, kernels)
            # A non-finite gradient would turn every weight into nan for the rest of the text:
            # skip that window's update instead.
            if math.isfinite(norm):
                for name, p in params.items():
                    # theta - lr*g + decay*(theta0 - theta) = (1-decay)*theta + decay*theta0 - lr*g
                    if decay:
                        p *= 1.0 - decay
                        p += decay * static[name]
                    if lr:
                        p -= lr * grads[name]
            # The next window starts from the state computed with the weights this window was
            # scored with; recomputing it with the updated weights would cost a second forward.
            state = next_state
            del grads, cache  # parameter- and window-sized: not alive through the next forward
    finally:
        for name, p in params.items():
            p[...] = static[name]
    return total / count, count


__all__ = ["DYN_CLIP", "DYN_DECAY", "DYN_LR", "DYN_SEQ_LEN", "check_options", "evaluate_dynamic"]
