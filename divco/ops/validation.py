"""Input checks of the fused ops: bad input gets a ValueError naming what was expected and what came.

Every check here reads only metadata (shapes, dtypes, devices), except the range check of
class indices, which reads the target: free on the CPU, a host synchronisation on CUDA, so
there it runs only when DIVCO_CHECK_TARGETS=1 (otherwise out-of-range rows give a NaN loss).
Under torch.compile the range check is skipped (it would break the graph); NaN marks such rows.
"""

from __future__ import annotations

import math
import numbers
import os

import torch
from torch import Tensor

from ..vocabulary import COTRAIN_KINDS, ENSEMBLE_MODES, FUSED_DTYPE_NAMES, WEIGHTED_ENSEMBLE_MODES

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
#: Logit dtypes the fused kernels take (divco.vocabulary.FUSED_DTYPE_NAMES); float64 runs on the reference.
FUSED_DTYPES = tuple(getattr(torch, name) for name in FUSED_DTYPE_NAMES)


def check_logits(logits: object, what: str = "logits") -> tuple[int, int, int]:
    """Logits must be a floating [N, S, K] tensor with N, S, K >= 1; returns (N, S, K)."""
    if not isinstance(logits, Tensor):
        raise ValueError(f"{what} must be a torch.Tensor of shape [N, S, K], got {type(logits).__name__}")
    if logits.dim() != 3:
        raise ValueError(
            f"{what} must have shape [N, S, K] (batch, branches, classes), "
            f"got a {logits.dim()}-D tensor of shape {tuple(logits.shape)}"
        )
    if logits.dtype not in FLOAT_DTYPES:
        raise ValueError(
            f"{what} must be floating point (float32, bfloat16, float16 or float64), got dtype {logits.dtype}"
        )
    N, S, K = logits.shape
    if N < 1 or S < 1 or K < 1:
        raise ValueError(f"{what} needs at least one sample, branch and class, got shape {tuple(logits.shape)}")
    return N, S, K


def check_target(target: object, logits: Tensor) -> Tensor:
    """Class indices [N] (any integer dtype, returned as int64) or soft targets [N, K] (floating)."""
    N, S, K = logits.shape
    if not isinstance(target, Tensor):
        raise ValueError(
            f"target must be a torch.Tensor: class indices [N] or soft targets [N, K], got {type(target).__name__}"
        )
    if target.device != logits.device:
        raise ValueError(f"target is on {target.device} but logits are on {logits.device}; expected the same device")
    if target.dtype == torch.bool or target.is_complex():
        raise ValueError(f"target must be int64 class indices or floating soft targets, got dtype {target.dtype}")
    if target.is_floating_point():
        if target.dim() == 1:
            raise ValueError(
                f"target has dtype {target.dtype} and shape {tuple(target.shape)}: class indices must be an "
                f"integer tensor (int64), soft targets must have shape [N, K] = [{N}, {K}]"
            )
        if tuple(target.shape) != (N, K):
            raise ValueError(
                f"soft targets must have shape [N, K] = [{N}, {K}] to match logits {tuple(logits.shape)}, "
                f"got {tuple(target.shape)}"
            )
        return target
    if tuple(target.shape) != (N,):
        raise ValueError(
            f"class indices must have shape [N] = [{N}] to match logits {tuple(logits.shape)}, "
            f"got {tuple(target.shape)}"
        )
    if target.dtype != torch.int64:
        target = target.to(torch.int64)
    if _should_check_range(target):
        check_class_range(target, K)
    return target


def _should_check_range(target: Tensor) -> bool:
    if torch.compiler.is_compiling():
        return False
    if target.device.type == "cpu":
        return True
    return os.environ.get("DIVCO_CHECK_TARGETS", "0") not in ("", "0")


def check_class_range(target: Tensor, num_classes: int) -> None:
    """ValueError naming the first class index outside [0, num_classes)."""
    if target.numel() == 0:
        return
    low, high = torch.aminmax(target)  # one pass; the slower search below runs only on failure
    if int(low) < 0 or int(high) >= num_classes:
        bad = (target < 0) | (target >= num_classes)
        i = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"target[{i}] = {int(target[i])} is not a class index in [0, {num_classes - 1}] "
            f"(logits have {num_classes} classes)"
        )


