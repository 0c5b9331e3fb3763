"""Likelihood of text under a model: validation loss, `charrnn eval` and `charrnn score`.

Prose is evaluated as B parallel streams with the hidden state carried from window to
window (resetting it per window would overstate the loss, a known torch-rnn eval artefact);
lines are evaluated framed by the end token, counting every predicted token including the
final end token (makemore's convention).

Dimension letters: T=time, B=batch, V=vocab.
"""

from __future__ import annotations

import math

import numpy as np

from charrnn.data import line_batches, stream_windows
from charrnn.model import State


def evaluate_stream(model, ids, batch_size: int = 64, seq_len: int = 100, max_chars: int = 0):
    """ids (N,) -> (mean nats per predicted char, N-1 predicted chars)."""
    if len(ids) < 2:
        raise ValueError(f"need at least 2 characters to evaluate, got {len(ids)}")
    if max_chars:
        ids = ids[: max_chars + 1]
    total, count, state = 0.0, 0, None
    for x, y in stream_windows(ids, batch_size, seq_len):
        if state is None:
            state = model.zero_state(x.shape[1])
        logits, state, _ = model.forward(x, state)
        loss, _, n = model.loss(logits, y)
        total += loss * n
        count += int(n)
    # The streams (B' = min(B, (N-1) // seq_len) of them, S targets each) cover all but the last
    # (N-1) - B'*S targets, which follow the last stream's end: score them from that stream's
    # state, so every character counts. count is B'*S here, the index of the tail's first input.
    # (The state is copied contiguous: the step kernels take C-ordered arrays.)
    if count < len(ids) - 1:
        xp = model.backend.xp
        last = State(xp.ascontiguousarray(state.h[:, -1:]),
                     None if state.c is None else xp.ascontiguousarray(state.c[:, -1:]))
        tail = np.asarray(ids[count:], np.int32)  # inputs tail[:-1], targets tail[1:]
        logits, _, _ = model.forward(tail[:-1, None], last)
        loss, _, n = model.loss(logits, tail[1:, None])
        total += loss * n
        count += int(n)
    return total / count, count


def evaluate_lines(model, lines, eos_id: int, batch_size: int = 256):
    """lines: list of id arrays -> (mean nats per predicted token, number of tokens)."""
    if not lines:
        raise ValueError("no lines to evaluate")
    total, count = 0.0, 0
    for batch in line_batches(lines, batch_size, eos_id):
        logits, _, _ = model.forward(batch.x, model.zero_state(batch.x.shape[1]))
        loss, _, n = model.loss(logits, batch.y, batch.mask)
        total += loss * n
        count += int(n)
    return total / count, count


def score_text(model, vocab, text: str, lines: bool) -> dict:
    """Log-likelihood of one string. Lines models score it as a whole line (start and end
    tokens framing it); stream models score every character after the first."""
    ids = np.asarray(vocab.encode(text), np.int64)
    if lines:
        eos = vocab.eos_id
        seq = np.concatenate([[eos], ids, [eos]])
    else:
        if len(ids) < 2:
            raise ValueError(f"text {text!r}: a stream model needs at least 2 characters to score")
        seq = ids
    x, y = seq[:-1, None], seq[1:, None]  # (T,1)
    logits, _, _ = model.forward(x, model.zero_state(1))
    logp = model.backend.to_numpy(model.backend.log_softmax_rows(logits.reshape(len(x), -1)))
    lp = logp[np.arange(len(y)), y[:, 0]]  # (T,) log-prob of each target
    total = float(lp.sum())
    return {
        "text": text,
        "logprob": total,
        "tokens": len(lp),
        "nats_per_token": -total / len(lp),
        "bits_per_token": -total / len(lp) / math.log(2),
    }
