"""`python -m bench.gpu_check`: a one-minute look at a GPU machine before `make test-gpu`.

Prints the versions, the device, what numba-cuda finds of the CUDA libraries, and whether a
cooperative (grid-synchronised) kernel launches and is correct on a CuPy array: the
persistent recurrence and the sampling kernel need exactly that, and without it they fall
back to slower paths. Then plans the flagship layer (3x512 LSTM, B=64, float32) and prints
how the persistent kernels split it. Exit status 1 when something the GPU path needs is
missing, so a device session can stop before spending minutes on tests.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys

import numpy as np


def _libs_report() -> str:
    from numba.cuda.cudadrv import libs

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        ok = libs.test()
    return out.getvalue().rstrip() + f"\nlibs.test(): {'ok' if ok else 'FAILED'}"


def _grid_sync_works() -> bool:
    """Each of several blocks writes its id, the grid syncs, then every block reads all
    the others' ids: only a real grid barrier makes the sums right."""
    import cupy
    from numba import cuda

    @cuda.jit
    def kernel(ids, sums):
        b = cuda.blockIdx.x
        if cuda.threadIdx.x == 0:
            ids[b] = b + 1
        cuda.cg.this_grid().sync()
        if cuda.threadIdx.x == 0:
            s = 0
            for k in range(ids.shape[0]):
                s += ids[k]
            sums[b] = s

    blocks = 8
    ids, sums = cupy.zeros(blocks, np.int64), cupy.zeros(blocks, np.int64)
    kernel[blocks, 64](ids, sums)
    return bool((cupy.asnumpy(sums) == blocks * (blocks + 1) // 2).all())


def _flagship_plans() -> list[str]:
    import cupy
    from numba import cuda

    from bench.persistent_sweep import layer_case, run_variant
    from charrnn.kernels import cuda as ck

    run_variant(ck, cupy, layer_case(cupy, T=4, B=64, H=512, G=4), cuda.synchronize, 0.0)
    return [f"{key[0]} {key[1]} B={key[3]} H={key[4]}: U={p.U}, {p.blocks} blocks of "
            f"{p.threads} threads, KS={p.KS}, KT={p.KT}, {p.smem} bytes of shared memory"
            for key, p in ck._PLANS.items()]


def main() -> int:
    import numba

    problems = []
    print(f"python {sys.version.split()[0]}, numba {numba.__version__}")
    for mod in ("numba_cuda", "cupy", "torch"):
        try:
            print(f"{mod} {getattr(__import__(mod), '__version__', '(version unknown)')}")
        except ImportError:
            print(f"{mod}: not installed")
    streams = {k: v for k, v in os.environ.items() if "PER_THREAD_DEFAULT_STREAM" in k}
    if streams:  # CuPy's GEMMs and numba's kernels must share the legacy default stream
        problems.append(f"per-thread default streams set: {streams}")
    from charrnn.backend import cuda_usable

    if not cuda_usable():
        print("no usable CUDA GPU (numba-cuda, a driver and CuPy are all needed)")
        return 1
    from numba import cuda

    d = cuda.get_current_device()
    print(f"GPU: {d.name}, compute capability {d.compute_capability}, "
          f"{d.MULTIPROCESSOR_COUNT} SMs")
    print(_libs_report())
    try:
        if not _grid_sync_works():
            problems.append("a cooperative kernel ran but its grid barrier did not hold")
        else:
            print("cooperative launch with grid sync: ok")
            print("\n".join(_flagship_plans()))
    except Exception as e:  # noqa: BLE001 -- report what broke, then stop
        problems.append(f"cooperative launch failed: {type(e).__name__}: {e}")
    for p in problems:
        print(f"PROBLEM: {p}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
