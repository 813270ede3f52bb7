"""BranchConv2d: S independent convolutions computed as one layer."""

from __future__ import annotations

import math
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.utils import _pair

from ..vocabulary import CONV_IMPLS, check_choice
from .branching import active_branch, branch_slice, check_branches

#: ``timer(run) -> seconds``: the time of one call of ``run`` (a zero-argument callable).
ConvTimer = Callable[[Callable[[], None]], float]


def default_conv_impl(x: Tensor) -> str:
    """The static rule: the faster of the two all-branch implementations for this input, by device.

    Measured on a 2-core x86 CPU (WRN-16-8 divided by 4, batch 64): a grouped
    convolution in NCHW runs through a slow oneDNN path, while S dense
    convolutions on channel slices do not; in channels_last the grouped
    convolution is as fast as the dense ones and saves the slicing copies.  On
    CUDA, cuDNN's grouped kernels run all branches in one launch (the rule where
    no measurement is possible: while torch.compile traces or a CUDA graph captures).
    """
    if x.device.type == "cpu" and not x.is_contiguous(memory_format=torch.channels_last):
        return "split"
    return "grouped"


def cuda_event_timer(run: Callable[[], None], *, warmup: int = 2, repeats: int = 5) -> float:
    """Seconds per call of ``run`` on the current CUDA stream (CUDA events; synchronises once)."""
    for _ in range(warmup):
        run()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        run()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1000.0 / repeats


#: The measured choices of "auto", one per layer configuration and input: (shape, device, ...) -> impl.
_MEASURED: dict[tuple, str] = {}


def measured_conv_impls() -> dict[tuple, str]:
    """What "auto" measured so far (a copy): the key of a layer and input, and the implementation chosen."""
    return dict(_MEASURED)


def clear_measured_conv_impls() -> None:
    _MEASURED.clear()


def _can_measure(x: Tensor) -> bool:
    """Measuring runs the convolution and waits for the device: not while compiling or capturing a graph."""
    if x.device.type != "cuda" or torch.compiler.is_compiling():
        return False
    return not torch.cuda.is_current_stream_capturing()


