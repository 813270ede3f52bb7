"""Write a benchmark's results: results.json, results.md (tables with ratios), plots.

Every file is written atomically (a temporary file in the same folder, flushed and
fsynced, then renamed over the old one), so an interrupted run never leaves a
half-written file and a reader sees either the previous or the new version.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Callable, Optional

from .goals import DIVCO_DEFAULT, REFERENCES, check_goals, group_index, ratio
from .methods import ALL_METHODS

RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
PROFILES_MD = "profiles.md"
TRAIN_PLOT = "train.png"
INFER_PLOT = "infer.png"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: Path, write: Callable[[object], None], binary: bool = False) -> None:
    """Write ``path`` through ``write(file)`` into a temporary file, then rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; results are ordinary files
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _json_default(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return str(value)


def write_all(out_dir: Path, results: dict, plots: bool = True) -> list[Path]:
    """Write every output file of a run into ``out_dir``; return the paths written."""
    out_dir = Path(out_dir)
    written = [out_dir / RESULTS_JSON, out_dir / RESULTS_MD]
    atomic_write(written[0], lambda f: json.dump(results, f, indent=1, default=_json_default))
    atomic_write(written[1], lambda f: f.write(markdown(results)))
    if results.get("profiles"):
        written.append(out_dir / PROFILES_MD)
        atomic_write(written[-1], lambda f: f.write(profiles_markdown(results)))
    if plots:
        written += write_plots(out_dir, results)
    return written


# -- Markdown ----------------------------------------------------------------------------------


def _fmt(value: Optional[float], digits: int = 1, suffix: str = "") -> str:
    if value is None:
        return "—"
    return f"{value:.{digits}f}{suffix}"


def _ratio_cell(value: Optional[float]) -> str:
    return "—" if value is None else f"{value:.2f}x"


def _machine_line(machine: dict) -> str:
    if machine.get("gpu_name"):
        hw = f"{machine['gpu_name']} (driver {machine.get('cuda_driver') or '?'}), host CPU {machine['cpu_model']}"
    else:
        hw = f"{machine['cpu_model']}, {machine['cpu_cores']} cores, {machine['torch_threads']} torch threads"
    return (f"{hw}; torch {machine['torch']}, triton {machine.get('triton')}, divco {machine['divco']} "
            f"(native extension: {machine.get('divco_native_extension')}), torch-uncertainty "
            f"{machine.get('torch_uncertainty') or 'not installed'}; Python {machine['python']}; {machine['date']}")


def _method_order(name: str) -> int:
    return ALL_METHODS.index(name) if name in ALL_METHODS else len(ALL_METHODS)


def markdown(results: dict) -> str:
    machine = results["machine"]
    profile = results["profile"]
    device = profile["device"]
    lines = [
        f"# divco bench: {device}{' (quick)' if profile['quick'] else ''}",
        "",
        _machine_line(machine),
        "",
        f"Medians of {profile['repeats']} timed steps after {profile['warmup']} warm-up step(s)"
        + ("; CUDA events." if device == "cuda" else "; methods interleaved across repeats.")
        + f" Ratios are images/s of divco's default method ({DIVCO_DEFAULT.get(device)}) or of the row's"
        " method over the reference measured in the same comparison: (b) the official loop of S models,"
        " (e) the undivided network (S=1). Training: forward, co-training loss, backward, SGD step."
        f" {'Run complete' if results['complete'] else 'PARTIAL RUN'}, {results['elapsed_s']:.0f} s.",
        "",
    ]
    if results.get("matmul_peak"):
        mp = results["matmul_peak"]
        lines += [(f"Measured {mp['dtype']} matmul peak ({mp['size']}^3): {mp['flops_per_s'] / 1e12:.0f} TFLOP/s "
                  "(the MFU denominator; FLOPs per step = 2 x divco.summary MACs, x3 for training)."), ""]
    lines += _goals_section(results)
    for phase, title in (("train", "Training step"), ("infer", "Inference")):
        lines += _phase_section(results, phase, title)
    lines += _ops_section(results)
    lines += _problems_section(results)
    if results.get("notes"):
        lines += ["## Notes", ""] + [f"- {n}" for n in results["notes"]] + [""]
    return "\n".join(lines)


def _goals_section(results: dict) -> list[str]:
    checks = check_goals(results["records"])
    if not checks:
        return []
    lines = ["## Goals", "", "| goal | model | S | variant | batch | ratio | met |", "|---|---|---|---|---|---|---|"]
    for c in checks:
        if c.met is None:
            continue
        verdict = "yes" if c.met else f"NO ({c.shortfall * 100:.0f}% short)"
        lines.append(f"| {c.goal.describe()} | {c.model} | {c.branches} | {c.variant} | {c.batch_size} | "
                     f"{_ratio_cell(c.ratio)} | {verdict} |")
    unmeasured = sum(c.met is None for c in checks)
    if unmeasured:
        lines += ["", f"{unmeasured} more goal comparison(s) not measured (skipped or failed: see below)."]
    if any(c.met is False for c in checks):
        lines += ["", f"Where the time goes for missed goals: torch.profiler tables in {PROFILES_MD}."]
    return lines + [""]


def _phase_section(results: dict, phase: str, title: str) -> list[str]:
    groups = group_index(results["records"])
    rows = []
    for group in groups.values():
        first = next(iter(group.values()))
        if first["phase"] != phase:
            continue
        for name in sorted(group, key=_method_order):
            r = group[name]
            if r["status"] != "ok":
                continue
            mem = r["peak_memory_bytes"]
            rows.append("| " + " | ".join([
                r["model"], str(r["group_branches"]), r["variant"], str(r["batch_size"]), name,
                _fmt(r["images_per_s"]),
                _fmt(r["step_time_s"] * 1000, 2),
                _ratio_cell(ratio(group, name, "loop")),
                _ratio_cell(ratio(group, name, "undivided")),
                _fmt(mem / 2**20 if mem else None, 0),
                _fmt(r["mfu"] * 100 if r.get("mfu") else None, 1, "%"),
            ]) + " |")
    if not rows:
        return []
    time_name = "latency ms" if phase == "infer" else "step ms"
    return [f"## {title}", "",
            (f"| model | S | variant | batch | method | images/s | {time_name} | vs {REFERENCES[0]} (b) | "
            f"vs {REFERENCES[1]} (e) | peak MiB | MFU |"),
            "|---|---|---|---|---|---|---|---|---|---|---|", *rows, ""]


def _ops_section(results: dict) -> list[str]:
    ops = [r for r in results.get("ops", []) if r.get("status", "ok") == "ok"]
    if not ops:
        return []
    skip = {"status", "reason", "times_s", "samples_s"}
    keys = [k for k in ops[0] if k not in skip]
    for r in ops[1:]:
        keys += [k for k in r if k not in keys and k not in skip]
    lines = ["## Fused ops (divco.benchmark.ops)", "", "| " + " | ".join(keys) + " |",
             "|" + "---|" * len(keys)]
    for r in ops:
        cells = []
        for k in keys:
            v = r.get(k)
            cells.append(f"{v:.4g}" if isinstance(v, float) else ("—" if v is None else str(v)))
        lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]


