"""The `charrnn` command line: train | sample | names | eval | score | info | export.

The only module that prints. Data (samples, names, JSON) goes to stdout; progress and
messages go to stderr. Every expected failure ends in `fail()`: one line on stderr, exit 1.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import math
import os
import shlex
import shutil
import signal
import sys
from dataclasses import asdict, fields
from pathlib import Path
from typing import ClassVar

import click
from rich.console import Console
from rich.markup import escape

from charrnn import __version__
from charrnn.checkpoint import CheckpointError, write_atomic
from charrnn.config import ARCHITECTURE, ModelConfig, SampleConfig, TrainConfig, check_recompute
from charrnn.data import CorpusError
from charrnn.dynamic_eval import DYN_CLIP, DYN_DECAY, DYN_LR, DYN_SEQ_LEN


class _ErrConsole(Console):
    """stderr. When its reader is gone (`2>&1 | tee log` and the terminal closed), rich's
    default exits (and points stdout at /dev/null): a training run would end before it
    saves. Go quiet instead."""

    def on_broken_pipe(self) -> None:
        self.quiet = True


# markup=False: messages hold user text (paths, names) that may contain [brackets]; the few
# styled lines opt in with markup=True and escape() what they interpolate.
err = _ErrConsole(stderr=True, highlight=False, soft_wrap=True, markup=False)
LN2 = math.log(2)


class UserError(Exception):
    """A problem the user can fix; its message is shown as one line."""


def fail(message: str, code: int = 1):
    err.print(f"[bold red]error:[/] {escape(message)}", markup=True, soft_wrap=True)
    sys.exit(code)


class Group(click.Group):
    """Turns the library's expected exceptions into one-line errors, and ends quietly when
    a reader closes the pipe (`charrnn sample | head`)."""

    argv: ClassVar[list[str]] = []  # this invocation's arguments, recorded in checkpoints

    def main(self, args=None, *a, **kw):
        Group.argv = list(sys.argv[1:] if args is None else args)
        return super().main(args, *a, **kw)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (UserError, CorpusError, CheckpointError, ValueError) as e:
            fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
        except MemoryError as e:  # numpy says how much it wanted: keep that, drop the traceback
            fail(f"out of memory{': ' + str(e).splitlines()[0] if str(e) else ''}; hint: a smaller "
                 "--hidden, --embed, --layers, --batch-size or --seq-len")
        except KeyboardInterrupt:  # Ctrl-C outside training's own save-and-stop: no traceback
            err.print("interrupted")
            sys.exit(128 + signal.SIGINT)
        except BrokenPipeError:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())  # nothing more can be written; flush quietly
            sys.exit(0)
        except OSError as e:
            fail(f"{e.strerror or e}: {e.filename}" if getattr(e, "filename", None) else str(e))


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="charrnn")
def main():
    """Character-level RNN text generator: train LSTM/GRU/RNN models, sample text, make names."""


def _device_option(f):
    return click.option("--device", type=click.Choice(["auto", "cpu", "numpy", "cuda"]), default="auto",
                        show_default=True,
                        help="cpu: numba kernels; numpy: plain numpy (fastest start-up); auto: cuda if "
                             "present, else cpu; names and score never pick cuda (slower there) "
                             "and run small jobs on numpy")(f)


def _ckpt_option(f=None, *, default="newest run, else the shipped model"):
    if f is None:  # @_ckpt_option(default=...)
        return lambda g: _ckpt_option(g, default=default)
    return click.option("-c", "--checkpoint", "ckpt", default=None,
                        help=f"checkpoint file or run directory (default: {default})")(f)


# `names -n` above this runs on numba by default: its ~0.6 s start-up (warm cache) pays for
# itself from about 600 names of the shipped 2x384 model (1.6 vs 2.6 ms a name; 5,000 names:
# 7.8 s vs 14.2 s on plain numpy).
NUMPY_NAMES_MAX = 500


def _backend_name(device: str, small_job: bool = False, gpu: bool = True) -> str:
    """--device -> backend name. Small inference jobs (score, a few hundred names) run on
    plain numpy by default: numba's start-up (about 0.5 s warm, seconds of compiling on a
    cold cache) costs more than its kernels save on a few batched steps. gpu=False: auto
    never picks cuda (names: on an H100 the GPU made 3,203 names/s, 0.12x torch's CUDA
    path, while the CPU path runs at 2-3x torch's CPU one; BENCHMARKS.md)."""
    from charrnn.backend import cuda_usable

    if device != "auto":
        return device
    if gpu and not small_job and cuda_usable():
        return "cuda"
    return "reference" if small_job else "cpu"


def _load(ckpt, device, default, small_job=False, finite=True, gpu=True):
    from charrnn.runs import Loaded, resolve

    return Loaded(resolve(ckpt, default), _backend_name(device, small_job, gpu), finite=finite)


def _out(text: str):
    if sys.stdout is None:  # started with stdout closed (`charrnn sample >&-`)
        raise UserError("standard output is closed: there is nowhere to write the result")
    sys.stdout.write(text)
    sys.stdout.flush()


# ---------------------------------------------------------------------------------- train
_DEVICE_NAMES = {"reference": "numpy"}  # backend name -> what --device calls it
WARMUP_SHARE = 3  # the default warm-up takes at most steps // 3
_RUN_LOCKS: list = []  # the run directory this `train` holds (runs.lock_run), released at its end

# Options that may change when a run is resumed; everything else is fixed by the run.
RESUMABLE = ("steps", "eval_every", "patience", "keep_every", "device", "recompute")


@main.command()
@click.argument("corpus", nargs=-1, type=click.Path())
@click.option("--cell", type=click.Choice(["lstm", "gru", "rnn"]), default=ModelConfig.cell, show_default=True,
              help="recurrent cell: LSTM, GRU or a vanilla tanh RNN")
@click.option("--layers", type=int, default=ModelConfig.layers, show_default=True,
              help="number of stacked recurrent layers")
@click.option("--hidden", type=int, default=ModelConfig.hidden, show_default=True,
              help="hidden units per recurrent layer")
@click.option("--embed", type=int, default=ModelConfig.embed, show_default=True,
              help="character embedding width")
@click.option("--dropout", type=float, default=ModelConfig.dropout, show_default=True,
              help="dropout rate in [0, 1) on each layer's output (the input of the next layer and of "
                   "the decoder); 0: off")
@click.option("--rec-dropout", type=float, default=ModelConfig.rec_dropout, show_default=True,
              help="variational dropout rate in [0, 1) on the hidden state fed back into the recurrence, "
                   "one mask per window; 0: off")
@click.option("--residual/--no-residual", default=ModelConfig.residual, show_default=True,
              help="add each layer's input to its output (every layer above the first)")
@click.option("--batch-size", type=int, default=TrainConfig.batch_size, show_default=True,
              help="parallel text streams per batch (prose), or lines per batch (--lines)")
@click.option("--seq-len", type=int, default=TrainConfig.seq_len, show_default=True,
              help="truncated-BPTT window in characters (prose only; --lines trains on whole lines)")
@click.option("--lr", type=float, default=TrainConfig.lr, show_default=True,
              help="peak learning rate (reached at the end of --warmup)")
@click.option("--optimizer", type=click.Choice(["adam", "adamw"]), default=TrainConfig.optimizer, show_default=True,
              help="adam: --weight-decay as an L2 penalty; adamw: decoupled weight decay")
@click.option("--weight-decay", type=float, default=TrainConfig.weight_decay, show_default=True,
              help="weight decay on the weight matrices (not biases), applied as --optimizer says; 0: off")
@click.option("--grad-clip", type=float, default=TrainConfig.grad_clip, show_default=True,
              help="clip the gradients to this global L2 norm; 0: off")
@click.option("--schedule", type=click.Choice(["constant", "step", "cosine"]), default=TrainConfig.schedule,
              show_default=True,
              help=f"learning rate after --warmup: constant; step (x{TrainConfig.decay_rate:g} every "
                   f"{TrainConfig.decay_every} steps); cosine (down to {TrainConfig.min_lr_frac:g} x --lr "
                   "at the last step)")
@click.option("--warmup", type=int, default=TrainConfig.warmup,
              help="steps of linear learning-rate warm-up, up to --lr at the last of them; 0: none  "
                   f"[default: {TrainConfig.warmup}, at most a third of the run's steps]")
@click.option("--steps", type=int, default=TrainConfig.steps, show_default=True,
              help="total optimizer steps of the run (with --resume: continue up to this)")
@click.option("--epochs", type=float, default=TrainConfig.epochs, help="passes over the data (overrides --steps)")
@click.option("--val-frac", type=float, default=TrainConfig.val_frac, show_default=True,
              help="fraction held out for validation: the end of the text (prose) or random lines (--lines)")
@click.option("--test-frac", type=float, default=TrainConfig.test_frac, show_default=True,
              help="fraction held out for testing: the text after the validation part (prose) or random "
                   "lines (--lines)")
@click.option("--test-count", type=int, default=TrainConfig.test_count, help="lines mode: exact test lines")
@click.option("--split-seed", type=int, default=TrainConfig.split_seed, show_default=True,
              help="lines mode: seed of the random validation/test split")
@click.option("--eval-every", type=int, default=TrainConfig.eval_every, show_default=True,
              help="steps between validation passes (and checkpoints)")
@click.option("--eval-max-chars", type=int, default=TrainConfig.eval_max_chars,
              help="cap validation characters per eval (0: all)")
@click.option("--patience", type=int, default=TrainConfig.patience, help="early stopping after N evals without gain")
@click.option("--keep-every", type=int, default=TrainConfig.keep_every,
              help="also keep the weights every N steps as RUN/step-NNNNNNN.safetensors (the step, "
                   "7 digits), to sample from earlier points of the run (0: only best and latest)")
@click.option("--seed", type=int, default=TrainConfig.seed, show_default=True,
              help="random seed for weight initialisation, batch order and dropout")
@click.option("--lines/--no-lines", default=None, help="one example per line (default: detect)")
@click.option("--encoding", default=TrainConfig.encoding, show_default=True, help="text encoding, or 'bytes'")
@click.option("--max-vocab", type=int, default=TrainConfig.max_vocab, help="keep the N most frequent characters")
@_device_option
@click.option("--recompute", type=int, default=TrainConfig.recompute, show_default=True,
              help="recompute the gates of the N lowest layers (N below --layers) in the backward instead "
                   "of keeping them: less memory, more time, the same gradients; no effect on --cell rnn")
@click.option("--out", type=click.Path(), default=None, help="run directory (default: checkpoints/<corpus>)")
@click.option("--resume", type=click.Path(), default=None, help="continue the run in this directory")
@click.option("--init-from", type=click.Path(), default=None,
              help="start a new run from this checkpoint's weights (fine-tuning): its architecture and "
                   "vocabulary; its dropout and --lines/--encoding unless given; a fresh optimizer and schedule")
@click.pass_context
def train(ctx, corpus, out, resume, init_from, **opts):
    """Train a model on CORPUS (one or more text files)."""
    try:
        _train(corpus, out, resume, init_from, opts, ctx)
    finally:
        while _RUN_LOCKS:
            lock = _RUN_LOCKS.pop()
            if lock is not None:
                lock.close()


def _train(corpus, out, resume, init_from, opts, ctx):
    from charrnn.trainer import TrainingDiverged

    given = {k for k in opts if ctx.get_parameter_source(k) == click.core.ParameterSource.COMMANDLINE}
    if resume and init_from:
        raise UserError("--resume continues a run, --init-from starts a new one from a checkpoint; pick one")
    if resume and out and Path(out).resolve() != Path(resume).resolve():
        raise UserError(f"--out does not apply with --resume: the run stays in {resume}")
    if resume:
        trainer, run_dir = _resume(resume, corpus, opts, given)
        if trainer.step >= trainer.cfg.steps:  # nothing to do: not an error (make, scripts)
            err.print(f"{run_dir} already reached step {trainer.step} of {trainer.cfg.steps}; pass "
                      f"--steps N (> {trainer.step}) to train further")
            return
        patience = trainer.cfg.patience
        if patience and trainer.evals_without_gain >= patience:  # it would stop at the next eval
            err.print(f"{run_dir} stopped early at step {trainer.step} ({trainer.evals_without_gain} "
                      f"evals without a gain in val loss); pass a larger --patience, or "
                      f"--patience 0, to train further")
            return
    else:
        trainer, run_dir = _new_run(corpus, out, opts, given, init_from)
    cfg = trainer.cfg
    err.print(f"run [bold]{escape(str(run_dir))}[/]: {trainer.model.cfg.cell} {trainer.model.cfg.layers}x{trainer.model.cfg.hidden}, "
              f"{trainer.model.num_params():,} parameters, vocab {len(trainer.data.vocab)}, "
              f"device {_DEVICE_NAMES.get(trainer.model.backend.name, trainer.model.backend.name)}, "
              f"steps {trainer.step} -> {cfg.steps}", markup=True)
    from charrnn.progress import Reporter

    reporter = Reporter(err, live=err.is_terminal)
    trainer.callback = reporter
    try:
        reason = trainer.run()
    except TrainingDiverged as e:
        reporter.close()
        fail(str(e))
    finally:
        reporter.close()
    resume_cmd = f"charrnn train --resume {shlex.quote(str(run_dir))}"
    if reason == "interrupted":
        try:  # a hung-up terminal (SIGHUP) cannot be told: the save is done, the status stands
            err.print(f"interrupted at step {trainer.step}; saved {run_dir / 'latest.safetensors'}\n"
                      f"resume with: {resume_cmd}")
        except OSError:
            pass
        sys.exit(128 + (trainer.stop_signal or signal.SIGINT))  # the shell's convention
    best = trainer.best_val
    msg = "stopped early (no val gain)" if reason == "early_stop" else "done"
    err.print(f"{msg} at step {trainer.step}; best val loss "
              f"{'-' if math.isinf(best) else f'{best:.4f} nats/char ({best / LN2:.4f} bits)'}; "
              f"checkpoints in {run_dir}\nsample with: charrnn sample -c {shlex.quote(str(run_dir))}")


def _configs(opts):
    mfields = {f.name for f in fields(ModelConfig)}
    tfields = {f.name for f in fields(TrainConfig)}
    mcfg = ModelConfig(**{k: v for k, v in opts.items() if k in mfields})
    tcfg = TrainConfig(**{k: v for k, v in opts.items() if k in tfields and v is not None})
    return mcfg, tcfg


def _holds_run(d: Path) -> bool:
    return d.is_dir() and any(d.glob("*.safetensors"))


def _claim(run_dir: Path) -> Path | None:
    """Create (if need be) and lock run_dir for this process. Returns the topmost directory
    this call created (run_dir or a parent; None if run_dir was there), which a run that fails
    before it starts removes. One mkdir decides, so two processes starting on one new
    directory cannot both think it theirs (the loser must never delete it). Raises RunBusy
    while another process trains it."""
    from charrnn.runs import lock_run

    top = next((p for p in reversed([run_dir, *run_dir.parents]) if not p.exists()), None)
    try:
        run_dir.mkdir(parents=True)
    except FileExistsError:
        top = None
    except OSError as e:  # read-only, /proc, a file on the way: say what was being made
        raise UserError(f"cannot create the run directory {run_dir}: {e.strerror or e}") from None
    _RUN_LOCKS.append(lock_run(run_dir))
    return top


def _claim_fresh(base: Path) -> tuple[Path, Path | None]:
    """base, or base-2, base-3, ...: never an existing run (a directory holding a checkpoint)
    nor one another process is training (it has no checkpoint before its first eval); a
    directory left by a run that failed before its first checkpoint is reused."""
    from charrnn.runs import RunBusy

    n = 2
    candidate = base
    while True:
        if not _holds_run(candidate) and (candidate.is_dir() or not candidate.exists()):
            try:
                return candidate, _claim(candidate)
            except RunBusy:
                pass
        candidate, n = Path(f"{base}-{n}"), n + 1


# What --init-from takes from the checkpoint. The architecture and vocabulary must match its
# weights; dropout and the corpus framing default to the checkpoint's but may be overridden.
INHERITED = {"model": ("dropout", "rec_dropout"), "train": ("lines", "encoding")}


def _init_source(init_from, opts, given):
    """Load --init-from's checkpoint and fold its configuration into opts (in place)."""
    if "max_vocab" in given:
        raise UserError("--max-vocab cannot be used with --init-from: the vocabulary comes from the checkpoint")
    loaded = _load(init_from, "numpy", "run")
    if opts["lines"] and loaded.vocab.eos_id is None:
        raise UserError(f"{init_from} is a prose model: its vocabulary has no end token, so it cannot "
                        "train on lines; leave --lines out")
    src = loaded.model_cfg
    for name in ARCHITECTURE:
        mine = getattr(src, name)
        if name in given and opts[name] != mine:
            raise UserError(f"--{name.replace('_', '-')} {opts[name]} differs from the --init-from checkpoint's "
                            f"{mine}; the architecture comes from the checkpoint (leave the option out)")
        opts[name] = mine
    for section, names in INHERITED.items():
        cfg = src if section == "model" else loaded.train_cfg
        for name in names:
            if name not in given:
                opts[name] = getattr(cfg, name)
    return loaded


def _new_run(corpus, out, opts, given=frozenset(), init_from=None):
    from charrnn.data import check_file
    from charrnn.dataset import detect_lines
    from charrnn.runs import run_meta
    from charrnn.trainer import Trainer

    if not corpus:
        raise UserError("no corpus given; usage: charrnn train CORPUS.txt [MORE.txt ...]")
    init = _init_source(init_from, opts, given) if init_from else None
    mcfg, tcfg = _configs(opts)
    tcfg.validate()
    check_recompute(tcfg.recompute, mcfg.layers)  # before the corpus is read (a long encode)
    for p in corpus:
        check_file(Path(p))  # missing, a directory or empty: before anything is written
    seen = set()
    for p in corpus:
        if Path(p).resolve() in seen:
            raise UserError(f"corpus file {p} is given twice; each file is read once")
        seen.add(Path(p).resolve())
    if out and Path(out).exists() and not Path(out).is_dir():
        raise UserError(f"--out {out} is a file; hint: pass a directory for the run's checkpoints")
    if out and _holds_run(Path(out)):
        raise UserError(f"--out {out} already holds a run; hint: continue it with `charrnn train --resume "
                        f"{shlex.quote(out)}`, or pass a new --out")
    if opts["lines"] is None:
        tcfg.lines = detect_lines(list(corpus), tcfg.encoding)
        if tcfg.lines:
            err.print("detected a list of short lines: training one example per line (--no-lines to treat it as prose)")
    if "steps" in given and tcfg.epochs > 0:
        raise UserError("--epochs sets the number of steps; give --steps or --epochs, not both")
    # Options this corpus makes moot: a note, not an error (a sweep passes one command line to
    # prose and lists alike).
    moot = {"test_count": not tcfg.lines and "--test-count counts lines of a --lines corpus "
                          "(for prose, --test-frac)",
            "split_seed": not tcfg.lines and "--split-seed shuffles the lines of a --lines "
                          "corpus (prose is split at its end)",
            "seq_len": tcfg.lines and "--seq-len is prose's window (a --lines corpus trains on "
                       "whole lines)"}
    for k, why in moot.items():
        if k in given and why:
            err.print(f"note: {why}; it does not apply here")
    if out:
        run_dir = Path(out)
        made = _claim(run_dir)
    else:
        run_dir, made = _claim_fresh(Path("checkpoints") / Path(corpus[0]).stem)
    try:  # the directory is ours from here: locked, and `made` (with it) created by us
        data, model = _build_run(corpus, run_dir, mcfg, tcfg, given, init)
        meta = run_meta(mcfg, data, shlex.join(["charrnn", *Group.argv]))
        if init:
            from charrnn.data import fingerprint

            meta["init_from"] = {"path": str(init.path.resolve()), "fingerprint": fingerprint([init.path])}
            del init  # the source's tensors (optimizer moments too) are not needed any more
        return Trainer(model, data, tcfg, run_dir, meta), run_dir
    except BaseException:  # a bad option, a corpus too small, no GPU, out of memory: leave no
        if made is not None:  # empty run directory behind
            _unmake(run_dir, made)
        raise


def _unmake(run_dir: Path, top: Path) -> None:
    """Remove run_dir, then its parents up to `top` while they are empty: another process
    may have put its own run in a parent meanwhile."""
    shutil.rmtree(run_dir, ignore_errors=True)
    for parent in run_dir.parents:
        if top not in (parent, *parent.parents):
            break
        try:
            parent.rmdir()
        except OSError:  # not empty: someone else's now
            break


def _build_run(corpus, run_dir, mcfg, tcfg, given, init):
    """The dataset (its ids cached in run_dir) and the fresh model; fills in mcfg.vocab_size,
    and tcfg.steps from --epochs."""
    from charrnn.backend import get_backend
    from charrnn.dataset import build_dataset
    from charrnn.model import CharRNN

    data = build_dataset(corpus, tcfg, vocab=init.vocab if init else None, cache=run_dir / "corpus.ids")
    mcfg.vocab_size = len(data.vocab)
    mcfg.validate()
    backend = get_backend(_backend_name(tcfg.device))
    if tcfg.epochs > 0:
        per_epoch = data.train_targets / (tcfg.batch_size * (1 if tcfg.lines else tcfg.seq_len))
        if tcfg.lines:  # a batch holds B lines, not B*T characters
            per_epoch = math.ceil(len(data.train) / tcfg.batch_size)
        tcfg.steps = max(1, math.ceil(tcfg.epochs * per_epoch))
    if "warmup" not in given:  # a short trial run still reaches --lr and decays
        tcfg.warmup = min(tcfg.warmup, tcfg.steps // WARMUP_SHARE)
    params = init.model.host_params() if init else None  # float32 even from a float16 export
    return data, CharRNN(mcfg, params=params, backend=backend, seed=tcfg.seed)


def _check_unchanged(fixed, opts, loaded):
    """Options the run fixed may be repeated on --resume (the same command with --resume
    added), but not changed."""
    for k in sorted(fixed):
        cfg = loaded.model_cfg if hasattr(loaded.model_cfg, k) else loaded.train_cfg
        mine = getattr(cfg, k, None)
        if opts[k] != mine:
            may = ", ".join(f"--{r.replace('_', '-')}" for r in RESUMABLE)
            raise UserError(f"--{k.replace('_', '-')} {_opt_text(opts[k])} differs from the run's "
                            f"{_opt_text(mine)}; only {may} can change when resuming (to change "
                            "more, start a new run with --init-from)")


def _opt_text(v) -> str:
    if v is None:
        return "unset"
    if isinstance(v, bool):
        return "on" if v else "off"
    return str(v)


def _resume(resume, corpus, opts, given):
    from charrnn.checkpoint import read_meta
    from charrnn.data import fingerprint
    from charrnn.dataset import build_dataset
    from charrnn.runs import Loaded, lock_run, run_checkpoint
    from charrnn.trainer import Trainer

    run_dir = Path(resume)
    if not run_dir.is_dir():
        raise UserError(f"no run directory at {run_dir}; pass the directory given by `charrnn train`")
    try:
        path = run_checkpoint(run_dir, prefer="latest")
    except CheckpointError:
        raise UserError(f"{run_dir} holds no checkpoint (best or latest.safetensors); pass the "
                        "run directory given by `charrnn train`") from None
    _RUN_LOCKS.append(lock_run(run_dir))  # a run's: before anything of it is read or trimmed
    saved = read_meta(path).get("train", {}).get("config", {}).get("device", "auto")
    loaded = Loaded(path, _backend_name(opts["device"] if "device" in given else saved))
    missing = [k for k in Trainer.RESUME_KEYS if k not in loaded.train_meta]
    if missing:
        raise UserError(f"{path} holds no training state (no {missing[0]}; an exported or shipped model?); "
                        f"hint: start a new run from it with `charrnn train CORPUS --init-from {shlex.quote(str(path))}`")
    tcfg = loaded.train_cfg
    _check_unchanged(given - set(RESUMABLE), opts, loaded)
    for k in given & set(RESUMABLE):
        setattr(tcfg, k, opts[k])
    tcfg.validate()
    check_recompute(tcfg.recompute, loaded.model_cfg.layers)
    paths = list(corpus) or loaded.meta["corpus"]["paths"]
    gone = [] if corpus else [p for p in paths if not Path(p).exists()]
    if gone:
        raise UserError(f"the run's corpus file {gone[0]} is not there any more; hint: pass the same files after "
                        f"--resume: charrnn train --resume {shlex.quote(str(run_dir))} FILE...")
    fp = fingerprint(paths)
    if fp != loaded.meta["corpus"]["fingerprint"]:  # before the cache is rewritten
        raise UserError(f"the corpus changed since this run started ({', '.join(paths)}); "
                        "resume needs the same files, or start a new run")
    data = build_dataset(paths, tcfg, vocab=loaded.vocab, cache=run_dir / "corpus.ids", fp=fp)
    meta = {k: v for k, v in loaded.meta.items() if k not in ("train", "format_version")}
    trainer = Trainer(loaded.model, data, tcfg, run_dir, meta)
    trainer.restore(loaded.tensors, loaded.train_meta)
    return trainer, run_dir


# ---------------------------------------------------------------------------------- sample
@main.command()
@_ckpt_option
@click.option("-n", "--length", type=int, default=SampleConfig.length, show_default=True, help="characters to generate")
@click.option("-t", "--temp", "temps", type=float, multiple=True,
              help="temperature (repeat for one labelled sample each)  [default: 0.8]")
@click.option("--top-k", type=int, default=0, help="sample from the k most likely characters (0: all)")
@click.option("--top-p", type=float, default=1.0, help="nucleus sampling: smallest set with this probability")
@click.option("--argmax", is_flag=True, help="always take the most likely character")
@click.option("--prime", default="", help="text to start from (printed first)")
@click.option("--seed", type=int, default=None, help="same seed, same text")
@click.option("--samples", type=click.IntRange(min=1), default=1, show_default=True,
              help="independent samples, each from the prime (with --seed S: seeds S, S+1, ...)")
@click.option("--half/--no-half", default=None,
              help="stream the weights as float16 (~2x faster on big models; the loss moves by "
                   "~3e-6 nats/char) or as float32, exactly the model  [default: float16 on the "
                   "CPU when the weights fit it]")
@_device_option
def sample(ckpt, length, temps, top_k, top_p, argmax, prime, seed, samples, half, device):
    """Stream generated text from a checkpoint."""
    from charrnn import spin_for_generation
    from charrnn.sampler import generate, prepare

    if argmax and temps:
        raise UserError("--argmax takes the likeliest character: a temperature changes nothing")
    if argmax and samples > 1:
        raise UserError("--argmax takes the likeliest character whatever the seed, so every "
                        "sample would be the same; give one sample")
    spin_for_generation()  # before anything starts numba's thread pool
    temps = temps or (SampleConfig.temperature,)
    cfgs = [SampleConfig(length, t, top_k, top_p, prime, None if seed is None else seed + k,
                         argmax).validate()
            for t in temps for k in range(samples)]
    run = _load(ckpt, device, "run")
    _say_which(ckpt, run)
    # once for every sample (float16: ~31 ms at 3x512); by default float16 where it can be
    prep = prepare(run.model, half)
    for cfg in cfgs:
        cfg.half = prep.half
    prime = prime.replace("\\n", "\n")
    for i, cfg in enumerate(cfgs):
        cfg.prime = prime
        if len(cfgs) > 1:
            label = [f"temperature {cfg.temperature:g}"] if len(temps) > 1 else []
            label += [f"sample {i % samples + 1}"] if samples > 1 else []
            _out(("\n" if i else "") + f"--- {', '.join(label)} ---\n")
        pieces = _after_status(generate(run.model, run.vocab, cfg, lines=run.lines, prep=prep),
                               "starting the sampler (its first run compiles it: ~20 s)")
        _out(prime + next(pieces, ""))  # after the status line is gone: it erases its own line
        for piece in pieces:
            _out(piece)
        _out("\n")


def _cached_split(run, split):
    """(ids, description) of a split from the run directory's corpus.ids (the corpus as the
    run encoded it), or (None, None): a lines run, no cache, or one that does not match the
    checkpoint's training split (its batcher state records that split's length)."""
    import numpy as np

    from charrnn.checkpoint import CheckpointError, read_meta
    from charrnn.data import split_stream
    from charrnn.runs import run_checkpoint

    cache = run.path.parent / "corpus.ids"
    if run.lines or not cache.is_file():
        return None, None
    try:  # the directory's own run must be this model's: same corpus, same vocabulary
        own = read_meta(run_checkpoint(run.path.parent))
    except CheckpointError:
        return None, None
    if (own.get("corpus") != run.meta.get("corpus") or own.get("vocab") != run.meta.get("vocab")):
        return None, None
    parts = split_stream(np.memmap(cache, dtype=run.vocab.id_dtype, mode="r"),
                         run.train_cfg.val_frac, run.train_cfg.test_frac)
    batcher = run.train_meta.get("batcher")
    n = batcher.get("n") if isinstance(batcher, dict) else None
    if n is not None and len(parts[0]) != n:
        return None, None
    ids = dict(zip(("train", "val", "test"), parts))[split]
    return ids, f"{split} split of {cache} (the run's encoded corpus; its files are gone)"


def _csv_line(value: str) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerow([value])
    return buf.getvalue()


def _say_which(ckpt, run):
    """Without -c the newest run is taken, which may not be the one meant: say which, on a
    terminal (scripts' stderr stays as it was)."""
    if ckpt is None and err.is_terminal:
        err.print(f"checkpoint: {run.path}", style="dim", highlight=False)


def _after_status(items, message):
    """items, with a transient status line on a terminal's stderr until the first one arrives:
    numba compiles the generator on first use, seconds of silence otherwise."""
    it = iter(items)
    if not err.is_terminal:
        yield from it
        return
    with err.status(message):
        first = next(it, None)
    if first is not None:
        yield first
        yield from it


# ---------------------------------------------------------------------------------- names
@main.command()
@_ckpt_option(default="the shipped names model")
@click.option("-n", "count", type=int, default=20, show_default=True, help="how many names")
@click.option("-t", "--temp", type=float, default=0.8, show_default=True, help="temperature")
@click.option("--top-k", type=int, default=0, help="sample from the k most likely characters (0: all)")
@click.option("--top-p", type=float, default=1.0,
              help="nucleus sampling: smallest set of characters with this probability (1: all)")
@click.option("--seed", type=int, default=None, help="same seed, same names")
@click.option("--min-len", type=int, default=2, show_default=True, help="shortest name kept, in characters")
@click.option("--max-len", type=int, default=16, show_default=True, help="longest name kept, in characters")
@click.option("--start", default="", help="every name starts with this")
@click.option("--contains", default="", help="every name contains this")
@click.option("--allow-seen", is_flag=True, help="keep names that are in the training list")
@click.option("--format", "fmt", type=click.Choice(["text", "json", "csv"]), default="text", show_default=True,
              help="text: one name per line; json: one list; csv: a 'name' column with a header")
@_device_option
def names(ckpt, count, temp, top_k, top_p, seed, min_len, max_len, start, contains, allow_seen, fmt, device):
    """Generate new first names (from the shipped model unless -c is given)."""
    from charrnn.names import NameFilter, iter_names

    SampleConfig(temperature=temp, top_k=top_k, top_p=top_p, seed=seed).validate()
    run = _load(ckpt, device, "names", small_job=count <= NUMPY_NAMES_MAX, gpu=False)
    if not run.lines:
        raise UserError(f"{run.path} is a prose model; `names` needs a model trained with --lines")
    lower = not any(t.isupper() for t in run.vocab.tokens if len(t) == 1)
    if lower:  # a lower-case list: accept "Al" for "al", print "Alba"
        start, contains = start.lower(), contains.lower()
    run.vocab.encode(contains)  # a character the model never writes: fail now, not after every try
    flt = NameFilter(min_len, max_len, start, contains, allow_seen)
    names_found = iter_names(run.model, run.vocab, count, flt, run.seen, temp, top_k, top_p, seed)
    shown = (s.title() if lower else s for s in names_found)
    loosen = "loosen --min-len/--max-len/--start/--contains or raise --temp" + (
        "" if allow_seen else "; the likeliest names are often real ones: --allow-seen keeps them")
    first = next(shown, None)
    if first is None:
        raise UserError(f"none of the candidates passed the filters; hint: {loosen}")
    found = 0
    if fmt == "json":  # one list, printed whole at the end
        listed = [first, *shown]
        found = len(listed)
        _out(json.dumps(listed) + "\n")
    else:  # a line a name, printed as each batch of candidates yields them
        if fmt == "csv":
            _out("name\n")
        for name in itertools.chain([first], shown):
            found += 1
            _out(_csv_line(name) if fmt == "csv" else name + "\n")
    if found < count:
        err.print(f"only {found} of {count} names passed the filters; {loosen}")


# ---------------------------------------------------------------------------------- eval
@main.command("eval")
@_ckpt_option
@click.argument("file", required=False, type=click.Path())
@click.option("--split", type=click.Choice(["val", "test"]), default="val", show_default=True,
              help="without FILE: which split of the run's corpus")
@click.option("--batch-size", type=click.IntRange(min=1), default=None,
              help="parallel text streams, each starting from a zero state (prose models; lines "
                   "models ignore it)  [default: the run's]")
@click.option("--seq-len", type=click.IntRange(min=1), default=None,
              help=f"characters per window  [default: the run's; {DYN_SEQ_LEN} for the --dynamic pass]")
@click.option("--max-chars", type=click.IntRange(min=0), default=None,
              help="score only the first N characters (0: all; prose models)  [default: on the "
                   "run's own split, the run's --eval-max-chars, so it matches its best val; all "
                   "of FILE]")
@click.option("--dynamic", is_flag=True,
              help="also report dynamic evaluation: the model takes a gradient step on each window "
                   "after scoring it (Krause et al. 2018); reported apart from the static loss")
@click.option("--dyn-lr", type=float, default=DYN_LR, show_default=True,
              help="--dynamic: step size on each window's mean loss")
@click.option("--dyn-decay", type=float, default=DYN_DECAY, show_default=True,
              help="--dynamic: pull back towards the trained weights per step")
@click.option("--dyn-clip", type=float, default=DYN_CLIP, show_default=True,
              help="--dynamic: global-norm clip of each window's gradient (0: off)")
@click.option("--json", "as_json", is_flag=True, help="one JSON object on stdout")
@_device_option
@click.pass_context
def eval_cmd(ctx, ckpt, file, split, batch_size, seq_len, max_chars, dynamic, dyn_lr, dyn_decay, dyn_clip,
             as_json, device):
    """Loss in nats/char and bits/char on FILE, or on the run's validation/test split."""
    from charrnn.dataset import build_dataset
    from charrnn.dynamic_eval import check_options, evaluate_dynamic
    from charrnn.evaluate import evaluate_lines, evaluate_stream

    given = [f"--{k.replace('_', '-')}" for k in ("dyn_lr", "dyn_decay", "dyn_clip")
             if ctx.get_parameter_source(k) == click.core.ParameterSource.COMMANDLINE]
    if given and not dynamic:
        raise UserError(f"{given[0]} only applies with --dynamic")
    dyn_opts = {"seq_len": DYN_SEQ_LEN if seq_len is None else seq_len, "lr": dyn_lr, "decay": dyn_decay,
                "max_norm": dyn_clip}
    if file and ctx.get_parameter_source("split") == click.core.ParameterSource.COMMANDLINE:
        raise UserError("--split picks a split of the run's corpus; with FILE the whole file is scored")
    if dynamic:
        check_options(**dyn_opts)  # before minutes of static evaluation, not after
    run = _load(ckpt, device, "run")
    _say_which(ckpt, run)
    if dynamic and run.lines:
        raise UserError(f"{run.path} is a lines (names) model: every line starts from a fresh state, "
                        "so there is no running text for --dynamic to adapt to; use a prose model")
    cfg = run.train_cfg
    if file:
        cfg.val_frac, cfg.test_frac, cfg.test_count = 0.0, 0.0, 0
        try:
            data = build_dataset([file], cfg, vocab=run.vocab)
        except CorpusError as e:  # train's "--encoding" hints do not apply: the model fixes it
            why = str(e).split("; ")[0] if "--encoding" in str(e) else str(e)
            raise UserError(f"{why}; this model reads {cfg.encoding} text" if why != str(e)
                            else why) from None
        ids, source = data.train, file
    else:
        corpus = run.meta.get("corpus")
        paths = corpus.get("paths") if isinstance(corpus, dict) else None
        if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
            paths = []  # a damaged or hand-edited record: the same as none
        if paths and all(Path(p).is_file() for p in paths):
            data = build_dataset(paths, cfg, vocab=run.vocab)
            ids, source = getattr(data, split), f"{split} split of {', '.join(paths)}"
        else:  # moved or deleted: a prose run directory still holds the corpus encoded
            ids, source = _cached_split(run, split)
            if ids is None:
                raise UserError(f"the run's corpus ({', '.join(paths) or 'unknown'}) is not "
                                "available; pass FILE")
    if max_chars is None:
        max_chars = 0 if file else cfg.eval_max_chars
    if max_chars and not run.lines and len(ids) > max_chars + 1:
        ids = ids[: max_chars + 1]  # as the trainer's capped evaluation: N predicted characters
        source += f" (its first {max_chars:,} characters)"
    need, unit = (1, "lines") if run.lines else (2, "characters")
    if len(ids) < need:
        what, hint = ((file, "pass a longer file") if file else
                      (f"the run's {split} split", "pass FILE" + (", or use --split val" if split == "test" else "")))
        raise UserError(f"{what} has too little text to evaluate ({len(ids)} {unit}, at least {need} needed); "
                        f"hint: {hint}")
    if run.lines:
        loss, n = evaluate_lines(run.model, ids, run.vocab.eos_id)
    else:
        loss, n = evaluate_stream(run.model, ids, batch_size or cfg.batch_size, seq_len or cfg.seq_len)
    result = {"checkpoint": str(run.path), "source": source, "nats_per_char": loss, "bits_per_char": loss / LN2,
              "tokens": n}
    static = f"{source}: {loss:.4f} nats/char, {loss / LN2:.4f} bits/char over {n:,} predicted tokens"
    if not as_json:  # before a long dynamic pass: Ctrl-C there keeps this number
        _out(f"static: {static}\n" if dynamic else static + "\n")
    if dynamic:
        if err.is_terminal:
            err.print(f"dynamic evaluation: {len(ids) - 1:,} characters at batch 1, one update per "
                      f"{dyn_opts['seq_len']} characters...")
        dloss, dn = evaluate_dynamic(run.model, ids, **dyn_opts)
        # the top-level numbers stay the static ones
        result["dynamic"] = {"nats_per_char": dloss, "bits_per_char": dloss / LN2, "tokens": dn,
                             **dyn_opts}
        if not as_json:
            _out("dynamic evaluation (adapts to the text as it reads it; not comparable with static "
                 f"numbers): {dloss:.4f} nats/char, {dloss / LN2:.4f} bits/char over {dn:,} predicted "
                 f"tokens (seq-len {dyn_opts['seq_len']}, lr {dyn_opts['lr']:g}, decay "
                 f"{dyn_opts['decay']:g}, clip {dyn_opts['max_norm']:g})\n")
    if as_json:
        _out(json.dumps(result) + "\n")


# ---------------------------------------------------------------------------------- score
@main.command()
@_ckpt_option
@click.argument("texts", nargs=-1, required=True)
@click.option("--json", "as_json", is_flag=True, help="one JSON object on stdout")
@_device_option
def score(ckpt, texts, as_json, device):
    """Log-likelihood of each TEXT (rank candidate names: higher is more likely). TEXT "-"
    reads one text a line from stdin. A text the model cannot score (a character outside its
    vocabulary) is reported as such; the others are still scored (exit status 1 if any
    could not be)."""
    from charrnn.evaluate import score_text

    if "-" in texts:
        if len(texts) > 1:
            raise UserError("'-' reads the texts from stdin, one a line; give it alone")
        texts = tuple(line.rstrip("\r\n") for line in sys.stdin if line.strip())
        if not texts:
            raise UserError("no texts on stdin (score - reads one text a line)")
    run = _load(ckpt, device, "run", small_job=True)
    broken = next((t for t in texts if "\n" in t or "\r" in t), None) if run.lines else None
    if broken is not None:
        raise UserError(f"text {broken!r} spans several lines, but a lines (names) model scores one line; "
                        "hint: pass each line as its own TEXT")
    lower = run.lines and not any(t.isupper() for t in run.vocab.tokens if len(t) == 1)
    rows = []
    for t in texts:
        try:  # a lower-case names model scores "Emma" as "emma"; show what the user typed
            rows.append(dict(score_text(run.model, run.vocab, t.lower() if lower else t, run.lines),
                             text=t))
        except ValueError as e:  # this text only: a ranking keeps the others
            rows.append({"text": t, "error": str(e).splitlines()[0]})
    if as_json:
        _out(json.dumps({"checkpoint": str(run.path), "scores": rows}) + "\n")
    else:
        # An undecodable argument byte (a surrogate escape, fine for a bytes model) shows as U+FFFD.
        def printable(t):
            return t.encode("utf-8", "surrogateescape").decode("utf-8", "replace")

        shown = [printable(r["text"]) for r in rows]
        width = max(map(len, shown))
        for r, text in zip(rows, shown):
            if "error" in r:
                _out(f"{text:<{width}}  not scored: {printable(r['error'])}\n")
            else:
                _out(f"{text:<{width}}  logprob {r['logprob']:9.3f}  "
                     f"{r['nats_per_token']:.3f} nats/char  ({r['tokens']} tokens)\n")
    failed = sum("error" in r for r in rows)
    if failed:
        fail(f"{failed} of {len(rows)} texts could not be scored")


# ---------------------------------------------------------------------------------- info
@main.command()
@_ckpt_option
@click.option("--json", "as_json", is_flag=True, help="one JSON object on stdout")
def info(ckpt, as_json):
    """Summarise a checkpoint: config, parameters, vocabulary, step, losses, command."""
    run = _load(ckpt, "cpu", "run", finite=False)  # show a damaged file, flagged, not refuse it
    t = run.train_meta
    summary = {
        "checkpoint": str(run.path),
        "format_version": run.meta.get("format_version"),
        "model": asdict(run.model_cfg),
        "parameters": run.model.num_params(),
        "stored_as": "float16" if run.stored_half else "float32",  # exported files: float16
        "vocab_size": len(run.vocab),
        "vocab": "".join(tok if len(tok) == 1 else "" for tok in run.vocab.tokens),
        "specials": run.meta.get("specials", {}),
        "mode": "lines" if run.lines else "stream",
        "step": t.get("step"),
        "epoch": t.get("epoch"),
        "best_val": t.get("best_val"),
        "elapsed_s": t.get("elapsed_s"),
        "train": t.get("config", {}),
        "command": run.meta.get("command"),
        "corpus": run.meta.get("corpus"),
        "init_from": run.meta.get("init_from"),  # fine-tuned runs: the checkpoint they began from
        "nonfinite_weight": run.nonfinite,  # a damaged file: the first weight holding nan/inf
    }
    if as_json:
        _out(json.dumps(summary) + "\n")
        return
    m = summary["model"]
    best = summary["best_val"]
    lines = [
        f"checkpoint  {summary['checkpoint']} (format {summary['format_version']})",
        (f"model       {m['cell']} {m['layers']}x{m['hidden']}, embed {m['embed']}, dropout {m['dropout']}, "
         f"rec-dropout {m['rec_dropout']}, residual {m['residual']}"),
        f"parameters  {summary['parameters']:,}, stored as {summary['stored_as']}",
        (f"vocab       {summary['vocab_size']} tokens ({summary['mode']} mode): {summary['vocab']!r}"
         + "".join(f" + {tok}" for tok in run.vocab.tokens if len(tok) > 1)),
        (f"trained     step {summary['step']}, epoch {summary['epoch'] or 0:.2f}, "
         f"{(summary['elapsed_s'] or 0) / 60:.1f} min"),
        f"best val    {'-' if best is None else f'{best:.4f} nats/char ({best / LN2:.4f} bits)'}",
        f"command     {summary['command']}",
    ]
    start = summary["init_from"]
    if isinstance(start, dict) and start.get("path"):
        lines.append(f"init from   {start['path']} ({start.get('fingerprint', 'no fingerprint')})")
    if run.nonfinite:
        lines.append(f"DAMAGED     weight {run.nonfinite} holds nan or inf: sample, eval and "
                     "train refuse this file")
    _out("\n".join(lines) + "\n")


# ---------------------------------------------------------------------------------- plot
@main.command()
@click.argument("runs", nargs=-1, required=True, type=click.Path())
@click.option("-o", "--out", "out_path", type=click.Path(), default="loss.svg", show_default=True,
              help="SVG file to write")
@click.option("--title", default="", help="chart title")
@click.option("--target", type=float, default=None, help="draw a dashed line at this loss")
@click.option("--y-max", type=float, default=None, help="clip the loss axis here")
@click.option("--label", "labels", multiple=True, help="legend name per run (default: directory)")
def plot(runs, out_path, title, target, y_max, labels):
    """Draw the loss curves of one or more run directories as an SVG chart."""
    from charrnn.plot import loss_svg, read_run

    if labels and len(labels) != len(runs):
        raise UserError(f"--label given {len(labels)} times for {len(runs)} runs")
    for name, value in (("--target", target), ("--y-max", y_max)):
        if value is not None and not math.isfinite(value):
            raise UserError(f"{name} must be a finite number, got {value}")
    out = Path(out_path)
    if out.is_dir():
        raise UserError(f"-o {out_path} is a directory; hint: pass a file name such as {out / 'loss.svg'}")
    if out.exists() and out.stat().st_size:
        with open(out, "rb") as f:  # only ever replace a chart (ours, or an XML one), never another file
            if not f.read(5).startswith((b"<svg", b"<?xml")):
                raise UserError(f"-o {out_path} exists and is not an SVG chart; hint: pick another -o")
    curves = [read_run(Path(r), labels[i] if labels else None) for i, r in enumerate(runs)]
    svg = loss_svg(curves, title=title, target=target, y_max=y_max)
    write_atomic(out, svg.encode())  # creates missing parent directories
    err.print(f"wrote {out}")


# ---------------------------------------------------------------------------------- export
@main.command()
@click.argument("source", type=click.Path())
@click.argument("dest", type=click.Path())
@click.option("--half/--no-half", default=True, show_default=True, help="store weights as float16")
@click.option("--force", is_flag=True, help="replace DEST if it already exists")
def export(source, dest, half, force):
    """Copy a checkpoint without its training state (for sharing or shipping)."""
    from charrnn import checkpoint
    from charrnn.runs import Loaded, resolve

    if Path(dest).is_dir():
        raise UserError(f"{dest} is a directory; hint: pass a file name such as {Path(dest) / 'model.safetensors'}")
    if Path(dest).exists() and not force:
        raise UserError(f"{dest} already exists; hint: pass --force to replace it, or choose another DEST")

    src = resolve(source, "run")
    if Path(dest).resolve() == src.resolve():
        raise UserError(f"{dest} is the checkpoint being exported; choose another DEST")
    run = Loaded(src, "cpu")
    tensors = run.model.host_params()
    if "data.seen" in run.tensors:
        tensors["data.seen"] = run.tensors["data.seen"]
    meta = {k: v for k, v in run.meta.items() if k != "format_version"}
    meta["train"] = {k: v for k, v in run.train_meta.items() if k not in ("batcher", "rng", "norm_avg")}
    checkpoint.save(dest, tensors, meta, half=half)
    err.print(f"wrote {dest} ({Path(dest).stat().st_size / 1e6:.2f} MB)")
