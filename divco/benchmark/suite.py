"""Run a benchmark profile: build the methods, time them, record, write as it goes.

The comparisons of :mod:`divco.benchmark.plan` run in their order of importance
under a time budget; what the budget does not reach is recorded as skipped, except
in a quick profile, which always measures its whole plan (with fewer repeats once
it falls behind the budget).  The
results are written after every comparison, and SIGTERM/SIGINT stop the run
cleanly with everything measured so far written, so a run cut short (a time limit,
a lost machine) still leaves its numbers.
"""

from __future__ import annotations

import gc
import inspect
import signal
import time
import traceback
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from .. import models as divco_models
from . import goals as goals_mod
from .environment import machine_info, matmul_peak_flops
from .measure import cpu_peak_memory, median, profile_table, storage_bytes, time_cuda, time_interleaved
from .methods import Method, MethodUnavailable, Workload, build_method
from .plan import OPS_AFTER_RANK, Group, Profile, groups

SCHEMA_VERSION = 1
#: Built methods are kept for later comparisons of the same (model, S) up to this
#: many bytes of parameters (x3: gradients and momentum), on the CPU / on a GPU as a
#: fraction of its memory.  Rebuilding costs model construction and a device copy.
CPU_METHOD_CACHE_BYTES = 3 * 2**30
CUDA_METHOD_CACHE_FRACTION = 0.25
#: A quick profile behind its time budget measures every comparison with this many timed steps
#: (and at most one warm-up) instead of skipping comparisons: fewer repeats, never fewer cases.
QUICK_MIN_REPEATS = 2


class _Interrupted(BaseException):
    """SIGTERM/SIGINT during the run: stop measuring, write what was measured.

    A BaseException (like KeyboardInterrupt), so that the ``except Exception``
    clauses that keep the suite going after one method fails (and those inside
    torch.compile) do not swallow it."""


@dataclass
class _Context:
    profile: Profile
    device: torch.device
    log: Callable[[str], None]
    deadline: float
    results: dict
    peak_flops: Optional[float] = None
    undivided_records: dict = field(default_factory=dict)
    methods: "OrderedDict[tuple, Method]" = field(default_factory=OrderedDict)
    misses_profiled: int = 0
    # (compile, cuda_graphs) -> the longest one method has taken so far: estimates learn
    observed_s: dict = field(default_factory=dict)
    # timed / warm-up steps per measurement: the profile's, fewer once a quick run falls behind
    repeats: int = 0
    warmup: int = 0

    def __post_init__(self):
        self.repeats = self.repeats or self.profile.repeats
        self.warmup = self.warmup or self.profile.warmup

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def method_estimate_s(self, group: Group) -> float:
        key = (group.variant.compile, group.variant.cuda_graphs)
        return max(group.method_estimate_s(self.device.type), self.observed_s.get(key, 0.0))

    def observe(self, group: Group, seconds: float) -> None:
        key = (group.variant.compile, group.variant.cuda_graphs)
        self.observed_s[key] = max(self.observed_s.get(key, 0.0), seconds)

    def cache_limit(self) -> int:
        if self.device.type == "cuda":
            return int(torch.cuda.get_device_properties(self.device).total_memory * CUDA_METHOD_CACHE_FRACTION)
        return CPU_METHOD_CACHE_BYTES

    def method(self, group: Group, name: str) -> Method:
        """Method ``name`` for the group's (model, S): built once, then reused (LRU)."""
        key = (group.case.model, group.branches, group.case.num_classes, group.case.image_size, name)
        if key in self.methods:
            self.methods.move_to_end(key)
            return self.methods[key]
        workload = Workload(group.case.model, group.branches, group.case.num_classes, group.case.image_size,
                            self.device, self.profile.channels_last)
        divided = None
        if name not in ("undivided", "packed"):
            # The divided methods start from the same weights: one divco model, seeded.
            torch.manual_seed(0)
            divided = divco_models.create(group.case.model, num_classes=group.case.num_classes,
                                          branches=group.branches)
        torch.manual_seed(0)
        method = build_method(name, workload, divided)
        self.methods[key] = method
        while len(self.methods) > 1 and _cached_bytes(self.methods) > self.cache_limit():
            self.methods.popitem(last=False)
        return method

    def forget(self, group: Group, name: str) -> None:
        key = (group.case.model, group.branches, group.case.num_classes, group.case.image_size, name)
        self.methods.pop(key, None)


