"""The training loop: batches -> forward/backward -> clip -> Adam(W) -> eval -> checkpoints.

Never loses work: `latest.safetensors` (with optimizer moments, RNG and batcher state and the
carried hidden state) is written atomically at every eval and on interruption, so a resumed
run continues bit-identically; `best.safetensors` tracks the lowest validation loss. A step
whose gradient is not finite or explodes is not applied: the parameters stay at the last
good state, the learning rate is halved, and the callback hears about it. A loss that is not
finite, or far above where the run started, means the weights have already blown up: the
run stops. Progress goes to a callback and to `metrics.jsonl`; this module prints nothing.

Dimension letters: T=time, B=batch, L=layers, H=hidden.
"""

from __future__ import annotations

import json
import math
import signal
import threading
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from charrnn import checkpoint
from charrnn.config import check_recompute
from charrnn.data import LineBatcher, StreamBatcher
from charrnn.dataset import Dataset
from charrnn.evaluate import evaluate_lines, evaluate_stream
from charrnn.model import CharRNN, State
from charrnn.optim import Adam, clip_grad_norm, lr_at

LOG_EVERY = 10  # steps between metrics.jsonl lines
EXPLODE_FACTOR = 100.0  # a gradient norm this many times its running average is an explosion
MAX_ROLLBACKS = 8  # consecutive bad steps before giving up
# A loss this many times the run's starting point (its first loss, or that of guessing
# uniformly, ln V nats, or 2 nats, whichever is highest) means blown-up weights: a model
# starts near ln V (or, fine-tuned, at its first loss) and only falls from there.
BLOWN_UP_FACTOR = 4.0


class TrainingDiverged(RuntimeError):
    pass


STOP_PRESSES_TO_ABORT = 3  # the Ctrl-C that quits without saving


def save_run_checkpoint(path, model: CharRNN, meta: dict, extra: dict | None = None, half=False):
    tensors = model.host_params()
    if extra:
        tensors.update(extra)
    checkpoint.save(path, tensors, meta, half=half)


def seen_tensor(seen: list[str]) -> np.ndarray:
    """The corpus's distinct lines as one uint8 tensor (names' novelty filter travels with the model)."""
    return np.frombuffer("\n".join(seen).encode("utf-8"), np.uint8).copy()


