"""Tests for charrnn.optim: Adam(W) against hand-worked numbers and the textbook formula,
global-norm clipping, the learning-rate schedule, and optimizer state round trips."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from charrnn import checkpoint
from charrnn.config import TrainConfig
from charrnn.kernels import reference
from charrnn.optim import Adam, clip_grad_norm, global_norm, lr_at


@pytest.fixture(params=["reference", "cpu"])
def kernels(request):
    if request.param == "reference":
        return reference
    return pytest.importorskip("charrnn.kernels.cpu")


def _params(seed: int = 0, dtype=np.float64) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "w": rng.standard_normal((3, 4)).astype(dtype),  # a weight matrix: decayed
        "table": rng.standard_normal((2, 3, 2)).astype(dtype),  # ndim 3: decayed too
        "b": rng.standard_normal(4).astype(dtype),  # a bias: never decayed
    }


def _grads(params: dict, rng) -> dict[str, np.ndarray]:
    return {n: rng.standard_normal(p.shape).astype(p.dtype) for n, p in params.items()}


def _textbook(p, grads, lr, b1, b2, eps, wd, decoupled):
    """Adam as written in Kingma & Ba (with L2) and Loshchilov & Hutter (AdamW), float64."""
    p = np.array(p, np.float64)
    m = np.zeros_like(p)
    v = np.zeros_like(p)
    for t, g in enumerate(grads, 1):
        g = np.array(g, np.float64)
        if decoupled:
            p = p - lr * wd * p
        else:
            g = g + wd * p
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g**2
        m_hat = m / (1 - b1**t)
        v_hat = v / (1 - b2**t)
        p = p - lr * m_hat / (np.sqrt(v_hat) + eps)
    return p


# ---------------------------------------------------------------- Adam


# Worked by hand: lr 0.1, weight decay 0.1, a constant gradient. With a constant gradient
# m_hat = g and v_hat = g^2 at every step, so each Adam step moves by lr * sign(g).
#   AdamW, w = 1,  g = 0.5:   1*0.99 - 0.1 = 0.89;  0.89*0.99 - 0.1 = 0.7811;  0.673289
#   AdamW, w = -2, g = -0.25: -1.88;  -1.7612;  -1.643588
#   Adam+L2, w = 1: step 1 uses g + 0.1*w = 0.6 -> 0.9; step 2: g2 = 0.59, m = 0.113,
#   v = 0.00070774, m_hat = 0.113/0.19, v_hat = 0.00070774/0.001999 -> 0.80004734
#   The bias (b = 1, g = 0.5) is never decayed: 0.9, 0.8, 0.7 in both modes.
HAND = {
    True: {"w": [[0.89, -1.88], [0.7811, -1.7612], [0.673289, -1.643588]]},
    False: {"w": [[0.9, -1.9], [0.80004734, -1.80006489], [0.70017458, -1.70023984]]},
}


@pytest.mark.parametrize("decoupled", [True, False], ids=["adamw", "adam_l2"])
def test_adam_hand_computed(kernels, decoupled):
    params = {"w": np.array([[1.0, -2.0]]), "b": np.array([1.0])}
    grads = {"w": np.array([[0.5, -0.25]]), "b": np.array([0.5])}
    opt = Adam(params, kernels, lr=0.1, weight_decay=0.1, decoupled=decoupled)
    for t in range(3):
        opt.step({n: g.copy() for n, g in grads.items()}, 0.1)
        assert opt.t == t + 1
        np.testing.assert_allclose(params["w"][0], HAND[decoupled]["w"][t], rtol=0, atol=1e-7)
        np.testing.assert_allclose(params["b"], [0.9 - 0.1 * t], rtol=0, atol=1e-7)


@pytest.mark.parametrize("decoupled", [True, False], ids=["adamw", "adam_l2"])
def test_adam_matches_textbook(kernels, decoupled):
    params = _params(1)
    start = {n: p.copy() for n, p in params.items()}
    rng = np.random.default_rng(2)
    steps = [_grads(params, rng) for _ in range(4)]
    lr, wd = 0.03, 0.2
    opt = Adam(params, kernels, lr=lr, betas=(0.8, 0.95), eps=1e-6, weight_decay=wd,
               decoupled=decoupled)
    for g in steps:
        opt.step({n: a.copy() for n, a in g.items()})  # lr defaults to the constructor's
    for name, p in params.items():
        decay = wd if p.ndim >= 2 else 0.0
        history = [g[name] for g in steps]
        want = _textbook(start[name], history, lr, 0.8, 0.95, 1e-6, decay, decoupled)
        np.testing.assert_allclose(p, want, rtol=1e-12, atol=1e-12)


def test_adam_keeps_float32(kernels):
    params = _params(0, np.float32)
    opt = Adam(params, kernels, weight_decay=0.01)
    opt.step(_grads(params, np.random.default_rng(0)), 1e-3)
    for name, p in params.items():
        assert p.dtype == opt.m[name].dtype == opt.v[name].dtype == np.float32


def test_adam_over_no_parameters_counts_its_steps(kernels):
    opt = Adam({}, kernels)
    opt.step({}, 1e-3)
    assert opt.t == 1


def test_zero_weight_decay_modes_agree():
    a, b = _params(3), _params(3)
    rng = np.random.default_rng(4)
    grads = [_grads(a, rng) for _ in range(3)]
    oa = Adam(a, reference, decoupled=True)
    ob = Adam(b, reference, decoupled=False)
    for g in grads:
        oa.step({n: x.copy() for n, x in g.items()}, 0.01)
        ob.step({n: x.copy() for n, x in g.items()}, 0.01)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])


def test_step_rejects_mismatched_grads():
    params = _params()
    opt = Adam(params, reference)
    grads = _grads(params, np.random.default_rng(0))
    with pytest.raises(ValueError, match=r"missing \['b'\]"):
        opt.step({n: g for n, g in grads.items() if n != "b"}, 0.1)
    with pytest.raises(ValueError, match=r"unknown \['extra'\]"):
        opt.step({**grads, "extra": grads["b"]}, 0.1)
    with pytest.raises(ValueError, match="gradient w has shape"):
        opt.step({**grads, "w": grads["w"].T.copy()}, 0.1)


def test_bad_hyperparameters():
    with pytest.raises(ValueError, match="beta2 must be in"):
        Adam(_params(), reference, betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="eps must be > 0"):
        Adam(_params(), reference, eps=0.0)


def test_from_config():
    cfg = TrainConfig(lr=0.01, optimizer="adam", weight_decay=0.1, beta1=0.8, beta2=0.99, eps=1e-7)
    opt = Adam.from_config(_params(), reference, cfg)
    assert (opt.lr, opt.beta1, opt.beta2, opt.eps, opt.weight_decay) == (0.01, 0.8, 0.99, 1e-7, 0.1)
    assert not opt.decoupled
    cfg.optimizer = "adamw"
    assert Adam.from_config(_params(), reference, cfg).decoupled


# ---------------------------------------------------------------- optimizer state


def test_state_round_trip_through_checkpoint(kernels, tmp_path):
    rng = np.random.default_rng(5)
    params = _params(6, np.float32)
    opt = Adam(params, kernels, weight_decay=0.1)
    for _ in range(3):
        opt.step(_grads(params, rng), 0.01)
    state = opt.state_tensors()
    assert set(state) == {f"train.adam.{k}.{n}" for k in "mv" for n in params}
    path = tmp_path / "latest.safetensors"
    # half=True must not touch the moments: they are "train." tensors.
    checkpoint.save(path, {**params, **state}, {"adam_t": opt.t}, half=False)
    tensors, meta = checkpoint.load(path)

    resumed = {n: tensors[n].copy() for n in params}
    opt2 = Adam(resumed, kernels, weight_decay=0.1)
    opt2.load_state_tensors(tensors, meta["adam_t"])  # extra model tensors are ignored
    assert opt2.t == 3
    for _ in range(3):
        g = _grads(params, rng)
        opt.step({n: a.copy() for n, a in g.items()}, 0.01)
        opt2.step(g, 0.01)
    for name in params:
        np.testing.assert_array_equal(resumed[name], params[name])


def test_state_tensors_are_copies():
    params = _params()
    opt = Adam(params, reference)
    opt.step(_grads(params, np.random.default_rng(0)), 0.1)
    state = opt.state_tensors()
    before = state["train.adam.m.w"].copy()
    opt.step(_grads(params, np.random.default_rng(1)), 0.1)
    np.testing.assert_array_equal(state["train.adam.m.w"], before)


def test_load_state_tensors_validates():
    params = _params()
    opt = Adam(params, reference)
    good = opt.state_tensors()
    cases = [
        ({n: a for n, a in good.items() if n != "train.adam.v.b"}, 1,
         r"missing \['train.adam.v.b'\]"),
        ({**good, "train.adam.m.ghost": good["train.adam.m.b"]}, 1, "unknown"),
        ({**good, "train.adam.m.w": np.zeros((4, 3))}, 1, "train.adam.m.w has shape"),
        (good, -1, "integer >= 0"),
        (good, 1.5, "integer >= 0"),
    ]
    for tensors, t, match in cases:
        with pytest.raises(ValueError, match=match):
            opt.load_state_tensors(tensors, t)
        assert opt.t == 0  # a rejected state leaves the optimizer as it was


# ---------------------------------------------------------------- clipping


def test_global_norm(kernels):
    grads = _grads(_params(), np.random.default_rng(7))
    flat = np.concatenate([g.ravel() for g in grads.values()])
    assert global_norm(grads, kernels) == pytest.approx(float(np.linalg.norm(flat)), rel=1e-12)


def test_sum_squares_total_is_the_sum_over_arrays(kernels):
    rng = np.random.default_rng(5)
    arrays = [rng.standard_normal(s).astype(np.float32) for s in [(3, 7), (0,), (20_000,), (4,)]]
    want = sum(float(np.sum(a.astype(np.float64) ** 2)) for a in arrays)
    assert kernels.sum_squares_total(arrays) == pytest.approx(want, rel=1e-12)
    assert kernels.sum_squares_total([]) == 0.0


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_clip_caps_global_norm_exactly(kernels, dtype):
    grads = _grads(_params(0, dtype), np.random.default_rng(8))
    before = {n: g.copy() for n, g in grads.items()}
    norm = global_norm(grads, kernels)
    max_norm = norm / 3.0
    assert clip_grad_norm(grads, max_norm, kernels) == pytest.approx(norm, rel=1e-12)
    assert global_norm(grads, kernels) == pytest.approx(max_norm, rel=1e-6)
    for name, g in grads.items():
        assert g.dtype == dtype  # scaled in place, not replaced
        np.testing.assert_allclose(g, before[name] * (max_norm / norm), rtol=1e-6)


def test_clip_leaves_small_or_disabled_or_nonfinite_grads_alone(kernels):
    grads = _grads(_params(), np.random.default_rng(9))
    before = {n: g.copy() for n, g in grads.items()}
    norm = global_norm(grads, kernels)
    assert clip_grad_norm(grads, norm * 2, kernels) == pytest.approx(norm)
    assert clip_grad_norm(grads, 0.0, kernels) == pytest.approx(norm)  # 0 disables
    grads["b"][0] = np.inf
    assert clip_grad_norm(grads, 1.0, kernels) == math.inf
    grads["b"][0] = before["b"][0]
    for name in grads:
        np.testing.assert_array_equal(grads[name], before[name])


# ---------------------------------------------------------------- learning-rate schedule


def _cfg(**kw) -> TrainConfig:
    base = {"lr": 1.0, "warmup": 10, "steps": 110, "min_lr_frac": 0.1, "decay_every": 5,
            "decay_rate": 0.5}
    return TrainConfig(**{**base, **kw})


@pytest.mark.parametrize("schedule", ["constant", "step", "cosine"])
def test_warmup_is_linear(schedule):
    cfg = _cfg(schedule=schedule)
    got = [lr_at(s, cfg) for s in range(10)]
    np.testing.assert_allclose(got, np.arange(1, 11) / 10)
    assert lr_at(10, cfg) == pytest.approx(1.0)  # the first step after warm-up is the peak


def test_no_warmup_starts_at_peak():
    assert lr_at(0, _cfg(warmup=0, schedule="cosine")) == pytest.approx(1.0)
    assert lr_at(0, _cfg(warmup=0, schedule="constant")) == 1.0


def test_constant():
    cfg = _cfg(schedule="constant")
    assert {lr_at(s, cfg) for s in range(10, 500, 7)} == {1.0}


def test_step_decay():
    cfg = _cfg(schedule="step", warmup=2)
    got = [lr_at(s, cfg) for s in range(2, 18)]
    assert got == [1.0] * 5 + [0.5] * 5 + [0.25] * 5 + [0.125]


def test_cosine_reaches_floor_and_decreases():
    cfg = _cfg(schedule="cosine")
    after = [lr_at(s, cfg) for s in range(10, 131)]
    assert all(b <= a for a, b in itertools.pairwise(after))
    assert lr_at(110, cfg) == pytest.approx(0.1)  # min at step == cfg.steps
    assert lr_at(60, cfg) == pytest.approx(0.55)  # halfway: the mean of peak and floor
    assert lr_at(500, cfg) == pytest.approx(0.1)  # clamped after the end
    assert lr_at(109, cfg) > 0.1


def test_cosine_total_steps_override():
    cfg = _cfg(schedule="cosine")
    assert lr_at(210, cfg, total_steps=210) == pytest.approx(0.1)
    assert lr_at(110, cfg, total_steps=210) == pytest.approx(0.55)


def test_lr_at_rejects_bad_input():
    with pytest.raises(ValueError, match="step must be >= 0"):
        lr_at(-1, _cfg())
    with pytest.raises(ValueError, match="unknown schedule 'linear'"):
        lr_at(0, _cfg(schedule="linear"))


# ---------------------------------------------------------------- PyTorch, when installed


@pytest.mark.parametrize("decoupled", [True, False], ids=["adamw", "adam_l2"])
def test_matches_torch(decoupled):
    torch = pytest.importorskip("torch")
    params = _params(10)
    rng = np.random.default_rng(11)
    steps = [_grads(params, rng) for _ in range(5)]
    lr, wd, betas, eps = 0.01, 0.1, (0.85, 0.98), 1e-7
    tparams = {n: torch.tensor(p.copy(), dtype=torch.float64, requires_grad=True)
               for n, p in params.items()}
    groups = [
        {"params": [tparams[n] for n in params if params[n].ndim >= 2], "weight_decay": wd},
        {"params": [tparams[n] for n in params if params[n].ndim < 2], "weight_decay": 0.0},
    ]
    cls = torch.optim.AdamW if decoupled else torch.optim.Adam
    topt = cls(groups, lr=lr, betas=betas, eps=eps)
    opt = Adam(params, reference, lr=lr, betas=betas, eps=eps, weight_decay=wd, decoupled=decoupled)
    for g in steps:
        for n, tp in tparams.items():
            tp.grad = torch.from_numpy(g[n].copy())
        topt.step()
        opt.step({n: a.copy() for n, a in g.items()}, lr)
    for n, p in params.items():
        np.testing.assert_allclose(p, tparams[n].detach().numpy(), rtol=1e-10, atol=1e-12)
