"""The command line as a user meets it: an end-to-end run, and one clear line for bad input."""

import io
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from texts import NAMES, PROSE

from charrnn import checkpoint
from charrnn.cli import main
from charrnn.runs import Loaded


@pytest.fixture
def runner(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return CliRunner()


def _ok(result):
    assert result.exit_code == 0, result.output
    return result


def _train(runner, corpus, *extra):
    args = ["train", str(corpus), "--layers", "1", "--hidden", "16", "--embed", "8", "--batch-size", "4",
            "--seq-len", "16", "--steps", "30", "--eval-every", "10", "--warmup", "5", "--lr", "1e-2", *extra]
    return _ok(runner.invoke(main, args))


def test_end_to_end_train_sample_eval_score_info(runner, tmp_path):
    (tmp_path / "play.txt").write_text(PROSE)
    res = _train(runner, tmp_path / "play.txt")
    run = tmp_path / "checkpoints" / "play"
    assert (run / "best.safetensors").is_file() and (run / "latest.safetensors").is_file()
    metrics = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["step"] == 30 and metrics[-1]["val_loss"] is not None
    assert "sample with: charrnn sample -c checkpoints/play" in res.output

    a = _ok(runner.invoke(main, ["sample", "-n", "60", "--seed", "7"])).output
    b = _ok(runner.invoke(main, ["sample", "-n", "60", "--seed", "7"])).output
    assert a == b and len(a) >= 60  # newest run by default; same seed, same text
    c = _ok(runner.invoke(main, ["sample", "-n", "60", "--seed", "8"])).output
    assert c != a
    two = _ok(runner.invoke(main, ["sample", "-n", "20", "-t", "0.5", "-t", "1.2", "--seed", "1"])).output
    assert "--- temperature 0.5 ---" in two and "--- temperature 1.2 ---" in two
    half = _ok(runner.invoke(main, ["sample", "-n", "40", "--seed", "7", "--half"])).output
    assert len(half) >= 40  # float16 weights sample too (the same text is checked in test_sampler)
    primed = _ok(runner.invoke(main, ["sample", "-n", "10", "--prime", "All:", "--argmax"])).output
    assert primed.startswith("All:")

    # Sampling streams float16 weights by default. For an exported (float16) model those are
    # the very values it stores, so the same text as upcasting them to float32 first.
    _ok(runner.invoke(main, ["export", str(run), "small.safetensors"]))
    calls = []
    from charrnn import sampler

    real = sampler.prepare

    def spy(model, half):  # the precision asked for, or the default's pick
        if half is not None:
            calls.append(half)
        prep = real(model, half)
        if half is None:
            calls.append(prep.half)
        return prep

    sampler.prepare = spy
    try:
        auto = _ok(runner.invoke(main, ["sample", "-c", "small.safetensors", "-n", "300", "--seed", "3"])).output
        full = _ok(runner.invoke(main, ["sample", "-c", "small.safetensors", "-n", "300", "--seed", "3",
                                        "--no-half"])).output
        _ok(runner.invoke(main, ["sample", "-n", "5", "--seed", "3"]))  # a float32 run checkpoint
        # weights beyond float16's range: float32 unless asked, then one line
        tensors, meta = checkpoint.load(run / "best.safetensors")
        tensors["rnn.weight_hh_l0"][0, 0] = 7e4
        checkpoint.save(tmp_path / "wide.safetensors", tensors, meta)
        _ok(runner.invoke(main, ["sample", "-c", "wide.safetensors", "-n", "5", "--seed", "3"]))
        _fails(runner, ["sample", "-c", "wide.safetensors", "-n", "5", "--half"],
               "rnn.weight_hh: a weight of magnitude 70000 overflows float16")
    finally:
        sampler.prepare = real
    assert calls == [True, False, True, False, True]
    assert auto == full

    ev = json.loads(_ok(runner.invoke(main, ["eval", "--json"])).output)
    assert ev["tokens"] > 100 and 0 < ev["nats_per_char"] < 4.5
    assert abs(ev["bits_per_char"] - ev["nats_per_char"] / np.log(2)) < 1e-9
    text = _ok(runner.invoke(main, ["eval", str(tmp_path / "play.txt")])).output
    assert "nats/char" in text and "bits/char" in text

    sc = json.loads(_ok(runner.invoke(main, ["score", "--json", "Speak, speak.", "kaeps ,kaepS"])).output)
    assert sc["scores"][0]["logprob"] > sc["scores"][1]["logprob"]  # the corpus's own line is likelier

    inf = json.loads(_ok(runner.invoke(main, ["info", "--json"])).output)
    assert inf["model"]["hidden"] == 16 and inf["step"] == 30 and inf["mode"] == "stream"
    assert inf["command"].startswith("charrnn train")
    assert "parameters" in _ok(runner.invoke(main, ["info"])).output
    assert inf["stored_as"] == "float32"  # a run's checkpoint; its export stores float16
    shown = _ok(runner.invoke(main, ["info", "-c", "small.safetensors"])).output
    assert "stored as float16" in shown


def test_resume_continues_to_new_step_count(runner, tmp_path):
    (tmp_path / "play.txt").write_text(PROSE)
    _train(runner, tmp_path / "play.txt")
    res = _ok(runner.invoke(main, ["train", "--resume", "checkpoints/play", "--steps", "40"]))
    assert "steps 30 -> 40" in res.output
    assert checkpoint.read_meta(Path("checkpoints/play/latest.safetensors"))["train"]["step"] == 40
    again = _ok(runner.invoke(main, ["train", "--resume", "checkpoints/play"]))  # nothing to do
    assert "already reached step 40 of 40" in again.output
    assert checkpoint.read_meta(Path("checkpoints/play/latest.safetensors"))["train"]["step"] == 40
    changed = runner.invoke(main, ["train", "--resume", "checkpoints/play", "--hidden", "32"])
    assert changed.exit_code == 1 and "--hidden 32 differs from the run's 16" in changed.output
    _fails(runner, ["train", "--resume", "checkpoints/play", "--no-lines", "--lr", "0.02"],
           "--lr 0.02 differs from the run's 0.01")
    _fails(runner, ["train", "--resume", "checkpoints/play", "--out", "elsewhere"],
           "--out does not apply with --resume")
    # the original command with --resume added: the repeated options are the run's own
    same = ["train", str(tmp_path / "play.txt"), "--layers", "1", "--hidden", "16", "--embed", "8",
            "--batch-size", "4", "--seq-len", "16", "--warmup", "5", "--lr", "1e-2", "--no-lines",
            "--steps", "50", "--resume", "checkpoints/play"]
    assert "steps 40 -> 50" in _ok(runner.invoke(main, same)).output
    # a second fresh run never overwrites the first
    _train(runner, tmp_path / "play.txt")
    assert (tmp_path / "checkpoints" / "play-2" / "best.safetensors").is_file()


def test_names_from_a_lines_model(runner, tmp_path):
    (tmp_path / "names.txt").write_text(NAMES)
    res = _train(runner, tmp_path / "names.txt", "--steps", "40")
    assert "detected a list of short lines" in res.output
    ck = "checkpoints/names"
    vocab_line = next(ln for ln in _ok(runner.invoke(main, ["info", "-c", ck])).output.splitlines()
                      if ln.startswith("vocab"))
    assert "(lines mode): '" in vocab_line and vocab_line.endswith("' + <eos>")  # specials named
    out = _ok(runner.invoke(main, ["names", "-c", ck, "-n", "5", "--seed", "1", "--allow-seen"])).output.split()
    assert len(out) == 5 and len(set(out)) == 5 and all(n[0].isupper() for n in out)
    js = json.loads(_ok(runner.invoke(main, ["names", "-c", ck, "-n", "3", "--seed", "1", "--format", "json",
                                             "--start", "A", "--allow-seen", "--temp", "1.5"])).output)
    assert all(n.startswith("A") for n in js)
    csv = _ok(runner.invoke(main, ["names", "-c", ck, "-n", "3", "--seed", "2", "--format", "csv",
                                   "--allow-seen", "--temp", "1.5"])).output.splitlines()
    assert csv[0] == "name" and len(csv) == 4
    novel = _ok(runner.invoke(main, ["names", "-c", ck, "-n", "5", "--seed", "3", "--temp", "2.0"])).output.split()
    train = set(NAMES.split())
    assert not {n.lower() for n in novel} & train  # the novelty filter is on by default
    # numba (cpu) and plain numpy backends draw the same names for the same seed
    by_device = [_ok(runner.invoke(main, ["names", "-c", ck, "-n", "6", "--seed", "4", "--allow-seen",
                                          "--device", d])).output for d in ("cpu", "numpy")]
    assert by_device[0] == by_device[1]
    sc = json.loads(_ok(runner.invoke(main, ["score", "-c", ck, "--json", "Emma", "Mmaem"])).output)
    assert sc["scores"][0]["logprob"] > sc["scores"][1]["logprob"]
    # a list on stdin; a name the model cannot spell is reported, the others still ranked
    res = runner.invoke(main, ["score", "-c", ck, "-"], input="Emma\nJosé\n\nMmaem\n")
    assert res.exit_code == 1 and "Traceback" not in res.output
    lines = res.output.splitlines()
    assert lines[0].startswith("Emma   logprob") and lines[2].startswith("Mmaem  logprob")
    assert lines[1].startswith("José   not scored: ") and "'é'" in lines[1]
    assert lines[3] == "error: 1 of 3 texts could not be scored"
    _fails(runner, ["score", "-c", ck, "-", "Emma"], "'-' reads the texts from stdin")


# ------------------------------------------------------------------ bad input: one line, non-zero exit


def _fails(runner, args, needle, code=1):
    res = runner.invoke(main, args)
    assert res.exit_code == code, res.output
    assert "Traceback" not in res.output
    assert needle in res.output, res.output
    return res


def test_bad_corpus_inputs(runner, tmp_path):
    _fails(runner, ["train", "missing.txt"], "corpus file not found: missing.txt")
    (tmp_path / "empty.txt").write_text("")
    _fails(runner, ["train", "empty.txt"], "is empty")
    (tmp_path / "bin.dat").write_bytes(bytes(range(256)) * 10)
    _fails(runner, ["train", "bin.dat"], "looks binary")
    (tmp_path / "latin.txt").write_bytes(b"caf\xe9 au lait\n" * 50)
    _fails(runner, ["train", "latin.txt"], "not valid utf-8 at byte offset 3")
    _fails(runner, ["train"], "no corpus given")


def test_bad_option_values(runner, tmp_path):
    (tmp_path / "play.txt").write_text(PROSE)
    _fails(runner, ["train", "play.txt", "--layers", "0"], "layers must be > 0, got 0")
    _fails(runner, ["train", "play.txt", "--dropout", "1.5"], "dropout must be in [0, 1)")
    _fails(runner, ["train", "play.txt", "--lr", "-1"], "lr must be > 0")
    _fails(runner, ["train", "play.txt", "--cell", "transformer"], "Invalid value for '--cell'", code=2)
    _fails(runner, ["train", "play.txt", "--batch-size", "64", "--seq-len", "1000"], "needs at least 65,000")
    # options that would be ignored, or would do something else than they say
    _fails(runner, ["train", "play.txt", "./play.txt"], "corpus file ./play.txt is given twice")
    _fails(runner, ["train", "play.txt", "--out", "play.txt/run"],
           "cannot create the run directory play.txt/run: Not a directory")

    _fails(runner, ["sample", "--argmax", "-t", "0.5"], "a temperature changes nothing")
    _fails(runner, ["train", "play.txt", "--epochs", "1", "--steps", "5"], "not both")
    _ok(runner.invoke(main, ["train", "play.txt", "--epochs", "0", "--steps", "2", "--layers", "1",
                             "--hidden", "8", "--embed", "4", "--batch-size", "2", "--seq-len", "8",
                             "--out", "epochs0"]))  # --epochs 0 is "off", as by default
    moot = _ok(runner.invoke(main, ["train", "play.txt", "--test-count", "5", "--steps", "2",
                                    "--layers", "1", "--hidden", "8", "--embed", "4",
                                    "--batch-size", "2", "--seq-len", "8", "--out", "moot"]))
    assert "note: --test-count counts lines of a --lines corpus" in moot.output
    _fails(runner, ["eval", "play.txt", "--split", "test"], "with FILE the whole file is scored")
    _train(runner, tmp_path / "play.txt")
    _fails(runner, ["sample", "--temp", "-1"], "temperature must be > 0 and finite, got -1.0")
    _fails(runner, ["sample", "--temp", "inf"], "temperature must be > 0 and finite, got inf")
    _fails(runner, ["sample", "--top-p", "1.5"], "top-p must be in (0, 1], got 1.5")
    _fails(runner, ["sample", "--top-p", "0"], "top-p must be in (0, 1]")
    _fails(runner, ["sample", "--prime", "\u263a"], "is not in the model's vocabulary")
    _fails(runner, ["names", "-c", "checkpoints/play"], "is a prose model")


def test_bad_checkpoints(runner, tmp_path):
    _fails(runner, ["sample", "-c", "nope.safetensors"], "no checkpoint at nope.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a checkpoint at all")
    _fails(runner, ["info", "-c", "junk.safetensors"], "not a readable checkpoint")
    from safetensors.numpy import save_file

    save_file({"w": np.zeros(3, np.float32)}, str(tmp_path / "foreign.safetensors"))
    _fails(runner, ["sample", "-c", "foreign.safetensors"], "not a charrnn checkpoint")
    (tmp_path / "emptydir").mkdir()
    _fails(runner, ["sample", "-c", "emptydir"], "holds no best.safetensors")
    _fails(runner, ["train", "--resume", "nowhere"], "no run directory at nowhere")


def test_sample_into_a_closed_pipe_is_quiet(tmp_path):
    """`charrnn sample | head -c 5` must end without a traceback."""
    import subprocess
    import sys

    (tmp_path / "play.txt").write_text(PROSE)
    CliRunner().invoke(main, ["train", str(tmp_path / "play.txt"), "--layers", "1", "--hidden", "8", "--embed",
                              "4", "--batch-size", "2", "--seq-len", "8", "--steps", "2", "--eval-every", "2",
                              "--out", str(tmp_path / "run")])
    cmd = (f"{sys.executable} -m charrnn sample -c {tmp_path / 'run'} -n 200000 | head -c 5")
    res = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=120, check=False)
    assert len(res.stdout) == 5
    assert "Traceback" not in res.stderr and "Error" not in res.stderr


