"""The benchmark rows: what each one times, in which unit, against which goal.

The sizes and goals are the issue's table. Weights and tokens are random: throughput does
not depend on the text, so no corpus or checkpoint is needed (except by the CLI rows, which
run the real `charrnn names` on the shipped model).

Dimension letters: L=layers, H=hidden (= E, the embedding width), B=batch, T=time, V=vocab.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

# Implementations a row can be timed with. "torch-nodnnl" is PyTorch with oneDNN (mkldnn)
# disabled: its default batch-1 LSTM path goes through oneDNN and is pathologically slow on
# small inputs, so the sampling rows quote both.
CHARRNN, TORCH, TORCH_NODNNL = "charrnn", "torch", "torch-nodnnl"
IMPL_TITLES = {CHARRNN: "charrnn", TORCH: "torch default", TORCH_NODNNL: "torch oneDNN off"}

SAMPLE_TEMPERATURE = 0.8  # sampling and names rows
GRAD_CLIP = 5.0  # training rows: global-norm clipping, as the trainer's default
LR = 2e-3  # training rows: Adam learning rate (the value does not change the speed)
NAMES_N = 1000  # names rows: names per generate call
NAMES_MAX_LEN = 16  # names rows: longest name, so at most 16 steps (+1 for the end token)
NAMES_VOCAB = 27  # a-z plus the end token
# Random weights make every token about equally likely, so names would end after ~27
# characters on average and most would be cut at max_len. A bias on the end token's logit
# makes it about 1 in 7 per step at temperature 0.8 (names of ~6 characters, like real
# ones); charrnn and torch get the same weights, so both do the same amount of work.
NAMES_EOS_BIAS = 1.17


@dataclass(frozen=True)
class Goal:
    kind: str  # ratio_min: charrnn/torch >= value | ratio_max: <= value | abs_min | abs_max
    value: float
    text: str  # as printed in the goal column


@dataclass(frozen=True)
class Workload:
    name: str  # what --only selects
    title: str  # the table's workload column
    kind: str  # train | sample | names | rss | cli
    unit: str  # chars/s | names/s | MiB | s
    goal: Goal | None = None
    layers: int = 0  # L
    hidden: int = 0  # H and E
    batch: int = 1  # B
    seq_len: int = 1  # T (training rows)
    vocab: int = 65  # V
    impls: tuple[str, ...] = (CHARRNN, TORCH)
    gpu: bool = False  # runs on get_backend("cuda") and torch's cuda device
    half: bool = False  # sampling rows: float16 weight matrices (`charrnn sample`'s CPU default)
    source: str = ""  # rss rows: the training row whose worker processes they read
    recompute: int = 0  # training rows: `--recompute N` (gates of the N lowest layers recomputed)
    torch_from: str = ""  # training rows: the row whose torch cells this one shows (the same work for torch)
    issue_torch: str = ""  # PyTorch 2.13 CPU as measured by the issue's author

    @property
    def higher_is_better(self) -> bool:
        return self.unit.endswith("/s")


CPU_WORKLOADS = (
    Workload("train-3x512", "train 3x512 LSTM, B=64, T=100", "train", "chars/s",
             Goal("ratio_min", 1.3, ">=1.3x torch"), 3, 512, 64, 100, issue_torch="3,767"),
    Workload("train-2x256", "train 2x256 LSTM, B=64, T=100", "train", "chars/s",
             Goal("ratio_min", 1.4, ">=1.4x torch"), 2, 256, 64, 100, issue_torch="19,820"),
    Workload("train-2x128", "train 2x128 LSTM, B=64, T=16", "train", "chars/s",
             Goal("ratio_min", 2.0, ">=2x torch"), 2, 128, 64, 16, issue_torch="56,693"),
    Workload("rss-3x512", "peak RSS, training 3x512", "rss", "MiB",
             Goal("ratio_max", 0.5, "<=0.5x torch"), source="train-3x512", issue_torch="810"),
    # The memory-saving option, measured beside the default: what it saves and what it costs.
    # (no goal of its own: the issue's goals are the rows above)
    Workload("train-3x512-recompute", "train 3x512 LSTM, B=64, T=100, `--recompute 1`", "train",
             "chars/s", None, 3, 512, 64, 100, impls=(CHARRNN,), recompute=1,
             torch_from="train-3x512"),
    Workload("rss-3x512-recompute", "peak RSS, training 3x512, `--recompute 1`", "rss", "MiB",
             Goal("ratio_max", 0.5, "<=0.5x torch"), source="train-3x512-recompute"),
    # Sampling rows time what `charrnn sample` does by default on the CPU: float16 weight
    # matrices (the issue's own lever; the model still computes in float32).
    Workload("sample-3x512", "sample 3x512, batch 1, temp 0.8", "sample", "chars/s",
             Goal("abs_min", 4000, ">=4,000 chars/s"), 3, 512,
             impls=(CHARRNN, TORCH, TORCH_NODNNL), half=True, issue_torch="102 / 618"),
    # float32 weights, beside the default: what the float16 default buys (no goal of its own)
    Workload("sample-3x512-float32", "sample 3x512, batch 1, temp 0.8, float32 weights (`--no-half`)",
             "sample", "chars/s", None, 3, 512, impls=(CHARRNN,), half=False),
    Workload("sample-2x128", "sample 2x128, batch 1, temp 0.8", "sample", "chars/s",
             Goal("abs_min", 50000, ">=50,000 chars/s"), 2, 128,
             impls=(CHARRNN, TORCH, TORCH_NODNNL), half=True, issue_torch="2,516 / 3,925"),
    Workload("names-1000", "1000 names, 2x128, <=16 steps", "names", "names/s",
             Goal("ratio_min", 2.0, ">=2x torch"), 2, 128, vocab=NAMES_VOCAB,
             impls=(CHARRNN, TORCH, TORCH_NODNNL), issue_torch="9,465"),
    Workload("cli-names-warm", "`charrnn names -n 20`, warm cache", "cli", "s",
             Goal("abs_max", 1.0, "<=1 s"), impls=(CHARRNN,)),
    Workload("cli-names-first", "`charrnn names -n 20`, first run", "cli", "s",
             Goal("abs_max", 5.0, "<=5 s"), impls=(CHARRNN,)),
)

# --gpu: charrnn's CUDA backend against torch on cuda (cuDNN), with the GPU issue's goals.
GPU_WORKLOADS = (
    Workload("gpu-train-3x512", "train 3x512 LSTM, B=64, T=100", "train", "chars/s",
             Goal("ratio_min", 1.0, ">=1.0x cuDNN"), 3, 512, 64, 100, gpu=True),
    Workload("gpu-sample-3x512", "sample 3x512, batch 1, temp 0.8", "sample", "chars/s",
             Goal("abs_min", 20000, ">=20,000 chars/s"), 3, 512, gpu=True),
    Workload("gpu-sample-2x128", "sample 2x128, batch 1, temp 0.8", "sample", "chars/s",
             None, 2, 128, gpu=True),
    Workload("gpu-names-1000", "1000 names, 2x128, <=16 steps", "names", "names/s",
             None, 2, 128, vocab=NAMES_VOCAB, gpu=True),
)

ALL = {w.name: w for w in CPU_WORKLOADS + GPU_WORKLOADS}


def select(only: str | None, gpu: bool) -> list[Workload]:
    """The rows of this run: every CPU (or, with gpu, GPU) row, or those named in `only`."""
    pool = GPU_WORKLOADS if gpu else CPU_WORKLOADS
    if not only:
        return list(pool)
    names = [n.strip() for n in only.split(",") if n.strip()]
    valid = {w.name for w in pool}
    unknown = [n for n in names if n not in valid]
    if unknown:
        raise ValueError(f"unknown workload(s) {', '.join(unknown)} for a "
                         f"{'--gpu' if gpu else 'CPU'} run; valid: {', '.join(sorted(valid))}")
    return [w for w in pool if w.name in names]


# -- the training-row tools (bench.optim_time, bench.floors) ---------------------------------
def cpu_train_rows() -> list[str]:
    """The cpu training rows at their own settings (not the `--recompute` variants)."""
    return sorted(n for n, w in ALL.items() if w.kind == "train" and not w.gpu and not w.recompute)


def train_rows_parser(prog: str, doc: str, default: str) -> argparse.ArgumentParser:
    """A tool's parser, with ROW... (cpu training rows) as its positional arguments."""
    ap = argparse.ArgumentParser(prog=prog, description=doc.splitlines()[0])
    ap.add_argument("rows", nargs="*", metavar="ROW",
                    help=f"any of {', '.join(cpu_train_rows())} (default: {default})")
    return ap


def chosen_train_rows(ap: argparse.ArgumentParser, rows: list[str], default: list[str]) -> list[str]:
    """rows (from train_rows_parser), or default when none; an unknown one ends with ap.error."""
    unknown = sorted(set(rows) - set(cpu_train_rows()))
    if unknown:
        ap.error(f"unknown row(s) {', '.join(unknown)}; choose from {', '.join(cpu_train_rows())}")
    return rows or default
