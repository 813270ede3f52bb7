"""BatchNorm folding for inference: every BN that directly follows a convolution becomes part
of that convolution (scaled weight, bias added) and is replaced by nn.Identity.

    pairs = fold_batchnorm(model.eval(), torch.randn(1, 3, 32, 32))   # in place
    # later, to load the folded weights into a freshly built model:
    apply_fold_structure(fresh_model, pairs); fresh_model.load_state_dict(folded_state)

In eval mode BN is the per-channel affine map y = x·s + t with s = w / sqrt(running_var + eps),
t = b - running_mean·s, so conv followed by BN is the conv with weight W·s (per output channel)
and bias bias·s + t. Which BN follows which convolution is found by running the model once on
an example input and matching tensors: a BN whose input IS a convolution's output (the same
tensor object) is folded into it. Works for nn.Conv2d / nn.BatchNorm2d and their branch-batched
versions (BranchConv2d, BranchBatchNorm2d: the S·C output channels of the stacked weight are the
S·C channels of the BN). BNs that follow something else (pre-activation BNs after a residual
add, as in PyramidNet) stay. Folding assumes each such convolution's output feeds only its BN,
as in every divco model family; :func:`fold_batchnorm` checks the result on the example.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .conv import BranchConv2d

CONVOLUTIONS = (nn.Conv2d, BranchConv2d)


def conv_bn_pairs(model: nn.Module, example: Tensor) -> list[tuple[str, str]]:
    """(convolution name, BatchNorm name) for every BN whose input is a convolution's output."""
    outputs: dict[int, tuple[str, Tensor]] = {}  # id -> (conv name, the tensor, kept alive)
    pairs: list[tuple[str, str]] = []
    hooks = []

    def record_output(name):
        def hook(module, inputs, output):
            outputs[id(output)] = (name, output)

        return hook

    def match_input(name):
        def hook(module, inputs):
            found = outputs.get(id(inputs[0]))
            if found is not None and found[1] is inputs[0] and (found[0], name) not in pairs:
                pairs.append((found[0], name))

        return hook

    for name, module in model.named_modules():
        if isinstance(module, CONVOLUTIONS):
            hooks.append(module.register_forward_hook(record_output(name)))
        elif isinstance(module, nn.BatchNorm2d):
            hooks.append(module.register_forward_pre_hook(match_input(name)))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(example)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    convs = [c for c, _ in pairs]
    bns = [b for _, b in pairs]
    if len(set(convs)) != len(convs) or len(set(bns)) != len(bns):
        raise ValueError(f"a convolution or BatchNorm appears in two conv->BN pairs, cannot fold: {pairs}")
    return pairs


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, attr = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), attr


def apply_fold_structure(model: nn.Module, pairs: list[tuple[str, str]]) -> nn.Module:
    """The module structure of a folded model, without folding values: each paired BN becomes
    nn.Identity and each paired convolution gets a (zero) bias. For loading folded weights."""
    for conv_name, bn_name in pairs:
        conv = model.get_submodule(conv_name)
        if conv.bias is None:
            channels = conv.weight.shape[0]
            conv.bias = nn.Parameter(torch.zeros(channels, dtype=conv.weight.dtype, device=conv.weight.device))
        parent, attr = _parent(model, bn_name)
        setattr(parent, attr, nn.Identity())
    return model


@torch.no_grad()
def fold_conv_bn(conv: nn.Module, bn: nn.BatchNorm2d) -> None:
    """Fold eval-mode ``bn`` into ``conv`` in place (computed in float64, stored in conv's dtype)."""
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("BatchNorm without running statistics (track_running_stats=False) cannot be folded")
    channels = conv.weight.shape[0]
    if bn.num_features != channels:
        raise ValueError(f"BatchNorm of {bn.num_features} channels follows a convolution of {channels}: cannot fold")
    scale = torch.rsqrt(bn.running_var.double() + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.double()
    shift = -bn.running_mean.double() * scale
    if bn.bias is not None:
        shift = shift + bn.bias.double()
    bias = shift if conv.bias is None else conv.bias.double() * scale + shift
    conv.weight.copy_((conv.weight.double() * scale.view(-1, 1, 1, 1)).to(conv.weight.dtype))
    if conv.bias is None:
        conv.bias = nn.Parameter(bias.to(conv.weight.dtype))
    else:
        conv.bias.copy_(bias.to(conv.bias.dtype))


def fold_batchnorm(model: nn.Module, example: Tensor, *, atol: float = 1e-4) -> list[tuple[str, str]]:
    """Fold every BN that follows a convolution into it (in place); returns the (conv, BN) pairs.

    The model computes the same eval-mode function afterwards: checked on ``example``
    (ValueError if the outputs differ by more than ``atol`` relative to their scale).
    """
    was_training = model.training
    model.eval()
    with torch.no_grad():
        before = model(example)
    pairs = conv_bn_pairs(model, example)
    for conv_name, bn_name in pairs:
        fold_conv_bn(model.get_submodule(conv_name), model.get_submodule(bn_name))
    apply_fold_structure(model, pairs)
    with torch.no_grad():
        after = model(example)
    scale = before.abs().max().clamp_min(1.0)
    error = ((after - before).abs().max() / scale).item()
    model.train(was_training)
    if error > atol:
        raise ValueError(f"folding BatchNorm changed the model's outputs (relative error {error:.1e} > {atol:.0e}): "
                         "some convolution output feeds more than its BatchNorm")
    return pairs
