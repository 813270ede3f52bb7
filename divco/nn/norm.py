"""BranchBatchNorm2d: per-branch batch statistics and affine parameters, fused or eager.

    y = norm_act(block.bn2, block.conv2(out), residual=identity)   # relu(bn2(conv2(out)) + identity)
    divco.nn.set_norm_impl(model, "eager")                          # plain F.batch_norm, add, relu

The fused implementation (divco.ops.batch_norm) computes BN, the residual add and the ReLU
in one pass forward and two backward; the eager one is PyTorch's ops. Both compute the same
function and keep the same state (weights, running statistics, num_batches_tracked).
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..vocabulary import NORM_IMPLS, check_choice
from .branching import active_branch, branch_slice, check_branches


_FUSED_OP = None


def _fused_op():
    """divco.ops.batch_norm's module, imported on first use (divco.ops imports divco.nn's neighbours)."""
    global _FUSED_OP
    if _FUSED_OP is None:
        import importlib
        import types

        module = importlib.import_module("divco.ops.batch_norm")
        from ..ops.validation import check_batch_norm_x

        _FUSED_OP = types.SimpleNamespace(resolve_backend=module.resolve_backend,
                                          batch_norm_checked=module.batch_norm_checked,
                                          check_batch_norm_x=check_batch_norm_x)
    return _FUSED_OP


def default_norm_impl(x: Tensor) -> str:
    """What ``"auto"`` runs for this input: the fused kernels on CUDA (with Triton or divco._C),
    else eager: on CPUs (measured there, a whole training step with the fused op is 4-37 %
    slower than PyTorch's own BatchNorm: its backward kernel is slower than PyTorch's and its
    autograd wrapper costs ~1 ms per call, see the README; ``set_norm_impl(model, "fused")``
    still runs it), for float64, other devices, an extension without the op, and tensors inside
    torch.func transforms such as vmap (the fused op has no batching rule)."""
    from ..ops import backends
    from ..ops.batch_norm import native_available

    if x.device.type != "cuda" or x.dtype not in backends.FUSED_DTYPES:
        return "eager"
    # (Dynamo cannot trace the functorch query; a compiled graph holds plain tensors here.)
    if not torch.compiler.is_compiling() and torch._C._functorch.is_functorch_wrapped_tensor(x):
        return "eager"
    backend = backends.default_backend(x.device, x.dtype)
    if backend in ("cpu", "cuda") and not native_available()[0]:
        return "eager"
    return "eager" if backend == "torch" else "fused"


def set_norm_impl(module: nn.Module, impl: str) -> nn.Module:
    """Set the implementation of every BranchBatchNorm2d inside ``module``: "fused", "eager" or
    "auto" (per input, :func:`default_norm_impl`). Mirrors :func:`divco.nn.set_conv_impl`."""
    check_choice("impl", impl, NORM_IMPLS)
    for m in module.modules():
        if isinstance(m, BranchBatchNorm2d):
            m.impl = impl
    return module


def norm_act(bn: nn.Module, x: Tensor, residual: Optional[Tensor] = None, relu: bool = True) -> Tensor:
    """``relu(bn(x) + residual)`` (add and ReLU optional), fused where ``bn`` can.

    A BranchBatchNorm2d runs it as one op (its impl permitting). Any other module (the
    nn.SyncBatchNorm of ``--sync-bn``, an nn.Identity left by BN folding) runs eagerly:
    SyncBatchNorm all-reduces its statistics across processes, which the fused kernels do not.
    """
    if isinstance(bn, BranchBatchNorm2d):
        return bn(x, residual=residual, activation="relu" if relu else None)
    y = bn(x)
    if residual is not None:
        y = y + residual
    return F.relu(y, inplace=True) if relu else y


class BranchBatchNorm2d(nn.BatchNorm2d):
    """Batch normalisation of S branches of ``num_features`` channels each.

    With the branches side by side in the channel dimension, per-branch batch
    normalisation is ordinary batch normalisation over ``S*num_features``
    channels: every channel already has its own statistics.  So all branches run
    in one ``batch_norm`` call, and ``weight``, ``bias``, ``running_mean`` and
    ``running_var`` are the S standard ``nn.BatchNorm2d`` tensors concatenated.
    ``num_batches_tracked`` is shared by the branches (they always see the same
    number of batches).

    ``forward(x, residual=None, activation=None)`` also adds ``residual`` and applies
    ``activation`` ("relu") after the normalisation, fused into the same kernels when
    ``impl`` is "fused" (or "auto" and :func:`default_norm_impl` says so).
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        *,
        branches: int = 1,
        device=None,
        dtype=None,
    ) -> None:
        check_branches(branches)
        super().__init__(
            branches * num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype
        )
        self.branches = branches
        self.branch_features = num_features
        self.impl = "auto"  # not state: the state_dict is nn.BatchNorm2d's
        self._checked_key: tuple | None = None  # what the fused op's parameter checks last accepted

    def _check_input_dim(self, x: Tensor) -> None:
        if x.dim() != 4:
            raise ValueError(
                f"{type(self).__name__} expects a 4-D input [N, C, H, W], got shape {tuple(x.shape)}"
            )

    def _checked_parameters(self, x: Tensor, index: Optional[int], weight, bias, running_mean, running_var,
                            use_batch_stats: bool, momentum, backend: str, tensors: tuple) -> None:
        """The fused op's checks of what belongs to the module (parameters, running statistics,
        momentum, eps), run once per state rather than per call. The key holds what a call can
        change and which tensors the module holds (a reassigned parameter is checked again);
        a cast or move of the module (``_apply``: .to, .half, .cuda, in place) clears it."""
        key = (x.dtype, x.device, index, use_batch_stats, momentum, self.eps, backend, *map(id, tensors))
        if key == self._checked_key:
            return
        from ..ops.validation import check_batch_norm_parameters

        check_batch_norm_parameters(x.shape[1], x.dtype, x.device, weight, bias, running_mean, running_var,
                                    use_batch_stats, momentum, self.eps, tensors[4])
        self._checked_key = key

    def _apply(self, fn, *args, **kwargs):
        self._checked_key = None
        return super()._apply(fn, *args, **kwargs)

    def _implementation(self, x: Tensor) -> tuple[str, Optional[str]]:
        """("fused", backend) or ("eager", None) for this input, resolved once per (impl, device,
        dtype, DIVCO_BACKEND) rather than per call: the backend choice and the extension's
        availability do not change between calls. "auto" on a tensor inside a torch.func
        transform is eager (per input: the fused op has no batching rule)."""
        if (self.impl == "auto" and not torch.compiler.is_compiling()
                and torch._C._functorch.is_functorch_wrapped_tensor(x)):
            return "eager", None
        key = (self.impl, x.device, x.dtype, os.environ.get("DIVCO_BACKEND"))
        cached = self.__dict__.get("_implementation_cache")
        if cached is not None and cached[0] == key:
            return cached[1]
        impl = default_norm_impl(x) if self.impl == "auto" else self.impl
        resolved = (impl, _fused_op().resolve_backend(None, x) if impl == "fused" else None)
        self._implementation_cache = (key, resolved)
        return resolved

    def forward(self, x: Tensor, residual: Optional[Tensor] = None, activation: Optional[str] = None) -> Tensor:
        self._check_input_dim(x)
        index = active_branch()
        C = self.num_features if index is None else self.branch_features
        if x.shape[1] != C:
            if index is None:
                raise ValueError(
                    f"{type(self).__name__} expects {C} channels ({self.branches} branches x {self.branch_features}), "
                    f"got {x.shape[1]}"
                )
            raise ValueError(f"{type(self).__name__} computing branch {index} expects {C} channels, got {x.shape[1]}")
        if activation not in (None, "relu"):
            raise ValueError(f"activation must be None or 'relu'; got {activation!r}")
        # the module's tensors read once from its dicts (nn.Module.__getattr__ costs host time per lookup)
        params, buffers = self._parameters, self._buffers
        tensors = (params.get("weight"), params.get("bias"), buffers.get("running_mean"), buffers.get("running_var"),
                   buffers.get("num_batches_tracked"))
        weight, bias, running_mean, running_var, batches = tensors
        momentum = self.momentum  # None: a cumulative average, factor 1 / num_batches_tracked on the device
        training = self.training
        if training and self.track_running_stats and batches is not None:
            if index is None or index == 0:  # the branches share one counter: count each batch once
                batches.add_(1)
        use_batch_stats = training or (running_mean is None and running_var is None)
        if not (not training or self.track_running_stats):
            running_mean = running_var = None
        if index is not None:
            weight, bias, running_mean, running_var = (
                None if t is None else branch_slice(t, index, C) for t in (weight, bias, running_mean, running_var))
        impl, backend = self._implementation(x)
        if impl == "fused" or (momentum is None and use_batch_stats and running_mean is not None):
            # (eager with momentum=None: the torch backend of the same op, whose factor stays on the
            # device; nn.BatchNorm2d would read num_batches_tracked back to the host every step)
            ops = _fused_op()
            backend = backend if impl == "fused" else "torch"
            self._checked_parameters(x, index, weight, bias, running_mean, running_var, use_batch_stats, momentum,
                                     backend, tensors)
            ops.check_batch_norm_x(x, residual, use_batch_stats)
            return ops.batch_norm_checked(x, weight, bias, running_mean, running_var, use_batch_stats, momentum,
                                          self.eps, residual, activation, backend, batches)
        factor = 0.0 if momentum is None else momentum
        y = F.batch_norm(x, running_mean, running_var, weight, bias, use_batch_stats, factor, self.eps)
        if residual is not None:
            y = y + residual
        if activation == "relu":
            y = F.relu(y, inplace=True)
        return y

    def extra_repr(self) -> str:
        return (
            f"{self.branch_features}, branches={self.branches}, eps={self.eps}, momentum={self.momentum}, "
            f"affine={self.affine}, track_running_stats={self.track_running_stats}"
            + (f", impl={self.impl!r}" if self.impl != "auto" else "")
        )