def test_a_status_line_covers_the_wait_for_the_first_piece_on_a_terminal(monkeypatch):
    import io

    from rich.console import Console

    from charrnn import cli

    shown = io.StringIO()
    monkeypatch.setattr(cli, "err", Console(file=shown, force_terminal=True))
    assert list(cli._after_status(iter("abc"), "compiling")) == ["a", "b", "c"]
    assert "compiling" in shown.getvalue()  # drawn, then erased (transient)
    assert list(cli._after_status(iter(()), "compiling")) == []
    quiet = io.StringIO()  # not a terminal (a pipe, a log file): nothing is written
    monkeypatch.setattr(cli, "err", Console(file=quiet, force_terminal=False))
    assert list(cli._after_status(iter("xy"), "compiling")) == ["x", "y"]
    assert quiet.getvalue() == ""


def test_the_training_bar_says_why_the_first_steps_are_slow():
    import io

    from rich.console import Console

    from charrnn.progress import Reporter

    shown = io.StringIO()
    rep = Reporter(Console(file=shown, force_terminal=True, width=160), live=True)
    rep({"kind": "start", "step": 0, "steps": 100})
    rep.close()
    assert "compiling the kernels on a first run" in shown.getvalue()
    plain = io.StringIO()  # not a terminal: log lines only, nothing before the first one
    rep = Reporter(Console(file=plain, force_terminal=False), live=False)
    rep({"kind": "start", "step": 0, "steps": 100})
    rep.close()
    assert plain.getvalue() == ""


