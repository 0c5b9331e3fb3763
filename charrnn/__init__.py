"""charrnn: character-level recurrent language models on numpy + numba."""

import os

# Set before numpy and numba start their thread pools (an explicit user setting wins).
# Our numba kernels and OpenBLAS's GEMMs alternate every time step; threads that spin after
# finishing steal the other pool's cores. Measured on 2 cores, a 2-layer H=512 LSTM batch
# (T=25, B=64): numba's OpenMP default 996 ms, passive waits 354 ms; OpenBLAS's threads
# sleeping after 2^4 cycles instead of spinning: 336 -> 272 ms.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

__version__ = "0.1.0"