class BranchConv2d(nn.Module):
    """S convolutions side by side in the channel dimension.

    Input ``[N, S*in_channels, H, W]`` (branch ``s`` owns channel block ``s``), or
    ``[N, in_channels, H, W]`` when every branch convolves the same input (the stem
    of a network fed one image for all branches; only with ``groups=1``).  Output
    ``[N, S*out_channels, H', W']``.

    ``weight[s*out_channels:(s+1)*out_channels]`` is exactly the weight of branch
    ``s`` as an ``nn.Conv2d(in_channels, out_channels, ...)``; likewise the bias.

    Args:
        in_channels, out_channels: per branch.
        groups: the inner groups of each branch (ResNeXt cardinality).
        branches: S.
        impl: how all branches are computed together: ``"grouped"`` (one
            convolution with ``S*groups`` groups), ``"split"`` (S convolutions on
            channel slices) or ``"auto"`` (on CUDA the faster of the two, measured
            once per layer and input shape; elsewhere :func:`default_conv_impl`;
            see :meth:`choose_impl`).  Both give the same result.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: Union[int, tuple[int, int]],
        stride: Union[int, tuple[int, int]] = 1,
        padding: Union[int, tuple[int, int]] = 0,
        dilation: Union[int, tuple[int, int]] = 1,
        groups: int = 1,
        bias: bool = False,
        *,
        branches: int = 1,
        impl: str = "auto",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        self.branches = check_branches(branches)
        if in_channels % groups or out_channels % groups:
            raise ValueError(
                f"in_channels ({in_channels}) and out_channels ({out_channels}) must be "
                f"divisible by groups ({groups})"
            )
        check_choice("impl", impl, CONV_IMPLS)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = _pair(kernel_size)
        self.stride = _pair(stride)
        self.padding = _pair(padding)
        self.dilation = _pair(dilation)
        self.groups = groups
        self.impl = impl
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(
            torch.empty(branches * out_channels, in_channels // groups, *self.kernel_size, **factory)
        )
        self.bias = nn.Parameter(torch.empty(branches * out_channels, **factory)) if bias else None
        self.reset_parameters()

    # -- weights -----------------------------------------------------------------------
    def branch_weight(self, index: int) -> Tensor:
        """Branch ``index``'s weight, a view (shape of the ``nn.Conv2d`` weight)."""
        return branch_slice(self.weight, index, self.out_channels)

    def branch_bias(self, index: int) -> Optional[Tensor]:
        if self.bias is None:
            return None
        return branch_slice(self.bias, index, self.out_channels)

    def reset_parameters(self) -> None:
        """Initialise each branch exactly as ``nn.Conv2d.reset_parameters`` would."""
        fan_in = (self.in_channels // self.groups) * self.kernel_size[0] * self.kernel_size[1]
        with torch.no_grad():
            for s in range(self.branches):
                nn.init.kaiming_uniform_(self.branch_weight(s), a=math.sqrt(5))
                b = self.branch_bias(s)
                if b is not None:
                    bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
                    nn.init.uniform_(b, -bound, bound)

    def kaiming_normal_(self, mode: str = "fan_out", nonlinearity: str = "relu") -> None:
        """He-normal initialisation with each branch's own fan (not the stacked one)."""
        with torch.no_grad():
            for s in range(self.branches):
                nn.init.kaiming_normal_(self.branch_weight(s), mode=mode, nonlinearity=nonlinearity)

    # -- forward -----------------------------------------------------------------------
    def _conv(self, x: Tensor, weight: Tensor, bias: Optional[Tensor], groups: int) -> Tensor:
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, groups)

    def _all_branches(self, x: Tensor, impl: str, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
        if impl == "grouped":
            return self._conv(x, weight, bias, self.branches * self.groups)
        inputs = x.split(self.in_channels, dim=1)
        outputs = [
            self._conv(inputs[s], branch_slice(weight, s, self.out_channels),
                       None if bias is None else branch_slice(bias, s, self.out_channels), self.groups)
            for s in range(self.branches)
        ]
        return torch.cat(outputs, dim=1)

    def measure_key(self, x: Tensor) -> tuple:
        """What the speed of the two implementations depends on: the layer's shape, the input's
        shape, dtype (autocast's included), memory format and device, and whether a backward follows."""
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        return (tuple(self.weight.shape), self.stride, self.padding, self.dilation, self.groups, self.branches,
                self.bias is not None, tuple(x.shape), dtype, x.is_contiguous(memory_format=torch.channels_last),
                str(x.device), torch.is_grad_enabled())

    def choose_impl(self, x: Tensor, timer: Optional[ConvTimer] = None) -> str:
        """The implementation "auto" runs for ``x``: measured once per :meth:`measure_key` where the
        device can be timed (CUDA, outside compilation and graph capture), else :func:`default_conv_impl`.

        The measurement (``timer``, default :func:`cuda_event_timer`: forward, plus backward when
        gradients are on) happens at the first call with a new key, i.e. in the first training step,
        and is cached: later steps look the choice up (no timing, no synchronisation).  Both
        implementations compute the same convolution, so the choice changes only the speed.
        """
        if timer is None and not _MEASURED and not _can_measure(x):
            return default_conv_impl(x)  # nothing measured, nothing to measure: no key to build (CPUs)
        key = self.measure_key(x)
        known = _MEASURED.get(key)
        if known is not None:
            return known
        if timer is None:
            if not _can_measure(x):
                return default_conv_impl(x)
            timer = cuda_event_timer
        times = {impl: timer(self._timed_call(x, impl)) for impl in ("grouped", "split")}
        _MEASURED[key] = choice = min(times, key=times.get)  # a tie keeps grouped: one launch
        return choice

    def _timed_call(self, x: Tensor, impl: str) -> Callable[[], None]:
        """One forward (and backward, if gradients are on) of ``impl`` on copies: the model's graph is untouched."""
        train = torch.is_grad_enabled()
        weight = self.weight.detach().requires_grad_(train)
        bias = None if self.bias is None else self.bias.detach().requires_grad_(train)
        x = x.detach().requires_grad_(train and x.requires_grad)

        def run() -> None:
            y = self._all_branches(x, impl, weight, bias)
            if train:
                y.sum().backward()

        run.impl = impl  # what is timed, for timers that report per implementation
        return run

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4:
            raise ValueError(
                f"{type(self).__name__} expects a 4-D input [N, C, H, W], got shape {tuple(x.shape)}"
            )
        channels = x.shape[1]
        index = active_branch()
        if index is not None:  # per-branch execution
            if channels != self.in_channels:
                raise ValueError(
                    f"{type(self).__name__} computing branch {index} expects {self.in_channels} "
                    f"input channels, got {channels}"
                )
            return self._conv(x, self.branch_weight(index), self.branch_bias(index), self.groups)

        S = self.branches
        if channels == S * self.in_channels:
            impl = "grouped" if S == 1 else self.choose_impl(x) if self.impl == "auto" else self.impl
            return self._all_branches(x, impl, self.weight, self.bias)
        if channels == self.in_channels and self.groups == 1:
            # Every branch sees the same input: one dense convolution with all S filters.
            return self._conv(x, self.weight, self.bias, 1)
        shared = " or " + str(self.in_channels) + " (one input shared by all branches)" if self.groups == 1 else ""
        raise ValueError(
            f"{type(self).__name__} expects {S * self.in_channels} input channels "
            f"({S} branches x {self.in_channels}){shared}, got {channels}"
        )

    def extra_repr(self) -> str:
        s = (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, branches={self.branches}"
        )
        if self.padding != (0, 0):
            s += f", padding={self.padding}"
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.bias is None:
            s += ", bias=False"
        if self.impl != "auto":
            s += f", impl={self.impl!r}"
        return s


def set_conv_impl(module: nn.Module, impl: str) -> nn.Module:
    """Set the all-branch implementation of every BranchConv2d inside ``module``.

    ``"auto"`` chooses per layer and input (:meth:`BranchConv2d.choose_impl`): on CUDA the faster
    of the two, measured once per layer shape and input shape at its first call and cached; on
    CPUs (and while compiling or capturing) the static rule :func:`default_conv_impl`.
    """
    check_choice("impl", impl, CONV_IMPLS)
    for m in module.modules():
        if isinstance(m, BranchConv2d):
            m.impl = impl
    return module