# ------------------------------------------------------------------ hostile input, found in review


def test_user_text_in_a_message_is_not_read_as_markup(runner):
    # rich markup in a path once crashed the error printer ("[/b]") or ate part of the line ("[red]")
    _fails(runner, ["train", "x[/b].txt"], "corpus file not found: x[/b].txt")
    _fails(runner, ["train", "x[red].txt"], "corpus file not found: x[red].txt")


def test_non_finite_and_negative_numbers(runner, tmp_path):
    (tmp_path / "play.txt").write_text(PROSE)
    _fails(runner, ["train", "play.txt", "--lr", "nan"], "lr must be > 0, got nan")
    _fails(runner, ["train", "play.txt", "--lr", "inf"], "lr must be > 0, got inf")
    _fails(runner, ["train", "play.txt", "--epochs", "inf"], "epochs must be >= 0, got inf")
    _fails(runner, ["train", "play.txt", "--grad-clip", "nan"], "grad-clip must be >= 0, got nan")
    _fails(runner, ["train", "play.txt", "--seed", "-1"], "seed must be >= 0, got -1")
    _fails(runner, ["train", "play.txt", "--lines", "--split-seed", "-1"], "split-seed must be >= 0, got -1")
    _fails(runner, ["sample", "--seed", "-1"], "seed must be >= 0, got -1")
    _fails(runner, ["names", "--seed", "-1"], "seed must be >= 0, got -1")
    assert not Path("checkpoints").exists()


