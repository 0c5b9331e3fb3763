"""Batch-1 generation on the GPU: the whole sampling loop in one persistent kernel.

`generate_ids` is the twin of reference.generate_ids (same arguments, same ids for the same
uniforms): cells, decoder, softmax and temperature / top-k / top-p sampling all run on the
device, and the host only receives the sampled ids.

One cooperative launch runs all n steps. Each step is L + 2 phases with a grid barrier
(`cuda.cg.this_grid().sync()`) after each:
  layer k     block b owns hidden units [b*U, b*U+U) with all G of their gate rows; it
              stages the old h_k (and the layer's input x) in shared memory, computes its
              G*U input and recurrent dot products, then the cell maths of its units, and
              writes the new h_k into the other half of a double buffer (so blocks still
              reading the old h are not raced) and the layer's output into ys;
  decoder     every block takes a share of the V rows: logits = dec_w @ ys[L-1] + dec_b;
  sample      block 0 draws the id with cuda._draw (the code of sample_rows), writes out[t]
              and the id fed back next step.
A last phase copies the final h back to the caller's array. Sampling the end token (eos_id)
resets the state: the next step reads the old h and c as zeros.

Dot products: a group of `lanes` threads (a warp on a GPU) takes one row at a time, each lane
summing a strided share of the columns (coalesced loads) into shared memory; after one block
barrier a thread per row adds its lanes' partial sums in lane order. No atomics: the same
launch shape gives the same bits every run.

Where the cooperative grid cannot be had (the simulator runs one block per cooperative grid,
having no grid barrier; a GPU may not hold the grid at once or may fail to build the
kernel), the same phase code runs as one launch per phase ("stepwise") on any number of
blocks, the launch boundaries doing the barriers' work.

Weights stream from global memory in float32 or float64 (h's dtype); the float16-as-uint16
weights that the CPU kernels take are refused.

Dimension letters: L=layers, H=hidden, G=gate blocks, V=vocab, n=steps, U=units per block.
"""

from __future__ import annotations

import math

import numba
import numpy as np
from numba import cuda

from charrnn.config import GATES
from charrnn.kernels import cuda as ck
from charrnn.kernels.cuda import _draw, _gru_cell, _lstm_cell

GEN_THREADS = 256  # block size (8 warps: 8 gate rows in flight per block)
GEN_LANES = 32  # threads per dot product (a warp: its loads of one row coalesce)

_KERNELS: dict = {}  # (cell, dtype) -> (cooperative kernel, one-phase kernel)
_PLANS: dict = {}  # launch key -> (U, blocks, cooperative)
FALLBACKS: dict = {}  # (cell, dtype, H) -> why the cooperative kernel was not used


class GenerateUnavailable(ValueError):
    """This model cannot sample on the GPU this way (its vectors outgrow shared memory):
    use the per-character path (one model.forward per character)."""


def _shared_items(H: int, G: int, U: int, lanes: int) -> int:
    """Shared floats per block: old h and the layer's input (H each), the block's input and
    recurrent products (G*U each), and the lanes' partial sums of those 2*G*U dot products."""
    return 2 * H + 2 * G * U * (1 + lanes)


def unavailable(H: int, G: int, dtype, lanes: int = 0) -> str:
    """Why generate_ids cannot run a model of hidden size H ('' when it can)."""
    need = _shared_items(H, G, 1, lanes or GEN_LANES) * np.dtype(dtype).itemsize
    if need > ck.SMEM_LIMIT:
        return (f"GPU sampling: hidden size {H} needs {need} bytes of shared memory per block "
                f"(SMEM_LIMIT={ck.SMEM_LIMIT})")
    return ""


