"""The benchmark harness's own logic (bench/): repeat sizing, verdicts, the BENCHMARKS.md
rewrite and the lever screen's option merging. Timing itself is never asserted here."""

import os
import subprocess
import sys

import numpy as np
import pytest

from bench import levers, timing
from bench.report import NOTES_MARKER, Cell, ratio, update_file, verdict
from bench.workloads import CHARRNN, TORCH, TORCH_NODNNL, Goal, Workload


class FakeClock:
    """perf_counter for timing.measure: a step of k units takes fixed + k * per_unit seconds."""

    def __init__(self, fixed: float, per_unit: float, first_extra: float = 0.0):
        self.now, self.fixed, self.per_unit, self.extra = 0.0, fixed, per_unit, first_extra
        self.calls: list[int] = []

    def step(self, k: int) -> int:
        self.now += self.fixed + k * self.per_unit + (self.extra if not self.calls else 0.0)
        self.calls.append(k)
        return 10 * k  # items

    def perf_counter(self) -> float:
        return self.now


@pytest.mark.parametrize("fixed, per_unit", [(0.0, 0.01), (0.03, 0.01), (0.5, 0.001), (0.0, 5.0), (1e-6, 1e-9)])
def test_a_repeat_lasts_about_the_target_despite_a_fixed_cost(monkeypatch, fixed, per_unit):
    clock = FakeClock(fixed, per_unit, first_extra=20.0)  # the first call compiles
    monkeypatch.setattr(timing.time, "perf_counter", clock.perf_counter)
    plan = timing.Plan(repeats=3, target_s=3.0)
    t = timing.measure(clock.step, plan)
    assert t.first_s == pytest.approx(20.0 + fixed + per_unit)
    assert len(t.rates) == 3 and 1 <= t.units <= plan.max_units
    repeat_s = fixed + t.units * per_unit
    if t.units == plan.max_units:  # units too cheap to fill a repeat
        assert repeat_s < plan.target_s
    elif fixed + per_unit < plan.target_s:
        assert repeat_s == pytest.approx(plan.target_s, rel=0.02)
    else:  # one unit is already more than a repeat
        assert t.units == 1
    assert t.rates[0] == pytest.approx(10 * t.units / repeat_s)


def test_units_never_exceed_the_cap(monkeypatch):
    clock = FakeClock(0.0, 1e-12)
    monkeypatch.setattr(timing.time, "perf_counter", clock.perf_counter)
    t = timing.measure(clock.step, timing.Plan(repeats=1, target_s=3.0, max_units=7))
    assert t.units == 7 and max(clock.calls) == 7


def _row(kind: str, value: float, unit: str = "chars/s") -> Workload:
    return Workload("row", "row", "train", unit, Goal(kind, value, ""))


def test_verdicts_use_the_faster_torch_path_and_lower_is_better_for_memory():
    cells = {CHARRNN: Cell([300.0]), TORCH: Cell([100.0]), TORCH_NODNNL: Cell([200.0])}
    assert ratio(_row("ratio_min", 1.3), cells) == pytest.approx(1.5)
    assert verdict(_row("ratio_min", 1.4), cells) == "pass"
    assert verdict(_row("ratio_min", 1.6), cells) == "**FAIL**"
    rss = {CHARRNN: Cell([400.0]), TORCH: Cell([1000.0])}
    assert verdict(_row("ratio_max", 0.5, "MiB"), rss) == "pass"
    assert verdict(_row("abs_min", 500.0), cells) == "**FAIL**"
    assert verdict(_row("ratio_min", 1.3), {CHARRNN: Cell([300.0])}) == "n/a"  # no torch


def test_rounds_alternate_the_order_within_a_row_and_borrowed_rows_run_torch_only():
    from bench.run import schedule
    from bench.workloads import ALL

    jobs = [(w.name, i) for w, i in schedule([ALL["train-2x128"], ALL["train-3x512-recompute"]], 2)]
    assert jobs[:4] == [("train-2x128", CHARRNN), ("train-2x128", TORCH),
                        ("train-2x128", TORCH), ("train-2x128", CHARRNN)]  # ABBA
    assert ("train-3x512", CHARRNN) not in jobs  # only its torch cells are shown
    assert jobs.count(("train-3x512", TORCH)) == 2 and jobs.count(("train-3x512-recompute", CHARRNN)) == 2
    rss_only = [(w.name, i) for w, i in schedule([ALL["rss-3x512"]], 1)]
    assert rss_only == [("train-3x512", CHARRNN), ("train-3x512", TORCH)]  # the row it reads


