"""The CBNN paper's comparison at one budget: a single model against its checkpoint ensembles.

``divco checkpoint-ensembles`` trains one run per compared method (:data:`COMPARED`: the single
network, snapshot, fge, swa, cbnn) with the same data, network, epochs, batch and seed; this
module turns the finished runs into rows (every member's test accuracy, the ensemble's accuracy,
NLL and ECE, the single model's accuracy at each member's epoch), a markdown table, JSON and a plot.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

#: The compared runs, in the paper's table order: name -> the ``--method`` it trains with.
COMPARED: dict[str, str] = {"single": "cotrain", "snapshot": "snapshot", "fge": "fge", "swa": "swa",
                            "cbnn": "cbnn"}
SINGLE = "single"


def read_history(folder: Path) -> list[dict]:
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def single_row(folder: Path) -> dict:
    """The single network: its last epoch's test metrics (the same budget as every ensemble)."""
    last = read_history(folder)[-1]
    return {"run": SINGLE, "folder": str(folder), "epochs": last["epoch"], "members": [],
            "accuracy": last["test_ensemble_acc"], "nll": last["test_nll"], "ece": last["test_ece"]}


def members_row(name: str, folder: Path, *, device: str = "cpu", batch_size: int = 256,
                cache_dir: Optional[str] = None) -> dict:
    """A checkpoint-ensemble run: each member's test accuracy and the weighted ensemble's (``divco eval RUN``)."""
    from .evaluate_checkpoint import evaluate_members

    report = evaluate_members(folder, device=device, batch_size=batch_size, cache_dir=cache_dir)
    members = [{"epochs_done": m["epochs_done"], "steps_into_epoch": m["steps_into_epoch"], "weight": m["weight"],
                "accuracy": m["accuracy"]} for m in report["members"]]
    ensemble = report["ensemble"]
    return {"run": name, "folder": str(folder), "epochs": read_history(folder)[-1]["epoch"], "members": members,
            "accuracy": ensemble["accuracy"], "nll": ensemble["nll"], "ece": ensemble["ece"]}


def with_single_at_member_epochs(rows: list[dict]) -> list[dict]:
    """Add, to every member, the single network's test accuracy after the same number of epochs."""
    single = next((r for r in rows if r["run"] == SINGLE), None)
    if single is None:
        return rows
    by_epoch = {r["epoch"]: r["test_ensemble_acc"] for r in read_history(Path(single["folder"]))}
    for row in rows:
        for member in row["members"]:
            member["single_at_epoch"] = by_epoch.get(member["epochs_done"])
    return rows


def comparison_table(rows: list[dict], title: str) -> str:
    """Markdown: one line per run (ensemble accuracy, NLL, ECE, members with the single model at their epochs)."""
    single = next((r["accuracy"] for r in rows if r["run"] == SINGLE), None)
    lines = [f"{title}", "",
             "| run | test acc % | vs single | NLL | ECE % | members' test acc % (epoch: member / single) |",
             "|---|---|---|---|---|---|"]
    for row in rows:
        delta = "" if single is None or row["run"] == SINGLE else f"{100 * (row['accuracy'] - single):+.2f}"
        members = ", ".join(
            f"e{m['epochs_done']}{'+' + str(m['steps_into_epoch']) + 's' if m['steps_into_epoch'] else ''}: "
            f"{100 * m['accuracy']:.2f}"
            + (f" / {100 * m['single_at_epoch']:.2f}" if m.get("single_at_epoch") is not None else "")
            + (f" (w {m['weight']:.2f})" if len(row["members"]) > 1 else "")
            for m in row["members"])
        lines.append(f"| {row['run']} | {100 * row['accuracy']:.2f} | {delta} | {row['nll']:.4f} | "
                     f"{100 * row['ece']:.2f} | {members} |")
    return "\n".join(lines) + "\n"


def draw(rows: list[dict], path: Path) -> bool:
    """A bar per run (its ensemble's test accuracy), its members' accuracies as dots; False without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6.4, 4.0))
    names = [r["run"] for r in rows]
    axes.bar(names, [100 * r["accuracy"] for r in rows], color="#9ecae1", label="ensemble (single: the model)")
    labelled = False
    for x, row in enumerate(rows):
        accuracies = [100 * m["accuracy"] for m in row["members"]]
        if accuracies:
            axes.plot([x] * len(accuracies), accuracies, "o", color="#08519c", label=None if labelled else "members")
            labelled = True
    low = min([100 * r["accuracy"] for r in rows] + [100 * m["accuracy"] for r in rows for m in r["members"]])
    axes.set_ylim(max(0.0, low - 5), None)
    axes.set_ylabel("test accuracy (%)")
    axes.legend(loc="lower right")
    figure.tight_layout()
    from ..io import atomic_write_path

    with atomic_write_path(path) as temporary:
        figure.savefig(temporary, format="png", dpi=120)
    plt.close(figure)
    return True
