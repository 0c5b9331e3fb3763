"""kernels/cpu.py against kernels/reference.py: every kernel, several shapes, float32 and float64.

Fresh random inputs from a fixed seed per test; shapes include odd sizes (B=1, H=7, V=3) and
sizes large enough to take the threaded paths. Tolerances are fitted to each dtype: the twins
do the same arithmetic in the same order and may differ only where exp/tanh/log round
differently (and where cpu.py sums a softmax row in float64).

Dimension letters: B=batch, H=hidden, G=gate blocks, V=vocab, N=rows, D=columns, T=time.
"""

import numpy as np
import pytest

from charrnn.backend import HostBackend
from charrnn.config import GATES, ModelConfig
from charrnn.kernels import cpu, reference
from charrnn.model import CharRNN

DTYPES = [np.float32, np.float64]
CELLS = ["lstm", "gru", "rnn"]
STEP_SHAPES = [(1, 7), (5, 33), (64, 128), (130, 520)]  # (B, H)


def test_shapes_cover_serial_and_threaded_paths():
    assert {(H + cpu.NR - 1) // cpu.NR for _, H in STEP_SHAPES} == {1, 3, 8, 33}  # panels
    assert 5 * 33 < cpu.ROW_PAR_MIN <= 300 * 65  # softmax shapes
    assert 33 * 5 < cpu.CHEAP_PAR_MIN <= 300 * 257  # adam shapes
    assert 1000 * 300 >= cpu.COPY_PAR_MIN > 300 * 512  # gather / scatter
    assert 300_000 // cpu.SQ_CHUNK >= cpu.SQ_PAR_MIN > 16387 // cpu.SQ_CHUNK + 1  # sum_squares


def _tol(dtype):
    return {"rtol": 1e-5, "atol": 1e-6} if dtype == np.float32 else {"rtol": 1e-12, "atol": 1e-12}


def _close(got, want, dtype, **kw):
    np.testing.assert_allclose(got, want, **{**_tol(dtype), **kw})


def _randn(rng, shape, dtype, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(dtype)


# ------------------------------------------------------------------ recurrent steps
#
# cpu has no step kernels: a step is a one-step window (cpu.*_window), which computes the
# recurrent product hp = h0 @ W_hh.T itself. The reference step kernels are given hp from
# numpy; h0 and W_hh are drawn in quarter steps (W_hh times a power of two), so every
# product and partial sum is exact in float32 and both sides see the same hp.


def _quarters(rng, shape, dtype, scale=1.0):
    return (np.round(rng.standard_normal(shape) * 4) / 4 * scale).astype(dtype)


def _step_inputs(cell, B, H, dtype, rng, scale):
    """Forward inputs (scaled: large |x| and hp exercise sigmoid/tanh saturation) and backward
    inputs. prev is c_{t-1} (LSTM) or h_{t-1} (GRU, RNN); h0 is W_hh's input."""
    GH = GATES[cell] * H
    xp = _randn(rng, (B, GH), dtype, scale)
    w_hh = _quarters(rng, (GH, H), dtype, 2.0 ** np.round(np.log2(scale / np.sqrt(H))))
    b_hh = _randn(rng, (GH,), dtype)
    h0 = _quarters(rng, (B, H), dtype)
    prev = _randn(rng, (B, H), dtype) if cell == "lstm" else h0
    dh, dc = _randn(rng, (B, H), dtype), _randn(rng, (B, H), dtype)
    return xp, w_hh, b_hh, prev, h0, dh, dc


def _hp(h0, w_hh):
    return (h0.astype(np.float64) @ w_hh.T.astype(np.float64)).astype(h0.dtype)


def _forward(k, cell, xp, w_hh, b_hh, prev, h0, act=None):
    """{act, other (c or hn), h} of one step: reference step kernels, or a cpu window.
    `act`: where the cpu window writes the activations (default: a fresh array)."""
    B, H = prev.shape
    dt = prev.dtype
    h = np.full((B, H), np.nan, dt)
    other = np.full((B, H), np.nan, dt)  # c (LSTM) or hn (GRU)
    if k is reference:
        hp = _hp(h0, w_hh)
        if cell == "rnn":
            reference.rnn_forward_step(xp, hp, b_hh, h)
            return {"h": h}
        act = np.full(xp.shape, np.nan, dt)
        step = reference.lstm_forward_step if cell == "lstm" else reference.gru_forward_step
        step(xp, hp, b_hh, prev, act, other, h)
        return {"act": act, "other": other, "h": h}
    act = np.full(xp.shape, np.nan, dt) if act is None else act
    window = getattr(cpu, f"{cell}_forward_window")
    window(xp[None], w_hh, b_hh, h0, prev if cell == "lstm" else None, None,
           act[None] if cell != "rnn" else None, other[None] if cell == "lstm" else None,
           other[None] if cell == "gru" else None, h[None])
    return {"h": h} if cell == "rnn" else {"act": act, "other": other, "h": h}


def _backward(k, cell, fwd, w_hh, prev, h0, dh, dc, out=None):
    """One step's backward from the forward's {act, other, h}: the reference's step kernels
    plus the product for dL/dh_{t-1}, or a cpu window. Keys: dxp (dL/dxp), dhp (GRU's
    dL/dhp), dh0 (dL/dh_{t-1}, all paths), dc (LSTM's dL/dc_{t-1}). `out`: where the cpu
    window writes dL/dxp (default: a fresh array)."""
    dt = prev.dtype
    GH = w_hh.shape[0]
    B, H = prev.shape
    if k is reference:
        dxp = np.full((B, GH), np.nan, dt)
        got = {"dxp": dxp}
        if cell == "rnn":
            reference.rnn_backward_step(fwd["h"], dh, dxp)
        elif cell == "lstm":
            got["dc"] = dc.copy()
            reference.lstm_backward_step(fwd["act"], prev, fwd["other"], dh, got["dc"], dxp)
        else:
            got["dhp"] = np.full((B, GH), np.nan, dt)
            direct = np.full((B, H), np.nan, dt)
            reference.gru_backward_step(fwd["act"], fwd["other"], prev, dh, dxp, got["dhp"], direct)
        dhp = got.get("dhp", dxp).astype(np.float64)
        dh0 = dhp @ w_hh.astype(np.float64) + (direct if cell == "gru" else 0)
        got["dh0"] = dh0.astype(dt)
        return got
    dxp = np.full((B, GH), np.nan, dt) if out is None else out
    got = {"dxp": dxp, "dh0": np.full((B, H), np.nan, dt)}
    if cell == "lstm":
        got["dc"] = dc.copy()
    dhp = dxp
    if cell == "gru":
        dhp = got["dhp"] = np.full((B, GH), np.nan, dt)
    window = getattr(cpu, f"{cell}_backward_window")
    window(fwd["act"][None] if cell != "rnn" else None,
           fwd["other"][None] if cell == "lstm" else None,
           fwd["other"][None] if cell == "gru" else None, fwd["h"][None], h0,
           prev if cell == "lstm" else None, None, dh[None], w_hh, dxp[None], dhp[None],
           got["dh0"], got.get("dc"))
    return got


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("B,H", STEP_SHAPES)
def test_gate_outputs_may_overwrite_their_inputs(cell, B, H):
    """act may be xp, and the backward's dL/dxp may be act: the same bits as with separate
    arrays (HostBackend reuses those buffers)."""
    rng = np.random.default_rng(B * H)
    xp, w_hh, b_hh, prev, h0, dh, dc = _step_inputs(cell, B, H, np.float32, rng, 2.0)
    want_f = _forward(cpu, cell, xp, w_hh, b_hh, prev, h0)
    act = xp.copy()  # the activations land in the input projections' buffer
    got_f = _forward(cpu, cell, act, w_hh, b_hh, prev, h0, act=act)
    for name, want in want_f.items():
        np.testing.assert_array_equal(got_f[name], want, err_msg=name)
    want_b = _backward(cpu, cell, want_f, w_hh, prev, h0, dh, dc)
    got_b = _backward(cpu, cell, got_f, w_hh, prev, h0, dh, dc, out=act)  # dL/dxp over act
    for name, want in want_b.items():
        np.testing.assert_array_equal(got_b[name], want, err_msg=name)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("B,H", STEP_SHAPES)
@pytest.mark.parametrize("scale", [1.0, 60.0])
def test_one_step_windows_match_reference_steps(cell, B, H, dtype, scale):
    rng = np.random.default_rng(1000 * B + H + int(scale))
    xp, w_hh, b_hh, prev, h0, dh, dc = _step_inputs(cell, B, H, dtype, rng, scale)
    if scale > 1:  # values where a naive 1/(1+exp(-x)) overflows exp in float32
        xp[0, :3] = [-200.0, 200.0, -1e4]
    ref_f = _forward(reference, cell, xp, w_hh, b_hh, prev, h0)
    cpu_f = _forward(cpu, cell, xp, w_hh, b_hh, prev, h0)
    # float32 cells use rational tanh/sigmoid, within 4e-7 of exact; that error is scaled by
    # whatever multiplies an activation (c_prev, hn, dh: up to `scale` here).
    tol = {"atol": max(1e-6, 5e-7 * scale)} if dtype == np.float32 else {}
    for name in ref_f:
        assert np.isfinite(cpu_f[name]).all(), name
        _close(cpu_f[name], ref_f[name], dtype, err_msg=name, **tol)
    # Backward from the same (reference) activations, so only the backward is compared.
    ref_b = _backward(reference, cell, ref_f, w_hh, prev, h0, dh, dc)
    cpu_b = _backward(cpu, cell, ref_f, w_hh, prev, h0, dh, dc)
    for name in ref_b:
        assert np.isfinite(cpu_b[name]).all(), name
        # dh0 is a product over H of unrounded gradients: the window's float32 sum against
        # numpy's float64 one (the layer tests' tolerance)
        extra = {"rtol": 1e-4} if name == "dh0" and dtype == np.float32 else {}
        _close(cpu_b[name], ref_b[name], dtype, err_msg=name, **{**tol, **extra})


@pytest.mark.parametrize("dtype", DTYPES)
def test_sigmoid_saturates_without_overflow(dtype):
    """Extreme pre-activations give 0/1 gates, never nan or inf (float32 exp(89) = inf):
    exactly in float64, within the rational approximation's 2.5e-7 in float32."""
    H = 4
    xp = np.array([[1e4, -1e4, 100.0, -100.0] * 4], dtype)  # (1, 4H)
    zeros = np.zeros((1, H), dtype)
    f = _forward(cpu, "lstm", xp, np.zeros((4 * H, H), dtype), np.zeros(4 * H, dtype), zeros, zeros)
    act, h = f["act"], f["h"]
    assert np.isfinite(act).all() and np.isfinite(h).all()
    atol = 2.5e-7 if dtype == np.float32 else 0.0
    np.testing.assert_allclose(act[0, :2], [1.0, 0.0], rtol=0, atol=atol)  # i gate: sigmoid(+-1e4)
    np.testing.assert_allclose(act[0, 2 * H : 2 * H + 2], [1.0, -1.0], rtol=0, atol=atol)  # g gate: tanh


# ------------------------------------------------------------------ embedding table


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("id_type", [np.int32, np.int64])
@pytest.mark.parametrize("V,D,N", [(3, 5, 1), (11, 33, 40), (65, 512, 300)])
def test_gather_and_scatter_match_reference(V, D, N, id_type, dtype):
    rng = np.random.default_rng(V * D + N)
    table = _randn(rng, (V, D), dtype)
    ids = rng.integers(0, V, N).astype(id_type)
    ids[: min(N, 3)] = ids[0]  # repeated ids on purpose
    out_ref, out_cpu = np.empty((N, D), dtype), np.full((N, D), np.nan, dtype)
    reference.gather_rows(table, ids, out_ref)
    cpu.gather_rows(table, ids, out_cpu)
    np.testing.assert_array_equal(out_cpu, out_ref)

    d = _randn(rng, (N, D), dtype)
    start = _randn(rng, (V, D), dtype)  # scatter adds into what is there
    acc_ref, acc_cpu = start.copy(), start.copy()
    reference.scatter_add_rows(ids, d, acc_ref)
    cpu.scatter_add_rows(ids, d, acc_cpu)
    # Rows are added in id order 0..N-1, as np.add.at does: the same sums bit for bit.
    np.testing.assert_array_equal(acc_cpu, acc_ref)


def test_gather_and_scatter_threaded_path_with_many_repeats():
    rng = np.random.default_rng(7)
    N, D, V = 1000, 300, 5  # N*D above COPY_PAR_MIN: rows / column ranges on threads
    ids = rng.integers(0, V, N)
    table = _randn(rng, (V, D), np.float32)
    out = np.empty((N, D), np.float32)
    cpu.gather_rows(table, ids, out)
    np.testing.assert_array_equal(out, table[ids])
    d = _randn(rng, (N, D), np.float32)
    acc_ref, acc_cpu = np.zeros((V, D), np.float32), np.zeros((V, D), np.float32)
    reference.scatter_add_rows(ids, d, acc_ref)
    cpu.scatter_add_rows(ids, d, acc_cpu)
    np.testing.assert_array_equal(acc_cpu, acc_ref)


@pytest.mark.parametrize("D", [10, 300, 1000])
def test_scatter_gives_the_references_sums_whatever_the_column_ranges(D):
    # one contiguous range of columns a thread, cut at multiples of COL_ALIGN: any number of
    # ranges adds every output element's rows in the same order 0..N-1
    rng = np.random.default_rng(D)
    N, V = 2000, 7  # N*D above COPY_PAR_MIN for D >= 300: the threaded path
    ids = rng.integers(0, V, N)
    d = _randn(rng, (N, D), np.float32)
    want = np.zeros((V, D), np.float32)
    reference.scatter_add_rows(ids, d, want)
    for threads in (1, 2, 3, 7):
        got = np.zeros((V, D), np.float32)
        cpu._scatter_add_rows(ids, d, got, threads)
        np.testing.assert_array_equal(got, want)


def test_ids_out_of_range_raise():
    table = np.zeros((4, 3), np.float32)
    with pytest.raises(IndexError):
        cpu.gather_rows(table, np.array([0, 4]), np.empty((2, 3), np.float32))
    with pytest.raises(IndexError):
        cpu.scatter_add_rows(np.array([-1]), np.zeros((1, 3), np.float32), table)


# ------------------------------------------------------------------ loss


def _logits_case(N, V, dtype, seed, scale=3.0):
    rng = np.random.default_rng(seed)
    logits = _randn(rng, (N, V), dtype, scale)
    targets = rng.integers(0, V, N)
    mask = (rng.random(N) > 0.3).astype(dtype)
    mask[0] = 1.0
    if N > 1:
        mask[1] = 0.0
    return logits, targets, mask


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,V", [(1, 3), (5, 33), (300, 65)])  # 300x65 is threaded
@pytest.mark.parametrize("scale", [3.0, 300.0])
def test_softmax_xent_matches_reference(N, V, dtype, scale):
    logits, targets, mask = _logits_case(N, V, dtype, N * V, scale)
    s = 1.0 / max(mask.sum(), 1.0)
    d_ref, d_cpu = np.empty_like(logits), np.full_like(logits, np.nan)
    loss_ref = reference.softmax_xent(logits, targets, mask, s, d_ref)
    loss_cpu = cpu.softmax_xent(logits, targets, mask, s, d_cpu)
    assert isinstance(loss_cpu, float) and np.isfinite(loss_cpu)
    assert loss_cpu == pytest.approx(loss_ref, rel=_tol(dtype)["rtol"], abs=_tol(dtype)["atol"])
    _close(d_cpu, d_ref, dtype)
    assert not d_cpu[mask == 0].any()  # masked rows give no gradient

    # dlogits may alias logits: each row is read before it is written.
    alias = logits.copy()
    loss_alias = cpu.softmax_xent(alias, targets, mask, s, alias)
    assert loss_alias == loss_cpu
    np.testing.assert_array_equal(alias, d_cpu)


def test_softmax_xent_int32_targets_and_bad_target():
    logits, targets, mask = _logits_case(6, 9, np.float32, 3)
    d64, d32 = np.empty_like(logits), np.empty_like(logits)
    assert cpu.softmax_xent(logits, targets, mask, 0.5, d64) == cpu.softmax_xent(
        logits, targets.astype(np.int32), mask, 0.5, d32)
    np.testing.assert_array_equal(d64, d32)
    targets[2] = 9
    with pytest.raises(IndexError):
        cpu.softmax_xent(logits, targets, mask, 0.5, d64)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,V", [(1, 3), (5, 33), (300, 65)])
def test_log_softmax_rows_matches_reference(N, V, dtype):
    logits, _, _ = _logits_case(N, V, dtype, 17 * N + V, scale=30.0)
    out_ref, out_cpu = np.empty_like(logits), np.full_like(logits, np.nan)
    reference.log_softmax_rows(logits, out_ref)
    cpu.log_softmax_rows(logits, out_cpu)
    _close(out_cpu, out_ref, dtype, atol=1e-5 if dtype == np.float32 else 1e-12)


# ------------------------------------------------------------------ sampling


def test_pairwise_sum_equals_numpy_sum_bit_for_bit():
    """sample_logits' top-p cut uses numpy's p.sum(); cpu.py mirrors its pairwise order."""
    rng = np.random.default_rng(5)
    for n in list(range(1, 300)) + [1000, 1023, 4099]:
        a = rng.random(n) * np.exp(rng.standard_normal(n) * 5)
        assert cpu._pairwise_sum(a, 0, n) == a.sum(), n


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("V", [3, 7, 65, 300])
def test_sample_logits_matches_reference(V, dtype):
    rng = np.random.default_rng(V)
    cases = 0
    for kind in ("random", "ties", "flat"):
        if kind == "random":
            logits = _randn(rng, (V,), dtype, 2.0)
        elif kind == "ties":  # few distinct values: ties must break by lower id
            logits = rng.integers(0, 3, V).astype(dtype)
        else:
            logits = np.zeros(V, dtype)
        us = np.concatenate([[0.0, 0.5, np.nextafter(1.0, 0.0)], rng.random(12)])
        for temperature in (0.3, 1.0, 2.5):
            for top_k in (0, 1, 2, 5, V + 3):
                for top_p in (1.0, 0.95, 0.5, 0.2, 1e-9):
                    for u in us:
                        want = reference.sample_logits(logits, temperature, top_k, top_p, u)
                        got = cpu.sample_logits(logits, temperature, top_k, top_p, u)
                        assert got == want, (kind, temperature, top_k, top_p, u)
                        cases += 1
    assert cases == 3 * 3 * 5 * 5 * 15


def test_sample_logits_edges():
    logits = np.array([0.5, 2.0, 2.0, -1.0], np.float32)
    # top_p tiny keeps one token: the most probable, lower id on ties.
    assert all(cpu.sample_logits(logits, 1.0, 0, 1e-9, u) == 1 for u in (0.0, 0.7, 0.999))
    assert cpu.sample_logits(logits, 1.0, 1, 1.0, 0.99) == 1
    # Flat logits, top_p = 0.5 keeps exactly half; u splits them at the CDF steps.
    flat = np.zeros(4)
    assert [cpu.sample_logits(flat, 1.0, 0, 0.5, u) for u in (0.0, 0.49, 0.5, 0.99)] == [0, 0, 1, 1]
    assert isinstance(cpu.sample_logits(flat, 1.0, 0, 1.0, 0.3), int)


# ------------------------------------------------------------------ optimizer


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(7,), (33, 5), (300, 257)])  # 300x257 is threaded
@pytest.mark.parametrize("l2,decay", [(0.0, 0.0), (0.01, 0.0), (0.0, 0.1), (0.02, 0.05)])
def test_adam_update_matches_reference(shape, dtype, l2, decay):
    rng = np.random.default_rng(int(np.prod(shape)) + int(l2 * 100) + int(decay * 1000))
    p = _randn(rng, shape, dtype)
    m, v = np.zeros(shape, dtype), np.zeros(shape, dtype)
    state = {"ref": [p.copy(), m.copy(), v.copy()], "cpu": [p.copy(), m.copy(), v.copy()]}
    beta1, beta2, lr, eps = 0.9, 0.999, 2e-3, 1e-8
    for t in range(1, 4):
        g = _randn(rng, shape, dtype, 0.1)
        g.flat[0] = 0.0  # v stays tiny there: the eps path
        bc1, bc2 = 1.0 - beta1**t, 1.0 - beta2**t
        for name, k in (("ref", reference), ("cpu", cpu)):
            p_, m_, v_ = state[name]
            k.adam_update(p_, g, m_, v_, lr, beta1, beta2, eps, bc1, bc2, l2, decay)
    # Scalars cast to the dtype and the reference's operation order: equal bit for bit.
    for a, b in zip(state["cpu"], state["ref"]):
        np.testing.assert_array_equal(a, b)


