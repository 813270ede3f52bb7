"""The ways of running one divided network that ``divco bench`` compares.

Every method computes the same thing for a divided network of S branches: a
forward pass of every branch on its own view of the batch, the co-training
objective (sum of the branches' cross-entropies plus w times the Jensen-Shannon
term), and the ensemble of the branches at inference time.

    divco-batched     divco's branch-batched model, all branches in one pass
                      (grouped convolutions), with the fused divco.ops.cotrain_loss
    divco-per-branch  the same model executed one branch at a time on slices of
                      the shared weights (divco's default on CPUs)
    divco-grouped     divco-batched with every BranchConv2d one grouped convolution
    divco-split       divco-batched with every BranchConv2d S dense convolutions on
                      channel slices (these two measure what divco-batched's per-layer
                      "auto" choice of divco.nn.conv chooses between)
    loop              the official code's way: S separate models called in a Python
                      loop, the loss written in plain PyTorch as its SplitNet does
    vmap              the S separate models' parameters stacked with
                      torch.func.stack_module_state and run with vmap(functional_call)
    packed            Packed-Ensembles (TorchUncertainty) with one estimator per branch
                      at the divided width
    undivided         the large network (S=1) with about the same parameters and
                      FLOPs, trained with plain cross-entropy

A method is a small object with ``forward_loss(images, target) -> loss`` and
``forward_infer(images) -> ensemble logits [N, K]``; how steps run (optimizer,
autocast, torch.compile, CUDA graphs) lives in :mod:`divco.benchmark.steps`.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import models as divco_models
from ..nn import BranchConv2d, set_conv_impl
from ..stacking import unstack
from ..summary import summary

#: Every method, in the order tables and plots show them.
METHODS = ("divco-batched", "divco-per-branch", "loop", "vmap", "packed", "undivided")
#: divco-batched with one convolution implementation forced (the CUDA profiles measure them).
CONV_METHODS = ("divco-grouped", "divco-split")
#: Every method build_method knows.
ALL_METHODS = METHODS + CONV_METHODS
#: The co-training weight every method uses (the paper's default, after warm-up).
COTRAIN_WEIGHT = 0.5


class MethodUnavailable(Exception):
    """This method cannot run here (a missing optional package, an unsupported model)."""


@dataclass(frozen=True)
class Workload:
    """What is benchmarked: one registered model divided into ``branches`` branches."""

    model: str
    branches: int
    num_classes: int
    image_size: int
    device: torch.device
    channels_last: bool = False

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format


def official_cotrain_loss(outputs: list[Tensor], target: Tensor, weight: float) -> Tensor:
    """The official SplitNet objective in plain PyTorch (model/splitnet.py).

    ``outputs``: S logits ``[N, K]``.  Sum of the per-branch cross-entropies plus
    ``weight`` x (entropy of the mean prediction - mean entropy of the branches),
    no co-training term for S=1, and the ensemble (mean of the logits) computed as
    the official forward computes it.
    """
    ce = torch.stack([F.cross_entropy(o, target) for o in outputs]).sum()
    if len(outputs) == 1:
        return ce
    stacked = torch.stack(outputs, dim=0)  # [S, N, K]
    stacked.mean(dim=0)  # the ensemble output, as SplitNet.forward returns it
    p_all = F.softmax(stacked, dim=-1)
    p_mean = p_all.mean(dim=0)
    h_mean = (-p_mean * torch.log(p_mean)).sum(-1).mean()
    h_sep = (-p_all * F.log_softmax(stacked, dim=-1)).sum(-1).mean()
    return ce + weight * (h_mean - h_sep)


def _branch_logits(output: Tensor) -> Tensor:
    """A standalone model's logits as ``[N, K]`` (divco S=1 models return ``[N, 1, K]``)."""
    return output[:, 0] if output.dim() == 3 else output


