"""The ensemble-size curve (Kondratyuk et al. 2020, Figure 1): accuracy of n = 1..S members vs FLOPs.

For each run (S members' test logits [S, N, K]) and each ensemble size n, the accuracy of the
ensemble of n members is averaged over member subsets: all C(S, n) of them when there are at most
``max_subsets`` (64), else ``max_subsets`` distinct subsets drawn with a fixed seed. Members are
combined by the normalised geometric mean of their probabilities by default (Kondratyuk's rule);
any mode of :data:`divco.ensembles.combine.WEIGHTED_ENSEMBLE_MODES` with equal weights may be
asked for. The cost of n members is n times one member's FLOPs (2 x multiply-accumulates of one
image's forward pass).

Outputs (:func:`write_curve`): curve.json (everything), curve.md (a table) and curve.png (log-scale
FLOPs, one curve per run/network width, each point labelled with n) when matplotlib is installed.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..vocabulary import check_choice
from .combine import WEIGHTED_ENSEMBLE_MODES

#: Kondratyuk et al. combine members by the geometric mean of their probabilities.
DEFAULT_CURVE_MODE = "geo_mean"

#: Subsets averaged per ensemble size when C(S, n) is larger.
DEFAULT_MAX_SUBSETS = 64


@dataclass(frozen=True)
class RunMembers:
    """What the curve needs from one run: its members' test logits and the cost of one member."""

    label: str  # the curve this run draws (a network width), e.g. "wide_resnet16_1 (S=4)"
    logits: Tensor  # [S, N, K] test logits of the S members (log-probabilities work as well)
    labels: Tensor  # [N] class indices
    member_flops: float  # FLOPs of one member's forward pass on one image
    source: str = ""  # where the run came from (its directory)

    def __post_init__(self) -> None:
        if not isinstance(self.logits, Tensor) or self.logits.dim() != 3 or not self.logits.is_floating_point():
            raise ValueError(f"{self.source or self.label}: member logits must be a floating-point tensor [S, N, K], "
                             f"got {tuple(self.logits.shape) if isinstance(self.logits, Tensor) else self.logits!r}")
        S, N, K = self.logits.shape
        if S < 1 or N < 1 or K < 1:
            raise ValueError(f"{self.source or self.label}: member logits [S, N, K] must be non-empty, got "
                             f"{tuple(self.logits.shape)}")
        if not isinstance(self.labels, Tensor) or self.labels.shape != (N,) or self.labels.is_floating_point():
            raise ValueError(f"{self.source or self.label}: labels must be integer class indices [{N}], got "
                             f"{tuple(self.labels.shape) if isinstance(self.labels, Tensor) else self.labels!r}")
        if not (isinstance(self.member_flops, (int, float)) and math.isfinite(self.member_flops)
                and self.member_flops > 0):
            raise ValueError(f"{self.source or self.label}: member_flops must be a positive number, "
                             f"got {self.member_flops!r}")


def member_subsets(members: int, size: int, max_subsets: int = DEFAULT_MAX_SUBSETS,
                   seed: int = 0) -> tuple[list[tuple[int, ...]], bool]:
    """The subsets of ``size`` members to average over, and whether they are all of them.

    All C(members, size) subsets in lexicographic order when there are at most ``max_subsets``;
    otherwise ``max_subsets`` distinct subsets drawn uniformly with ``seed`` (sorted).
    """
    if not (isinstance(members, int) and isinstance(size, int) and 1 <= size <= members):
        raise ValueError(f"need 1 <= size <= members (ints), got size {size!r} of {members!r} members")
    if not isinstance(max_subsets, int) or isinstance(max_subsets, bool) or max_subsets < 1:
        raise ValueError(f"max_subsets must be an int >= 1, got {max_subsets!r}")
    if math.comb(members, size) <= max_subsets:
        return list(itertools.combinations(range(members), size)), True
    generator = torch.Generator().manual_seed(seed)
    chosen: set[tuple[int, ...]] = set()
    while len(chosen) < max_subsets:  # C(members, size) > max_subsets: enough distinct subsets exist
        chosen.add(tuple(sorted(torch.randperm(members, generator=generator)[:size].tolist())))
    return sorted(chosen), False


def _member_scores(logits: Tensor, mode: str) -> Tensor:
    """Per-member [S, N, K] terms whose sum over a subset has the subset ensemble's argmax."""
    logits = logits.to(torch.float64)
    if mode == "mean_logits":
        return logits
    if mode == "mean_probs":
        return F.softmax(logits, dim=-1)
    if mode == "geo_mean":  # normalising the geometric mean does not move its argmax
        return F.log_softmax(logits, dim=-1)
    return F.one_hot(logits.argmax(dim=-1), logits.shape[-1]).to(torch.float64)  # vote


