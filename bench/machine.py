"""What the report's header says about the machine and the libraries.

Everything is read without new dependencies: /proc/cpuinfo and /proc/meminfo, numpy's build
configuration (numpy.show_config(mode="dicts")), package metadata for versions (torch is
never imported here), and the thread settings from the environment.
"""

from __future__ import annotations

import os
import platform
from importlib import metadata


def _cpuinfo() -> dict[str, str]:
    info = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if ":" in line:
                    key, _, value = line.partition(":")
                    info.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return info


def cpu() -> str:
    info = _cpuinfo()
    model = info.get("model name") or platform.processor() or platform.machine()
    flags = set(info.get("flags", "").split())
    simd = [f for f in ("avx2", "fma", "avx512f") if f in flags]
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return f"{model}, {usable} cores usable ({os.cpu_count()} online){', ' + '/'.join(simd) if simd else ''}"


def memory() -> str:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return f"{int(line.split()[1]) / 2**20:.1f} GiB"
    except OSError:
        pass
    return "unknown"


def blas() -> str:
    """numpy's BLAS as its build configuration names it."""
    import numpy as np

    try:
        cfg = np.show_config(mode="dicts")
        b = cfg["Build Dependencies"]["blas"]
        text = f"{b.get('name', '?')} {b.get('version', '')}".strip()
        conf = b.get("openblas configuration", "")
        if conf:
            text += f" ({conf})"
        return text
    except (TypeError, KeyError, ValueError):  # older numpy: no dicts mode
        return "unknown (numpy.show_config has no dicts mode)"


def version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS",
               "NUMBA_THREADING_LAYER")


def thread_env() -> str:
    set_vars = [f"{v}={os.environ[v]}" for v in THREAD_VARS if v in os.environ]
    return ", ".join(set_vars) if set_vars else "none set (libraries' defaults)"


def summary() -> dict[str, str]:
    import numpy as np

    torch = version("torch")
    return {
        "cpu": cpu(),
        "memory": memory(),
        "os": f"{platform.system()} {platform.release()}, Python {platform.python_version()}",
        "numpy": f"{np.__version__}; BLAS: {blas()}",
        "numba": version("numba") or "not installed",
        "torch": torch or "not installed (torch columns are n/a)",
        "thread_env": thread_env(),
    }
