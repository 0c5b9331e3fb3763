"""Trainer: it learns, resumes bit-exactly, survives bad steps, and reports through callbacks."""

import json
import math
import warnings

import numpy as np
import pytest

from charrnn import checkpoint
from charrnn.backend import get_backend
from charrnn.config import ModelConfig, TrainConfig
from charrnn.dataset import build_dataset
from charrnn.model import CharRNN
from charrnn.runs import Loaded, run_meta
from charrnn.trainer import Trainer, TrainingDiverged


def _make(tmp_path, text, mcfg, tcfg, run="run", backend="cpu"):
    corpus = tmp_path / "corpus.txt"
    if not corpus.exists():
        corpus.write_text(text)
    data = build_dataset([corpus], tcfg)
    mcfg.vocab_size = len(data.vocab)
    model = CharRNN(mcfg, backend=get_backend(backend), seed=tcfg.seed)
    return Trainer(model, data, tcfg, tmp_path / run, run_meta(mcfg, data, "test"))


def test_loss_on_repetitive_corpus_falls_below_0_1(tmp_path):
    text = "the quick brown fox jumps over the lazy dog. " * 5  # ~200 chars, period 45
    mcfg = ModelConfig(cell="lstm", embed=16, hidden=64, layers=1)
    tcfg = TrainConfig(batch_size=4, seq_len=20, lr=1e-2, steps=300, warmup=10, eval_every=100,
                       val_frac=0.0, schedule="constant", seed=0)
    tr = _make(tmp_path, text, mcfg, tcfg)
    tr.run()
    lines = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["train_loss"] > 2.0
    assert lines[-1]["train_loss"] < 0.1
    assert set(lines[-1]) == {"step", "epoch", "train_loss", "val_loss", "lr", "grad_norm", "chars_per_s",
                              "elapsed_s"}