class Method:
    """One way of running the divided network (see the module docstring)."""

    name: str = ""
    #: True if training takes one view per branch ``[N, S, 3, H, W]``; else ``[N, 3, H, W]``.
    per_branch_views: bool = True

    def __init__(self, workload: Workload) -> None:
        self.workload = workload

    # -- to implement --------------------------------------------------------------------
    def modules(self) -> list[nn.Module]:
        raise NotImplementedError

    def parameters(self) -> list[Tensor]:
        return [p for m in self.modules() for p in m.parameters()]

    def forward_loss(self, images: Tensor, target: Tensor) -> Tensor:
        raise NotImplementedError

    def forward_infer(self, images: Tensor) -> Tensor:
        raise NotImplementedError

    def _count_macs(self) -> int:
        """Multiply-accumulates of one forward pass of one image, all branches."""
        raise NotImplementedError

    # -- shared --------------------------------------------------------------------------
    def macs_per_image(self) -> int:
        """Multiply-accumulates of one forward pass of one image, all branches (counted once)."""
        if getattr(self, "_macs_cache", None) is None:
            self._macs_cache = int(self._count_macs())
        return self._macs_cache

    def train(self, mode: bool = True) -> "Method":
        for m in self.modules():
            m.train(mode)
        return self

    def extra_state(self) -> list[Tensor]:
        """Tensors the method holds besides its modules' (stacked vmap state)."""
        return []

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def train_inputs(self, batch_size: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """Random images and labels of the right shape and layout on the workload's device."""
        w = self.workload
        size = w.image_size
        if self.per_branch_views and w.branches > 1:
            # [N, H, W, S, 3] permuted to [N, S, 3, H, W]: flattening the view and channel
            # dimensions then gives a channels_last [N, S*3, H, W] without a copy.
            shape = (batch_size, size, size, w.branches, 3) if w.channels_last else (
                batch_size, w.branches, 3, size, size)
            images = torch.randn(shape, generator=generator)
            if w.channels_last:
                images = images.permute(0, 3, 4, 1, 2)
        else:
            images = torch.randn(batch_size, 3, size, size, generator=generator)
            images = images.contiguous(memory_format=w.memory_format)
        target = torch.randint(0, w.num_classes, (batch_size,), generator=generator)
        return images.to(w.device), target.to(w.device)

    def infer_inputs(self, batch_size: int, generator: torch.Generator) -> Tensor:
        """Test images: one view shared by all branches."""
        w = self.workload
        images = torch.randn(batch_size, 3, w.image_size, w.image_size, generator=generator)
        return images.contiguous(memory_format=w.memory_format).to(w.device)


def _create(workload: Workload, branches: int) -> nn.Module:
    return divco_models.create(workload.model, num_classes=workload.num_classes, branches=branches)


def _place(module: nn.Module, workload: Workload) -> nn.Module:
    return module.to(device=workload.device, memory_format=workload.memory_format)


def _macs(model: nn.Module, workload: Workload) -> int:
    return summary(model, (3, workload.image_size, workload.image_size)).macs_total


class DivcoMethod(Method):
    """divco's branch-batched model and the fused co-training loss."""

    def __init__(self, workload: Workload, execution: str, divided: Optional[nn.Module] = None,
                 conv_impl: Optional[str] = None) -> None:
        super().__init__(workload)
        try:
            from .. import ops
        except ImportError as error:  # the ops package is part of divco; say what broke
            raise MethodUnavailable(f"divco.ops does not import: {error}") from error
        self._ops = ops
        self.name = f"divco-{conv_impl}" if conv_impl else f"divco-{execution.replace('_', '-')}"
        self.execution = execution
        model = copy.deepcopy(divided) if divided is not None else _create(workload, workload.branches)
        model.execution = execution
        if conv_impl is not None:
            set_conv_impl(model, conv_impl)
        self.model = _place(model, workload)
        self.weight = torch.tensor(COTRAIN_WEIGHT, device=workload.device)

    def modules(self) -> list[nn.Module]:
        return [self.model]

    def extra_state(self) -> list[Tensor]:
        return [self.weight]

    def forward_loss(self, images: Tensor, target: Tensor) -> Tensor:
        return self._ops.cotrain_loss(self.model(images), target, weight=self.weight).loss

    def forward_infer(self, images: Tensor) -> Tensor:
        return self._ops.ensemble(self.model(images))

    def _count_macs(self) -> int:
        return _macs(self.model, self.workload)


class LoopMethod(Method):
    """The official code: S separate models in a Python loop, loss in plain PyTorch."""

    name = "loop"

    def __init__(self, workload: Workload, divided: nn.Module) -> None:
        super().__init__(workload)
        self.models = nn.ModuleList(_place(m, workload) for m in unstack(copy.deepcopy(divided).cpu()))

    def modules(self) -> list[nn.Module]:
        return [self.models]

    def forward_loss(self, images: Tensor, target: Tensor) -> Tensor:
        if images.dim() == 5:
            outputs = [_branch_logits(m(images[:, s])) for s, m in enumerate(self.models)]
        else:
            outputs = [_branch_logits(m(images)) for m in self.models]
        return official_cotrain_loss(outputs, target, COTRAIN_WEIGHT)

    def forward_infer(self, images: Tensor) -> Tensor:
        return torch.stack([_branch_logits(m(images)) for m in self.models]).mean(0)

    def _count_macs(self) -> int:
        return sum(_macs(m, self.workload) for m in self.models)


class VmapMethod(Method):
    """torch.func: the S models' states stacked, one vmap(functional_call) per step.

    BatchNorm: every branch's running statistics are stacked buffers that vmap maps
    over together with the parameters, so the in-place running-stat updates hit
    each branch's own slice (no patching, running stats kept, eval mode works).
    """

    name = "vmap"

    def __init__(self, workload: Workload, divided: nn.Module) -> None:
        super().__init__(workload)
        branches = [_place(m, workload) for m in unstack(copy.deepcopy(divided).cpu())]
        params, buffers = torch.func.stack_module_state(branches)
        self.params = params
        self.buffers = buffers
        self.base = copy.deepcopy(branches[0]).to("meta")
        for m in self.base.modules():
            if isinstance(m, BranchConv2d):
                # One branch per model: any impl is one dense convolution, and "auto" would
                # query the memory format, which vmap does not support.
                m.impl = "grouped"
        self._macs = _macs(branches[0], workload) * len(branches)

        def call(p, b, x):
            return _branch_logits(torch.func.functional_call(self.base, (p, b), (x,)))

        self._per_view = torch.func.vmap(call, in_dims=(0, 0, 0), randomness="different")
        self._shared = torch.func.vmap(call, in_dims=(0, 0, None), randomness="different")

    def modules(self) -> list[nn.Module]:
        return [self.base]

    def parameters(self) -> list[Tensor]:
        return list(self.params.values())

    def extra_state(self) -> list[Tensor]:
        return list(self.buffers.values())

    def train(self, mode: bool = True) -> "Method":
        self.base.train(mode)
        return self

    def forward_loss(self, images: Tensor, target: Tensor) -> Tensor:
        if images.dim() == 5:
            outputs = self._per_view(self.params, self.buffers, images.transpose(0, 1))
        else:
            outputs = self._shared(self.params, self.buffers, images)
        return official_cotrain_loss(list(outputs.unbind(0)), target, COTRAIN_WEIGHT)

    def forward_infer(self, images: Tensor) -> Tensor:
        return self._shared(self.params, self.buffers, images).mean(0)

    def _count_macs(self) -> int:
        return self._macs


_WRN = re.compile(r"^wide_resnet(\d+)_(\d+)$")
_IMAGENET_RESNET = re.compile(r"^resnet(18|34|50|101|152)$")


def packed_ensemble(workload: Workload) -> nn.Module:
    """The Packed-Ensembles network matching ``workload``'s divided network.

    Matching rule: M = S estimators, gamma = 1, and every estimator exactly as wide
    as one divided branch.  An estimator of a Packed-Ensembles layer has
    alpha / M times the layer's base width, so the base width is set to the
    divided branch's width and alpha = M = S:
      - Wide-ResNet-d-k: TorchUncertainty's packed Wide-ResNet (the class behind
        ``packed_wideresnet28x10``, which fixes d=28, k=10) with depth d and widen
        factor k' = divco's divided factor int(max(k/sqrt(S) + 0.4, 1)), CIFAR stem;
      - ImageNet ResNet-18/.../152: ``packed_resnet`` with width_multiplier =
        divided base width / 64 (44/64 for S=2), ImageNet stem.
    No dropout and no convolution biases (as divco's models).  Differences that
    remain: TorchUncertainty's own block layouts (its Wide-ResNet block normalises
    after the residual addition; its downsampling shortcut is a strided 1x1
    convolution where divco's CIFAR models average-pool first), and its first
    convolution is dense over the shared input, so every estimator sees the same
    view (its design) where the other methods give each branch its own view.
    """
    try:
        from torch_uncertainty.models.classification.resnet.packed import packed_resnet
        from torch_uncertainty.models.classification.wideresnet.packed import _PackedWideResNet
    except ImportError as error:
        raise MethodUnavailable(
            f"Packed-Ensembles needs the optional package torch-uncertainty (pip install "
            f"torch-uncertainty lightning rich): {error}"
        ) from error
    S = workload.branches
    wrn = _WRN.match(workload.model)
    if wrn:
        depth = int(wrn.group(1))
        spec = _create(workload, S).spec
        divided_k = spec.widths[0] // 16
        return _PackedWideResNet(
            depth=depth, widen_factor=divided_k, in_channels=3, num_classes=workload.num_classes,
            conv_bias=False, dropout_rate=0.0, num_estimators=S, alpha=S, gamma=1, style="cifar",
        )
    resnet = _IMAGENET_RESNET.match(workload.model)
    if resnet:
        from ..models.dividing import imagenet_base_width

        return packed_resnet(
            in_channels=3, num_classes=workload.num_classes, arch=int(resnet.group(1)), num_estimators=S,
            alpha=S, gamma=1, width_multiplier=imagenet_base_width(S) / 64, style="imagenet", conv_bias=False,
        )
    raise MethodUnavailable(f"no Packed-Ensembles counterpart of {workload.model!r} (Wide-ResNets and "
                            f"ImageNet ResNet-18..152 have one)")


class PackedMethod(Method):
    """Packed-Ensembles (Laurent et al., ICLR 2023) at the divided width, same loss as the loop."""

    name = "packed"
    per_branch_views = False  # a Packed-Ensembles network's first convolution is dense over one input

    def __init__(self, workload: Workload) -> None:
        super().__init__(workload)
        self.model = _place(packed_ensemble(workload), workload)

    def modules(self) -> list[nn.Module]:
        return [self.model]

    def _logits(self, images: Tensor) -> Tensor:
        """``[S, N, K]``: the last packed layer returns ``[M*N, K]``, estimator-major."""
        out = self.model(images)
        return out.view(self.workload.branches, images.shape[0], out.shape[-1])

    def forward_loss(self, images: Tensor, target: Tensor) -> Tensor:
        return official_cotrain_loss(list(self._logits(images).unbind(0)), target, COTRAIN_WEIGHT)

    def forward_infer(self, images: Tensor) -> Tensor:
        return self._logits(images).mean(0)

    def _count_macs(self) -> int:
        return _macs(self.model, self.workload)  # its convolutions are nn.Conv2d inside PackedConv2d


class UndividedMethod(Method):
    """The undivided network (S=1), plain cross-entropy: what dividing is measured against."""

    name = "undivided"
    per_branch_views = False

    def __init__(self, workload: Workload) -> None:
        super().__init__(workload)
        self.model = _place(_create(workload, 1), workload)

    def modules(self) -> list[nn.Module]:
        return [self.model]

    def forward_loss(self, images: Tensor, target: Tensor) -> Tensor:
        return F.cross_entropy(_branch_logits(self.model(images)), target)

    def forward_infer(self, images: Tensor) -> Tensor:
        return _branch_logits(self.model(images))

    def _count_macs(self) -> int:
        return _macs(self.model, self.workload)


def build_method(name: str, workload: Workload, divided: Optional[nn.Module] = None) -> Method:
    """Build method ``name`` for ``workload``.

    ``divided``: a CPU divco model of the workload (``divco.models.create``) whose
    weights the divided methods start from, so that they compute the same function.
    Raises :class:`MethodUnavailable` when the method cannot run here.
    """
    if name not in ALL_METHODS:
        raise ValueError(f"unknown benchmark method {name!r}; expected one of {ALL_METHODS}")
    if name == "undivided":
        return UndividedMethod(workload)
    if name == "packed":
        return PackedMethod(workload)
    if divided is None:
        divided = _create(workload, workload.branches)
    if name == "divco-batched":
        return DivcoMethod(workload, "batched", divided)
    if name == "divco-per-branch":
        return DivcoMethod(workload, "per_branch", divided)
    if name in CONV_METHODS:
        return DivcoMethod(workload, "batched", divided, conv_impl=name.removeprefix("divco-"))
    if name == "loop":
        return LoopMethod(workload, divided)
    return VmapMethod(workload, divided)
