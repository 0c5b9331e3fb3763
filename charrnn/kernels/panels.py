"""Matrix products against packed weight panels: the recurrent product of every time step.

A step multiplies a small state (B rows, B ~ 64) by the same weight matrix T times a window.
OpenBLAS repacks that matrix on every call and splits each call across threads on its own;
here the weights are packed once per window into panels of NR = 16 output columns,

  P (Q, G, K, NR): P[q, j, k, l] = W[j*N + NR*q + l, k]  (zero where NR*q + l >= N)

for W (G*N, K), whose row j*N + n is output column n of gate block j (`pack_rows`; `pack_cols`
packs a matrix's columns instead); so a thread that owns
column block q computes every gate of those NR units and can run the cell update for them
in the same parallel region (see `cpu.py`'s window kernels).

The inner kernel (`_micro_*`) is written in LLVM IR: MR rows x NR columns of accumulators
stay in vector registers (2 x MR ymm for float32) across the whole k loop, with one fused
multiply-add per 8 products. numba's own code for the same loops kept the accumulators in
memory (3-4 GFLOP/s); this runs at ~75-85 GFLOP/s on one core of the 2-core AVX2 machine,
where OpenBLAS's sgemm gets ~63-67 at these shapes ((64 x 512) @ (512 x 2048) and smaller).

Every output element is one dot product in k order, fused multiply-adds from zero; it does
not depend on which thread computes it or on the row blocking, so results are the same
bits on any thread count (the trainer's bit-exact resume relies on that).

Dimension letters: M=rows of A, K=inner, N=output columns per gate block, G=gate blocks,
Q=ceil(N/NR) column blocks, MR=rows per micro-kernel call.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

NR = 16  # output columns per panel: two 8-lane float32 vectors
MR = 6  # rows per micro-kernel call: 2*MR accumulators + 2 panel vectors + 1 broadcast <= 16 ymm
_LANES = 8
_I64 = ir.IntType(64)
_I32 = ir.IntType(32)


@njit(cache=True)
def pack_rows(w, gates):
    """w (G*N, K), row j*N + n = output column n of gate block j -> panels (Q, G, K, NR) for
    products x @ w.T (the forward's h @ W_hh.T)."""
    GN, K = w.shape
    N = GN // gates
    Q = (N + NR - 1) // NR
    P = np.zeros((Q, gates, K, NR), w.dtype)
    for q in range(Q):
        for j in range(gates):
            dst = P[q, j]  # (K, NR)
            for l in range(min(NR, N - q * NR)):
                row = w[j * N + q * NR + l]
                for k in range(K):
                    dst[k, l] = row[k]
    return P


@njit(cache=True)
def pack_cols(w):
    """w (K, N) -> panels (Q, 1, K, NR) of its columns, for products x @ w (the backward's
    dL/dpre @ W_hh)."""
    K, N = w.shape
    Q = (N + NR - 1) // NR
    P = np.zeros((Q, 1, K, NR), w.dtype)
    for k in range(K):
        row = w[k]
        for q in range(Q):
            dst = P[q, 0, k]
            for l in range(min(NR, N - q * NR)):
                dst[l] = row[q * NR + l]
    return P


def _as_i64(builder, v):
    return builder.sext(v, _I64) if v.type.width < 64 else v


def fma(builder, vty):
    """LLVM's fused multiply-add over vectors of type vty."""
    suffix = "f32" if isinstance(vty.element, ir.FloatType) else "f64"
    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(vty, [vty, vty, vty]),
                                          f"llvm.fma.v{vty.count}{suffix}")


def sum_loop(builder, name, vty, sums, k_end, k_step, body):
    """Emits `for k in range(0, k_end, k_step)` (k_end a multiple of k_step) carrying `sums`
    vectors of type vty from zero; body(k, acc) emits one iteration and returns the new
    sums. Returns the sums after the loop (zero if it ran no iteration), with the builder
    after it. The loop of both micro-kernels: panels' and matvec's rows."""
    zero = ir.Constant(vty, [0.0] * vty.count)
    entry = builder.block
    loop = builder.append_basic_block(f"{name}.loop")
    done = builder.append_basic_block(f"{name}.done")
    builder.cbranch(builder.icmp_signed(">", k_end, ir.Constant(_I64, 0)), loop, done)

    builder.position_at_end(loop)
    k = builder.phi(_I64)
    k.add_incoming(ir.Constant(_I64, 0), entry)
    acc = []
    for _ in range(sums):
        phi = builder.phi(vty)
        phi.add_incoming(zero, entry)
        acc.append(phi)
    new = body(k, acc)
    k1 = builder.add(k, ir.Constant(_I64, k_step))
    tail = builder.block
    k.add_incoming(k1, tail)
    for phi, v in zip(acc, new):
        phi.add_incoming(v, tail)
    builder.cbranch(builder.icmp_signed("<", k1, k_end), loop, done)

    builder.position_at_end(done)
    outs = []
    for v in new:  # every phi first: LLVM wants them at the block's top
        out = builder.phi(vty)
        out.add_incoming(zero, entry)
        out.add_incoming(v, tail)
        outs.append(out)
    return outs