def test_merged_rounds_pool_the_repeats_keep_the_higher_peak_and_an_error_stands():
    from bench.report import merge, round_ratios

    a = Cell([10.0, 12.0], rss_mib=500.0, file_mib=90.0, rounds=[11.0])
    b = Cell([20.0], rss_mib=520.0, file_mib=100.0, rounds=[20.0])
    m = merge(merge(None, a), b)
    assert m.values == [10.0, 12.0, 20.0] and m.rounds == [11.0, 20.0]
    assert (m.rss_mib, m.file_mib) == (520.0, 100.0)
    err = Cell(note="error: boom")
    assert merge(m, err).note == "error: boom" and merge(err, m).note == "error: boom"
    theirs = Cell([5.0, 8.0], rounds=[5.0, 8.0])
    row = _row("ratio_min", 1.3)
    assert round_ratios(row, {CHARRNN: m, TORCH: theirs}) == pytest.approx([11 / 5, 20 / 8])
    assert round_ratios(row, {CHARRNN: a, TORCH: Cell([5.0], rounds=[5.0])}) == []  # one round


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/status")
def test_the_worker_reads_its_file_backed_pages_as_part_of_its_peak():
    from bench.worker import file_rss_mib, peak_rss_mib

    files = file_rss_mib()
    assert files is not None and 0 < files < peak_rss_mib()  # numpy's libraries at least


def test_a_full_run_gives_every_worker_the_rounds_repeats_and_reports_each_rounds_ratio(monkeypatch, capsys):
    import json

    from bench import run
    from bench.worker import MARK

    calls = []

    def fake_worker(cmd, **kw):
        impl = cmd[cmd.index("bench.worker") + 2]
        calls.append(cmd)
        rate = {CHARRNN: 300.0, TORCH: 100.0 * len(calls)}[impl]  # torch speeds up each run
        res = {"rates": [rate] * 3, "units": 1, "first_s": 0.0, "peak_rss_mib": 400.0 + len(calls),
               "file_rss_mib": 80.0, "info": {}}
        return subprocess.CompletedProcess(cmd, 0, MARK + json.dumps(res) + "\n", "")

    monkeypatch.setattr(run.subprocess, "run", fake_worker)
    monkeypatch.setattr(run, "cli_rows", lambda *a: None)
    real_find_spec = run.importlib.util.find_spec  # the fake torch workers need no torch
    monkeypatch.setattr(run.importlib.util, "find_spec",
                        lambda name, *a: object() if name == "torch" else real_find_spec(name, *a))
    assert run.main(["--only", "train-2x128,rss-3x512"]) == 0
    rounds, repeats = run.ROUNDS[False]
    assert len(calls) == 2 * 2 * rounds  # two rows read, two implementations, each round
    assert all(c[c.index("--repeats") + 1] == str(repeats) for c in calls)
    out = capsys.readouterr().out
    # train-2x128: torch ran 2nd (200) then 3rd (300): pooled 1.2x, 1.50 and 1.00 by round
    assert "| 1.20x (1.50, 1.00) |" in out
    assert "| train-3x512 | 408 (80 file) | 407 (80 file) | — |" in out  # the higher peaks


def test_update_file_replaces_its_section_and_keeps_the_rest(tmp_path):
    path = tmp_path / "BENCHMARKS.md"
    update_file(path, "gpu", "## GPU\nfirst gpu")
    update_file(path, "cpu", "## CPU\nfirst cpu")
    text = path.read_text().replace("hand-written notes", "")
    path.write_text(text.replace(NOTES_MARKER, NOTES_MARKER + "\n\nmy hand-written note"))
    update_file(path, "cpu", "## CPU\nsecond cpu")
    out = path.read_text()
    assert "second cpu" in out and "first cpu" not in out and "first gpu" in out
    assert out.index("second cpu") < out.index("first gpu") < out.index(NOTES_MARKER)
    assert "my hand-written note" in out.split(NOTES_MARKER, 1)[1]


