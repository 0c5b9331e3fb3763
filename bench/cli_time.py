"""Wall time of the real `charrnn names -n 20 --seed 1`, run as a user would run it.

Warm: one untimed run fills numba's on-disk cache (charrnn/kernels/__pycache__), then the
timed runs. First run after install: every run gets NUMBA_CACHE_DIR pointed at a fresh
empty directory, so numba finds no cached machine code and compiles what the command needs,
as on the first run after `pip install`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ARGS = ["names", "-n", "20", "--seed", "1"]
TIMEOUT_S = 300


class CliError(RuntimeError):
    pass


def command() -> list[str]:
    """The installed console script beside this interpreter, else `python -m charrnn`."""
    script = Path(sys.executable).parent / "charrnn"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "charrnn"]


def shipped_model() -> Path:
    from charrnn.runs import SHIPPED

    return SHIPPED["names"]


def _env(cache_dir: str | None) -> dict:
    env = dict(os.environ)
    env.pop("NUMBA_ENABLE_CUDASIM", None)  # a user's shell does not set it
    if cache_dir is None:
        env.pop("NUMBA_CACHE_DIR", None)
    else:
        env["NUMBA_CACHE_DIR"] = cache_dir
    return env


def _run_once(cache_dir: str | None) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(command() + ARGS, env=_env(cache_dir), capture_output=True, text=True,
                          check=False, timeout=TIMEOUT_S, stdin=subprocess.DEVNULL)
    dt = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["(no output)"]
        raise CliError(f"exit {proc.returncode}: {tail[0][:200]}")
    return dt


def warm(repeats: int) -> list[float]:
    _run_once(None)  # fills the cache
    return [_run_once(None) for _ in range(repeats)]


def first_run(repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        cache = tempfile.mkdtemp(prefix="charrnn-bench-numba-")
        try:
            times.append(_run_once(cache))
        finally:
            shutil.rmtree(cache, ignore_errors=True)
    return times
