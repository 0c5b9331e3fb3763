"""The CPU atomics that let generate_ids' threads share work (charrnn/kernels/atomics.py)."""

import numpy as np
from numba import njit, prange

from charrnn.kernels import atomics


@njit(cache=True)
def _one_of_each(a):
    """(add's old value, cas that matches, cas that does not, load) on a[1]."""
    old = atomics.add(a, 1, 5)
    hit = atomics.cas(a, 1, old + 5, 40)
    miss = atomics.cas(a, 1, 7, 99)
    return old, hit, miss, atomics.load(a, 1)


def test_each_operation_does_what_it_says():
    a = np.array([0, 3, 0], np.int64)
    assert _one_of_each(a) == (3, True, False, 40)
    assert a.tolist() == [0, 40, 0]


@njit(cache=True, parallel=True)
def _count(c, n, threads):
    # every thread claims n tickets by compare-and-swap, and counts them with add
    for p in prange(threads):
        for i in range(n):
            while True:
                v = atomics.load(c, 0)
                if atomics.cas(c, 0, v, v + 1):
                    break
            atomics.add(c, 16, 1)


def test_no_increment_is_lost_between_threads():
    """Four threads claim tickets at once (on two or more cores): every claim and every
    count lands, none twice."""
    c = np.zeros(32, np.int64)
    _count(c, 200_000, 4)
    assert c[0] == 800_000 and c[16] == 800_000


@njit(cache=True)
def _wait_and_yield(a):
    atomics._yield_cpu()  # the call a long wait makes: its symbol resolves, it returns
    atomics.wait_at_least(a, 0, 3)  # reached already: returns at once
    return atomics.load(a, 0)


def test_a_wait_that_is_over_returns_and_yielding_runs():
    assert _wait_and_yield(np.array([3, 0], np.int64)) == 3