def check_weight(weight: object, logits: Tensor) -> float | Tensor:
    """A finite Python number, or a 0-dim floating tensor on the logits' device.

    Negative weights are allowed (they reward disagreement). A non-finite number or CPU tensor
    is a ValueError; a CUDA tensor is not inspected (reading it would synchronise with the
    host), and neither is any tensor under torch.compile: there a NaN/inf weight gives a
    NaN/inf loss."""
    if isinstance(weight, Tensor):
        if weight.dim() != 0:
            raise ValueError(f"weight must be a number or a 0-dim tensor, got shape {tuple(weight.shape)}")
        if not weight.is_floating_point():
            raise ValueError(f"weight must be a floating-point tensor, got dtype {weight.dtype}")
        if weight.device != logits.device:
            raise ValueError(
                f"weight is on {weight.device} but logits are on {logits.device}; expected the same device "
                "(the kernels read the weight from device memory)"
            )
        if weight.device.type == "cpu" and not torch.compiler.is_compiling() and not bool(torch.isfinite(weight)):
            raise ValueError(f"weight must be finite, got {float(weight)}")
        return weight
    if isinstance(weight, numbers.Real) and not isinstance(weight, bool):
        if not math.isfinite(weight):
            raise ValueError(f"weight must be a finite number, got {weight}")
        return float(weight)
    raise ValueError(f"weight must be a number or a 0-dim tensor, got {type(weight).__name__}")


def check_sample_weight(sample_weight: object, logits: Tensor) -> Tensor | None:
    """None, or per-sample weights: a floating tensor [N] on the logits' device, entries finite
    and >= 0 (any float dtype; the op casts it). Not normalised: the caller's scale is kept.

    The values are read only for CPU tensors outside torch.compile: a CUDA tensor is not
    inspected (reading it would synchronise with the host); there a NaN/inf weight gives a
    NaN/inf loss and a negative one a loss that rewards that sample's errors."""
    if sample_weight is None:
        return None
    N = logits.shape[0]
    if not isinstance(sample_weight, Tensor):
        raise ValueError(
            f"sample_weight must be None or a floating tensor of shape [N] = [{N}], got {type(sample_weight).__name__}"
        )
    if not sample_weight.is_floating_point():
        raise ValueError(f"sample_weight must be a floating-point tensor, got dtype {sample_weight.dtype}")
    if tuple(sample_weight.shape) != (N,):
        raise ValueError(
            f"sample_weight must have shape [N] = [{N}] to match logits {tuple(logits.shape)}, "
            f"got {tuple(sample_weight.shape)}"
        )
    if sample_weight.device != logits.device:
        raise ValueError(
            f"sample_weight is on {sample_weight.device} but logits are on {logits.device}; expected the same device "
            "(the kernels read the weights from device memory)"
        )
    if sample_weight.device.type == "cpu" and not torch.compiler.is_compiling():
        bad = ~(torch.isfinite(sample_weight) & (sample_weight >= 0))
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            value = float(sample_weight[i])
            raise ValueError(f"sample_weight must be finite and >= 0, got sample_weight[{i}] = {value}")
    return sample_weight


def check_temperature(temperature: object) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise ValueError(f"temperature must be a positive number, got {type(temperature).__name__}")
    temperature = float(temperature)
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    return temperature


def check_kind(kind: object) -> str:
    if kind not in COTRAIN_KINDS:
        raise ValueError(f"kind must be one of {COTRAIN_KINDS}, got {kind!r}")
    return kind


def check_mode(mode: object) -> str:
    if mode not in ENSEMBLE_MODES:
        raise ValueError(f"mode must be one of {ENSEMBLE_MODES}, got {mode!r}")
    return mode


