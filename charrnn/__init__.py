"""charrnn: character-level recurrent language models on numpy + numba."""

import ctypes
import os
import sys

# Whether the user chose how idle OpenMP threads wait: then charrnn never changes it. A
# process started by one that imported charrnn inherits charrnn's own settings, marked by
# CHARRNN_OMP: those are not the user's (and a sampling parent's spin count is dropped).
_INHERITED = os.environ.get("CHARRNN_OMP") == "1"
if _INHERITED:
    os.environ.pop("GOMP_SPINCOUNT", None)
USER_WAIT_POLICY = not _INHERITED and ("OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ)

# Set before numpy and numba start their thread pools (an explicit user setting wins).
# Our numba kernels and OpenBLAS's GEMMs alternate every time step; threads that spin after
# finishing steal the other pool's cores. Measured on 2 cores, a 2-layer H=512 LSTM batch
# (T=25, B=64): numba's OpenMP default 996 ms, passive waits 354 ms; OpenBLAS's threads
# sleeping after 2^4 cycles instead of spinning: 336 -> 272 ms.
if not USER_WAIT_POLICY:
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    os.environ["CHARRNN_OMP"] = "1"
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")


def _keep_freed_memory() -> bool:
    """Let glibc keep freed blocks up to 32 MiB for reuse instead of handing them back to the
    kernel. Every training or evaluation window allocates and frees the same arrays
    ((T,B,G*H) activations, gradients); returned to the kernel, each is faulted in again,
    page by page, on the next window (~2.6 us a 4 KiB page on the 2-core VM: 1,635 faults
    were 4.3 ms of a 16.6 ms 2x128 step). Arrays above 32 MiB (glibc's limit) are still
    mapped fresh. The cost: the process does not shrink after its peak. A user's own
    MALLOC_*/GLIBC_TUNABLES settings stand. True when the settings took effect."""
    if not sys.platform.startswith("linux") or any(
            k.startswith("MALLOC_") or k == "GLIBC_TUNABLES" for k in os.environ):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    return bool(mallopt(M_MMAP_THRESHOLD, 32 << 20)) and bool(mallopt(M_TRIM_THRESHOLD, 1 << 30))


MALLOC_TUNED = _keep_freed_memory()

# Spin iterations of an idle OpenMP thread before it sleeps, for batch-1 generation:
# libgomp's own default when no wait policy is given.
GENERATION_SPINCOUNT = "300000"


def spin_for_generation() -> None:
    """Let idle OpenMP threads spin briefly instead of sleeping at once. Batch-1 generation
    launches one parallel region per layer per character, microseconds apart, with no
    OpenBLAS pool beside it: a sleeping thread takes ~10-30 us to wake for each. 3x512 on 2
    cores, float16 weights: 262 -> 188 us a character. libgomp reads this when numba's
    pool starts (the process's first parallel kernel), so a command calls it before it
    loads a model; later, and over a user's own setting, it does nothing."""
    if not USER_WAIT_POLICY:
        os.environ["GOMP_SPINCOUNT"] = GENERATION_SPINCOUNT


def restore_row_stack(np_module) -> None:
    """numba-cuda (0.30.4 and earlier) overloads np.row_stack when it compiles its first
    kernel; numpy 2.5 removed that alias of np.vstack, and every CUDA kernel then failed
    with AttributeError (seen on the GPU machine: numpy 2.5.2, numba-cuda 0.30.4). Puts the
    alias back where it is missing, as the same function numpy had."""
    if not hasattr(np_module, "row_stack"):
        np_module.row_stack = np_module.vstack


import numpy  # here, after the thread settings above, which numpy reads once

restore_row_stack(numpy)

__version__ = "0.1.0"
