"""kernels/cuda.py and CudaBackend against kernels/reference.py, on tiny shapes.

Runs under numba's CUDA simulator (NUMBA_ENABLE_CUDASIM=1, as `make test` sets) or on a
real GPU. Blocks are forced small (THREADS=4, MAX_BLOCKS=3) so several blocks and the grid
stride loops run even at B=2, H=5. The simulator runs every thread as a Python thread, so
shapes stay tiny; tests/test_gpu.py repeats the comparisons at realistic sizes on a GPU.

The simulator has no grid-wide barrier (it runs one block per cooperative grid), so the
persistent recurrence is tested two ways: cooperatively on one block (the whole T loop with
its grid syncs), and "stepwise" (one launch per step) on several blocks of U=2 units (the
slicing of W_hh and the exchange of h through global memory). On a GPU both run with
several blocks.

Dimension letters: T=time, B=batch, H=hidden, G=gate blocks, V=vocab, N=rows, D=columns.
"""

import cuda_target
import numpy as np
import pytest

SIM = cuda_target.require()

from numba import cuda

from charrnn.backend import HostBackend
from charrnn.config import GATES, ModelConfig
from charrnn.cuda_backend import CudaBackend
from charrnn.kernels import cuda as ck
from charrnn.kernels import reference
from charrnn.model import CharRNN, State
from charrnn.optim import Adam, clip_grad_norm, global_norm

CELLS = ["lstm", "gru", "rnn"]
STEP_SHAPES = [(1, 3), (2, 5), (3, 8)]  # (B, H)
REF = HostBackend("reference", reference, reuse_gate_buffers=False)  # its caches are compared


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    monkeypatch.setattr(ck, "THREADS", 4)
    monkeypatch.setattr(ck, "MAX_BLOCKS", 3)
    monkeypatch.setattr(ck, "PERSISTENT_THREADS", 8)


def _tol(dtype, loose=False):
    if dtype == np.float64:
        return {"rtol": 1e-11, "atol": 1e-12}
    # loose: a recurrent product summed in another order than BLAS, carried over T steps
    return {"rtol": 1e-4, "atol": 1e-5} if loose else {"rtol": 1e-5, "atol": 1e-6}


def _dev(a):
    """Host array -> kernel argument: itself under the simulator, a device copy on a GPU."""
    return a if SIM or a is None else cuda.to_device(a)


def _host(a):
    if a is None or isinstance(a, np.ndarray):
        return a
    return a.copy_to_host() if hasattr(a, "copy_to_host") else a.get()


