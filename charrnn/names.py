"""Names mode: batched generation of new names from a lines model, with filters.

All candidates of a round advance together, one model call per character position for the
whole batch (never one call per name). A candidate ends at the end token; candidates that
are too long, too short, lack the wanted substring, repeat an earlier result or, unless
allowed, appear in the training list are dropped, and rounds continue until enough names
pass or the attempt budget is spent.

Dimension letters: T=time, B=batch (candidates in a round), V=vocab.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from charrnn.model import State


@dataclass
class NameFilter:
    min_len: int = 2  # shortest name kept (characters)
    max_len: int = 16  # longest name kept (characters)
    start: str = ""  # every name begins with this prefix
    contains: str = ""  # every name contains this substring
    allow_seen: bool = False  # keep names that occur in the training list

    def validate(self) -> NameFilter:
        if self.min_len < 1:
            raise ValueError(f"min-len must be >= 1, got {self.min_len}")
        if self.max_len < self.min_len:
            raise ValueError(f"--min-len {self.min_len} is over --max-len {self.max_len}; raise "
                             "--max-len too")
        if len(self.start) > self.max_len:
            raise ValueError(f"start {self.start!r} is longer than max-len ({self.max_len})")
        if len(self.contains) > self.max_len:
            raise ValueError(f"contains {self.contains!r} is longer than max-len ({self.max_len})")
        return self

    def accepts(self, name: str, seen: set[str]) -> bool:
        return (self.min_len <= len(name) <= self.max_len and self.contains in name
                and (self.allow_seen or name not in seen))


def _round(model, vocab, prefix: np.ndarray, B: int, steps: int, temperature, top_k, top_p, rng):
    """Sample B candidates of at most `steps` characters after `prefix`.
    Returns (B, steps+1) ids and each candidate's length (-1: no end token within `steps`).

    Every candidate reads the same context (the end token, then the prefix), so it runs once
    at batch 1 and its state is copied B times. A candidate leaves the batch when it samples
    the end token: at names' ~1 in 7 chance per step, the later steps run a fraction of the
    rows (about 2.5x less work than stepping all B rows to max_len)."""
    be, eos = model.backend, vocab.eos_id
    xp = be.xp
    table = model.input_table()
    ctx = np.concatenate([[eos], prefix]).astype(np.int64)
    logits, state, _ = model.forward(ctx[:, None], model.zero_state(1), table=table)
    last = np.repeat(be.to_numpy(logits[-1]), B, axis=0)  # (B,V): the same row B times
    state = State(xp.repeat(state.h, B, axis=1),
                  None if state.c is None else xp.repeat(state.c, B, axis=1))
    out = np.zeros((B, steps + 1), np.int64)
    length = np.full(B, -1, np.int64)
    alive = np.arange(B)  # (A,) rows of out still sampling
    for t in range(steps + 1):
        ids = np.empty(alive.shape[0], np.int64)
        be.k.sample_rows(np.ascontiguousarray(last), temperature, top_k, top_p,
                         rng.random(alive.shape[0]), ids)
        out[alive, t] = ids
        going = ids != eos  # (A,)
        length[alive[~going]] = t
        if t == steps or not going.any():
            break
        if not going.all():
            alive, ids = alive[going], ids[going]
            keep = xp.asarray(np.flatnonzero(going))
            state = State(state.h[:, keep], None if state.c is None else state.c[:, keep])
        logits, state, _ = model.forward(ids[None, :], state, table=table)
        last = be.to_numpy(logits[0])
    return out, length


def _decode_rows(vocab, out, length) -> list[str | None]:
    """out (B,W) ids; length (B,) -> each row's text before its end token (None: no end)."""
    B, W = out.shape
    if vocab.kind == "text":  # one code point per id: decode everything once, then slice
        flat = vocab.decode(out.reshape(-1))
        return [flat[b * W : b * W + length[b]] if length[b] >= 0 else None for b in range(B)]
    return [vocab.decode(out[b, : length[b]]) if length[b] >= 0 else None for b in range(B)]


# A model runs out of new names it can write under the filters (3-letter names: a few hundred
# that come often, then a trickle). After each window of YIELD_WINDOW candidates, generation
# stops when that window's rate of new names could not reach n within the budget: without
# that, `-n 100000 --max-len 3` runs out its 200-per-name budget (20 million candidates,
# ~10 minutes) for a few more names.
YIELD_WINDOW = 20_000


def generate_names(model, vocab, n: int, flt: NameFilter, seen: set[str], temperature=0.8,
                   top_k=0, top_p=1.0, seed=None, batch=512, max_candidates=None) -> list[str]:
    """Up to n distinct names passing `flt`, drawn with the given sampling settings. Stops
    early after max_candidates tries (default 200 a name, at least 2,000), or when the new
    names of the last YIELD_WINDOW tries show that, at that rate, n are out of the budget's reach."""
    return list(iter_names(model, vocab, n, flt, seen, temperature, top_k, top_p, seed, batch,
                           max_candidates))


def iter_names(model, vocab, n: int, flt: NameFilter, seen: set[str], temperature=0.8,
               top_k=0, top_p=1.0, seed=None, batch=512, max_candidates=None):
    """generate_names' names one at a time, as each batch of candidates yields them (a long
    list prints as it goes, and an interrupted one keeps what it printed)."""
    if vocab.eos_id is None:
        raise ValueError("this model was not trained on lines (no end token); train with --lines")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    flt.validate()
    rng = np.random.default_rng(seed)
    prefix = np.asarray(vocab.encode(flt.start), np.int64) if flt.start else np.zeros(0, np.int64)
    steps = flt.max_len - len(prefix)
    budget = max_candidates or max(2000, 200 * n)
    taken: set[str] = set()  # the names found so far
    tried = window_start = window_found = 0
    while len(taken) < n and tried < budget:
        if tried - window_start >= YIELD_WINDOW:
            rate = window_found / (tried - window_start)  # new names a candidate
            if rate * (budget - tried) < n - len(taken):
                return  # out of reach at this rate
            window_start, window_found = tried, 0
        B = min(batch, max(64, 2 * (n - len(taken))))
        out, length = _round(model, vocab, prefix, B, steps, temperature, top_k, top_p, rng)
        tried += B
        for name in _decode_rows(vocab, out, length):
            if name is None:
                continue  # longer than max_len
            name = flt.start + name
            if name not in taken and flt.accepts(name, seen):
                taken.add(name)
                window_found += 1
                yield name
                if len(taken) == n:
                    return