def test_bad_encodings_and_a_directory_as_corpus(runner, tmp_path):
    (tmp_path / "play.txt").write_text(PROSE)
    _fails(runner, ["train", "play.txt", "--encoding", "nope"], "unknown encoding 'nope'")
    _fails(runner, ["train", "play.txt", "--encoding", "rot13"], "unknown encoding 'rot13'")
    _fails(runner, ["train", "play.txt", "--encoding", "utf-16"], "play.txt: not valid utf-16")
    (tmp_path / "texts").mkdir()
    _fails(runner, ["train", "texts"], "corpus path texts is a directory")


def test_out_never_overwrites_a_run(runner, tmp_path):
    (tmp_path / "play.txt").write_text(PROSE)
    _train(runner, tmp_path / "play.txt", "--out", "mine", "--device", "numpy")
    before = Path("mine/best.safetensors").read_bytes()
    _fails(runner, ["train", "play.txt", "--out", "mine"], "--out mine already holds a run; hint: continue it")
    assert Path("mine/best.safetensors").read_bytes() == before
    _fails(runner, ["train", "play.txt", "--out", "play.txt"], "--out play.txt is a file")


def test_resume_needs_training_state_and_its_corpus(runner, tmp_path):
    (tmp_path / "moved.txt").write_text(PROSE)
    _train(runner, tmp_path / "moved.txt", "--out", "run", "--device", "numpy")
    Path("shared").mkdir()
    _ok(runner.invoke(main, ["export", "run", "shared/latest.safetensors"]))
    _fails(runner, ["train", "--resume", "shared", "--steps", "40"], "holds no training state")
    with open("run/metrics.jsonl", "a") as f:
        f.write('{"step": 4')  # a line cut short by a crash does not block the resume
    _ok(runner.invoke(main, ["train", "--resume", "run", "--steps", "40"]))
    assert all(json.loads(ln)["step"] <= 40 for ln in Path("run/metrics.jsonl").read_text().splitlines())
    (tmp_path / "moved.txt").unlink()
    _fails(runner, ["train", "--resume", "run", "--steps", "50"], "is not there any more; hint: pass the same files")


@pytest.mark.parametrize("gpu", [False, True])
@pytest.mark.parametrize("argv, backend", [
    (["names", "-n", "20"], "reference"), (["names", "-n", "5000"], "cpu"),
    (["score", "emma"], "reference"),  # names and score: never the GPU under auto
    (["sample", "-n", "5"], "cuda|cpu"), (["names", "-n", "20", "--device", "cuda"], "cuda"),
])
def test_device_auto_picks_by_job(runner, monkeypatch, gpu, argv, backend):
    import charrnn.runs

    chosen = []

    def loaded(path, name, finite=True):
        chosen.append(name)
        raise SystemExit(0)  # the choice is all this test reads

    monkeypatch.setattr(charrnn.runs, "Loaded", loaded)
    monkeypatch.setattr("charrnn.backend.cuda_usable", lambda: gpu)
    runner.invoke(main, argv)
    want = backend.split("|")[0 if gpu else -1]
    assert chosen == [want]