def _randn(rng, shape, dtype, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(dtype)


def _nan(shape, dtype):
    return np.full(shape, np.nan, dtype)


# ------------------------------------------------------------------ recurrent steps


def _run_forward(k, cell, xp, hp, b_hh, prev, dev):
    B, H = prev.shape
    dt = prev.dtype
    out = {"h": _nan((B, H), dt)}
    if cell != "rnn":
        out["act"], out["other"] = _nan(xp.shape, dt), _nan((B, H), dt)  # other: c or hn
    d = {n: dev(a) for n, a in out.items()}
    args = [dev(xp), dev(hp), dev(b_hh)]
    if cell == "rnn":
        k.rnn_forward_step(*args, d["h"])
    elif cell == "lstm":
        k.lstm_forward_step(*args, dev(prev), d["act"], d["other"], d["h"])
    else:
        k.gru_forward_step(*args, dev(prev), d["act"], d["other"], d["h"])
    return {n: _host(a) for n, a in d.items()}


def _run_backward(k, cell, fwd, prev, dh, dc, dev):
    dt = prev.dtype
    if cell == "rnn":
        d = {"dpre": dev(_nan(dh.shape, dt))}
        k.rnn_backward_step(dev(fwd["h"]), dev(dh), d["dpre"])
    elif cell == "lstm":
        d = {"dpre": dev(_nan(fwd["act"].shape, dt)), "dc": dev(dc.copy())}
        k.lstm_backward_step(dev(fwd["act"]), dev(prev), dev(fwd["other"]), dev(dh), d["dc"],
                             d["dpre"])
    else:
        d = {"dxp": dev(_nan(fwd["act"].shape, dt)), "dhp": dev(_nan(fwd["act"].shape, dt)),
             "dh_prev": dev(_nan(dh.shape, dt))}
        k.gru_backward_step(dev(fwd["act"]), dev(fwd["other"]), dev(prev), dev(dh), d["dxp"],
                            d["dhp"], d["dh_prev"])
    return {n: _host(a) for n, a in d.items()}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("B,H", STEP_SHAPES)
def test_step_kernels_match_reference(cell, B, H, dtype):
    rng = np.random.default_rng(100 * B + H)
    GH = GATES[cell] * H
    xp, hp = _randn(rng, (B, GH), dtype, 3.0), _randn(rng, (B, GH), dtype, 3.0)
    xp[0, :3] = [-200.0, 200.0, -1e4]  # saturation: exp must not overflow
    b_hh, prev = _randn(rng, (GH,), dtype), _randn(rng, (B, H), dtype)
    dh, dc = _randn(rng, (B, H), dtype), _randn(rng, (B, H), dtype)
    ref_f = _run_forward(reference, cell, xp, hp, b_hh, prev, lambda a: a)
    got_f = _run_forward(ck, cell, xp, hp, b_hh, prev, _dev)
    for name in ref_f:
        assert np.isfinite(got_f[name]).all(), name
        np.testing.assert_allclose(got_f[name], ref_f[name], **_tol(dtype), err_msg=name)
    ref_b = _run_backward(reference, cell, ref_f, prev, dh, dc, lambda a: a)
    got_b = _run_backward(ck, cell, ref_f, prev, dh, dc, _dev)
    for name in ref_b:
        assert np.isfinite(got_b[name]).all(), name
        np.testing.assert_allclose(got_b[name], ref_b[name], **_tol(dtype), err_msg=name)


# ------------------------------------------------------------------ embedding table


@pytest.mark.parametrize("id_type", [np.int32, np.int64])
@pytest.mark.parametrize("V,D,N", [(3, 5, 1), (5, 7, 9), (11, 4, 13), (4, 3, 40)])
def test_gather_and_scatter_match_reference(V, D, N, id_type):
    rng = np.random.default_rng(V * D + N)
    table = _randn(rng, (V, D), np.float32)
    ids = rng.integers(0, V, N).astype(id_type)
    ids[: min(N, 4)] = ids[0]  # repeated ids on purpose
    out = _dev(_nan((N, D), np.float32))
    ck.gather_rows(_dev(table), _dev(ids), out)
    np.testing.assert_array_equal(_host(out), table[ids])

    d = _randn(rng, (N, D), np.float32)
    start = _randn(rng, (V, D), np.float32)  # scatter adds into what is there
    want = start.copy()
    reference.scatter_add_rows(ids, d, want)
    acc = _dev(start.copy())
    ck.scatter_add_rows(_dev(ids), _dev(d), acc)
    # One thread per (id, column) adding that id's rows in order, as np.add.at: the same
    # sums bit for bit (N=40 over 4 ids: runs longer than the 4-row unrolled step).
    np.testing.assert_array_equal(_host(acc), want)


def test_scatter_takes_ids_of_any_width():
    """uint8 ids of a 256-entry vocabulary: the last id's run is found (V does not fit)."""
    rng = np.random.default_rng(5)
    ids = rng.integers(0, 256, 300).astype(np.uint8)
    ids[:3] = 255
    d = _randn(rng, (300, 3), np.float32)
    want = np.zeros((256, 3), np.float32)
    reference.scatter_add_rows(ids, d, want)
    acc = _dev(np.zeros((256, 3), np.float32))
    ck.scatter_add_rows(_dev(ids), _dev(d), acc)
    np.testing.assert_array_equal(_host(acc), want)


# ------------------------------------------------------------------ loss


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("N,V", [(1, 3), (5, 11), (7, 5)])
@pytest.mark.parametrize("scale", [3.0, 300.0])
def test_softmax_xent_and_log_softmax_match_reference(N, V, dtype, scale):
    rng = np.random.default_rng(N * V + int(scale))
    logits = _randn(rng, (N, V), dtype, scale)
    targets = rng.integers(0, V, N)
    mask = (rng.random(N) > 0.3).astype(dtype)
    mask[0] = 1.0
    if N > 1:
        mask[1] = 0.0  # a masked row: no loss, zero gradient
    s = 1.0 / mask.sum()
    want_d = np.empty_like(logits)
    want = reference.softmax_xent(logits, targets, mask, s, want_d)
    d = _dev(_nan((N, V), dtype))
    got = ck.softmax_xent(_dev(logits), _dev(targets), _dev(mask), s, d)
    assert isinstance(got, float)
    assert got == pytest.approx(want, rel=_tol(dtype)["rtol"], abs=_tol(dtype)["atol"])
    got_d = _host(d)
    np.testing.assert_allclose(got_d, want_d, **_tol(dtype))
    assert not got_d[mask == 0].any()

    # dlogits may alias logits
    both = _dev(logits.copy())
    again = ck.softmax_xent(both, _dev(targets), _dev(mask), s, both)
    assert again == got
    np.testing.assert_array_equal(_host(both), got_d)

    want_l = np.empty_like(logits)
    reference.log_softmax_rows(logits, want_l)
    out = _dev(_nan((N, V), dtype))
    ck.log_softmax_rows(_dev(logits), out)
    np.testing.assert_allclose(_host(out), want_l, **_tol(dtype))


# ------------------------------------------------------------------ sampling


@pytest.mark.parametrize("B,V", [(1, 5), (3, 11), (4, 7)])
@pytest.mark.parametrize("temperature,top_k,top_p",
                         [(1.0, 0, 1.0), (0.7, 3, 1.0), (1.3, 0, 0.6), (0.9, 4, 0.8), (1.0, 1, 1.0)])
def test_sample_rows_draws_the_reference_ids(B, V, temperature, top_k, top_p):
    rng = np.random.default_rng(B * V + top_k)
    for _ in range(3):
        logits = _randn(rng, (B, V), np.float32, 2.0)
        logits[:, 1] = logits[:, 0]  # ties: the lower id comes first in the order
        u = rng.random(B)
        want = np.empty(B, np.int64)
        reference.sample_rows(logits, temperature, top_k, top_p, u, want)
        got = np.full(B, -1, np.int64)  # host out: the sampler passes numpy arrays
        ck.sample_rows(logits, temperature, top_k, top_p, u, got)
        np.testing.assert_array_equal(got, want)
    one = logits[0]
    assert ck.sample_logits(one, temperature, top_k, top_p, 0.5) == reference.sample_logits(
        one, temperature, top_k, top_p, 0.5)


# ------------------------------------------------------------------ optimizer


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(1,), (3, 5), (13,)])
@pytest.mark.parametrize("l2,decay", [(0.0, 0.0), (0.1, 0.0), (0.0, 0.01)])
def test_adam_update_matches_reference(shape, dtype, l2, decay):
    rng = np.random.default_rng(len(shape) + int(100 * (l2 + decay)))
    p, g = _randn(rng, shape, dtype), _randn(rng, shape, dtype)
    m, v = _randn(rng, shape, dtype, 0.1), np.abs(_randn(rng, shape, dtype, 0.1))
    want = [a.copy() for a in (p, m, v)]
    args = (3e-3, 0.9, 0.999, 1e-8, 1 - 0.9**3, 1 - 0.999**3, l2, decay)
    reference.adam_update(want[0], g, want[1], want[2], *args)
    got = [_dev(a.copy()) for a in (p, m, v)]
    ck.adam_update(got[0], _dev(g), got[1], got[2], *args)
    for name, a, b in zip("pmv", got, want):
        np.testing.assert_allclose(_host(a), b, **_tol(dtype), err_msg=name)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(1,), (7,), (5, 11)])
