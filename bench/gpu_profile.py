"""`python -m bench.gpu_profile [steps|sync|layer]`: where the GPU time goes.

  steps      one bench row at a time (train 3x512, names 1000, sample 3x512) under
             torch.profiler: the GPU kernels' total time against the wall time (the rest is
             the host: Python, launches, copies, syncs), and the costliest kernels.
  sync       the cost of one grid barrier (cuda.cg.this_grid().sync()) at the persistent
             kernels' grid sizes, and the host cost of a launch: numba's own (on CuPy and
             on numba arrays), kernels/cuda.py's _run, CuPy's.
  layer      one persistent forward, one backward and one 256-character generation, each
             launched once: the program for Nsight Compute, as session 12 ran it:
               ncu --kernel-name-base mangled -k "regex:_forward_kernel|_backward_kernel|cooperative" \
                   -c 3 --section SpeedOfLight --section WarpStateStats --section LaunchStats \
                   --section Occupancy python3 -m bench.gpu_profile layer

Needs a GPU (and torch for `steps`). Dimension letters as in bench/gpu_kernels.py.
"""

from __future__ import annotations

import sys
import time

import numpy as np


def _rows_under_profiler(name: str, calls: int) -> None:
    import torch
    from numba import cuda
    from torch.profiler import ProfilerActivity, profile

    from bench import ours
    from bench.workloads import ALL

    w = ALL[name]
    step = ours.STEP_FNS[w.kind](w, "cuda")
    step(1)
    step(1)
    cuda.synchronize()
    t0 = time.perf_counter()
    step(calls)
    cuda.synchronize()
    wall = (time.perf_counter() - t0) / calls
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step(calls)
        cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    busy = sum(e.time_range.elapsed_us() for e in kernels) / 1e6 / calls  # us -> s a call
    print(f"\n## {name}: {wall * 1e3:.2f} ms a call (wall), GPU kernels {busy * 1e3:.2f} ms "
          f"({busy / wall:.0%}), {len(kernels) / calls:.0f} kernels a call")
    by_name: dict = {}
    for e in kernels:
        n, t = by_name.get(e.name, (0, 0.0))
        by_name[e.name] = (n + 1, t + e.time_range.elapsed_us())
    top = sorted(by_name.items(), key=lambda kv: -kv[1][1])[:14]
    for kname, (n, t) in top:
        print(f"  {t / calls / 1e3:8.3f} ms  {n / calls:6.1f}x  {kname[:110]}")


def steps() -> None:
    for name, calls in (("gpu-train-3x512", 3), ("gpu-names-1000", 3), ("gpu-sample-3x512", 2)):
        _rows_under_profiler(name, calls)


def sync() -> None:
    import cupy
    from numba import cuda

    from charrnn.kernels import cuda as ck

    @cuda.jit
    def barriers(n, out):
        g = cuda.cg.this_grid()
        for _ in range(n):
            g.sync()
        if cuda.grid(1) == 0:
            out[0] = n

    out = cuda.device_array(1, np.int64)
    for blocks, threads in ((128, 256), (132, 256), (256, 256), (264, 256)):
        try:
            barriers[blocks, threads](10, out)
            cuda.synchronize()
            t0 = time.perf_counter()
            barriers[blocks, threads](2000, out)
            cuda.synchronize()
            dt = time.perf_counter() - t0
            print(f"grid sync, {blocks} blocks of {threads}: {dt / 2000 * 1e6:.2f} us each")
        except Exception as e:  # noqa: BLE001 -- report and go on
            print(f"grid sync, {blocks} blocks of {threads}: {type(e).__name__}: {e}")
    a = cupy.ones((64, 512), np.float32)
    o = cupy.empty((512, 64), np.float32)
    k, g = ck._masked_transpose_kernel, ck._grid(a.size)
    da, do = cuda.as_cuda_array(a), cuda.as_cuda_array(o)
    launches = {  # the same 4-argument kernel, three ways
        "numba's launch, CuPy arrays": lambda: k[g, ck.THREADS](a, a, 1, o),
        "numba's launch, numba arrays": lambda: k[g, ck.THREADS](da, da, 1, do),
        "charrnn's _run, CuPy arrays": lambda: ck._run(k, g, ck.THREADS, 0, a, a, 1, o),
        "a CuPy element-wise kernel": lambda: o.__setitem__(Ellipsis, a.T),
    }
    for label, launch in launches.items():
        launch()  # compiles (or loads) the kernel
        cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(500):
            launch()
        host = (time.perf_counter() - t0) / 500
        cuda.synchronize()
        print(f"host cost of a launch, {label}: {host * 1e6:.1f} us")


def layer() -> None:
    import cupy
    from numba import cuda

    from bench.persistent_sweep import layer_case
    from charrnn.kernels import cuda as ck
    from charrnn.kernels import cuda_generate as cg

    c = layer_case(cupy, T=100, B=64, H=512, G=4)
    T, B, GH = c["xp"].shape
    H = GH // 4
    hs, act, cs, dxp = (cupy.empty(s, np.float32) for s in [(T, B, H), (T, B, GH), (T, B, H),
                                                           (T, B, GH)])
    dc, dh0 = cupy.zeros((B, H), np.float32), cupy.empty((B, H), np.float32)
    ck.persistent_layer_forward("lstm", c["xp"], c["w_hh"], c["b_hh"], c["h0"], c["c0"],
                                c["hmask"], hs, act, cs, None)
    ck.persistent_layer_backward("lstm", c["w_hh"], c["hmask"], c["h0"], c["c0"], hs, act, cs,
                                 None, c["dhs"], dxp, None, dc, None, dh0)
    L, H, V, G, n = 3, 512, 65, 4, 256
    rng = np.random.default_rng(0)

    def rand(*shape):
        return cupy.asarray((rng.standard_normal(shape) * 0.05).astype(np.float32))

    out = cupy.empty(n, np.int64)
    cg.generate_ids("lstm", False, rand(V, G * H), rand(L - 1, G * H, H), rand(L - 1, G * H),
                    rand(L, G * H, H), rand(L, G * H), rand(V, H), rand(V), rand(L, H),
                    rand(L, H), 0, 0.8, 0, 1.0, cupy.asarray(rng.random(n)), 0, out)
    cuda.synchronize()


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    for w in argv or ["sync", "steps"]:
        {"steps": steps, "sync": sync, "layer": layer}[w]()
    return 0


if __name__ == "__main__":
    sys.exit(main())
