"""The paper's rules for dividing one network into S small ones.

Width is divided by about sqrt(S) (parameters and FLOPs scale with width squared,
so S networks of width w/sqrt(S) cost about as much as one of width w);
ResNeXt divides its cardinality by S instead.  The tables are the values of the
official code (Zhao et al., IEEE TIP 2022); other S follow the same rule.
"""

from __future__ import annotations

import math

# Base width (channels of the first stage) of plain ResNets, per number of branches.
CIFAR_BASE_WIDTHS = {1: 16, 2: 12, 4: 8, 8: 6, 16: 4}
IMAGENET_BASE_WIDTHS = {1: 64, 2: 44, 4: 32, 8: 24}


def _nearest_multiple(value: float, multiple: int) -> int:
    return max(multiple, multiple * round(value / multiple))


def divided_base_width(base: int, branches: int, table: dict[int, int], multiple: int) -> int:
    """``table[S]`` where the paper gives it, else base/sqrt(S) rounded to ``multiple``."""
    if branches in table:
        return table[branches]
    return _nearest_multiple(base / math.sqrt(branches), multiple)


def cifar_base_width(branches: int) -> int:
    return divided_base_width(16, branches, CIFAR_BASE_WIDTHS, 2)


def imagenet_base_width(branches: int) -> int:
    return divided_base_width(64, branches, IMAGENET_BASE_WIDTHS, 4)


def divided_widen_factor(widen_factor: float, branches: int) -> int:
    """Wide-ResNet: k' = int(max(k / sqrt(S) + 0.4, 1))."""
    return int(max(widen_factor / math.sqrt(branches) + 0.4, 1.0))


def divided_groups(groups: int, branches: int) -> int:
    """ResNeXt: cardinality divided by S (int(), as the official code; at least 1)."""
    return max(1, int(groups / branches))