def test_sum_squares_matches_reference_and_repeats_exactly(shape, dtype):
    g = _randn(np.random.default_rng(shape[0]), shape, dtype, 10.0)
    got = ck.sum_squares(_dev(g))
    assert isinstance(got, float)
    assert got == pytest.approx(reference.sum_squares(g), rel=1e-12)
    assert ck.sum_squares(_dev(g)) == got  # a fixed reduction tree: the same bits


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sum_squares_total_matches_reference_with_one_host_copy(dtype, monkeypatch):
    rng = np.random.default_rng(11)
    # Sizes around block multiples (the simulator's THREADS is small), one empty array.
    arrays = [_randn(rng, shape, dtype, 3.0) for shape in [(5, 11), (1,), (0,), (ck.THREADS + 1,), (3, 4, 2)]]
    want = reference.sum_squares_total(arrays)
    copies = []
    real = ck._scalar
    monkeypatch.setattr(ck, "_scalar", lambda a: copies.append(1) or real(a))
    got = ck.sum_squares_total([_dev(a) for a in arrays])
    assert got == pytest.approx(want, rel=1e-12)
    assert len(copies) == 1  # one sync with the host, however many arrays
    assert ck.sum_squares_total([_dev(a) for a in arrays]) == got  # the same bits again
    assert global_norm(dict(enumerate(_dev(a) for a in arrays)), ck) == pytest.approx(want**0.5, rel=1e-12)
    assert ck.sum_squares_total([]) == 0.0


