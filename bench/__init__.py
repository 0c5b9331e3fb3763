"""Benchmarks: charrnn against the identical PyTorch model, on this machine, in one run.

`python -m bench.run` (the `make bench` target) times every workload of `workloads.py`, each
implementation in its own worker process (`python -m bench.worker ROW IMPL`), so peak RSS is
per config and one implementation's threads or allocations never colour another's figures.
A full run measures every row in two rounds, its implementations back to back and in reverse
order the second time, so a ratio compares figures taken minutes apart.
It then rewrites its section of BENCHMARKS.md and keeps the hand-written notes below the
marker line.

  workloads.py   the rows: sizes, units, goals (the issue's table)
  timing.py      warm-up, repeats sized to a time budget, median and spread
  ours.py        charrnn's side, through the public API only (a Trainer step, generate,
                 generate_names)
  torch_ref.py   the same model in PyTorch (optional: rows say n/a without torch)
  worker.py      one measurement in one process -> one JSON line with figures and peak RSS
  cli_time.py    wall time of the real `charrnn names` command, warm and first run
  machine.py     what the header says about the machine and the libraries
  report.py      the results table and BENCHMARKS.md (sections and notes preserved)
  run.py         the command line: --quick, --only, --gpu, --out
  gpu_kernels.py each CUDA kernel of a flagship step timed alone, its FLOP rate or bandwidth
                 beside the GPU's measured ceilings (`make bench-gpu` runs it after run.py)
  gpu_check.py   a minute's look at a GPU machine: libraries, a grid-synchronised launch, the
                 flagship plans (`make test-gpu` runs it first)
  levers.py      short training runs screening quality levers (`make levers`)
"""
