"""`python -m bench.peaks [ROW] [--recompute N]`: where a training step's memory peaks.

Runs the bench's train step of ROW (default train-3x512; bench/ours.py, the same step as the
rows of `make bench`) twice, then once more with the kernel's peak-RSS mark (VmHWM) reset
around each layer-level call (/proc/self/clear_refs, Linux): for each call, the resident
memory before it, its peak during the call and after it, in MiB of the whole process. A
`before` above what the arrays still needed at that point account for points at a leak
earlier in the step: this is how session 13 found names in the model that kept freed
layers alive (BENCHMARKS.md notes).

glibc keeps freed heap blocks resident (charrnn/__init__.py), so `before` includes that
slack; run with MALLOC_MMAP_THRESHOLD_=4194304 in the environment to see live memory only
(arrays of 4 MiB and more are then mapped and returned at once).
"""

from __future__ import annotations

# isort: off
import argparse
import contextlib
import functools
import sys
from dataclasses import replace

import charrnn  # noqa: F401  (thread and allocator settings before numpy, as ours.py)

# isort: on

from bench import ours
from bench.worker import status_mib
from bench.workloads import ALL
from charrnn import backend, model

WATCHED = ((backend.HostBackend, ("layer_forward", "layer_backward", "recompute_gates", "rebuild_states")),
           (model.CharRNN, ("_input_projection",)))
WARM_STEPS = 2


def _mib(field: str) -> int:
    return round(status_mib(field))


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # 5: reset the peak resident set size to the current one


@contextlib.contextmanager
def _watched(log: list):
    """The WATCHED methods, each call appending (name, before, peak, after) to log."""
    originals = [(cls, name, getattr(cls, name)) for cls, names in WATCHED for name in names]

    def wrap(name, call):
        @functools.wraps(call)
        def watched(*args, **kwargs):
            before = _mib("VmRSS")
            _reset_peak()
            out = call(*args, **kwargs)
            log.append((name, before, _mib("VmHWM"), _mib("VmRSS")))
            _reset_peak()
            return out

        return watched

    try:
        for cls, name, call in originals:
            setattr(cls, name, wrap(name, call))
        yield
    finally:
        for cls, name, call in originals:
            setattr(cls, name, call)


def step_peaks(w) -> list[tuple[str, int, int, int]]:
    """One training step of workload w after WARM_STEPS: (call, before, peak, after) MiB."""
    step = ours.train_step_fn(w, "cpu")
    step(WARM_STEPS)  # compiled kernels loaded, the allocator in its steady state
    log: list = []
    with _watched(log):
        _reset_peak()
        step(1)
    return log


def main(argv=None) -> int:
    rows = sorted(n for n, w in ALL.items() if w.kind == "train" and not w.gpu)
    ap = argparse.ArgumentParser(prog="python -m bench.peaks", description=__doc__.splitlines()[0])
    ap.add_argument("row", nargs="?", default="train-3x512", choices=rows)
    ap.add_argument("--recompute", type=int, help="--recompute N (default: the row's own)")
    args = ap.parse_args(argv)
    if not sys.platform.startswith("linux"):
        print("bench.peaks needs Linux (/proc/self/clear_refs)", file=sys.stderr)
        return 1
    w = ALL[args.row]
    if args.recompute is not None:
        w = replace(w, recompute=args.recompute)
    log = step_peaks(w)
    print(f"{w.name}, recompute {w.recompute}: one training step, resident MiB of the process")
    print(f"{'call (in order)':<20}{'before':>8}{'peak':>8}{'after':>8}")
    for name, before, peak, after in log:
        print(f"{name:<20}{before:>8}{peak:>8}{after:>8}")
    print(f"highest peak within a call: {max(p for _, _, p, _ in log)} MiB (of which mapped from "
          f"files, the libraries' pages: {_mib('RssFile')} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
