"""Finding and loading checkpoints: run directories, the shipped models, model + vocab.

A run directory (`checkpoints/<corpus>/` by default) holds `best.safetensors`,
`latest.safetensors` and `metrics.jsonl`. The shipped models are single files,
`checkpoints/names/model.safetensors` and `checkpoints/shakespeare/model.safetensors`, beside
the package in the repository.
"""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path

import numpy as np

from charrnn import checkpoint
from charrnn.checkpoint import CheckpointError
from charrnn.config import ARCHITECTURE, ModelConfig, TrainConfig, from_dict
from charrnn.model import CharRNN
from charrnn.vocab import Vocab

SHIPPED_DIR = Path(__file__).resolve().parent.parent / "checkpoints"
SHIPPED = {"names": SHIPPED_DIR / "names" / "model.safetensors",
           "shakespeare": SHIPPED_DIR / "shakespeare" / "model.safetensors"}


def run_checkpoint(run_dir: Path, prefer: str = "best") -> Path:
    """The checkpoint file of a run directory: best (for using) or latest (for resuming)."""
    order = ["best", "latest"] if prefer == "best" else ["latest", "best"]
    for name in order:
        p = Path(run_dir) / f"{name}.safetensors"
        if p.is_file():
            return p
    raise CheckpointError(f"{run_dir} holds no best.safetensors or latest.safetensors; "
                          "hint: pass a run directory made by `charrnn train` or a checkpoint file")


class RunBusy(ValueError):
    """Another process is training this run directory."""


def lock_run(run_dir: Path):
    """Hold run_dir/.lock until the returned file is closed (or the process ends, however it
    ends). A second `charrnn train` on the same run (say --resume from another shell) would
    trim and interleave our metrics and overwrite our checkpoints with its own."""
    try:
        import fcntl
    except ImportError:  # no advisory locks on this platform: go on unguarded
        return None
    f = open(Path(run_dir) / ".lock", "a+")  # noqa: SIM115 -- held open: it is the lock
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        pid = f.read().strip() or "unknown"
        f.close()
        raise RunBusy(f"{run_dir} is being trained by another process (pid {pid}); wait for it, "
                      "or stop it (Ctrl-C saves) and resume") from None
    f.seek(0)
    f.truncate()
    f.write(str(os.getpid()))
    f.flush()
    return f


def newest_run(root: Path = Path("checkpoints")) -> Path | None:
    """The checkpoint of the most recently written run under `root`, if any: that run's best,
    as `-c RUN` takes it (its latest is newer whenever the last eval did not improve)."""
    if not root.is_dir():
        return None
    found = [p for p in root.glob("**/*.safetensors") if p.name in ("best.safetensors", "latest.safetensors")]
    newest = max(found, key=lambda p: p.stat().st_mtime, default=None)
    return None if newest is None else run_checkpoint(newest.parent)


def resolve(path: str | None, default: str) -> Path:
    """-c value -> checkpoint file. None: newest run under ./checkpoints (default='run'), then
    the shipped model named by `default` ('shakespeare' falls back to 'names')."""
    if path:
        p = Path(path)
        return run_checkpoint(p) if p.is_dir() else p
    if default == "run":
        found = newest_run()
        if found is not None:
            return found
        default = "shakespeare"
    candidates = [SHIPPED[default]] + ([SHIPPED["names"]] if default == "shakespeare" else [])
    for c in candidates:
        if c.is_file():
            return c
    raise CheckpointError("no checkpoint found (no run under ./checkpoints and no shipped model); "
                          "hint: train one with `charrnn train CORPUS` or pass -c FILE")


