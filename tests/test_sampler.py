"""Generation: cpu.generate_ids against reference.generate_ids, and sampler.generate against a
slow oracle (one model.forward and one reference.sample_logits per character).

The ids must be equal, not close: both twins draw with the same uniforms, and their float32
differences (BLAS vs _dot sums, libm vs rational tanh) are far below the gaps between
cumulative probabilities that would flip a draw. Models are PyTorch-initialised (contracting
recurrences), so rounding differences stay at rounding size over hundreds of steps.

Dimension letters: L=layers, H=hidden, G=gate blocks, V=vocab, n=steps.
"""

import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest

from charrnn import sampler
from charrnn.backend import get_backend
from charrnn.config import ModelConfig, SampleConfig
from charrnn.kernels import cpu, matvec, reference
from charrnn.model import CharRNN, init_params
from charrnn.sampler import CHUNK, generate, prepare
from charrnn.vocab import Vocab

CELLS = ["lstm", "gru", "rnn"]
TOL = {"rtol": 1e-5, "atol": 2e-6}  # float32 state after n steps (seen: 4e-7)


def _kernel_args(cfg: ModelConfig, seed: int, rng):
    """generate_ids' weight arguments for random parameters, and a random (h, c) state."""
    model = CharRNN(cfg, init_params(cfg, seed))
    p, L, H = model.params, cfg.layers, cfg.hidden
    GH = cfg.gates * H
    stack = lambda name, ks, shape: (np.stack([p[name.format(k)] for k in ks]) if ks
                                      else np.zeros(shape, np.float32))
    w = (model.input_table(),
         stack("rnn.weight_ih_l{}", range(1, L), (0, GH, H)),
         stack("rnn.bias_ih_l{}", range(1, L), (0, GH)),
         stack("rnn.weight_hh_l{}", range(L), ()),
         stack("rnn.bias_hh_l{}", range(L), ()),
         p["decoder.weight"] * 3,  # sharper than at initialisation: draws depend on the state
         p["decoder.bias"])
    h = (rng.standard_normal((L, H)) * 0.5).astype(np.float32)
    c = (rng.standard_normal((L, H)) * 0.5).astype(np.float32)
    return w, h, c


def _run(k, cfg, w, h, c, start, temperature, top_k, top_p, u, eos):
    """Returns (ids, final h, final c) of kernel module k, leaving the inputs untouched."""
    h, c = h.copy(), c.copy()
    out = np.full(len(u), -1, np.int64)
    k.generate_ids(cfg.cell, cfg.residual, *w, h, c, start, temperature, top_k, top_p, u, eos, out)
    return out, h, c


def _assert_twins(got, want, tol=TOL):
    """Same ids drawn; final h and c equal within tol."""
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_allclose(got[1], want[1], **tol)
    np.testing.assert_allclose(got[2], want[2], **tol)


SHARED_H = 3 * cpu.GEN_UNITS + 7  # four work items a layer, the last one ragged


def test_shapes_cover_the_work_items_and_row_kernels():
    assert 7 < cpu.GEN_UNITS < 33 < 2 * cpu.GEN_UNITS  # H = 7: one item; H = 33: two, ragged
    assert SHARED_H % cpu.GEN_UNITS != 0
    # rows_dot: H = 7 is all tail (< STEP), 33 two steps and a tail; 7 rows a block and a rest
    assert 7 < matvec.STEP < 33 and 33 % matvec.STEP and 7 % matvec.ROWS


# ------------------------------------------------------------------ generate_ids twins


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("layers", [1, 3])
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("H,V", [(7, 5), (33, 40)])
def test_generate_ids_matches_reference(cell, layers, residual, H, V):
    cfg = ModelConfig(cell=cell, vocab_size=V, embed=6, hidden=H, layers=layers, residual=residual)
    rng = np.random.default_rng(H * 100 + V)
    w, h, c = _kernel_args(cfg, 7, rng)
    u = rng.random(300)
    want = _run(reference, cfg, w, h, c, 1, 1.0, 0, 1.0, u, -1)
    got = _run(cpu, cfg, w, h, c, 1, 1.0, 0, 1.0, u, -1)
    np.testing.assert_array_equal(got[0], want[0])
    assert len(set(want[0].tolist())) > 1  # the draws depend on u: a real comparison
    np.testing.assert_allclose(got[1], want[1], **TOL)
    if cell == "lstm":
        np.testing.assert_allclose(got[2], want[2], **TOL)
    else:
        np.testing.assert_array_equal(got[2], c)  # no cell state: left alone


