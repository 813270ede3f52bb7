"""One rank of a torchrun launch that runs several divco commands in a row (the branch-parallel engine tests).

    python -m torch.distributed.run --nproc_per_node=P tests/train/branch_parallel_worker.py JOBS.json

JOBS.json: a list of ``{"argv": [...], "stdout": path or null}``; every rank runs each ``divco`` command
line through the real CLI (``divco.cli.main``) in one process group, joined once (a launch's start-up is
most of its time).  Rank 0 writes a command's standard output to ``stdout`` when given.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # this checkout's divco, not an installed one

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402


def main(jobs_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    from divco.cli import main as divco

    try:
        for job in json.loads(open(jobs_file).read()):
            printed = io.StringIO()
            with contextlib.redirect_stdout(printed):
                code = divco(job["argv"])
            if code != 0:
                raise SystemExit(f"rank {dist.get_rank()}: divco {' '.join(job['argv'])} exited {code}")
            if job.get("stdout") and int(os.environ["RANK"]) == 0:
                with open(job["stdout"], "w") as out:
                    out.write(printed.getvalue())
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
