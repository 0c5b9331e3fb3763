"""`python -m bench.floors [ROW ...]`: where a cpu training step's time goes, and how fast
it could go on this machine if the recurrence scaled perfectly over the threads.

A step (bench/ours.py's, as `make bench` times it) is the window kernels (each layer's
forward and backward recurrence, cpu.py) and the rest: our other kernels (loss, optimizer,
gathers, sums; each timed where it runs) and the window-wide GEMMs (OpenBLAS) with numpy's
element-wise work and Python. Each round runs `--steps` steps twice, in the order flipped
every round (only in-process pairs compare on the 2-core machine):

  shipped   the window kernels timed where they run, on numba's threads;
  serial    the same with the window kernels on one thread (everything else as shipped).

floor = the rest + serial windows / threads: the recurrence with no barriers, no imbalance
and no waiting between steps, everything else as fast as now.
roof = every product of the step (windows' and the rest's) at the best rate OpenBLAS
reaches on one large square product (sampled after every round), and no other work: what
no implementation on these cores beats.

The 2-core machine's speed drifts by tens of percent over minutes; in a slow phase the
second core is partly taken, the window kernels scale worse and the floor's gain grows.
Read a run beside its sgemm rate (~180 GFLOP/s when quiet).

Dimension letters: L=layers, H=hidden (= E), G=gate blocks, V=vocab, T=time, B=batch.
"""

from __future__ import annotations

# isort: off
import contextlib
import statistics
import sys
import time

import charrnn  # noqa: F401  (thread and allocator settings before numpy)

# isort: on

import numba
import numpy as np

from bench import ours
from bench.workloads import ALL, chosen_train_rows, train_rows_parser
from charrnn.config import GATES
from charrnn.kernels import cpu

WINDOWS = ("lstm_forward_window", "lstm_backward_window")  # the bench's rows are LSTMs


def flops_per_char(w) -> tuple[float, float]:
    """(window kernels', the rest's) FLOPs a character, a multiply-add counted as two.
    Windows: every layer's recurrent product forward and backward. Rest: layers >= 1 input
    projections, every layer's dW_hh, layers >= 1 dW_ih and dL/dx, the decoder's three;
    layer 0's input is a table lookup (its table's products are per vocabulary row, not per
    character)."""
    L, H, V, G = w.layers, w.hidden, w.vocab, GATES["lstm"]
    square = 2 * G * H * H
    return 2 * L * square, (4 * L - 3) * square + 3 * 2 * H * V


def sgemm_rate(n: int = 1536, repeats: int = 3) -> float:
    """GFLOP/s of OpenBLAS on (n x n) @ (n x n), float32, the best of repeats: the roof is
    what these cores reach at their best."""
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((n, n), np.float32), rng.standard_normal((n, n), np.float32)
    out = a @ b
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        np.matmul(a, b, out=out)
        times.append(time.perf_counter() - t)
    return 2 * n**3 / min(times) / 1e9


def _kernel_names() -> list[str]:
    """cpu's public kernels, which the backend and the optimizer call by module attribute."""
    return sorted(n for n, f in vars(cpu).items()
                  if not n.startswith("_") and callable(f) and not isinstance(f, type)
                  and (getattr(f, "__module__", None) == cpu.__name__
                       or getattr(getattr(f, "py_func", None), "__module__", None) == cpu.__name__))


@contextlib.contextmanager
def _timed_kernels(spent: dict, serial: list):
    """cpu's public kernels, each call's time added to spent[name]; the window kernels on
    one thread while serial[0]. Installed once everything is compiled: a kernel compiled
    later would find a Python wrapper where it expects a compiled function."""
    originals = {name: getattr(cpu, name) for name in _kernel_names()}

    def wrap(name, kernel):
        window = name in WINDOWS

        def timed(*args):
            threads = numba.get_num_threads()
            one = window and serial[0]
            if one:
                numba.set_num_threads(1)
            t = time.perf_counter()
            try:
                return kernel(*args)
            finally:
                spent[name] = spent.get(name, 0.0) + time.perf_counter() - t
                if one:
                    numba.set_num_threads(threads)

        return timed

    try:
        for name, kernel in originals.items():
            setattr(cpu, name, wrap(name, kernel))
        yield
    finally:
        for name, kernel in originals.items():
            setattr(cpu, name, kernel)


Round = tuple[float, float, dict]  # step ms, window kernels ms, {other kernel: ms}