def _cached_bytes(methods) -> int:
    return sum(3 * storage_bytes(m.parameters()) for m in methods.values())


def _clear_grads(method: Method) -> None:
    for p in method.parameters():
        p.grad = None


# -- records ---------------------------------------------------------------------------------


def _common(ctx: _Context, group: Group) -> dict:
    v = group.variant
    return {
        "kind": "network",
        "group": group.id,
        "device_type": ctx.device.type,
        "model": group.case.model,
        "group_branches": group.branches,
        "phase": group.phase,
        "batch_size": group.batch_size,
        "image_size": group.case.image_size,
        "num_classes": group.case.num_classes,
        "dtype": v.dtype_name,
        "channels_last": ctx.profile.channels_last,
        "compile": v.compile,
        "cuda_graphs": v.cuda_graphs,
        "variant": v.label,
    }


def _empty_record(ctx: _Context, group: Group, method: str, status: str, reason: str = "") -> dict:
    rec = _common(ctx, group)
    rec.update({
        "method": method,
        "branches": 1 if method == "undivided" else group.branches,
        "execution": None,
        "status": status,
        "reason": reason,
        "images_per_s": None,
        "step_time_s": None,
        "latency_s": None,
        "step_times_s": [],
        "peak_memory_bytes": None,
        "params": None,
        "macs_per_image": None,
        "flops_per_step": None,
        "achieved_flops_per_s": None,
        "mfu": None,
    })
    return rec


def _fill(ctx: _Context, rec: dict, method: Method, times: list[float], peak: int) -> dict:
    step_time = median(times)
    batch = rec["batch_size"]
    macs = method.macs_per_image()
    flops = (6 if rec["phase"] == "train" else 2) * macs * batch  # 2 FLOPs per MAC; backward = 2x forward
    rec.update({
        "status": "ok",
        "execution": getattr(method, "execution", None),
        "images_per_s": batch / step_time,
        "step_time_s": step_time,
        "latency_s": step_time if rec["phase"] == "infer" else None,
        "step_times_s": times,
        "peak_memory_bytes": int(peak),
        "params": method.parameter_count(),
        "macs_per_image": int(macs),
        "flops_per_step": int(flops),
        "achieved_flops_per_s": flops / step_time,
        "mfu": (flops / step_time / ctx.peak_flops) if ctx.peak_flops else None,
    })
    return rec


def _error_reason(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}".strip().splitlines()
    return text[0][:500] if text else type(error).__name__


# -- one comparison ----------------------------------------------------------------------------


def _make_step(ctx: _Context, group: Group, method: Method):
    if group.variant.compile:
        torch._dynamo.reset()  # each method compiles afresh (no recompile limit, no stale guards)
    _clear_grads(method)
    generator = torch.Generator().manual_seed(1)
    if group.phase == "train":
        from .steps import MethodTrainStep

        images, target = method.train_inputs(group.batch_size, generator)
        return MethodTrainStep(method, images, target, group.variant)
    from .steps import MethodInferStep

    return MethodInferStep(method, method.infer_inputs(group.batch_size, generator), group.variant)


