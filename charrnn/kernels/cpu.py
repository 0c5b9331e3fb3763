"""Numba twins of the kernels in `reference.py`: same names, argument order and meaning.
The recurrent step kernels' place is taken by window kernels (`*_forward_window`,
`*_backward_window`: a layer's whole window of steps), whose twin is HostBackend's per-step
loop over the reference's step kernels; their cell arithmetic is the units functions below.

Every kernel is `@njit(cache=True)` without signatures, so numba specialises it for float32
or float64 arrays and int32 or int64 ids on first use and caches the machine code on disk.
Kernels write into the arrays they are given; the only allocations are small buffers named
where they happen (loss per row, partial sums, the sampler's sort of V ids).

Determinism: the trainer promises bit-exact resume, so no floating-point sum here depends on
how threads split the work. Element-wise kernels have no sums at all; softmax_xent sums its
per-row losses sequentially; scatter_add_rows gives each thread whole columns; sum_squares
sums fixed-size chunks, then the chunks in order.

Arithmetic stays in the arrays' dtype (constants are cast with `dtype.type`), in the same
order as reference.py, so only exp/tanh/log may differ from numpy in the last bit. Sums over
a softmax row are accumulated in float64.

Dimension letters: B=batch, H=hidden, G=gate blocks, V=vocab, N=rows, D=columns.
"""

from __future__ import annotations

import math

import numba
import numpy as np
from numba import njit, prange, types
from numba.extending import overload

from charrnn.kernels import atomics
from charrnn.kernels.matvec import rows_dot
from charrnn.kernels.panels import NR, pack_cols, pack_rows, panel_product

# Thread wait policies (OMP_WAIT_POLICY, OPENBLAS_THREAD_TIMEOUT) are set in charrnn/__init__.py,
# before numpy or numba start their thread pools.

# Thresholds below were measured on 2 cores, omp layer, passive waits (a parallel launch
# costs ~10 us there); each path gives the same bits, so they only trade speed.
#
# Softmax rows (one exp per element, ~5 ns): threaded from N*V = ROW_PAR_MIN;
# N=64,V=65: 20 us on one thread, 24 on two; N=256,V=65: 77 vs 51 us.
ROW_PAR_MIN = 1 << 14
# Adam (~5 ns per element): work items of CHEAP_CHUNK, threaded from four of them;
# n=4096: 21 us on one thread, 31 on two; n=16384: 80 vs 53 us.
CHEAP_CHUNK = 4096
CHEAP_PAR_MIN = 4 * CHEAP_CHUNK
# Row copies and scatter-adds are memory-bound: gather 640x512 42 us either way,
# 6400x2048 4.2 vs 2.8 ms; scatter 640x512 281 vs 231 us.
COPY_PAR_MIN = 1 << 18
# scatter_add_rows splits the columns into one contiguous range a thread, each range a whole
# number of COL_ALIGN elements (64 bytes of float32: a cache line).
COL_ALIGN = 16
# Elements per partial sum in sum_squares: fixed, so the result does not depend on threads.
# Threaded from SQ_PAR_MIN chunks: 4 chunks 22 us either way, 16 chunks 84 vs 55 us.
SQ_CHUNK = 16384
SQ_PAR_MIN = 8


@njit(cache=True, inline="always")
def _sigmoid(x, one):
    # exp(-|x|) never overflows (float32 exp(89) is inf). Equal to reference._sigmoid's
    # 1/(1+exp(-x)) for x >= 0 and exp(x)/(1+exp(x)) below, bit for bit, but one exp and
    # a select instead of a branch: 3.6 vs 8.5 ns per float32 element on random signs.
    e = math.exp(-abs(x))
    return (one if x >= 0 else e) / (one + e)


@njit(cache=True, inline="always")
def _tanh_fast(x):
    # Eigen's float tanh (and XLA's, ONNX Runtime's): an odd 13/6 rational minimax fit,
    # clamped where tanh rounds to +-1. Within 4e-7 of tanh (libm: 6e-8), and arithmetic
    # only, so cell loops vectorise (libm tanhf costs 19 ns an element here).
    f = np.float32
    x = min(max(x, f(-7.90531110763549805)), f(7.90531110763549805))
    x2 = x * x
    p = x2 * f(-2.76076847742355e-16) + f(2.00018790482477e-13)
    p = x2 * p + f(-8.60467152213735e-11)
    p = x2 * p + f(5.12229709037114e-08)
    p = x2 * p + f(1.48572235717979e-05)
    p = x2 * p + f(6.37261928875436e-04)
    p = x2 * p + f(4.89352455891786e-03)
    q = x2 * f(1.19825839466702e-06) + f(1.18534705686654e-04)
    q = x2 * q + f(2.26843463243900e-03)
    q = x2 * q + f(4.89352518554385e-03)
    return x * p / q


@njit(cache=True, inline="always")
def _sigmoid_fast(x):
    # sigmoid(x) = (1 + tanh(x/2)) / 2: within 2.3e-7 of the exact value (absolute).
    half = np.float32(0.5)
    return half * _tanh_fast(half * x) + half


def _tanh_act(x):
    """tanh for the step kernels: fast in float32, exact in float64 (resolved at compile time)."""


def _sigmoid_act(x, one):
    """sigmoid for the step kernels: fast in float32, exact in float64."""


@overload(_tanh_act)
def _tanh_act_impl(x):
    # float32 cells use the rational tanh: arithmetic only, so the loops vectorise (libm
    # tanhf is a 19 ns call per element). float64 keeps libm: the finite-difference
    # gradient checks run through these kernels and need full precision.
    if x == types.float32:
        return lambda x: _tanh_fast(x)
    return lambda x: math.tanh(x)


@overload(_sigmoid_act)
def _sigmoid_act_impl(x, one):
    if x == types.float32:
        return lambda x, one: _sigmoid_fast(x)
    return lambda x, one: _sigmoid(x, one)


# ---------------------------------------------------------------- cell arithmetic
#
# Each cell's arithmetic is one inline function over a unit range [u0, u1) of one batch row
# (`_*_units`). The window kernels below run it over each thread's units, right after that
# thread's share of the recurrent product; generate_ids over each work item's units.
# Gate-width rows (xp, hp, act, dpre: G blocks) are passed whole, with their block stride;
# unit-width rows (c, h, dh, ...) come sliced to the range. Two rules keep every loop vectorised (measured at B=64, H=128: a scalar LSTM forward
# step costs ~14-28 ns per unit, a vectorised one ~4):
# - a loop touches at most five arrays: with more, LLVM needs more runtime alias checks
#   than it will emit (8) and leaves the loop scalar; so the gate non-linearities are one
#   pass per gate block and the cell update another;
# - a loop indexes from 0: each gate block is its own slice (`_gate`), because an index
#   like 2*H + j with H known only at run time defeats the vectoriser (it cannot rule out
#   a negative, wrapped-around index).
# A row's gate-width output is built in a scratch row `s` and copied out last, so it may be
# the very array it replaces (act = xp, dpre = act: the host backends reuse those buffers,
# one (T,B,G*H) array a layer less). Writing it in place instead would alias a loop's
# input and output, and LLVM's alias check would send every loop down its scalar path.


@njit(cache=True, inline="always")
def _gate(row, k, stride, u0, u1):
    """Units [u0, u1) of gate block k of a row whose blocks are `stride` apart."""
    return row[k * stride + u0 : k * stride + u1]


@njit(cache=True, inline="always")
def _copy_row(src, dst):
    for j in range(dst.shape[0]):
        dst[j] = src[j]


@njit(cache=True, inline="always")
def _copy_out(s, G, a, H, u0, u1):
    """The G gate blocks built in scratch s (G*n,) into row a's units [u0, u1)."""
    n = u1 - u0
    for k in range(G):
        _copy_row(_gate(s, k, n, 0, n), _gate(a, k, H, u0, u1))