def test_reductions_need_a_power_of_two_block(monkeypatch):
    monkeypatch.setattr(ck, "THREADS", 6)
    with pytest.raises(ValueError, match="THREADS"):
        ck.sum_squares(_dev(np.ones(3, np.float32)))


# ------------------------------------------------------------------ one layer over a window


def _layer_case(cell, T, B, H, dtype, seed, masked):
    rng = np.random.default_rng(seed)
    G = GATES[cell]
    case = {
        "xp": _randn(rng, (T, B, G * H), dtype),
        "w_hh": _randn(rng, (G * H, H), dtype, 0.6),
        "b_hh": _randn(rng, (G * H,), dtype),
        "h0": _randn(rng, (B, H), dtype),
        "c0": _randn(rng, (B, H), dtype) if cell == "lstm" else None,
        "hmask": ((rng.random((B, H)) > 0.3) / 0.7).astype(dtype) if masked else None,
    }
    return case, _randn(rng, (T, B, H), dtype)


def _compare_layer(be, cell, case, dhs, dtype):
    """be's layer forward and backward against the reference backend's."""
    want = REF.layer_forward(cell, *case.values())
    want_b = REF.layer_backward(want[3], dhs, case["w_hh"])
    a = {n: be.asarray(v) if v is not None else None for n, v in case.items()}
    got = be.layer_forward(cell, *a.values())
    got_b = be.layer_backward(got[3], be.asarray(dhs), a["w_hh"])
    tol = _tol(dtype, loose=True)
    for name, x, y in zip(["hs", "hT", "cT"], got[:3], want[:3]):
        assert (x is None) == (y is None), name
        if y is not None:
            np.testing.assert_allclose(be.to_numpy(x), y, **tol, err_msg=name)
    for field in ("act", "cs", "hn"):
        y = getattr(want[3], field)
        if y is not None:
            np.testing.assert_allclose(be.to_numpy(getattr(got[3], field)), y, **tol,
                                       err_msg=field)
    for name, x, y in zip(["dxp", "dw_hh", "db_hh", "dh0", "dc0"], got_b, want_b):
        assert (x is None) == (y is None), name
        if y is not None:
            np.testing.assert_allclose(be.to_numpy(x), y, **tol, err_msg=name)