@pytest.mark.parametrize("cell", CELLS)
def test_generate_ids_shared_layers_match_reference(cell):
    H = SHARED_H
    cfg = ModelConfig(cell=cell, vocab_size=30, embed=8, hidden=H, layers=2, residual=True)
    rng = np.random.default_rng(3)
    w, h, c = _kernel_args(cfg, 1, rng)
    u = rng.random(60)
    want = _run(reference, cfg, w, h, c, 4, 0.9, 0, 1.0, u, -1)
    got = _run(cpu, cfg, w, h, c, 4, 0.9, 0, 1.0, u, -1)
    _assert_twins(got, want)


@pytest.mark.parametrize("cell", CELLS)
def test_generate_ids_gives_the_same_bits_on_any_number_of_threads(cell):
    """The threads share each phase's items through counters; more slices than numba has
    threads means some run late (after the others did their work) or one after another on
    one thread: the region must still finish, with the same bits. End tokens included."""
    cfg = ModelConfig(cell=cell, vocab_size=6, embed=4, hidden=SHARED_H, layers=3, residual=True)
    rng = np.random.default_rng(21)
    w, h, c = _kernel_args(cfg, 6, rng)
    u = rng.random(150)
    runs = []
    for threads in (1, 2, 3, 5):
        hh, cc = h.copy(), c.copy()
        out = np.full(len(u), -1, np.int64)
        cpu._generate_ids(cfg.cell, cfg.residual, *w, hh, cc, 1, 1.0, 0, 1.0, u, 2, out, threads)
        runs.append((out, hh, cc))
    assert (runs[0][0] == 2).sum() >= 3  # end tokens drawn: the reset path ran
    for got in runs[1:]:
        for a, b in zip(got, runs[0]):
            np.testing.assert_array_equal(a, b)


def test_generate_ids_float64_matches_reference():
    cfg = ModelConfig(cell="lstm", vocab_size=40, embed=6, hidden=33, layers=2, residual=True)
    rng = np.random.default_rng(17)
    w, h, c = _kernel_args(cfg, 5, rng)
    w, h, c = tuple(a.astype(np.float64) for a in w), h.astype(np.float64), c.astype(np.float64)
    u = rng.random(300)
    want = _run(reference, cfg, w, h, c, 1, 1.0, 0, 1.0, u, -1)
    got = _run(cpu, cfg, w, h, c, 1, 1.0, 0, 1.0, u, -1)
    # float64 cells use libm like the reference; only _dot's reassociated sums differ
    _assert_twins(got, want, {"rtol": 1e-10, "atol": 1e-12})


@pytest.mark.parametrize("temperature,top_k,top_p", [
    (0.5, 0, 1.0), (1.7, 0, 1.0), (1.0, 3, 1.0), (1.0, 1, 1.0), (1.2, 0, 0.9), (0.8, 5, 0.5),
    (1.0, 0, 1e-9)])
def test_generate_ids_sampling_options_match_reference(temperature, top_k, top_p):
    cfg = ModelConfig(cell="lstm", vocab_size=40, embed=6, hidden=33, layers=2)
    rng = np.random.default_rng(11)
    w, h, c = _kernel_args(cfg, 2, rng)
    u = rng.random(200)
    want = _run(reference, cfg, w, h, c, 0, temperature, top_k, top_p, u, -1)
    got = _run(cpu, cfg, w, h, c, 0, temperature, top_k, top_p, u, -1)
    np.testing.assert_array_equal(got[0], want[0])
    if top_k == 1 or top_p < 1e-6:  # greedy: u does not matter
        np.testing.assert_array_equal(_run(cpu, cfg, w, h, c, 0, temperature, top_k, top_p,
                                           rng.random(200), -1)[0], got[0])


