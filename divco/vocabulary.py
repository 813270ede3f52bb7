"""The words divco's layers share, defined once.

Every option that names a choice (a co-training kind, an ensemble mode, a backend, an
execution mode, ...) takes its allowed values from here, so the ops, the kernels'
launchers, the layers, the training configuration and the command line cannot drift
apart. This module imports nothing from divco (and no torch): any layer may import it.
"""

from __future__ import annotations

#: Co-training terms: the paper's Jensen-Shannon divergence, or pairwise KL with detached targets.
COTRAIN_KINDS: tuple[str, ...] = ("js", "kl")

#: How branch outputs [N, S, K] are combined into one prediction [N, K].
#:   mean_logits  mean of the logits
#:   mean_probs   mean of the softmax probabilities
#:   geo_mean     normalised geometric mean of the probabilities
#:   max          per-class max of the logits (the official code's max ensemble)
#:   max_probs    per-class max of the probabilities (the official code's max ensemble after softmax)
#:   vote         each branch's top-1 class gets the branch's weight (SAMME's weighted majority):
#:                the shares of the vote, a distribution with gradient zero
ENSEMBLE_MODES: tuple[str, ...] = ("mean_logits", "mean_probs", "geo_mean", "max", "max_probs", "vote")

#: The ensemble modes that take per-branch weights (divco.ops.ensemble(..., weights=)); the max
#: modes take none (a weighted max has no meaning).
WEIGHTED_ENSEMBLE_MODES: tuple[str, ...] = ("mean_logits", "mean_probs", "geo_mean", "vote")

#: The ensemble modes whose output is a probability distribution (or a per-class max of
#: probabilities); the others return logits. "vote" is one: its shares sum to 1, and a softmax
#: of them would be meaningless. Its shares are exactly 0 for the classes no branch picked, so
#: its NLL is -log(smallest float64) ≈ 708 for each image whose true class got no vote
#: (divco.calibration clamps): a vote is a top-1 rule, not a calibrated forecast.
PROBABILITY_MODES: frozenset[str] = frozenset({"mean_probs", "geo_mean", "max_probs", "vote"})

#: The ensemble mode used for "the ensemble's" accuracy unless a caller asks for another.
DEFAULT_ENSEMBLE_MODE = "mean_logits"

#: Logit dtypes the fused kernels take (float64 always runs on the float64 reference).
FUSED_DTYPE_NAMES: tuple[str, ...] = ("float32", "bfloat16", "float16")

#: Backends of the fused ops: the PyTorch reference, Triton kernels, the C++ CPU kernels and
#: the CUDA kernels of the native extension.
BACKENDS: tuple[str, ...] = ("torch", "triton", "cpu", "cuda")

#: The operator-name suffix of each compiled backend: divco::<op>_<suffix>. The C++ CPU and
#: CUDA kernels are one operator with two dispatch keys; the torch reference is no operator.
OPERATOR_SUFFIX: dict[str, str] = {"cpu": "native", "cuda": "native", "triton": "triton"}

#: How a branch-batched model runs its branches: all in one pass (grouped convolutions),
#: one after another on slices of the shared weights, or chosen per device.
EXECUTION_MODES: tuple[str, ...] = ("batched", "per_branch", "auto")

#: Convolution strategies of the batched path.
CONV_IMPLS: tuple[str, ...] = ("auto", "grouped", "split")

#: BatchNorm implementations: the fused kernels or PyTorch's eager ops.
NORM_IMPLS: tuple[str, ...] = ("fused", "eager", "auto")

#: Dataset recipes of a training run (divco.train.recipe): "auto" identifies the dataset from
#: its source (digits -> quick), the official cifar10/cifar100/imagenet, divco's small "quick" preset.
RECIPES: tuple[str, ...] = ("auto", "cifar10", "cifar100", "imagenet", "quick")

#: How the peak lr follows the batch size: "none" (the official default: 0.1 at any batch),
#: "linear" (the official is_linear_lr: lr x B/B0 and momentum ** (B/B0)), "linear_lr_only"
#: (lr x B/B0, momentum kept: the quick preset's rule).
LR_SCALINGS: tuple[str, ...] = ("none", "linear", "linear_lr_only")

#: What a training step does with a loss that is not finite (TrainConfig.on_nan): apply it,
#: count it and stop at the end of the epoch, or skip the step (weights and state restored).
NONFINITE_POLICIES: tuple[str, ...] = ("stop", "skip-step")

#: Mixed-precision settings of a training run.
PRECISIONS: tuple[str, ...] = ("auto", "fp32", "bf16", "fp16")


def check_choice(name: str, value: object, choices: tuple[str, ...] | frozenset[str]) -> str:
    """``value`` if it is one of ``choices``, else a ValueError naming both."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return value  # type: ignore[return-value]