def _make_micro(mr: int):
    """An intrinsic C[i0:i0+mr, c0:c0+NR] = A[i0:i0+mr, :] @ P[q, j] (A (M,K), P (Q,G,K,NR),
    C (M,*): all C-contiguous, one dtype)."""

    @intrinsic
    def micro(typingctx, A, i0, P, q, j, C, c0):
        # The code below addresses rows by shape alone: C-contiguous arrays of one dtype only.
        arrays = (A, P, C)
        if any(not isinstance(a, types.Array) or a.layout != "C" or a.dtype != A.dtype for a in arrays):
            return None
        sig = types.void(A, i0, P, q, j, C, c0)

        def codegen(context, builder, signature, args):
            a = context.make_array(signature.args[0])(context, builder, args[0])
            p = context.make_array(signature.args[2])(context, builder, args[2])
            c = context.make_array(signature.args[5])(context, builder, args[5])
            i0v, qv, jv, c0v = (_as_i64(builder, args[k]) for k in (1, 3, 4, 6))
            fty = context.get_value_type(signature.args[0].dtype)
            vty = ir.VectorType(fty, _LANES)
            K = builder.extract_value(a.shape, 1)
            G = builder.extract_value(p.shape, 1)
            ldc = builder.extract_value(c.shape, 1)
            arow = builder.gep(a.data, [builder.mul(i0v, K)])
            panel = builder.mul(builder.add(builder.mul(qv, G), jv), builder.mul(K, ir.Constant(_I64, NR)))
            pbase = builder.gep(p.data, [panel])
            crow = builder.gep(c.data, [builder.add(builder.mul(i0v, ldc), c0v)])
            fmav = fma(builder, vty)
            undef = ir.Constant(vty, ir.Undefined)
            splat = ir.Constant(ir.VectorType(_I32, _LANES), [0] * _LANES)

            def step(k, acc):
                bp = builder.gep(pbase, [builder.mul(k, ir.Constant(_I64, NR))])
                b0 = builder.load(builder.bitcast(bp, vty.as_pointer()), align=4)
                b1 = builder.load(builder.bitcast(builder.gep(bp, [ir.Constant(_I64, _LANES)]), vty.as_pointer()), align=4)
                new = []
                for r in range(mr):
                    x = builder.load(builder.gep(arow, [builder.add(builder.mul(ir.Constant(_I64, r), K), k)]), align=4)
                    xv = builder.shuffle_vector(builder.insert_element(undef, x, ir.Constant(_I32, 0)), undef, splat)
                    new.append(builder.call(fmav, [xv, b0, acc[2 * r]]))
                    new.append(builder.call(fmav, [xv, b1, acc[2 * r + 1]]))
                return new

            outs = sum_loop(builder, "micro", vty, 2 * mr, K, 1, step)
            for i, out in enumerate(outs):
                r, h = divmod(i, 2)
                off = builder.add(builder.mul(ir.Constant(_I64, r), ldc), ir.Constant(_I64, _LANES * h))
                builder.store(out, builder.bitcast(builder.gep(crow, [off]), vty.as_pointer()), align=4)
            return context.get_dummy_value()

        return sig, codegen

    return micro


_micro_1, _micro_2, _micro_3, _micro_4, _micro_5, _micro_6 = (_make_micro(m) for m in range(1, MR + 1))


@njit(cache=True)
def panel_product(A, P, q, j, C, c0):
    """C[:, c0:c0+NR] = A @ P[q, j]: A (M,K); P (Q,G,K,NR) panels; C (M,>=c0+NR).
    Rows in blocks of MR, the last block by a kernel of its own size. A call, not inlined:
    compiled once per dtype instead of once per window kernel (its cost, ~10 ns, is lost in
    a panel's ~10 us)."""
    M = A.shape[0]
    # The micro-kernels read and write by raw address: a shape mismatch would not raise.
    if P.shape[2] != A.shape[1] or C.shape[0] < M or not (0 <= c0 <= C.shape[1] - NR):
        raise ValueError("panel_product: A (M,K), P (Q,G,K,NR) and C (>=M, >=c0+NR) disagree")
    if not (0 <= q < P.shape[0] and 0 <= j < P.shape[1]):
        raise IndexError("panel_product: no such panel")
    i = 0
    while i + MR <= M:
        _micro_6(A, i, P, q, j, C, c0)
        i += MR
    r = M - i
    if r == 5:
        _micro_5(A, i, P, q, j, C, c0)
    elif r == 4:
        _micro_4(A, i, P, q, j, C, c0)
    elif r == 3:
        _micro_3(A, i, P, q, j, C, c0)
    elif r == 2:
        _micro_2(A, i, P, q, j, C, c0)
    elif r == 1:
        _micro_1(A, i, P, q, j, C, c0)
