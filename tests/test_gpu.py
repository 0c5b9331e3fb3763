"""CudaBackend and kernels/cuda.py on a real GPU at realistic sizes (B=64, H=512, T=100).

`make test-gpu` runs these; `make test` deselects them, and without a GPU they skip. The
kernels are compared with kernels/reference.py (or the numba CPU twins where the reference
would be slow), the persistent recurrence with the per-step design and with the CPU, and
one whole training step (forward, loss, backward, clipping, AdamW) on the GPU with the same
step on the CPU. Errors are measured relative to the norm of the expected array: a long
float32 recurrence sums in a different order on each device.

Dimension letters: T=time, B=batch, H=hidden, G=gate blocks, V=vocab, N=rows, D=columns.
"""

import numpy as np
import pytest

from charrnn.backend import HostBackend, cuda_usable

pytestmark = pytest.mark.gpu

if not cuda_usable():
    pytest.skip("no usable CUDA GPU (or NUMBA_ENABLE_CUDASIM=1): run `make test-gpu` on a GPU",
                allow_module_level=True)
cp = pytest.importorskip("cupy", reason="device 'cuda' needs CuPy: pip install 'charrnn[cuda]'")

from bench.persistent_sweep import layer_case, run_variant
from charrnn.config import GATES, ModelConfig, TrainConfig
from charrnn.cuda_backend import CudaBackend
from charrnn.kernels import cpu, reference
from charrnn.kernels import cuda as ck
from charrnn.model import CharRNN
from charrnn.optim import Adam, clip_grad_norm

CELLS = ["lstm", "gru", "rnn"]
T, B, H, V = 100, 64, 512, 65
CPU = HostBackend("cpu", cpu)


def _rel(got, want):
    got = cp.asnumpy(got) if isinstance(got, cp.ndarray) else np.asarray(got)
    want = np.asarray(want, np.float64)
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


