"""Text generation: temperature / top-k / top-p sampling, prime text, seeds, streaming.

`generate` yields text as it is produced so the CLI can stream it. The same seed gives the
same text. Lines models (names) restart from a fresh state after every end token, so their
samples are a stream of new lines.

Dimension letters: T=time, B=batch, V=vocab.
"""

from __future__ import annotations

import codecs

import numpy as np

from charrnn.config import SampleConfig


def _start_context(vocab, prime: str, lines: bool) -> np.ndarray:
    ids = np.asarray(vocab.encode(prime), np.int64) if prime else np.zeros(0, np.int64)
    if lines:
        return np.concatenate([[vocab.eos_id], ids])
    if len(ids):
        return ids
    # No prime: condition on a newline, as if starting a fresh paragraph.
    nl = vocab.encode("\n") if "\n" in vocab.tokens else np.zeros(1, np.int64)
    return np.asarray(nl, np.int64)


def generate(model, vocab, cfg: SampleConfig, lines: bool = False):
    """Yield generated text piece by piece (cfg.length tokens; the prime is not included)."""
    cfg.validate()
    be = model.backend
    rng = np.random.default_rng(cfg.seed)
    table = model.input_table()
    top_k = 1 if cfg.argmax else cfg.top_k
    context = _start_context(vocab, cfg.prime, lines)
    state = model.zero_state(1)
    if len(context) > 1:
        _, state, _ = model.forward(context[:-1, None], state, table=table)
    cur = int(context[-1])
    out = np.zeros(1, np.int64)
    x = np.zeros((1, 1), np.int64)  # (T=1, B=1)
    utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace") if vocab.kind == "bytes" else None
    for _ in range(cfg.length):
        x[0, 0] = cur
        logits, state, _ = model.forward(x, state, table=table)
        row = be.to_numpy(logits[0])  # (1,V)
        be.k.sample_rows(row, cfg.temperature, top_k, cfg.top_p, rng.random(1), out)
        cur = int(out[0])
        if lines and cur == vocab.eos_id:
            yield "\n"
            state = model.zero_state(1)
            continue
        if utf8 is not None:
            piece = utf8.decode(bytes(vocab.decode_bytes([cur])))
        else:
            piece = vocab.decode([cur])
        if piece:
            yield piece
    if utf8 is not None:
        tail = utf8.decode(b"", final=True)
        if tail:
            yield tail