class _DeviceArray:
    """What _kind reads of a CuPy or numba device array."""

    def __init__(self, shape, strides, dtype=np.float32):
        self.shape, self.strides, self.dtype = shape, strides, np.dtype(dtype)
        self.size = int(np.prod(shape))
        self.__cuda_array_interface__ = {}


def test_direct_launch_kinds(monkeypatch):
    """The key that picks a compiled kernel for _run's direct launches: a device array's
    dtype, ndim and C/F contiguity (size-1 dims take any stride), a scalar's type; None
    for what only numba's own launch passes."""
    monkeypatch.setattr(ck.cuda.devicearray, "is_cuda_ndarray", lambda a: isinstance(a, _DeviceArray))
    assert ck._kind(_DeviceArray((3, 4), (16, 4))) == ("<f4", 2, True, False)
    assert ck._kind(_DeviceArray((3, 4), (4, 12))) == ("<f4", 2, False, True)
    assert ck._kind(_DeviceArray((3, 4), (32, 4))) == ("<f4", 2, False, False)  # a row slice
    assert ck._kind(_DeviceArray((1, 4), (999, 4))) == ("<f4", 2, True, True)  # one row: both
    assert ck._kind(_DeviceArray((5,), (8,), np.float64)) == ("<f8", 1, True, True)
    assert ck._kind(_DeviceArray((5,), (16,), np.float64)) == ("<f8", 1, False, False)
    assert [ck._kind(v) for v in (3, 0.5, np.float32(1))] == [int, float, np.float32]
    assert ck._kind(np.zeros(3)) is None and ck._kind("x") is None
    assert ck._kinds((1, np.zeros(2))) is None


def test_direct_launch_kinds_leave_other_arrays_to_numba(monkeypatch):
    """Only numba and CuPy device arrays go direct (their fields are read); other array-
    interface objects and empty arrays (numba types those C-contiguous whatever their
    strides) keep numba's own launch."""
    monkeypatch.setattr(ck.cuda.devicearray, "is_cuda_ndarray", lambda a: True)
    assert ck._kind(_DeviceArray((3, 4), (16, 4))) == ("<f4", 2, True, False)
    assert ck._kind(_DeviceArray((3, 0), (0, 0))) is None
    monkeypatch.setattr(ck.cuda.devicearray, "is_cuda_ndarray", lambda a: False)
    assert ck._kind(_DeviceArray((3, 4), (16, 4))) is None  # neither numba's nor CuPy's


def test_flat_refuses_strided_arrays():
    """A strided array would be reshaped into a copy, and the kernel would update the copy."""
    assert ck._flat(np.zeros((2, 3))).shape == (6,)
    with pytest.raises(ValueError, match="C-contiguous"):
        ck._flat(np.zeros((2, 6))[:, ::2])


