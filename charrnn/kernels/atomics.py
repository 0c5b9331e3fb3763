"""Atomic operations on int64 array elements for numba CPU code (numba offers atomics only on
CUDA). They let threads of one parallel region hand work to each other without a new region
per step: `cpu.generate_ids` claims work items and waits for a phase to finish with them.

Each is one LLVM atomic instruction on the element's address: `load` (acquire), `add`
(acq_rel; returns the old value) and `cas` (compare and swap, acq_rel; True if it swapped).
Acquire/release order the ordinary loads and stores around them too: what a thread wrote
before an `add` is visible to a thread whose `load` then sees the new count. No bounds
checks: callers index fixed small counter arrays.
"""

from __future__ import annotations

from numba import types
from numba.core import cgutils
from numba.extending import intrinsic


def _typed(a, i) -> bool:
    return (isinstance(a, types.Array) and a.dtype == types.int64 and a.ndim == 1
            and isinstance(i, types.Integer))


def _pointer(context, builder, sig, args):
    """Address of a[i] for (a, i, ...) arguments."""
    aryty = sig.args[0]
    ary = context.make_array(aryty)(context, builder, args[0])
    i = context.cast(builder, args[1], sig.args[1], types.intp)
    return cgutils.get_item_pointer(context, builder, aryty, ary, [i], wraparound=False)


def _int64(context, builder, sig, args, n):
    return context.cast(builder, args[n], sig.args[n], types.int64)


@intrinsic
def load(typingctx, a, i):
    """a[i], read atomically with acquire order."""
    if not _typed(a, i):
        return None

    def codegen(context, builder, sig, args):
        return builder.load_atomic(_pointer(context, builder, sig, args), "acquire", 8)

    return types.int64(a, i), codegen


@intrinsic
def add(typingctx, a, i, v):
    """a[i] += v atomically; returns the value before."""
    if not (_typed(a, i) and isinstance(v, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        return builder.atomic_rmw("add", _pointer(context, builder, sig, args),
                                  _int64(context, builder, sig, args, 2), "acq_rel")

    return types.int64(a, i, v), codegen


@intrinsic
def cas(typingctx, a, i, expected, new):
    """If a[i] == expected, set it to new, atomically; True if it did."""
    if not (_typed(a, i) and isinstance(expected, types.Integer)
            and isinstance(new, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        pair = builder.cmpxchg(_pointer(context, builder, sig, args),
                               _int64(context, builder, sig, args, 2),
                               _int64(context, builder, sig, args, 3), "acq_rel", "acquire")
        return builder.extract_value(pair, 1)

    return types.boolean(a, i, expected, new), codegen
