"""A large corpus trains in bounded memory: ids are memory-mapped, never a whole Python string."""

import os
import subprocess
import sys
import textwrap


def test_50mb_corpus_trains_in_bounded_memory(tmp_path):
    """Prepare a run on a 50 MB corpus and take a few steps in a fresh process: its peak
    resident memory stays far below the corpus as a Python str (4 bytes a char: 200 MB)."""
    corpus = tmp_path / "big.txt"
    line = ("the quick brown fox jumps over the lazy dog; " * 20 + "\n").encode()  # 901 bytes
    with open(corpus, "wb") as f:
        f.writelines(line for _ in range(50_000_000 // len(line)))
    script = textwrap.dedent(f"""
        from charrnn.backend import get_backend
        from charrnn.config import ModelConfig, TrainConfig
        from charrnn.dataset import build_dataset
        from charrnn.model import CharRNN
        from charrnn.runs import run_meta
        from charrnn.trainer import Trainer
        import numpy as np
        cfg = TrainConfig(batch_size=8, seq_len=16, steps=3, eval_every=3, eval_max_chars=2000)
        data = build_dataset([{str(corpus)!r}], cfg, cache={str(tmp_path / 'run' / 'corpus.ids')!r})
        assert isinstance(data.train.base if data.train.base is not None else data.train, np.memmap)
        mcfg = ModelConfig(vocab_size=len(data.vocab), embed=4, hidden=8, layers=1)
        model = CharRNN(mcfg, backend=get_backend("reference"))
        Trainer(model, data, cfg, {str(tmp_path / 'run')!r}, run_meta(mcfg, data, "test")).run()
        # VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec, so a child of a big
        # pytest process would report its parent's peak.
        hwm = [ln for ln in open("/proc/self/status") if ln.startswith("VmHWM:")][0]
        print(int(hwm.split()[1]) // 1024)
    """)
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300, check=False)
    assert res.returncode == 0, res.stderr
    peak_mib = int(res.stdout.strip().splitlines()[-1])
    assert peak_mib < 150, f"peak RSS {peak_mib} MiB for a 50 MB corpus"