def size_accuracies(logits: Tensor, labels: Tensor, *, mode: str = DEFAULT_CURVE_MODE,
                    max_subsets: int = DEFAULT_MAX_SUBSETS, seed: int = 0) -> list[dict]:
    """For n = 1..S: {"n", "accuracy" (mean over subsets), "accuracy_min", "accuracy_max",
    "subsets", "all_subsets"} of members' logits [S, N, K] against labels [N]."""
    check_choice("mode", mode, WEIGHTED_ENSEMBLE_MODES)
    scores = _member_scores(logits, mode)
    labels = labels.to(scores.device)
    points = []
    for n in range(1, scores.shape[0] + 1):
        subsets, exhaustive = member_subsets(scores.shape[0], n, max_subsets, seed)
        accuracies = [float((scores[list(subset)].sum(0).argmax(-1) == labels).to(torch.float64).mean())
                      for subset in subsets]
        points.append({"n": n, "accuracy": math.fsum(accuracies) / len(accuracies),
                       "accuracy_min": min(accuracies), "accuracy_max": max(accuracies),
                       "subsets": len(subsets), "all_subsets": exhaustive})
    return points


def _unique_labels(runs: Sequence[RunMembers]) -> list[str]:
    labels = [run.label for run in runs]
    return [f"{label} [{run.source or i}]" if labels.count(label) > 1 else label
            for i, (label, run) in enumerate(zip(labels, runs))]


def ensemble_curve(runs: Sequence[RunMembers], *, mode: str = DEFAULT_CURVE_MODE,
                   max_subsets: int = DEFAULT_MAX_SUBSETS, seed: int = 0) -> dict:
    """The curve of every run: ``{"mode", "max_subsets", "seed", "curves": [{"label", "source",
    "members", "test_images", "member_flops", "points": [{"n", "flops", "accuracy", ...}]}]}``."""
    if not runs:
        raise ValueError("ensemble_curve needs at least one run")
    curves = []
    for run, label in zip(runs, _unique_labels(runs)):
        points = size_accuracies(run.logits, run.labels, mode=mode, max_subsets=max_subsets, seed=seed)
        for point in points:
            point["flops"] = point["n"] * float(run.member_flops)
        curves.append({"label": label, "source": run.source, "members": int(run.logits.shape[0]),
                       "test_images": int(run.logits.shape[1]), "member_flops": float(run.member_flops),
                       "points": points})
    return {"mode": mode, "max_subsets": max_subsets, "seed": seed, "curves": curves}


def curve_table(curve: dict) -> str:
    """A Markdown table of the curve: one row per (run, n)."""
    lines = [f"Ensemble accuracy by size (members combined by {curve['mode']}; mean over member "
             f"subsets, at most {curve['max_subsets']} per size, seed {curve['seed']})", "",
             "| network | n | FLOPs / image | accuracy % | min / max % | subsets |",
             "|---|---|---|---|---|---|"]
    for c in curve["curves"]:
        for p in c["points"]:
            subsets = f"{p['subsets']}" + ("" if p["all_subsets"] else " (sampled)")
            lines.append(f"| {c['label']} | {p['n']} | {p['flops'] / 1e6:.2f} M | {100 * p['accuracy']:.2f} | "
                         f"{100 * p['accuracy_min']:.2f} / {100 * p['accuracy_max']:.2f} | {subsets} |")
    return "\n".join(lines) + "\n"


def _plot(curve: dict, path: Path) -> bool:
    """Draw curve.png; False when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6.4, 4.8))
    for c in curve["curves"]:
        flops = [p["flops"] for p in c["points"]]
        accuracy = [100 * p["accuracy"] for p in c["points"]]
        axes.plot(flops, accuracy, marker="o", label=c["label"])
        for p, x, y in zip(c["points"], flops, accuracy):
            axes.annotate(str(p["n"]), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    axes.set_xscale("log")
    axes.set_xlabel("FLOPs per image (log scale)")
    axes.set_ylabel("test accuracy (%)")
    axes.set_title(f"Ensembles of n members ({curve['mode']})")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend()
    figure.tight_layout()
    from ..io import atomic_write_path

    with atomic_write_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=120)
    plt.close(figure)
    return True


def write_curve(curve: dict, out_dir) -> dict[str, Optional[Path]]:
    """Write curve.json, curve.md and (with matplotlib) curve.png into ``out_dir``, atomically.

    Returns the written paths by file name; ``None`` for curve.png when matplotlib is missing.
    """
    from ..io import atomic_write_path

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, Optional[Path]] = {}
    for name, text in (("curve.json", json.dumps(curve, indent=2) + "\n"), ("curve.md", curve_table(curve))):
        with atomic_write_path(out / name) as tmp:
            tmp.write_text(text)
        written[name] = out / name
    written["curve.png"] = out / "curve.png" if _plot(curve, out / "curve.png") else None
    return written
