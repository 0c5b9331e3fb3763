"""The packed-panel products behind the cpu window kernels (charrnn/kernels/panels.py),
against float64 numpy, on fresh random inputs of several shapes."""

import numpy as np
import pytest
from numba import njit
from numba.core.errors import TypingError

from charrnn.kernels.panels import MR, NR, pack_cols, pack_rows, panel_product


@njit(cache=True)
def _all_panels(A, P, C):
    """C (M, G*Q*NR) = A @ every panel, gate blocks Q*NR apart."""
    Q, G = P.shape[0], P.shape[1]
    for q in range(Q):
        for j in range(G):
            panel_product(A, P, q, j, C, j * Q * NR + q * NR)


# Rows: below, at and past one micro-kernel block (MR=6), with every remainder 1..5 among
# them; columns: a partial panel, whole panels, whole plus partial.
SHAPES = [(1, 5, 1, 3), (5, 33, 3, 20), (6, 16, 4, 16), (13, 128, 4, 48), (64, 70, 1, 37), (9, 9, 2, 100),
          (8, 1, 1, 17)]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("M,K,G,N", SHAPES)
def test_products_against_packed_rows_match_numpy(M, K, G, N, dtype):
    assert {M % MR for M, *_ in SHAPES} == set(range(MR))
    rng = np.random.default_rng(M * 1000 + K)
    A = rng.standard_normal((M, K)).astype(dtype)
    W = rng.standard_normal((G * N, K)).astype(dtype)  # row j*N + n: output n of gate j
    P = pack_rows(W, G)
    Q = P.shape[0]
    assert P.shape == (Q, G, K, NR) and Q * NR >= N > (Q - 1) * NR
    C = np.full((M, G * Q * NR), np.nan, dtype)
    _all_panels(A, P, C)
    got = C.reshape(M, G, Q * NR)[:, :, :N].reshape(M, G * N)
    want = A.astype(np.float64) @ W.T.astype(np.float64)
    tol = 1e-5 if dtype == np.float32 else 1e-13
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * np.sqrt(K))
    # padding columns are products with zero weights
    assert np.all(C.reshape(M, G, Q * NR)[:, :, N:] == 0)


@pytest.mark.parametrize("K,N", [(7, 3), (40, 16), (64, 50)])
def test_packed_columns_give_x_times_w(K, N):
    rng = np.random.default_rng(K + N)
    A = rng.standard_normal((9, K)).astype(np.float32)
    W = rng.standard_normal((K, N)).astype(np.float32)
    P = pack_cols(W)
    C = np.empty((9, P.shape[0] * NR), np.float32)
    _all_panels(A, P, C)
    np.testing.assert_allclose(C[:, :N], A.astype(np.float64) @ W, rtol=1e-5, atol=1e-5)
    # the transposed view packs like its copy
    np.testing.assert_array_equal(pack_cols(W.T.copy().T), P)


def test_products_refuse_arrays_that_are_not_c_contiguous():
    """The micro-kernel addresses rows by shape: a strided view must not type-check."""
    A = np.ones((8, 12), np.float32)
    P = pack_rows(np.ones((16, 6), np.float32), 1)
    with pytest.raises(TypingError):
        _all_panels(A[:, ::2], P, np.empty((8, 16), np.float32))


def test_products_refuse_shapes_that_disagree():
    """A mismatch must raise, not read or write past an array (the micro-kernels use raw
    addresses)."""
    A = np.ones((8, 12), np.float32)
    P = pack_rows(np.ones((16, 12), np.float32), 1)  # (1, 1, 12, 16)
    with pytest.raises(ValueError):
        panel_product(A[:, :10].copy(), P, 0, 0, np.empty((8, 16), np.float32), 0)  # K 10 vs 12
    with pytest.raises(ValueError):
        panel_product(A, P, 0, 0, np.empty((8, 20), np.float32), 8)  # columns 8..23 of 20
    with pytest.raises(ValueError):
        panel_product(A, P, 0, 0, np.empty((7, 16), np.float32), 0)  # 8 rows into 7
    with pytest.raises(IndexError):
        panel_product(A, P, 1, 0, np.empty((8, 16), np.float32), 0)