def time_row(w, rounds: int, steps: int) -> tuple[dict[str, list[Round]], float]:
    """{'shipped': [...], 'serial': [...]}, a Round each round; and the best sgemm_rate,
    sampled after every round (the machine's speed drifts)."""
    spent: dict[str, float] = {}
    serial = [False]
    out: dict[str, list[Round]] = {"shipped": [], "serial": []}
    peak = 0.0
    step = ours.train_step_fn(w, "cpu")
    step(2)  # compiled (or loaded), warm, the allocator in its steady state
    with _timed_kernels(spent, serial):
        for r in range(rounds):
            for mode in list(out) if r % 2 == 0 else list(out)[::-1]:
                serial[0] = mode == "serial"
                spent.clear()
                t = time.perf_counter()
                step(steps)
                ms = {k: v / steps * 1e3 for k, v in spent.items()}
                windows = sum(v for k, v in ms.items() if k in WINDOWS)
                others = {k: v for k, v in ms.items() if k not in WINDOWS}
                out[mode].append(((time.perf_counter() - t) / steps * 1e3, windows, others))
            peak = max(peak, sgemm_rate())
    return out, peak


def summary(w, times: dict, threads: int, peak_gflops: float) -> dict:
    """Medians (ms; "others": {kernel: ms}), the floor and the roof (ms, chars/s), rates (GFLOP/s)."""
    step, windows = (statistics.median(x[i] for x in times["shipped"]) for i in (0, 1))
    serial = statistics.median(x[1] for x in times["serial"])
    names = sorted({k for x in times["shipped"] for k in x[2]})
    others = {k: statistics.median(x[2].get(k, 0.0) for x in times["shipped"]) for k in names}
    floor = step - windows + serial / threads
    chars = w.seq_len * w.batch
    win_flops, rest_flops = (f * chars for f in flops_per_char(w))
    roof = (win_flops + rest_flops) / peak_gflops / 1e6
    s = {"step": step, "windows": windows, "serial": serial, "rest": step - windows, "floor": floor,
         "roof": roof, "serial_gflops": win_flops / serial / 1e6, "others": others,
         "gemm_numpy": step - windows - sum(others.values())}
    for k in ("step", "floor", "roof"):
        s[f"{k}_cps"] = chars / s[k] * 1e3
    return s


def report(w, s: dict, threads: int, peak_gflops: float) -> str:
    others = ", ".join(f"{k} {v:.2f}" for k, v in sorted(s["others"].items(), key=lambda kv: -kv[1]))
    gain = s["floor_cps"] / s["step_cps"] - 1
    return "\n".join([
        f"{w.name} (T={w.seq_len}, B={w.batch}, {threads} threads)",
        f"  step {s['step']:.2f} ms = window kernels {s['windows']:.2f} + the rest {s['rest']:.2f}",
        (f"  the rest: our other kernels {sum(s['others'].values()):.2f} ms ({others}); "
         f"OpenBLAS's GEMMs, numpy and Python {s['gemm_numpy']:.2f} ms"),
        f"  window kernels on one thread: {s['serial']:.2f} ms ({s['serial_gflops']:.0f} GFLOP/s of products)",
        (f"  floor, the window kernels scaling perfectly: {s['floor']:.2f} ms = "
         f"{s['floor_cps']:,.0f} chars/s (now {s['step_cps']:,.0f}: {gain:+.0%})"),
        (f"  roof, every product at {peak_gflops:.0f} GFLOP/s and nothing else: "
         f"{s['roof']:.2f} ms = {s['roof_cps']:,.0f} chars/s"),
    ])


def main(argv=None) -> int:
    ap = train_rows_parser("python -m bench.floors", __doc__, "train-2x128")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--steps", type=int, default=0, help="steps a round (default: ~1 s of steps)")
    args = ap.parse_args(argv)
    names = chosen_train_rows(ap, args.rows, ["train-2x128"])
    threads = numba.get_num_threads()
    for name in names:
        w = ALL[name]
        # ~1 s a round: a step takes about T*B*H*H*L / 2.8e9 s on the 2-core machine
        steps = args.steps or max(1, round(2.8e9 / (w.seq_len * w.batch * w.hidden**2 * w.layers)))
        times, peak = time_row(w, args.rounds, steps)
        print(report(w, summary(w, times, threads, peak), threads, peak))
    return 0


if __name__ == "__main__":
    sys.exit(main())