@njit(cache=True, inline="always")
def _lstm_fwd_units(x, p, ps, b_hh, cp, cr, hr, a, s, u0, u1):
    """x (4H,) input projections; p (>= 3*ps + u1,) recurrent products, blocks ps apart;
    cp (n,) c_{t-1} -> cr, hr (n,) c_t, h_t; a (4H,) activations [i,f,g,o] (may be x)."""
    H = b_hh.shape[0] // 4
    n = u1 - u0
    one = cr.dtype.type(1)
    for k in range(4):
        xk, pk, bk, sk = _gate(x, k, H, u0, u1), _gate(p, k, ps, u0, u1), _gate(b_hh, k, H, u0, u1), _gate(s, k, n, 0, n)
        if k == 2:  # g
            for j in range(n):
                sk[j] = _tanh_act(xk[j] + pk[j] + bk[j])
        else:  # i, f, o
            for j in range(n):
                sk[j] = _sigmoid_act(xk[j] + pk[j] + bk[j], one)
    i, f, g, o = _gate(s, 0, n, 0, n), _gate(s, 1, n, 0, n), _gate(s, 2, n, 0, n), _gate(s, 3, n, 0, n)
    for j in range(n):  # the state update; _lstm_state_units repeats it
        cc = f[j] * cp[j] + i[j] * g[j]
        cr[j] = cc
        hr[j] = o[j] * _tanh_act(cc)
    _copy_out(s, 4, a, H, u0, u1)


@njit(cache=True, inline="always")
def _lstm_state_units(i, f, g, o, cp, cr, hr):
    """Activated gates i, f, g, o and c_{t-1} cp (n,) -> c_t cr, h_t hr (n,): the state update
    of _lstm_fwd_units, the same operations in the same order (no fast-math: nothing fused
    or reassociated), so the same bits (tested). Two loops of at most five arrays (the rule
    above): as one loop over seven, like the forward's, the scan took 0.40 ms a 2x128 step,
    as two 0.21. The forward's loop is left as it was measured."""
    for j in range(cr.shape[0]):
        cr[j] = f[j] * cp[j] + i[j] * g[j]
    for j in range(cr.shape[0]):
        hr[j] = o[j] * _tanh_act(cr[j])



@njit(cache=True, inline="always")
def _lstm_bwd_units(a, cp, cr, dhr, dcr, dp, s, u0, u1):
    """a (4H,) activations; cp, cr (n,) c_{t-1}, c_t; dhr (n,) dL/dh_t in full; dcr (n,) in:
    dL/dc_t from step t+1, out: dL/dc_{t-1}; dp (4H,) out: dL/d(pre-activation) (may be a)."""
    H = a.shape[0] // 4
    n = u1 - u0
    one = cr.dtype.type(1)
    i, f, g, o = _gate(a, 0, H, u0, u1), _gate(a, 1, H, u0, u1), _gate(a, 2, H, u0, u1), _gate(a, 3, H, u0, u1)
    do = _gate(s, 3, n, 0, n)
    for j in range(n):  # dL/dc_t in full, into dc; the o gate
        tc = _tanh_act(cr[j])
        dhv = dhr[j]
        dcr[j] = dcr[j] + dhv * o[j] * (one - tc * tc)
        do[j] = dhv * tc * o[j] * (one - o[j])
    di, df, dg = _gate(s, 0, n, 0, n), _gate(s, 1, n, 0, n), _gate(s, 2, n, 0, n)
    for j in range(n):  # i, f, g, then dL/dc_{t-1}
        dct = dcr[j]
        di[j] = dct * g[j] * i[j] * (one - i[j])
        df[j] = dct * cp[j] * f[j] * (one - f[j])
        dg[j] = dct * i[j] * (one - g[j] * g[j])
        dcr[j] = dct * f[j]
    _copy_out(s, 4, dp, H, u0, u1)



# ---------------------------------------------------------------- GRU


@njit(cache=True, inline="always")
def _gru_fwd_units(x, p, ps, b_hh, hpr, a, hnr, hr, s, u0, u1):
    """x (3H,); p recurrent products, blocks ps apart; hpr (n,) h_{t-1} -> a (3H,) = [r,z,n]
    (may be x), hnr (n,) = W_hn h + b_hn, hr (n,) h_t."""
    H = b_hh.shape[0] // 3
    n = u1 - u0
    one = hr.dtype.type(1)
    for k in range(2):  # r, z
        xk, pk, bk, sk = _gate(x, k, H, u0, u1), _gate(p, k, ps, u0, u1), _gate(b_hh, k, H, u0, u1), _gate(s, k, n, 0, n)
        for j in range(n):
            sk[j] = _sigmoid_act(xk[j] + (pk[j] + bk[j]), one)
    pn, bn = _gate(p, 2, ps, u0, u1), _gate(b_hh, 2, H, u0, u1)
    for j in range(n):
        hnr[j] = pn[j] + bn[j]
    r, z, nn, xn = _gate(s, 0, n, 0, n), _gate(s, 1, n, 0, n), _gate(s, 2, n, 0, n), _gate(x, 2, H, u0, u1)
    for j in range(n):
        nn[j] = _tanh_act(xn[j] + r[j] * hnr[j])
    _gru_state_units(z, nn, hpr, hr)
    _copy_out(s, 3, a, H, u0, u1)


@njit(cache=True, inline="always")
def _gru_state_units(z, nn, hpr, hr):
    """Gates z, n and h_{t-1} hpr (n,) -> h_t hr (n,): the forward's loop, which
    gru_states_from_gates shares (same bits)."""
    one = hr.dtype.type(1)
    for j in range(hr.shape[0]):
        hr[j] = (one - z[j]) * nn[j] + z[j] * hpr[j]



@njit(cache=True, inline="always")
def _gru_bwd_units(a, hnr, hpr, dhr, dx, dp, dhpr, s, u0, u1):
    """a (3H,) activations; hnr, hpr, dhr (n,) hn, h_{t-1}, dL/dh_t -> dx (3H,) dL/dxp (may be
    a), dp (3H,) dL/dhp, dhpr (n,) the direct path z * dh to h_{t-1}."""
    H = a.shape[0] // 3
    n = u1 - u0
    one = dhr.dtype.type(1)
    r, z, nn = _gate(a, 0, H, u0, u1), _gate(a, 1, H, u0, u1), _gate(a, 2, H, u0, u1)
    dr, dz, dn = _gate(s, 0, n, 0, n), _gate(s, 1, n, 0, n), _gate(s, 2, n, 0, n)
    for j in range(n):
        dhv = dhr[j]
        dnv = dhv * (one - z[j]) * (one - nn[j] * nn[j])
        dn[j] = dnv
        dr[j] = dnv * hnr[j] * r[j] * (one - r[j])
    for j in range(n):
        dz[j] = dhr[j] * (hpr[j] - nn[j]) * z[j] * (one - z[j])
    _copy_out(s, 2, dp, H, u0, u1)  # r, z: dL/dhp = dL/dxp
    dpn = _gate(dp, 2, H, u0, u1)
    for j in range(n):  # n: hp's n block enters scaled by r
        dpn[j] = dn[j] * r[j]
    for j in range(n):
        dhpr[j] = dhr[j] * z[j]
    _copy_out(s, 3, dx, H, u0, u1)



# ---------------------------------------------------------------- vanilla RNN (tanh)


@njit(cache=True, inline="always")
def _rnn_fwd_units(x, p, b_hh, hr, u0, u1):
    """x, p, b_hh (H,) whole; hr (n,) -> tanh(x + p + b_hh) over units [u0, u1)."""
    xk, pk, bk = x[u0:u1], p[u0:u1], b_hh[u0:u1]
    for j in range(u1 - u0):
        hr[j] = _tanh_act(xk[j] + pk[j] + bk[j])



@njit(cache=True, inline="always")
def _rnn_bwd_units(hr, dhr, d):
    one = hr.dtype.type(1)
    for j in range(d.shape[0]):
        d[j] = dhr[j] * (one - hr[j] * hr[j])



