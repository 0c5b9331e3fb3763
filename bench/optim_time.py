"""`python -m bench.optim_time [ROW ...]`: what a training step's optimizer costs on the cpu.

For each training row (default: every cpu one) on its model's parameters: the global norm
and the Adam update as the optimizer runs them (one kernel call each over all parameters,
`adam_update_all` and `sum_squares_total`), against one call a parameter (what they were
before session 14: a dispatch and a parallel region each). The two run alternately in one
process, in the order flipped every round (the 2-core machine's speed drifts over minutes:
only such in-process pairs compare); median and min over the rounds, in us a step.
"""

from __future__ import annotations

# isort: off
import statistics
import sys
import time

import charrnn  # noqa: F401  (thread and allocator settings before numpy)

# isort: on

import numpy as np

from bench import ours
from bench.workloads import ALL, chosen_train_rows, cpu_train_rows, train_rows_parser
from charrnn.kernels import cpu

ARGS = (1e-3, 0.9, 0.999, 1e-8, 0.1, 0.001)  # lr, beta1, beta2, eps, bc1, bc2


def variants(w):
    """(name, function) pairs: one optimizer step's norm and update of workload w's model."""
    ps = list(ours.build_model(w, "cpu").params.values())
    rng = np.random.default_rng(0)
    gs = [(rng.standard_normal(p.shape) * 1e-3).astype(p.dtype) for p in ps]
    ms, vs = [np.zeros_like(p) for p in ps], [np.zeros_like(p) for p in ps]
    zeros = [0.0] * len(ps)

    def one_call():
        cpu.sum_squares_total(gs)
        cpu.adam_update_all(ps, gs, ms, vs, *ARGS, zeros, zeros)

    def a_call_a_parameter():
        sum(cpu.sum_squares(g) for g in gs)
        for p, g, m, v in zip(ps, gs, ms, vs):
            cpu.adam_update(p, g, m, v, *ARGS, 0.0, 0.0)

    return [("one call", one_call), ("a call a parameter", a_call_a_parameter)]


def time_row(w, rounds: int, calls: int) -> dict[str, list[float]]:
    """us a step of each variant, one figure a round."""
    pairs = variants(w)
    for _, f in pairs:  # compiled (or loaded) and warm
        f()
    out: dict[str, list[float]] = {name: [] for name, _ in pairs}
    for r in range(rounds):
        for name, f in pairs if r % 2 == 0 else pairs[::-1]:
            t = time.perf_counter()
            for _ in range(calls):
                f()
            out[name].append((time.perf_counter() - t) / calls * 1e6)
    return out


def main(argv=None) -> int:
    ap = train_rows_parser("python -m bench.optim_time", __doc__, "all")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--calls", type=int, default=20, help="steps timed together in a round")
    args = ap.parse_args(argv)
    names = chosen_train_rows(ap, args.rows, cpu_train_rows())
    print(f"{'row':<24}{'variant':<22}{'median us':>10}{'min us':>9}")
    for name in names:
        for variant, times in time_row(ALL[name], args.rounds, args.calls).items():
            print(f"{name:<24}{variant:<22}{statistics.median(times):>10.0f}{min(times):>9.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