def test_names_filters_that_no_name_can_pass(runner, tmp_path):
    (tmp_path / "names.txt").write_text(NAMES)
    _train(runner, tmp_path / "names.txt", "--device", "numpy")
    ck = ["names", "-c", "checkpoints/names", "-n", "3", "--seed", "1"]
    _fails(runner, [*ck, "--contains", "\u263a"], "is not in the model's vocabulary")
    _fails(runner, [*ck, "--contains", "a" * 20], "is longer than max-len (16)")
    res = _fails(runner, [*ck, "--start", "emma", "--contains", "ll", "--min-len", "5", "--max-len", "5"],
                 "none of the candidates passed the filters; hint: loosen")
    assert res.stdout == ""
    _fails(runner, ["score", "-c", "checkpoints/names", "em\nma"], "spans several lines")


def test_eval_of_an_empty_split(runner, tmp_path):
    (tmp_path / "play.txt").write_text(PROSE)
    _train(runner, tmp_path / "play.txt", "--device", "numpy")
    _fails(runner, ["eval", "--split", "test"], "the run's test split has too little text to evaluate")
    (tmp_path / "one.txt").write_text("A")
    _fails(runner, ["eval", "one.txt"], "one.txt has too little text to evaluate")


def test_plot_and_export_never_destroy_other_files(runner, tmp_path):
    (tmp_path / "play.txt").write_text(PROSE)
    _train(runner, tmp_path / "play.txt", "--device", "numpy")
    run = "checkpoints/play"
    _fails(runner, ["plot", run, "--target", "inf"], "--target must be a finite number, got inf")
    _fails(runner, ["plot", run, "-o", "checkpoints"], "-o checkpoints is a directory")
    _fails(runner, ["plot", run, "-o", "play.txt"], "exists and is not an SVG chart")
    assert (tmp_path / "play.txt").read_text() == PROSE
    _ok(runner.invoke(main, ["plot", run, "-o", "new/dir/loss.svg"]))
    _ok(runner.invoke(main, ["plot", run, "-o", "new/dir/loss.svg"]))  # its own chart may be redrawn
    _fails(runner, ["export", run, "play.txt"], "play.txt already exists; hint: pass --force")
    assert (tmp_path / "play.txt").read_text() == PROSE
    _fails(runner, ["export", run, "checkpoints"], "checkpoints is a directory")
    _ok(runner.invoke(main, ["export", run, "small.safetensors"]))
    _ok(runner.invoke(main, ["export", run, "small.safetensors", "--force"]))


def test_damaged_metadata_and_undecodable_arguments(runner, tmp_path):
    (tmp_path / "play.txt").write_text(PROSE)
    res = _train(runner, tmp_path / "play.txt", "--device", "numpy", "--encoding", "bytes", "--out", "raw")
    assert "device numpy," in res.output  # as --device calls it, not the backend's "reference"
    # an undecodable command-line byte (Python's surrogate escape) is that byte to a bytes model
    _fails(runner, ["score", "-c", "raw", "\udcffab"], "byte 0xff is not in the model's vocabulary")
    tensors, meta = checkpoint.load("raw/best.safetensors")
    meta.pop("format_version")
    for name, damage in {"train": lambda m: m.update(train=[1]),
                         "vocab": lambda m: m.update(vocab=m["vocab"][:5]),
                         "lines": lambda m: m["train"]["config"].update(lines=True),
                         "step": lambda m: m["train"].update(epoch="x")}.items():
        bad = json.loads(json.dumps(meta))
        damage(bad)
        checkpoint.save(f"{name}.safetensors", tensors, bad)
        for cmd in (["info"], ["sample", "-n", "3"]):
            _fails(runner, [*cmd, "-c", f"{name}.safetensors"], "has incomplete charrnn metadata")


def test_default_architecture_and_checkpoints_that_do_not_state_theirs(runner, tmp_path):
    (tmp_path / "play.txt").write_text(PROSE)
    args = ["train", "play.txt", "--layers", "2", "--hidden", "16", "--batch-size", "4", "--seq-len", "16",
            "--steps", "4", "--eval-every", "4"]
    _ok(runner.invoke(main, [*args, "--out", "new"]))
    model = json.loads(_ok(runner.invoke(main, ["info", "--json", "-c", "new"])).output)["model"]
    assert (model["embed"], model["residual"]) == (256, True)

    # Every checkpoint states its architecture: without a field, no default is guessed.
    path = tmp_path / "new" / "best.safetensors"
    tensors, meta = checkpoint.load(path)
    del meta["model"]["residual"]
    checkpoint.save(path, tensors, meta)
    _fails(runner, ["eval", "-c", str(path)], "incomplete charrnn metadata (the model section lacks residual)")


def test_a_checkpoint_with_nan_weights_is_refused(runner, tmp_path):
    """A flipped bit in a weight (or a save from blown-up weights) used to sample one
    character forever and evaluate to nan, both with exit 0."""
    (tmp_path / "play.txt").write_text(PROSE)
    _train(runner, tmp_path / "play.txt")
    tensors, meta = checkpoint.load(Path("checkpoints/play/best.safetensors"))
    tensors["decoder.weight"][3, 1] = np.nan
    checkpoint.save(Path("bad.safetensors"), tensors, meta)
    for cmd in (["sample", "-n", "5"], ["eval"], ["score", "ab"]):
        _fails(runner, [*cmd, "-c", "bad.safetensors"],
               "bad.safetensors: weight decoder.weight holds nan or inf")
    shown = _ok(runner.invoke(main, ["info", "-c", "bad.safetensors"])).output  # shows, flagged
    assert "DAMAGED     weight decoder.weight holds nan or inf" in shown


