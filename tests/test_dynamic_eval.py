"""Dynamic evaluation: no update is the static loss, a window never sees its own update, it
adapts to text that repeats (and not to noise), the caller's weights come back, and the CLI
reports it apart from the static number."""

import json
import math

import numpy as np
import pytest
from click.testing import CliRunner
from texts import NAMES, PROSE

from charrnn.backend import get_backend
from charrnn.cli import main
from charrnn.config import ModelConfig
from charrnn.dynamic_eval import DYN_CLIP, DYN_DECAY, DYN_LR, evaluate_dynamic
from charrnn.evaluate import evaluate_stream
from charrnn.model import CharRNN

CELLS = ["lstm", "gru", "rnn"]


def _model(cell="lstm", V=12, hidden=16, layers=2, dtype=np.float32, seed=0, backend="reference"):
    cfg = ModelConfig(cell=cell, vocab_size=V, embed=6, hidden=hidden, layers=layers)
    return CharRNN(cfg, backend=get_backend(backend), dtype=dtype, seed=seed)


def _windows(model, ids, **kw):
    """Each window's mean loss as scored, in order."""
    out = []
    evaluate_dynamic(model, ids, on_window=lambda i, loss, n: out.append(loss), **kw)
    return out


def _manual(model, ids, T, lr, decay, clip, leak=False):
    """The algorithm written out plainly on a copy of the model: per window, score, then
    theta <- theta - lr * clip(g) + decay * (theta0 - theta). leak=True scores each window
    again after its own update: the mistake dynamic evaluation must not make.
    -> (each window's loss, how many windows were clipped)."""
    theta0 = {n: p.copy() for n, p in model.params.items()}
    m = CharRNN(model.cfg, params={n: p.copy() for n, p in theta0.items()}, backend=model.backend,
                dtype=model.dtype)
    losses, clipped, state = [], 0, m.zero_state(1)
    for start in range(0, len(ids) - 1, T):
        t = min(T, len(ids) - 1 - start)
        x, y = ids[start:start + t, None], ids[start + 1:start + t + 1, None]  # (t,1)
        logits, next_state, cache = m.forward(x, state)
        loss, dl, _ = m.loss(logits, y)
        g = m.backward(cache, dl)
        norm = math.sqrt(sum(float((a.astype(np.float64) ** 2).sum()) for a in g.values()))
        scale = min(1.0, clip / norm) if clip > 0 else 1.0
        clipped += scale < 1.0
        new = {n: p - lr * scale * g[n] + decay * (theta0[n] - p) for n, p in m.params.items()}
        for n, p in m.params.items():
            p[...] = new[n]
        if leak:
            loss = m.loss(m.forward(x, state)[0], y)[0]
        losses.append(loss)
        state = next_state
    return losses, clipped


# ---------------------------------------------------------------------------------- the library


@pytest.mark.parametrize("cell", CELLS)
def test_no_update_is_the_static_loss_at_batch_one(cell):
    rng = np.random.default_rng(11)
    model = _model(cell, seed=int(rng.integers(1 << 30)))
    ids = rng.integers(0, 12, 237)  # 236 targets: a short last window
    dyn, n = evaluate_dynamic(model, ids, seq_len=20, lr=0.0, decay=0.0)
    static, m = evaluate_stream(model, ids, batch_size=1, seq_len=20)
    assert n == m == 236
    assert abs(dyn - static) < 1e-6 * static
    still = _windows(model, ids, seq_len=20, lr=0.0, decay=0.0)
    moved = _windows(model, ids, seq_len=20, lr=1.0)  # and with a step, the scores do move
    assert max(abs(a - b) for a, b in zip(still, moved)) > 1e-3


def test_earlier_windows_do_not_see_later_characters():
    rng = np.random.default_rng(12)
    model = _model(seed=int(rng.integers(1 << 30)))
    T, k = 25, 5
    ids = rng.integers(0, 12, 301)  # 12 windows
    changed = ids.copy()
    changed[k * T + 1:(k + 1) * T + 1] = (ids[k * T + 1:(k + 1) * T + 1] + 1 + rng.integers(0, 11, T)) % 12
    a = _windows(model, ids, seq_len=T, lr=0.5)
    b = _windows(model, changed, seq_len=T, lr=0.5)
    assert len(a) == len(b) == 12
    assert a[:k] == b[:k]  # bit for bit: nothing from window k reached them
    assert a[k] != b[k] and a[k + 1] != b[k + 1]