class Trainer:
    # What restore() reads from a `latest` checkpoint (an exported or shipped model has none).
    RESUME_KEYS = ("step", "epoch", "lr_scale", "norm_avg", "elapsed_s", "adam_t", "batcher", "rng")

    def __init__(self, model: CharRNN, data: Dataset, cfg, run_dir, meta: dict, callback=None):
        self.model, self.data, self.cfg = model, data, cfg
        check_recompute(cfg.recompute, model.cfg.layers)
        self.run_dir = Path(run_dir)
        self.meta = meta  # model/vocab/corpus description written into every checkpoint
        self.callback = callback or (lambda event: None)
        be = model.backend
        self.kernels = be.k
        self.opt = Adam(model.params, be.k, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                        weight_decay=cfg.weight_decay, decoupled=cfg.optimizer == "adamw", xp=be.xp)
        if data.lines:
            self.batcher = LineBatcher(data.train, cfg.batch_size, data.vocab.eos_id, cfg.seed)
        else:
            self.batcher = StreamBatcher(data.train, cfg.batch_size, cfg.seq_len, cfg.seed)
        self.rng = np.random.default_rng(cfg.seed + 1)  # dropout masks
        self.step = 0
        self.epoch = 0.0
        self.state: State | None = None
        self.best_val = math.inf
        self.evals_without_gain = 0
        self.lr_scale = 1.0
        self.loss_ceiling: float | None = None  # from the run's first finite loss (BLOWN_UP_FACTOR)
        self.norm_avg = 0.0
        self.elapsed = 0.0
        self._stop = threading.Event()
        self.stop_signal: int | None = None  # the signal that stopped the run, if one did
        # A fresh run starts its own metrics.jsonl: a directory reused after a run that died
        # before its first checkpoint still holds that run's lines. Resumed runs append.
        self._metrics_mode = "w"

    # -- control --------------------------------------------------------------------
    def request_stop(self):
        """Finish the current step, save `latest`, and return (Ctrl-C lands here)."""
        self._stop.set()

    # -- checkpoints ------------------------------------------------------------------
    def _train_meta(self) -> dict:
        return {
            "config": asdict(self.cfg),
            "step": self.step,
            "epoch": self.epoch,
            "best_val": None if math.isinf(self.best_val) else self.best_val,
            "evals_without_gain": self.evals_without_gain,
            "lr_scale": self.lr_scale,
            "norm_avg": self.norm_avg,
            "elapsed_s": self.elapsed,
            "adam_t": self.opt.t,
            "batcher": self.batcher.state_dict(),
            "rng": self.rng.bit_generator.state,
        }

    def save(self, name: str):
        be = self.model.backend
        extra = dict(self.opt.state_tensors())
        if self.state is not None:
            extra["train.state.h"] = be.to_numpy(self.state.h)
            if self.state.c is not None:
                extra["train.state.c"] = be.to_numpy(self.state.c)
        if self.data.seen is not None:
            extra["data.seen"] = seen_tensor(self.data.seen)
        meta = dict(self.meta, train=self._train_meta())
        save_run_checkpoint(self.run_dir / f"{name}.safetensors", self.model, meta, extra)

    def save_snapshot(self):
        """The weights (and the novelty filter's lines) at this step, for sampling from an
        earlier point of the run: no optimizer or data state, so a third of `latest`'s size."""
        extra = {"data.seen": seen_tensor(self.data.seen)} if self.data.seen is not None else None
        meta = dict(self.meta, train={k: v for k, v in self._train_meta().items()
                                      if k in ("config", "step", "epoch", "best_val", "elapsed_s")})
        save_run_checkpoint(self.run_dir / f"step-{self.step:07d}.safetensors", self.model, meta, extra)

    def restore(self, tensors: dict, train_meta: dict):
        """Continue from a `latest` checkpoint's training state (params are already loaded)."""
        be = self.model.backend
        self.step = int(train_meta["step"])
        self.epoch = float(train_meta["epoch"])
        best = train_meta.get("best_val")
        self.best_val = math.inf if best is None else float(best)
        self.evals_without_gain = int(train_meta.get("evals_without_gain", 0))
        self.lr_scale = float(train_meta["lr_scale"])
        self.norm_avg = float(train_meta["norm_avg"])
        self.elapsed = float(train_meta["elapsed_s"])
        self.opt.load_state_tensors({k: v for k, v in tensors.items() if k.startswith("train.adam.")},
                                    int(train_meta["adam_t"]))
        self.batcher.load_state_dict(train_meta["batcher"])
        self.rng.bit_generator.state = train_meta["rng"]
        if "train.state.h" in tensors:
            c = tensors.get("train.state.c")
            self.state = State(be.asarray(tensors["train.state.h"], self.model.dtype),
                               be.asarray(c, self.model.dtype) if c is not None else None)
        self._trim_metrics()
        self._metrics_mode = "a"

    def _trim_metrics(self):
        """Drop metrics lines logged after the checkpoint we resume from (they will be redone),
        and lines that are no record at all (a write cut short by a crash)."""
        path = self.run_dir / "metrics.jsonl"
        if not path.exists():
            return

        def kept(line: str) -> bool:
            try:
                rec = json.loads(line)
            except ValueError:
                return False
            return isinstance(rec, dict) and isinstance(rec.get("step"), int) and rec["step"] <= self.step

        keep = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip() and kept(ln)]
        checkpoint.write_atomic(path, "".join(ln + "\n" for ln in keep).encode())

    # -- evaluation -------------------------------------------------------------------
    def evaluate(self, split="val") -> float | None:
        data = getattr(self.data, split)
        if len(data) == 0 or (not self.data.lines and len(data) < 2):
            return None
        if self.data.lines:
            return evaluate_lines(self.model, data, self.data.vocab.eos_id, max(self.cfg.batch_size, 256))[0]
        return evaluate_stream(self.model, data, self.cfg.batch_size, self.cfg.seq_len,
                               self.cfg.eval_max_chars)[0]

    # -- one optimizer step ---------------------------------------------------------------
    def _train_step(self, batch):
        model = self.model
        B = batch.x.shape[1]
        if batch.reset or self.state is None or self.state.h.shape[1] != B:
            self.state = model.zero_state(B)
        # Overflow is judged below (a bad step is skipped), so numpy's warnings would only
        # print noise beside the trainer's own message.
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            logits, new_state, cache = model.forward(batch.x, self.state, train=True, rng=self.rng,
                                                    recompute=self.cfg.recompute)
            loss, dlogits, n = model.loss(logits, batch.y, batch.mask)
            grads = model.backward(cache, dlogits)
            norm = clip_grad_norm(grads, self.cfg.grad_clip, self.kernels)
        exploded = self.step > 50 and self.norm_avg > 0 and norm > EXPLODE_FACTOR * self.norm_avg
        if self._blown_up(loss) or not math.isfinite(norm) or exploded:
            return loss, norm, n, False
        lr = lr_at(self.step, self.cfg) * self.lr_scale
        self.opt.step(grads, lr)
        self.norm_avg = norm if self.norm_avg == 0 else 0.98 * self.norm_avg + 0.02 * norm
        self.state = new_state
        return loss, norm, n, True

    def _blown_up(self, loss: float) -> bool:
        if self.loss_ceiling is None and math.isfinite(loss):
            self.loss_ceiling = BLOWN_UP_FACTOR * max(loss, math.log(len(self.data.vocab)), 2.0)
        return not (self.loss_ceiling is not None and loss <= self.loss_ceiling)  # nan too

    # -- the loop -------------------------------------------------------------------------
    def run(self) -> str:
        """Train up to cfg.steps. Returns why it stopped: done | early_stop | interrupted."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        old_handlers = self._install_stop_handlers()
        try:
            with open(self.run_dir / "metrics.jsonl", self._metrics_mode) as metrics:
                self._metrics_mode = "a"
                return self._loop(metrics)
        finally:
            for sig, handler in old_handlers.items():
                signal.signal(sig, handler)

    def _install_stop_handlers(self) -> dict:
        """Ctrl-C, `kill` (SIGTERM, as batch schedulers send) and a closed terminal (SIGHUP)
        all finish the step and save. A step of the flagship model takes over a second, so
        people press Ctrl-C again: the second press only repeats that a save is coming; the
        third quits without saving."""
        if threading.current_thread() is not threading.main_thread():
            return {}
        presses = 0

        def on_signal(signum, frame):
            nonlocal presses
            presses += 1
            if signum == signal.SIGINT and presses >= STOP_PRESSES_TO_ABORT:
                raise KeyboardInterrupt
            if self.stop_signal is None:
                self.stop_signal = signum
            self.request_stop()
            try:  # this runs between any two bytecodes of the step: nothing may escape it
                self.callback({"kind": "stopping", "step": self.step, "presses": presses,
                               "signal": signal.Signals(signum).name,
                               "presses_left": STOP_PRESSES_TO_ABORT - presses})
            except (Exception, SystemExit):  # noqa: BLE001, S110 -- a lost message beats a torn step
                pass

        sigs = (getattr(signal, n, None) for n in ("SIGINT", "SIGTERM", "SIGHUP"))
        # An ignored signal stays ignored: nohup's SIGHUP, a background job's SIGINT.
        return {sig: signal.signal(sig, on_signal) for sig in sigs
                if sig is not None and signal.getsignal(sig) is not signal.SIG_IGN}

    def _loop(self, metrics) -> str:
        cfg = self.cfg
        acc_loss, acc_n, acc_chars, rollbacks = 0.0, 0, 0.0, 0
        t_mark = time.perf_counter()
        reason = "done"
        self.callback({"kind": "start", "step": self.step, "steps": cfg.steps,
                       "best_val": self.best_val})
        while self.step < cfg.steps:
            if self._stop.is_set():
                reason = "interrupted"
                break
            t0 = time.perf_counter()
            batch = self.batcher.next()
            loss, norm, n, ok = self._train_step(batch)
            if not ok:
                if self._blown_up(loss):
                    # Gates are bounded and the softmax is stable: only weights an earlier
                    # update blew up (a learning rate far too high) make the loss itself
                    # inf, nan or far above where the run started. Skipping steps cannot
                    # mend them, so stop at once.
                    why = (f", over {self.loss_ceiling:.4g} ({BLOWN_UP_FACTOR:g}x where the run started)"
                           if math.isfinite(loss) else "")
                    raise TrainingDiverged(f"training diverged at step {self.step}: the loss is {loss:.4g}{why}; "
                                           "the weights have blown up; lower --lr (a new run, "
                                           "or --init-from its best checkpoint)")
                rollbacks += 1
                self.lr_scale *= 0.5
                self.state = None
                self.callback({"kind": "rollback", "step": self.step, "loss": loss, "grad_norm": norm,
                               "lr_scale": self.lr_scale})
                if rollbacks >= MAX_ROLLBACKS:
                    raise TrainingDiverged(f"training diverged: {rollbacks} bad steps in a row at step "
                                           f"{self.step}; lower --lr or --grad-clip")
                continue
            rollbacks = 0
            self.step += 1
            self.epoch = batch.epoch
            self.elapsed += time.perf_counter() - t0
            if cfg.keep_every and self.step % cfg.keep_every == 0:
                self.save_snapshot()
            acc_loss, acc_n, acc_chars = acc_loss + loss, acc_n + 1, acc_chars + n
            do_eval = self.step % cfg.eval_every == 0 or self.step == cfg.steps
            if self.step % LOG_EVERY == 0 or do_eval:
                now = time.perf_counter()
                rec = {"step": self.step, "epoch": round(self.epoch, 4), "train_loss": acc_loss / acc_n,
                       "val_loss": None, "lr": lr_at(self.step - 1, cfg) * self.lr_scale, "grad_norm": norm,
                       "chars_per_s": acc_chars / max(now - t_mark, 1e-9), "elapsed_s": round(self.elapsed, 3)}
                acc_loss, acc_n, acc_chars, t_mark = 0.0, 0, 0.0, now
                if do_eval:
                    rec["val_loss"] = self._eval_and_save()
                metrics.write(json.dumps(rec) + "\n")
                metrics.flush()
                self.callback({"kind": "log", **rec, "steps": cfg.steps})
                if do_eval and cfg.patience and self.evals_without_gain >= cfg.patience:
                    reason = "early_stop"
                    break
                t_mark = time.perf_counter()  # eval and saving are not training time
        if reason == "interrupted":
            self.save("latest")
        self.callback({"kind": "end", "reason": reason, "step": self.step, "best_val": self.best_val})
        return reason

    def _eval_and_save(self):
        val = self.evaluate("val")
        improved = val is not None and val < self.best_val
        if improved:
            self.best_val, self.evals_without_gain = val, 0
        elif val is not None:
            self.evals_without_gain += 1
        self.save("latest")
        if improved or val is None:
            self.save("best")
        return val
