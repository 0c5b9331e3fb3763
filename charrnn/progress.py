"""Training progress for the terminal: a rich progress bar on a TTY, plain log lines otherwise.

The trainer reports events through a callback (start, log, rollback, stopping, end); this
turns them into output on stderr, so stdout stays clean for piping.
"""

from __future__ import annotations

import math

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


def _fmt(x, spec=".4f"):
    return "-" if x is None or (isinstance(x, float) and math.isinf(x)) else format(x, spec)


def _line(ev) -> str:
    return (f"step {ev['step']}/{ev['steps']}  epoch {ev['epoch']:.2f}  loss {ev['train_loss']:.4f}  "
            f"val {_fmt(ev['val_loss'])}  lr {ev['lr']:.2e}  |g| {ev['grad_norm']:.2f}  "
            f"{ev['chars_per_s']:,.0f} chars/s")


class Reporter:
    """Callable trainer callback. `live` draws a progress bar; otherwise one line per log event."""

    def __init__(self, console: Console, live: bool):
        self.console, self.live = console, live
        self.progress = None
        self.task = None
        self.best = math.inf

    def __call__(self, ev: dict):
        """Never lets a failed write end the training: with stderr gone (a hung-up terminal)
        the run goes on, and saves, without a word."""
        try:
            self._report(ev)
        except OSError:
            self.console.quiet = True
        except RuntimeError:  # a signal's message re-entering a write in progress: drop it
            pass

    def _report(self, ev: dict):
        kind = ev["kind"]
        if kind == "start":
            self._start(ev)
        elif kind == "log":
            self._log(ev)
        elif kind == "rollback":
            self.console.print(f"[yellow]step {ev['step']}: non-finite or exploding gradient "
                               f"(loss {ev['loss']:.4g}, |g| {ev['grad_norm']:.4g}); step skipped, "
                               f"learning rate scaled to {ev['lr_scale']:g}x[/]", markup=True)
        elif kind == "stopping":
            self._stopping(ev)
        elif kind == "end":
            self.close()

    def _stopping(self, ev):
        if ev["signal"] != "SIGINT":
            msg = f"{ev['signal']}: finishing the step under way, then saving"
        elif ev["presses"] == 1:
            msg = (f"stopping: finishing the step under way, then saving (Ctrl-C "
                   f"{ev['presses_left']} more times quits without saving)")
        else:
            msg = (f"still stopping to save; Ctrl-C {ev['presses_left']} more "
                   f"time{'s' if ev['presses_left'] > 1 else ''} quits without saving")
        self.console.print(f"[yellow]{msg}[/]", markup=True, highlight=False)

    def _start(self, ev):
        self.best = ev.get("best_val", math.inf)  # a resumed run's best so far
        if not self.live:
            return
        self.progress = Progress(
            TextColumn("[bold]training"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"), TimeRemainingColumn(), console=self.console,
            transient=False,
        )
        self.progress.start()
        # Until the first log line: on a fresh install numba compiles the kernels in the first step.
        self.task = self.progress.add_task("train", total=ev["steps"], completed=ev["step"],
                                           info="first steps (compiling the kernels on a first run)")

    def _log(self, ev):
        if ev["val_loss"] is not None:
            self.best = min(self.best, ev["val_loss"])
        if self.progress is None:
            self.console.print(_line(ev), highlight=False)
            return
        info = (f"loss {ev['train_loss']:.3f}  val {_fmt(ev['val_loss'], '.3f')} (best {_fmt(self.best, '.3f')})"
                f"  {ev['chars_per_s']:,.0f} chars/s")
        self.progress.update(self.task, completed=ev["step"], info=info)
        if ev["val_loss"] is not None:
            self.progress.console.print(_line(ev), highlight=False)

    def close(self):
        if self.progress is not None:
            progress, self.progress = self.progress, None
            try:
                progress.stop()
            except OSError:
                self.console.quiet = True