@pytest.mark.parametrize("cell,lines", [("lstm", False), ("gru", True)])
def test_interrupted_and_resumed_run_is_bit_identical(tmp_path, cell, lines):
    rng = np.random.default_rng(0)
    if lines:
        text = "\n".join("".join(rng.choice(list("abcde"), rng.integers(2, 8))) for _ in range(300))
    else:
        text = "".join(rng.choice(list("abcdefgh \n"), 3000))
    mcfg = ModelConfig(cell=cell, embed=8, hidden=16, layers=2, dropout=0.1, rec_dropout=0.1, residual=True)

    def tcfg():
        return TrainConfig(batch_size=4, seq_len=12, steps=24, eval_every=8, warmup=3, lines=lines, seed=5)

    full = _make(tmp_path, text, ModelConfig(**vars(mcfg)), tcfg(), run="full")
    full.run()

    part = _make(tmp_path, text, ModelConfig(**vars(mcfg)), tcfg(), run="part")
    part.callback = lambda ev: part.request_stop() if ev["kind"] == "log" and ev["step"] == 13 - 3 else None
    assert part.run() == "interrupted"
    assert part.step in range(10, 14)

    loaded = Loaded(tmp_path / "part" / "latest.safetensors")
    data = build_dataset([tmp_path / "corpus.txt"], loaded.train_cfg, vocab=loaded.vocab)
    resumed = Trainer(loaded.model, data, loaded.train_cfg, tmp_path / "part", part.meta)
    resumed.restore(loaded.tensors, loaded.train_meta)
    assert resumed.run() == "done"
    for name, p in full.model.params.items():
        np.testing.assert_array_equal(resumed.model.params[name], p, err_msg=name)
    # metrics of the resumed run continue the same curve without duplicated steps
    steps = [json.loads(ln)["step"] for ln in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 24


def _watched_trainer(tmp_path):
    """A tiny 6-step run on a constant learning rate, and the list its events go to."""
    mcfg = ModelConfig(embed=4, hidden=8, layers=1)
    tcfg = TrainConfig(batch_size=2, seq_len=8, steps=6, eval_every=3, warmup=1, schedule="constant", seed=0)
    tr = _make(tmp_path, "abcabcabd " * 60, mcfg, tcfg)
    events = []
    tr.callback = events.append
    return tr, events


def test_non_finite_step_is_skipped_and_lr_lowered(tmp_path):
    tr, events = _watched_trainer(tmp_path)
    real_backward = tr.model.backward
    calls = {"n": 0}

    def poisoned(cache, dl):
        calls["n"] += 1
        grads = real_backward(cache, dl)
        if calls["n"] == 3:  # one bad step in the middle of the run
            grads["decoder.bias"][0] = np.nan
        return grads

    tr.model.backward = poisoned
    tr.run()
    rollbacks = [e for e in events if e["kind"] == "rollback"]
    assert len(rollbacks) == 1 and rollbacks[0]["lr_scale"] == 0.5
    assert tr.step == 6 and tr.lr_scale == 0.5
    assert all(np.isfinite(p).all() for p in tr.model.params.values())
    assert calls["n"] == 7  # the bad step was redone with a fresh batch


@pytest.mark.parametrize("name,value,says", [
    ("rnn.weight_hh_l0", np.inf, "the loss is nan;"),
    # finite but absurd: the decoder's logits are in the hundreds
    ("decoder.weight", 300.0, r"the loss is [0-9.]+, over [0-9.]+ \(4x where the run started\);"),
])
def test_blown_up_weights_stop_at_once_without_numpy_warnings(tmp_path, name, value, says):
    """An update that blows the weights up (as a learning rate far too high does) makes the
    next loss nan, or finite but far above guessing. Skipping steps cannot mend the weights,
    so the trainer stops at that step with a message that names the cure, and numpy prints
    no warnings beside it."""
    tr, events = _watched_trainer(tmp_path)
    real_step = tr.opt.step

    def blowing_up(grads, lr):
        real_step(grads, lr)
        if tr.step == 1:  # the second update
            w = tr.model.params[name]
            w[...] = value * np.sign(np.random.default_rng(0).standard_normal(w.shape))

    tr.opt.step = blowing_up
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a RuntimeWarning from numpy fails the test
        with pytest.raises(TrainingDiverged, match=f"at step 2: {says} the weights have blown up; lower --lr"):
            tr.run()
    assert not [e for e in events if e["kind"] == "rollback"]


def test_a_run_that_starts_far_above_guessing_trains_on(tmp_path):
    """Fine-tuning on another text can start well above ln V: the ceiling is relative to
    where the run starts, not to guessing."""
    tr, events = _watched_trainer(tmp_path)
    w = tr.model.params["decoder.weight"]
    w[...] = 40.0 * np.sign(np.random.default_rng(0).standard_normal(w.shape))
    assert tr.run() == "done" and tr.step == 6
    first = next(e for e in events if e["kind"] == "log")
    assert first["train_loss"] > 4 * np.log(len(tr.data.vocab))


def test_checkpoints_hold_training_state_and_best(tmp_path):
    text = "".join(np.random.default_rng(1).choice(list("xyz \n"), 2000))
    mcfg = ModelConfig(embed=4, hidden=8, layers=1)
    tcfg = TrainConfig(batch_size=4, seq_len=10, steps=20, eval_every=10, seed=0)
    tr = _make(tmp_path, text, mcfg, tcfg)
    tr.run()
    tensors, meta = checkpoint.load(tmp_path / "run" / "latest.safetensors")
    assert meta["format_version"] == checkpoint.FORMAT_VERSION
    assert meta["model"]["hidden"] == 8 and meta["vocab"] == tr.data.vocab.to_dict()["tokens"]
    assert meta["train"]["step"] == 20 and meta["train"]["config"]["steps"] == 20
    assert any(k.startswith("train.adam.m.") for k in tensors)
    assert tensors["train.state.h"].shape == (1, 4, 8)
    best = checkpoint.read_meta(tmp_path / "run" / "best.safetensors")
    assert math.isclose(best["train"]["best_val"], tr.best_val)


def test_early_stopping_after_patience_evals_without_gain(tmp_path):
    text = "".join(np.random.default_rng(2).choice(list("ab \n"), 1500))
    mcfg = ModelConfig(embed=4, hidden=8, layers=1)
    tcfg = TrainConfig(batch_size=2, seq_len=8, steps=100, eval_every=5, patience=2, seed=0)
    tr = _make(tmp_path, text, mcfg, tcfg)
    losses = iter([2.0, 1.5, 1.6, 1.7, 1.4, 1.3])  # gains, then two evals without one
    tr.evaluate = lambda split="val": next(losses)
    assert tr.run() == "early_stop"
    assert tr.step == 20 and tr.best_val == 1.5
    assert checkpoint.read_meta(tmp_path / "run" / "best.safetensors")["train"]["step"] == 10


def _signalled_run(tmp_path, signals):
    """A 40-step run that sends itself `signals`, one after another, at its first log line
    (step 10): the handlers run in the main thread, as for a real Ctrl-C or `kill`."""
    import os

    mcfg = ModelConfig(embed=4, hidden=8, layers=1)
    tcfg = TrainConfig(batch_size=2, seq_len=8, steps=40, eval_every=100, warmup=1, seed=0)
    tr = _make(tmp_path, "abcabcabd " * 60, mcfg, tcfg)
    events = []

    def send(sig):  # a Python call each: its handler runs before the next signal is sent
        os.kill(os.getpid(), sig)

    def callback(ev):
        events.append(ev)
        if ev["kind"] == "log" and ev["step"] == 10:
            for sig in signals:
                send(sig)

    tr.callback = callback
    return tr, events


@pytest.mark.parametrize("names", [["SIGINT"], ["SIGINT", "SIGINT"], ["SIGTERM"], ["SIGHUP"],
                                   ["SIGTERM", "SIGINT"]])
def test_ctrl_c_kill_and_hangup_finish_the_step_and_save(tmp_path, names):
    """Ctrl-C, SIGTERM (kill, batch schedulers) and SIGHUP (a closed terminal) all save;
    a second Ctrl-C only says a save is coming, so a user pressing twice loses nothing."""
    import signal

    before = signal.getsignal(signal.SIGTERM)
    tr, events = _signalled_run(tmp_path, [getattr(signal, n) for n in names])
    assert tr.run() == "interrupted"
    assert tr.stop_signal == getattr(signal, names[0])
    saved = Loaded(tmp_path / "run" / "latest.safetensors")
    assert saved.train_meta["step"] == tr.step < 40
    stops = [ev for ev in events if ev["kind"] == "stopping"]
    assert [ev["signal"] for ev in stops] == names and [ev["presses"] for ev in stops] == [1, 2][:len(names)]
    assert tr.step == 10  # the step under way when the signal came was the last
    assert signal.getsignal(signal.SIGTERM) is before  # handlers restored after the run


def test_a_third_ctrl_c_quits_without_saving(tmp_path):
    import signal

    tr, events = _signalled_run(tmp_path, [signal.SIGINT] * 3)
    with pytest.raises(KeyboardInterrupt):
        tr.run()
    assert not (tmp_path / "run" / "latest.safetensors").exists()
    assert [ev["presses_left"] for ev in events if ev["kind"] == "stopping"] == [2, 1]


def test_an_ignored_hangup_stays_ignored_as_under_nohup(tmp_path):
    import signal

    old = signal.signal(signal.SIGHUP, signal.SIG_IGN)  # what nohup does
    try:
        tr, events = _signalled_run(tmp_path, [signal.SIGHUP])
        assert tr.run() == "done" and tr.step == 40
        assert not [ev for ev in events if ev["kind"] == "stopping"]
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, old)
