"""Names mode: filters, novelty, no duplicates, seeds, and batched generation."""

from collections import Counter

import numpy as np
import pytest

from charrnn import names as names_mod
from charrnn.config import ModelConfig
from charrnn.model import CharRNN
from charrnn.names import NameFilter, generate_names
from charrnn.vocab import Vocab

LETTERS = "abcdefghij"


@pytest.fixture(scope="module")
def model_vocab():
    vocab = Vocab.build(Counter(LETTERS), lines=True)
    cfg = ModelConfig(vocab_size=len(vocab), embed=8, hidden=16, layers=2)
    model = CharRNN(cfg, seed=4)
    # Make the end token likely enough that random names have name-like lengths.
    model.params["decoder.bias"][vocab.eos_id] = 1.5
    return model, vocab


def test_filters_hold_for_every_name(model_vocab):
    model, vocab = model_vocab
    flt = NameFilter(min_len=3, max_len=8, start="b", contains="a")
    out = generate_names(model, vocab, 15, flt, set(), temperature=1.2, seed=0)
    assert len(out) == 15 and len(set(out)) == 15
    for n in out:
        assert n.startswith("b") and "a" in n and 3 <= len(n) <= 8 and set(n) <= set(LETTERS)


def test_novelty_filter_and_allow_seen(model_vocab):
    model, vocab = model_vocab
    free = generate_names(model, vocab, 40, NameFilter(min_len=1, max_len=3), set(), seed=1)
    seen = set(free[:20])
    novel = generate_names(model, vocab, 40, NameFilter(min_len=1, max_len=3), seen, seed=1)
    assert not seen & set(novel)
    kept = generate_names(model, vocab, 40, NameFilter(min_len=1, max_len=3, allow_seen=True), seen, seed=1)
    assert kept == free  # same seed, same draws, nothing rejected


def test_same_seed_same_names(model_vocab):
    model, vocab = model_vocab
    a = generate_names(model, vocab, 10, NameFilter(), set(), seed=7)
    b = generate_names(model, vocab, 10, NameFilter(), set(), seed=7)
    c = generate_names(model, vocab, 10, NameFilter(), set(), seed=8)
    assert a == b and a != c


def test_generation_is_batched(model_vocab, monkeypatch):
    """1000 names cost a few rounds of at most (max_len + 1) model calls, never one call per
    name: the shared context runs once at batch 1, then the whole batch steps together and
    shrinks as candidates end."""
    model, vocab = model_vocab
    calls = []
    real = model.forward

    def counting(ids, state, **kw):
        calls.append(ids.shape[1])
        return real(ids, state, **kw)

    monkeypatch.setattr(model, "forward", counting)
    flt = NameFilter(min_len=2, max_len=10, allow_seen=True)
    out = generate_names(model, vocab, 1000, flt, set(), temperature=1.0, seed=3)
    assert len(out) == 1000
    assert len(calls) < 1000 / 10  # rounds x steps, far fewer than names
    assert max(calls) >= 256  # a round's candidates advance together
    rounds, cur = [], None
    for b in calls:
        if b == 1:  # the context of a new round
            cur = []
            rounds.append(cur)
        else:
            cur.append(b)
    assert len(rounds) >= 2 and all(r for r in rounds)
    assert all(r == sorted(r, reverse=True) for r in rounds)  # ended candidates leave
    assert any(r[-1] < r[0] for r in rounds)


def test_ended_candidates_leave_the_batch_without_changing_the_names(model_vocab):
    """The shrinking batch samples exactly the names a full-batch loop would: each
    candidate's draws depend on its own state only (same model, same uniforms)."""
    from charrnn.names import _round

    model, vocab = model_vocab
    B, steps = 50, 8
    rng = np.random.default_rng(5)
    out, length = _round(model, vocab, np.zeros(0, np.int64), B, steps, 1.0, 0, 1.0, rng)
    # Replay every candidate alone, with the uniforms it was given: draw t of the round
    # handed out one uniform per candidate still alive, in row order.
    rng = np.random.default_rng(5)
    alive, draws = list(range(B)), {b: [] for b in range(B)}
    for t in range(steps + 1):
        u = rng.random(len(alive))
        for b, ub in zip(alive, u):
            draws[b].append(ub)
        alive = [b for b in alive if length[b] < 0 or length[b] > t]
        if not alive:
            break
    eos = vocab.eos_id
    for b in range(B):
        state = model.zero_state(1)
        logits, state, _ = model.forward(np.array([[eos]]), state)
        for t, ub in enumerate(draws[b]):
            ids = np.empty(1, np.int64)
            model.backend.k.sample_rows(np.ascontiguousarray(logits[-1]), 1.0, 0, 1.0,
                                        np.array([ub]), ids)
            assert ids[0] == out[b, t]
            if ids[0] == eos:
                assert length[b] == t
                break
            logits, state, _ = model.forward(ids[None, :], state)
        else:
            assert length[b] == -1


def test_impossible_constraints_return_what_was_found(model_vocab):
    model, vocab = model_vocab
    out = generate_names(model, vocab, 5, NameFilter(contains="zz"), set(), seed=0, max_candidates=600)
    assert out == []


def test_an_exhausted_model_stops_instead_of_running_out_a_huge_budget(model_vocab, monkeypatch):
    """Names of at most 2 of 10 letters: 110 exist. Asking for ten million would mean a budget
    of two billion candidates; generation stops after a window of YIELD_WINDOW candidates
    that gives (almost) no new name."""
    model, vocab = model_vocab
    tried = []
    real_round = names_mod._round

    def counted(*args):  # args[3]: the round's candidates
        tried.append(args[3])
        assert sum(tried) < 5 * names_mod.YIELD_WINDOW, "still generating: not stopped"
        return real_round(*args)

    monkeypatch.setattr(names_mod, "_round", counted)
    out = generate_names(model, vocab, 10_000_000, NameFilter(min_len=1, max_len=2), set(),
                         temperature=2.0, seed=0)
    assert 0 < len(out) <= 110 and len(set(out)) == len(out)
    assert all(1 <= len(s) <= 2 for s in out)
    assert sum(tried) >= names_mod.YIELD_WINDOW  # it judged a whole window, not less


def test_bad_requests(model_vocab):
    model, vocab = model_vocab
    with pytest.raises(ValueError, match="--min-len 3 is over --max-len 2; raise --max-len too"):
        generate_names(model, vocab, 5, NameFilter(min_len=3, max_len=2), set())
    with pytest.raises(ValueError, match="n must be >= 1"):
        generate_names(model, vocab, 0, NameFilter(), set())
    with pytest.raises(ValueError, match="not in the model's vocabulary"):
        generate_names(model, vocab, 5, NameFilter(start="z"), set())
    prose = Vocab.build(Counter(LETTERS))
    with pytest.raises(ValueError, match="not trained on lines"):
        generate_names(model, prose, 5, NameFilter(), set())


def test_lengths_follow_the_end_token(model_vocab):
    """The end token's probability controls lengths: a strong end bias gives short names."""
    model, vocab = model_vocab
    old = model.params["decoder.bias"].copy()
    try:
        model.params["decoder.bias"][vocab.eos_id] = 6.0
        out = generate_names(model, vocab, 30, NameFilter(min_len=1, allow_seen=True), set(), seed=2)
        assert np.mean([len(n) for n in out]) < 2.5
    finally:
        model.params["decoder.bias"][:] = old
