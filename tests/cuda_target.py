"""Where the CUDA tests run: numba's CUDA simulator (NUMBA_ENABLE_CUDASIM=1, which `make test`
sets) or a real GPU. Test modules call `require()` before importing numba.cuda."""

import os

import pytest


def require() -> bool:
    """Skip the calling module unless numba-cuda is installed and the simulator is on or a GPU is
    usable. Returns True under the simulator (tiny shapes, no grid-wide barrier)."""
    pytest.importorskip("numba.cuda", reason="numba-cuda is not installed (pip install numba-cuda)")
    from charrnn.backend import cuda_usable

    sim = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
    if not sim and not cuda_usable():
        pytest.skip("no CUDA GPU and NUMBA_ENABLE_CUDASIM is not 1 (run `make test`, which sets it)",
                    allow_module_level=True)
    return sim