# ---------------------------------------------------------------- recurrent windows
#
# A window's T steps of one layer in one call, one parallel region. The H units are split
# into `parts` contiguous ranges of NR-unit panels; a step's work for one part is the
# recurrent product for those units only (every gate of them, against W_hh packed once per
# window, panels.py) and the cell over them. Each thread runs every step: it takes the parts
# nobody has taken yet (its own first) through atomic counters, then waits at the step's
# barrier until every part is done (step t+1 needs all of h_t). Against the per-step loop (an
# OpenBLAS call, which repacks W_hh and splits itself over threads, then a serial cell
# kernel), this packs once, threads the cell work too, and starts threads once a window: a
# region a step, as before the barriers, cost ~10-30 us each to wake a sleeping thread
# (training keeps idle threads passive, charrnn/__init__.py): 2x128 windows (T=16) ran
# 100 -> 89 us a forward step and 89 -> 74 a backward one. Results do not depend on `parts`
# or on which thread takes a part: each product is one dot product in k order, and each
# unit's cell arithmetic is the step kernels' own.
#
# One signature for every cell (arguments a cell does not use are None; no mask is a (0, 0)
# array in the private kernels, None in the public ones):
#   *_forward_window(xp, w_hh, b_hh, h0, c0, hmask, act, cs, hn, hs)
#   *_backward_window(act, cs, hn, hs, h0, c0, hmask, dhs, w_hh, dxp, dhp, dh0, dc)
# with the meanings of HostBackend._forward_steps and _backward_steps, whose per-step loop
# over the reference kernels is their twin. All arrays C-contiguous.


@njit(cache=True, inline="always")
def _units(part, parts, Q, H):
    """The panels [q0, q1) and units [u0, u1) of one part."""
    q0, q1 = part * Q // parts, (part + 1) * Q // parts
    return q0, q1, q0 * NR, min(q1 * NR, H)


@njit(cache=True, inline="always")
def _products(src, P, out, q0, q1):
    """out[:, j*Q*NR + NR*q : +NR] = src @ panel (q, j) for q in [q0, q1), every gate j."""
    HP = P.shape[0] * NR
    for q in range(q0, q1):
        for j in range(P.shape[1]):
            panel_product(src, P, q, j, out, j * HP + q * NR)


@njit(cache=True, inline="always")
def _parts(Q, threads):
    return max(1, min(threads, Q))


PAD = 16  # int64s between two atomic counters: each on its own cache lines


@njit(cache=True, inline="always")
def _counters(parts):
    """A window's step counters (atomics.py): cnt[p * PAD] = steps whose item of part p has
    been taken, cnt[parts * PAD] = items done, over the whole window."""
    cnt = np.empty((parts + 1) * PAD, np.int64)
    for i in range(cnt.shape[0]):  # a loop: under parallel=True, np.zeros is a region
        cnt[i] = 0
    return cnt


@njit(cache=True, inline="always")
def _claim(cnt, s, limit):
    """Claims the next item counted by cnt[s * PAD] while fewer than `limit` are claimed:
    returns its running index, or -1 once all are. The one claim of the window kernels (one
    item a part a step) and of generate_ids (a slice's items of a phase)."""
    while True:
        v = atomics.load(cnt, s * PAD)
        if v >= limit:
            return -1
        if atomics.cas(cnt, s * PAD, v, v + 1):
            return v


@njit(cache=True, inline="always")
def _take(cnt, part, step):
    """Whether this thread takes part's item of the window's step-th step (each thread tries
    every part, its own first: whoever is there does the work, so the window finishes on
    any number of threads)."""
    return _claim(cnt, part, step + 1) >= 0


@njit(cache=True, inline="always")
def _done(cnt, parts):
    atomics.add(cnt, parts * PAD, 1)


@njit(cache=True, inline="always")
def _step_end(cnt, parts, step):
    """The barrier between steps: wait until every part's item of this step is done."""
    atomics.wait_at_least(cnt, parts * PAD, (step + 1) * parts)