def test_lever_options_replace_or_add_to_the_baseline():
    base = levers.options([])
    assert base == levers.BASE
    got = levers.options(["--embed", "256", "--residual", "--schedule", "constant"])
    assert got[got.index("--embed") + 1] == "256" and got.count("--embed") == 1
    assert "--residual" in got and "--no-residual" not in got  # an on/off pair is one option
    assert got[got.index("--schedule") + 1] == "constant"
    assert len(got) == len(base) + 2  # --schedule constant added, --embed and --no-residual replaced


def test_each_lever_is_compared_with_its_own_cell():
    assert levers.reference("residual") == "baseline" and levers.reference("baseline") == "baseline"
    assert levers.reference("GRU + embed 256 + residual") == "GRU" and levers.reference("RNN") == "RNN"


def test_a_gpu_row_that_fell_back_says_so_in_the_report():
    import argparse

    from bench import run
    from bench.workloads import GPU_WORKLOADS

    w = GPU_WORKLOADS[0]
    slow = Cell([10.0], info={"fallbacks": ["('lstm', 64, 512, '<f4'): no room"]})
    args = argparse.Namespace(gpu=True, quick=True, only=None, argv=["--gpu", "--quick"])
    text = run.render(args, [w], {w.name: {CHARRNN: slow}})
    assert "Fallbacks" in text and f"- {w.name}: ('lstm', 64, 512, '<f4'): no room" in text
    clean = run.render(args, [w], {w.name: {CHARRNN: Cell([10.0])}})
    assert "Fallbacks" not in clean and "TF32 are turned off" in clean


def test_the_worker_reports_the_cuda_backends_fallbacks(monkeypatch):
    import os

    if os.environ.get("NUMBA_ENABLE_CUDASIM") != "1":
        pytest.skip("needs numba's CUDA simulator (make test sets it)")
    pytest.importorskip("numba.cuda")
    from bench import ours
    from charrnn.cuda_backend import CudaBackend
    from charrnn.kernels import cuda_generate

    be = CudaBackend()
    monkeypatch.setattr(ours, "_BACKENDS", [be])
    monkeypatch.setattr(cuda_generate, "FALLBACKS", {})
    assert "fallbacks" not in ours.info("cuda")
    be.fallbacks[("lstm", 64, 512, "<f4")] = "too big"
    cuda_generate.FALLBACKS[("lstm", "<f4", 512)] = "no cudadevrt"
    assert ours.info("cuda")["fallbacks"] == ["('lstm', 64, 512, '<f4'): too big",
                                              "sampling ('lstm', '<f4', 512): no cudadevrt"]


def test_the_gpu_check_stops_with_status_1_where_there_is_no_gpu(capsys):
    from bench import gpu_check

    assert gpu_check.main() == 1  # make test runs the simulator: never a usable GPU
    assert "no usable CUDA GPU" in capsys.readouterr().out


