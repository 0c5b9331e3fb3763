"""Quality levers, screened with short runs: `python -m bench.levers [--steps N] [--jobs J]`.

Each lever is one `charrnn train` on tiny Shakespeare (nanoGPT's split) that differs from a
small baseline (LSTM 2x256) in one setting. Runs go in parallel, one BLAS/numba thread each
(two-thread pools collapse when they share cores), and the table of best validation losses
is written to docs/levers.md. Short runs screen; they do not settle: a lever that helps late
in training (dropout, weight decay) can look neutral or worse here.

Dimension letters: B=batch, T=window length.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT.parent / "shared" / "corpora" / "tinyshakespeare.txt"
# The screen's baseline predates today's defaults (embed 256, residual), so it names them.
BASE = ["--layers", "2", "--hidden", "256", "--embed", "64", "--no-residual", "--batch-size", "64",
        "--seq-len", "100", "--lr", "2e-3", "--warmup", "50", "--val-frac", "0.1", "--seed", "1337",
        "--dropout", "0.1"]
# name -> options that replace the baseline's (same flag) or add to it
LEVERS = {
    "baseline": [],
    "embed 16": ["--embed", "16"],
    "embed 256": ["--embed", "256"],
    "residual": ["--residual"],
    "no dropout": ["--dropout", "0"],
    "dropout 0.3": ["--dropout", "0.3"],
    "rec-dropout 0.1": ["--rec-dropout", "0.1"],
    "weight decay 0.1": ["--weight-decay", "0.1"],
    "T=50 B=128": ["--seq-len", "50", "--batch-size", "128"],
    "T=200 B=32": ["--seq-len", "200", "--batch-size", "32"],
    "constant lr": ["--schedule", "constant"],
    "lr 4e-3": ["--lr", "4e-3"],
    "embed 256 + residual": ["--embed", "256", "--residual"],
    # the other cells: each against its own cell-only row
    "GRU": ["--cell", "gru"],
    "GRU + embed 256 + residual": ["--cell", "gru", "--embed", "256", "--residual"],
    "RNN": ["--cell", "rnn"],
    "RNN + embed 256 + residual": ["--cell", "rnn", "--embed", "256", "--residual"],
}


def _cell(extra: list[str]) -> str:
    return extra[extra.index("--cell") + 1] if "--cell" in extra else "lstm"


def reference(name: str) -> str:
    """The row a lever is compared with: the baseline, or for another cell its cell-only row."""
    cell = _cell(LEVERS[name])
    return next((n for n, e in LEVERS.items() if e == ([] if cell == "lstm" else ["--cell", cell])), "baseline")


def _switch(flag: str) -> str:
    return flag.replace("--no-", "--", 1)  # --residual and --no-residual set one option


def options(extra: list[str]) -> list[str]:
    """The baseline with `extra` applied: a flag given in extra replaces the baseline's value
    (or its on/off twin)."""
    out, i = list(BASE), 0
    while i < len(extra):
        flag = extra[i]
        has_value = i + 1 < len(extra) and not extra[i + 1].startswith("--")
        same = [j for j, f in enumerate(out) if f.startswith("--") and _switch(f) == _switch(flag)]
        if same:
            j = same[0]
            out[j] = flag
            if has_value:
                out[j + 1] = extra[i + 1]
        else:
            out += extra[i:i + 1 + has_value]
        i += 1 + has_value
    return out


def run(name: str, extra: list[str], steps: int, out_root: Path) -> dict:
    out = out_root / name.replace(" ", "_").replace(",", "").replace("=", "")
    shutil.rmtree(out, ignore_errors=True)  # a screen's own scratch run: `train --out` never overwrites one
    args = [sys.executable, "-m", "charrnn", "train", str(CORPUS), *options(extra), "--steps", str(steps),
            "--eval-every", str(max(1, steps // 4)), "--out", str(out)]
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", NUMBA_NUM_THREADS="1")
    t0 = time.perf_counter()
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        return {"name": name, "error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    vals = [r["val_loss"] for r in rows if r["val_loss"] is not None]
    return {"name": name, "extra": " ".join(extra) or "—", "best_val": min(vals), "last_train": rows[-1]["train_loss"],
            "minutes": (time.perf_counter() - t0) / 60}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.levers", description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--jobs", type=int, default=2, help="runs at once (one thread each)")
    ap.add_argument("--only", default="", help="comma-separated lever names")
    ap.add_argument("--out", default=str(ROOT / "checkpoints" / "runs" / "levers"))
    ap.add_argument("--report", default=str(ROOT / "docs" / "levers.md"))
    args = ap.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(LEVERS)
    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(lambda n: run(n, LEVERS[n], args.steps, Path(args.out)), names))
    best = {r["name"]: r["best_val"] for r in results if "best_val" in r}
    lines = [
        "# Quality levers: short screening runs on tiny Shakespeare",
        "",
        f"- Command: `python -m bench.levers --steps {args.steps}`"
        + (f" --only {shlex.quote(args.only)}" if args.only else ""),
        f"- Date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; one thread a run, {args.jobs} runs at once",
        (f"- Baseline: `charrnn train tinyshakespeare.txt {' '.join(BASE)} --steps {args.steps}`; each row "
         "changes what its options column says. Validation: nanoGPT's split (last 10%), best of 4 evals."),
        "",
        "| lever | options | best val (nats/char) | vs | change | last train loss | minutes |",
        "|---|---|---:|---|---:|---:|---:|",
    ]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['name']} | — | error: {r['error']} | | | | |")
            continue
        ref = reference(r["name"])
        delta = f"{r['best_val'] - best[ref]:+.4f}" if ref in best else "—"
        lines.append(f"| {r['name']} | `{r['extra']}` | {r['best_val']:.4f} | {ref} | {delta} "
                     f"| {r['last_train']:.4f} | {r['minutes']:.1f} |")
    text = "\n".join(lines) + "\n"
    Path(args.report).parent.mkdir(parents=True, exist_ok=True)
    Path(args.report).write_text(text)
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