@pytest.mark.parametrize("cell", CELLS)
def test_each_window_is_scored_before_its_own_update(cell):
    rng = np.random.default_rng(13)
    model = _model(cell, dtype=np.float64, seed=int(rng.integers(1 << 30)))
    ids = rng.integers(0, 12, 181)
    T, lr, decay, clip = 30, 2.0, 0.01, 0.1  # gradient norms here are ~0.15-0.6
    got = _windows(model, ids, seq_len=T, lr=lr, decay=decay, max_norm=clip)
    want, clipped = _manual(model, ids, T, lr, decay, clip)
    leaky, _ = _manual(model, ids, T, lr, decay, clip, leak=True)
    assert clipped > 0  # so the comparison covers the clipping too
    np.testing.assert_allclose(got, want, rtol=1e-10)
    # The check can tell: scoring after the window's own update gives visibly lower losses.
    assert all(lk < w - 1e-3 for lk, w in zip(leaky, want))
    # The first window is scored with the static weights whatever the step size.
    assert _windows(model, ids, seq_len=T, lr=0.0, decay=0.0)[0] == got[0]


def test_adapts_to_repeated_text_and_not_to_noise():
    rng = np.random.default_rng(0)
    V = 20
    repeated = np.tile(rng.integers(0, V, 30), 60)  # (1800,): a 30-char phrase, again and again
    noise = rng.integers(0, V, 1800)  # i.i.d. uniform: nothing to learn from what came before
    model = CharRNN(ModelConfig(cell="lstm", vocab_size=V, embed=8, hidden=32, layers=1),
                    backend=get_backend("reference"), seed=3)  # untrained: it has seen neither
    rep_static, _ = evaluate_stream(model, repeated, batch_size=1, seq_len=50)
    rep_dyn, _ = evaluate_dynamic(model, repeated)
    noise_static, _ = evaluate_stream(model, noise, batch_size=1, seq_len=50)
    noise_dyn, _ = evaluate_dynamic(model, noise)
    assert rep_dyn < rep_static - 0.05, (rep_static, rep_dyn)  # measured: ~0.13 lower
    # A window that leaked into its own score would gain on noise too.
    assert abs(noise_dyn - noise_static) < 0.01, (noise_static, noise_dyn)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_parameters_come_back_bit_for_bit(backend):
    model = _model(backend=backend, seed=4)
    before = {n: p.copy() for n, p in model.params.items()}
    ids = np.random.default_rng(5).integers(0, 12, 400)
    dyn, _ = evaluate_dynamic(model, ids, seq_len=16, lr=1.0, decay=0.01)
    static, _ = evaluate_stream(model, ids, batch_size=1, seq_len=16)
    assert abs(dyn - static) > 1e-3  # the weights did move while it ran
    assert all(np.array_equal(model.params[n], before[n]) for n in before)

    def stop(i, loss, n):
        if i == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        evaluate_dynamic(model, ids, seq_len=16, lr=1.0, on_window=stop)
    assert all(np.array_equal(model.params[n], before[n]) for n in before)  # also when stopped


def test_bad_input_raises_a_clear_error():
    model = _model()
    ids = np.arange(40) % 12
    lines = [np.array([1, 2, 3]), np.array([4, 5])]  # what a lines (names) split holds
    with pytest.raises(ValueError, match="needs one stream of character ids"):
        evaluate_dynamic(model, lines)
    with pytest.raises(ValueError, match="at least 2 characters, got 1"):
        evaluate_dynamic(model, ids[:1])
    with pytest.raises(ValueError, match="lr must be >= 0, got -0.1"):
        evaluate_dynamic(model, ids, lr=-0.1)
    with pytest.raises(ValueError, match=r"decay must be in \[0, 1\], got 2"):
        evaluate_dynamic(model, ids, decay=2.0)
    with pytest.raises(ValueError, match="seq-len must be an integer >= 1, got 0"):
        evaluate_dynamic(model, ids, seq_len=0)
    with pytest.raises(ValueError, match="clip must be >= 0"):
        evaluate_dynamic(model, ids, max_norm=float("nan"))


