"""charrnn keeps freed memory for reuse (charrnn._keep_freed_memory): a training step's
arrays come from the heap again instead of being faulted in page by page every window."""

import json
import os
import subprocess
import sys

import pytest

# Minor page faults per step of a 2x128 LSTM (T=16, B=64: its (T,B,4H) arrays are 2 MiB)
# after warm-up steps, printed with charrnn's MALLOC_TUNED.
SCRIPT = """
import json, resource
import numpy as np
import charrnn
from charrnn.backend import get_backend
from charrnn.config import ModelConfig
from charrnn.model import CharRNN, init_params

cfg = ModelConfig(cell="lstm", vocab_size=65, embed=128, hidden=128, layers=2)
model = CharRNN(cfg, params=init_params(cfg, 0), backend=get_backend("cpu"))
ids = np.random.default_rng(0).integers(0, 65, (17, 64)).astype(np.int32)

def step():
    logits, _, cache = model.forward(ids[:-1], model.zero_state(64), train=True)
    _, dl, _ = model.loss(logits, ids[1:])
    model.backward(cache, dl)

for _ in range(3):
    step()
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    step()
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / 5
print(json.dumps({"tuned": charrnn.MALLOC_TUNED, "faults": faults}))
"""

glibc = pytest.mark.skipif(not sys.platform.startswith("linux") or os.confstr("CS_GNU_LIBC_VERSION") is None,
                           reason="glibc's mallopt")


def _run(extra_env: dict) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    env.update(extra_env, OPENBLAS_NUM_THREADS="1", NUMBA_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True,
                         timeout=300, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@glibc
def test_training_steps_reuse_freed_memory():
    res = _run({})
    assert res["tuned"] is True
    assert res["faults"] < 50  # ~0 measured; ~1,600 a step when glibc hands the arrays back


@glibc
def test_a_users_malloc_settings_stand_and_show_what_tuning_saves():
    # MALLOC_ARENA_MAX is any user setting: charrnn then leaves glibc as it is, and each
    # step faults its arrays in again (the cost the tuning removes).
    res = _run({"MALLOC_ARENA_MAX": "8"})
    assert res["tuned"] is False
    assert res["faults"] > 500