@pytest.mark.parametrize("k", [reference, cpu], ids=["reference", "cpu"])
@pytest.mark.parametrize("cell", CELLS)
def test_generate_ids_eos_resets_the_state(k, cell):
    cfg = ModelConfig(cell=cell, vocab_size=6, embed=4, hidden=9, layers=2)
    rng = np.random.default_rng(5)
    w, h, c = _kernel_args(cfg, 3, rng)
    eos = 2
    u = rng.random(200)
    ids = _run(k, cfg, w, h, c, 1, 1.0, 0, 1.0, u, eos)[0]
    ends = np.flatnonzero(ids == eos)
    assert len(ends) >= 3
    # After each end token the kernel goes on as a fresh start from <eos> with zero state.
    zero = np.zeros_like(h)
    for t in ends[:3]:
        rest = _run(k, cfg, w, zero, zero, eos, 1.0, 0, 1.0, u[t + 1:], eos)[0]
        np.testing.assert_array_equal(rest, ids[t + 1:])
    # An end token as the last draw leaves the state zero for the next call.
    n = ends[0] + 1
    _, h1, c1 = _run(k, cfg, w, h, c, 1, 1.0, 0, 1.0, u[:n], eos)
    assert not h1.any() and (cell != "lstm" or not c1.any())
    # eos = -1: no resets, so the same draws continue differently.
    assert not np.array_equal(_run(k, cfg, w, h, c, 1, 1.0, 0, 1.0, u, -1)[0], ids)


@pytest.mark.parametrize("cell,H", [("lstm", 33), ("gru", 33), ("rnn", 33), ("lstm", SHARED_H)])
def test_generate_ids_float16_weights_match_reference(cell, H):
    cfg = ModelConfig(cell=cell, vocab_size=40, embed=6, hidden=H, layers=2, residual=True)
    rng = np.random.default_rng(13)
    w, h, c = _kernel_args(cfg, 4, rng)
    half = lambda a: a.astype(np.float16).view(np.uint16)
    w16 = (w[0], half(w[1]), w[2], half(w[3]), w[4], half(w[5]), w[6])
    u = rng.random(100)
    want = _run(reference, cfg, w16, h, c, 1, 1.0, 0, 1.0, u, -1)
    got = _run(cpu, cfg, w16, h, c, 1, 1.0, 0, 1.0, u, -1)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_allclose(got[1], want[1], **TOL)
    # The bits are read as float16: the same as float32 weights rounded to float16.
    w32 = tuple(a.view(np.float16).astype(np.float32) if a.dtype == np.uint16 else a for a in w16)
    np.testing.assert_array_equal(_run(cpu, cfg, w32, h, c, 1, 1.0, 0, 1.0, u, -1)[0], got[0])


def test_generate_ids_rejects_a_bad_start_id():
    cfg = ModelConfig(cell="gru", vocab_size=5, embed=4, hidden=7, layers=1)
    w, h, c = _kernel_args(cfg, 0, np.random.default_rng(0))
    with pytest.raises(IndexError, match="start id"):
        _run(cpu, cfg, w, h, c, 5, 1.0, 0, 1.0, np.zeros(3), -1)


# ------------------------------------------------------------------ sampler.generate


def _vocab(lines=False, kind="text"):
    chars = "abcdefgh \n" if kind == "text" else "abcdefgh \n\xc3\xa9\xe2\x82"
    return Vocab.build({ch: 1 for ch in chars}, lines=lines, kind=kind)


def _model(vocab, cell="lstm", backend="cpu", seed=0):
    cfg = ModelConfig(cell=cell, vocab_size=len(vocab), embed=8, hidden=24, layers=2)
    params = init_params(cfg, seed)
    params["decoder.weight"] *= 4  # peaked enough for text with structure
    return CharRNN(cfg, params, backend=get_backend(backend))