# ---------------------------------------------------------------------------------- the CLI


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny prose run and a tiny names run, trained once for the CLI tests."""
    root = tmp_path_factory.mktemp("dyn")
    (root / "play.txt").write_text(PROSE)
    (root / "names.txt").write_text(NAMES)
    out = {}
    for name, mode in (("play", "--no-lines"), ("names", "--lines")):
        res = CliRunner().invoke(main, ["train", str(root / f"{name}.txt"), mode, "--layers", "1", "--hidden", "16",
                                        "--embed", "8", "--batch-size", "4", "--seq-len", "16", "--steps", "10",
                                        "--eval-every", "10", "--warmup", "2", "--out", str(root / name)])
        assert res.exit_code == 0, res.output
        out[name] = str(root / name)
    return out


def _run(args):
    return CliRunner().invoke(main, args)


def test_cli_reports_static_and_dynamic_apart(runs):
    res = _run(["eval", "-c", runs["play"], "--dynamic"])
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("static: val split of ") and "nats/char" in lines[0]
    assert lines[1].startswith("dynamic evaluation (adapts to the text as it reads it; not comparable "
                               "with static numbers): ")
    assert f"seq-len 50, lr {DYN_LR:g}, decay {DYN_DECAY:g}, clip {DYN_CLIP:g}" in lines[1]

    # the static number is printed before the (long) dynamic pass: Ctrl-C there keeps it
    import charrnn.dynamic_eval

    def interrupted(*a, **kw):
        raise KeyboardInterrupt

    real = charrnn.dynamic_eval.evaluate_dynamic
    charrnn.dynamic_eval.evaluate_dynamic = interrupted
    try:
        cut = _run(["eval", "-c", runs["play"], "--dynamic"])
    finally:
        charrnn.dynamic_eval.evaluate_dynamic = real
    assert cut.exit_code == 130 and cut.stdout.splitlines() == lines[:1]

    plain = json.loads(_run(["eval", "-c", runs["play"], "--json", "--seq-len", "20"]).stdout)
    assert "dynamic" not in plain
    both = json.loads(_run(["eval", "-c", runs["play"], "--json", "--dynamic", "--seq-len", "20",
                            "--dyn-lr", "0.05"]).stdout)
    # The static number is the same with or without the dynamic pass (which ran first, so
    # this also checks that it gave the weights back).
    assert both["nats_per_char"] == plain["nats_per_char"]
    dyn = both["dynamic"]
    assert dyn["seq_len"] == 20 and dyn["lr"] == 0.05 and dyn["decay"] == DYN_DECAY
    assert dyn["tokens"] >= both["tokens"] and 0 < dyn["nats_per_char"] < 5
    assert dyn["bits_per_char"] == pytest.approx(dyn["nats_per_char"] / math.log(2))
    assert dyn["nats_per_char"] != both["nats_per_char"]


@pytest.mark.parametrize("args,needle", [
    (["--dynamic", "--dyn-lr", "-1"], "lr must be >= 0, got -1.0"),
    (["--dynamic", "--dyn-decay", "1.5"], "decay must be in [0, 1], got 1.5"),
    (["--dyn-lr", "0.01"], "--dyn-lr only applies with --dynamic"),
])
def test_cli_bad_dynamic_options_give_one_line(runs, args, needle):
    res = _run(["eval", "-c", runs["play"], *args])
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert needle in res.output and len(res.output.strip().splitlines()) == 1, res.output


@pytest.mark.parametrize("args,needle", [
    (["--seq-len", "0"], "Invalid value for '--seq-len': 0 is not in the range x>=1"),
    (["--dynamic", "--seq-len", "-3"], "Invalid value for '--seq-len': -3 is not in the range x>=1"),
    (["--batch-size", "0"], "Invalid value for '--batch-size': 0 is not in the range x>=1"),
])
def test_cli_bad_window_sizes_are_usage_errors(runs, args, needle):
    res = _run(["eval", "-c", runs["play"], *args])
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert needle in res.output, res.output  # click's usage error: the usage line, then the error


def test_cli_dynamic_on_a_names_model_gives_one_line(runs):
    res = _run(["eval", "-c", runs["names"], "--dynamic"])
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert "is a lines (names) model" in res.output and len(res.output.strip().splitlines()) == 1
    assert _run(["eval", "-c", runs["names"]]).exit_code == 0  # static eval of it still works