def _run_group_cpu(ctx: _Context, group: Group) -> list[dict]:
    records, built = {}, {}
    for name in group.methods:
        rec = records[name] = _empty_record(ctx, group, name, "failed")
        try:
            method = ctx.method(group, name)
            step = _make_step(ctx, group, method)
            for _ in range(max(1, ctx.warmup)):  # warm-up alone: a failing method drops out here
                step()
            built[name] = (method, step)
        except MethodUnavailable as error:
            rec.update(status="skipped", reason=str(error))
        except Exception as error:  # noqa: BLE001 - one method failing must not stop the suite
            rec["reason"] = _error_reason(error)
            ctx.forget(group, name)
            ctx.log(f"  {name}: FAILED {rec['reason']}")
    if built:
        times = time_interleaved({n: s for n, (_, s) in built.items()}, ctx.repeats, warmup=0)
        for name, (method, step) in built.items():
            _fill(ctx, records[name], method, times[name], cpu_peak_memory(step, step.state_tensors))
    out = [records[n] for n in group.methods]
    _profile_misses(ctx, group, out, {n: s for n, (_, s) in built.items()})
    for method, _ in built.values():
        _clear_grads(method)
    return out


def _missed(records: list[dict], versus: str) -> bool:
    return any(c.goal.versus == versus and c.met is False for c in goals_mod.check_goals(records))


def _run_group_cuda(ctx: _Context, group: Group) -> list[dict]:
    out = []
    # Profiler tables where a goal is missed: divco's step stays alive for the group (it
    # runs first), a compared method is profiled right after it was measured and lost.
    tables: dict[str, str] = {}
    want_tables = (not group.variant.cuda_graphs and ctx.misses_profiled < ctx.profile.profile_misses
                   and any(g.applies(_common(ctx, group)) for g in goals_mod.GOALS))
    divco_name = goals_mod.DIVCO_DEFAULT["cuda"]
    divco_step = None
    undivided_key = (group.case.model, group.phase, group.variant.label, group.batch_size)
    for name in group.methods:
        if name == "undivided" and undivided_key in ctx.undivided_records:
            rec = dict(ctx.undivided_records[undivided_key])  # the same network, measured once
            rec.update(group=group.id, group_branches=group.branches, reused_from=rec["group"])
            out.append(rec)
            continue
        rec = _empty_record(ctx, group, name, "failed")
        out.append(rec)
        if not ctx.profile.quick and ctx.remaining() < ctx.method_estimate_s(group):
            rec.update(status="skipped", reason="time budget exhausted")
            continue
        step = None
        started = time.monotonic()
        try:
            method = ctx.method(group, name)
            torch.cuda.synchronize(ctx.device)
            # Memory: this method's own state plus everything the step allocates, from before
            # the step exists (a CUDA graph's activations live in its pool from the capture on).
            own = storage_bytes(list(method.parameters()) + method.extra_state()
                                + [b for m in method.modules() for b in m.buffers()])
            before = torch.cuda.memory_allocated(ctx.device)
            torch.cuda.reset_peak_memory_stats(ctx.device)
            step = _make_step(ctx, group, method)
            times = time_cuda(step, ctx.repeats, warmup=ctx.warmup)
            peak = torch.cuda.max_memory_allocated(ctx.device) - before + own
            _fill(ctx, rec, method, times, peak)
            if want_tables and name == divco_name:
                divco_step = step
            elif want_tables and divco_step is not None and _missed(out, name):
                tables[name] = profile_table(step, ctx.device)
                if divco_name not in tables:
                    tables[divco_name] = profile_table(divco_step, ctx.device)
        except MethodUnavailable as error:
            rec.update(status="skipped", reason=str(error))
        except Exception as error:  # noqa: BLE001 - OOM, a failed capture or compile: record, go on
            rec["reason"] = _error_reason(error)
            ctx.forget(group, name)
            ctx.log(f"  {name}: FAILED {rec['reason']}")
        finally:
            del step
            for m in ctx.methods.values():
                _clear_grads(m)
            gc.collect()
            torch.cuda.empty_cache()
        ctx.observe(group, time.monotonic() - started)
        if name == "undivided" and rec["status"] == "ok":
            ctx.undivided_records[undivided_key] = rec
    del divco_step
    _profile_misses(ctx, group, out, tables=tables)
    return out