def _oracle(model, vocab, cfg: SampleConfig, lines=False) -> str:
    """The slow path: one forward and one reference draw per character."""
    rng = np.random.default_rng(cfg.seed)
    prime = list(vocab.encode(cfg.prime)) if cfg.prime else []
    context = [vocab.eos_id] + prime if lines else (prime or list(vocab.encode("\n")))
    state = model.zero_state(1)
    if len(context) > 1:
        _, state, _ = model.forward(np.array(context[:-1])[:, None], state)
    cur, ids = context[-1], []
    for _ in range(cfg.length):
        logits, state, _ = model.forward(np.array([[cur]]), state)
        cur = reference.sample_logits(logits[0, 0], cfg.temperature,
                                      1 if cfg.argmax else cfg.top_k, cfg.top_p, rng.random())
        ids.append(cur)
        if lines and cur == vocab.eos_id:
            state = model.zero_state(1)
    return vocab.decode(np.array(ids, np.int64))


def _text(model, vocab, cfg, lines=False):
    return "".join(generate(model, vocab, cfg, lines=lines))


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("cell", CELLS)
def test_generate_equals_the_per_step_oracle(cell, backend):
    vocab = _vocab()
    model = _model(vocab, cell, backend)
    cfg = SampleConfig(length=CHUNK + 37, temperature=0.9, seed=4)  # two chunks, one ragged
    text = _text(model, vocab, cfg)
    assert len(text) == cfg.length
    assert text == _oracle(model, vocab, cfg)


def test_generate_repeats_with_a_seed_and_varies_without():
    vocab = _vocab()
    model = _model(vocab)
    cfg = SampleConfig(length=200, seed=1)
    a, b = _text(model, vocab, cfg), _text(model, vocab, cfg)
    assert a == b
    assert _text(model, vocab, SampleConfig(length=200, seed=2)) != a
    top = SampleConfig(length=200, seed=1, top_k=3, top_p=0.8, temperature=1.3)
    assert _text(model, vocab, top) == _oracle(model, vocab, top)


def test_generate_continues_the_prime():
    vocab = _vocab()
    model = _model(vocab)
    primed = SampleConfig(length=100, seed=3, prime="abc ha")
    text = _text(model, vocab, primed)
    assert text == _oracle(model, vocab, primed)
    assert text != _text(model, vocab, SampleConfig(length=100, seed=3))
    one = SampleConfig(length=50, seed=3, prime="h")  # a one-character prime: no forward first
    assert _text(model, vocab, one) == _oracle(model, vocab, one)


def test_argmax_ignores_the_seed():
    vocab = _vocab()
    model = _model(vocab)
    a = _text(model, vocab, SampleConfig(length=80, seed=1, argmax=True, prime="ab"))
    assert a == _text(model, vocab, SampleConfig(length=80, seed=2, argmax=True, prime="ab"))
    assert a == _oracle(model, vocab, SampleConfig(length=80, seed=9, argmax=True, prime="ab"))


def test_a_lines_model_restarts_after_each_end_token():
    vocab = _vocab(lines=True)
    model = _model(vocab, "gru", seed=2)
    model.params["decoder.bias"][vocab.eos_id] += 2.0  # lines of a few characters
    cfg = SampleConfig(length=CHUNK * 2, temperature=1.0, seed=5, prime="ab")
    text = _text(model, vocab, cfg, lines=True)
    assert text.count("\n") >= 10
    assert text == _oracle(model, vocab, cfg, lines=True)


def test_bytes_vocab_decodes_utf8_across_chunks():
    vocab = _vocab(kind="bytes")
    model = _model(vocab, "rnn", seed=1)
    cfg = SampleConfig(length=CHUNK * 2 + 5, seed=8, temperature=1.5)
    pieces = list(generate(model, vocab, cfg))
    assert "".join(pieces) == _oracle(model, vocab, cfg)
    assert len(pieces) >= 2  # streamed, not all at the end


def test_half_samples_the_float16_rounded_model():
    vocab = _vocab()
    model = _model(vocab, "lstm", seed=3)
    cfg = SampleConfig(length=150, seed=6)
    rounded = CharRNN(model.cfg, {n: p.copy() for n, p in model.params.items()})
    for name, p in rounded.params.items():  # the matrices generate_ids multiplies
        if name.startswith(("rnn.weight_hh", "decoder.weight")) or (
                name.startswith("rnn.weight_ih") and not name.endswith("_l0")):
            p[...] = p.astype(np.float16)
    cfg.half = True
    text = "".join(generate(model, vocab, cfg))
    assert text == _oracle(rounded, vocab, cfg)