def _problems_section(results: dict) -> list[str]:
    seen, lines = set(), []
    for r in results["records"] + results.get("ops", []):
        if r.get("status") in ("skipped", "failed"):
            where = r.get("group", "ops")
            key = (r.get("method"), r["status"], r.get("reason"))
            if r.get("reason") == "time budget exhausted":
                key = ("budget", where)
            if key in seen:
                continue
            seen.add(key)
            lines.append(f"- {where} {r.get('method', '')}: {r['status']}: {r.get('reason', '')}")
    return (["## Skipped or failed", ""] + lines + [""]) if lines else []


def profiles_markdown(results: dict) -> str:
    lines = ["# Where the time goes (missed goals)", "",
             ("torch.profiler tables of one step of divco and of the method it was compared with, "
             "for each comparison that missed a goal."), ""]
    for entry in results["profiles"]:
        lines += [f"## {entry['group']}: {entry['goal']}", "", f"Measured ratio: {_ratio_cell(entry['ratio'])}", ""]
        for name, table in entry["tables"].items():
            lines += [f"### {name}", "", "```", table.rstrip(), "```", ""]
    return "\n".join(lines)


# -- plots ---------------------------------------------------------------------------------


def write_plots(out_dir: Path, results: dict) -> list[Path]:
    """images/s against S, one line per method; one panel per model and variant."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        results.setdefault("notes", []).append("plots not drawn: matplotlib is not installed")
        return []
    written = []
    for phase, filename in (("train", TRAIN_PLOT), ("infer", INFER_PLOT)):
        records = [r for r in results["records"] if r["phase"] == phase and r["status"] == "ok"]
        if phase == "infer" and records:  # one batch size per panel: the largest measured
            largest = max(r["batch_size"] for r in records)
            records = [r for r in records if r["batch_size"] == largest]
        panels = sorted({(r["model"], r["variant"]) for r in records})
        if not panels:
            continue
        cols = len({m for m, _ in panels})
        rows = len({v for _, v in panels})
        fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.5 * rows), squeeze=False)
        models = sorted({m for m, _ in panels})
        variants = sorted({v for _, v in panels})
        for (model, variant) in panels:
            ax = axes[variants.index(variant)][models.index(model)]
            here = [r for r in records if r["model"] == model and r["variant"] == variant]
            for method in sorted({r["method"] for r in here}, key=_method_order):
                points = {}
                for r in here:
                    if r["method"] == method:
                        points.setdefault(r["group_branches"], r["images_per_s"])
                xs = sorted(points)
                if method == "undivided":
                    ax.axhline(points[xs[0]], color="gray", linestyle="--", label="undivided (S=1)")
                else:
                    ax.plot(xs, [points[x] for x in xs], marker="o", label=method)
            ax.set_xscale("log", base=2)
            ax.set_xticks(sorted({r["group_branches"] for r in here}))
            ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
            batch = here[0]["batch_size"]
            ax.set_title(f"{model}, {variant}, batch {batch}", fontsize=9)
            ax.set_xlabel("branches S")
            ax.set_ylabel("images/s")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        for r_i in range(rows):
            for c_i in range(cols):
                if not axes[r_i][c_i].has_data():
                    axes[r_i][c_i].set_visible(False)
        fig.suptitle(f"divco bench, {phase}: {results['machine'].get('gpu_name') or results['machine']['cpu_model']}",
                     fontsize=10)
        fig.tight_layout()
        path = Path(out_dir) / filename
        atomic_write(path, lambda f, fig=fig: fig.savefig(f, format="png", dpi=110), binary=True)
        plt.close(fig)
        written.append(path)
    return written