def test_eval_of_a_file_the_model_cannot_read_names_the_models_encoding(runner, tmp_path):
    (tmp_path / "play.txt").write_text(PROSE)
    _train(runner, tmp_path / "play.txt")
    Path("latin.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    _fails(runner, ["eval", "latin.txt"], "(byte 0xe9); this model reads utf-8 text")


def test_the_default_warmup_never_takes_more_than_a_third_of_a_short_run(runner, tmp_path):
    (tmp_path / "play.txt").write_text(PROSE)
    args = ["train", str(tmp_path / "play.txt"), "--layers", "1", "--hidden", "8", "--embed", "4",
            "--batch-size", "2", "--seq-len", "8", "--steps", "30", "--eval-every", "30"]
    _ok(runner.invoke(main, [*args, "--out", "short"]))
    assert Loaded(Path("short/best.safetensors")).train_cfg.warmup == 10
    _ok(runner.invoke(main, [*args, "--out", "asked", "--warmup", "25"]))  # given: as given
    assert Loaded(Path("asked/best.safetensors")).train_cfg.warmup == 25


def test_out_of_memory_and_ctrl_c_end_in_one_line_and_leave_no_run_behind(runner, tmp_path,
                                                                           monkeypatch):
    from charrnn import cli

    (tmp_path / "play.txt").write_text(PROSE)

    def too_big(*a, **kw):
        raise MemoryError("Unable to allocate 47.7 GiB for an array with shape (400000000, 16)")

    with monkeypatch.context() as m:
        m.setattr(cli, "_build_run", too_big)
        _fails(runner, ["train", "play.txt", "--out", "big"],
               "out of memory: Unable to allocate 47.7 GiB")
    assert not Path("big").exists()
    _fails(runner, ["train", "play.txt", "--out", "long", "--seq-len", "5000"], "needs at least")
    assert not Path("long").exists()

    def interrupted(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_load", interrupted)
    _fails(runner, ["sample", "-n", "5"], "interrupted", code=130)


def test_a_run_being_trained_cannot_be_trained_by_a_second_process(runner, tmp_path):
    """The lock is an flock on RUN/.lock, held per open file: a second open in this process
    stands in for the second `charrnn train` (--resume from another shell)."""
    import os

    from charrnn import runs

    (tmp_path / "play.txt").write_text(PROSE)
    _train(runner, tmp_path / "play.txt")
    other = runs.lock_run(Path("checkpoints/play"))  # "the other process"
    try:
        _fails(runner, ["train", "--resume", "checkpoints/play", "--steps", "40"],
               f"checkpoints/play is being trained by another process (pid {os.getpid()})")
        _fails(runner, ["train", str(tmp_path / "play.txt"), "--out", "checkpoints/play"],
               "already holds a run")
    finally:
        other.close()
    _ok(runner.invoke(main, ["train", "--resume", "checkpoints/play", "--steps", "40"]))
    # a run still before its first checkpoint: a second one on the same corpus goes next door
    Path("checkpoints/play-2").mkdir()
    other = runs.lock_run(Path("checkpoints/play-2"))
    try:
        res = _train(runner, tmp_path / "play.txt")
    finally:
        other.close()
    assert "run checkpoints/play-3:" in res.output
    assert not any(Path("checkpoints/play-2").glob("*.safetensors"))


def test_resuming_a_run_that_stopped_early_says_so_instead_of_training_on(runner, tmp_path):
    (tmp_path / "play.txt").write_text(PROSE)
    frozen = ["--lr", "1e-30", "--patience", "1", "--out", "pt"]  # val never improves again
    res = _train(runner, tmp_path / "play.txt", *frozen)
    assert "stopped early (no val gain) at step 20" in res.output
    again = _ok(runner.invoke(main, ["train", "--resume", "pt"]))
    assert "pt stopped early at step 20 (1 evals without a gain in val loss)" in again.output
    assert checkpoint.read_meta(Path("pt/latest.safetensors"))["train"]["step"] == 20
    more = _ok(runner.invoke(main, ["train", "--resume", "pt", "--patience", "0"]))
    assert "done at step 30" in more.output


def test_sample_and_eval_name_the_checkpoint_they_picked_on_a_terminal(runner, tmp_path,
                                                                       monkeypatch):
    import io

    from rich.console import Console

    from charrnn import cli

    (tmp_path / "play.txt").write_text(PROSE)
    _train(runner, tmp_path / "play.txt")
    tty = io.StringIO()
    monkeypatch.setattr(cli, "err", Console(file=tty, force_terminal=True, width=200))
    for cmd in (["sample", "-n", "5"], ["eval"]):
        _ok(runner.invoke(main, cmd))
        assert "checkpoint: checkpoints/play/best.safetensors" in tty.getvalue()
        tty.seek(0)
        tty.truncate()
        _ok(runner.invoke(main, [*cmd, "-c", "checkpoints/play"]))  # named by the user: quiet
        assert "checkpoint:" not in tty.getvalue()


def test_keep_every_leaves_weight_snapshots_to_sample_from(runner, tmp_path):
    (tmp_path / "play.txt").write_text(PROSE)
    _train(runner, tmp_path / "play.txt", "--keep-every", "10")
    run = Path("checkpoints/play")
    snaps = sorted(p.name for p in run.glob("step-*.safetensors"))
    assert snaps == ["step-0000010.safetensors", "step-0000020.safetensors", "step-0000030.safetensors"]
    tensors, meta = checkpoint.load(run / "step-0000020.safetensors")
    latest, _ = checkpoint.load(run / "latest.safetensors")
    assert meta["train"]["step"] == 20 and not any(n.startswith("train.") for n in tensors)
    assert tensors.keys() == {n for n in latest if not n.startswith(("train.", "data."))}
    assert len(_ok(runner.invoke(main, ["sample", "-c", str(run / "step-0000010.safetensors"),
                                        "-n", "20", "--seed", "1"])).output) >= 20
    assert Loaded(run / "best.safetensors").train_cfg.keep_every == 10
    # --keep-every may change on --resume
    _ok(runner.invoke(main, ["train", "--resume", str(run), "--steps", "40", "--keep-every", "20"]))
    assert (run / "step-0000040.safetensors").is_file()


def test_a_dead_stderr_never_ends_training_before_its_save():
    """A hung-up terminal (writes fail with EIO) or a reader gone from the pipe: the
    reporter goes quiet instead of raising into the training loop or its signal handler."""
    from rich.console import Console

    from charrnn import cli
    from charrnn.progress import Reporter

    class HungUp:
        def write(self, s):
            raise OSError(5, "Input/output error")

        def flush(self):
            raise OSError(5, "Input/output error")

    console = Console(file=HungUp(), force_terminal=False)
    rep = Reporter(console, live=False)
    rep({"kind": "stopping", "step": 3, "presses": 1, "signal": "SIGHUP", "presses_left": 2})
    assert console.quiet
    rep({"kind": "end"})
    gone = cli._ErrConsole(file=HungUp())
    gone.on_broken_pipe()  # rich's own would raise SystemExit(1) (and point stdout at /dev/null)
    assert gone.quiet


@pytest.mark.parametrize("sig, code", [("SIGTERM", 143), ("SIGINT", 130)])
def test_a_signal_saves_and_exits_with_128_plus_its_number(runner, tmp_path, monkeypatch, sig, code):
    import os
    import signal

    from charrnn import progress

    (tmp_path / "play.txt").write_text(PROSE)
    report = progress.Reporter.__call__

    def call(self, ev):  # the signal comes at the first log line (step 10), as from `kill`
        report(self, ev)
        if ev["kind"] == "log" and ev["step"] == 10:
            os.kill(os.getpid(), getattr(signal, sig))

    monkeypatch.setattr(progress.Reporter, "__call__", call)
    res = runner.invoke(main, ["train", str(tmp_path / "play.txt"), "--layers", "1", "--hidden", "8",
                               "--embed", "4", "--batch-size", "2", "--seq-len", "8", "--steps", "50",
                               "--eval-every", "50", "--out", "sig"])
    assert res.exit_code == code, res.output
    assert "finishing the step under way, then saving" in res.output
    assert "interrupted at step 10; saved sig/latest.safetensors" in res.output
    assert checkpoint.read_meta(Path("sig/latest.safetensors"))["train"]["step"] == 10


def test_several_independent_samples_in_one_command(runner, tmp_path):
    (tmp_path / "play.txt").write_text(PROSE)
    _train(runner, tmp_path / "play.txt")
    both = _ok(runner.invoke(main, ["sample", "-n", "40", "--seed", "5", "--samples", "2",
                                    "--prime", "Sp"])).output
    first, second = (part.split("---\n", 1)[1] for part in both.split("--- sample ")[1:])
    alone = [_ok(runner.invoke(main, ["sample", "-n", "40", "--seed", str(s), "--prime", "Sp"])).output
             for s in (5, 6)]
    assert both.startswith("--- sample 1 ---\n") and first.strip() == alone[0].strip()
    assert second.strip() == alone[1].strip() and first != second
    _fails(runner, ["sample", "--argmax", "--samples", "2"], "every sample would be the same")


def test_eval_of_a_run_whose_corpus_is_gone_reads_the_runs_encoded_copy(runner, tmp_path):
    (tmp_path / "play.txt").write_text(PROSE)
    _train(runner, tmp_path / "play.txt")
    before = json.loads(_ok(runner.invoke(main, ["eval", "--json"])).output)
    (tmp_path / "play.txt").rename(tmp_path / "moved.txt")
    after = json.loads(_ok(runner.invoke(main, ["eval", "--json"])).output)
    assert after["nats_per_char"] == before["nats_per_char"] and after["tokens"] == before["tokens"]
    assert after["source"].startswith("val split of checkpoints/play/corpus.ids")
    # another run's model put in this directory is not scored on this run's text
    (tmp_path / "other.txt").write_text(PROSE.swapcase())
    _train(runner, tmp_path / "other.txt")
    _ok(runner.invoke(main, ["export", "checkpoints/other", "checkpoints/play/foreign.safetensors"]))
    (tmp_path / "other.txt").unlink()
    _fails(runner, ["eval", "-c", "checkpoints/play/foreign.safetensors"], "is not available; pass FILE")
    Path("checkpoints/play/corpus.ids").unlink()
    _fails(runner, ["eval", "-c", "checkpoints/play"], "is not available; pass FILE")


def test_eval_of_a_capped_run_matches_its_best_val(runner, tmp_path):
    """A run trained with --eval-max-chars measured its val on a prefix: eval of its split
    scores the same prefix by default, so it reproduces the best val; --max-chars 0 scores
    the whole split, and FILE is scored whole."""
    (tmp_path / "play.txt").write_text(PROSE)
    _train(runner, tmp_path / "play.txt", "--eval-max-chars", "40")
    metrics = [json.loads(ln) for ln in Path("checkpoints/play/metrics.jsonl").read_text().splitlines()]
    best = min(m["val_loss"] for m in metrics if m.get("val_loss") is not None)
    capped = json.loads(_ok(runner.invoke(main, ["eval", "--json"])).output)
    assert capped["tokens"] <= 40 and capped["nats_per_char"] == pytest.approx(best, rel=1e-9)
    assert "(its first 40 characters)" in capped["source"]
    whole = json.loads(_ok(runner.invoke(main, ["eval", "--json", "--max-chars", "0"])).output)
    assert whole["tokens"] > 40
    res = json.loads(_ok(runner.invoke(main, ["eval", "--json", str(tmp_path / "play.txt")])).output)
    assert res["tokens"] > whole["tokens"]


def test_names_print_as_they_come_and_an_interrupted_list_keeps_them(runner, tmp_path, monkeypatch):
    from charrnn import names

    (tmp_path / "names.txt").write_text(NAMES)
    _train(runner, tmp_path / "names.txt", "--steps", "20")
    real, rounds = names._round, []

    def interrupted_second_round(*a, **kw):
        rounds.append(1)
        if len(rounds) == 2:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(names, "_round", interrupted_second_round)
    res = runner.invoke(main, ["names", "-c", "checkpoints/names", "-n", "5000", "--seed", "1",
                               "--allow-seen", "--temp", "2.0"])
    assert res.exit_code == 130 and "interrupted" in res.output
    printed = res.output.split("interrupted")[0].split()
    assert len(printed) > 10 and len(set(printed)) == len(printed)  # the first round's names


def test_second_review_run_directory_cases(runner, tmp_path, monkeypatch):
    import hashlib
    import os

    from charrnn import cli

    (tmp_path / "play.txt").write_text(PROSE)
    # without -c: the newest run's best, even when its latest is newer (no gain at the end)
    _train(runner, tmp_path / "play.txt", "--lr", "1e-30", "--out", "checkpoints/flat")
    assert "checkpoints/flat/best.safetensors" in _ok(runner.invoke(main, ["info"])).output.splitlines()[0]
    # a refused --resume leaves the run's encoded corpus as it was
    ids = Path("checkpoints/flat/corpus.ids")
    before = hashlib.sha256(ids.read_bytes()).hexdigest()
    (tmp_path / "play.txt").write_text(PROSE.swapcase())
    _fails(runner, ["train", "--resume", "checkpoints/flat", "--steps", "40"], "the corpus changed")
    assert hashlib.sha256(ids.read_bytes()).hexdigest() == before
    # --resume on a directory that holds no run: refused, and no lock file left in it
    Path("plain").mkdir()
    _fails(runner, ["train", "--resume", "plain"], "plain holds no checkpoint")
    assert not Path("plain/.lock").exists()
    # a reused directory (a run that died before its first checkpoint) gets a fresh metrics file
    Path("reused").mkdir()
    Path("reused/metrics.jsonl").write_text('{"step": 4950, "train_loss": 9.0}\n')
    _train(runner, tmp_path / "play.txt", "--out", "reused")
    steps = [json.loads(line)["step"] for line in Path("reused/metrics.jsonl").read_text().splitlines()]
    assert steps == [10, 20, 30]
    # a file where the default run directory would go: the run goes next door
    Path("checkpoints/play").write_text("not a directory")
    assert "run checkpoints/play-2:" in _train(runner, tmp_path / "play.txt").output
    # a failed start leaves none of the directories it made
    _fails(runner, ["train", str(tmp_path / "play.txt"), "--seq-len", "5000", "--out", "a/b/c"],
           "needs at least")
    assert not Path("a").exists()
    # export onto the checkpoint it reads from
    _fails(runner, ["export", "checkpoints/flat", "checkpoints/flat/best.safetensors", "--force"],
           "is the checkpoint being exported")
    # a pipe as the corpus
    os.mkfifo("fifo")
    _fails(runner, ["train", "fifo"], "corpus fifo is not a regular file")
    # stdout closed
    monkeypatch.setattr(cli.sys, "stdout", None)
    with pytest.raises(cli.UserError, match="standard output is closed"):
        cli._out("x")


def test_the_progress_bar_of_a_resumed_run_starts_from_its_best_val():
    from rich.console import Console

    from charrnn.progress import Reporter

    rep = Reporter(Console(file=io.StringIO()), live=False)
    rep({"kind": "start", "step": 30, "steps": 40, "best_val": 2.5})
    assert rep.best == 2.5
