"""What ``divco bench`` measures: profiles, comparisons ("groups") and their order.

A *profile* says what to measure on a device: which models at which S, batch
sizes, methods, and execution variants (dtype, torch.compile, CUDA graphs).  A
*group* is one comparison: every method at one (model, S, phase, batch size,
variant), measured in the same run so that the ratios between them mean
something.  Groups run in order of importance, so that a time budget cuts the
least important ones.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch

from .. import models as divco_models
from .methods import METHODS
from .steps import Variant


@dataclass(frozen=True)
class ModelCase:
    """One model of a profile: at which S, image size and batch sizes it is measured."""

    model: str
    branches: tuple[int, ...]
    image_size: int
    num_classes: int
    train_batch: int
    infer_batches: tuple[int, ...]

    @property
    def main_branches(self) -> int:
        """The S the goals are set at (the largest of the case)."""
        return max(self.branches)


@dataclass(frozen=True)
class Profile:
    device: str  # "cpu" or "cuda"
    quick: bool
    cases: tuple[ModelCase, ...]
    methods: tuple[str, ...] = METHODS
    train_variants: tuple[Variant, ...] = (Variant(),)
    infer_variants: tuple[Variant, ...] = (Variant(),)
    repeats: int = 5
    warmup: int = 1
    channels_last: bool = False
    time_budget_s: float = 600.0
    ops: bool = True  # the fused ops' micro-benchmarks (divco.benchmark.ops)
    profile_misses: int = 4  # torch.profiler tables for at most this many missed goals

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["train_variants"] = [v.label for v in self.train_variants]
        d["infer_variants"] = [v.label for v in self.infer_variants]
        return d


def model_case(model: str, branches, batch: int, infer, image_size: Optional[int] = None,
               num_classes: Optional[int] = None) -> ModelCase:
    """A case with the model's registered input size and the paper's heads (CIFAR-100, ImageNet-1k)."""
    entry = divco_models.get_entry(model)
    size = image_size or entry.input_size[-1]
    classes = num_classes or (100 if entry.family == "cifar" else 1000)
    return ModelCase(model, tuple(branches), size, classes, batch, tuple(infer))


def default_profile(device: str, quick: bool = False) -> Profile:
    """The standard profiles.

    CUDA: bf16 autocast and channels_last; WRN-16-8 and WRN-28-10 at S = 4, 2, 1 on
    32x32 images (batch 256) and ResNet-50 at S = 2 on 224x224 (batch 128);
    inference at batch 1, 32 and 256; plain, CUDA-graph and torch.compile steps.
    The run is ordered by importance (see :func:`groups`) and cut by the budget.
    CPU: float32, reduced sizes so that the whole profile takes a few minutes on a
    2-core machine; both divco executions; torch.compile only with ``--compile``.
    """
    if device == "cuda":
        bf16 = torch.bfloat16
        if quick:
            return Profile(
                device="cuda", quick=True,
                # inference at batch 32 only and no vmap: room in the GPU suite's 95 s for
                # divco-grouped / divco-split, the two convolution implementations "auto" chooses from
                cases=(model_case("wide_resnet16_8", (4, 1), 128, (32,)),),
                methods=("divco-batched", "divco-grouped", "divco-split", "loop", "packed", "undivided"),
                train_variants=(Variant(bf16), Variant(bf16, cuda_graphs=True)),
                infer_variants=(Variant(bf16),),
                repeats=10, warmup=3, channels_last=True, time_budget_s=180.0,
            )
        return Profile(
            device="cuda", quick=False,
            cases=(
                model_case("wide_resnet16_8", (4, 2, 1), 256, (256, 32, 1)),
                model_case("wide_resnet28_10", (4, 2, 1), 256, (256, 32, 1)),
                model_case("resnet50", (2,), 128, (256, 32, 1)),
            ),
            train_variants=(Variant(bf16), Variant(bf16, cuda_graphs=True), Variant(bf16, compile=True),
                            Variant(bf16, compile=True, cuda_graphs=True)),
            infer_variants=(Variant(bf16), Variant(bf16, cuda_graphs=True)),
            repeats=15, warmup=3, channels_last=True, time_budget_s=420.0,
        )
    if device != "cpu":
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    # CPU batches are small: one WRN-16-8 training image costs ~9 GFLOP, a WRN-28-10 one
    # ~31 GFLOP, and a 2-core CPU does some tens of GFLOP/s.
    # ~9 GFLOP, a WRN-28-10 one ~31 GFLOP, and a 2-core CPU does some tens of GFLOP/s;
    # the grouped convolutions of divco-batched and Packed-Ensembles run several times
    # slower than dense ones in NCHW on a CPU, and every comparison includes them.
    # WRN-28-10 at S=4 only: every CPU comparison measures the undivided network too.
    if quick:
        return Profile(
            device="cpu", quick=True,
            cases=(model_case("wide_resnet16_8", (4, 1), 4, (4, 1)),),
            repeats=3, warmup=1, time_budget_s=150.0, profile_misses=1,
        )
    return Profile(
        device="cpu", quick=False,
        cases=(
            model_case("wide_resnet16_8", (4, 2, 1), 8, (8, 1)),
            model_case("wide_resnet28_10", (4,), 2, (2, 1)),
            model_case("resnet50", (2,), 2, (2, 1)),
        ),
        repeats=3, warmup=1, time_budget_s=420.0, profile_misses=2,
    )


@dataclass(frozen=True)
class Group:
    """One comparison: the methods of one (model, S, phase, variant, batch size)."""

    case: ModelCase
    branches: int
    phase: str  # "train" or "infer"
    variant: Variant
    batch_size: int
    methods: tuple[str, ...]
    rank: int  # position in the order of importance (lower runs first)

    @property
    def id(self) -> str:
        return f"{self.case.model}/S{self.branches}/{self.phase}/b{self.batch_size}/{self.variant.label}"

    def method_estimate_s(self, device: str) -> float:
        """A rough cost of one method, to skip what the remaining budget cannot reach."""
        seconds = 1.0 if device == "cpu" else 3.0
        if self.variant.cuda_graphs:
            seconds += 1.5
        if self.variant.compile:
            seconds += 40.0
        return seconds


# Order of importance (lower runs first).  Training at the goals' S (plain, then CUDA
# graphs), inference there at the largest and the smallest batch, training at the other
# S; then the fused ops' micro-benchmarks; then torch.compile (tens of seconds of
# compilation per method), CUDA-graph inference, and everything else.
_RANKS = {
    # (phase, compile, cuda_graphs, main S, batch: "largest" / "smallest" / "other" / "train")
    ("train", False, False, True, "train"): 0,
    ("train", False, True, True, "train"): 1,
    ("infer", False, False, True, "largest"): 2,
    ("infer", False, False, True, "smallest"): 3,
    ("train", False, False, False, "train"): 4,
    ("train", True, False, True, "train"): 5,
    ("infer", False, True, True, "smallest"): 6,
    ("infer", False, True, True, "largest"): 7,
    ("infer", False, False, True, "other"): 8,
    ("train", False, True, False, "train"): 9,
    ("train", True, True, True, "train"): 10,
    ("infer", False, True, True, "other"): 11,
}
_LAST_RANK = 12
#: The fused ops' micro-benchmarks run before the first group of a higher rank.
OPS_AFTER_RANK = 4


def rank(phase: str, variant: Variant, main: bool, batch_class: str) -> int:
    """Where a comparison comes in the order of importance (see ``_RANKS``)."""
    key = (phase, variant.compile, variant.cuda_graphs, main, batch_class)
    return _RANKS.get(key, _LAST_RANK + (2 if variant.compile else 0) + (1 if variant.cuda_graphs else 0))


def methods_at(profile: Profile, S: int, variant: Variant) -> tuple[str, ...]:
    """The methods of one comparison, most important first.

    At S=1 every divided method IS the undivided network: only divco's overhead is
    measured.  On CUDA divco runs batched; its per-branch execution is measured
    uncompiled only (compiling it costs as much as the rest of the group).
    """
    if S == 1:
        return tuple(m for m in ("divco-batched", "undivided") if m in profile.methods)
    if profile.device == "cuda":
        order = ("divco-batched", "loop", "undivided", "divco-grouped", "divco-split", "vmap", "packed",
                 "divco-per-branch")
        if variant.compile:
            order = order[:-1]
    else:
        order = METHODS
    return tuple(m for m in order if m in profile.methods)


def groups(profile: Profile) -> list[Group]:
    """Every comparison of the profile, in the order they run: by rank, then larger S
    first, then the profile's model order, then larger batches first."""
    keyed = []
    for c_index, case in enumerate(profile.cases):
        largest, smallest = max(case.infer_batches), min(case.infer_batches)
        for S in case.branches:
            main = S == case.main_branches
            for variant in profile.train_variants:
                r = rank("train", variant, main, "train")
                group = Group(case, S, "train", variant, case.train_batch, methods_at(profile, S, variant), r)
                keyed.append(((r, -S, c_index, -case.train_batch), group))
            for variant in profile.infer_variants:
                for batch in case.infer_batches:
                    size = "largest" if batch == largest else "smallest" if batch == smallest else "other"
                    r = rank("infer", variant, main, size)
                    group = Group(case, S, "infer", variant, batch, methods_at(profile, S, variant), r)
                    keyed.append(((r, -S, c_index, -batch), group))
    keyed.sort(key=lambda kv: kv[0])
    return [g for _, g in keyed]


def describe(profile: Profile) -> list[str]:
    """The comparisons a profile runs, in order, one line each (``divco bench --dry-run``)."""
    lines = []
    for g in groups(profile):
        estimate = g.method_estimate_s(profile.device) * len(g.methods)
        lines.append(f"{g.id}: {', '.join(g.methods)} (~{estimate:.0f} s)")
    return lines
