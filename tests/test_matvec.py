"""The row dot products of batch-1 generation (charrnn/kernels/matvec.py), against float64
numpy, on fresh random inputs of several shapes and all three weight types."""

import numpy as np
import pytest
from numba.core.errors import TypingError

from charrnn.kernels.matvec import ROWS, STEP, rows_dot

# K: all tail (< STEP), one step exactly, steps and a tail, generation's 128; rows: one, a
# rest only, one block exactly, blocks and a rest.
SHAPES = [(1, 7), (3, 16), (4, 33), (9, 128), (13, 50)]
WEIGHTS = ["float32", "float64", "float16"]
# |error| / sum |w x|: 16 partial sums in float32; float16 weights are widened exactly.
REL = {"float32": 2e-7, "float64": 1e-15, "float16": 2e-7}


def _case(R, K, weights, seed):
    """(W as rows_dot takes it, W as float64, x) for random rows."""
    rng = np.random.default_rng(seed)
    w64 = rng.standard_normal((R, K))
    x = rng.standard_normal(K).astype(np.float64 if weights == "float64" else np.float32)
    if weights == "float16":
        half = w64.astype(np.float16)
        return half.view(np.uint16), half.astype(np.float64), x
    W = w64.astype(weights)
    return W, W.astype(np.float64), x


@pytest.mark.parametrize("weights", WEIGHTS)
@pytest.mark.parametrize("R,K", SHAPES)
def test_rows_dot_matches_numpy(R, K, weights):
    W, w64, x = _case(R, K, weights, R * 100 + K)
    y = np.full(R + 5, np.nan, x.dtype)
    rows_dot(W, 0, R, x, y, 2)
    want = w64 @ x.astype(np.float64)
    bound = np.abs(w64) @ np.abs(x.astype(np.float64))
    assert np.all(np.abs(y[2:2 + R] - want) <= REL[weights] * bound + 1e-30)
    assert np.isnan(y[:2]).all() and np.isnan(y[2 + R:]).all()  # nothing outside its rows


def test_shapes_cover_steps_tails_and_row_blocks():
    assert {K // STEP > 0 for _, K in SHAPES} == {False, True}
    assert {K % STEP == 0 for _, K in SHAPES} == {False, True}
    assert {R // ROWS > 0 for R, _ in SHAPES} == {False, True}
    assert {R % ROWS == 0 for R, _ in SHAPES} == {False, True}


@pytest.mark.parametrize("weights", WEIGHTS)
def test_a_rows_bits_do_not_depend_on_the_row_blocking(weights):
    """Generation's work items cut the rows anywhere; a row must sum the same way in a
    block of ROWS as alone (the same bits on any number of threads)."""
    R, K = 11, 70
    W, _, x = _case(R, K, weights, 3)
    whole = np.empty(R, x.dtype)
    rows_dot(W, 0, R, x, whole, 0)
    for cut in range(1, R):
        parts = np.empty(R, x.dtype)
        rows_dot(W, 0, cut, x, parts, 0)
        rows_dot(W, cut, R, x, parts, cut)
        np.testing.assert_array_equal(parts, whole)
    # float16 bits are read as float16: the same as float32 weights rounded to float16
    if weights == "float16":
        as32 = np.empty(R, x.dtype)
        rows_dot(W.view(np.float16).astype(np.float32), 0, R, x, as32, 0)
        np.testing.assert_array_equal(as32, whole)


def test_rows_dot_refuses_shapes_it_would_read_past():
    W, _, x = _case(6, 20, "float32", 0)
    y = np.zeros(6, np.float32)
    for args in [(W, 0, 6, x[:19], y, 0), (W, 0, 7, x, y, 0), (W, 3, 2, x, y, 0),
                 (W, 0, 6, x, y, 1), (W, -1, 2, x, y, 0)]:
        with pytest.raises(ValueError, match="rows_dot"):
            rows_dot(*args)


def test_rows_dot_refuses_strided_arrays_at_typing():
    W, _, x = _case(6, 40, "float32", 1)
    with pytest.raises(TypingError):
        rows_dot(W[:, ::2], 0, 6, x[::2], np.zeros(6, np.float32), 0)
