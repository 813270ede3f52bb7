"""The goals divco's numbers are judged by, and the ratios they are checked on.

Every ratio compares images/s of two methods measured in the same comparison
(same run, model, S, phase, batch size and execution variant).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional

#: divco's default method per device: batched on GPUs, one branch at a time on CPUs.
DIVCO_DEFAULT = {"cuda": "divco-batched", "cpu": "divco-per-branch"}
#: The methods every ratio table is computed against: the official loop (b) and the undivided model (e).
REFERENCES = ("loop", "undivided")
_WRN = ("wide_resnet16_8", "wide_resnet28_10")


@dataclass(frozen=True)
class Goal:
    device: str
    versus: str
    min_ratio: float
    phase: str = "train"
    models: Optional[tuple[str, ...]] = None  # None: every model
    branches: Optional[int] = None  # None: every S > 1
    dtype: Optional[str] = None  # None: every dtype

    def applies(self, record: dict) -> bool:
        return (
            record["device_type"] == self.device
            and record["phase"] == self.phase
            and record["group_branches"] > 1
            and (self.models is None or record["model"] in self.models)
            and (self.branches is None or record["group_branches"] == self.branches)
            and (self.dtype is None or record["dtype"] == self.dtype)
        )

    def describe(self) -> str:
        where = f"S={self.branches}" if self.branches else "every S>1"
        models = ", ".join(self.models) if self.models else "every model"
        dtype = f", {self.dtype}" if self.dtype else ""
        return f"{self.device}{dtype} {self.phase}: divco >= {self.min_ratio:g}x {self.versus} ({models}, {where})"


GOALS = (
    Goal("cuda", "loop", 3.0, models=_WRN, branches=4, dtype="bfloat16"),
    Goal("cuda", "vmap", 1.3, models=_WRN, dtype="bfloat16"),
    Goal("cuda", "packed", 1.3, models=_WRN, dtype="bfloat16"),
    Goal("cuda", "undivided", 1.0, models=_WRN, dtype="bfloat16"),
    Goal("cpu", "loop", 1.0, phase="train"),
    Goal("cpu", "loop", 1.0, phase="infer"),
)


@dataclass(frozen=True)
class GoalCheck:
    goal: Goal
    group: str
    model: str
    branches: int
    variant: str
    batch_size: int
    ratio: Optional[float]  # None: a side of the comparison is missing (skipped or failed)

    @property
    def met(self) -> Optional[bool]:
        return None if self.ratio is None else self.ratio >= self.goal.min_ratio

    @property
    def shortfall(self) -> Optional[float]:
        """How far below the goal, as a fraction of the goal (0.2 = 20% short)."""
        if self.ratio is None or self.met:
            return None
        return 1.0 - self.ratio / self.goal.min_ratio


def ok(record: dict) -> bool:
    return record.get("status") == "ok" and record.get("images_per_s")


def group_index(records: Iterable[dict]) -> dict[str, dict[str, dict]]:
    """group id -> method -> record (measured records only)."""
    groups: dict[str, dict[str, dict]] = {}
    for r in records:
        if r.get("kind", "network") == "network":
            groups.setdefault(r["group"], {})[r["method"]] = r
    return groups


def ratio(group: dict[str, dict], method: str, versus: str) -> Optional[float]:
    a, b = group.get(method), group.get(versus)
    if a is None or b is None or not ok(a) or not ok(b):
        return None
    return a["images_per_s"] / b["images_per_s"]


def check_goals(records: list[dict]) -> list[GoalCheck]:
    checks = []
    for group_id, group in group_index(records).items():
        any_record = next(iter(group.values()))
        divco = DIVCO_DEFAULT.get(any_record["device_type"])
        for goal in GOALS:
            if divco is None or not goal.applies(any_record):
                continue
            if goal.versus not in group:
                continue
            checks.append(GoalCheck(goal, group_id, any_record["model"], any_record["group_branches"],
                                    any_record["variant"], any_record["batch_size"],
                                    ratio(group, divco, goal.versus)))
    return checks
