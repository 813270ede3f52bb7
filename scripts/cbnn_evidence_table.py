"""The table of scripts/cbnn_evidence.sh: every member's and every ensemble's test accuracy.

    python scripts/cbnn_evidence_table.py OUT [--epochs E]

OUT holds the run folders the script writes (single, snapshot, samme, shrink, cap; the missing ones are
left out). The single network's row gives its test accuracy after each member's epoch (metrics.jsonl,
the same evaluation as a member's), so a member reads against the single model at its epoch. The
members and ensembles are `divco eval RUN --json` (divco.train.evaluate_checkpoint.evaluate_members).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from divco.train.evaluate_checkpoint import evaluate_members

LABELS = {
    "snapshot": "`--method snapshot`",
    "samme": "`--method cbnn --cbnn-weight-ratio 0` (plain SAMME)",
    "shrink": "`--method cbnn --cbnn-shrinkage 0.1 --cbnn-weight-ratio 0`",
    "cap": "`--method cbnn --cbnn-weight-ratio 4`",
    "cap2": "`--method cbnn --cbnn-weight-ratio 2`",
}


def single_accuracies(folder: Path) -> dict[int, float]:
    out = {}
    for line in (folder / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "test_ensemble_acc" in record:
            out[int(record["epoch"])] = float(record["test_ensemble_acc"])
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--epochs", type=int, default=15)
    args = parser.parse_args()
    rows = ["| run | members' test acc % (ensemble weight) | ensemble acc % | ensemble NLL | member e_j (alpha) |",
            "|---|---|---|---|---|"]
    single = args.out / "single"
    if (single / "metrics.jsonl").is_file():
        acc = single_accuracies(single)
        thirds = [j * args.epochs // 3 for j in (1, 2, 3)]
        at = " / ".join(f"{100 * acc[e]:.2f}" if e in acc else "-" for e in thirds)
        final = f"**{100 * acc[args.epochs]:.2f}**" if args.epochs in acc else "-"
        rows.append(f"| single (`--method cotrain --branches 1`), after epochs {thirds} | {at} | {final} | - | - |")
    for name, label in LABELS.items():
        folder = args.out / name
        if not (folder / "members.json").is_file():
            continue
        report = evaluate_members(folder, device="cpu")
        members = " / ".join(f"{100 * m['accuracy']:.2f} ({m['weight']:.3f})" for m in report["members"])
        boosting = " / ".join(f"{100 * m['error']:.1f} % ({m['alpha']:.2f})" for m in report["members"]
                              if "error" in m) or "-"
        ensemble = report["ensemble"]
        rows.append(f"| {label} | {members} | {100 * ensemble['accuracy']:.2f} | {ensemble['nll']:.3f} | {boosting} |")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
