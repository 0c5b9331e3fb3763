"""What a layer keeps from its forward for its backward. `--recompute N`: the N lowest layers
keep only their hidden states and the backward reruns their steps. Always: layers below the
top forget their states (c, h) and the backward rebuilds them from the gates. Same gradients
bit for bit either way, less memory."""

import tracemalloc
import weakref

import numpy as np
import pytest
from click.testing import CliRunner

from charrnn import checkpoint
from charrnn.backend import get_backend
from charrnn.cli import main
from charrnn.config import ModelConfig
from charrnn.model import CharRNN


def _grads(model, ids, recompute, seed=5):
    rng = np.random.default_rng(seed)  # the same dropout masks for every call
    logits, state, cache = model.forward(ids[:-1], model.zero_state(ids.shape[1]), train=True, rng=rng,
                                         recompute=recompute)
    _, dlogits, _ = model.loss(logits, ids[1:])
    return model.backward(cache, dlogits), state


def _backend(name):
    if name == "reference-separate":  # the CUDA backend's layout: activations apart from xp
        from charrnn.backend import HostBackend
        from charrnn.kernels import reference

        return HostBackend("reference", reference, reuse_gate_buffers=False)
    return get_backend(name)


@pytest.mark.parametrize("device,dtype", [("cpu", np.float32), ("reference", np.float64),
                                          ("reference-separate", np.float64)])
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
@pytest.mark.parametrize("layers,T,B,H,extras", [
    (2, 7, 3, 8, {"residual": False}),
    (3, 12, 5, 16, {"dropout": 0.2, "rec_dropout": 0.15, "residual": True}),
    (4, 5, 2, 24, {"rec_dropout": 0.3}),
])
def test_gradients_and_state_are_bit_identical(device, dtype, cell, layers, T, B, H, extras):
    cfg = ModelConfig(cell=cell, layers=layers, hidden=H, embed=6, vocab_size=13, **extras)
    model = CharRNN(cfg, backend=_backend(device), dtype=dtype, seed=int(T * H))
    ids = np.random.default_rng(layers * B).integers(0, 13, (T + 1, B))
    base, base_state = _grads(model, ids, 0)
    for n in range(1, layers):
        got, state = _grads(model, ids, n)
        for name in base:
            np.testing.assert_array_equal(got[name], base[name], err_msg=f"recompute={n}: {name}")
        np.testing.assert_array_equal(state.h, base_state.h)
        if cell == "lstm":
            np.testing.assert_array_equal(state.c, base_state.c)


class _KeepStates:
    """A backend as the given one, but every layer keeps its states to the backward."""

    def __init__(self, be):
        self._be = be

    def __getattr__(self, name):
        return getattr(self._be, name)

    def drop_states(self, cache, keep_h=False):
        return False


@pytest.mark.parametrize("device,dtype", [("cpu", np.float32), ("reference", np.float64),
                                          ("reference-separate", np.float64)])
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
@pytest.mark.parametrize("extras", [{"residual": False}, {"residual": True},
                                    {"dropout": 0.2, "rec_dropout": 0.15, "residual": False}])
def test_states_rebuilt_from_the_gates_give_the_same_gradients(device, dtype, cell, extras):
    cfg = ModelConfig(cell=cell, layers=3, hidden=12, embed=6, vocab_size=13, **extras)
    be = _backend(device)
    ids = np.random.default_rng(3).integers(0, 13, (9, 4))
    runs = []
    for backend in (be, _KeepStates(be)):
        model = CharRNN(cfg, backend=backend, dtype=dtype, seed=8)
        _, _, cache = model.forward(ids[:-1], model.zero_state(4), train=True, rng=np.random.default_rng(5))
        forgot = [lc.states_dropped for _, lc, _ in cache["layers"]]
        drops = cell != "rnn" and backend is be
        # with a residual (and no dropout) layer 1's input is layer 0's very h, kept: an LSTM
        # forgets its c alone, a GRU (h is all its states) nothing
        h_is_input = extras["residual"] and not extras.get("dropout")
        assert forgot == [drops and not (cell == "gru" and h_is_input), drops, False], forgot  # never the top
        runs.append(_grads(model, ids, 0))
    (got, state), (want, want_state) = runs
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    np.testing.assert_array_equal(state.h, want_state.h)