def check_ensemble_weights(weights: object, logits: Tensor, mode: str) -> Tensor | None:
    """Per-branch weights [S] of an ensemble: None, a sequence of numbers or a floating tensor on
    the logits' device; finite, >= 0, with a positive sum. Returns None or a tensor [S] on the
    logits' device (numbers: float64, divided by their max so that float32 cannot overflow).

    Numbers and CPU tensors are checked; a CUDA tensor is not read (that would synchronise with
    the host), and neither is any tensor under torch.compile: there, bad weights give NaN or
    wrong values, never an error."""
    if weights is None:
        return None
    if isinstance(weights, Tensor):
        check_weights_tensor(weights, logits, mode)
        if weights.device.type == "cpu" and not torch.compiler.is_compiling():
            _check_weight_values(weights.detach().to(torch.float64).tolist())
        return weights
    check_weighted_mode(mode)
    S = logits.shape[1]
    if isinstance(weights, (str, bytes)) or not hasattr(weights, "__len__"):
        raise ValueError(
            f"weights must be None, a sequence of {S} numbers or a floating tensor [S], got {type(weights).__name__}"
        )
    values = list(weights)
    if len(values) != S:
        raise ValueError(
            f"weights must have one entry per branch, shape [{S}] for logits {tuple(logits.shape)}, "
            f"got {len(values)} entries"
        )
    if not all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in values):
        raise ValueError(f"weights must be numbers, got {[type(v).__name__ for v in values]}")
    values = [float(v) for v in values]
    _check_weight_values(values)
    largest = max(values)
    return torch.tensor([v / largest for v in values], dtype=torch.float64, device=logits.device)


def _check_weight_values(values: list[float]) -> None:
    if not all(math.isfinite(v) for v in values) or any(v < 0 for v in values):
        raise ValueError(f"weights must be finite and non-negative, got {values}")
    if not sum(values) > 0:
        raise ValueError(f"weights must have a positive sum, got {values}")


def check_weighted_mode(mode: str) -> None:
    if mode not in WEIGHTED_ENSEMBLE_MODES:
        raise ValueError(
            f"mode {mode!r} takes no weights (a weighted max has no meaning); "
            f"the modes that take weights: {', '.join(WEIGHTED_ENSEMBLE_MODES)}"
        )


def check_weights_tensor(weights: Tensor, logits: Tensor, mode: str) -> None:
    """The metadata of ensemble weights: a mode that takes them, a floating tensor [S] on the
    logits' device (what the operators check; they never read the values on the host)."""
    check_weighted_mode(mode)
    S = logits.shape[1]
    if not weights.is_floating_point():
        raise ValueError(f"weights must be a floating-point tensor [S] = [{S}], got dtype {weights.dtype}")
    if tuple(weights.shape) != (S,):
        raise ValueError(
            f"weights must have one entry per branch, shape [{S}] for logits {tuple(logits.shape)}, "
            f"got {tuple(weights.shape)}"
        )
    if weights.device != logits.device:
        raise ValueError(
            f"weights are on {weights.device} but logits are on {logits.device}; expected the same device "
            "(the kernels read the weights from device memory)"
        )


# -- the fused BatchNorm (divco.ops.batch_norm) ------------------------------------------------

#: The activations the fused BatchNorm applies after the (optional) residual add.
BATCH_NORM_ACTIVATIONS: tuple[str | None, ...] = (None, "relu")


def check_batch_norm_hyperparameters(momentum: object, eps: object) -> None:
    """``momentum`` a number in [0, 1] or None (cumulative average), ``eps`` a finite number > 0.

    One rule for every backend: F.batch_norm (the torch backend) takes any float, and a NaN or
    out-of-range momentum gives NaN or diverging running statistics, eps <= 0 a NaN output on a
    constant channel (0 / 0)."""
    if momentum is not None and not (_is_real(momentum) and 0.0 <= momentum <= 1.0):
        raise ValueError(f"momentum must be a number in [0, 1] or None (cumulative average); got {momentum!r}")
    if not (_is_real(eps) and eps > 0 and math.isfinite(eps)):
        raise ValueError(f"eps must be a finite number > 0; got {eps!r}")


def _is_real(value: object) -> bool:
    """A real number, not a bool (floats first: the ABC check costs host time per call)."""
    return type(value) is float or (not isinstance(value, bool) and isinstance(value, numbers.Real))


def _check_channel_vector(name: str, t: object, C: int, dtype: torch.dtype, device: torch.device) -> None:
    """A [C] tensor on x's device whose dtype F.batch_norm takes with x: x's dtype or float32."""
    if t is None:
        return
    if not isinstance(t, Tensor):
        raise ValueError(f"{name} must be a Tensor or None; got {type(t).__name__}")
    if t.shape != (C,):
        raise ValueError(f"{name} must have shape [C] = [{C}] (x's channels); got {list(t.shape)}")
    if not t.is_floating_point():
        raise ValueError(f"{name} must be floating point; got {t.dtype}")
    if t.dtype not in (dtype, torch.float32):
        raise ValueError(f"{name} must be float32 or x's dtype ({dtype}); got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, x on {device}; expected one device")