def _profile_misses(ctx: _Context, group: Group, records: list[dict], steps=None, tables=None) -> None:
    """torch.profiler tables of divco and of the compared method, for the goals this group missed."""
    for check in goals_mod.check_goals(records):
        if check.met is not False or ctx.misses_profiled >= ctx.profile.profile_misses:
            continue
        divco = goals_mod.DIVCO_DEFAULT[ctx.device.type]
        entry = {"goal": check.goal.describe(), "group": group.id, "ratio": check.ratio, "tables": {}}
        for name in (divco, check.goal.versus):
            table = (tables or {}).get(name)
            if table is None and steps and name in steps:
                table = profile_table(steps[name], ctx.device)
            if table:
                entry["tables"][name] = table
        ctx.misses_profiled += 1
        ctx.results["profiles"].append(entry)


def _run_ops(ctx: _Context) -> None:
    """The fused ops' micro-benchmarks: ``divco.benchmark.ops.run(device, ...)`` returns one
    dict per measurement (written with the ops; not timed twice here)."""
    try:
        from . import ops as ops_bench
    except ImportError as error:
        ctx.results["ops"].append({"status": "skipped", "reason": f"divco.benchmark.ops: {error}"})
        return
    try:
        run = ops_bench.run
        accepted = inspect.signature(run).parameters
        kwargs = {}
        if ctx.profile.quick:  # no compiled reference (tens of seconds to compile), few repeats
            kwargs = {k: v for k, v in (("compiled", False), ("repeats", ctx.repeats)) if k in accepted}
        records = list(run(ctx.device, **kwargs))
        for r in records:
            r.setdefault("status", "ok")
        ctx.results["ops"].extend(records)
    except Exception as error:  # noqa: BLE001
        ctx.results["ops"].append({"status": "failed", "reason": _error_reason(error)})
        ctx.log(f"ops micro-benchmarks FAILED: {_error_reason(error)}")
    _run_batch_norm_blocks(ctx)


def _run_batch_norm_blocks(ctx: _Context) -> None:
    """The fused BatchNorm block (divco.benchmark.batch_norm) against eager and compiled; the
    quick profile keeps the small ResNet-110 S=2 shapes, without the compiled reference."""
    try:
        from . import batch_norm as bn_bench

        cases = bn_bench.CASES
        kwargs: dict = {}
        if ctx.profile.quick:
            cases = tuple(c for c in cases if c.model == "resnet110_s2")
            kwargs = {"compiled": False, "repeats": ctx.repeats}
        records = bn_bench.run(ctx.device, cases, **kwargs)
        for r in records:
            r.setdefault("status", "ok")
        ctx.results["ops"].extend(records)
    except Exception as error:  # noqa: BLE001
        ctx.results["ops"].append({"status": "failed", "reason": f"batch_norm: {_error_reason(error)}"})
        ctx.log(f"batch_norm micro-benchmarks FAILED: {_error_reason(error)}")


def _fit_quick_run(ctx: _Context, remaining_groups: list[Group]) -> None:
    """A quick profile measures its whole plan: when the rest of it no longer fits the budget at
    the profile's repeats, measure with QUICK_MIN_REPEATS from here on (said in the notes)."""
    if ctx.repeats <= QUICK_MIN_REPEATS:
        return
    estimate = sum(ctx.method_estimate_s(g) * len(g.methods) for g in remaining_groups)
    if ctx.remaining() >= estimate:
        return
    ctx.repeats, ctx.warmup = min(ctx.repeats, QUICK_MIN_REPEATS), min(ctx.warmup, 1)
    note = (f"quick profile behind its {ctx.profile.time_budget_s:.0f} s budget: from "
            f"{remaining_groups[0].id} on, {ctx.repeats} timed steps and {ctx.warmup} warm-up per measurement "
            f"(profile: {ctx.profile.repeats} and {ctx.profile.warmup})")
    ctx.results["notes"].append(note)
    ctx.log(note)