def test_half_fails_loudly():
    vocab = _vocab()
    model = _model(vocab)
    model.params["rnn.weight_hh_l1"][0, 0] = 1e5
    with pytest.raises(ValueError, match="rnn.weight_hh: a weight of magnitude 100000 overflows"):
        list(generate(model, vocab, SampleConfig(length=5, seed=1, half=True)))
    model.backend = SimpleNamespace(name="cuda", xp=np)  # any non-host backend
    with pytest.raises(ValueError, match="half-precision sampling runs on the CPU"):
        list(generate(model, vocab, SampleConfig(length=5, seed=1, half=True)))


def test_the_default_precision_looks_at_the_streamed_matrices_only():
    # prepare(model, None): float16 where every matrix generate_ids streams fits it
    vocab = _vocab()
    model = _model(vocab)
    assert prepare(model, None).half
    model.params["rnn.weight_ih_l0"][0, 0] = 1e5  # layer 0 reads its float32 input table
    assert prepare(model, None).half
    list(generate(model, vocab, SampleConfig(length=5, seed=1, half=True)))
    for name in ("decoder.weight", "rnn.weight_ih_l1", "rnn.weight_hh_l0"):  # streamed in float16
        m = _model(vocab)
        m.params[name][0, 0] = -7e4
        assert not prepare(m, None).half, name
    m.backend = SimpleNamespace(name="cuda", xp=np)  # not a host backend: float32, no error
    assert not prepare(m, None).half


@pytest.mark.parametrize("half", [False, True])
def test_one_preparation_serves_many_samples(monkeypatch, half):
    vocab = _vocab()
    model = _model(vocab)
    cfgs = [SampleConfig(length=40, seed=s, temperature=t, half=half) for s, t in ((1, 0.8), (2, 1.3))]
    want = ["".join(generate(model, vocab, cfg)) for cfg in cfgs]
    prep = prepare(model, half)
    stacked = []
    real = sampler._stacked_weights
    monkeypatch.setattr(sampler, "_stacked_weights", lambda *a: stacked.append(1) or real(*a))
    assert ["".join(generate(model, vocab, cfg, prep=prep)) for cfg in cfgs] == want
    assert stacked == []  # nothing stacked (or halved) again
    with pytest.raises(ValueError, match="prep holds"):
        list(generate(model, vocab, SampleConfig(length=5, seed=1, half=not half), prep=prep))


def test_zero_length_yields_nothing():
    vocab = _vocab()
    assert list(generate(_model(vocab), vocab, SampleConfig(length=0, seed=1))) == []


@pytest.mark.parametrize("user_env, want", [
    ({}, "300000"),  # charrnn's choice for generation
    ({"OMP_WAIT_POLICY": "PASSIVE"}, None),  # the user's wait policy stands
    ({"GOMP_SPINCOUNT": "5"}, "5"),  # and so does the user's spin count
    # what a process that imported charrnn passes on is charrnn's, not the user's
    ({"OMP_WAIT_POLICY": "PASSIVE", "CHARRNN_OMP": "1"}, "300000"),
])
def test_spin_for_generation_sets_the_spin_count_unless_the_user_chose(user_env, want):
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "CHARRNN_OMP")}
    code = ("import os, charrnn; charrnn.spin_for_generation(); "
            "print(os.environ.get('GOMP_SPINCOUNT'))")
    out = subprocess.run([sys.executable, "-c", code], env={**env, **user_env}, check=True,
                         capture_output=True, text=True).stdout.strip()
    assert out == str(want)


def test_sample_sets_the_spin_count_before_it_loads_a_model(monkeypatch):
    """libgomp reads the spin count when numba's pool starts, which loading and priming a model
    may do: `charrnn sample` must ask for it first."""
    from click.testing import CliRunner

    import charrnn
    from charrnn import cli

    calls = []
    monkeypatch.setattr(charrnn, "spin_for_generation", lambda: calls.append("spin"))

    def load(*args, **kwargs):
        calls.append("load")
        raise cli.UserError("stop here")

    monkeypatch.setattr(cli, "_load", load)
    res = CliRunner().invoke(cli.main, ["sample", "-n", "5"])
    assert res.exit_code == 1 and calls == ["spin", "load"]