def test_the_gpu_kernel_profile_runs_every_kernel_and_renders(monkeypatch):
    """The plumbing only, on the simulator at tiny shapes: every kernel is called with
    arrays of the shapes the profile says, and the table has a row for each."""
    import os

    if os.environ.get("NUMBA_ENABLE_CUDASIM") != "1":
        pytest.skip("needs numba's CUDA simulator (make test sets it)")
    pytest.importorskip("numba.cuda")
    from bench import gpu_kernels
    from charrnn.cuda_backend import CudaBackend
    from charrnn.kernels import cuda as ck
    from charrnn.kernels import cuda_generate as cg

    for mod, name, n in [(ck, "THREADS", 4), (ck, "PERSISTENT_THREADS", 8),
                         (cg, "GEN_THREADS", 4), (cg, "GEN_LANES", 2)]:
        monkeypatch.setattr(mod, name, n)  # the simulator runs a Python thread per GPU thread
    backend = CudaBackend()
    shape = gpu_kernels.Shape(L=2, H=4, B=2, T=3, V=5)
    ceil = gpu_kernels.ceilings(backend.xp, lambda: None, n_bytes=4096, gemm_n=8, min_time=0)
    rows = gpu_kernels.profile(shape, backend, lambda: None, min_time=0, chars=2)
    assert len(rows) == 13 and all(r.seconds > 0 and r.work > 0 for r in rows)
    assert not backend.fallbacks
    text = gpu_kernels.render(rows, ceil, "simulator", shape, "test")
    assert text.count("\n| ") == len(rows) + 1  # header + one line a kernel
    assert "persistent layer backward" in text and "generate_ids" in text

    def unavailable(*a, **kw):
        raise ck.PersistentUnavailable("H too large for this GPU")

    monkeypatch.setattr(ck, "persistent_layer_forward", unavailable)
    rows = gpu_kernels.profile(shape, backend, lambda: None, min_time=0, chars=2)
    text = gpu_kernels.render(rows, ceil, "simulator", shape, "test")
    assert "| persistent layer forward | T=3, B=2, H=4 | — | not run: H too large" in text


def test_worker_timeout_reaches_every_worker_and_is_reported(monkeypatch, capsys):
    import subprocess

    from bench import run

    seen = []

    def hung(cmd, **kw):  # a worker that never finishes
        seen.append(kw["timeout"])
        raise subprocess.TimeoutExpired(cmd, kw["timeout"])

    monkeypatch.setattr(run.subprocess, "run", hung)
    assert run.main(["--only", "train-2x128", "--quick", "--worker-timeout", "7"]) == 0
    assert seen and set(seen) == {7.0}
    assert "error: timed out after 7 s" in capsys.readouterr().out


def test_the_persistent_sweep_times_every_variant_and_flags_a_wrong_one(monkeypatch):
    """The plumbing, on the simulator at a tiny shape (one block a cooperative grid)."""
    import os

    if os.environ.get("NUMBA_ENABLE_CUDASIM") != "1":
        pytest.skip("needs numba's CUDA simulator (make test sets it)")
    pytest.importorskip("numba.cuda")
    from bench import gpu_kernels, persistent_sweep
    from charrnn.kernels import cuda as ck

    for name in ("ROWS", "PREFETCH", "PERSISTENT_THREADS"):  # the sweep sets them
        monkeypatch.setattr(ck, name, getattr(ck, name))
    monkeypatch.setattr(ck, "_PLANS", {})
    shape = gpu_kernels.Shape(L=1, H=4, B=3, T=2, V=5)
    args = (ck, np, lambda: None, [2, 8], [4], [8])
    lines = persistent_sweep.sweep(*args, shape=shape, min_time=0)
    assert len(lines) == 4 and all("| forward: U=" in ln for ln in lines[2:])
    assert not any("DIFFERS" in ln or "not run" in ln for ln in lines)

    real, calls = persistent_sweep.run_variant, []

    def second_is_off(*a, **kw):
        tf, tb, outs = real(*a, **kw)
        calls.append(1)
        return tf, tb, [o * (1.01 if len(calls) == 2 else 1.0) for o in outs]

    monkeypatch.setattr(persistent_sweep, "run_variant", second_is_off)
    lines = persistent_sweep.sweep(*args, shape=shape, min_time=0)
    assert "DIFFERS" not in lines[2] and "**DIFFERS 1.0e-02**" in lines[3]


