"""What a branch-parallel launch refuses: one clear line each, before anything is allocated.

``divco train --branch-parallel G`` (under ``torchrun --nproc_per_node=P``) runs only where the
branch shards compute exactly what one process computes.  :func:`check_branch_parallel_launch`
runs with the other option checks (divco.train.run_checks: ``train`` and ``--print-config``
alike) before any process group or tensor exists; :func:`check_processes_agree` runs right after
the process group is joined (every distributed run), before the data or the model.
"""

from __future__ import annotations

from typing import Any

from .mesh import check_branch_parallel


def check_branch_parallel_launch(config: Any, world_size: int, device) -> None:
    """Raise ValueError naming what a ``--branch-parallel`` run of ``config`` on ``world_size``
    processes and ``device`` cannot do (nothing when ``branch_parallel`` is 1)."""
    from .. import methods
    from ..capture import check_capture
    from ..runtime import option, resolve_precision

    G = config.branch_parallel
    if G == 1:
        return
    flag = option("branch_parallel", G)
    refusal = methods.method_class(config.method).branch_parallel_refusal
    if refusal:
        supported = [name for name, cls in methods.METHODS.items() if not cls.branch_parallel_refusal]
        raise ValueError(f"{flag}: method {config.method!r} does not run branch-parallel ({refusal}); the methods "
                         f"that do: {', '.join(supported)}")
    if config.sync_bn:
        raise ValueError(f"{flag}: {option('sync_bn', True)} is not done branch-parallel (BatchNorm would have "
                         f"to synchronise over each branch shard's data group); drop one of them")
    if config.on_nan != "stop":
        raise ValueError(f"{flag}: {option('on_nan', config.on_nan)} is not done branch-parallel (the branch "
                         f"shards would have to agree on skipping a step); use {option('on_nan', 'stop')}")
    capture = check_capture(config.capture, config.compile)
    if capture != "none":
        raise ValueError(f"{flag}: {option('capture', capture)} is not done branch-parallel (the logit all-gather "
                         f"sits between the forward pass and the loss, and the captured step is untested with it); "
                         f"use {option('capture', 'none')}")
    amp_dtype, needs_scaler = resolve_precision(config.precision, device)
    if needs_scaler:
        raise ValueError(f"{flag}: {option('precision', config.precision)} trains in float16 with a GradScaler, "
                         f"whose overflow skips would differ between the branch shards; use "
                         f"{option('precision', 'bf16')} or {option('precision', 'fp32')}")
    check_branch_parallel(config.branches, G, world_size, batch_size=config.batch_size)


def check_processes_agree(config: Any, processes) -> None:
    """Every process of a distributed run must run the same options (one line naming the first difference)."""
    if not processes.enabled:
        return
    mine = config.to_dict()
    for rank, theirs in enumerate(processes.gather_objects(mine)):
        different = [name for name in mine if theirs.get(name) != mine.get(name)]
        if different:
            name = different[0]
            raise ValueError(f"the {processes.world_size} processes of this launch run different options: "
                             f"{name}={theirs.get(name)!r} on rank {rank}, {mine.get(name)!r} on rank "
                             f"{processes.rank}; launch every process with the same command")
