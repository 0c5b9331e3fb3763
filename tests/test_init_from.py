"""`charrnn train --init-from`: a new run that starts from a checkpoint's weights (fine-tuning)."""

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from texts import PROSE

from charrnn import checkpoint
from charrnn.cli import main
from charrnn.data import fingerprint

SMALL = ["--layers", "1", "--hidden", "16", "--embed", "8", "--batch-size", "4", "--seq-len", "16",
         "--warmup", "5", "--eval-every", "10"]


@pytest.fixture
def runner(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "play.txt").write_text(PROSE)
    return CliRunner()


def _run(runner, *args, code=0):
    res = runner.invoke(main, list(args))
    assert res.exit_code == code, res.output
    assert "Traceback" not in res.output
    return res


def _base(runner):
    """A small trained run to start from: checkpoints/base."""
    _run(runner, "train", "play.txt", *SMALL, "--steps", "60", "--lr", "1e-2", "--dropout", "0.1", "--out",
         "checkpoints/base")
    return Path("checkpoints/base/best.safetensors")


def _params(path):
    tensors, _ = checkpoint.load(path)
    return {n: t for n, t in tensors.items() if not n.startswith(("train.", "data."))}


def test_starts_from_the_checkpoint_weights_with_its_architecture_and_vocab(runner):
    base = _base(runner)
    # An update far below float32 resolution: the new run's weights are the checkpoint's, bit for bit.
    _run(runner, "train", "play.txt", "--init-from", "checkpoints/base", "--steps", "1", "--lr", "1e-30",
         "--warmup", "1", "--batch-size", "4", "--seq-len", "16", "--out", "checkpoints/tuned")
    tuned = Path("checkpoints/tuned/latest.safetensors")
    before, after = _params(base), _params(tuned)
    assert before.keys() == after.keys()
    for n in before:
        np.testing.assert_array_equal(after[n], before[n], err_msg=n)
    meta, src = checkpoint.read_meta(tuned), checkpoint.read_meta(base)
    assert meta["model"] == src["model"]  # 1x16, embed 8, dropout 0.1: all from the checkpoint
    assert meta["vocab"] == src["vocab"]
    assert meta["init_from"]["fingerprint"] == fingerprint([base])
    assert meta["init_from"]["path"] == str(base.resolve())
    shown = _run(runner, "info", "-c", "checkpoints/tuned").output
    assert f"init from   {base.resolve()} ({fingerprint([base])})" in shown


def test_fine_tuning_starts_where_the_checkpoint_left_off(runner):
    """The first logged training loss of a fine-tuning run is far below a fresh run's."""
    _base(runner)
    common = ["--steps", "10", "--eval-every", "10", "--batch-size", "4", "--seq-len", "16", "--lr", "1e-3"]
    _run(runner, "train", "play.txt", "--init-from", "checkpoints/base", *common, "--out", "checkpoints/tuned")
    _run(runner, "train", "play.txt", *SMALL, *common, "--out", "checkpoints/fresh")

    def losses(run):
        return [json.loads(ln)["train_loss"] for ln in Path(run, "metrics.jsonl").read_text().splitlines()]

    tuned, fresh = losses("checkpoints/tuned")[0], losses("checkpoints/fresh")[0]  # means over steps 1-10
    base_end = losses("checkpoints/base")[-1]
    assert tuned < fresh - 0.5, (tuned, fresh)
    assert abs(tuned - base_end) < 0.25, (tuned, base_end)


def test_regularisation_may_change_but_not_the_architecture(runner):
    _base(runner)
    _run(runner, "train", "play.txt", "--init-from", "checkpoints/base", "--dropout", "0.3", "--steps", "2",
         "--batch-size", "4", "--seq-len", "16", "--out", "checkpoints/tuned")
    assert checkpoint.read_meta(Path("checkpoints/tuned/latest.safetensors"))["model"]["dropout"] == 0.3
    res = _run(runner, "train", "play.txt", "--init-from", "checkpoints/base", "--hidden", "32", code=1)
    assert "--hidden 32 differs from the --init-from checkpoint's 16" in res.output
    # repeating the checkpoint's own value is fine
    _run(runner, "train", "play.txt", "--init-from", "checkpoints/base", "--hidden", "16", "--steps", "1",
         "--batch-size", "4", "--seq-len", "16", "--out", "checkpoints/same")


def test_bad_init_from_inputs(runner, tmp_path):
    _base(runner)
    (tmp_path / "other.txt").write_text("Zebras quietly queue, jumping over lazy xylophones! " * 40)
    res = _run(runner, "train", "other.txt", "--init-from", "checkpoints/base", code=1)
    assert "character 'Z' (U+005A) is not in the model's vocabulary" in res.output
    assert len(res.output.strip().splitlines()) == 1
    res = _run(runner, "train", "play.txt", "--init-from", "nowhere.safetensors", code=1)
    assert "no checkpoint at nowhere.safetensors" in res.output
    res = _run(runner, "train", "--resume", "checkpoints/base", "--init-from", "checkpoints/base", code=1)
    assert "pick one" in res.output


def test_from_a_float16_export_and_through_a_resume(runner):
    _base(runner)
    _run(runner, "export", "checkpoints/base", "base16.safetensors")  # as shipped models are stored
    _run(runner, "train", "play.txt", "--init-from", "base16.safetensors", "--steps", "1", "--lr", "1e-30",
         "--warmup", "1", "--batch-size", "4", "--seq-len", "16", "--eval-every", "1", "--out", "checkpoints/t16")
    src = _params(Path("base16.safetensors"))
    got = _params(Path("checkpoints/t16/latest.safetensors"))
    for n in src:  # float32 from here on, holding exactly the float16 values
        assert got[n].dtype == np.float32
        np.testing.assert_array_equal(got[n], src[n].astype(np.float32), err_msg=n)
    _run(runner, "train", "--resume", "checkpoints/t16", "--steps", "3")
    meta = checkpoint.read_meta(Path("checkpoints/t16/latest.safetensors"))
    assert meta["train"]["step"] == 3
    assert meta["init_from"]["fingerprint"] == fingerprint([Path("base16.safetensors")])


def test_options_that_cannot_apply_to_the_checkpoint(runner):
    _base(runner)
    res = _run(runner, "train", "play.txt", "--init-from", "checkpoints/base", "--lines", code=1)
    assert "is a prose model: its vocabulary has no end token" in res.output
    res = _run(runner, "train", "play.txt", "--init-from", "checkpoints/base", "--max-vocab", "5", code=1)
    assert "--max-vocab cannot be used with --init-from" in res.output
