"""numba.cuda twins of every kernel in `reference.py`, plus the persistent recurrence.

Launchers carry the reference names and argument orders and take device arrays: numba
device arrays, or any `__cuda_array_interface__` object such as a CuPy array (wrapped
without a stream sync: everything runs on the legacy default stream, which CuPy uses too).
Under numba's CUDA simulator (NUMBA_ENABLE_CUDASIM=1) they take numpy arrays, so the same
code runs in the tests on a machine without a GPU. Launchers that return a float (the
summed loss, a sum of squares) copy one scalar to the host.

Every kernel loops over a grid stride (or, for row kernels, a block stride over rows), so
a test that sets THREADS and MAX_BLOCKS small runs several blocks on tiny shapes.

Determinism: no float atomics anywhere. scatter_add_rows sorts the ids stably and gives each
thread one (id, column), adding that id's rows in order; sums (loss, sum of squares) reduce
per block in a fixed tree into partial sums, then one block reduces those; the persistent
kernels add their k-split partial sums in a fixed order: the same grid gives the same bits
every run.

The persistent recurrence (`persistent_layer_forward/backward`) runs all T steps of one
layer in one cooperative launch. Block k owns hidden units [k*U, k*U+U) and keeps the
W_hh entries those units need in shared memory for the whole window: forward, the G gate
rows of its units (H x G*U); backward, the matching columns (G*H x U). Each step, every
block reads the previous step's h (forward) or dL/dhp (backward) of ALL units, computes
its units' recurrent products and fused cell maths, writes its slice, and the grid
synchronises (`cuda.cg.this_grid().sync()`). The state is exchanged through a transposed
ping-pong copy in global memory, (2, H or G*H, B), and streamed through shared memory in
tiles (coalesced, the next tile prefetched into registers while the current one is
summed). A thread sums ROWS batch rows x C columns in registers (a register tile: each
shared-memory load feeds several FMAs); KS groups of threads split the rows k of each
tile. U is the smallest that puts one block on each SM (every block reads the whole
state each step: more blocks only read more), within SMEM_LIMIT and co-residency.
Measured on an H100 (BENCHMARKS.md): a 3x512 layer window (T=100, B=64) takes 2.5 ms
forward and 3.6 ms backward.

Dimension letters: B=batch, H=hidden, G=gate blocks (4 LSTM, 3 GRU, 1 RNN), V=vocab,
N=rows, D=columns, T=time, U=hidden units per block.
"""

from __future__ import annotations

import math
import sys
import warnings
from typing import NamedTuple

import numba
import numpy as np
from numba import cuda, float64

from charrnn.config import GATES

try:  # numba-cuda keeps its own config; older numba has it at the top level
    from numba.cuda import config as _cuda_config
except ImportError:  # pragma: no cover
    from numba import config as _cuda_config

SIM = bool(getattr(_cuda_config, "ENABLE_CUDASIM", 0))  # numba's CUDA simulator is on

THREADS = 256  # block size of the element-wise, row and reduction kernels (a power of 2)
MAX_BLOCKS = 1024  # grid cap: larger problems are covered by the grid stride
PERSISTENT_THREADS = 256  # block size cap of the persistent recurrence
ROWS = 8  # batch rows a persistent thread sums at once (ROWS * C sums held in registers)
PREFETCH = 16  # values of the next state tile a persistent thread carries in registers
SMEM_LIMIT = 48 * 1024  # dynamic shared memory per block without the opt-in attribute
_RED = 1024  # shared buffer of the block reductions: THREADS may not exceed it


# Small grids here are deliberate (the second pass of a reduction, one block per sampled
# row, a persistent grid sized to the GPU): numba would warn on each such launch site.
warnings.filterwarnings("ignore",
                        message=r"Grid size \d+ will likely result in GPU under-utilization")


class PersistentUnavailable(ValueError):
    """The persistent recurrence cannot run this layer here (W_hh too large for the GPU's
    co-resident blocks, or the cooperative kernel failed to compile or link): use the
    per-step design."""


# ---------------------------------------------------------------- launch helpers


def _dev(a):
    """A kernel argument: CuPy (or any CUDA array interface) wrapped as a numba array
    without syncing its stream; numba device arrays, numpy (simulator) and scalars as is."""
    if SIM or a is None or isinstance(a, np.ndarray) or cuda.devicearray.is_cuda_ndarray(a):
        return a
    if hasattr(a, "__cuda_array_interface__"):
        return cuda.as_cuda_array(a, sync=False)
    return a


