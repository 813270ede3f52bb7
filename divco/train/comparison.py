"""The S = 1 versus S > 1 table of ``divco compare``.

Each run is reported by its best.pt - the checkpoint ``divco eval RUN`` evaluates, chosen on
the validation split (on the test set for a run without one) - with the test metrics of its epoch.
"""

from __future__ import annotations

import datetime
from pathlib import Path

import torch

from .. import __version__
from ..platform_info import cpu_model
from .checkpoint import read_checkpoint_file
from .config import TrainConfig
from .engine import TrainResult
from .evaluation import DEFAULT_ENSEMBLE, ENSEMBLE_MODES, EvaluationResult


def reported_checkpoint(result: TrainResult) -> tuple[EvaluationResult, int, str]:
    """(test metrics, epoch, what chose it) of the checkpoint ``divco eval`` reports for the run: its
    best.pt (the record of its epoch), or its last epoch when it has none."""
    path = result.best_checkpoint
    if path is not None and Path(path).is_file():
        state = read_checkpoint_file(path)
        record, best = state.get("last_record"), state.get("best") or {}
        if isinstance(record, dict) and "test_ensembles" in record:
            return EvaluationResult.from_dict(record), record["epoch"], best.get("selected_on", "test_ensemble_acc")
    return result.final, result.epochs_done, "last epoch"


def comparison_rows(results: list[tuple[TrainConfig, TrainResult]]) -> list[dict]:
    rows = []
    for config, result in results:
        final, reported_epoch, selected_on = reported_checkpoint(result)
        history = result.history
        train_time = sum(r["epoch_time_s"] for r in history)
        images = sum(r["train_images"] for r in history)
        branch_acc = [b.acc for b in final.branches]
        rows.append({
            "model": config.model,
            "branches": config.branches,
            "epochs": result.epochs_done,
            "reported_epoch": reported_epoch,  # best.pt's, what divco eval RUN reports
            "selected_on": selected_on,
            "params": result.info.get("params"),
            "test_ensemble_acc": final.ensemble_acc,
            "test_branch_acc_mean": sum(branch_acc) / len(branch_acc),
            "test_branch_acc_best": max(branch_acc),
            "test_ensemble_acc_by_mode": {mode: s.acc for mode, s in final.ensembles.items()},
            "test_nll": final.ensembles["mean_logits"].nll,
            "test_ece": final.ensembles["mean_logits"].ece,
            "test_disagreement": final.mean_disagreement,
            "train_images_per_s": images / train_time if train_time > 0 else None,
            "train_time_s": train_time,
            "out": str(config.out),
        })
    return rows


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


def comparison_table(rows: list[dict], config: TrainConfig, example: TrainResult) -> str:
    """A Markdown table with the setting it was measured in."""
    # the other ensemble modes, in the vocabulary's order (max_probs where the ops provide it)
    other_modes = [m for m in ENSEMBLE_MODES if m != DEFAULT_ENSEMBLE]
    header = (f"| S | best.pt epoch | params | ensemble acc % | branch acc % (mean / best) | {' / '.join(other_modes)} acc % "
              "| NLL | ECE % | disagreement % | train img/s | train time |")
    lines = [
        f"divco {__version__}: {config.model} on {example.info.get('dataset')}",
        f"{rows[0]['epochs']} epochs, batch {config.batch_size}, seed {config.seed}, {example.info.get('device')} "
        f"({cpu_model()}, {torch.get_num_threads()} threads), "
        f"{example.info.get('precision')}, torch {torch.__version__}, {datetime.date.today().isoformat()}",
        f"test metrics of each run's best.pt (what divco eval reports), chosen on {rows[0]['selected_on']}",
        "",
        header,
        "|" + "---|" * (header.count("|") - 1),
    ]
    for r in rows:
        modes = r["test_ensemble_acc_by_mode"]
        disagreement = "-" if r["test_disagreement"] is None else f"{100 * r['test_disagreement']:.2f}"
        speed = "-" if r["train_images_per_s"] is None else f"{r['train_images_per_s']:.1f}"
        lines.append(
            f"| {r['branches']} | {r['reported_epoch']} | {r['params'] / 1e6:.2f} M | {100 * r['test_ensemble_acc']:.2f} | "
            f"{100 * r['test_branch_acc_mean']:.2f} / {100 * r['test_branch_acc_best']:.2f} | "
            f"{' / '.join(f'{100 * modes[m]:.2f}' for m in other_modes)} | "
            f"{r['test_nll']:.4f} | {100 * r['test_ece']:.2f} | {disagreement} | {speed} | "
            f"{_minutes(r['train_time_s'])} |"
        )
    return "\n".join(lines)