@cuda.jit(device=True)
def _row_dots(wa, wb, sm, offa, offb, lane, lanes, zero):
    """(sum of wa[i] * sm[offa + i], the same of wb at offb) over i = lane, lane + lanes, ...
    < len(wa), each in that order. Batch-1 sampling is latency-bound (a warp per row, rows
    read from L2), so eight loads of each row are issued before their products: 16 in flight
    a lane, not one load waited for at a time. wb may be wa (one row wanted)."""
    H = wa.shape[0]
    a = zero
    b = zero
    i = lane
    while i + 7 * lanes < H:
        a0, a1, a2, a3 = wa[i], wa[i + lanes], wa[i + 2 * lanes], wa[i + 3 * lanes]
        a4, a5, a6, a7 = wa[i + 4 * lanes], wa[i + 5 * lanes], wa[i + 6 * lanes], wa[i + 7 * lanes]
        b0, b1, b2, b3 = wb[i], wb[i + lanes], wb[i + 2 * lanes], wb[i + 3 * lanes]
        b4, b5, b6, b7 = wb[i + 4 * lanes], wb[i + 5 * lanes], wb[i + 6 * lanes], wb[i + 7 * lanes]
        for q, x, y in ((0, a0, b0), (1, a1, b1), (2, a2, b2), (3, a3, b3), (4, a4, b4),
                        (5, a5, b5), (6, a6, b6), (7, a7, b7)):
            a += x * sm[offa + i + q * lanes]
            b += y * sm[offb + i + q * lanes]
        i += 8 * lanes
    while i < H:
        a += wa[i] * sm[offa + i]
        b += wb[i] * sm[offb + i]
        i += lanes
    return a, b