@njit(cache=True, inline="always")
def _most_units(Q, parts):
    return NR * ((Q + parts - 1) // parts)


def _window(kernel, mask_at: int, w_at: int):
    """The public window kernel: `kernel` with numba's thread count as its last argument
    (read here, in Python: numba.get_num_threads() inside a kernel stops it being cached),
    and no recurrent dropout mask given as a (0, 0) array, not None: one compiled variant
    serves both (a None would be a type of its own; each variant is ~10 s of compiling)."""

    def window(*args):
        if args[mask_at] is None:
            args = list(args)
            args[mask_at] = np.empty((0, 0), args[w_at].dtype)
        kernel(*args, numba.get_num_threads())

    window.__name__ = window.__qualname__ = kernel.__name__.lstrip("_")
    window.__doc__ = kernel.__doc__
    return window


@njit(cache=True, inline="always")
def _masked_units(h, hmask, out, u0, u1):
    """out[:, u0:u1] = h * hmask there (the next step's input to W_hh)."""
    for b in range(h.shape[0]):
        hb, mb, ob = h[b, u0:u1], hmask[b, u0:u1], out[b, u0:u1]
        for j in range(u1 - u0):
            ob[j] = hb[j] * mb[j]


@njit(cache=True, inline="always")
def _forward_setup(xp, w_hh, h0, hmask, gates, threads):
    """W_hh's panels; the products' buffer hp (B, G*Q*NR), gate blocks Q*NR apart; the
    masked inputs to W_hh (2,B,H), ping-pong, step 0's filled in; whether masked; parts;
    the step counters."""
    B, H = h0.shape
    P = pack_rows(w_hh, gates)
    hp = np.empty((B, gates * P.shape[0] * NR), xp.dtype)
    hin = np.empty((2, B, H), xp.dtype)
    masked = hmask.shape[0] > 0
    if masked:
        _masked_units(h0, hmask, hin[0], 0, H)
    parts = _parts(P.shape[0], threads)
    return P, hp, hin, masked, parts, _counters(parts)


@njit(cache=True, inline="always")
def _forward_input(t, h0, hs, hin, masked):
    """Step t's input to W_hh: h_{t-1}, masked if there is a mask."""
    return hin[t % 2] if masked else (h0 if t == 0 else hs[t - 1])


@njit(cache=True, inline="always")
def _forward_part(part, parts, Q, H, src, P, hp):
    """A forward step's start on one part: its units [u0, u1), their recurrent products."""
    q0, q1, u0, u1 = _units(part, parts, Q, H)
    _products(src, P, hp, q0, q1)
    return u0, u1


@njit(cache=True, inline="always")
def _forward_part_done(t, hs, hmask, hin, masked, u0, u1, cnt, parts):
    """A forward step's end on one part: its h_t masked into the next step's input (when
    there is a mask), and the item counted done."""
    if masked:
        _masked_units(hs[t], hmask, hin[(t + 1) % 2], u0, u1)
    _done(cnt, parts)


@njit(cache=True, parallel=True, error_model="numpy")
def _lstm_forward_window(xp, w_hh, b_hh, h0, c0, hmask, act, cs, hn, hs, threads):
    T, B, H = hs.shape
    P, hp, hin, masked, parts, cnt = _forward_setup(xp, w_hh, h0, hmask, 4, threads)
    Q = P.shape[0]
    for me in prange(parts):
        s = np.empty(4 * _most_units(Q, parts), xp.dtype)
        for t in range(T):
            c_prev = c0 if t == 0 else cs[t - 1]
            src = _forward_input(t, h0, hs, hin, masked)
            for i in range(parts):
                part = (me + i) % parts
                if _take(cnt, part, t):
                    u0, u1 = _forward_part(part, parts, Q, H, src, P, hp)
                    for b in range(B):
                        _lstm_fwd_units(xp[t, b], hp[b], Q * NR, b_hh, c_prev[b, u0:u1],
                                        cs[t, b, u0:u1], hs[t, b, u0:u1], act[t, b], s, u0, u1)
                    _forward_part_done(t, hs, hmask, hin, masked, u0, u1, cnt, parts)
            _step_end(cnt, parts, t)


@njit(cache=True, parallel=True, error_model="numpy")
def _gru_forward_window(xp, w_hh, b_hh, h0, c0, hmask, act, cs, hn, hs, threads):
    T, B, H = hs.shape
    P, hp, hin, masked, parts, cnt = _forward_setup(xp, w_hh, h0, hmask, 3, threads)
    Q = P.shape[0]
    for me in prange(parts):
        s = np.empty(3 * _most_units(Q, parts), xp.dtype)
        for t in range(T):
            h_prev = h0 if t == 0 else hs[t - 1]
            src = _forward_input(t, h0, hs, hin, masked)
            for i in range(parts):
                part = (me + i) % parts
                if _take(cnt, part, t):
                    u0, u1 = _forward_part(part, parts, Q, H, src, P, hp)
                    for b in range(B):
                        _gru_fwd_units(xp[t, b], hp[b], Q * NR, b_hh, h_prev[b, u0:u1],
                                       act[t, b], hn[t, b, u0:u1], hs[t, b, u0:u1], s, u0, u1)
                    _forward_part_done(t, hs, hmask, hin, masked, u0, u1, cnt, parts)
            _step_end(cnt, parts, t)


@njit(cache=True, parallel=True, error_model="numpy")
def _rnn_forward_window(xp, w_hh, b_hh, h0, c0, hmask, act, cs, hn, hs, threads):
    T, B, H = hs.shape
    P, hp, hin, masked, parts, cnt = _forward_setup(xp, w_hh, h0, hmask, 1, threads)
    Q = P.shape[0]
    for me in prange(parts):
        for t in range(T):
            src = _forward_input(t, h0, hs, hin, masked)
            for i in range(parts):
                part = (me + i) % parts
                if _take(cnt, part, t):
                    u0, u1 = _forward_part(part, parts, Q, H, src, P, hp)
                    for b in range(B):
                        _rnn_fwd_units(xp[t, b], hp[b], b_hh, hs[t, b, u0:u1], u0, u1)
                    _forward_part_done(t, hs, hmask, hin, masked, u0, u1, cnt, parts)
            _step_end(cnt, parts, t)


@njit(cache=True, inline="always")
def _recurrent_grad(dsrc, P, rec, hmask, direct, q0, q1, u0, u1):
    """rec[:, u0:u1] = (dsrc @ W_hh)[:, u0:u1] * hmask (if it has rows) (+ direct: GRU's
    z * dh path)."""
    _products(dsrc, P, rec, q0, q1)
    for b in range(rec.shape[0]):
        rb = rec[b, u0:u1]
        if hmask.shape[0] > 0:
            mb = hmask[b, u0:u1]
            for j in range(u1 - u0):
                rb[j] *= mb[j]
        if direct is not None:
            db = direct[b, u0:u1]
            for j in range(u1 - u0):
                rb[j] += db[j]


@njit(cache=True, inline="always")
def _rows_out(rec, dh0, u0, u1):
    """dh0[:, u0:u1] = rec's (dL/dh0 after the window's last product)."""
    for b in range(dh0.shape[0]):
        _copy_row(rec[b, u0:u1], dh0[b, u0:u1])


@njit(cache=True, inline="always")
def _dh_in_full(dhs_tb, rec_b, d):
    """d (n,) = dL/dh_t from above + from step t+1."""
    for j in range(d.shape[0]):
        d[j] = dhs_tb[j] + rec_b[j]


@njit(cache=True, inline="always")
def _backward_setup(w_hh, dhs, threads):
    """W_hh's column panels; rec (B, Q*NR): dL/dh_t arriving from step t+1; parts; the
    step counters."""
    P = pack_cols(w_hh)
    rec = np.zeros((dhs.shape[1], P.shape[0] * NR), dhs.dtype)
    parts = _parts(P.shape[0], threads)
    return P, rec, parts, _counters(parts)


@njit(cache=True, inline="always")
def _step_rec(t, T, dsrc, P, rec, hmask, direct, dh0, q0, q1, u0, u1):
    """rec's units for step t: the product with step t+1's dL/dhp (none at t = T-1). At
    t = -1, past the window, that is dL/dh0: written out, and False (no cell to run)."""
    if t < T - 1:
        _recurrent_grad(dsrc[t + 1], P, rec, hmask, direct, q0, q1, u0, u1)
    if t < 0:
        _rows_out(rec, dh0, u0, u1)
        return False
    return True


@njit(cache=True, parallel=True, error_model="numpy")
def _lstm_backward_window(act, cs, hn, hs, h0, c0, hmask, dhs, w_hh, dxp, dhp, dh0, dc, threads):
    T, B, H = dhs.shape
    P, rec, parts, cnt = _backward_setup(w_hh, dhs, threads)
    Q = P.shape[0]
    for me in prange(parts):
        s = np.empty(4 * _most_units(Q, parts), dhs.dtype)
        d = np.empty(_most_units(Q, parts), dhs.dtype)
        for step in range(T + 1):
            t = T - 1 - step  # t = -1: only dL/dh0
            for i in range(parts):
                part = (me + i) % parts
                if _take(cnt, part, step):
                    q0, q1, u0, u1 = _units(part, parts, Q, H)
                    if _step_rec(t, T, dxp, P, rec, hmask, None, dh0, q0, q1, u0, u1):
                        du = d[:u1 - u0]
                        for b in range(B):
                            _dh_in_full(dhs[t, b, u0:u1], rec[b, u0:u1], du)
                            cp = c0[b, u0:u1] if t == 0 else cs[t - 1, b, u0:u1]
                            _lstm_bwd_units(act[t, b], cp, cs[t, b, u0:u1], du, dc[b, u0:u1],
                                            dxp[t, b], s, u0, u1)
                    _done(cnt, parts)
            _step_end(cnt, parts, step)


@njit(cache=True, parallel=True, error_model="numpy")
def _gru_backward_window(act, cs, hn, hs, h0, c0, hmask, dhs, w_hh, dxp, dhp, dh0, dc, threads):
    T, B, H = dhs.shape
    P, rec, parts, cnt = _backward_setup(w_hh, dhs, threads)
    Q = P.shape[0]
    direct = np.empty((B, H), dhs.dtype)  # z * dh of step t+1: its path to h_t past W_hh
    for me in prange(parts):
        s = np.empty(3 * _most_units(Q, parts), dhs.dtype)
        d = np.empty(_most_units(Q, parts), dhs.dtype)
        for step in range(T + 1):
            t = T - 1 - step
            for i in range(parts):
                part = (me + i) % parts
                if _take(cnt, part, step):
                    q0, q1, u0, u1 = _units(part, parts, Q, H)
                    if _step_rec(t, T, dhp, P, rec, hmask, direct, dh0, q0, q1, u0, u1):
                        du = d[:u1 - u0]
                        for b in range(B):
                            _dh_in_full(dhs[t, b, u0:u1], rec[b, u0:u1], du)
                            hp_ = h0[b, u0:u1] if t == 0 else hs[t - 1, b, u0:u1]
                            _gru_bwd_units(act[t, b], hn[t, b, u0:u1], hp_, du, dxp[t, b],
                                           dhp[t, b], direct[b, u0:u1], s, u0, u1)
                    _done(cnt, parts)
            _step_end(cnt, parts, step)


@njit(cache=True, parallel=True, error_model="numpy")
def _rnn_backward_window(act, cs, hn, hs, h0, c0, hmask, dhs, w_hh, dxp, dhp, dh0, dc, threads):
    T, B, H = dhs.shape
    P, rec, parts, cnt = _backward_setup(w_hh, dhs, threads)
    Q = P.shape[0]
    for me in prange(parts):
        d = np.empty(_most_units(Q, parts), dhs.dtype)
        for step in range(T + 1):
            t = T - 1 - step
            for i in range(parts):
                part = (me + i) % parts
                if _take(cnt, part, step):
                    q0, q1, u0, u1 = _units(part, parts, Q, H)
                    if _step_rec(t, T, dxp, P, rec, hmask, None, dh0, q0, q1, u0, u1):
                        du = d[:u1 - u0]
                        for b in range(B):
                            _dh_in_full(dhs[t, b, u0:u1], rec[b, u0:u1], du)
                            _rnn_bwd_units(hs[t, b, u0:u1], du, dxp[t, b, u0:u1])
                    _done(cnt, parts)
            _step_end(cnt, parts, step)


lstm_forward_window = _window(_lstm_forward_window, 5, 1)
lstm_backward_window = _window(_lstm_backward_window, 6, 8)
gru_forward_window = _window(_gru_forward_window, 5, 1)
gru_backward_window = _window(_gru_backward_window, 6, 8)
rnn_forward_window = _window(_rnn_forward_window, 5, 1)
rnn_backward_window = _window(_rnn_backward_window, 6, 8)


# ------------------------------------------------------- states rebuilt from the gates
#
# A layer's c and h follow from its activated gates by an element-wise scan over time, so a
# layer below the top need not keep them from its forward to its backward (HostBackend.
# drop_states): 2 of its 6 (T,B,H)-wide arrays (LSTM). Rows are independent: one thread a
# batch row.


@njit(cache=True, parallel=True)
def lstm_states_from_gates(act, c0, cs, hs):
    """act (T,B,4H) activated gates [i,f,g,o]; c0 (B,H) -> cs, hs (T,B,H) as the forward
    wrote them, bit for bit."""
    T, B, GH = act.shape
    H = GH // 4
    for b in prange(B):
        for t in range(T):
            a = act[t, b]
            cp = c0[b] if t == 0 else cs[t - 1, b]
            _lstm_state_units(_gate(a, 0, H, 0, H), _gate(a, 1, H, 0, H), _gate(a, 2, H, 0, H),
                              _gate(a, 3, H, 0, H), cp, cs[t, b], hs[t, b])


@njit(cache=True, parallel=True)
def gru_states_from_gates(act, h0, hs):
    """act (T,B,3H) activated gates [r,z,n]; h0 (B,H) -> hs (T,B,H) as the forward wrote it."""
    T, B, GH = act.shape
    H = GH // 3
    for b in prange(B):
        for t in range(T):
            a = act[t, b]
            hp = h0[b] if t == 0 else hs[t - 1, b]
            _gru_state_units(_gate(a, 1, H, 0, H), _gate(a, 2, H, 0, H), hp, hs[t, b])


# ---------------------------------------------------------------- embedding table


@njit(cache=True)
def _check_ids(ids, rows):
    for n in range(ids.shape[0]):
        if ids[n] < 0 or ids[n] >= rows:
            raise IndexError("id out of range of the table's rows")


@njit(cache=True, parallel=True)
def gather_rows(table, ids, out):
    """table (V,D); ids (N,) int -> out (N,D) = table[ids]."""
    _check_ids(ids, table.shape[0])
    N, D = out.shape
    # Explicit loops, not out[n, :] = table[...]: under parallel=True numba turns each slice
    # assignment into a threaded region of its own (~10 us a row).
    if N * D < COPY_PAR_MIN:
        for n in range(N):
            _copy_row(table[ids[n]], out[n])
        return
    for n in prange(N):
        _copy_row(table[ids[n]], out[n])


def scatter_add_rows(ids, d, out):
    """ids (N,) int; d (N,D) -> out (V,D) += sum of d's rows into the rows named by ids."""
    _scatter_add_rows(ids, d, out, numba.get_num_threads())  # read here: see _window


@njit(cache=True, parallel=True)
def _scatter_add_rows(ids, d, out, threads):
    _check_ids(ids, out.shape[0])
    N, D = d.shape
    parts = max(1, min(threads, D // COL_ALIGN))
    if N * D < COPY_PAR_MIN or parts == 1:
        _scatter_cols(ids, d, out, 0, D)
        return
    # Each thread owns one contiguous range of columns and adds rows in order 0..N-1, as
    # np.add.at does (and as the serial path): no races, and the same sums bit for bit on
    # any thread count. One wide range a thread, not many narrow blocks: a block of 64
    # columns read 256 bytes of each 8 KiB row, a TLB miss a row in each of 32 passes
    # (6400 x 2048 float32, the 3x512 window's: 7.4 -> 3.0 ms on two threads).
    for p in prange(parts):
        lo = D * p // parts // COL_ALIGN * COL_ALIGN
        hi = D if p == parts - 1 else D * (p + 1) // parts // COL_ALIGN * COL_ALIGN
        _scatter_cols(ids, d, out, lo, hi)


@njit(cache=True, inline="always")
def _scatter_cols(ids, d, out, lo, hi):
    # Columns [lo, hi) as slices indexed from 0, so the inner loop vectorises (an index
    # j >= lo known only at run time kept it scalar: 2.6 ns an add, now ~0.3).
    for n in range(ids.shape[0]):
        o, s = out[ids[n], lo:hi], d[n, lo:hi]
        for j in range(hi - lo):
            o[j] += s[j]


# ---------------------------------------------------------------- loss


@njit(cache=True, inline="always")
def _xent_row(logits, targets, mask, scale, dlogits, n):
    V = logits.shape[1]
    mk = mask[n]
    if mk == 0:
        for j in range(V):
            dlogits[n, j] = 0
        return 0.0
    t = targets[n]
    m = logits[n, 0]
    for j in range(1, V):
        m = max(m, logits[n, j])
    xt = logits[n, t]  # read before the row is overwritten (dlogits may alias logits)
    s = 0.0  # float64 accumulator
    for j in range(V):
        e = math.exp(logits[n, j] - m)
        dlogits[n, j] = e
        s += e
    w = mk * scale / s
    for j in range(V):
        dlogits[n, j] = dlogits[n, j] * w
    dlogits[n, t] -= mk * scale
    return (math.log(s) + m - xt) * mk


@njit(cache=True, parallel=True)
def softmax_xent(logits, targets, mask, scale, dlogits):
    """logits (N,V); targets (N,) int; mask (N,) float (1 = counts) -> returns the summed loss
    sum_n mask_n * -log softmax(logits_n)[target_n]; writes dlogits (N,V) = d(scale * loss)/dlogits.
    dlogits may be the logits array itself (each row is read before it is written)."""
    N, V = logits.shape
    _check_ids(targets, V)
    loss = np.empty(N, np.float64)  # (N,) per-row losses, summed in order below
    if N * V < ROW_PAR_MIN:
        for n in range(N):
            loss[n] = _xent_row(logits, targets, mask, scale, dlogits, n)
    else:
        for n in prange(N):
            loss[n] = _xent_row(logits, targets, mask, scale, dlogits, n)
    total = 0.0
    for n in range(N):
        total += loss[n]
    return total


@njit(cache=True, inline="always")
def _log_softmax_row(logits, out, n):
    V = logits.shape[1]
    m = logits[n, 0]
    for j in range(1, V):
        m = max(m, logits[n, j])
    s = 0.0  # float64 accumulator
    for j in range(V):
        s += math.exp(logits[n, j] - m)
    ls = math.log(s)
    for j in range(V):
        out[n, j] = (logits[n, j] - m) - ls


@njit(cache=True, parallel=True)
def log_softmax_rows(logits, out):
    """logits (N,V) -> out (N,V) = log softmax per row (scoring and evaluation)."""
    N, V = logits.shape
    if N * V < ROW_PAR_MIN:
        for n in range(N):
            _log_softmax_row(logits, out, n)
        return
    for n in prange(N):
        _log_softmax_row(logits, out, n)


# ---------------------------------------------------------------- sampling


@njit(cache=True)
def _pairwise_block(a, lo, n):
    # One leaf of numpy's pairwise summation (n <= 128): eight accumulators, then the rest.
    if n < 8:
        res = 0.0
        for i in range(lo, lo + n):
            res += a[i]
        return res
    r0, r1, r2, r3 = a[lo], a[lo + 1], a[lo + 2], a[lo + 3]
    r4, r5, r6, r7 = a[lo + 4], a[lo + 5], a[lo + 6], a[lo + 7]
    i = 8
    while i < n - n % 8:
        r0 += a[lo + i]
        r1 += a[lo + i + 1]
        r2 += a[lo + i + 2]
        r3 += a[lo + i + 3]
        r4 += a[lo + i + 4]
        r5 += a[lo + i + 5]
        r6 += a[lo + i + 6]
        r7 += a[lo + i + 7]
        i += 8
    res = ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))
    while i < n:
        res += a[lo + i]
        i += 1
    return res


@njit(cache=True)
def _pairwise_sum(a, lo, n):
    """numpy's pairwise summation of a[lo:lo+n] (numpy/_core/src/umath/loops_utils.h.src:
    leaves of <= 128, split at n/2 rounded down to a multiple of 8), so p.sum() below equals
    the reference's bit for bit and top-p cuts at the same token. An explicit stack instead
    of recursion: numba segfaults loading a cached recursive function (numba issue #6061)."""
    if n <= 128:
        return _pairwise_block(a, lo, n)
    los = np.empty(64, np.int64)  # (depth,) node start; depth <= log2(n) < 64
    ns = np.empty(64, np.int64)  # (depth,) node length
    stage = np.empty(64, np.int64)  # (depth,) 0 new, 1 left child pending, 2 right pending
    left = np.empty(64, np.float64)  # (depth,) sum of the left child once known
    top = 0
    los[0], ns[0], stage[0] = lo, n, 0
    while True:
        m = ns[top]
        if m > 128:  # a new inner node: descend into its left half
            n2 = m // 2
            n2 -= n2 % 8
            stage[top] = 1
            top += 1
            los[top], ns[top], stage[top] = los[top - 1], n2, 0
            continue
        val = _pairwise_block(a, los[top], m)
        while True:  # hand val up until a node still needs its right half
            top -= 1
            if top < 0:
                return val
            if stage[top] == 1:
                left[top] = val
                stage[top] = 2
                m = ns[top]
                n2 = m // 2
                n2 -= n2 % 8
                top += 1
                los[top], ns[top], stage[top] = los[top - 1] + n2, m - n2, 0
                break
            val = left[top] + val


@njit(cache=True)
def sample_logits(logits, temperature, top_k, top_p, u):
    """logits (V,); temperature > 0; top_k (0 = off); top_p in (0,1] (1 = off); u uniform in [0,1).
    Returns the sampled id: inverse-CDF sampling over the kept tokens in descending probability
    order (ties broken by lower id), so every backend draws the same id for the same u."""
    V = logits.shape[0]
    order = np.argsort(-logits, kind="mergesort")  # (V,) stable: lower id first on ties
    p = np.empty(V, np.float64)  # (V,) unnormalised probabilities in that order
    z0 = np.float64(logits[order[0]]) / temperature
    for i in range(V):
        p[i] = math.exp(np.float64(logits[order[i]]) / temperature - z0)
    keep = V if top_k <= 0 else min(top_k, V)
    if top_p < 1.0:
        # the smallest prefix whose mass reaches top_p (always at least one token)
        s = _pairwise_sum(p, 0, keep)
        c = 0.0
        for i in range(keep):
            c += p[i]
            if c / s >= top_p:
                keep = i + 1
                break
    total = 0.0
    for i in range(keep):
        total += p[i]
    target = u * total
    c = 0.0
    for i in range(keep):
        c += p[i]
        if c > target:
            return order[i]
    return order[keep - 1]


@njit(cache=True)
def sample_rows(logits, temperature, top_k, top_p, u, out):
    """logits (B,V); u (B,) uniforms -> out (B,) ids, each row drawn as sample_logits.
    Serial: each row is a sort of V ids, too little work to pay for threads at names' sizes."""
    for b in range(logits.shape[0]):
        out[b] = sample_logits(logits[b], temperature, top_k, top_p, u[b])


# ---------------------------------------------------------------- optimizer


@njit(cache=True, inline="always")
def _adam_span(lo, hi, p, g, m, v, lr, beta1, beta2, eps, bc1, bc2, l2, decay):
    # Scalars cast to the arrays' dtype, as numpy does with Python floats (NEP 50), and the
    # operations in the reference's order: float32 results match it bit for bit. Slices
    # indexed from 0: an index from a run-time lo kept the loop scalar (~6 ns a parameter).
    dt = p.dtype.type
    shrink = dt(1.0 - lr * decay)
    l2t, b1, b2 = dt(l2), dt(beta1), dt(beta2)
    c1, c2 = dt(1.0 - beta1), dt(1.0 - beta2)
    lrt, bc1t, bc2t, epst = dt(lr), dt(bc1), dt(bc2), dt(eps)
    ps, gs, ms, vs = p[lo:hi], g[lo:hi], m[lo:hi], v[lo:hi]
    for i in range(hi - lo):
        pv = ps[i]
        if decay:
            pv = pv * shrink
        gg = gs[i] + l2t * pv if l2 else gs[i]
        mv = ms[i] * b1
        mv = mv + c1 * gg
        vv = vs[i] * b2
        vv = vv + c2 * gg * gg
        ms[i] = mv
        vs[i] = vv
        ps[i] = pv - lrt * (mv / bc1t) / (np.sqrt(vv / bc2t) + epst)


def _flat(a):
    """a's elements as a 1-D view. The flat kernels below compile once, not once for each
    number of dimensions they meet (the 1-D biases, the 2-D matrices): ~1.6 s of a first
    run's compiling each. A view or an error, never a silent copy: an update has to land in
    the caller's array."""
    if not a.flags.c_contiguous:
        raise ValueError(f"expected a C-contiguous array, got strides {a.strides} for shape {a.shape}")
    return a.reshape(-1)


def _flats(arrays) -> tuple:
    """_flat of each array, as one tuple for a kernel over them all (one dtype: a tuple of
    mixed arrays has no single element type to index)."""
    flat = tuple(_flat(a) for a in arrays)
    if len({a.dtype for a in flat}) > 1:
        raise ValueError(f"expected arrays of one dtype, got {sorted({str(a.dtype) for a in flat})}")
    return flat


def adam_update(p, g, m, v, lr, beta1, beta2, eps, bc1, bc2, l2, decay):
    """In place on p, m, v (same shape). bc1 = 1 - beta1**t, bc2 = 1 - beta2**t.
    l2: classic Adam weight decay (added to the gradient); decay: AdamW's decoupled
    decay (p *= 1 - lr*decay first). Matches torch.optim.Adam / AdamW."""
    adam_update_all([p], [g], [m], [v], lr, beta1, beta2, eps, bc1, bc2, [l2], [decay])


def adam_update_all(ps, gs, ms, vs, lr, beta1, beta2, eps, bc1, bc2, l2s, decays):
    """adam_update of every parameter in ps, with its gradient, moments, l2 and decay at the
    same place in the other sequences, in one parallel region. One call a parameter cost a
    dispatch and a region launch each (waking the passive OpenMP thread): a 2x128 model's
    11 arrays took 483 us a step that way, 206 in one call (`python -m bench.optim_time`)."""
    if len(ps):
        _adam_all(_flats(ps), _flats(gs), _flats(ms), _flats(vs), np.asarray(l2s, np.float64),
                  np.asarray(decays, np.float64), lr, beta1, beta2, eps, bc1, bc2)


@njit(cache=True, inline="always")
def _chunk_starts(arrays, chunk):
    """(len(arrays) + 1,) the index of each array's first chunk of `chunk` elements in the
    run of all arrays' chunks (the last entry: the number of chunks)."""
    starts = np.empty(len(arrays) + 1, np.int64)
    starts[0] = 0
    for i in range(len(arrays)):
        starts[i + 1] = starts[i] + (arrays[i].size + chunk - 1) // chunk
    return starts


@njit(cache=True, inline="always")
def _adam_chunk(item, starts, ps, gs, ms, vs, l2s, decays, lr, beta1, beta2, eps, bc1, bc2):
    i = np.searchsorted(starts, item, side="right") - 1  # the array this chunk belongs to
    lo = (item - starts[i]) * CHEAP_CHUNK
    _adam_span(lo, min(ps[i].size, lo + CHEAP_CHUNK), ps[i], gs[i], ms[i], vs[i], lr, beta1,
               beta2, eps, bc1, bc2, l2s[i], decays[i])


@njit(cache=True, parallel=True)
def _adam_all(ps, gs, ms, vs, l2s, decays, lr, beta1, beta2, eps, bc1, bc2):
    # ps, gs, ms, vs: tuples of 1-D arrays (compiled once for each number of arrays)
    starts = _chunk_starts(ps, CHEAP_CHUNK)
    chunks = starts[len(ps)]
    if chunks < CHEAP_PAR_MIN // CHEAP_CHUNK:
        for item in range(chunks):
            _adam_chunk(item, starts, ps, gs, ms, vs, l2s, decays, lr, beta1, beta2, eps, bc1, bc2)
        return
    for item in prange(chunks):
        _adam_chunk(item, starts, ps, gs, ms, vs, l2s, decays, lr, beta1, beta2, eps, bc1, bc2)


@njit(cache=True, inline="always")
def _sq_chunk(a, lo, hi):
    # Four accumulators in a fixed pattern: faster than one, and the same every run.
    s0 = s1 = s2 = s3 = 0.0
    i = lo
    while i + 4 <= hi:
        x0, x1 = np.float64(a[i]), np.float64(a[i + 1])
        x2, x3 = np.float64(a[i + 2]), np.float64(a[i + 3])
        s0 += x0 * x0
        s1 += x1 * x1
        s2 += x2 * x2
        s3 += x3 * x3
        i += 4
    while i < hi:
        x = np.float64(a[i])
        s0 += x * x
        i += 1
    return (s0 + s1) + (s2 + s3)


def sum_squares(g):
    """Sum of squares of an array, accumulated in float64 (global-norm clipping)."""
    return sum_squares_total([g])


def sum_squares_total(arrays):
    """Sum of squares over a sequence of arrays (global-norm clipping), accumulated in
    float64, in one parallel region: each array's chunks summed in order, then the arrays'
    sums in order, the same bits as summing the arrays one by one."""
    if not len(arrays):
        return 0.0
    flat = [np.ravel(g) for g in arrays]  # views where they can be; any layout sums the same
    if len({a.dtype for a in flat}) > 1:  # one tuple type: float64 copies square the same
        flat = [a.astype(np.float64) for a in flat]
    return float(_sum_squares_all(tuple(flat)))


@njit(cache=True, parallel=True)
def _sum_squares_all(arrays):
    starts = _chunk_starts(arrays, SQ_CHUNK)
    nch = starts[len(arrays)]
    part = np.empty(nch, np.float64)  # (chunks,) partial sums, added in order below
    if nch < SQ_PAR_MIN:  # the same chunks on one thread: the same bits
        for k in range(nch):
            _sq_item(k, starts, arrays, part)
    else:
        for k in prange(nch):
            _sq_item(k, starts, arrays, part)
    total = 0.0
    for i in range(len(arrays)):
        s = 0.0
        for k in range(starts[i], starts[i + 1]):
            s += part[k]
        total += s
    return total


@njit(cache=True, inline="always")
def _sq_item(k, starts, arrays, part):
    i = np.searchsorted(starts, k, side="right") - 1
    lo = (k - starts[i]) * SQ_CHUNK
    part[k] = _sq_chunk(arrays[i], lo, min(arrays[i].size, lo + SQ_CHUNK))


# ---------------------------------------------------------------- generation (batch 1)

# generate_ids runs a whole chunk of characters in one parallel region: each thread loops over
# every character itself, and the threads share each phase's work (a layer's units in items of
# GEN_UNITS, with all their gate rows; then the decoder and the draw, one item) through atomic
# counters, waiting at the end of each phase until all its items are done (atomics.py). The
# earlier kernel launched a parallel region per layer per character (~10-30 us to wake a
# sleeping thread; with threads spinning it still lost to serial code up to H = 256), and
# multiplied one row at a time. In-process A/B on the 2 cores, us a character (old -> new,
# matvec.rows_dot for the products): 2x128 20.1 -> 13.7; 2x256 64 -> 48; 3x512 float16
# 260 -> 217; 3x512 float32 about even (it streams 20 MB a character from L3 either way).
#
# Thread p first takes the items of its own share (slice p) of every phase, so on a steady
# machine each core multiplies the same rows every character and keeps them in its caches;
# then it takes whatever is left in the others' slices. A thread waits only for items another
# thread has claimed and is computing, so the region finishes however many threads run and
# whenever they start (one thread alone does all the work). Which thread computes an item
# does not change its bits.
GEN_UNITS = 32


@njit(cache=True, inline="always")
def _share(n, s, S):
    """Items [lo, hi) of slice s when a phase's n items are split S ways."""
    return n * s // S, n * (s + 1) // S


@njit(cache=True, inline="always")
def _gen_products(lo, hi, w_hh, k, hk, hp):
    # hp's rows of units [lo, hi) of layer k, all G gate blocks: W_hh h_{t-1} (no bias).
    H = hk.shape[0]
    for g in range(hp.shape[0] // H):
        rows_dot(w_hh[k], g * H + lo, g * H + hi, hk, hp, g * H + lo)


@njit(cache=True, inline="always")
def _gen_layer_item(item, k, code, residual, cur, products, table, w_ih, b_ih, w_hh, b_hh, h_old,
                    h_new, c_old, c_new, xs, xp, hp, act, hn, s):
    # Units [lo, hi) of layer k: their G gate rows' products (the recurrent ones unless
    # `products` is False: then the previous phase left them in hp), the cell (the training
    # kernels' unit functions: same bits, and their loops vectorise), and the layer's output
    # xs[k] there (its h, plus its input when residual). xs[k-1] (H,) is the output of the
    # layer below; layer 0's input projections are the table row of the current id.
    H = h_new.shape[1]
    lo = item * GEN_UNITS
    hi = min(H, lo + GEN_UNITS)
    xin = xs[max(k - 1, 0)]  # (H,)
    hk = h_old[k]  # (H,)
    if k > 0:
        bias = b_ih[k - 1]
        for g in range(hp.shape[0] // H):
            r0, r1 = g * H + lo, g * H + hi
            rows_dot(w_ih[k - 1], r0, r1, xin, xp, r0)
            for r in range(r0, r1):
                xp[r] += bias[r]
    if products:
        _gen_products(lo, hi, w_hh, k, hk, hp)
    xk = table[cur] if k == 0 else xp  # (G*H,)
    b = b_hh[k]
    hr = h_new[k, lo:hi]
    if code == 0:
        _lstm_fwd_units(xk, hp, H, b, c_old[k, lo:hi], c_new[k, lo:hi], hr, act, s, lo, hi)
    elif code == 1:
        _gru_fwd_units(xk, hp, H, b, hk[lo:hi], act, hn[lo:hi], hr, s, lo, hi)
    else:
        _rnn_fwd_units(xk, hp, b, hr, lo, hi)
    out, below = xs[k, lo:hi], xin[lo:hi]
    for j in range(hi - lo):
        out[j] = hr[j] + below[j] if (residual and k > 0) else hr[j]


@njit(cache=True, inline="always")
def _gen_draw(t, x, dec_w, dec_b, logits, temperature, top_k, top_p, u, out):
    # The decoder and the draw from the top layer's output x (H,).
    rows_dot(dec_w, 0, logits.shape[0], x, logits, 0)
    for v in range(logits.shape[0]):
        logits[v] += dec_b[v]
    out[t] = sample_logits(logits, temperature, top_k, top_p, u[t])


@njit(cache=True, error_model="numpy")
def _gen_worker(me, S, cnt, code, residual, table, w_ih, b_ih, w_hh, b_hh, dec_w, dec_b, hs, cs,
                zh, zc, xs, xp, hp, act, hn, logits, start_id, temperature, top_k, top_p, u,
                eos_id, out):
    """Thread `me` of S in generate_ids: every phase of every character, doing the phase's
    unclaimed items (slice me first, then the others), then waiting until all are done.

    Phases of character t: one per layer (nb items of units); then the draw (item 0) and,
    beside it, the next character's layer-0 recurrent products (items 1..nb), which need
    only this character's layer-0 state and so keep the other threads busy while one draws.
    After an end token the next character starts from zero state (zh, zc) and its layer 0
    computes its own products.

    cnt[s * PAD]: items of slice s claimed so far (s < S); cnt[S * PAD]: items done so far,
    over all phases and characters (counters only grow, so a thread that starts late sees
    finished phases as finished; each thread follows every phase's size). Character t reads
    the state hs[t % 2] (2,L,H) and cs[t % 2] (LSTM) and writes the other; xs (L,H) each
    layer's output; xp, hp, act (G*H,), hn (H,) and logits (V,) are shared scratch, each
    item writing its own rows."""
    L, H = hs.shape[1], hs.shape[2]
    T = u.shape[0]
    G = hp.shape[0] // H
    nb = (H + GEN_UNITS - 1) // GEN_UNITS  # items per layer phase
    s_row = np.empty(G * GEN_UNITS, hs.dtype)  # this thread's cell scratch
    base = np.zeros(S, np.int64)  # (S,) items of slice s in the phases before this one
    done = 0
    cur = start_id
    for t in range(T):
        old, new = t & 1, 1 - (t & 1)
        reset = t > 0 and cur == eos_id  # the last draw was an end token
        h_old = zh if reset else hs[old]
        c_old = zc if reset else cs[old]
        for q in range(L + 1):
            n = nb if q < L else 1 + (nb if t + 1 < T else 0)
            for i in range(S):
                s = (me + i) % S
                lo, hi = _share(n, s, S)
                while True:
                    v = _claim(cnt, s, base[s] + hi - lo)
                    if v < 0:
                        break
                    item = lo + v - base[s]
                    if q < L:
                        _gen_layer_item(item, q, code, residual, cur, q > 0 or t == 0 or reset,
                                        table, w_ih, b_ih, w_hh, b_hh, h_old, hs[new], c_old,
                                        cs[new], xs, xp, hp, act, hn, s_row)
                    elif item == 0:
                        _gen_draw(t, xs[L - 1], dec_w, dec_b, logits, temperature, top_k, top_p,
                                  u, out)
                    else:
                        lo0 = (item - 1) * GEN_UNITS
                        _gen_products(lo0, min(H, lo0 + GEN_UNITS), w_hh, 0, hs[new, 0], hp)
                    atomics.add(cnt, S * PAD, 1)
            for s in range(S):
                lo, hi = _share(n, s, S)
                base[s] += hi - lo
            done += n
            atomics.wait_at_least(cnt, S * PAD, done)
        cur = out[t]


# Loops, not dst[...] = src: under parallel=True an array assignment is a threaded region.
@njit(cache=True, inline="always")
def _copy_2d(src, dst):
    for k in range(dst.shape[0]):
        for j in range(dst.shape[1]):
            dst[k, j] = src[k, j]


@njit(cache=True, inline="always")
def _fill_2d(dst, value):
    for k in range(dst.shape[0]):
        for j in range(dst.shape[1]):
            dst[k, j] = value


@njit(cache=True, parallel=True)
def _generate_ids(cell, residual, table, w_ih, b_ih, w_hh, b_hh, dec_w, dec_b, h, c, start_id,
                  temperature, top_k, top_p, u, eos_id, out, threads):
    L, H = h.shape
    V, GH = table.shape
    if start_id < 0 or start_id >= V:
        raise IndexError("start id out of range of the table's rows")
    code = 0 if cell == "lstm" else (1 if cell == "gru" else 2)
    dt = h.dtype
    hs = np.empty((2, L, H), dt)  # (2,L,H) the state, ping-pong by character
    cs = np.empty((2,) + c.shape, dt)  # (2,L,H) LSTM's cell state, the same way
    _copy_2d(h, hs[0])
    _copy_2d(c, cs[0])
    xs = np.empty((L, H), dt)  # (L,H) layer outputs
    xp = np.empty(GH, dt)  # (G*H,) input projections of a layer >= 1
    hp = np.empty(GH, dt)  # (G*H,) recurrent products
    act = np.empty(GH, dt)  # (G*H,) activated gates (not kept)
    hn = np.empty(H, dt)  # (H,) GRU's W_hn h + b_hn (not kept)
    logits = np.empty(V, dt)  # (V,)
    zh = np.empty((L, H), dt)  # (L,H) the zero state after an end token
    zc = np.empty(c.shape, dt)
    _fill_2d(zh, 0)
    _fill_2d(zc, 0)
    S = max(1, min(threads, (H + GEN_UNITS - 1) // GEN_UNITS))
    cnt = np.empty((S + 1) * PAD, np.int64)
    for i in range(cnt.shape[0]):
        cnt[i] = 0
    for me in prange(S):
        # int64: the parallel body sees the prange index as uint64, and a second signature
        # would compile the worker twice (~11 s each, cold)
        _gen_worker(np.int64(me), S, cnt, code, residual, table, w_ih, b_ih, w_hh, b_hh, dec_w, dec_b, hs,
                    cs, zh, zc, xs, xp, hp, act, hn, logits, start_id, temperature, top_k,
                    top_p, u, eos_id, out)
    T = u.shape[0]
    if T > 0 and out[T - 1] == eos_id:  # the next call starts fresh
        _fill_2d(h, 0)
        _fill_2d(c, 0)
    else:
        _copy_2d(hs[T & 1], h)
        _copy_2d(cs[T & 1], c)


def generate_ids(cell, residual, table, w_ih, b_ih, w_hh, b_hh, dec_w, dec_b, h, c, start_id,
                 temperature, top_k, top_p, u, eos_id, out):
    """Batch-1 generation: feed start_id, then each sampled id, for len(u) steps.

    cell "lstm" | "gru" | "rnn"; residual: layer k >= 1 outputs h_k + its input;
    table (V,G*H) layer-0 input projections (bias_ih_l0 included); w_ih (L-1,G*H,H) and
    b_ih (L-1,G*H) for layers >= 1; w_hh (L,G*H,H); b_hh (L,G*H); dec_w (V,H); dec_b (V,);
    h (L,H) and c (L,H) (LSTM; unused otherwise) the state, updated in place; u (n,) uniforms;
    out (n,) ids, each drawn as sample_logits from logits = dec_w @ top output + dec_b.
    eos_id >= 0: sampling it resets h and c to zero before it is fed back (lines models
    start every line fresh); -1: no reset. w_ih, w_hh, dec_w may be float16 stored as their
    uint16 bits (numba has no float16 on the CPU); the arithmetic stays in h's dtype.

    One compiled region for all len(u) characters, on numba's threads (read here: a kernel
    that calls numba.get_num_threads() cannot be cached), no Python per character. sigmoid
    and tanh are the step kernels' (_tanh_act: rational in float32, libm in float64),
    products are _dot's (reassociated): float32-close to reference.py, and the same bits on
    any number of threads."""
    _generate_ids(cell, residual, table, w_ih, b_ih, w_hh, b_hh, dec_w, dec_b, h, c, start_id,
                  temperature, top_k, top_p, u, eos_id, out, numba.get_num_threads())