def _model_like_arrays(rng, dtype):
    """A model's worth of parameter-shaped arrays: sizes on both sides of the chunk size,
    an empty one, and enough elements in all for the threaded path."""
    shapes = [(65, 32), (4 * cpu.CHEAP_CHUNK + 5,), (cpu.CHEAP_CHUNK,), (0,), (3,), (257, 129), (1,)]
    return [_randn(rng, s, dtype, 0.5) for s in shapes]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale", [1, 1000])  # 1000: all arrays under the threaded size
def test_adam_update_all_equals_one_update_a_parameter(dtype, scale):
    """One parallel region over all parameters, each with its own l2 and decay, leaves the
    same bits as the reference's update of one parameter at a time."""
    rng = np.random.default_rng(scale)
    ps = [a.reshape(-1)[: -(-a.size // scale)].copy() for a in _model_like_arrays(rng, dtype)]
    l2s = [0.0, 0.01, 0.0, 0.0, 0.02, 0.0, 0.0]  # one a parameter
    decays = [0.1, 0.0, 0.0, 0.05, 0.0, 0.1, 0.0]
    want = [[p.copy(), np.zeros_like(p), np.zeros_like(p)] for p in ps]
    got = [[p.copy(), np.zeros_like(p), np.zeros_like(p)] for p in ps]
    for t in range(1, 4):
        gs = [_randn(rng, p.shape, dtype, 0.1) for p in ps]
        args = (2e-3, 0.9, 0.999, 1e-8, 1 - 0.9**t, 1 - 0.999**t)
        for (p, m, v), g, l2, decay in zip(want, gs, l2s, decays):
            reference.adam_update(p, g, m, v, *args, l2, decay)
        cpu.adam_update_all([s[0] for s in got], gs, [s[1] for s in got], [s[2] for s in got],
                            *args, l2s, decays)
    for w, g in zip(want, got):
        for a, b in zip(w, g):
            np.testing.assert_array_equal(b, a)
    cpu.adam_update_all([], [], [], [], *args, [], [])  # nothing to update: no kernel call
    with pytest.raises(ValueError, match="one dtype"):
        q = [np.zeros(3, np.float32), np.zeros(3, np.float64)]
        cpu.adam_update_all(q, q, q, q, *args, [0.0, 0.0], [0.0, 0.0])


@pytest.mark.parametrize("dtype", DTYPES)
def test_sum_squares_total_is_the_arrays_sums_added_in_order(dtype):
    """One kernel over every array gives the bits of summing each array alone, then the
    sums in order (the global norm does not move with this change, nor with threads)."""
    rng = np.random.default_rng(7)
    arrays = _model_like_arrays(rng, dtype) + [_randn(rng, (300, 257), dtype)[:, ::3]]
    want = 0.0
    for a in arrays:
        want += cpu.sum_squares(a)
    assert cpu.sum_squares_total(arrays) == want
    assert cpu.sum_squares_total(arrays) == pytest.approx(reference.sum_squares_total(arrays), rel=1e-12)
    mixed = [arrays[0].astype(np.float32), arrays[1].astype(np.float64)]  # one float64 tuple
    assert cpu.sum_squares_total(mixed) == cpu.sum_squares(mixed[0]) + cpu.sum_squares(mixed[1])
    assert cpu.sum_squares_total([]) == 0.0


# ------------------------------------------------------------------ sum of squares


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 7, 16384 + 3, 300_000])  # several chunks; the last threaded
def test_sum_squares_matches_reference(n, dtype):
    g = _randn(np.random.default_rng(n), (n,), dtype, 3.0)
    got = cpu.sum_squares(g)
    assert isinstance(got, float)
    assert got == pytest.approx(reference.sum_squares(g), rel=1e-12)


def test_the_flat_kernels_compile_once_for_every_shape():
    """adam_update and sum_squares hand their kernels 1-D views: a model's 1-D biases and 2-D
    matrices share one compiled signature (each extra one was ~1.6 s of a first run)."""
    rng = np.random.default_rng(4)
    for shape in [(7,), (3, 5), (2, 3, 4)]:
        p, g, m, v = (_randn(rng, shape, np.float32) for _ in range(4))
        cpu.adam_update(p, g, m, np.abs(v), 1e-3, 0.9, 0.999, 1e-8, 0.1, 0.001, 0.0, 0.0)
        cpu.sum_squares(g)
    cpu.sum_squares(_randn(rng, (6, 6), np.float32)[:, ::2])  # a strided view: copied to sum
    for kernel in (cpu._adam_all, cpu._sum_squares_all):  # their arguments: tuples of arrays
        arrays = {str(t.dtype) for sig in kernel.signatures for t in sig if "float32" in str(t)}
        assert arrays == {"array(float32, 1d, C)"}, arrays
    with pytest.raises(ValueError, match="C-contiguous"):  # an update must land in place
        q = _randn(rng, (4, 4), np.float32)[:, ::2]
        cpu.adam_update(q, q, q, q, 1e-3, 0.9, 0.999, 1e-8, 0.1, 0.001, 0.0, 0.0)


def test_sum_squares_2d_and_non_contiguous():
    g = _randn(np.random.default_rng(3), (300, 257), np.float32)
    assert cpu.sum_squares(g) == pytest.approx(reference.sum_squares(g), rel=1e-12)
    assert cpu.sum_squares(g[:, ::3]) == pytest.approx(reference.sum_squares(g[:, ::3]), rel=1e-12)
    assert cpu.sum_squares(np.zeros(0, np.float32)) == 0.0


# ------------------------------------------------------------------ determinism


def test_every_threaded_kernel_is_bit_identical_run_to_run():
    """The trainer promises bit-exact resume: no result may depend on thread timing."""
    B, H, dt = 64, 128, np.float32

    def run():
        r = np.random.default_rng(12)  # same inputs both times
        out = []
        for cell in CELLS:
            xp, w_hh, b_hh, prev, h0, dh, dc = _step_inputs(cell, B, H, dt, r, 1.0)
            f = _forward(cpu, cell, xp, w_hh, b_hh, prev, h0)
            out += list(f.values()) + list(_backward(cpu, cell, f, w_hh, prev, h0, dh, dc).values())
        logits = _randn(r, (500, 97), dt, 4.0)
        targets, mask = r.integers(0, 97, 500), np.ones(500, dt)
        d = np.empty_like(logits)
        out += [np.float64(cpu.softmax_xent(logits, targets, mask, 1 / 500, d)), d]
        ids = r.integers(0, 20, 3000)
        dd = _randn(r, (3000, 4 * H), dt)
        acc = np.zeros((20, 4 * H), dt)
        cpu.scatter_add_rows(ids, dd, acc)
        out.append(acc)
        p, g = _randn(r, (1000, 100), dt), _randn(r, (1000, 100), dt)
        m, v = np.zeros_like(p), np.zeros_like(p)
        cpu.adam_update(p, g, m, v, 1e-3, 0.9, 0.999, 1e-8, 0.1, 0.001, 0.0, 0.01)
        out += [p, m, v, np.float64(cpu.sum_squares(_randn(r, (10**6,), dt)))]
        return out

    first, second = run(), run()
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)


