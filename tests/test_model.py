"""CharRNN: gradients against finite differences in float64, PyTorch agreement, bad input."""

import numpy as np
import pytest

from charrnn.backend import get_backend
from charrnn.config import ModelConfig
from charrnn.model import CharRNN, param_shapes

CELLS = ["lstm", "gru", "rnn"]


def _random_state(model, B, rng, scale=0.5):
    st = model.zero_state(B)
    st.h[:] = rng.standard_normal(st.h.shape) * scale
    if st.c is not None:
        st.c[:] = rng.standard_normal(st.c.shape) * scale
    return st


def _fd_check(model, ids, targets, mask, state, train=False, seed=0, eps=1e-5):
    """Worst relative error ||fd - analytic|| / max(||fd||, ||analytic||) over the parameter tensors."""

    def loss_and_grad():
        # Same dropout masks for every evaluation: a fresh generator from the same seed.
        rng = np.random.default_rng(seed)
        logits, _, cache = model.forward(ids, state, train=train, rng=rng)
        loss, dl, _ = model.loss(logits, targets, mask)
        return loss, dl, cache

    _, dl, cache = loss_and_grad()
    grads = model.backward(cache, dl)
    worst = 0.0
    for name, p in model.params.items():
        fd = np.zeros_like(p)
        for i in range(p.size):
            old = p.flat[i]
            p.flat[i] = old + eps
            lp = loss_and_grad()[0]
            p.flat[i] = old - eps
            lm = loss_and_grad()[0]
            p.flat[i] = old
            fd.flat[i] = (lp - lm) / (2 * eps)
        g = grads[name]
        err = np.linalg.norm(fd - g) / max(np.linalg.norm(fd), np.linalg.norm(g), 1e-12)
        worst = max(worst, err)
    return worst


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("layers,residual", [(1, False), (3, False), (3, True)])
def test_gradients_match_finite_differences(backend, cell, layers, residual):
    rng = np.random.default_rng()  # fresh inputs every run
    cfg = ModelConfig(cell=cell, vocab_size=6, embed=3, hidden=4, layers=layers, residual=residual)
    model = CharRNN(cfg, backend=get_backend(backend), dtype=np.float64, seed=int(rng.integers(1 << 30)))
    T, B = 4, 3
    ids = rng.integers(0, 6, (T, B))
    targets = rng.integers(0, 6, (T, B))
    mask = (rng.random((T, B)) > 0.3).astype(np.float64)
    mask[0, 0] = 1.0
    state = _random_state(model, B, rng)
    assert _fd_check(model, ids, targets, mask, state) <= 1e-6


@pytest.mark.parametrize("cell", CELLS)
def test_gradients_with_dropout_match_finite_differences(cell):
    """Dropout and recurrent dropout masks are fixed by the seed, so the loss is smooth."""
    rng = np.random.default_rng()
    cfg = ModelConfig(cell=cell, vocab_size=5, embed=3, hidden=4, layers=2, dropout=0.3,
                      rec_dropout=0.3, residual=True)
    model = CharRNN(cfg, backend=get_backend("reference"), dtype=np.float64, seed=3)
    ids = rng.integers(0, 5, (3, 2))
    targets = rng.integers(0, 5, (3, 2))
    state = _random_state(model, 2, rng)
    assert _fd_check(model, ids, targets, None, state, train=True, seed=11) <= 1e-6


def test_dropout_is_inverted_and_off_at_eval():
    cfg = ModelConfig(vocab_size=5, embed=3, hidden=64, layers=2, dropout=0.5)
    model = CharRNN(cfg, seed=0)
    ids = np.zeros((2, 3), np.int64)
    st = model.zero_state(3)
    a, _, _ = model.forward(ids, st)
    b, _, _ = model.forward(ids, st)
    np.testing.assert_array_equal(a, b)  # eval: deterministic
    c, _, cache = model.forward(ids, st, train=True, rng=np.random.default_rng(0))
    assert not np.allclose(a, c)
    dmask = cache["layers"][1][2]
    kept = dmask[dmask > 0]
    assert np.allclose(kept, 2.0)  # 1 / (1 - p)
    assert 0.3 < (dmask > 0).mean() < 0.7


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dropout_mask_values_and_rate(dtype):
    from charrnn.model import _dropout_mask

    p = 0.35
    m = _dropout_mask(np.random.default_rng(1), (50, 40, 30), p, np.dtype(dtype))
    assert m.dtype == dtype and m.shape == (50, 40, 30)
    assert set(np.unique(m)) == {0, dtype(1 / (1 - p))}  # dropped, or kept and scaled
    assert abs((m == 0).mean() - p) < 0.01  # 60,000 draws: sd of the rate ~0.002
    assert abs(m.mean() - 1) < 0.02  # inverted dropout keeps the expectation


