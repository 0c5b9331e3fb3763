"""`python -m bench.run [--quick] [--only NAME[,NAME]] [--gpu] [--out BENCHMARKS.md]`.

Runs every selected row's implementations, each in its own worker process, then the CLI
wall-time rows, prints the table and, with --out, rewrites that file's CPU (or GPU) section.
Progress goes to stderr. Exit status 0 even when goals fail: this measures, it does not test.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from bench import cli_time, machine, report
from bench.report import Cell
from bench.timing import spread
from bench.worker import MARK
from bench.workloads import (
    ALL,
    CHARRNN,
    CPU_WORKLOADS,
    GPU_WORKLOADS,
    IMPL_TITLES,
    TORCH,
    TORCH_NODNNL,
    select,
)

ROOT = Path(__file__).resolve().parent.parent
WORKER_TIMEOUT_S = {False: 900, True: 300}  # full, quick
CLI_REPEATS = {False: (5, 3), True: (2, 1)}  # (warm, first run) for full, quick
# (rounds, timed repeats a worker) for full, quick (None: the worker's plan). Full: 2 rounds
# of 3 repeats, so each figure pools 6 repeats from two processes.
ROUNDS = {False: (2, 3), True: (1, None)}


def log(msg: str) -> None:
    sys.stderr.write(msg + "\n")
    sys.stderr.flush()


def run_worker(w, impl: str, quick: bool, timeout_s: float, repeats: int | None = None) -> Cell:
    cmd = [sys.executable, "-m", "bench.worker", w.name, impl] + (["--quick"] if quick else [])
    cmd += ["--repeats", str(repeats)] if repeats else []
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False,
                              timeout=timeout_s, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return Cell(note=f"error: timed out after {timeout_s:g} s")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(MARK)]
    if not lines:
        tail = proc.stderr.strip().splitlines()[-1:] or ["(no output)"]
        return Cell(note=f"error: worker exit {proc.returncode}: {tail[0][:200]}")
    res = json.loads(lines[-1][len(MARK):])
    if "error" in res:
        log(proc.stderr.rstrip())
        return Cell(note=f"error: {res['error']}", rss_mib=res.get("peak_rss_mib"))
    if "na" in res:
        return Cell(note=f"n/a ({res['na']})")
    return Cell(values=res["rates"], rss_mib=res["peak_rss_mib"], file_mib=res.get("file_rss_mib"),
                info=res.get("info", {}), rounds=[spread(res["rates"])[0]])


def schedule(rows, rounds: int) -> list[tuple]:
    """(workload, impl) worker runs: every implementation of every measured row (and of the
    rows an RSS row reads), in `rounds` rounds. Within a row the implementations run back to
    back, in reverse order every other round (ABBA): other tenants' load drifts over minutes,
    and a ratio of two figures taken ten minutes apart measured that drift as much as our
    code (one run read 2x256 at 1.78x, the next, half an hour later, at 1.05x)."""
    need = [w.name for w in rows if w.kind in ("train", "sample", "names")]
    need += [w.source for w in rows if w.kind == "rss" and w.source not in need]
    impls = {n: list(ALL[n].impls) for n in need}
    borrowed = {ALL[n].torch_from for n in need if ALL[n].torch_from} - set(need)  # their torch cells only
    impls.update({n: [i for i in ALL[n].impls if i != CHARRNN] for n in sorted(borrowed)})
    jobs = []
    for n, row_impls in impls.items():
        for r in range(rounds):
            jobs += [(ALL[n], i) for i in (row_impls if r % 2 == 0 else row_impls[::-1])]
    return jobs


def measure_workers(rows, quick: bool, results: dict, timeout_s: float) -> None:
    have_torch = importlib.util.find_spec("torch") is not None
    rounds, repeats = ROUNDS[quick]
    jobs = schedule(rows, rounds)
    for i, (w, impl) in enumerate(jobs, 1):
        if impl != CHARRNN and not have_torch:
            results.setdefault(w.name, {})[impl] = Cell(note="n/a (no torch)")
            continue
        t0 = time.perf_counter()
        log(f"[{i}/{len(jobs)}] {w.name} {IMPL_TITLES[impl]} ...")
        cell = run_worker(w, impl, quick, timeout_s, repeats)
        row = results.setdefault(w.name, {})
        row[impl] = report.merge(row.get(impl), cell)
        log(f"      {report.cell_text(cell, w.unit)} {w.unit}, peak RSS "
            f"{cell.rss_mib or 0:,.0f} MiB, {time.perf_counter() - t0:.1f} s")
    for n in {w.name for w, _ in jobs}:  # rows that show another row's torch cells
        if ALL[n].torch_from and n in results:
            theirs = results.get(ALL[n].torch_from, {})
            results[n].update({i: c for i, c in theirs.items() if i != CHARRNN})


def rss_rows(rows, results: dict) -> None:
    for w in rows:
        if w.kind != "rss":
            continue
        out = {}
        for impl, c in results.get(w.source, {}).items():
            out[impl] = Cell(values=[c.rss_mib]) if c.values and c.rss_mib else Cell(note=c.note)
        results[w.name] = out


def cli_rows(rows, quick: bool, results: dict) -> None:
    warm_n, first_n = CLI_REPEATS[quick]
    for w in rows:
        if w.kind != "cli":
            continue
        if not cli_time.shipped_model().is_file():
            results[w.name] = {CHARRNN: Cell(note="n/a (no shipped model)")}
            continue
        log(f"[cli] {w.name} ...")
        try:
            secs = cli_time.warm(warm_n) if w.name.endswith("warm") else cli_time.first_run(first_n)
            results[w.name] = {CHARRNN: Cell(values=secs)}
        except (cli_time.CliError, OSError, subprocess.TimeoutExpired) as e:
            results[w.name] = {CHARRNN: Cell(note=f"error: {e}")}
        log(f"      {report.cell_text(results[w.name][CHARRNN], 's')}")


def _first_info(results: dict, impls, key: str):
    for cells in results.values():
        for impl, c in cells.items():
            if impl in impls and key in c.info:
                return c.info[key]
    return None


def header(args, rows, results: dict) -> list[str]:
    m = machine.summary()
    layer = _first_info(results, [CHARRNN], "numba_threading_layer")
    threads = _first_info(results, [CHARRNN], "numba_threads")
    numba = m["numba"] + (f" ({threads} threads, {layer} threading layer)" if threads else "")
    torch = m["torch"]
    tthreads = _first_info(results, [TORCH, TORCH_NODNNL], "torch_threads")
    if tthreads:
        version = _first_info(results, [TORCH, TORCH_NODNNL], "torch")
        dnn = _first_info(results, [TORCH, TORCH_NODNNL], "onednn_available")
        torch = f"{version}, {tthreads} threads, oneDNN {'available' if dnn else 'not available'}"
    command = f"- Command: `make {'bench-gpu' if args.gpu else 'bench'}`"
    if args.quick or args.only:  # not what make runs: say what did run
        command += f" (this run: `{' '.join(['python -m bench.run', *args.argv])}`)"
    lines = [
        command,
        f"- Date: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- CPU: {m['cpu']}; memory {m['memory']}; {m['os']}",
        f"- numpy {m['numpy']}",
        f"- numba {numba}",
        f"- torch {torch}",
        f"- Thread environment variables: {m['thread_env']}",
    ]
    if args.gpu:
        gpus = {c.info["gpu"] for cells in results.values() for c in cells.values() if "gpu" in c.info}
        lines.append(f"- GPU: {', '.join(sorted(gpus)) or 'unknown'}")
    if args.quick:
        lines.append("- Mode: quick smoke run (1 warm-up call, 2 short repeats): **not for decisions**")
    else:
        rounds, repeats = ROUNDS[False]
        lines.append(f"- Mode: full: {rounds} rounds, implementations back to back within a row and "
                     f"in reverse order the second round; each worker 2 untimed warm-up calls, "
                     f"then {repeats} repeats of ~3 s")
    return lines


def render(args, rows, results: dict) -> str:
    title = "## GPU results" if args.gpu else "## CPU results"
    notes = [("Figures are the median (min–max) over the repeats of all rounds. ratio = charrnn / "
              "the faster torch column (RSS: charrnn / torch; lower is better), then in brackets "
              "the same ratio within each round. Random weights and tokens, E = H, V = 65 (names: "
              "27 with the end token).")]
    kinds = {w.kind for w in rows}
    if kinds & {"train", "rss"}:
        notes.append("Training is a full step on both sides: forward, cross-entropy, backward, "
                     "global-norm clipping at 5.0, Adam; hidden state carried across windows.")
    if "sample" in kinds:
        notes.append("Sampling: batch 1, temperature 0.8, one token per model call; charrnn "
                     "through `charrnn.sampler.generate`, on the CPU with float16 weight matrices "
                     "(`charrnn sample`'s default there; the model computes in float32) unless "
                     "the row says float32; torch in float32.")
    if "names" in kinds:
        notes.append("Names: charrnn's `generate_names` (n=1000, max_len=16, seen names allowed); "
                     "torch runs rounds of 1000 sequences stepped together (multinomial "
                     "sampling) until 1000 names pass the same filter. Same weights on both sides.")
    if "cli" in kinds:
        notes.append(f"CLI: wall time of `{' '.join(['charrnn', *cli_time.ARGS])}` as a "
                     "subprocess; first run = NUMBA_CACHE_DIR pointed at a fresh empty directory.")
    if args.gpu:
        notes.append("GPU: float32 on both sides: torch's cuDNN and matmul TF32 are turned off "
                     "(its default would round GEMM inputs to TF32); charrnn's GEMMs are "
                     "cuBLAS through CuPy, whose TF32 is off.")
    issue = [f"{w.name} {w.issue_torch}" for w in rows if w.issue_torch]
    if issue and not args.gpu:
        notes.append("The issue author's PyTorch 2.13 CPU figures, for comparison: "
                     f"{'; '.join(issue)}.")
    parts = [title, "", *header(args, rows, results), "", report.table(rows, results, args.gpu),
             "", *[f"- {n}" for n in notes]]
    rss = report.rss_table(rows, results)
    if rss:
        parts += ["", ("Peak RSS (MiB) of each worker process (VmHWM: interpreter, "
                       "libraries, model, activations, optimizer state; the highest of its "
                       "rounds), and in brackets the part mapped from files (the libraries' "
                       "code and data; it depends on how those files entered the page cache, "
                       "see `bench/worker.py`):"), "", rss]
    errs = report.errors(rows, results)
    if errs:
        parts += ["", "Errors:", "", *errs]
    slow = report.fallbacks(rows, results)
    if slow:
        parts += ["", "Fallbacks (these rows did not run the persistent kernels):", "", *slow]
    return "\n".join(parts) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, help="rewrite this file's section (e.g. BENCHMARKS.md)")
    ap.add_argument("--quick", action="store_true", help="fast smoke run: 1 warm-up call, 2 short repeats")
    ap.add_argument("--only", help="comma-separated workload names (see --list)")
    ap.add_argument("--gpu", action="store_true", help="the CUDA rows (skipped without a GPU)")
    ap.add_argument("--list", action="store_true", help="print the workload names and exit")
    ap.add_argument("--worker-timeout", type=float, metavar="S",
                    help="stop a worker after S seconds (default: 900, quick: 300); each "
                         "cell is also logged to stderr as soon as it is measured")
    args = ap.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.list:
        for w in CPU_WORKLOADS + GPU_WORKLOADS:
            print(f"{w.name:18} {w.title} ({w.unit})")
        return 0
    try:
        rows = select(args.only, args.gpu)
    except ValueError as e:
        log(f"error: {e}")
        return 2
    if args.gpu:
        from charrnn.backend import cuda_usable

        if not cuda_usable():
            print("no CUDA GPU: skipped")
            return 0
    t0 = time.perf_counter()
    results: dict[str, dict[str, Cell]] = {}
    measure_workers(rows, args.quick, results,
                    WORKER_TIMEOUT_S[args.quick] if args.worker_timeout is None
                    else args.worker_timeout)
    rss_rows(rows, results)
    cli_rows(rows, args.quick, results)
    body = render(args, rows, results)
    print(body)
    if args.out:
        report.update_file(args.out, "gpu" if args.gpu else "cpu", body)
        log(f"wrote {args.out}")
    log(f"total {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