class _Watch:
    """A backend as the given one that notes, at each layer's window, which arrays the model
    has already let go of are still alive: forgotten states (forward), the caches of the
    layers whose backward is done and their spent dropout masks (backward). A name left on
    one keeps it in memory at the peak (seen: the forward's `hs` kept the states below for
    25 MiB at 3x512; the backward's `below` kept a whole layer's cache, 75 MiB, with
    --recompute 1; its `dmask` a (T,B,H) mask through the layer's backward)."""

    def __init__(self, be):
        self._be, self.gone, self.alive, self.masks = be, [], [], []

    def __getattr__(self, name):
        return getattr(self._be, name)

    def _forget(self, arrays):
        # the memory is the base array's: a view (act is a reshape) can die while it lives on
        self.gone += [weakref.ref(a if a.base is None else a.base) for a in arrays if a is not None]

    def _note(self, cache):
        self._forget([cache.hs, cache.cs, cache.act, cache.hn])

    def _check(self, where):
        self.alive += [where] * sum(r() is not None for r in self.gone)

    def drop_states(self, cache, keep_h=False):
        before = {"hs": cache.hs, "cs": cache.cs}
        dropped = self._be.drop_states(cache, keep_h)
        self._forget([a for name, a in before.items() if getattr(cache, name) is None])
        return dropped

    def asarray(self, a, dtype=None):
        out = self._be.asarray(a, dtype)
        if out.ndim == 3:  # a layer's (T,B,H) dropout mask, in the order of the layers
            self.masks.append(out)
        return out

    def layer_forward(self, *args):
        self._check("forward")
        return self._be.layer_forward(*args)

    def layer_backward(self, cache, *args):
        if self.masks:  # this layer's, applied to dL/dy before its backward: spent
            self._forget([self.masks.pop()])
        self._check("backward")
        out = self._be.layer_backward(cache, *args)
        self._note(cache)  # its arrays (dxp among them) are spent once the model has dL/dx
        return out


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("recompute", [0, 1, 2])
@pytest.mark.parametrize("extras", [{"residual": False}, {"residual": True},
                                    {"residual": False, "dropout": 0.2}])
def test_what_the_model_lets_go_of_is_freed_before_the_next_window(cell, recompute, extras):
    cfg = ModelConfig(cell=cell, layers=4, hidden=8, embed=6, vocab_size=11, **extras)
    be = _Watch(get_backend("cpu"))
    model = CharRNN(cfg, backend=be, seed=1)
    ids = np.random.default_rng(4).integers(0, 11, (7, 3))
    grads, _ = _grads(model, ids, recompute)
    assert be.alive == [] and be.gone, be.alive
    assert set(grads) == set(model.params)


def test_forgetting_the_states_below_the_top_lowers_the_peak():
    cfg = ModelConfig(cell="lstm", layers=3, hidden=64, embed=64, vocab_size=20, residual=False)
    ids = np.random.default_rng(2).integers(0, 20, (65, 32))
    be = get_backend("cpu")
    dropped, kept = (_peak_bytes(CharRNN(cfg, backend=b, seed=1), ids, 0) for b in (be, _KeepStates(be)))
    # kept: three layers' (4+2)*H floats a step and dL/dh at the top; dropped: two layers
    # keep 4*H of those 6 (their c and h come back one layer at a time)
    assert dropped < 0.85 * kept, (dropped, kept)


def _peak_bytes(model, ids, recompute):
    tracemalloc.start()  # numpy reports its allocations to tracemalloc
    try:
        _grads(model, ids, recompute)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_recomputing_lower_layers_lowers_the_peak(cell):
    # no residual: its sums (T,B,H) a layer are kept either way and would blur the ratios
    cfg = ModelConfig(cell=cell, layers=3, hidden=64, embed=64, vocab_size=20, residual=False)
    model = CharRNN(cfg, backend=get_backend("cpu"), seed=1)
    ids = np.random.default_rng(2).integers(0, 20, (65, 32))  # T=64, B=32: activations dominate
    peaks = [_peak_bytes(model, ids, n) for n in (0, 1, 2)]
    # A layer below the top keeps G*H floats a step (its states are rebuilt from the gates),
    # or H (its h) with its gates dropped too; the top layer keeps (G+2)*H.
    assert peaks[1] < 0.9 * peaks[0], peaks
    assert peaks[2] < 0.7 * peaks[0], peaks


def test_training_with_recompute_gives_the_same_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "play.txt").write_text("To be, or not to be, that is the question.\n" * 60)
    runner = CliRunner()
    common = ["train", "play.txt", "--layers", "3", "--hidden", "16", "--embed", "8", "--batch-size", "4",
              "--seq-len", "16", "--steps", "12", "--eval-every", "6", "--dropout", "0.1", "--rec-dropout", "0.1"]
    for n in (0, 2):
        res = runner.invoke(main, [*common, "--recompute", str(n), "--out", f"run{n}"])
        assert res.exit_code == 0, res.output
    a, _ = checkpoint.load(tmp_path / "run0" / "latest.safetensors")
    b, _ = checkpoint.load(tmp_path / "run2" / "latest.safetensors")
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    # a memory setting, so a resumed run may change it
    res = runner.invoke(main, ["train", "--resume", "run2", "--steps", "14", "--recompute", "1"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(main, [*common, "--recompute", "3", "--out", "bad"])
    assert res.exit_code == 1 and "--recompute must be below --layers (3)" in res.output
    assert "Traceback" not in res.output
