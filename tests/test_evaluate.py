"""Stream evaluation (validation loss, `charrnn eval`): every character of the split counts,
each predicted from the state of the stream it belongs to."""

import numpy as np
import pytest

from charrnn.backend import get_backend
from charrnn.config import ModelConfig
from charrnn.evaluate import evaluate_stream
from charrnn.model import CharRNN


def _log_probs(model, ids, state):
    """Sum of log p(ids[t+1] | ids[:t+1]) at batch 1 from `state` -> (sum, final state)."""
    x, y = np.asarray(ids[:-1], np.int32)[:, None], np.asarray(ids[1:], np.int32)[:, None]
    logits, state, _ = model.forward(x, state)
    lp = model.backend.log_softmax_rows(logits.reshape(len(x), -1))
    return float(lp[np.arange(len(y)), y[:, 0]].sum()), state


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("n, batch, seq_len", [(237, 4, 10), (101, 8, 5), (64, 5, 7), (250, 6, 9), (40, 64, 100)])
def test_every_target_counts_and_the_tail_continues_the_last_stream(cell, n, batch, seq_len):
    rng = np.random.default_rng(n + batch)
    cfg = ModelConfig(cell=cell, vocab_size=11, embed=5, hidden=12, layers=2)
    model = CharRNN(cfg, backend=get_backend("reference"), dtype=np.float64, seed=int(rng.integers(1 << 30)))
    ids = rng.integers(0, 11, n)
    loss, count = evaluate_stream(model, ids, batch, seq_len)
    assert count == n - 1
    # Written out: stream j scores targets j*S+1 .. (j+1)*S from a zero state; the tail (the
    # last (n-1) mod b targets) continues the last stream.
    b = max(1, min(batch, (n - 1) // seq_len))
    S = (n - 1) // b
    total, state = 0.0, None
    for j in range(b):
        part, state = _log_probs(model, ids[j * S: (j + 1) * S + 1], model.zero_state(1))
        total += part
    if b * S < n - 1:
        part, _ = _log_probs(model, ids[b * S:], state)
        total += part
    assert loss == pytest.approx(-total / (n - 1), rel=1e-12)
