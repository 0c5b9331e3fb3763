"""kernels/cuda_generate.py (batch-1 generation in one persistent kernel) against
reference.generate_ids, and sampler.generate on the CUDA backend, on tiny shapes.

Runs under numba's CUDA simulator (NUMBA_ENABLE_CUDASIM=1, as `make test` sets) or on a real
GPU. The simulator has no grid barrier, so, as in test_kernels_cuda.py, the kernel is tested
two ways: cooperatively on one block (the planned launch there: the whole loop with its grid
syncs), and with a forced number of units per block, which the simulator cannot hold as one
cooperative grid and so runs stepwise, one launch per phase, on several blocks (gate rows
sliced over blocks, h exchanged through global memory, decoder rows shared by all blocks).
On a GPU a forced grid that fits runs cooperatively. Blocks are 4 threads with 2 lanes per
dot product: two rows in flight per block, partial sums added across lanes.

The ids must be equal, not close (see test_sampler.py: rounding differences are far below
the gaps between cumulative probabilities that would flip a draw).

Dimension letters: L=layers, H=hidden, G=gate blocks, V=vocab, n=steps.
"""

import sys

import cuda_target
import numpy as np
import pytest

SIM = cuda_target.require()

from numba import cuda

from charrnn import sampler
from charrnn.backend import get_backend
from charrnn.config import ModelConfig, SampleConfig
from charrnn.cuda_backend import CudaBackend
from charrnn.kernels import cuda as ck
from charrnn.kernels import cuda_generate as cg
from charrnn.kernels import reference
from charrnn.model import CharRNN, init_params
from charrnn.vocab import Vocab

CELLS = ["lstm", "gru", "rnn"]
TOL = {np.float32: {"rtol": 1e-5, "atol": 2e-6}, np.float64: {"rtol": 1e-12, "atol": 1e-14}}
BLOCK = {"threads": 4, "lanes": 2}


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    monkeypatch.setattr(cg, "GEN_THREADS", 4)  # the sampler's launches
    monkeypatch.setattr(cg, "GEN_LANES", 2)
    monkeypatch.setattr(ck, "THREADS", 4)  # the CUDA backend's forward over a prime
    monkeypatch.setattr(ck, "PERSISTENT_THREADS", 8)


@pytest.fixture(autouse=True)
def quick_thread_switches():
    # The simulator's block manager spins, holding the GIL, until every thread of the block
    # reaches a barrier; a short switch interval hands the GIL to those threads sooner.
    before = sys.getswitchinterval()
    sys.setswitchinterval(5e-4)
    yield
    sys.setswitchinterval(before)


def _dev(a):
    """Host array -> kernel argument: itself under the simulator, a device copy on a GPU
    (an empty w_ih of a 1-layer model as is: the kernel never reads it)."""
    return a if SIM or a.size == 0 else cuda.to_device(a)


def _host(a):
    return a if isinstance(a, np.ndarray) else a.copy_to_host()


def _case(cell, layers, residual, H, V, seed, dtype=np.float32):
    """(cfg, generate_ids' weights, random h (L,H), random c (L,H)) of a fresh random model."""
    cfg = ModelConfig(cell=cell, vocab_size=V, embed=4, hidden=H, layers=layers,
                      residual=residual)
    model = CharRNN(cfg, init_params(cfg, seed))
    p = model.params
    w_ih, b_ih, w_hh, b_hh, dec_w = sampler._stacked_weights(model, np)
    w = (model.input_table(), w_ih, b_ih, w_hh, b_hh,
         dec_w * 3,  # sharper than at initialisation: draws depend on the state
         p["decoder.bias"])
    rng = np.random.default_rng(seed)
    h, c = (rng.standard_normal((2, layers, H)) * 0.5).astype(dtype)
    return cfg, tuple(a.astype(dtype) for a in w), h, c


def _run_reference(cfg, w, h, c, start, temperature, top_k, top_p, u, eos):
    """(ids, final h, final c) of reference.generate_ids, the inputs left untouched."""
    h, c = h.copy(), c.copy()
    out = np.full(len(u), -1, np.int64)
    reference.generate_ids(cfg.cell, cfg.residual, *w, h, c, start, temperature, top_k, top_p,
                           u, eos, out)
    return out, h, c


def _run_gpu(cfg, w, h, c, start, temperature, top_k, top_p, u, eos, **launch):
    """(ids, final h, final c) of cuda_generate.generate_ids on device copies."""
    d = [_dev(a.copy()) for a in (*w, h, c)]
    out = _dev(np.full(len(u), -1, np.int64))
    cg.generate_ids(cfg.cell, cfg.residual, *d, start, temperature, top_k, top_p, _dev(u), eos,
                    out, **{**BLOCK, **launch})
    return _host(out), _host(d[-2]), _host(d[-1])