def test_state_carries_across_windows():
    """Running T steps at once equals running them as two windows with the state carried."""
    cfg = ModelConfig(cell="lstm", vocab_size=9, embed=4, hidden=8, layers=2)
    model = CharRNN(cfg, seed=0)
    ids = np.random.default_rng(0).integers(0, 9, (6, 2))
    full, st_full, _ = model.forward(ids, model.zero_state(2))
    a, st, _ = model.forward(ids[:4], model.zero_state(2))
    b, st2, _ = model.forward(ids[4:], st)
    np.testing.assert_allclose(np.concatenate([a, b]), full, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(st2.h, st_full.h, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(st2.c, st_full.c, rtol=1e-5, atol=1e-6)


def test_every_size_from_1x32_runs():
    for layers, hidden in [(1, 32), (2, 7), (3, 64)]:
        cfg = ModelConfig(vocab_size=11, embed=5, hidden=hidden, layers=layers)
        model = CharRNN(cfg, seed=0)
        ids = np.zeros((1, 1), np.int64)
        logits, st, _ = model.forward(ids, model.zero_state(1))
        assert logits.shape == (1, 1, 11) and logits.dtype == np.float32
        assert st.h.shape == (layers, 1, hidden)


# ------------------------------------------------------------------ bad input


def test_bad_shapes_name_the_argument():
    cfg = ModelConfig(vocab_size=5, embed=3, hidden=4, layers=2)
    model = CharRNN(cfg, seed=0)
    st = model.zero_state(2)
    with pytest.raises(ValueError, match=r"ids: expected a 2-D integer array"):
        model.forward(np.zeros(3, np.int64), st)
    with pytest.raises(ValueError, match=r"ids: expected a 2-D integer array .*float"):
        model.forward(np.zeros((3, 2)), st)
    with pytest.raises(ValueError, match=r"ids: values must be in \[0, 5\), got range \[0, 7\]"):
        model.forward(np.array([[0, 7]]), st)
    with pytest.raises(ValueError, match=r"state.h: expected shape \(2, 3, 4\), got \(2, 2, 4\)"):
        model.forward(np.zeros((1, 3), np.int64), st)
    logits, _, _ = model.forward(np.zeros((2, 2), np.int64), st)
    with pytest.raises(ValueError, match=r"targets: expected shape \(2, 2\), got \(2, 3\)"):
        model.loss(logits, np.zeros((2, 3), np.int64))
    with pytest.raises(ValueError, match=r"mask: expected shape"):
        model.loss(logits, np.zeros((2, 2), np.int64), np.ones((3, 2)))


def test_bad_config_and_params():
    with pytest.raises(ValueError, match=r"unknown cell 'lstn'; valid cells: lstm, gru, rnn"):
        CharRNN(ModelConfig(cell="lstn", vocab_size=5))
    with pytest.raises(ValueError, match=r"layers must be > 0, got 0"):
        CharRNN(ModelConfig(vocab_size=5, layers=0))
    cfg = ModelConfig(vocab_size=5, embed=3, hidden=4, layers=1)
    params = {n: np.zeros(s, np.float32) for n, s in param_shapes(cfg).items()}
    params["decoder.weight"] = np.zeros((5, 5), np.float32)
    with pytest.raises(ValueError, match=r"decoder.weight: expected shape \(5, 4\), got \(5, 5\)"):
        CharRNN(cfg, params=params)
    with pytest.raises(ValueError, match=r"unknown device 'tpu'"):
        get_backend("tpu")


# ------------------------------------------------------------------ PyTorch agreement


def _torch_model(cfg, params):
    torch = pytest.importorskip("torch")
    rnn_cls = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU, "rnn": torch.nn.RNN}[cfg.cell]
    kw = {"nonlinearity": "tanh"} if cfg.cell == "rnn" else {}
    mods = torch.nn.ModuleDict({
        "encoder": torch.nn.Embedding(cfg.vocab_size, cfg.embed),
        "rnn": rnn_cls(cfg.embed, cfg.hidden, cfg.layers, **kw),
        "decoder": torch.nn.Linear(cfg.hidden, cfg.vocab_size),
    }).double()
    # Same names, no renaming: that is the documented checkpoint contract.
    mods.load_state_dict({n: torch.from_numpy(p.astype(np.float64)) for n, p in params.items()})
    return torch, mods


@pytest.mark.parametrize("cell", CELLS)
def test_matches_pytorch_logits_and_gradients(cell):
    rng = np.random.default_rng()
    cfg = ModelConfig(cell=cell, vocab_size=10, embed=6, hidden=8, layers=3, residual=False)  # as nn.LSTM
    model = CharRNN(cfg, dtype=np.float64, backend=get_backend("cpu"), seed=int(rng.integers(1 << 30)))
    torch, mods = _torch_model(cfg, model.params)
    T, B = 5, 3
    ids = rng.integers(0, 10, (T, B))
    targets = rng.integers(0, 10, (T, B))
    state = _random_state(model, B, rng)
    logits, new_state, cache = model.forward(ids, state)
    loss, dl, _ = model.loss(logits, targets)
    grads = model.backward(cache, dl)

    emb = mods["encoder"](torch.from_numpy(ids))
    h0 = torch.from_numpy(state.h)
    out, hT = mods["rnn"](emb, (h0, torch.from_numpy(state.c)) if cell == "lstm" else h0)
    tlogits = mods["decoder"](out)
    tloss = torch.nn.functional.cross_entropy(tlogits.reshape(-1, 10), torch.from_numpy(targets).reshape(-1))
    tloss.backward()
    np.testing.assert_allclose(logits, tlogits.detach().numpy(), rtol=1e-5, atol=1e-9)
    assert abs(loss - tloss.item()) <= 1e-5 * abs(loss)
    th = hT[0] if cell == "lstm" else hT
    np.testing.assert_allclose(new_state.h, th.detach().numpy(), rtol=1e-5, atol=1e-9)
    for name, p in mods.named_parameters():
        g, tg = grads[name], p.grad.numpy()
        assert np.abs(g - tg).max() <= 1e-5 * max(np.abs(tg).max(), 1e-12), name
