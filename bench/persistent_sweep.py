"""`python -m bench.persistent_sweep [--rows 4,8] [--prefetch 8,16] [--threads 128,256]`:
the persistent recurrence's tile constants, each combination timed on one flagship LSTM
layer window (H=512, B=64, T=100, float32, a dropout mask), forward and backward.

Every variant's outputs (hs, dxp, dh0) are compared with the first variant's: a constant
changes how the sums are split, so they agree to float32 rounding, not bit for bit; a
larger difference is a bug and the row says so. The plan each variant got (units a block,
threads, k-splits, tile rows) is printed beside it, since the planner may give two
settings the same plan. Needs a GPU; how BENCHMARKS.md's v4 sweep was taken.

Dimension letters: T=time, B=batch, H=hidden, G=gate blocks.
"""

from __future__ import annotations

import argparse
import itertools
import sys

import numpy as np

from bench.gpu_kernels import FLAGSHIP, per_call

AGREE = 1e-5  # largest relative difference from the first variant that is still rounding


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def layer_case(xp, T: int, B: int, H: int, G: int, seed: int = 0) -> dict:
    """Random device inputs of one LSTM layer window and its upstream gradient."""
    rng = np.random.default_rng(seed)

    def dev(*shape, scale=0.1):
        return xp.asarray((rng.standard_normal(shape) * scale).astype(np.float32))

    return {"xp": dev(T, B, G * H), "w_hh": dev(G * H, H, scale=H ** -0.5), "b_hh": dev(G * H),
            "h0": dev(B, H), "c0": dev(B, H),
            "hmask": xp.asarray(((rng.random((B, H)) > 0.2) / 0.8).astype(np.float32)),
            "dhs": dev(T, B, H)}


def run_variant(ck, xp, case: dict, sync, min_time: float):
    """(forward s, backward s, outputs) of the persistent kernels as ck's constants stand."""
    T, B, GH = case["xp"].shape
    H = GH // 4
    hs, act, cs, dxp = (xp.empty(s, np.float32) for s in [(T, B, H), (T, B, GH), (T, B, H),
                                                         (T, B, GH)])
    dc, dh0 = xp.zeros((B, H), np.float32), xp.empty((B, H), np.float32)

    def forward():
        ck.persistent_layer_forward("lstm", case["xp"], case["w_hh"], case["b_hh"], case["h0"],
                                    case["c0"], case["hmask"], hs, act, cs, None)

    def backward():
        dc[...] = 0
        ck.persistent_layer_backward("lstm", case["w_hh"], case["hmask"], case["h0"], case["c0"],
                                     hs, act, cs, None, case["dhs"], dxp, None, dc, None, dh0)

    tf = per_call(forward, sync, min_time)
    tb = per_call(backward, sync, min_time)
    host = getattr(xp, "asnumpy", np.asarray)
    return tf, tb, [host(a).astype(np.float64) for a in (hs, dxp, dh0)]


def sweep(ck, xp, sync, rows, prefetch, threads, shape=FLAGSHIP,
          min_time: float = 0.2) -> list[str]:
    """One markdown table line a combination (the header first)."""
    case = layer_case(xp, shape.T, shape.B, shape.H, shape.G)
    lines = ["| ROWS | PREFETCH | threads cap | forward ms | backward ms | vs first | plans |",
             "|---:|---:|---:|---:|---:|---|---|"]
    first = None
    for r, p, t in itertools.product(rows, prefetch, threads):
        ck.ROWS, ck.PREFETCH, ck.PERSISTENT_THREADS = r, p, t
        ck._PLANS.clear()
        try:
            tf, tb, outs = run_variant(ck, xp, case, sync, min_time)
        except ck.PersistentUnavailable as e:
            lines.append(f"| {r} | {p} | {t} | — | — | not run: {str(e)[:80]} | |")
            continue
        first = first or outs
        diff = max(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30) for a, b in zip(outs, first))
        agree = f"{diff:.1e}" if diff <= AGREE else f"**DIFFERS {diff:.1e}**"
        plans = "; ".join(f"{k[0]}: U={v.U} nt={v.threads} KS={v.KS} KT={v.KT}"
                          for k, v in ck._PLANS.items())
        lines.append(f"| {r} | {p} | {t} | {tf * 1e3:.3f} | {tb * 1e3:.3f} | {agree} | {plans} |")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.persistent_sweep",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=_ints, default=[4, 8], help="ROWS values (comma-separated)")
    ap.add_argument("--prefetch", type=_ints, default=[8, 16], help="PREFETCH values")
    ap.add_argument("--threads", type=_ints, default=[128, 256], help="PERSISTENT_THREADS values")
    args = ap.parse_args(argv)
    from charrnn.backend import cuda_usable

    if not cuda_usable():
        print("no CUDA GPU: skipped")
        return 0
    import cupy
    from numba import cuda

    from charrnn.kernels import cuda as ck

    print("\n".join(sweep(ck, cupy, cuda.synchronize, args.rows, args.prefetch, args.threads)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
