"""Row dot products for batch-1 generation: y[y0 + i] = W[r0 + i] . x.

Batch-1 sampling multiplies each weight matrix by one vector per character, so its speed is
how fast a core streams weight rows through fused multiply-adds. A numba loop per row (what
generate_ids had, vectorised by LLVM) reduces its partial sums and sets up again for every
row of 128: 512x128 float32 rows took 6.5 us on one core, 4.4 with this kernel (float16
4.3 -> 3.1; rows from L3 are bandwidth-bound either way). Here an LLVM-IR kernel takes ROWS
rows at once: each 16-element step loads x once for all of them and keeps
2 * ROWS vector accumulators in registers (independent chains, so the fused multiply-adds
do not wait on each other); float16 weights (uint16 bits) are widened 8 at a time.

Every row is summed the same way whichever kernel (ROWS rows or one) takes it: lanes of two
accumulators over alternate 8-element blocks, the two added, the lanes halved pairwise down
to one, then the K % 16 tail in order. So a row's bits do not depend on the row blocking or
on which thread computes it.

Dimension letters: R=rows of W, K=inner.
"""

from __future__ import annotations

from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from charrnn.kernels.panels import _I32, _I64, _as_i64, fma, sum_loop

ROWS = 4  # rows per kernel call: 2 * ROWS accumulators + 2 x vectors + 1 weight <= 16 ymm
LANES = 8
STEP = 2 * LANES  # elements of a row per loop iteration


def _weight_loader(builder, wty, fty):
    """(ptr to an element of W) -> its LANES elements as a vector of fty: float16 bits are
    widened exactly (fpext), floats loaded as they are."""
    vty = ir.VectorType(fty, LANES)
    if wty == types.uint16:
        raw = ir.VectorType(ir.IntType(16), LANES)
        half = ir.VectorType(ir.HalfType(), LANES)

        def load(ptr):
            bits = builder.load(builder.bitcast(ptr, raw.as_pointer()), align=2)
            return builder.fpext(builder.bitcast(bits, half), vty)
        return load
    return lambda ptr: builder.load(builder.bitcast(ptr, vty.as_pointer()), align=4)


def _lane_sum(builder, v, fty):
    """Sum of a vector's lanes, halving pairwise: (v[:n/2] + v[n/2:]) until one is left."""
    n = LANES
    while n > 1:
        h = n // 2
        lo = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_I32, h), list(range(h))))
        hi = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_I32, h), list(range(h, n))))
        v = builder.fadd(lo, hi)
        n = h
    return builder.extract_element(v, ir.Constant(_I32, 0))


def _make_rows(nrows: int):
    """An intrinsic y[y0 + i] = W[r0 + i, :kv] . x[:kv] for i < nrows, kv = K - K % STEP
    (W (R,K) float or uint16 float16 bits, x (K,) and y float, all C-contiguous)."""

    @intrinsic
    def rows(typingctx, W, r0, x, y, y0):
        if not all(isinstance(a, types.Array) and a.layout == "C" for a in (W, x, y)):
            return None
        if not (isinstance(x.dtype, types.Float) and y.dtype == x.dtype and W.ndim == 2
                and (W.dtype == x.dtype or (W.dtype == types.uint16 and x.dtype == types.float32))):
            return None
        sig = types.void(W, r0, x, y, y0)

        def codegen(context, builder, signature, args):
            w = context.make_array(signature.args[0])(context, builder, args[0])
            xa = context.make_array(signature.args[2])(context, builder, args[2])
            ya = context.make_array(signature.args[3])(context, builder, args[3])
            r0v, y0v = _as_i64(builder, args[1]), _as_i64(builder, args[4])
            fty = context.get_value_type(signature.args[2].dtype)
            vty = ir.VectorType(fty, LANES)
            load_w = _weight_loader(builder, signature.args[0].dtype, fty)
            K = builder.extract_value(w.shape, 1)
            kv = builder.sub(K, builder.srem(K, ir.Constant(_I64, STEP)))
            wrow = [builder.gep(w.data, [builder.mul(builder.add(r0v, ir.Constant(_I64, i)), K)])
                    for i in range(nrows)]
            fmav = fma(builder, vty)

            def step(k, acc):
                k8 = builder.add(k, ir.Constant(_I64, LANES))
                xs = [builder.load(builder.bitcast(builder.gep(xa.data, [kk]), vty.as_pointer()), align=4)
                      for kk in (k, k8)]
                new = []
                for i in range(nrows):
                    for h, kk in enumerate((k, k8)):
                        new.append(builder.call(fmav, [load_w(builder.gep(wrow[i], [kk])), xs[h],
                                                       acc[2 * i + h]]))
                return new

            outs = sum_loop(builder, "rows", vty, 2 * nrows, kv, STEP, step)
            for i in range(nrows):
                s = _lane_sum(builder, builder.fadd(outs[2 * i], outs[2 * i + 1]), fty)
                idx = builder.add(y0v, ir.Constant(_I64, i))
                builder.store(s, builder.gep(ya.data, [idx]))
            return context.get_dummy_value()

        return sig, codegen

    return rows


_rows_n, _rows_1 = _make_rows(ROWS), _make_rows(1)


@intrinsic
def widen(typingctx, v):
    """A weight as a float: float16 bits (uint16; numba has no float16 on the CPU) widened
    exactly to float32, a float as it is."""
    if v == types.uint16:
        def codegen(context, builder, sig, args):
            return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())
        return types.float32(v), codegen
    if isinstance(v, types.Float):
        return v(v), lambda context, builder, sig, args: args[0]
    return None


@njit(cache=True)
def rows_dot(W, r0, r1, x, y, y0):
    """y[y0 + i] = W[r0 + i] . x for i < r1 - r0, in x's dtype: W (R,K) float, or float16
    as its uint16 bits with x float32; x (K,); y (>= y0 + r1 - r0,). A call, not inlined:
    compiled once per dtype. Within ~1e-7 * sum |w x| of the exact value in float32 (16
    partial sums, then the tail)."""
    K = x.shape[0]
    # The kernels address rows by raw pointer: a shape mismatch would not raise.
    if W.shape[1] != K or not (0 <= r0 <= r1 <= W.shape[0]) or not (
            0 <= y0 and y0 + (r1 - r0) <= y.shape[0]):
        raise ValueError("rows_dot: W (R,K), x (K,) and y disagree")
    r = r0
    while r + ROWS <= r1:
        _rows_n(W, r, x, y, y0 + r - r0)
        r += ROWS
    while r < r1:
        _rows_1(W, r, x, y, y0 + r - r0)
        r += 1
    kv = K - K % STEP
    if kv < K:
        for i in range(r1 - r0):
            s = y[y0 + i]
            for k in range(kv, K):
                s += widen(W[r0 + i, k]) * x[k]
            y[y0 + i] = s