@pytest.mark.parametrize("T", [1, 2])
def test_one_step_windows_take_the_per_step_design(monkeypatch, T):
    """A window of one step (names, T=1 sampling) runs the per-step design and the persistent
    kernels do not compile for its batch size; two steps or more run the persistent ones."""
    calls = []
    for name in ("persistent_layer_forward", "persistent_layer_backward"):
        real = getattr(ck, name)
        monkeypatch.setattr(ck, name, lambda *a, _real=real, _n=name, **k: (calls.append(_n),
                                                                          _real(*a, **k))[1])
    case, dhs = _layer_case("lstm", T, 2, 5, np.float32, 3, True)
    be = CudaBackend()
    _compare_layer(be, "lstm", case, dhs, np.float32)
    assert calls == ([] if T == 1 else ["persistent_layer_forward", "persistent_layer_backward"])
    assert not be.fallbacks  # the persistent kernels ran (a call that raised would fall back)


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("T,B,H", [(3, 1, 3), (2, 2, 5), (3, 3, 8)])
@pytest.mark.parametrize("persistent", [True, False])
def test_cuda_backend_layer_matches_reference(cell, T, B, H, persistent):
    masked = H != 5
    case, dhs = _layer_case(cell, T, B, H, np.float32, 10 * T + H, masked)
    be = CudaBackend(persistent=persistent)
    _compare_layer(be, cell, case, dhs, np.float32)
    assert not be.fallbacks  # the persistent kernels took it (one block on the simulator)


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("B,H,units,splits,tile_rows", [
    (2, 5, 2, 0, 0), (3, 8, 3, 0, 0),
    (10, 8, 3, 2, 3),  # 2 row groups (rows bq, bq+2, ..., some past B), tiles of 3 rows
    (17, 6, 2, 3, 1),  # 3 row groups, 3 k-splits summed in shared memory, 1-row tiles
    (33, 4, 1, 1, 0),  # a tile's padding rows reach past its row stride (SB=35 < 8*BR=40)
])
def test_persistent_kernels_on_several_blocks(monkeypatch, cell, dtype, B, H, units, splits,
                                              tile_rows):
    """U units per block, ceil(H/U) blocks (the last owning fewer), forced k-splits and
    tile sizes. On the simulator one launch per step (no grid barrier there); on a GPU, one
    cooperative launch."""
    monkeypatch.setattr(ck, "PERSISTENT_THREADS", 64)
    T = 3
    force = {"units": units, "splits": splits, "tile_rows": tile_rows, "stepwise": SIM}
    case, dhs = _layer_case(cell, T, B, H, dtype, B * H + units, masked=True)
    want = REF.layer_forward(cell, *case.values())
    want_b = REF.layer_backward(want[3], dhs, case["w_hh"])
    G = GATES[cell]
    out = {"hs": _nan((T, B, H), dtype),
           "act": _nan((T, B, G * H), dtype) if cell != "rnn" else None,
           "cs": _nan((T, B, H), dtype) if cell == "lstm" else None,
           "hn": _nan((T, B, H), dtype) if cell == "gru" else None}
    d = {n: _dev(a) for n, a in out.items()}
    c = {n: _dev(a) for n, a in case.items()}
    ck.persistent_layer_forward(cell, c["xp"], c["w_hh"], c["b_hh"], c["h0"], c["c0"], c["hmask"],
                                d["hs"], d["act"], d["cs"], d["hn"], **force)
    tol = _tol(dtype, loose=True)
    np.testing.assert_allclose(_host(d["hs"]), want[0], **tol)
    for field in ("act", "cs", "hn"):
        if out[field] is not None:
            np.testing.assert_allclose(_host(d[field]), getattr(want[3], field), **tol)

    bo = {"dxp": _nan((T, B, G * H), dtype),
          "dhp": _nan((T, B, G * H), dtype) if cell == "gru" else None,
          "dc": np.zeros((B, H), dtype) if cell == "lstm" else None,
          "direct": np.zeros((B, H), dtype) if cell == "gru" else None,
          "dh0": _nan((B, H), dtype)}
    db = {n: _dev(a) for n, a in bo.items()}
    ck.persistent_layer_backward(cell, c["w_hh"], c["hmask"], c["h0"], c["c0"], d["hs"], d["act"],
                                 d["cs"], d["hn"], _dev(dhs), db["dxp"], db["dhp"], db["dc"],
                                 db["direct"], db["dh0"], **force)
    np.testing.assert_allclose(_host(db["dxp"]), want_b[0], **tol)
    np.testing.assert_allclose(_host(db["dh0"]), want_b[3], **tol)
    if cell == "lstm":
        np.testing.assert_allclose(_host(db["dc"]), want_b[4], **tol)