def _grid(n: int) -> int:
    return max(1, min((n + THREADS - 1) // THREADS, MAX_BLOCKS))


def _launch(kernel, n: int, *args):
    """A grid-stride kernel over n items, THREADS a block."""
    _run(kernel, _grid(n), THREADS, 0, *args)


# Every launch goes through _run. numba's own launch path costs ~43 us of host time, plus
# ~45 us for each CuPy array it wraps as a numba array (measured on an H100 machine:
# `python -m bench.gpu_profile sync`). A training step makes ~130 launches and a names call
# ~1,400, so that host time, not the GPU, set their pace. _run lets numba type and compile
# a kernel's first call with each kind of arguments, then hands later calls' arguments to
# the driver in the flattened form the compiled kernel takes, as numba itself does at the
# end of its path (numba.cuda.dispatcher._Kernel.launch and _prepare_args). Like _SCRATCH,
# it holds handles of the one CUDA context a process uses (no cuda.close or select_device).
_DIRECT: dict = {}  # (dispatcher, argument kinds) -> (converters, cufunc kernel, cooperative) or None
_CONFIGS: dict = {}  # (grid, block, shared bytes, cooperative) -> driver launch config


def _contiguous(shape, strides, itemsize: int, order: str) -> bool:
    """Whether strides are the C (or F) order strides of shape; size-1 dims take any stride."""
    step = itemsize
    dims = zip(shape[::-1], strides[::-1]) if order == "C" else zip(shape, strides)
    for n, st in dims:
        if n != 1 and st != step:
            return False
        step *= n
    return True


def _is_device_array(a) -> bool:
    """A numba device array or a CuPy array: the arrays whose fields _run reads."""
    cupy = sys.modules.get("cupy")
    return cuda.devicearray.is_cuda_ndarray(a) or (cupy is not None and
                                                   isinstance(a, cupy.ndarray))


def _kind(a):
    """What picks a compiled kernel for argument a (its numba type follows from it): a
    device array's dtype, ndim and C/F contiguity, a scalar's Python type. None for what
    only numba's own path passes: host arrays, other array-interface objects, and empty
    arrays (numba types every empty array C-contiguous whatever its strides, so an empty
    array's kernel could be taken for a later strided array's)."""
    if isinstance(a, (int, float, np.number)):
        return type(a)
    if not _is_device_array(a) or a.size == 0:
        return None
    return (a.dtype.str, len(a.shape), _contiguous(a.shape, a.strides, a.dtype.itemsize, "C"),
            _contiguous(a.shape, a.strides, a.dtype.itemsize, "F"))


def _kinds(args) -> tuple | None:
    kinds = tuple(_kind(a) for a in args)
    return None if None in kinds else kinds


def _pointer(a) -> int:
    if cuda.devicearray.is_cuda_ndarray(a):
        return a.device_ctypes_pointer.value or 0
    return a.data.ptr  # CuPy


def _direct_entry(kernel, dev_args):
    """(converters, cufunc kernel, cooperative) of the kernel numba compiled for dev_args,
    or None where numba's own launch does more than pass the arguments (debug builds read
    back an error code, extensions convert arguments, launch-config-sensitive kernels pick
    a dispatcher per launch) or its internals are not as expected."""
    import ctypes

    try:
        compiled = kernel.overloads[tuple(kernel.typeof_pyval(a) for a in dev_args)]
        if compiled.debug or compiled.extensions or compiled.launch_config_sensitive:
            return None
        convert = []
        for ty in compiled.argument_types:
            if isinstance(ty, numba.types.Array):
                convert.append(None)
            elif isinstance(ty, numba.types.Integer):
                convert.append(getattr(ctypes, f"c_{ty}"))
            elif ty in (numba.types.float32, numba.types.float64):
                convert.append(ctypes.c_float if ty == numba.types.float32 else ctypes.c_double)
            else:
                return None
        return convert, compiled._codelibrary.get_cufunc().kernel, bool(compiled.cooperative)
    except Exception:  # noqa: BLE001 -- another numba-cuda version: its own path, always
        return None


def _config(grid: int, block: int, smem: int, cooperative: bool):
    key = (grid, block, smem, cooperative)
    cfg = _CONFIGS.get(key)
    if cfg is None:
        from numba.cuda import dispatcher as nd

        coop = {"is_cooperative" if nd.CUDA_CORE_GE_1_0 else "cooperative_launch": cooperative}
        cfg = _CONFIGS[key] = (nd.LaunchConfig(grid=grid, block=block, shmem_size=smem, **coop),
                               nd.driver._to_core_stream(0), nd.launch)
    return cfg


def _run(kernel, grid: int, block: int, smem: int, *args):
    """kernel[grid, block, 0, smem](*args) on the legacy default stream (see above)."""
    kinds = None if SIM else _kinds(args)
    entry = _DIRECT.get((kernel, kinds)) if kinds is not None else None
    if entry is None:
        dev = [_dev(a) for a in args]
        kernel[grid, block, 0, smem](*dev)
        if kinds is not None and (kernel, kinds) not in _DIRECT:
            _DIRECT[(kernel, kinds)] = _direct_entry(kernel, dev)
        return
    convert, cufunc, cooperative = entry
    flat = []
    for conv, a in zip(convert, args):
        if conv is None:  # numba's array ABI: meminfo, parent, size, itemsize, data, shape, strides
            flat += (0, 0, a.size, a.dtype.itemsize, _pointer(a), *a.shape, *a.strides)
        else:
            flat.append(conv(a))
    config, stream, launch = _config(grid, block, smem, cooperative)
    launch(stream, config, cufunc, *flat)


def _check_threads():
    if THREADS < 1 or THREADS > _RED or THREADS & (THREADS - 1):
        raise ValueError(f"THREADS must be a power of 2 in [1, {_RED}], got {THREADS}")


def _flat(a):
    """1-D view of a C-contiguous array (numpy, numba or CuPy). Anything else is refused:
    CuPy would reshape a strided array into a copy, and a kernel would update the copy."""
    if a.size and not _contiguous(a.shape, a.strides, a.dtype.itemsize, "C"):
        raise ValueError(f"expected a C-contiguous array, got shape {a.shape} strides {a.strides}")
    return a.reshape(a.size) if a.ndim != 1 else a


def _scalar(a) -> float:
    return float(a.copy_to_host()[0])


_SCRATCH: dict = {}  # (tag, dtype) -> device buffer, grown on demand, reused across calls


def _scratch(tag: str, n: int, dtype=np.float64):
    """n items of a device buffer kept between calls. Safe to reuse: every launch runs on
    the one default stream, in order, so a later call cannot overwrite it early."""
    key = (tag, np.dtype(dtype).str)
    buf = _SCRATCH.get(key)
    if buf is None or buf.size < n:
        buf = _SCRATCH[key] = cuda.device_array(max(n, 1), dtype)
    return buf[:n]


# ---------------------------------------------------------------- cell maths (device)


@cuda.jit(device=True)
def _sigmoid(x, one):
    # exp(-|x|) never overflows (float32 exp(89) is inf); as cpu._sigmoid.
    e = math.exp(-abs(x))
    return (one if x >= 0 else e) / (one + e)


@cuda.jit(device=True)
def _lstm_cell(pi, pf, pg, po, cp, one):
    gi = _sigmoid(pi, one)
    gf = _sigmoid(pf, one)
    gg = math.tanh(pg)
    go = _sigmoid(po, one)
    c = gf * cp + gi * gg
    return gi, gf, gg, go, c, go * math.tanh(c)


@cuda.jit(device=True)
def _lstm_cell_back(gi, gf, gg, go, cp, c, dh, dc, one):
    """-> dL/d(pre) of i, f, g, o and dL/dc_{t-1}."""
    tc = math.tanh(c)
    dct = dc + dh * go * (one - tc * tc)
    return (dct * gg * gi * (one - gi), dct * cp * gf * (one - gf), dct * gi * (one - gg * gg),
            dh * tc * go * (one - go), dct * gf)


@cuda.jit(device=True)
def _gru_cell(xr, xz, xn, hr, hz, hnv, hprev, one):
    """hr, hz, hnv: recurrent products with b_hh added -> r, z, n, h."""
    r = _sigmoid(xr + hr, one)
    z = _sigmoid(xz + hz, one)
    n = math.tanh(xn + r * hnv)
    return r, z, n, (one - z) * n + z * hprev


@cuda.jit(device=True)
def _gru_cell_back(r, z, n, hnv, hprev, dh, one):
    """-> dL/dxp of r, z, n; dL/dhp of n (r * dn); the direct path z * dh."""
    dn = dh * (one - z) * (one - n * n)
    dr = dn * hnv * r * (one - r)
    dz = dh * (hprev - n) * z * (one - z)
    return dr, dz, dn, dn * r, dh * z


# ---------------------------------------------------------------- step kernels


@cuda.jit(cache=True)
def _lstm_forward_step_kernel(xp, hp, b_hh, c_prev, act, c, h):
    B, H = c.shape
    one = c.dtype.type(1)
    for k in range(cuda.grid(1), B * H, cuda.gridsize(1)):
        b = k // H
        j = k - b * H
        gi, gf, gg, go, cc, hh = _lstm_cell(
            xp[b, j] + hp[b, j] + b_hh[j], xp[b, H + j] + hp[b, H + j] + b_hh[H + j],
            xp[b, 2 * H + j] + hp[b, 2 * H + j] + b_hh[2 * H + j],
            xp[b, 3 * H + j] + hp[b, 3 * H + j] + b_hh[3 * H + j], c_prev[b, j], one)
        act[b, j] = gi
        act[b, H + j] = gf
        act[b, 2 * H + j] = gg
        act[b, 3 * H + j] = go
        c[b, j] = cc
        h[b, j] = hh


def lstm_forward_step(xp, hp, b_hh, c_prev, act, c, h):
    """xp, hp (B,4H); b_hh (4H,); c_prev (B,H) -> act (B,4H) = [i,f,g,o] activated, c, h (B,H)."""
    _launch(_lstm_forward_step_kernel, c.size, xp, hp, b_hh, c_prev, act, c, h)


@cuda.jit(cache=True)
def _lstm_backward_step_kernel(act, c_prev, c, dh, dc, dpre):
    B, H = c.shape
    one = c.dtype.type(1)
    for k in range(cuda.grid(1), B * H, cuda.gridsize(1)):
        b = k // H
        j = k - b * H
        di, df, dg, do, dcp = _lstm_cell_back(act[b, j], act[b, H + j], act[b, 2 * H + j],
                                              act[b, 3 * H + j], c_prev[b, j], c[b, j],
                                              dh[b, j], dc[b, j], one)
        dpre[b, j] = di
        dpre[b, H + j] = df
        dpre[b, 2 * H + j] = dg
        dpre[b, 3 * H + j] = do
        dc[b, j] = dcp


def lstm_backward_step(act, c_prev, c, dh, dc, dpre):
    """act (B,4H); c_prev, c (B,H); dh (B,H): dL/dh_t in full.
    dc (B,H): in = dL/dc_t from step t+1, out = dL/dc_{t-1} (updated in place).
    dpre (B,4H) out: dL/d(pre-activation), which is both dL/dxp and dL/dhp."""
    _launch(_lstm_backward_step_kernel, c.size, act, c_prev, c, dh, dc, dpre)


@cuda.jit(cache=True)
def _gru_forward_step_kernel(xp, hp, b_hh, h_prev, act, hn, h):
    B, H = h.shape
    one = h.dtype.type(1)
    for k in range(cuda.grid(1), B * H, cuda.gridsize(1)):
        b = k // H
        j = k - b * H
        hnv = hp[b, 2 * H + j] + b_hh[2 * H + j]
        r, z, n, hh = _gru_cell(xp[b, j], xp[b, H + j], xp[b, 2 * H + j], hp[b, j] + b_hh[j],
                                hp[b, H + j] + b_hh[H + j], hnv, h_prev[b, j], one)
        act[b, j] = r
        act[b, H + j] = z
        act[b, 2 * H + j] = n
        hn[b, j] = hnv
        h[b, j] = hh


def gru_forward_step(xp, hp, b_hh, h_prev, act, hn, h):
    """xp, hp (B,3H); b_hh (3H,); h_prev (B,H) -> act (B,3H) = [r,z,n], hn (B,H) = W_hn h + b_hn, h (B,H)."""
    _launch(_gru_forward_step_kernel, h.size, xp, hp, b_hh, h_prev, act, hn, h)


@cuda.jit(cache=True)
def _gru_backward_step_kernel(act, hn, h_prev, dh, dxp, dhp, dh_prev):
    B, H = dh.shape
    one = dh.dtype.type(1)
    for k in range(cuda.grid(1), B * H, cuda.gridsize(1)):
        b = k // H
        j = k - b * H
        dr, dz, dn, dnr, direct = _gru_cell_back(act[b, j], act[b, H + j], act[b, 2 * H + j],
                                                 hn[b, j], h_prev[b, j], dh[b, j], one)
        dxp[b, j] = dr
        dxp[b, H + j] = dz
        dxp[b, 2 * H + j] = dn
        dhp[b, j] = dr
        dhp[b, H + j] = dz
        dhp[b, 2 * H + j] = dnr
        dh_prev[b, j] = direct


def gru_backward_step(act, hn, h_prev, dh, dxp, dhp, dh_prev):
    """act (B,3H); hn, h_prev, dh (B,H) -> dxp (B,3H) = dL/dxp, dhp (B,3H) = dL/dhp (b_hh included),
    dh_prev (B,H) = the direct path z * dh (the W_hh path is added by the caller)."""
    _launch(_gru_backward_step_kernel, dh.size, act, hn, h_prev, dh, dxp, dhp, dh_prev)


@cuda.jit(cache=True)
def _rnn_forward_step_kernel(xp, hp, b_hh, h):
    B, H = h.shape
    for k in range(cuda.grid(1), B * H, cuda.gridsize(1)):
        b = k // H
        j = k - b * H
        h[b, j] = math.tanh(xp[b, j] + hp[b, j] + b_hh[j])


def rnn_forward_step(xp, hp, b_hh, h):
    """xp, hp (B,H); b_hh (H,) -> h (B,H) = tanh(xp + hp + b_hh)."""
    _launch(_rnn_forward_step_kernel, h.size, xp, hp, b_hh, h)


@cuda.jit(cache=True)
def _rnn_backward_step_kernel(h, dh, dpre):
    B, H = h.shape
    one = h.dtype.type(1)
    for k in range(cuda.grid(1), B * H, cuda.gridsize(1)):
        b = k // H
        j = k - b * H
        dpre[b, j] = dh[b, j] * (one - h[b, j] * h[b, j])


def rnn_backward_step(h, dh, dpre):
    """h, dh (B,H) -> dpre (B,H) = dL/d(pre-activation) = dL/dxp = dL/dhp."""
    _launch(_rnn_backward_step_kernel, h.size, h, dh, dpre)


# ---------------------------------------------------------------- embedding table
# Ids are not range-checked here (a kernel cannot raise): the model checks them on the host.


@cuda.jit(cache=True)
def _gather_rows_kernel(table, ids, out):
    N, D = out.shape
    for k in range(cuda.grid(1), N * D, cuda.gridsize(1)):
        n = k // D
        d = k - n * D
        out[n, d] = table[ids[n], d]


def gather_rows(table, ids, out):
    """table (V,D); ids (N,) int -> out (N,D) = table[ids]."""
    _launch(_gather_rows_kernel, out.size, table, ids, out)


@cuda.jit(cache=True)
def _scatter_sorted_kernel(order, starts, d, out):
    """out[v, j] += d[order[i], j] for i in starts[v]..starts[v+1]-1, in that order: one
    thread per (v, j), no races, no atomics. order lists the rows by id, stably, so each
    sum takes its rows in the order np.add.at does: the reference's sums bit for bit. Four
    rows' loads are issued before their adds (the adds stay in order)."""
    V, D = out.shape
    for k in range(cuda.grid(1), V * D, cuda.gridsize(1)):
        v = k // D
        j = k - v * D
        acc = out[v, j]
        i, end = starts[v], starts[v + 1]
        while i + 4 <= end:
            x0 = d[order[i], j]
            x1 = d[order[i + 1], j]
            x2 = d[order[i + 2], j]
            x3 = d[order[i + 3], j]
            acc += x0
            acc += x1
            acc += x2
            acc += x3
            i += 4
        while i < end:
            acc += d[order[i], j]
            i += 1
        out[v, j] = acc


def _rows_by_id(ids, V: int):
    """(order, starts): the positions of ids sorted stably by id, and where each id's run
    starts in them, (V+1,); ids outside [0, V) fall outside every run."""
    if SIM:
        xp, ids = np, np.asarray(ids)
    else:
        import cupy as xp

        ids = xp.asarray(ids)
    order = xp.argsort(ids, kind="stable") if SIM else xp.argsort(ids)  # CuPy's is stable
    # int64 bounds: V itself may not fit the ids' dtype (uint8 ids of a 256-entry vocabulary)
    starts = xp.searchsorted(ids[order], xp.arange(V + 1), side="left")
    return order, starts


def scatter_add_rows(ids, d, out):
    """ids (N,) int; d (N,D) -> out (V,D) += sum of d's rows into the rows named by ids."""
    V, D = out.shape
    order, starts = _rows_by_id(ids, V)
    _launch(_scatter_sorted_kernel, V * D, order, starts, d, out)


# ---------------------------------------------------------------- block reductions


@cuda.jit(device=True)
def _block_reduce(buf, v, take_max):
    """Sum (or max) of v over the block, in a fixed tree; every thread gets the result.
    blockDim.x must be a power of 2 no larger than buf."""
    tid = cuda.threadIdx.x
    buf[tid] = v
    cuda.syncthreads()
    s = cuda.blockDim.x // 2
    while s > 0:
        if tid < s:
            if take_max:
                buf[tid] = max(buf[tid], buf[tid + s])
            else:
                buf[tid] = buf[tid] + buf[tid + s]
        cuda.syncthreads()
        s //= 2
    r = buf[0]
    cuda.syncthreads()  # buf is free again for the next reduction
    return r


@cuda.jit(cache=True)
def _partial_sums_kernel(a, square, part):
    """part[block] = this block's share of sum(a) (or sum(a*a)), accumulated in float64."""
    buf = cuda.shared.array(_RED, float64)
    acc = 0.0
    for i in range(cuda.grid(1), a.size, cuda.gridsize(1)):
        x = float64(a[i])
        acc += x * x if square else x
    s = _block_reduce(buf, acc, False)
    if cuda.threadIdx.x == 0:
        part[cuda.blockIdx.x] = s


def _device_sum(arrays, square: bool) -> float:
    """Sum of 1-D device arrays (or of their squares): each array's blocks write partial
    sums side by side into one buffer, then one block sums it, so one copy to the host
    however many arrays. Deterministic for given sizes, THREADS and MAX_BLOCKS."""
    _check_threads()
    grids = [_grid(a.size) for a in arrays]
    part = _scratch("part", sum(grids))  # (all arrays' blocks,) partial sums
    out = _scratch("sum", 1)
    off = 0
    for a, nb in zip(arrays, grids):
        _run(_partial_sums_kernel, nb, THREADS, 0, a, 1 if square else 0, part[off:off + nb])
        off += nb
    _run(_partial_sums_kernel, 1, THREADS, 0, part, 0, out)
    return _scalar(out)


def sum_squares(g):
    """Sum of squares of an array, accumulated in float64 (global-norm clipping)."""
    return _device_sum([_flat(g)], True)


def sum_squares_total(arrays):
    """Sum of squares over a sequence of arrays, accumulated in float64 (global-norm
    clipping): one reduction and one sync with the host per call, not one per array."""
    return _device_sum([_flat(g) for g in arrays], True)


# ---------------------------------------------------------------- loss


@cuda.jit(cache=True)
def _softmax_xent_kernel(logits, targets, mask, scale, dlogits, row_loss):
    N, V = logits.shape
    buf = cuda.shared.array(_RED, float64)
    tid = cuda.threadIdx.x
    for n in range(cuda.blockIdx.x, N, cuda.gridDim.x):  # one block per row
        mk = mask[n]
        if mk == 0:
            for j in range(tid, V, cuda.blockDim.x):
                dlogits[n, j] = 0
            if tid == 0:
                row_loss[n] = 0.0
            continue
        t = targets[n]
        xt = logits[n, t]  # read before the row is overwritten (dlogits may alias logits)
        m = logits[n, 0]
        for j in range(tid, V, cuda.blockDim.x):
            m = max(m, logits[n, j])
        m = logits.dtype.type(_block_reduce(buf, m, True))  # exact: a max of dtype values
        s = 0.0  # float64 accumulator
        for j in range(tid, V, cuda.blockDim.x):
            s += math.exp(logits[n, j] - m)
        s = _block_reduce(buf, s, False)
        w = mk * scale / s
        for j in range(tid, V, cuda.blockDim.x):
            g = math.exp(logits[n, j] - m) * w
            if j == t:
                g -= mk * scale
            dlogits[n, j] = g
        if tid == 0:
            row_loss[n] = (math.log(s) + m - xt) * mk


def softmax_xent(logits, targets, mask, scale, dlogits):
    """logits (N,V); targets (N,) int; mask (N,) float (1 = counts) -> returns the summed loss
    sum_n mask_n * -log softmax(logits_n)[target_n]; writes dlogits (N,V) = d(scale * loss)/dlogits.
    dlogits may be the logits array itself (each row is read before it is written)."""
    _check_threads()
    N = logits.shape[0]
    row_loss = _scratch("row_loss", N)  # (N,) per-row losses
    _run(_softmax_xent_kernel, max(1, min(N, MAX_BLOCKS)), THREADS, 0, logits, targets, mask,
         float(scale), dlogits, row_loss)
    return _device_sum([row_loss], False)


@cuda.jit(cache=True)
def _log_softmax_rows_kernel(logits, out):
    N, V = logits.shape
    buf = cuda.shared.array(_RED, float64)
    tid = cuda.threadIdx.x
    for n in range(cuda.blockIdx.x, N, cuda.gridDim.x):
        m = logits[n, 0]
        for j in range(tid, V, cuda.blockDim.x):
            m = max(m, logits[n, j])
        m = logits.dtype.type(_block_reduce(buf, m, True))
        s = 0.0
        for j in range(tid, V, cuda.blockDim.x):
            s += math.exp(logits[n, j] - m)
        ls = math.log(_block_reduce(buf, s, False))
        for j in range(tid, V, cuda.blockDim.x):
            out[n, j] = (logits[n, j] - m) - ls


def log_softmax_rows(logits, out):
    """logits (N,V) -> out (N,V) = log softmax per row (scoring and evaluation)."""
    _check_threads()
    _run(_log_softmax_rows_kernel, max(1, min(logits.shape[0], MAX_BLOCKS)), THREADS, 0,
         logits, out)


# ---------------------------------------------------------------- sampling


@cuda.jit(device=True)
def _draw(logits, temperature, top_k, top_p, u, work, o):
    """One id drawn from logits (V,) as reference.sample_logits with uniform u, by the whole
    block (every thread must call it: it synchronises the block). work[o, o+2V) float64:
    [0, V) the ids in descending-logit order (ties: lower id first, as the reference's stable
    argsort), [V, 2V) their probabilities. Returns the id on thread 0, -1 on the others."""
    V = logits.shape[0]
    tid, nt = cuda.threadIdx.x, cuda.blockDim.x
    for j in range(tid, V, nt):
        work[o + j] = j  # every slot a valid id even if NaN logits collide in rank
    cuda.syncthreads()
    for j in range(tid, V, nt):
        x = logits[j]
        rank = 0
        for i in range(V):
            y = logits[i]
            if y > x or (y == x and i < j):
                rank += 1
        work[o + rank] = j
    cuda.syncthreads()
    z0 = float64(logits[int(work[o])]) / temperature
    for r in range(tid, V, nt):
        work[o + V + r] = math.exp(float64(logits[int(work[o + r])]) / temperature - z0)
    cuda.syncthreads()
    pick = -1
    if tid == 0:  # the prefix sums are sequential, as np.cumsum
        p = o + V
        keep = V if top_k <= 0 else min(top_k, V)
        if top_p < 1.0:
            s = 0.0
            for i in range(keep):
                s += work[p + i]
            c = 0.0
            for i in range(keep):
                c += work[p + i]
                if c / s >= top_p:  # the smallest prefix reaching top_p
                    keep = i + 1
                    break
        total = 0.0
        for i in range(keep):
            total += work[p + i]
        target = u * total
        j = keep - 1
        c = 0.0
        for i in range(keep):
            c += work[p + i]
            if c > target:
                j = i
                break
        pick = int(work[o + j])
    return pick


@cuda.jit(cache=True)
def _sample_rows_kernel(logits, temperature, top_k, top_p, u, work, out):
    # work (B*2V,) float64: per row, _draw's ids and probabilities.
    B, V = logits.shape
    for b in range(cuda.blockIdx.x, B, cuda.gridDim.x):  # one block per row
        pick = _draw(logits[b], temperature, top_k, top_p, u[b], work, b * 2 * V)
        if cuda.threadIdx.x == 0:
            out[b] = pick


def sample_rows(logits, temperature, top_k, top_p, u, out):
    """logits (B,V); u (B,) uniforms -> out (B,) ids, each row drawn as sample_logits.
    Host (numpy) arrays are accepted too: copied in, and out copied back (the sampler)."""
    B, V = logits.shape
    host_out = isinstance(out, np.ndarray) and not SIM
    args = [logits, float(temperature), int(top_k), float(top_p), u, _scratch("sample", B * 2 * V),
            out]
    if not SIM:
        args = [cuda.to_device(a) if isinstance(a, np.ndarray) else a for a in args]
    _run(_sample_rows_kernel, max(1, min(B, MAX_BLOCKS)), THREADS, 0, *args)
    if host_out:
        args[6].copy_to_host(out)


def sample_logits(logits, temperature, top_k, top_p, u):
    """logits (V,); temperature > 0; top_k (0 = off); top_p in (0,1] (1 = off); u uniform in [0,1).
    Returns the sampled id, the same as reference.sample_logits for the same u."""
    out = np.zeros(1, np.int64)
    sample_rows(logits.reshape(1, logits.shape[0]), temperature, top_k, top_p,
                np.array([u], np.float64), out)
    return int(out[0])


# ---------------------------------------------------------------- optimizer


@cuda.jit(cache=True)
def _adam_kernel(p, g, m, v, lr, beta1, beta2, c1, c2, eps, bc1, bc2, l2, shrink, use_l2,
                 use_decay):
    # Scalars arrive in the arrays' dtype; operations in the reference's order.
    for i in range(cuda.grid(1), p.size, cuda.gridsize(1)):
        pv = p[i]
        if use_decay:
            pv = pv * shrink
        gg = g[i] + l2 * pv if use_l2 else g[i]
        mv = m[i] * beta1
        mv = mv + c1 * gg
        vv = v[i] * beta2
        vv = vv + c2 * gg * gg
        m[i] = mv
        v[i] = vv
        p[i] = pv - lr * (mv / bc1) / (math.sqrt(vv / bc2) + eps)


def adam_update(p, g, m, v, lr, beta1, beta2, eps, bc1, bc2, l2, decay):
    """In place on p, m, v (same shape). bc1 = 1 - beta1**t, bc2 = 1 - beta2**t.
    l2: classic Adam weight decay (added to the gradient); decay: AdamW's decoupled
    decay (p *= 1 - lr*decay first). Matches torch.optim.Adam / AdamW."""
    dt = np.dtype(p.dtype).type
    _run(_adam_kernel, _grid(p.size), THREADS, 0,
        _flat(p), _flat(g), _flat(m), _flat(v), dt(lr), dt(beta1),
        dt(beta2), dt(1.0 - beta1), dt(1.0 - beta2), dt(eps), dt(bc1), dt(bc2), dt(l2),
        dt(1.0 - lr * decay), 1 if l2 else 0, 1 if decay else 0)


def adam_update_all(ps, gs, ms, vs, lr, beta1, beta2, eps, bc1, bc2, l2s, decays):
    """adam_update of every parameter in ps, with its gradient, moments, l2 and decay at the
    same place in the other sequences: a launch each (their host cost is ~20 us, _run)."""
    for p, g, m, v, l2, decay in zip(ps, gs, ms, vs, l2s, decays, strict=True):
        adam_update(p, g, m, v, lr, beta1, beta2, eps, bc1, bc2, l2, decay)


# ---------------------------------------------------------------- persistent recurrence

# Built per (direction, cell, dtype) so the cell's branches, the shared-memory dtype and
# the register tiles' sizes are compile-time constants; not disk-cached (closures), compiled
# on first use in a process.
_KERNELS: dict = {}  # (direction, cell, dtype, C) -> compiled-on-demand kernel
_PLANS: dict = {}  # launch key -> Plan


class Plan(NamedTuple):
    """How a persistent launch splits one layer. Block k owns hidden units [k*U, k*U+U). A
    thread sums ROWS batch rows (b = bq, bq+BR, ...) x C columns of W_hh over every KS-th
    row k of each tile of KT rows; its KS-1 partners' sums meet in shared memory."""
    U: int  # hidden units a block owns
    blocks: int
    threads: int  # BR * NG * KS
    KS: int  # threads splitting the k sum of one (rows, columns) share
    KT: int  # rows of the transposed state staged in shared memory at a time
    SB: int  # a staged row's stride in shared memory (B, padded: see _layout)
    smem: int  # dynamic shared memory, bytes


def _products_fn(C: int, BR: int):
    """The per-step product of a persistent block (device function). This thread's
    acc[r*C+i] = sum_k src[k, bq + r*BR] * W[k, col0 + i] for r < ROWS, i < C, over its
    rows k, where src (K,B) is the previous step's transposed state in global memory and
    W (K,NC) sits at sm[0:K*NC]. The block streams src through sm[boff:] KT rows at a
    time, each thread carrying PREFETCH values of the next tile in registers while the
    current one is summed (K*B loads a step in flight together, instead of one dependent
    load per product). A thread takes the tile rows ks, ks+KS, ...; the KS shares of each
    sum are then added in a fixed tree and left at sm[boff + i*NT0 + g] (g: the thread's
    index within its k-split, NT0 threads a k-split). acc is indexed by constants only, so
    it stays in registers.

    Every index is unsigned: a signed one costs numba's negative-index wraparound on each
    access. The inner loop walks two shared-memory indices (W's row, the state tile's row)
    and reads at constant offsets from them (i, r*BR: BR is compiled in); signed int64
    indices were 90 of its 134 instructions per k row (SASS, 3x512 forward), for 12 loads
    and 32 FMAs."""
    key = ("products", C, BR, ROWS, PREFETCH)
    if key in _KERNELS:
        return _KERNELS[key]
    R, L = ROWS, PREFETCH
    u64 = numba.uint64

    @cuda.jit(device=True)
    def products(src, sm, boff, SB, KT, NC, col0, bq, ks, KS, prow, pcol, pre, acc, wv):
        """prow, pcol (PREFETCH,): where this thread's prefetched values sit in a tile (from
        `_tile_slots`): integer division is slow on the GPU and they never change."""
        K = src.shape[0]
        for i in range(R * C):
            acc[i] = 0
        for i in range(L):  # tile 0
            if prow[i] < KT and prow[i] < K:
                pre[i] = src[u64(prow[i]), u64(pcol[i])]
        dw, dh = u64(KS * NC), u64(KS * SB)  # the indices' steps from one k row to the next
        so, sb = u64(boff), u64(SB)
        for k0 in range(0, K, KT):
            rows = min(KT, K - k0)
            cuda.syncthreads()  # every thread is done with the previous tile
            for i in range(L):
                if prow[i] < rows:
                    sm[so + u64(prow[i]) * sb + u64(pcol[i])] = pre[i]
            cuda.syncthreads()
            nxt = min(KT, K - k0 - KT)  # the next tile's rows, loaded during the sums
            kn = u64(k0 + KT)
            for i in range(L):
                if prow[i] < nxt:
                    pre[i] = src[kn + u64(prow[i]), u64(pcol[i])]
            kl = ks
            wb = u64((k0 + ks) * NC + col0)
            hb = u64(boff + ks * SB + bq)
            while kl < rows:
                for i in range(C):
                    wv[i] = sm[wb + u64(i)]
                for r in range(R):  # rows b >= B read padding: their sums are never used
                    hv = sm[hb + u64(r * BR)]
                    for i in range(C):
                        acc[r * C + i] += hv * wv[i]
                kl += KS
                wb += dw
                hb += dh
        # The tile buffer now takes the partial sums: KS groups halve in a fixed tree
        # (deterministic), so it needs room for KS // 2 groups' sums, not KS.
        NT0 = cuda.blockDim.x // KS
        g = cuda.threadIdx.x - ks * NT0
        n0 = u64(NT0)
        h = KS
        while h > 1:
            half = (h + 1) // 2  # groups [half, h) hand their sums to groups [0, h - half)
            cuda.syncthreads()
            if ks >= half and ks < h:
                d = u64(boff + (ks - half) * R * C * NT0 + g)
                for i in range(R * C):
                    sm[d] = acc[i]
                    d += n0
            cuda.syncthreads()
            if ks < h - half:
                d = u64(boff + ks * R * C * NT0 + g)
                for i in range(R * C):
                    acc[i] += sm[d]
                    d += n0
            h = half
        cuda.syncthreads()
        if ks == 0:
            d = u64(boff + g)
            for i in range(R * C):
                sm[d] = acc[i]
                d += n0
        cuda.syncthreads()

    _KERNELS[key] = products
    return products


@cuda.jit(device=True)
def _tile_slots(B, prow, pcol):
    """The (row, column) of each value this thread prefetches into a (KT, B) tile: value
    e = tid + i*blockDim (row-major), the same every tile."""
    for i in range(prow.shape[0]):
        e = cuda.threadIdx.x + i * cuda.blockDim.x
        prow[i] = e // B
        pcol[i] = e - prow[i] * B


def _forward_kernel(cell: str, dtype, BR: int):
    """BR = ceil(B / ROWS), compiled in (see _products_fn)."""
    key = ("forward", cell, np.dtype(dtype).str, BR, ROWS, PREFETCH)
    if key in _KERNELS:
        return _KERNELS[key]
    G = GATES[cell]
    LSTM, GRU = cell == "lstm", cell == "gru"
    L, RG = PREFETCH, ROWS * G  # local array sizes must be constants
    smem_type = numba.from_dtype(np.dtype(dtype))
    products = _products_fn(G, BR)

    @cuda.jit
    def kernel(xp, w_hh, b_hh, h0, c0, hmask, use_mask, U, KS, KT, SB, s0, s1, hT, hs, act, cs,
               hn):
        """Steps s0..s1-1 of one layer; this block's units j0..j0+Uk-1. A thread: unit jj,
        its G gates (columns jj*G + q of the block's W), rows bq + r*BR. hT (2,H,B): step t
        reads (h_{t-1} * mask).T from hT[(t+1) % 2] (the launcher fills hT[1] from h0) and
        writes its own into hT[t % 2]."""
        B, H = h0.shape
        GU = G * U
        j0 = cuda.blockIdx.x * U
        Uk = max(0, min(U, H - j0))  # the last block may own fewer (spare blocks none)
        tid, nt = cuda.threadIdx.x, cuda.blockDim.x
        bq = tid % BR
        jj = (tid // BR) % U
        ks = tid // (BR * U)
        # [0, H*G*U): W_hh rows of our units, (H, U, G): a unit's G gates side by side
        sm = cuda.shared.array(0, smem_type)
        for idx in range(tid, H * GU, nt):
            kk = idx // GU
            r = idx - kk * GU
            u = r // G
            q = r - u * G
            sm[idx] = w_hh[q * H + j0 + u, kk] if u < Uk else 0
        pre = cuda.local.array(L, smem_type)
        prow = cuda.local.array(L, numba.int32)
        pcol = cuda.local.array(L, numba.int32)
        _tile_slots(B, prow, pcol)
        acc = cuda.local.array(RG, smem_type)
        wv = cuda.local.array(G, smem_type)
        NT0 = BR * U  # threads of one k-split
        one = hs.dtype.type(1)
        grid = cuda.cg.this_grid()
        for t in range(s0, s1):
            if t > s0:
                grid.sync()  # every block's h of step t-1 is written
            rd, wr = (t + 1) % 2, t % 2
            products(hT[rd], sm, H * GU, SB, KT, GU, jj * G, bq, ks, KS, prow, pcol, pre, acc, wv)
            for pair in range(tid, B * Uk, nt):
                u = pair // B  # batch rows fastest: coalesced writes of hT
                b = pair - u * B
                j = j0 + u
                rr = b // BR
                g = b - rr * BR + u * BR  # the thread (of each k-split) that summed (b, j)
                p0 = H * GU + rr * G * NT0 + g  # sum q of (b, j): sm[p0 + q*NT0]
                a0 = sm[p0]
                if LSTM:
                    cp = c0[b, j] if t == 0 else cs[t - 1, b, j]
                    a1, a2, a3 = sm[p0 + NT0], sm[p0 + 2 * NT0], sm[p0 + 3 * NT0]
                    gi, gf, gg, go, cc, hh = _lstm_cell(
                        xp[t, b, j] + a0 + b_hh[j], xp[t, b, H + j] + a1 + b_hh[H + j],
                        xp[t, b, 2 * H + j] + a2 + b_hh[2 * H + j],
                        xp[t, b, 3 * H + j] + a3 + b_hh[3 * H + j], cp, one)
                    act[t, b, j] = gi
                    act[t, b, H + j] = gf
                    act[t, b, 2 * H + j] = gg
                    act[t, b, 3 * H + j] = go
                    cs[t, b, j] = cc
                elif GRU:
                    hprev = h0[b, j] if t == 0 else hs[t - 1, b, j]
                    a1 = sm[p0 + NT0]
                    hnv = sm[p0 + 2 * NT0] + b_hh[2 * H + j]
                    r, z, n, hh = _gru_cell(xp[t, b, j], xp[t, b, H + j], xp[t, b, 2 * H + j],
                                            a0 + b_hh[j], a1 + b_hh[H + j], hnv, hprev, one)
                    act[t, b, j] = r
                    act[t, b, H + j] = z
                    act[t, b, 2 * H + j] = n
                    hn[t, b, j] = hnv
                else:
                    hh = math.tanh(xp[t, b, j] + a0 + b_hh[j])
                hs[t, b, j] = hh
                hT[wr, j, b] = hh * hmask[b, j] if use_mask else hh

    _KERNELS[key] = kernel
    return kernel


def _backward_columns(U: int) -> int:
    """C, the units a backward thread sums (registers: ROWS*C), compiled for 1, 2 or 4."""
    return 1 if U == 1 else 2 if U == 2 else 4


def _backward_kernel(cell: str, dtype, C: int, BR: int):
    """BR = ceil(B / ROWS), compiled in (see _products_fn)."""
    key = ("backward", cell, np.dtype(dtype).str, BR, ROWS, PREFETCH, C)
    if key in _KERNELS:
        return _KERNELS[key]
    G = GATES[cell]
    LSTM, GRU = cell == "lstm", cell == "gru"
    L, RC = PREFETCH, ROWS * C  # local array sizes must be constants
    smem_type = numba.from_dtype(np.dtype(dtype))
    products = _products_fn(C, BR)

    @cuda.jit
    def kernel(w_hh, hmask, use_mask, h0, c0, hs, act, cs, hn, dhs, U, KS, KT, SB, s0, s1, dT,
               dxp, dhp, dc, direct, dh0):
        """Reverse steps s0..s1-1 (t = T-1-s; s = T computes dh0 only); our units only. A
        thread: units g*C .. g*C+C-1 of the block, rows bq + r*BR. dc (LSTM) and direct
        (GRU, z * dh) carry each unit's own state between steps. dT (2,G*H,B): step t
        writes its dL/dhp rows (dxp's, or dhp's for GRU) transposed into dT[t % 2]; step
        t-1 reads them from there."""
        T, B, H = hs.shape
        GH = G * H
        j0 = cuda.blockIdx.x * U
        Uk = max(0, min(U, H - j0))
        NC = (U + C - 1) // C * C  # W columns, padded with zeros to whole groups
        tid, nt = cuda.threadIdx.x, cuda.blockDim.x
        bq = tid % BR
        grp = (tid // BR) % (NC // C)
        ks = tid // (BR * (NC // C))
        sm = cuda.shared.array(0, smem_type)  # [0, G*H*NC): W_hh columns of our units
        for idx in range(tid, GH * NC, nt):
            r = idx // NC
            u = idx - r * NC
            sm[idx] = w_hh[r, j0 + u] if u < Uk else 0
        pre = cuda.local.array(L, smem_type)
        prow = cuda.local.array(L, numba.int32)
        pcol = cuda.local.array(L, numba.int32)
        _tile_slots(B, prow, pcol)
        acc = cuda.local.array(RC, smem_type)
        wv = cuda.local.array(C, smem_type)
        NT0 = BR * (NC // C)  # threads of one k-split
        one = hs.dtype.type(1)
        zero = one - one
        grid = cuda.cg.this_grid()
        for s in range(s0, s1):
            if s > s0:
                grid.sync()  # every block's dL/dhp of step t+1 is written
            t = T - 1 - s
            rd, wr = (t + 1) % 2, t % 2
            if t + 1 < T:  # dL/dh_t arriving from step t+1: (dhp @ W_hh) * mask + direct
                products(dT[rd], sm, GH * NC, SB, KT, NC, grp * C, bq, ks, KS, prow, pcol,
                         pre, acc, wv)
            for pair in range(tid, B * Uk, nt):
                u = pair // B  # batch rows fastest: coalesced writes of dT
                b = pair - u * B
                j = j0 + u
                rec = zero
                if t + 1 < T:
                    rr = b // BR
                    ug = u // C  # the column group that summed unit u
                    rec = sm[GH * NC + (rr * C + u - ug * C) * NT0 + b - rr * BR + ug * BR]
                    if use_mask:
                        rec = rec * hmask[b, j]
                    if GRU:
                        rec = rec + direct[b, j]
                if t < 0:
                    dh0[b, j] = rec
                    continue
                dh = dhs[t, b, j] + rec
                if LSTM:
                    cp = c0[b, j] if t == 0 else cs[t - 1, b, j]
                    dcv = dc[b, j] if t + 1 < T else zero
                    di, df, dg, do, dcp = _lstm_cell_back(
                        act[t, b, j], act[t, b, H + j], act[t, b, 2 * H + j],
                        act[t, b, 3 * H + j], cp, cs[t, b, j], dh, dcv, one)
                    dxp[t, b, j] = di
                    dxp[t, b, H + j] = df
                    dxp[t, b, 2 * H + j] = dg
                    dxp[t, b, 3 * H + j] = do
                    dT[wr, j, b] = di
                    dT[wr, H + j, b] = df
                    dT[wr, 2 * H + j, b] = dg
                    dT[wr, 3 * H + j, b] = do
                    dc[b, j] = dcp
                elif GRU:
                    hprev = h0[b, j] if t == 0 else hs[t - 1, b, j]
                    dr, dz, dn, dnr, dd = _gru_cell_back(act[t, b, j], act[t, b, H + j],
                                                         act[t, b, 2 * H + j], hn[t, b, j],
                                                         hprev, dh, one)
                    dxp[t, b, j] = dr
                    dxp[t, b, H + j] = dz
                    dxp[t, b, 2 * H + j] = dn
                    dhp[t, b, j] = dr
                    dhp[t, b, H + j] = dz
                    dhp[t, b, 2 * H + j] = dnr
                    dT[wr, j, b] = dr
                    dT[wr, H + j, b] = dz
                    dT[wr, 2 * H + j, b] = dnr
                    direct[b, j] = dd
                else:
                    hv = hs[t, b, j]
                    dpre = dh * (one - hv * hv)
                    dxp[t, b, j] = dpre
                    dT[wr, j, b] = dpre

    _KERNELS[key] = kernel
    return kernel


def _layout(B: int, K: int, NC: int, C: int, groups: int, KS: int, itemsize: int,
            tile_rows: int = 0):
    """(threads, KT, SB, shared bytes) of a block whose W slice is (K, NC) and whose threads
    are BR row groups x `groups` column groups x KS k-splits; KT 0 when nothing fits. The
    region after W holds a state tile, then the partial sums of KS // 2 groups."""
    BR = -(-B // ROWS)
    nt = BR * groups * KS
    SB = B + (BR - B) % 32  # the KS rows a warp reads at once start in other banks
    sums = max(1, KS // 2) * ROWS * C * BR * groups
    room = SMEM_LIMIT // itemsize - K * NC
    # A tile's last row is read up to ROWS*BR past its start (rows b >= B are padding),
    # which can pass SB; the prefetch slots cover PREFETCH*nt values; tile_rows only lowers.
    fit = min(room // SB, (room - ROWS * BR) // SB + 1) if room >= ROWS * BR else 0
    KT = max(0, min(K, PREFETCH * nt // B, fit, tile_rows or K))
    tile = max(KT * SB, (KT - 1) * SB + ROWS * BR)
    return nt, KT, SB, (K * NC + max(tile, sums)) * itemsize


def _sm_count() -> int:
    try:
        return int(cuda.get_current_device().MULTIPROCESSOR_COUNT)
    except Exception:  # noqa: BLE001 -- the simulator's device may not say
        return 1


def _plan(kernel_for, args, key, direction: str, G: int, B: int, H: int, itemsize: int,
          units: int, splits: int, tile_rows: int, stepwise: bool) -> Plan:
    """The launch of one layer's persistent kernel. U: the fewest units per block whose
    grid still fits one block an SM (every block reads the whole previous state each step,
    so more blocks than SMs read more and add nothing), else the most that fit. KS: as
    many k-splits as keep the block within PERSISTENT_THREADS and its shared memory
    (W slice, then the state tile or the partial sums) within SMEM_LIMIT."""
    key = (*key, _kinds(args), PERSISTENT_THREADS, SMEM_LIMIT, ROWS, PREFETCH, _sm_count())
    if not (units or splits or tile_rows or stepwise) and key in _PLANS:
        return _PLANS[key]
    sig = tuple(numba.typeof(_dev(a)) for a in args)  # occupancy depends on the compiled code
    BR = -(-B // ROWS)

    def fit(U):  # the Plan of U with the most k-splits that fit, or None
        if direction == "forward":
            K, NC, C, groups = H, G * U, G, U
        else:
            C = _backward_columns(U)
            K, groups = G * H, -(-U // C)
            NC = groups * C
        ks_max = max(1, min(K, PERSISTENT_THREADS // (BR * groups)))
        for KS in [splits] if splits else range(ks_max, 0, -1):  # fewer: less memory
            nt, KT, SB, smem = _layout(B, K, NC, C, groups, KS, itemsize, tile_rows)
            if (KT and nt <= PERSISTENT_THREADS and smem <= SMEM_LIMIT
                    and co_resident(U, -(-H // U), nt, smem)):
                return Plan(U, -(-H // U), nt, KS, KT, SB, smem)
        return None

    def co_resident(U, nb, nt, smem):
        kernel = kernel_for(U)
        if stepwise:  # separate launches: any grid runs
            return True
        if SIM:  # the simulator runs one block per cooperative grid
            return nb <= kernel.overloads[None].max_cooperative_grid_blocks(nt)
        try:  # a cooperative kernel links libcudadevrt, which a CUDA install may lack
            compiled = kernel.compile(sig)
        except Exception as e:
            raise PersistentUnavailable(f"persistent recurrence could not be built: {e}") from e
        return nb <= compiled.max_cooperative_grid_blocks(nt, smem)

    plan, n_sm = None, _sm_count()
    for U in ([min(units, H)] if units else range(1, H + 1)):
        if G * H * U * itemsize > SMEM_LIMIT:  # the W slice alone: more units fit less
            break
        plan = fit(U) or plan
        if plan is not None and plan.U == U and plan.blocks <= n_sm:
            break
    if plan is None:
        raise PersistentUnavailable(
            f"persistent recurrence: H={H} (G={G}, {itemsize}-byte floats) needs W_hh "
            f"({G * H * H * itemsize} bytes) spread over more co-resident blocks than this GPU "
            f"holds with SMEM_LIMIT={SMEM_LIMIT}, or B={B} needs more than "
            f"PERSISTENT_THREADS={PERSISTENT_THREADS} threads; use the per-step design "
            f"(persistent=False)")
    if not (units or splits or tile_rows or stepwise):
        _PLANS[key] = plan
    return plan


@cuda.jit(cache=True)
def _masked_transpose_kernel(h, hmask, use_mask, out):
    """out (H,B) = (h * hmask).T for h, hmask (B,H): the forward's hT of the step before 0."""
    B, H = h.shape
    for k in range(cuda.grid(1), B * H, cuda.gridsize(1)):
        kk = k // B
        b = k - kk * B
        out[kk, b] = h[b, kk] * hmask[b, kk] if use_mask else h[b, kk]


def _pingpong(tag: str, rows: int, B: int, dtype):
    """(2, rows, B) scratch of the persistent kernels' transposed state (reused: one stream)."""
    return _scratch(tag, 2 * rows * B, dtype).reshape(2, rows, B)


_DUMMIES: dict = {}  # (dtype, ndim) -> 1-element device array


def _dummy(a, ndim: int):
    """A 1-element stand-in of a's dtype for an unused array argument (one signature)."""
    if SIM:
        return np.zeros((1,) * ndim, a.dtype)
    key = (np.dtype(a.dtype).str, ndim)
    if key not in _DUMMIES:
        _DUMMIES[key] = cuda.device_array((1,) * ndim, a.dtype)
    return _DUMMIES[key]


def persistent_layer_forward(cell, xp, w_hh, b_hh, h0, c0, hmask, hs, act, cs, hn, units=0,
                             splits=0, tile_rows=0, stepwise=False):
    """One layer over a window in one cooperative launch (HostBackend.layer_forward's loop).
    xp (T,B,G*H) input projections (b_ih included); w_hh (G*H,H); b_hh (G*H,); h0 (B,H);
    c0 (B,H) (LSTM, else None); hmask (B,H) or None -> hs (T,B,H); act (T,B,G*H) (LSTM, GRU);
    cs (T,B,H) (LSTM); hn (T,B,H) (GRU); the others None. units, splits, tile_rows: force
    the plan's U, KS, KT (0: planned). stepwise: one launch per step, any number of blocks
    (the simulator's way to run several blocks: it has no grid barrier). Raises
    PersistentUnavailable (before launching anything) when the layer does not fit."""
    T, B, H = hs.shape
    G = GATES[cell]
    kernel = _forward_kernel(cell, hs.dtype, -(-B // ROWS))
    d2, d3 = _dummy(hs, 2), _dummy(hs, 3)
    mask = d2 if hmask is None else hmask
    hT = _pingpong("hT", H, B, hs.dtype)  # (2, H, B)
    args = [xp, w_hh, b_hh, h0, d2 if c0 is None else c0,
            mask, 0 if hmask is None else 1, 1, 1, 1, 1, 0, T, hT, hs,
            d3 if act is None else act, d3 if cs is None else cs,
            d3 if hn is None else hn]
    key = ("forward", cell, np.dtype(hs.dtype).str, B, H)
    plan = _plan(lambda U: kernel, args, key, "forward", G, B, H, np.dtype(hs.dtype).itemsize,
                 units, splits, tile_rows, stepwise)
    args[7:11] = plan.U, plan.KS, plan.KT, plan.SB
    _launch(_masked_transpose_kernel, B * H, h0, mask, args[6], hT[1])
    for s0, s1 in ([(t, t + 1) for t in range(T)] if stepwise else [(0, T)]):
        args[11], args[12] = s0, s1
        _run(kernel, plan.blocks, plan.threads, plan.smem, *args)


def persistent_layer_backward(cell, w_hh, hmask, h0, c0, hs, act, cs, hn, dhs, dxp, dhp, dc,
                              direct, dh0, units=0, splits=0, tile_rows=0, stepwise=False):
    """The backward of persistent_layer_forward (HostBackend.layer_backward's loop).
    dhs (T,B,H) = dL/dh_t from above -> dxp (T,B,G*H); dhp (T,B,3H) (GRU, else None: it is
    dxp); dc (B,H) (LSTM) ends as dL/dc0; direct (B,H) (GRU) is scratch; dh0 (B,H).
    The weight gradients are one GEMM over the window, left to the caller."""
    T, B, H = hs.shape
    G = GATES[cell]
    itemsize = np.dtype(hs.dtype).itemsize
    d2, d3 = _dummy(hs, 2), _dummy(hs, 3)
    args = [w_hh, d2 if hmask is None else hmask, 0 if hmask is None else 1,
            h0, d2 if c0 is None else c0, hs, d3 if act is None else act,
            d3 if cs is None else cs, d3 if hn is None else hn, dhs, 1, 1, 1, 1,
            0, T + 1, _pingpong("dT", G * H, B, hs.dtype), dxp,
            d3 if dhp is None else dhp, d2 if dc is None else dc,
            d2 if direct is None else direct, dh0]
    key = ("backward", cell, np.dtype(hs.dtype).str, B, H)
    def kernel_for(U):  # compiled per C, the units a thread sums, which follows U
        return _backward_kernel(cell, hs.dtype, _backward_columns(U), -(-B // ROWS))

    plan = _plan(kernel_for, args, key, "backward", G, B, H, itemsize, units, splits, tile_rows,
                 stepwise)
    kernel = kernel_for(plan.U)
    args[10:14] = plan.U, plan.KS, plan.KT, plan.SB
    for s0, s1 in ([(s, s + 1) for s in range(T + 1)] if stepwise else [(0, T + 1)]):
        args[14], args[15] = s0, s1
        _run(kernel, plan.blocks, plan.threads, plan.smem, *args)