def _randn(rng, shape, dtype=np.float32, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(dtype)


# ------------------------------------------------------------------ element-wise and row kernels


@pytest.mark.parametrize("cell", CELLS)
def test_step_kernels(cell):
    rng = np.random.default_rng(1)
    GH = GATES[cell] * H
    xp, hp, b_hh = _randn(rng, (B, GH), scale=3.0), _randn(rng, (B, GH), scale=3.0), _randn(rng, GH)
    prev, dh = _randn(rng, (B, H)), _randn(rng, (B, H))
    d = {n: cp.asarray(a) for n, a in {"xp": xp, "hp": hp, "b_hh": b_hh, "prev": prev, "dh": dh}.items()}
    h, hh = np.empty((B, H), np.float32), cp.empty((B, H), cp.float32)
    if cell == "rnn":
        reference.rnn_forward_step(xp, hp, b_hh, h)
        ck.rnn_forward_step(d["xp"], d["hp"], d["b_hh"], hh)
        dp, dd = np.empty((B, H), np.float32), cp.empty((B, H), cp.float32)
        reference.rnn_backward_step(h, dh, dp)
        ck.rnn_backward_step(cp.asarray(h), d["dh"], dd)
        assert _rel(hh, h) < 1e-6 and _rel(dd, dp) < 1e-6
        return
    act, other = np.empty((B, GH), np.float32), np.empty((B, H), np.float32)
    dact, dother = cp.empty((B, GH), cp.float32), cp.empty((B, H), cp.float32)
    fwd = reference.lstm_forward_step if cell == "lstm" else reference.gru_forward_step
    fwd(xp, hp, b_hh, prev, act, other, h)
    getattr(ck, f"{cell}_forward_step")(d["xp"], d["hp"], d["b_hh"], d["prev"], dact, dother, hh)
    for got, want in ((dact, act), (dother, other), (hh, h)):
        assert _rel(got, want) < 1e-6
    if cell == "lstm":
        dc, dpre = _randn(rng, (B, H)), np.empty((B, GH), np.float32)
        ddc, ddpre = cp.array(dc), cp.empty((B, GH), cp.float32)  # a copy: dc changes
        reference.lstm_backward_step(act, prev, other, dh, dc, dpre)
        ck.lstm_backward_step(cp.asarray(act), d["prev"], cp.asarray(other), d["dh"], ddc, ddpre)
        assert _rel(ddpre, dpre) < 1e-6 and _rel(ddc, dc) < 1e-6
    else:
        outs = [np.empty((B, GH), np.float32), np.empty((B, GH), np.float32),
                np.empty((B, H), np.float32)]
        douts = [cp.empty(o.shape, cp.float32) for o in outs]
        reference.gru_backward_step(act, other, prev, dh, *outs)
        ck.gru_backward_step(cp.asarray(act), cp.asarray(other), d["prev"], d["dh"], *douts)
        assert all(_rel(g, w) < 1e-6 for g, w in zip(douts, outs))


def test_launches_after_the_first_skip_numbas_dispatch():
    """_run's direct path engages (numba compiled the first call; later calls with the same
    kinds of arguments go to the driver) and computes what numba's own launch does."""
    rng = np.random.default_rng(7)
    h, mask = cp.asarray(_randn(rng, (B, H))), cp.asarray(_randn(rng, (B, H)))
    outs = [cp.full((H, B), cp.nan, cp.float32) for _ in range(2)]
    for out in outs:  # the first compiles through numba, the second runs direct
        ck._launch(ck._masked_transpose_kernel, B * H, h, mask, 1, out)
    kinds = ck._kinds((h, mask, 1, outs[0]))
    assert ck._DIRECT[(ck._masked_transpose_kernel, kinds)] is not None
    want = (cp.asnumpy(h) * cp.asnumpy(mask)).T
    for out in outs:
        np.testing.assert_array_equal(cp.asnumpy(out), want)


def test_persistent_launches_go_direct():
    """The persistent kernels' second launches skip numba's dispatch too (a None entry would
    mean numba's slower path for every launch, silently)."""
    run_variant(ck, cp, layer_case(cp, T=3, B=8, H=32, G=4), cp.cuda.runtime.deviceSynchronize,
                0.0)  # each kernel launched twice
    fwd = ck._forward_kernel("lstm", np.float32, 1)
    bwd = [ck._backward_kernel("lstm", np.float32, C, 1) for C in (1, 2, 4)]
    entries = [v for (k, _), v in ck._DIRECT.items() if k is fwd or any(k is b for b in bwd)]
    assert len(entries) >= 2 and all(e is not None for e in entries)


def test_table_loss_sampling_and_optimizer_kernels():
    rng = np.random.default_rng(2)
    N, D = T * B, 4 * H
    ids = rng.integers(0, V, N)
    table = _randn(rng, (V, D))
    out = cp.empty((N, D), cp.float32)
    ck.gather_rows(cp.asarray(table), cp.asarray(ids), out)
    np.testing.assert_array_equal(cp.asnumpy(out), table[ids])
    d = _randn(rng, (N, D))
    want = np.zeros((V, D), np.float32)
    cpu.scatter_add_rows(ids, d, want)  # rows in order, as np.add.at
    acc = cp.zeros((V, D), cp.float32)
    ck.scatter_add_rows(cp.asarray(ids), cp.asarray(d), acc)
    np.testing.assert_array_equal(cp.asnumpy(acc), want)

    logits = _randn(rng, (N, V), scale=3.0)
    mask = (rng.random(N) > 0.1).astype(np.float32)
    want_d = np.empty_like(logits)
    want_loss = reference.softmax_xent(logits, ids, mask, 1.0 / mask.sum(), want_d)
    dl = cp.empty((N, V), cp.float32)
    loss = ck.softmax_xent(cp.asarray(logits), cp.asarray(ids), cp.asarray(mask),
                           1.0 / mask.sum(), dl)
    assert loss == pytest.approx(want_loss, rel=1e-6)
    assert _rel(dl, want_d) < 1e-6
    ls = cp.empty((N, V), cp.float32)
    want_ls = np.empty_like(logits)
    reference.log_softmax_rows(logits, want_ls)
    ck.log_softmax_rows(cp.asarray(logits), ls)
    assert _rel(ls, want_ls) < 1e-6

    for top_k, top_p in ((0, 1.0), (5, 1.0), (0, 0.9)):
        u = rng.random(B)
        want_ids = np.empty(B, np.int64)
        reference.sample_rows(logits[:B], 0.8, top_k, top_p, u, want_ids)
        got_ids = cp.empty(B, cp.int64)
        ck.sample_rows(cp.asarray(logits[:B]), 0.8, top_k, top_p, cp.asarray(u), got_ids)
        np.testing.assert_array_equal(cp.asnumpy(got_ids), want_ids)

    n = 4 * H * H
    p, g = _randn(rng, n), _randn(rng, n)
    m, v = _randn(rng, n, scale=0.1), np.abs(_randn(rng, n, scale=0.1))
    dp, dg, dm, dv = (cp.asarray(a) for a in (p, g, m, v))
    args = (2e-3, 0.9, 0.999, 1e-8, 1 - 0.9**7, 1 - 0.999**7, 0.0, 0.01)
    reference.adam_update(p, g, m, v, *args)
    ck.adam_update(dp, dg, dm, dv, *args)
    assert _rel(dp, p) < 1e-6 and _rel(dm, m) < 1e-6 and _rel(dv, v) < 1e-6
    assert ck.sum_squares(dg) == pytest.approx(reference.sum_squares(g), rel=1e-12)
    assert ck.sum_squares(dg) == ck.sum_squares(dg)  # deterministic


# ------------------------------------------------------------------ one layer, T=100


def _layer_case(cell, dtype, seed):
    rng = np.random.default_rng(seed)
    GH = GATES[cell] * H
    case = {"xp": _randn(rng, (T, B, GH), dtype), "w_hh": _randn(rng, (GH, H), dtype, H**-0.5),
            "b_hh": _randn(rng, GH, dtype, 0.1), "h0": _randn(rng, (B, H), dtype, 0.5),
            "c0": _randn(rng, (B, H), dtype, 0.5) if cell == "lstm" else None,
            "hmask": ((rng.random((B, H)) > 0.2) / 0.8).astype(dtype)}
    return case, _randn(rng, (T, B, H), dtype, 0.1)


def _run_layer(be, cell, case, dhs):
    # Copies: the CPU backend reuses xp and dhs as gate buffers (it would hand the next
    # backend its activations as input projections).
    a = {n: be.asarray(v.copy()) if v is not None else None for n, v in case.items()}
    hs, _, _, cache = be.layer_forward(cell, *a.values())
    back = be.layer_backward(cache, be.asarray(dhs.copy()), a["w_hh"])
    return [hs, *back]


@pytest.mark.parametrize("cell", CELLS)
def test_persistent_and_per_step_layers_agree_with_cpu(cell):
    case, dhs = _layer_case(cell, np.float32, 3)
    want = _run_layer(CPU, cell, case, dhs)
    pers = CudaBackend(persistent=True)
    for be in (pers, CudaBackend(persistent=False)):
        got = _run_layer(be, cell, case, dhs)
        for name, g, w in zip(["hs", "dxp", "dw_hh", "db_hh", "dh0", "dc0"], got, want):
            if w is not None:
                assert _rel(g, w) < 1e-4, (name, be.persistent)
    assert not pers.fallbacks, f"H=512 should fit the persistent kernels: {pers.fallbacks}"


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("units", [0, 2])  # float64 LSTM: 2 units' W_hh and the sums fit 48 KiB
def test_persistent_float64_matches_reference_tightly(cell, units):
    """float64, 20 steps: the persistent kernels' maths with auto and forced block slicing."""
    case, dhs = _layer_case(cell, np.float64, 4)
    n = min(T, 20)
    case["xp"], dhs = case["xp"][:n], dhs[:n]
    ref = HostBackend("reference", reference, reuse_gate_buffers=False)
    want_f = ref.layer_forward(cell, *case.values())
    want_b = ref.layer_backward(want_f[3], dhs, case["w_hh"])
    G = GATES[cell]
    d = {n: cp.asarray(v) if v is not None else None for n, v in case.items()}
    hs = cp.empty((n, B, H))
    act = cp.empty((n, B, G * H)) if cell != "rnn" else None
    cs = cp.empty((n, B, H)) if cell == "lstm" else None
    hn = cp.empty((n, B, H)) if cell == "gru" else None
    ck.persistent_layer_forward(cell, *d.values(), hs, act, cs, hn, units=units)
    assert _rel(hs, want_f[0]) < 1e-12
    dxp, dh0 = cp.empty((n, B, G * H)), cp.empty((B, H))
    dhp = cp.empty((n, B, G * H)) if cell == "gru" else None
    dc = cp.zeros((B, H)) if cell == "lstm" else None
    direct = cp.empty((B, H)) if cell == "gru" else None
    ck.persistent_layer_backward(cell, d["w_hh"], d["hmask"], d["h0"], d["c0"], hs, act, cs, hn,
                                 cp.asarray(dhs), dxp, dhp, dc, direct, dh0, units=units)
    assert _rel(dxp, want_b[0]) < 1e-12 and _rel(dh0, want_b[3]) < 1e-12
    if cell == "lstm":
        assert _rel(dc, want_b[4]) < 1e-12


# ------------------------------------------------------------------ one training step


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("persistent", [True, False])
@pytest.mark.parametrize("residual", [True, False])
def test_one_training_step_cpu_vs_gpu(cell, persistent, residual):
    cfg = ModelConfig(cell=cell, vocab_size=V, embed=64, hidden=H, layers=2, dropout=0.1,
                      rec_dropout=0.1, residual=residual)
    # eps=1e-3: Adam's first step is g / (|g| + eps), continuous in g; with 1e-8 it is
    # sign(g), and a gradient near 0 whose sign differs by summation order moves by +-lr.
    tcfg = TrainConfig(lr=2e-3, weight_decay=0.01, grad_clip=1.0, eps=1e-3)
    params = CharRNN(cfg, seed=11).host_params()
    rng = np.random.default_rng(12)
    x, y = rng.integers(0, V, (T, B)), rng.integers(0, V, (T, B))
    results = []
    for be in (CPU, CudaBackend(persistent=persistent)):
        model = CharRNN(cfg, params={n: p.copy() for n, p in params.items()}, backend=be)
        opt = Adam.from_config(model.params, be.k, tcfg, xp=be.xp)
        logits, state, cache = model.forward(x, model.zero_state(B), train=True,
                                             rng=np.random.default_rng(13))
        loss, dl, _ = model.loss(logits, y)
        grads = model.backward(cache, dl)
        host_grads = {n: be.to_numpy(g).copy() for n, g in grads.items()}
        norm = clip_grad_norm(grads, tcfg.grad_clip, be.k)
        opt.step(grads, tcfg.lr)
        if be is not CPU:  # everything stays on the device
            assert all(isinstance(a, cp.ndarray) for a in model.params.values())
            assert all(isinstance(a, cp.ndarray) for a in opt.m.values())
            assert isinstance(state.h, cp.ndarray)
        results.append((loss, norm, host_grads, model.host_params(), be.to_numpy(state.h)))
    (l0, n0, g0, p0, h0), (l1, n1, g1, p1, h1) = results
    assert l1 == pytest.approx(l0, rel=1e-5)
    assert n1 == pytest.approx(n0, rel=1e-4)
    for name in g0:
        assert _rel(g1[name], g0[name]) < 1e-4, name
    # The GPU's parameters against the CPU optimizer fed the GPU's own gradients, within a
    # few ulps. Against p0, Adam's first step (g / (|g| + eps)) would amplify the gradients'
    # summation-order differences; and an embedding entry's update is ~1e-5 of it, so
    # comparing updates would measure p's rounding (the sides order AdamW's terms apart).
    want = CharRNN(cfg, params={n: p.copy() for n, p in params.items()}, backend=CPU)
    want_grads = {n: g.copy() for n, g in g1.items()}
    assert clip_grad_norm(want_grads, tcfg.grad_clip, CPU.k) == pytest.approx(n1, rel=1e-5)
    Adam.from_config(want.params, CPU.k, tcfg, xp=np).step(want_grads, tcfg.lr)
    for name in p0:
        np.testing.assert_allclose(p1[name], want.params[name], rtol=4 * np.finfo(np.float32).eps,
                                   atol=1e-9, err_msg=name)
    assert _rel(h1, h0) < 1e-4