def test_layer_too_large_for_persistent_falls_back_to_steps(monkeypatch):
    monkeypatch.setattr(ck, "SMEM_LIMIT", 64)  # not even one unit's W_hh slice fits
    case, dhs = _layer_case("lstm", 2, 2, 5, np.float32, 3, masked=True)
    with pytest.raises(ck.PersistentUnavailable, match="H=5"):
        ck.persistent_layer_forward("lstm", *(_dev(v) for v in case.values()),
                                    *(_dev(_nan(s, np.float32)) for s in
                                      [(2, 2, 5), (2, 2, 20), (2, 2, 5)]), None)
    be = CudaBackend(persistent=True)
    _compare_layer(be, "lstm", case, dhs, np.float32)
    assert list(be.fallbacks) == [("lstm", 2, 5, np.dtype(np.float32).str)]


# ------------------------------------------------------------------ the whole model


def _model_step(be, cfg, params, ids, targets, rng_seed):
    """Forward (train, with dropout), loss, backward, clip and one AdamW step on backend be
    -> host logits, loss, grads, final state, updated params."""
    model = CharRNN(cfg, params={n: p.copy() for n, p in params.items()}, backend=be)
    state = model.zero_state(ids.shape[1])
    state = State(state.h + 0.1, state.c - 0.2 if state.c is not None else None)
    logits, st, cache = model.forward(ids, state, train=True, rng=np.random.default_rng(rng_seed))
    loss, dl, _ = model.loss(logits, targets)
    grads = model.backward(cache, dl)
    host_grads = {k: be.to_numpy(g).copy() for k, g in grads.items()}
    clip_grad_norm(grads, 0.5, be.k)
    # eps=1e-3 keeps Adam's first step continuous in g (with 1e-8 it is sign(g), and a
    # gradient near 0 whose sign differs by summation order would move by +-lr).
    opt = Adam(model.params, be.k, lr=1e-2, eps=1e-3, weight_decay=0.1, decoupled=True,
               xp=be.xp)
    opt.step(grads)
    return (be.to_numpy(logits), loss, host_grads, be.to_numpy(st.h), model.host_params())


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("persistent,residual", [(True, True), (False, True), (False, False)])
def test_char_rnn_on_cuda_backend_matches_reference(cell, persistent, residual):
    """2 layers, T=3, B=2, H=4, dropout and recurrent dropout: logits, loss, every gradient,
    the carried state and the parameters after a clipped AdamW step."""
    cfg = ModelConfig(cell=cell, vocab_size=7, embed=3, hidden=4, layers=2, dropout=0.2,
                      rec_dropout=0.25, residual=residual)
    params = CharRNN(cfg, seed=5).host_params()
    rng = np.random.default_rng(9)
    ids, targets = rng.integers(0, 7, (3, 2)), rng.integers(0, 7, (3, 2))
    want = _model_step(REF, cfg, params, ids, targets, 1)
    be = CudaBackend(persistent=persistent)
    got = _model_step(be, cfg, params, ids, targets, 1)
    assert not be.fallbacks
    tol = _tol(np.float32, loose=True)
    np.testing.assert_allclose(got[0], want[0], **tol)
    assert got[1] == pytest.approx(want[1], rel=1e-5)
    for name in want[2]:
        np.testing.assert_allclose(got[2][name], want[2][name], **tol, err_msg=name)
    np.testing.assert_allclose(got[3], want[3], **tol)
    for name in want[4]:
        np.testing.assert_allclose(got[4][name], want[4][name], **tol, err_msg=name)


def test_row_stack_alias_is_restored_only_where_numpy_lacks_it():
    """numba-cuda 0.30.4 compiles nothing on numpy 2.5 without np.row_stack."""
    import types

    from charrnn import restore_row_stack

    gone = types.SimpleNamespace(vstack=np.vstack)
    restore_row_stack(gone)
    assert gone.row_stack is np.vstack
    own = types.SimpleNamespace(vstack=np.vstack, row_stack=len)
    restore_row_stack(own)
    assert own.row_stack is len