# ------------------------------------------------------------------ layer and model


# Shapes for the window kernels' edges: panels of 16 units (H=17: one unit in the last
# panel; H=48: three whole ones; H=5: a single partial one), rows in blocks of 6 (B=13:
# two blocks and a single row; B=3: a short block only), and a one-step window.
@pytest.mark.parametrize("T,B,H", [(6, 3, 17), (1, 13, 48), (4, 8, 5)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("with_hmask", [False, True])
def test_layer_forward_backward_match_reference_backend(cell, with_hmask, dtype, T, B, H):
    """The cpu backend runs a window's steps in one window kernel (cpu.*_window); the
    reference backend steps through the reference kernels one GEMM at a time."""
    rng = np.random.default_rng(CELLS.index(cell) * 10 + with_hmask + T)
    GH = GATES[cell] * H
    xp = _randn(rng, (T, B, GH), dtype)
    w_hh, b_hh = _randn(rng, (GH, H), dtype, 0.3), _randn(rng, (GH,), dtype)
    h0 = _randn(rng, (B, H), dtype)
    c0 = _randn(rng, (B, H), dtype) if cell == "lstm" else None
    hmask = ((rng.random((B, H)) > 0.25) / 0.75).astype(dtype) if with_hmask else None
    dhs = _randn(rng, (T, B, H), dtype)
    results = {}
    for name, k in (("reference", reference), ("cpu", cpu)):
        be = HostBackend(name, k)
        hs, hT, cT, cache = be.layer_forward(cell, xp.copy(), w_hh, b_hh, h0, c0, hmask)  # xp is overwritten
        back = be.layer_backward(cache, dhs, w_hh)
        results[name] = [hs, hT, cT, *back]
    for a, b in zip(results["cpu"], results["reference"]):
        if b is None:
            assert a is None
        else:
            _close(a, b, dtype, rtol=1e-4 if dtype == np.float32 else 1e-11)


@pytest.mark.parametrize("T,B,H", [(6, 3, 17), (1, 13, 48), (9, 64, 128)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("name,k", [("reference", reference), ("cpu", cpu)], ids=["reference", "cpu"])
def test_states_rebuilt_from_the_gates_are_the_forwards_bits(name, k, cell, dtype, T, B, H):
    """HostBackend.drop_states forgets a layer's c and h (GRU: h) and rebuild_states scans
    them back from its gates: the backward must see the very values the forward wrote, on
    both backends, or dropping them would change the gradients."""
    rng = np.random.default_rng(T * B + H)
    GH = GATES[cell] * H
    xp = _randn(rng, (T, B, GH), dtype, 3.0)  # saturated gates too
    w_hh, b_hh = _randn(rng, (GH, H), dtype, 0.3), _randn(rng, (GH,), dtype)
    h0 = _randn(rng, (B, H), dtype)
    c0 = _randn(rng, (B, H), dtype, 5.0) if cell == "lstm" else None
    be = HostBackend(name, k)
    _, _, _, cache = be.layer_forward(cell, xp, w_hh, b_hh, h0, c0, None)
    hs, cs = cache.hs.copy(), None if cache.cs is None else cache.cs.copy()
    assert be.drop_states(cache) and cache.states_dropped and cache.cs is None
    be.rebuild_states(cache)
    np.testing.assert_array_equal(cache.hs, hs)
    if cell == "lstm":
        np.testing.assert_array_equal(cache.cs, cs)
    rebuilt = cache.hs
    be.rebuild_states(cache)  # nothing to do: the same arrays stay
    assert cache.hs is rebuilt


def test_the_state_scans_match_the_reference_on_any_gates():
    """The cpu scans against reference.py on fresh gates (not a forward's), float64 and float32
    (1 ulp: the cpu's rational tanh in float32)."""
    rng = np.random.default_rng(11)
    for dtype in DTYPES:
        T, B, H = 7, 5, 37
        act4 = rng.random((T, B, 4 * H)).astype(dtype)
        act4[..., 2 * H : 3 * H] = 2 * act4[..., 2 * H : 3 * H] - 1  # g in (-1, 1)
        c0, h0 = _randn(rng, (B, H), dtype, 2.0), _randn(rng, (B, H), dtype)
        got = [np.empty((T, B, H), dtype) for _ in range(2)]
        want = [np.empty((T, B, H), dtype) for _ in range(2)]
        cpu.lstm_states_from_gates(act4, c0, *got)
        reference.lstm_states_from_gates(act4, c0, *want)
        for a, b in zip(got, want):
            _close(a, b, dtype)
        act3 = rng.random((T, B, 3 * H)).astype(dtype)
        cpu.gru_states_from_gates(act3, h0, got[1])
        reference.gru_states_from_gates(act3, h0, want[1])
        _close(got[1], want[1], dtype)


@pytest.mark.parametrize("cell", CELLS)
def test_window_kernels_do_not_depend_on_the_thread_split(cell):
    """Bit-exact resume: a window's results are the same bits whether its units are split
    over 1, 2 or 3 parts (each product is one dot product in k order). 3 parts on numba's
    2 threads: one part's thread starts late, or after another on the same thread, and the
    others take its work; the steps' barriers must still let the window finish."""
    rng = np.random.default_rng(7)
    T, B, H, dt = 5, 9, 40, np.float32
    G = GATES[cell]
    xp = _randn(rng, (T, B, G * H), dt)
    w_hh, b_hh = _randn(rng, (G * H, H), dt, 0.3), _randn(rng, (G * H,), dt)
    h0 = _randn(rng, (B, H), dt)
    c0 = _randn(rng, (B, H), dt) if cell == "lstm" else None
    hmask = ((rng.random((B, H)) > 0.25) / 0.75).astype(dt)
    dhs = _randn(rng, (T, B, H), dt)
    fwd = getattr(cpu, f"_{cell}_forward_window")
    bwd = getattr(cpu, f"_{cell}_backward_window")

    def run(threads):
        act = np.empty((T, B, G * H), dt) if cell != "rnn" else None
        cs = np.empty((T, B, H), dt) if cell == "lstm" else None
        hn = np.empty((T, B, H), dt) if cell == "gru" else None
        hs = np.empty((T, B, H), dt)
        fwd(xp, w_hh, b_hh, h0, c0, hmask, act, cs, hn, hs, threads)
        dxp = np.empty((T, B, G * H), dt)
        dhp = np.empty((T, B, G * H), dt) if cell == "gru" else dxp
        dh0 = np.empty((B, H), dt)
        dc = np.zeros((B, H), dt) if cell == "lstm" else None
        bwd(act, cs, hn, hs, h0, c0, hmask, dhs, w_hh, dxp, dhp, dh0, dc, threads)
        return [a for a in (act, cs, hn, hs, dxp, dhp, dh0, dc) if a is not None]

    one = run(1)
    for threads in (2, 3):
        for a, b in zip(one, run(threads)):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("cell", CELLS)
def test_whole_model_matches_reference_backend(cell):
    cfg = ModelConfig(cell=cell, vocab_size=13, embed=6, hidden=24, layers=2, residual=True,
                      dropout=0.2, rec_dropout=0.2)
    rng = np.random.default_rng(CELLS.index(cell))
    T, B = 7, 4
    ids, targets = rng.integers(0, 13, (T, B)), rng.integers(0, 13, (T, B))
    mask = (rng.random((T, B)) > 0.2).astype(np.float32)
    out = {}
    for name, k in (("reference", reference), ("cpu", cpu)):
        model = CharRNN(cfg, backend=HostBackend(name, k), seed=4)
        state = model.zero_state(B)
        state.h[:] = 0.5
        logits, new_state, cache = model.forward(ids, state, train=True, rng=np.random.default_rng(9))
        loss, dl, _ = model.loss(logits, targets, mask)
        out[name] = (logits, new_state.h, loss, model.backward(cache, dl))
    (lc, hc, loss_c, gc), (lr_, hr, loss_r, gr) = out["cpu"], out["reference"]
    np.testing.assert_allclose(lc, lr_, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(hc, hr, rtol=1e-4, atol=1e-5)
    assert loss_c == pytest.approx(loss_r, rel=1e-5)
    for name in gr:
        scale = max(np.abs(gr[name]).max(), 1e-6)
        assert np.abs(gc[name] - gr[name]).max() <= 1e-4 * scale, name