def _kernels(cell: str, dtype):
    """(cooperative, one_phase) kernels for cell and dtype, built once per process (the
    cell's branches and the shared-memory dtype are compile-time constants)."""
    key = (cell, np.dtype(dtype).str)
    if key in _KERNELS:
        return _KERNELS[key]
    G = GATES[cell]
    LSTM, GRU = cell == "lstm", cell == "gru"
    smem_type = numba.from_dtype(np.dtype(dtype))

    @cuda.jit(device=True)
    def layer(k, t, cur, reset, sm, table, w_ih, b_ih, w_hh, b_hh, h, c, residual, U, lanes,
              hbuf, ys):
        """Layer k of step t for this block's units (module docstring)."""
        H = h.shape[1]
        one = ys.dtype.type(1)
        zero = one - one
        tid, nt = cuda.threadIdx.x, cuda.blockDim.x
        groups = nt // lanes
        grp = tid // lanes
        lane = tid - grp * lanes
        j0 = cuda.blockIdx.x * U
        Uk = max(0, min(U, H - j0))  # the last block may own fewer (a spare block none)
        if Uk == 0:
            return
        p = t % 2  # hbuf[p] holds step t-1's h; this step writes hbuf[1-p]
        XV = H  # sm offsets: [0,H) old h; [H,2H) input x; then the products; the partials
        XS = 2 * H
        HP = XS + G * U
        PART = HP + G * U  # (2, G*U, lanes): recurrent, then input products' partial sums
        PX = G * U * lanes
        rows = G * Uk  # block row lr = q*Uk + jj is gate row q*H + j0 + jj
        for i in range(tid, H, nt):
            if reset:
                sm[i] = zero
            elif t == 0:
                sm[i] = h[k, i]
            else:
                sm[i] = hbuf[p, k, i]
            if k > 0:
                sm[XV + i] = ys[k - 1, i]
        if k == 0:  # layer 0's input projection is a row of the table
            for lr in range(tid, rows, nt):
                q = lr // Uk
                sm[XS + lr] = table[cur, q * H + j0 + lr - q * Uk]
        cuda.syncthreads()
        # Every row's partial sums kept apart, then added in lane order: two block barriers
        # for all the block's rows, whatever their number.
        if grp < groups:
            for lr in range(grp, rows, groups):
                q = lr // Uk
                r = q * H + j0 + lr - q * Uk
                ah, ax = _row_dots(w_hh[k, r], w_ih[k - 1, r] if k > 0 else w_hh[k, r], sm, 0,
                                   XV, lane, lanes, zero)
                sm[PART + lr * lanes + lane] = ah
                sm[PART + PX + lr * lanes + lane] = ax
        cuda.syncthreads()
        for lr in range(tid, rows, nt):
            sh = zero
            sx = zero
            for i in range(lr * lanes, lr * lanes + lanes):
                sh += sm[PART + i]
                sx += sm[PART + PX + i]
            sm[HP + lr] = sh
            if k > 0:
                q = lr // Uk
                sm[XS + lr] = sx + b_ih[k - 1, q * H + j0 + lr - q * Uk]
        cuda.syncthreads()
        for jj in range(tid, Uk, nt):
            j = j0 + jj
            x0 = XS + jj  # gate q's input product at x0 + q*Uk, recurrent at x0 + G*U + q*Uk
            r0 = HP + jj
            if LSTM:
                cp = zero if reset else c[k, j]
                _, _, _, _, cc, hh = _lstm_cell(  # gates: not kept
                    sm[x0] + sm[r0] + b_hh[k, j],
                    sm[x0 + Uk] + sm[r0 + Uk] + b_hh[k, H + j],
                    sm[x0 + 2 * Uk] + sm[r0 + 2 * Uk] + b_hh[k, 2 * H + j],
                    sm[x0 + 3 * Uk] + sm[r0 + 3 * Uk] + b_hh[k, 3 * H + j], cp, one)
                c[k, j] = cc  # only this block touches unit j's c: updated in place
            elif GRU:
                hnv = sm[r0 + 2 * Uk] + b_hh[k, 2 * H + j]
                _, _, _, hh = _gru_cell(sm[x0], sm[x0 + Uk], sm[x0 + 2 * Uk],
                                        sm[r0] + b_hh[k, j], sm[r0 + Uk] + b_hh[k, H + j],
                                        hnv, sm[j], one)
            else:
                hh = math.tanh(sm[x0] + sm[r0] + b_hh[k, j])
            hbuf[1 - p, k, j] = hh
            ys[k, j] = hh + sm[XV + j] if (residual and k > 0) else hh

    @cuda.jit(device=True)
    def decoder(sm, dec_w, dec_b, U, lanes, ys, logits):
        """logits (V,) = dec_w @ ys[L-1] + dec_b, the rows shared by all blocks."""
        L, H = ys.shape
        V = dec_b.shape[0]
        zero = ys.dtype.type(0)
        tid, nt = cuda.threadIdx.x, cuda.blockDim.x
        groups = nt // lanes
        grp = tid // lanes
        lane = tid - grp * lanes
        XV = H
        PART = 2 * H + 2 * G * U  # the layers' layout: room for R rows' partial sums
        R = G * U
        for i in range(tid, H, nt):
            sm[XV + i] = ys[L - 1, i]
        cuda.syncthreads()
        first = cuda.blockIdx.x * R  # rows [first, first + R) of each pass are this block's
        for base in range(0, V, cuda.gridDim.x * R):
            rows = max(0, min(R, V - base - first))
            if grp < groups:
                for lr in range(grp, rows, groups):
                    v = base + first + lr
                    a, _ = _row_dots(dec_w[v], dec_w[v], sm, XV, XV, lane, lanes, zero)
                    sm[PART + lr * lanes + lane] = a
            cuda.syncthreads()
            for lr in range(tid, rows, nt):
                v = base + first + lr
                s = zero
                for i in range(lr * lanes, lr * lanes + lanes):
                    s += sm[PART + i]
                logits[v] = s + dec_b[v]
            cuda.syncthreads()

    @cuda.jit(device=True)
    def finish(h, c, eos_id, U, hbuf, tok, n):
        """The final state into the caller's h (c is already in place); zero after an end token."""
        L, H = h.shape
        zero = hbuf.dtype.type(0)
        j0 = cuda.blockIdx.x * U
        Uk = max(0, min(U, H - j0))
        reset = tok[0] == eos_id
        p = n % 2
        for idx in range(cuda.threadIdx.x, L * Uk, cuda.blockDim.x):
            k = idx // Uk
            j = j0 + idx - k * Uk
            h[k, j] = zero if reset else hbuf[p, k, j]
            if LSTM and reset:
                c[k, j] = zero

    @cuda.jit(device=True)
    def phase(s, sm, table, w_ih, b_ih, w_hh, b_hh, dec_w, dec_b, h, c, start_id, temperature,
              top_k, top_p, u, eos_id, out, residual, U, lanes, hbuf, ys, logits, tok, work):
        """Phase s of the loop: step t = s // (L+2); layer k < L, decoder (L), sample (L+1);
        s = n*(L+2) writes the final state back."""
        L = h.shape[0]
        n = u.shape[0]
        t = s // (L + 2)
        ph = s - t * (L + 2)
        if t == n:
            finish(h, c, eos_id, U, hbuf, tok, n)
        elif ph < L:
            cur = start_id if t == 0 else tok[0]
            reset = t > 0 and cur == eos_id
            layer(ph, t, cur, reset, sm, table, w_ih, b_ih, w_hh, b_hh, h, c, residual, U,
                  lanes, hbuf, ys)
        elif ph == L:
            decoder(sm, dec_w, dec_b, U, lanes, ys, logits)
        elif cuda.blockIdx.x == 0:
            pick = _draw(logits, temperature, top_k, top_p, u[t], work, 0)
            if cuda.threadIdx.x == 0:
                out[t] = pick
                tok[0] = pick

    @cuda.jit
    def cooperative(table, w_ih, b_ih, w_hh, b_hh, dec_w, dec_b, h, c, start_id, temperature,
                    top_k, top_p, u, eos_id, out, residual, U, lanes, hbuf, ys, logits, tok,
                    work, s0, s1):
        """Phases s0..s1-1, a grid barrier between consecutive ones."""
        sm = cuda.shared.array(0, smem_type)
        grid = cuda.cg.this_grid()
        for s in range(s0, s1):
            if s > s0:
                grid.sync()
            phase(s, sm, table, w_ih, b_ih, w_hh, b_hh, dec_w, dec_b, h, c, start_id,
                  temperature, top_k, top_p, u, eos_id, out, residual, U, lanes, hbuf, ys,
                  logits, tok, work)

    @cuda.jit
    def one_phase(table, w_ih, b_ih, w_hh, b_hh, dec_w, dec_b, h, c, start_id, temperature,
                  top_k, top_p, u, eos_id, out, residual, U, lanes, hbuf, ys, logits, tok,
                  work, s):
        """Phase s alone: no grid group, so an ordinary launch of any grid size."""
        sm = cuda.shared.array(0, smem_type)
        phase(s, sm, table, w_ih, b_ih, w_hh, b_hh, dec_w, dec_b, h, c, start_id, temperature,
              top_k, top_p, u, eos_id, out, residual, U, lanes, hbuf, ys, logits, tok, work)

    _KERNELS[key] = (cooperative, one_phase)
    return _KERNELS[key]


