"""One measurement in its own process: `python -m bench.worker ROW IMPL [--quick]`.

Prints one line `BENCH-RESULT {json}` on stdout: per-repeat rates, units per repeat, the
first (compiling) call's time, peak RSS of this process (VmHWM: model, activations,
optimizer state, and the interpreter and libraries it needs) and its file-backed part (the
libraries' pages), and runtime details. A failure
is reported in the same line as {"error": ...} so the table can say so; the traceback goes
to stderr. charrnn workers never import torch, so their RSS is charrnn's own.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import traceback
from dataclasses import replace

from bench.timing import FULL, QUICK, measure
from bench.workloads import ALL, CHARRNN, TORCH, TORCH_NODNNL

MARK = "BENCH-RESULT "


class NotApplicable(RuntimeError):
    """The row cannot run here (e.g. torch without CUDA): the table says n/a, not error."""


def status_mib(field: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024.0  # KiB
    except OSError:
        pass
    return None


def peak_rss_mib() -> float:
    """This process's peak resident memory. VmHWM belongs to the address space made at exec;
    ru_maxrss would also count the parent's peak, which Linux carries across exec."""
    peak = status_mib("VmHWM")
    if peak is not None:
        return peak
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # no /proc: KiB on Linux


def file_rss_mib() -> float | None:
    """Resident pages mapped from files (the libraries' code and data) at the end of the work.
    They only grow during a run, so this is their share of the peak too. How many of a
    library's pages a process maps depends on how the file entered the page cache: right
    after pip wrote libllvmlite.so, importing it mapped 104 MiB; after the cache had dropped
    and reread it, 43 MiB. The rest of the peak is the process's own (anonymous) memory."""
    return status_mib("RssFile")


def run_ours(w, plan) -> dict:
    from bench import ours

    device = "cuda" if w.gpu else "cpu"
    step = ours.STEP_FNS[w.kind](w, device)
    t = measure(step, plan, ours.sync_for(device))
    return {"rates": t.rates, "units": t.units, "first_s": t.first_s, "info": ours.info(device)}


def run_torch(w, impl, plan) -> dict:
    import torch

    from bench import torch_ref

    if w.gpu and not torch.cuda.is_available():
        raise NotApplicable("torch without CUDA")
    dev = torch_ref.setup("cuda" if w.gpu else "cpu")
    kwargs = {}
    if w.kind in ("sample", "names"):  # the very weights charrnn samples from
        from bench import ours

        kwargs = {"params": ours.random_params(w), "vocab": ours.vocab_for(w)}
    enabled = impl != TORCH_NODNNL
    with torch.backends.mkldnn.flags(enabled=enabled):
        step = torch_ref.STEP_FNS[w.kind](w, dev, **kwargs)
        t = measure(step, plan, torch_ref.sync_for(dev))
        info = torch_ref.info(dev)
    return {"rates": t.rates, "units": t.units, "first_s": t.first_s, "info": info}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.worker", description=__doc__.splitlines()[0])
    ap.add_argument("row", choices=sorted(n for n, w in ALL.items() if w.kind in ("train", "sample", "names")))
    ap.add_argument("impl", choices=[CHARRNN, TORCH, TORCH_NODNNL])
    ap.add_argument("--quick", action="store_true", help="few, short repeats (smoke run)")
    ap.add_argument("--repeats", type=int, help="timed repeats (default: the plan's)")
    args = ap.parse_args(argv)
    w = ALL[args.row]
    plan = QUICK if args.quick else FULL
    if args.repeats:
        plan = replace(plan, repeats=args.repeats)
    result = {"row": w.name, "impl": args.impl}
    try:
        if args.impl == CHARRNN:
            result.update(run_ours(w, plan))
        else:
            result.update(run_torch(w, args.impl, plan))
    except NotApplicable as e:
        result["na"] = str(e)
    except Exception as e:  # noqa: BLE001 -- any failure becomes an "error" cell; the traceback goes to stderr
        traceback.print_exc()
        result["error"] = f"{type(e).__name__}: {e}".splitlines()[0][:200]
    result["peak_rss_mib"] = peak_rss_mib()
    result["file_rss_mib"] = file_rss_mib()
    sys.stdout.write(MARK + json.dumps(result) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