def check_batch_norm_x(x: object, residual: object, training: bool) -> None:
    """The per-call part of :func:`check_batch_norm_inputs`: x and the residual."""
    if not isinstance(x, Tensor):
        raise ValueError(f"x must be a Tensor; got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"x must be 4-D [N, C, H, W]; got shape {list(x.shape)}")
    if x.dtype not in FUSED_DTYPES + (torch.float64,):
        raise ValueError(f"x must be float32, bfloat16, float16 or float64; got {x.dtype}")
    if x.numel() == 0:
        raise ValueError(f"x must not be empty; got shape {list(x.shape)}")
    N, C, H, W = x.shape
    if training and N * H * W == 1:
        raise ValueError(f"training needs more than one value per channel (N·H·W > 1); got shape {list(x.shape)}")
    if residual is not None:
        if not isinstance(residual, Tensor):
            raise ValueError(f"residual must be a Tensor or None; got {type(residual).__name__}")
        if residual.shape != x.shape:
            raise ValueError(f"residual must have x's shape {list(x.shape)}; got {list(residual.shape)}")
        if residual.dtype != x.dtype:
            raise ValueError(f"residual must have x's dtype {x.dtype}; got {residual.dtype}")
        if residual.device != x.device:
            raise ValueError(f"residual is on {residual.device}, x on {x.device}; expected one device")


def check_batch_norm_parameters(C: int, dtype: torch.dtype, device: torch.device, weight, bias, running_mean,
                                running_var, training: bool, momentum: object, eps: object,
                                num_batches_tracked: object) -> None:
    """The part of :func:`check_batch_norm_inputs` that reads only what a BatchNorm module holds
    (checked once per module state by divco.nn.BranchBatchNorm2d) and x's channels, dtype, device."""
    for name, t in (("weight", weight), ("bias", bias), ("running_mean", running_mean), ("running_var", running_var)):
        _check_channel_vector(name, t, C, dtype, device)
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must both be tensors or both be None")
    if not training and running_mean is None:
        raise ValueError("eval mode (training=False) normalises with the running statistics: "
                         "running_mean and running_var are required; got None")
    check_batch_norm_hyperparameters(momentum, eps)
    if momentum is None and training and running_mean is not None:
        if not isinstance(num_batches_tracked, Tensor) or num_batches_tracked.numel() != 1:
            raise ValueError("momentum=None (cumulative average) needs num_batches_tracked, a one-element tensor "
                             f"counting the batches including this one; got {type(num_batches_tracked).__name__}")
        if num_batches_tracked.dtype != torch.int64:  # the kernels read the counter as int64 on the device
            raise ValueError("momentum=None (cumulative average) needs num_batches_tracked as an int64 tensor "
                             f"(nn.BatchNorm2d's buffer); got {num_batches_tracked.dtype}")
        if num_batches_tracked.device != device:
            raise ValueError(f"num_batches_tracked is on {num_batches_tracked.device}, x on {device}; "
                             "expected one device")


def check_batch_norm_inputs(x, weight, bias, running_mean, running_var, residual, training: bool, activation,
                            momentum: object = 0.1, eps: object = 1e-5, num_batches_tracked: object = None) -> None:
    """ValueError naming what was expected and what came, for anything divco.ops.batch_norm
    cannot take; the same on every backend (torch, triton, cpu, cuda). Reads metadata only.

    The [C] tensors (weight, bias, running statistics) follow F.batch_norm's dtype rule: x's
    dtype or float32 (a float64 running_var with float32 x is refused, not silently rounded)."""
    check_batch_norm_x(x, residual, training)
    check_batch_norm_parameters(x.shape[1], x.dtype, x.device, weight, bias, running_mean, running_var, training,
                                momentum, eps, num_batches_tracked)
    if activation not in BATCH_NORM_ACTIVATIONS:
        raise ValueError(f"activation must be one of {BATCH_NORM_ACTIVATIONS}; got {activation!r}")
