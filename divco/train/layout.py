"""How a run's branches and batches are spread over its processes: the engine asks its layout.

Two layouts, chosen by ``--branch-parallel``:

- :class:`DataParallelLayout` (G = 1): every process holds all S branches and its shard of the
  global batch; DDP all-reduces the gradients (one process: no wrapper at all);
- :class:`divco.train.branch_parallel.layout.BranchParallelLayout` (G > 1): each process holds
  S/G branches, the G processes of a gather group share one data shard and exchange only their
  logits.

divco.train.assembly picks the run's layout (``make_layout``).  The engine calls the same hooks in both cases, at fixed points: the model to build and the
module the step calls, the rows of the epoch's order (``data_rank`` of ``data_parallel``), the
augmenter's seed, the inputs of the step, the group the epoch's metrics are summed over, who
evaluates, and the one-process state of a checkpoint (gathered at save, sharded at resume).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from .distributed import DistributedContext


class TrainingLayout:
    """The hooks of a layout; :class:`DataParallelLayout` is the plain one."""

    #: ``--branch-parallel`` of this layout (G).
    branch_groups: int = 1

    def __init__(self, processes: DistributedContext) -> None:
        self.processes = processes

    # -- data -----------------------------------------------------------------------------------
    @property
    def data_rank(self) -> int:
        """This process's shard of the global batch (and of the epoch's order)."""
        raise NotImplementedError

    @property
    def data_parallel(self) -> int:
        """The shards the global batch splits into."""
        raise NotImplementedError

    def model_inputs(self, views: Tensor) -> Tensor:
        """The step's input from the batch's views ``[B, S, 3, H, W]``."""
        return views

    # -- model ----------------------------------------------------------------------------------
    def build_model(self, build: Callable[[], nn.Module], config: Any, device: torch.device, num_classes: int,
                    channels_last: bool) -> nn.Module:
        """The network this process trains (``build()``: the whole configured model on ``device``)."""
        return build()

    def training_model(self, net: nn.Module, device: torch.device) -> nn.Module:
        """The module :class:`divco.train.step.TrainStep` calls: logits ``[B, S, K]`` of all S branches."""
        raise NotImplementedError

    def parameter_count(self, net: nn.Module) -> int:
        """The parameters of the whole S-branch model."""
        return sum(p.numel() for p in net.parameters())

    @property
    def metrics_group(self):
        """The process group the epoch's training metrics are summed over (None: this process only)."""
        return self.processes.metrics_group

    def evaluation_model(self, model: nn.Module) -> Optional[nn.Module]:
        """The model this process evaluates with (logits of all S branches), None where it does not
        evaluate; rank 0 always evaluates, and its result is broadcast."""
        return model if self.processes.is_main else None

    # -- checkpoints --------------------------------------------------------------------------------
    def full_state(self, net: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[Optional[dict], Optional[dict]]:
        """The one-process model and optimiser state dicts on rank 0 (None elsewhere); every process calls it."""
        if not self.processes.is_main:
            return None, None
        return net.state_dict(), optimizer.state_dict()

    def load_state(self, net: nn.Module, optimizer: torch.optim.Optimizer, model_state: dict,
                   optimizer_state: dict) -> None:
        """Load a checkpoint's one-process state (this process's part of it)."""
        net.load_state_dict(model_state)
        optimizer.load_state_dict(optimizer_state)

    def local_state(self, state: dict) -> Optional[dict]:
        """This process's random streams and partial metrics from a checkpoint, or None when it was
        written by another number of data shards (its streams cannot continue here).

        The checkpoint holds one local state per process; the G processes of a branch-parallel
        gather group hold the same (they draw the same views), so data shard d's is entry
        ``d * G`` of the layout that wrote it, whatever layout reads it.
        """
        local_states = state["local_states"]
        written_groups = int(state.get("branch_parallel", 1))
        if len(local_states) // written_groups != self.data_parallel:
            return None
        return local_states[self.data_rank * written_groups]

    def describe(self) -> str:
        """A few words for the start line."""
        return f"{self.processes.world_size} process(es)"


class DataParallelLayout(TrainingLayout):
    """Every process holds all S branches; DDP over all processes (none in a single process)."""

    @property
    def data_rank(self) -> int:
        return self.processes.rank

    @property
    def data_parallel(self) -> int:
        return self.processes.world_size

    def training_model(self, net: nn.Module, device: torch.device) -> nn.Module:
        if not self.processes.enabled:
            return net
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