def _assert_twins(got, want, cfg, c, tol):
    """Same ids drawn; final h (and c, LSTM) equal within tol; c left alone otherwise."""
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_allclose(got[1], want[1], **tol)
    if cfg.cell == "lstm":
        np.testing.assert_allclose(got[2], want[2], **tol)
    else:
        np.testing.assert_array_equal(got[2], c)


# ------------------------------------------------------------------ generate_ids twins


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("layers,residual", [(1, False), (2, False), (2, True)])
def test_generate_ids_matches_reference(cell, layers, residual):
    cfg, w, h, c = _case(cell, layers, residual, H=6, V=5, seed=layers + 2 * residual)
    u = np.random.default_rng(1).random(12)
    want = _run_reference(cfg, w, h, c, 1, 1.0, 0, 1.0, u, -1)
    got = _run_gpu(cfg, w, h, c, 1, 1.0, 0, 1.0, u, -1)
    assert len(set(want[0].tolist())) > 1  # the draws depend on u: a real comparison
    _assert_twins(got, want, cfg, c, TOL[np.float32])


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_several_blocks_with_end_tokens_match_reference(cell, dtype):
    """2 units per block: 4 blocks for H=7, the last owning one unit. The end token resets
    the state mid-run."""
    cfg, w, h, c = _case(cell, 2, True, H=7, V=4, seed=3, dtype=dtype)
    u = np.random.default_rng(2).random(12)
    eos = int(_run_reference(cfg, w, h, c, 1, 1.0, 0, 1.0, u, -1)[0][2])  # drawn by step 2
    want = _run_reference(cfg, w, h, c, 1, 1.0, 0, 1.0, u, eos)
    assert eos in want[0][:3]  # a reset happens, and steps follow it
    got = _run_gpu(cfg, w, h, c, 1, 1.0, 0, 1.0, u, eos, units=2)
    _assert_twins(got, want, cfg, c, TOL[dtype])


def test_stepwise_launches_match_reference():
    """The fallback's launches, asked for: one per phase on ceil(H/U) blocks."""
    cfg, w, h, c = _case("gru", 2, False, H=7, V=5, seed=8)
    u = np.random.default_rng(3).random(10)
    want = _run_reference(cfg, w, h, c, 0, 0.8, 0, 1.0, u, -1)
    got = _run_gpu(cfg, w, h, c, 0, 0.8, 0, 1.0, u, -1, units=3, stepwise=True)
    _assert_twins(got, want, cfg, c, TOL[np.float32])


@pytest.mark.parametrize("temperature,top_k,top_p", [
    (0.5, 0, 1.0), (1.7, 0, 1.0), (1.0, 3, 1.0), (1.0, 1, 1.0), (1.2, 0, 0.8), (0.8, 4, 0.6),
    (1.0, 0, 1e-9)])
def test_sampling_options_match_reference(temperature, top_k, top_p):
    cfg, w, h, c = _case("lstm", 1, False, H=5, V=7, seed=11)
    u = np.random.default_rng(4).random(10)
    want = _run_reference(cfg, w, h, c, 0, temperature, top_k, top_p, u, -1)
    got = _run_gpu(cfg, w, h, c, 0, temperature, top_k, top_p, u, -1)
    _assert_twins(got, want, cfg, c, TOL[np.float32])


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_an_end_token_as_last_draw_leaves_a_zero_state(cell):
    cfg, w, h, c = _case(cell, 2, False, H=5, V=4, seed=5)
    u = np.random.default_rng(5).random(12)
    eos = 3
    ends = np.flatnonzero(_run_reference(cfg, w, h, c, 0, 1.0, 0, 1.0, u, eos)[0] == eos)
    assert len(ends)
    got = _run_gpu(cfg, w, h, c, 0, 1.0, 0, 1.0, u[: ends[0] + 1], eos, units=2)
    assert got[0][-1] == eos
    assert not got[1].any() and (cell != "lstm" or not got[2].any())


def test_planned_launch_is_cooperative_and_a_grid_too_large_falls_back(monkeypatch):
    monkeypatch.setattr(cg, "FALLBACKS", {})
    monkeypatch.setattr(cg, "_PLANS", {})
    cfg, w, h, c = _case("rnn", 1, False, H=6, V=5, seed=1)
    u = np.random.default_rng(6).random(4)
    want = _run_reference(cfg, w, h, c, 2, 1.0, 0, 1.0, u, -1)
    _assert_twins(_run_gpu(cfg, w, h, c, 2, 1.0, 0, 1.0, u, -1), want, cfg, c, TOL[np.float32])
    assert not cg.FALLBACKS  # one cooperative launch took it
    if SIM:  # the simulator holds one block per cooperative grid: 6 blocks run stepwise
        _run_gpu(cfg, w, h, c, 2, 1.0, 0, 1.0, u, -1, units=1)
        assert "co-resident" in cg.FALLBACKS[("rnn", np.dtype(np.float32).str, 6)]