def run_meta(model_cfg: ModelConfig, data, command: str) -> dict:
    """The checkpoint metadata that describes a run: model, vocabulary, corpus, command.
    `vocab` is a plain list (index = id; specials spelled out and named in `specials`) so
    other tools can read it without charrnn."""
    from charrnn import __version__

    vocab = data.vocab.to_dict()
    return {
        "model": asdict(model_cfg),
        "vocab": vocab["tokens"],
        "vocab_kind": vocab["kind"],
        "specials": vocab["specials"],
        "corpus": {"paths": [str(Path(p).resolve()) for p in data.paths], "fingerprint": data.fingerprint},
        "command": command,
        "charrnn_version": __version__,
    }


def vocab_from_meta(meta: dict) -> Vocab:
    return Vocab.from_dict({"kind": meta.get("vocab_kind", "text"), "tokens": meta["vocab"],
                            "specials": meta.get("specials", {})})


def _section(meta: dict, key: str, default=None) -> dict:
    """meta[key], which must be a JSON object (KeyError when missing and no default)."""
    value = meta[key] if default is None else meta.get(key, default)
    if not isinstance(value, dict):
        raise TypeError(f"{key!r} is not an object")
    return value


class Loaded:
    """A checkpoint made usable: model, vocab, configs, metadata and its extra tensors."""

    def __init__(self, path: Path, device: str = "cpu", backend=None, finite: bool = True):
        """finite=False loads weights that hold nan or inf (`info` shows them) instead of
        refusing them; self.nonfinite names the first such weight."""
        from charrnn.backend import get_backend

        tensors, meta = checkpoint.load(path, keep_half=True)
        try:
            model = _section(meta, "model")
            missing = [k for k in ARCHITECTURE if k not in model]
            if missing:
                raise ValueError(f"the model section lacks {', '.join(missing)}")
            self.model_cfg = from_dict(ModelConfig, model)
            self.vocab = vocab_from_meta(meta)
            train = _section(meta, "train", {})
            self.train_cfg = from_dict(TrainConfig, _section(train, "config", {}))
            self.train_meta = train
            for key in ("step", "epoch", "best_val", "elapsed_s"):  # shown by `info`
                v = train.get(key)
                if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
                    raise TypeError(f"train.{key} is {v!r}, not a number")
            if self.model_cfg.vocab_size != len(self.vocab):
                raise ValueError(f"the model has {self.model_cfg.vocab_size} token ids but the "
                                 f"vocabulary {len(self.vocab)}")
            if self.train_cfg.lines and self.vocab.eos_id is None:
                raise ValueError("a lines model without an <eos> token")
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path} has incomplete charrnn metadata ({e}); "
                                  "hint: the file is damaged; use another checkpoint") from None
        self.path, self.meta = Path(path), meta
        self.lines = bool(self.train_cfg.lines)
        names = [n for n in tensors if not n.startswith(("train.", "data."))]
        params = {n: tensors[n] for n in names}
        # A flipped bit or a save from blown-up weights: without this, sampling prints one
        # character forever and eval says nan, both with exit 0. (~5 ms for 3x512.)
        bad = next((n for n, a in params.items()
                    if np.issubdtype(a.dtype, np.floating) and not np.isfinite(a).all()), None)
        self.nonfinite = bad
        if bad is not None and finite:
            raise CheckpointError(f"{path}: weight {bad} holds nan or inf; hint: the file is "
                                  "damaged or was saved from weights that blew up; use another "
                                  "checkpoint")
        # Weights stored in float16 (exported and shipped models; `info` says so). Sampling
        # streams float16 by default either way; for these that is the very values stored.
        self.stored_half = any(a.dtype == np.float16 for a in params.values())
        backend = backend or get_backend(device)  # outside the try: a missing GPU is not a damaged file
        try:
            self.model = CharRNN(self.model_cfg, params=params, backend=backend)
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: {e}; hint: the file does not match its own config") from None
        self.tensors = {n: t for n, t in tensors.items() if n not in params}

    @property
    def seen(self) -> set[str]:
        """Training lines (names models): what the novelty filter rejects."""
        t = self.tensors.get("data.seen")
        if t is None:
            return set()
        return set(np.asarray(t, np.uint8).tobytes().decode("utf-8").split("\n"))