def _plan(cooperative, args, key, G: int, H: int, itemsize: int, units: int, threads: int,
          lanes: int, stepwise: bool):
    """(U, blocks, cooperative?): the fewest units per block (the most blocks) whose
    ceil(H/U) blocks the GPU holds at once, but at least a gate row for each dot-product
    group (U >= groups / G); units forces U. Stepwise (asked for, or where the cooperative
    grid cannot be had): that smallest U on ceil(H/U) blocks, any number of them."""
    fits = lambda U: _shared_items(H, G, U, lanes) * itemsize <= ck.SMEM_LIMIT
    U0 = min(H, units or max(1, (threads // lanes) // G))
    while not fits(U0) and U0 > 1:
        U0 -= 1
    if stepwise:
        return U0, -(-H // U0), False
    key = (*key, ck._kinds(args), ck.SMEM_LIMIT)
    if key in _PLANS:
        return _PLANS[key]
    sig = () if ck.SIM else tuple(numba.typeof(ck._dev(a)) for a in args)  # occupancy: compiled code's
    if ck.SIM:  # one block per cooperative grid: no grid barrier in the simulator
        def max_blocks(U):
            return cooperative.overloads[None].max_cooperative_grid_blocks(threads)
    else:
        try:  # a cooperative kernel links libcudadevrt, which a CUDA install may lack
            compiled = cooperative.compile(sig)
        except Exception as e:  # noqa: BLE001 - any build failure: the stepwise launches
            FALLBACKS[key[:3]] = f"cooperative generation kernel could not be built: {e}"
            _PLANS[key] = (U0, -(-H // U0), False)
            return _PLANS[key]

        def max_blocks(U):
            return compiled.max_cooperative_grid_blocks(
                threads, _shared_items(H, G, U, lanes) * itemsize)
    plan = None
    U = U0 if units else max(U0, -(-H // max(1, max_blocks(U0))))
    while U <= H and fits(U):
        if -(-H // U) <= max_blocks(U):
            plan = (U, -(-H // U), True)
            break
        if units:
            break
        U += 1
    if plan is None:
        FALLBACKS[key[:3]] = (f"H={H} (G={G}) needs more co-resident blocks of {threads} "
                              "threads than this GPU holds at once")
        plan = (U0, -(-H // U0), False)
    _PLANS[key] = plan
    return plan


def _buffer(shape, dtype):
    """Scratch on the device (numpy under the simulator)."""
    return np.zeros(shape, dtype) if ck.SIM else cuda.device_array(shape, dtype)


def generate_ids(cell, residual, table, w_ih, b_ih, w_hh, b_hh, dec_w, dec_b, h, c, start_id,
                 temperature, top_k, top_p, u, eos_id, out, units=0, threads=0, lanes=0,
                 stepwise=False):
    """Batch-1 generation: feed start_id, then each sampled id, for len(u) steps.

    The arguments are reference.generate_ids', as device arrays (numpy under the simulator):
    table (V,G*H); w_ih (L-1,G*H,H); b_ih (L-1,G*H); w_hh (L,G*H,H); b_hh (L,G*H);
    dec_w (V,H); dec_b (V,); h (L,H) and c (L,H) (LSTM; else unused, any shape) updated in
    place; u (n,) float64 uniforms; out (n,) int64 ids. Weights float32 or float64 (not
    float16 bits). units: hidden units per block (0: planned); threads: block size
    (0: GEN_THREADS); lanes: threads per dot product (0: GEN_LANES, at most threads).
    stepwise: one launch per phase on ceil(H/U) blocks, as when the cooperative grid
    cannot be had (FALLBACKS says why it could not).
    Raises GenerateUnavailable (before launching anything) when H is too large."""
    for name, w in (("w_ih", w_ih), ("w_hh", w_hh), ("dec_w", dec_w)):
        if np.dtype(w.dtype) == np.uint16:
            raise ValueError(f"{name}: float16 weights (uint16 bits) sample on the CPU; the "
                             "GPU path streams float32 or float64")
    L, H = h.shape
    V, GH = table.shape
    G = GATES[cell]
    if GH != G * H:
        raise ValueError(f"table: expected {G * H} columns for {cell} with H={H}, got {GH}")
    if start_id < 0 or start_id >= V:
        raise IndexError("start id out of range of the table's rows")
    n = u.shape[0]
    if n == 0:
        return
    threads = threads or GEN_THREADS
    lanes = lanes or min(GEN_LANES, threads)
    if not 1 <= lanes <= threads:
        raise ValueError(f"lanes must be in [1, threads={threads}], got {lanes}")
    why = unavailable(H, G, h.dtype, lanes)
    if why:
        raise GenerateUnavailable(why)
    dt = np.dtype(h.dtype)
    cooperative, one_phase = _kernels(cell, dt)
    d2, d3 = ck._dummy(h, 2), ck._dummy(h, 3)
    hbuf = _buffer((2, L, H), dt)  # (2,L,H) double-buffered h
    ys = _buffer((L, H), dt)  # (L,H) each layer's output (h, plus its input if residual)
    logits = _buffer((V,), dt)  # (V,)
    tok = _buffer((1,), np.int64)  # the id drawn last step
    work = _buffer((2 * V,), np.float64)  # _draw's ids and probabilities
    args = [table, w_ih if L > 1 else d3, b_ih if L > 1 else d2,
            w_hh, b_hh, dec_w, dec_b, h,
            c if cell == "lstm" else d2, int(start_id), float(temperature),
            int(top_k), float(top_p), u, int(eos_id), out,
            1 if residual else 0, 1, lanes, hbuf, ys, logits, tok, work]
    key = (cell, dt.str, H, L, V, G, units, threads, lanes)
    U, nb, coop = _plan(cooperative, [*args, 0, 1], key, G, H, dt.itemsize, units, threads,
                        lanes, bool(stepwise))
    args[17] = U
    smem = _shared_items(H, G, U, lanes) * dt.itemsize
    phases = n * (L + 2) + 1
    if coop:
        ck._run(cooperative, nb, threads, smem, *args, 0, phases)
    else:
        for s in range(phases):
            ck._run(one_phase, nb, threads, smem, *args, s)
