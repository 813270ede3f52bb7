"""Branch-parallel vs data-parallel training: bytes handed to the collectives per step, and step time.

    python -m divco.benchmark.branch_parallel --model wide_resnet16_4 --branches 2 --processes 2

Both modes train the same S-branch model on the same global batches, in one gloo world of
P processes (CPU), through :mod:`divco.train.branch_parallel`:

    branch-parallel  G = P branch groups (each process S/G branches, all B images): one
                     all-gather of the logits [B, S/G, K] per step, no gradient all-reduce
    data-parallel    G = 1 (DDP, each process all S branches, B/P images): the all-reduce
                     of every gradient (DDP's buckets, counted by a communication hook)

"bytes" are what this process hands to each collective (the all-gather's input, the
all-reduce's buckets), counted by :func:`divco.train.branch_parallel.count_communication`;
the wire traffic of a ring is about (P-1) x the all-gather's input and 2(P-1)/P x the
all-reduce's buffer (``ring_bytes``).  Step times are rank 0's, medians over the timed steps
of ``rounds`` runs per mode, the modes alternating (the first step of every run untimed).
"""

from __future__ import annotations

import argparse
import statistics
from typing import Optional

import torch.distributed as dist

from ..train.branch_parallel.loop import LoopConfig, spawn, train_branch_parallel
from ..train.branch_parallel.mesh import build_mesh

MODES = {"branch-parallel": "G = P", "data-parallel": "G = 1 (DDP)"}


def ring_bytes(kind: str, handed: float, processes: int) -> float:
    """Bytes one process sends in a ring implementation of the collective."""
    if kind == "all_gather":
        return handed * (processes - 1)
    return handed * 2 * (processes - 1) / processes


def measure(config: LoopConfig, processes: int, rounds: int) -> Optional[list[dict]]:
    """The spawned target: ``rounds`` runs of each mode, alternating; rank 0 returns one record per mode."""
    meshes = {"branch-parallel": build_mesh(config.branches, processes), "data-parallel": build_mesh(config.branches, 1)}
    runs: dict[str, list[dict]] = {mode: [] for mode in meshes}
    order = list(meshes)
    for r in range(rounds):
        for mode in order[r % 2:] + order[:r % 2]:
            out = train_branch_parallel(config, meshes[mode], count=True)
            if dist.get_rank() == 0:
                runs[mode].append(out)
    if dist.get_rank() != 0:
        return None
    timed_steps = config.steps - 1
    records = []
    for mode, outs in runs.items():
        per_step = {kind: value / config.steps for kind, value in outs[0]["bytes"].items()}
        records.append({
            "mode": mode, "branch_groups": meshes[mode].branch_groups, "processes": processes,
            "bytes_per_step": per_step,
            "ring_bytes_per_step": {kind: ring_bytes(kind, v, processes) for kind, v in per_step.items()},
            "calls_per_step": {kind: value / config.steps for kind, value in outs[0]["calls"].items()},
            "step_seconds": statistics.median(s for out in outs for s in out["seconds"][1:]),
            "timed_steps": timed_steps * len(outs),
            "final_loss": outs[0]["losses"][-1],
        })
    return records


def run(config: LoopConfig, processes: int = 2, rounds: int = 2) -> list[dict]:
    if config.steps < 2:
        raise ValueError(f"the benchmark times every step but the first of a run: steps must be >= 2, got {config.steps}")
    return spawn(measure, processes, config, processes, rounds)


def format_records(records: list[dict], config: LoopConfig) -> str:
    lines = [f"{config.model}, S={config.branches}, global batch {config.batch_size} of {config.image_size}x"
             f"{config.image_size}, {config.num_classes} classes, gloo, {records[0]['processes']} processes",
             f"{'mode':<16} {'G':>2} {'all_gather B/step':>18} {'all_reduce B/step':>18} {'ring B/step':>14} "
             f"{'step s':>8}"]
    for r in records:
        ring = sum(r["ring_bytes_per_step"].values())
        lines.append(f"{r['mode']:<16} {r['branch_groups']:>2} {r['bytes_per_step'].get('all_gather', 0):>18,.0f} "
                     f"{r['bytes_per_step'].get('all_reduce', 0):>18,.0f} {ring:>14,.0f} {r['step_seconds']:>8.3f}")
    bp, dp = records
    handed = [sum(r["bytes_per_step"].values()) for r in records]
    lines.append(f"data-parallel hands {handed[1] / handed[0]:,.0f}x the bytes of branch-parallel; "
                 f"step time ratio data/branch = {dp['step_seconds'] / bp['step_seconds']:.2f}")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="wide_resnet16_4")
    parser.add_argument("--branches", type=int, default=2)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16, help="the global batch")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--steps", type=int, default=4, help="per run (the first untimed)")
    parser.add_argument("--rounds", type=int, default=2, help="runs per mode, alternating")
    args = parser.parse_args(argv)
    config = LoopConfig(model=args.model, branches=args.branches, batch_size=args.batch_size,
                        image_size=args.image_size, num_classes=args.classes, steps=args.steps)
    print(format_records(run(config, args.processes, args.rounds), config))


if __name__ == "__main__":
    main()
