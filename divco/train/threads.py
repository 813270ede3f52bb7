"""How many intra-op threads torch uses in a training process.

torch starts one intra-op thread per core in every process. Under torchrun on a CPU node
(LOCAL_WORLD_SIZE processes) that is processes x cores threads fighting for the cores, and
threads that decode or load data beside the step take cores from it too. The rule: this
process's share of the cores it may run on, less its data workers, at least 1.
``DIVCO_NUM_THREADS`` overrides it; an ``OMP_NUM_THREADS`` the user set is kept.
"""

from __future__ import annotations

import os
from typing import Mapping, Optional

#: The environment variable that fixes the intra-op thread count of a training process.
THREADS_VARIABLE = "DIVCO_NUM_THREADS"


def available_cores() -> int:
    """The cores this process may run on (its affinity mask, e.g. under taskset or a container's cpuset)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


def intra_op_threads(cores: int, *, processes: int = 1, workers: int = 0,
                     environment: Optional[Mapping[str, str]] = None) -> Optional[int]:
    """The intra-op thread count of one of ``processes`` training processes sharing ``cores``, each with
    ``workers`` data-loading threads: ``cores // processes - workers``, at least 1.

    ``DIVCO_NUM_THREADS`` in ``environment`` (a positive int) wins; None where ``OMP_NUM_THREADS``
    is set (torch already follows it: leave it alone).
    """
    environment = os.environ if environment is None else environment
    requested = environment.get(THREADS_VARIABLE, "").strip()
    if requested:
        try:
            value = int(requested)
        except ValueError:
            value = 0
        if value < 1:
            raise ValueError(f"{THREADS_VARIABLE} must be a positive int (intra-op threads), got {requested!r}")
        return value
    if environment.get("OMP_NUM_THREADS", "").strip():
        return None
    return max(1, cores // max(1, processes) - max(0, workers))


def configure_threads(workers: int = 0) -> Optional[int]:
    """Set torch's intra-op threads for this training process (see :func:`intra_op_threads`); the count set."""
    import torch

    processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    threads = intra_op_threads(available_cores(), processes=processes, workers=workers)
    if threads is not None and threads != torch.get_num_threads():
        torch.set_num_threads(threads)
    return threads