def test_a_charrnn_worker_loads_charrnn_before_numpy():
    """OpenBLAS reads its thread settings (charrnn sets OPENBLAS_THREAD_TIMEOUT) when numpy
    loads it: a worker that imported numpy first measured OpenBLAS's idle thread spinning
    beside numba's, which no `charrnn` command runs with."""
    code = """
import os, sys
seen = []
class Spy:  # notes the setting at the moment numpy starts to load
    def find_spec(self, name, path=None, target=None):
        if name == "numpy" and not seen:
            seen.append(os.environ.get("OPENBLAS_THREAD_TIMEOUT"))
sys.meta_path.insert(0, Spy())
import bench.worker
from bench import ours
print(seen)
"""
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_THREAD_TIMEOUT"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert out.stdout.strip() == "['4']"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/clear_refs")
def test_the_peak_profile_logs_every_layer_call_and_puts_the_methods_back():
    from dataclasses import replace

    from bench import peaks
    from bench.workloads import ALL
    from charrnn.backend import HostBackend

    original = HostBackend.layer_forward
    log = peaks.step_peaks(replace(ALL["train-2x128"], seq_len=4, batch=8, recompute=1))
    names = [name for name, *_ in log]
    # two layers: layer 0's gates come back by a rerun (recompute 1), layer 0's states never
    # left, layer 1 is the top
    assert names.count("layer_forward") == 2 and names.count("layer_backward") == 2
    assert names.count("recompute_gates") == 1 and names.count("_input_projection") == 3
    assert all(peak >= before and peak >= after > 0 for _, before, peak, after in log)
    assert HostBackend.layer_forward is original


def test_the_optimizer_timing_times_both_variants_every_round():
    from dataclasses import replace

    from bench import optim_time
    from bench.workloads import ALL

    times = optim_time.time_row(replace(ALL["train-2x128"], hidden=16), rounds=2, calls=1)
    assert list(times) == ["one call", "a call a parameter"]
    assert all(len(t) == 2 and min(t) > 0 for t in times.values())


def test_the_floor_profile_times_both_modes_every_round_and_puts_the_kernels_back():
    from dataclasses import replace

    from bench import floors
    from bench.workloads import ALL
    from charrnn.kernels import cpu

    kernels = {name: getattr(cpu, name) for name in floors._kernel_names()}
    assert set(floors.WINDOWS) | {"adam_update_all", "softmax_xent"} <= set(kernels)
    w = replace(ALL["train-2x128"], hidden=16, seq_len=4, batch=8)
    times, peak = floors.time_row(w, rounds=2, steps=1)
    assert {name: getattr(cpu, name) for name in kernels} == kernels  # unwrapped again
    assert peak > 0 and list(times) == ["shipped", "serial"]
    for rounds in times.values():
        assert len(rounds) == 2
        for step, windows, others in rounds:
            assert 0 < windows < step
            assert {"adam_update_all", "softmax_xent", "gather_rows"} <= set(others)
    s = floors.summary(w, times, threads=2, peak_gflops=peak)
    assert s["floor"] == pytest.approx(s["rest"] + s["serial"] / 2)
    assert s["gemm_numpy"] == pytest.approx(s["rest"] - sum(s["others"].values()))
    assert "floor, the window kernels scaling perfectly" in floors.report(w, s, 2, peak)


def test_the_floor_profile_counts_a_steps_products():
    from bench import floors
    from bench.workloads import ALL

    # 2x128, V=65, by hand: each (.,128) x (128,512) product is 2*128*512 FLOPs a
    # character; windows: 2 layers x (forward + backward) recurrent products; rest: layer
    # 1's input projection, dW_ih and dL/dx, both layers' dW_hh, and the decoder's three
    # (2*128*65 each)
    windows, rest = floors.flops_per_char(ALL["train-2x128"])
    assert windows == 4 * 131072
    assert rest == 5 * 131072 + 3 * 16640


def test_the_training_row_tools_take_known_rows_or_their_default_and_refuse_others():
    from bench.workloads import chosen_train_rows, cpu_train_rows, train_rows_parser

    assert cpu_train_rows() == ["train-2x128", "train-2x256", "train-3x512"]  # no recompute rows
    ap = train_rows_parser("tool", "tool: a line.\nmore", "train-2x128")
    assert chosen_train_rows(ap, ap.parse_args([]).rows, ["train-2x128"]) == ["train-2x128"]
    assert chosen_train_rows(ap, ap.parse_args(["train-3x512"]).rows, []) == ["train-3x512"]
    with pytest.raises(SystemExit):
        chosen_train_rows(ap, ap.parse_args(["train-3x512-recompute"]).rows, [])