# -- the run -----------------------------------------------------------------------------------


def run_suite(profile: Profile, out_dir: Optional[Path] = None,
              log: Callable[[str], None] = print) -> dict:
    """Run ``profile``; write results.json, results.md, plots (and profiles.md) into ``out_dir``.

    Returns the results (what results.json holds).
    """
    from . import report

    device = torch.device(profile.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but torch sees no CUDA device")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    start = time.monotonic()
    results = {
        "schema": SCHEMA_VERSION,
        "complete": False,
        "profile": profile.as_dict(),
        "machine": machine_info(device),
        "matmul_peak": None,
        "records": [],
        "ops": [],
        "profiles": [],
        "notes": [],
        "elapsed_s": 0.0,
    }
    ctx = _Context(profile, device, log, start + profile.time_budget_s, results)
    last_plot = [time.monotonic()]

    def save(final: bool = False) -> None:
        results["elapsed_s"] = time.monotonic() - start
        if out_dir is not None:
            # Plots cost a second or two: at the end, and once a minute so that a run
            # killed without warning still leaves recent ones.
            plots = final or time.monotonic() - last_plot[0] > 60
            report.write_all(Path(out_dir), results, plots=plots)
            if plots:
                last_plot[0] = time.monotonic()

    def interrupt(signum, frame):  # noqa: ARG001
        raise _Interrupted(signal.Signals(signum).name)

    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    for s in previous:
        signal.signal(s, interrupt)
    try:
        if device.type == "cuda":
            try:
                results["matmul_peak"] = matmul_peak_flops(device)
                ctx.peak_flops = results["matmul_peak"]["flops_per_s"]
                log(f"bf16 matmul peak: {ctx.peak_flops / 1e12:.0f} TFLOP/s")
            except Exception as error:  # noqa: BLE001 - MFU is then left out
                results["notes"].append(f"matmul peak not measured: {_error_reason(error)}")
        plan = groups(profile)
        ops_done = not profile.ops
        for i, group in enumerate(plan):
            if not ops_done and group.rank > OPS_AFTER_RANK:
                _run_ops(ctx)
                ops_done = True
            if profile.quick:
                _fit_quick_run(ctx, plan[i:])
            # On the CPU a comparison's methods run together: start it if a quarter fits.
            needed = ctx.method_estimate_s(group) * (0.25 if device.type == "cpu" else 1.0)
            if not profile.quick and ctx.remaining() < needed:
                log(f"[{i + 1}/{len(plan)}] {group.id}: skipped (time budget)")
                results["records"].extend(
                    _empty_record(ctx, group, m, "skipped", "time budget exhausted") for m in group.methods)
                continue
            t0 = time.monotonic()
            records = (_run_group_cuda if device.type == "cuda" else _run_group_cpu)(ctx, group)
            results["records"].extend(records)
            log(f"[{i + 1}/{len(plan)}] {group.id} ({time.monotonic() - t0:.1f} s): " + ", ".join(
                f"{r['method']} {r['images_per_s']:.1f}/s" if r["status"] == "ok" else f"{r['method']} {r['status']}"
                for r in records))
            save()
        if not ops_done:
            _run_ops(ctx)
        results["complete"] = True
    except _Interrupted as signal_name:
        results["notes"].append(f"interrupted by {signal_name} after {time.monotonic() - start:.0f} s; "
                                "results are partial")
        log(f"interrupted ({signal_name}); writing partial results")
    except Exception as error:  # noqa: BLE001 - write what was measured, then re-raise
        results["notes"].append(f"suite stopped by {_error_reason(error)}: {traceback.format_exc(limit=5)}")
        save(final=True)
        raise
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        ctx.methods.clear()
    save(final=True)
    return results
