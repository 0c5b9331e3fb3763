"""Atomic operations on int64 array elements for numba CPU code (numba offers atomics only on
CUDA). They let threads of one parallel region share work without a new region per step:
`cpu.generate_ids` and the cpu window kernels claim work items with them and wait, with
`wait_at_least`, until a phase's items are all done.

Each is one LLVM atomic instruction on the element's address: `load` (acquire), `add`
(acq_rel; returns the old value) and `cas` (compare and swap, acq_rel; True if it swapped).
Acquire/release order the ordinary loads and stores around them too: what a thread wrote
before an `add` is visible to a thread whose `load` then sees the new count. No bounds
checks: callers index fixed small counter arrays.
"""

from __future__ import annotations

import sys

from llvmlite import ir
from numba import njit, types
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


@intrinsic
def _yield_cpu(typingctx):
    # sched_yield(2), resolved in the running process when the code is loaded; nothing on
    # Windows (no such call), where a waiting thread just spins.
    def codegen(context, builder, sig, args):
        if not sys.platform.startswith("win"):
            fn = cgutils.get_or_insert_function(builder.module,
                                                ir.FunctionType(ir.IntType(32), []), "sched_yield")
            builder.call(fn, [])
        return context.get_dummy_value()

    return types.void(), codegen


SPINS = 1 << 12  # tries before a waiting thread starts yielding its core (~0.1-0.4 ms here)


@njit(cache=True)
def wait_at_least(a, i, target):
    """Return once a[i] >= target (read with acquire order). A thread waits here for others
    to finish their share of a phase: it spins (the others are normally microseconds from
    done), and past SPINS tries gives its core up between tries, so a thread it waits for
    that shares the core (more threads than cores) gets to run."""
    tries = 0
    while load(a, i) < target:
        tries += 1
        if tries > SPINS:
            _yield_cpu()
