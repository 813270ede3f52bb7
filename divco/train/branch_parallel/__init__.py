"""Branch-parallel training and inference: the S branches over G process groups, only logits exchanged.

See docs/BRANCH_PARALLEL.md.  The pieces, in the order a run uses them:

- :mod:`.mesh`: :func:`check_branch_parallel` (one error line before any allocation),
  :func:`build_mesh` (the G x D process mesh and its gather / data groups);
- :mod:`.sharding`: :func:`create_branch_shard` (this process's branches of the one-process
  model, exactly), :func:`gather_full_state_dict` / :func:`gather_full_optimizer_state` (save,
  one-process format, on rank 0), :func:`shard_state_dict` / :func:`shard_optimizer_state` (resume);
- :mod:`.model`: :class:`BranchParallelModel` (own branches, DDP over the data group, logits
  all-gathered) for :class:`divco.train.step.TrainStep`, :func:`data_shard`, :func:`own_views`;
- :mod:`.communication`: :func:`gather_branch_logits` and the byte counter;
- :mod:`.inference`: :func:`branch_parallel_ensemble`, :class:`MultiDeviceBranches`;
- :mod:`.loop`: a standalone loop on synthetic batches and its one-process reference.
"""

from .communication import CommunicationCounter, count_communication, gather_branch_logits
from .inference import MultiDeviceBranches, branch_parallel_ensemble, branch_parallel_logits
from .mesh import BranchParallelMesh, build_mesh, check_branch_parallel
from .model import BranchParallelModel, data_shard, own_views
from .sharding import (
    build_branch_shard,
    create_branch_shard,
    gather_full_optimizer_state,
    gather_full_state_dict,
    shard_optimizer_state,
    shard_state_dict,
)

__all__ = [
    "BranchParallelMesh", "BranchParallelModel", "CommunicationCounter", "MultiDeviceBranches",
    "branch_parallel_ensemble", "branch_parallel_logits", "build_branch_shard", "build_mesh",
    "check_branch_parallel", "count_communication", "create_branch_shard", "data_shard",
    "gather_branch_logits", "gather_full_optimizer_state", "gather_full_state_dict", "own_views",
    "shard_optimizer_state", "shard_state_dict",
]