def test_generate_ids_rejects_what_it_cannot_run(monkeypatch):
    cfg, w, h, c = _case("lstm", 2, False, H=4, V=5, seed=0)
    u = np.zeros(3)
    half = tuple(a.astype(np.float16).view(np.uint16) if a.ndim == 3 else a for a in w)
    with pytest.raises(ValueError, match="float16"):
        _run_gpu(cfg, half, h, c, 1, 1.0, 0, 1.0, u, -1)
    with pytest.raises(IndexError, match="start id"):
        _run_gpu(cfg, w, h, c, 5, 1.0, 0, 1.0, u, -1)
    monkeypatch.setattr(ck, "SMEM_LIMIT", 64)  # not even h fits in shared memory
    with pytest.raises(cg.GenerateUnavailable, match="hidden size 4"):
        _run_gpu(cfg, w, h, c, 1, 1.0, 0, 1.0, u, -1)
    # No steps: nothing launched, the state left as it was.
    ids, h1, c1 = _run_gpu(cfg, w, h, c, 1, 1.0, 0, 1.0, u[:0], -1)
    assert len(ids) == 0
    np.testing.assert_array_equal(h1, h)
    np.testing.assert_array_equal(c1, c)


# ------------------------------------------------------------------ sampler.generate


def _models(cell, lines, seed):
    """The same parameters on the CUDA backend and on the reference backend, and a vocab."""
    vocab = Vocab.build({ch: 1 for ch in "abcde\n"}, lines=lines)
    cfg = ModelConfig(cell=cell, vocab_size=len(vocab), embed=4, hidden=6, layers=2)
    params = init_params(cfg, seed)
    params["decoder.weight"] *= 4  # peaked enough for text with structure
    if lines:
        params["decoder.bias"][vocab.eos_id] += 1.5  # lines of a few characters
    return (CharRNN(cfg, params, backend=CudaBackend()),
            CharRNN(cfg, params, backend=get_backend("reference")), vocab)


def _text(model, vocab, cfg, lines):
    return "".join(sampler.generate(model, vocab, cfg, lines=lines))


@pytest.mark.parametrize("cell,lines", [("lstm", False), ("gru", True)])
def test_generate_on_the_cuda_backend_equals_the_reference_backend(monkeypatch, cell, lines):
    """Three chunks (5, 5, 2) through cuda_generate, state carried between them."""
    monkeypatch.setattr(sampler, "CHUNK", 5)
    calls = []  # steps per generate_ids call
    kernel = cg.generate_ids

    def counted(*args, **kwargs):
        calls.append(len(args[15]))  # u
        kernel(*args, **kwargs)

    monkeypatch.setattr(cg, "generate_ids", counted)
    gpu, ref, vocab = _models(cell, lines, seed=2)
    cfg = SampleConfig(length=12, temperature=0.9, seed=4, prime="ab")
    text = _text(gpu, vocab, cfg, lines)
    assert calls == [5, 5, 2]
    assert text == _text(ref, vocab, cfg, lines)
    if lines:
        assert "\n" in text  # an end token drawn: the kernel's reset ran


def test_a_model_too_large_for_the_kernel_samples_step_by_step(monkeypatch):
    gpu, ref, vocab = _models("rnn", False, seed=3)
    monkeypatch.setattr(ck, "SMEM_LIMIT", 64)  # H=6 does not fit: the per-character path

    def refuse(*args, **kwargs):
        raise AssertionError("cuda_generate was called")

    monkeypatch.setattr(cg, "generate_ids", refuse)
    cfg = SampleConfig(length=6, seed=7)
    assert _text(gpu, vocab, cfg, False) == _text(ref, vocab, cfg, False)
    with pytest.raises(ValueError, match="half-precision sampling runs on the CPU"):
        _text(gpu, vocab, SampleConfig(length=3, seed=1, half=True), False)


# ------------------------------------------------------------------ a real GPU


@pytest.mark.gpu
@pytest.mark.skipif(SIM, reason="needs a real GPU: realistic sizes")
def test_realistic_model_on_a_gpu_matches_the_cpu(monkeypatch):
    """2x256 LSTM, V=65, 200 steps, the planned cooperative launch at full block size,
    against the numba CPU kernel (the reference would be slow)."""
    from charrnn.kernels import cpu

    monkeypatch.setattr(cg, "GEN_THREADS", 256)
    monkeypatch.setattr(cg, "GEN_LANES", 32)
    cfg, w, h, c = _case("lstm", 2, True, H=256, V=65, seed=9)
    u = np.random.default_rng(9).random(200)
    want = [np.full(200, -1, np.int64), h.copy(), c.copy()]
    cpu.generate_ids("lstm", True, *w, want[1], want[2], 0, 1.0, 0, 1.0, u, -1, want[0])
    got = _run_gpu(cfg, w, h, c, 0, 1.0, 0, 1.0, u, -1, threads=256, lanes=32)
    assert ("lstm", np.dtype(np.float32).str, 256) not in cg.FALLBACKS
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_allclose(got[1], want[1], rtol=1e-4, atol=1e-5)
