"""divco export --fold-bn: exported branches with every conv->BN folded compute the logits of
the unfolded branches, and load_branch rebuilds the folded structure from the metadata."""

from __future__ import annotations

import json

import pytest
import torch

import divco
from divco.cli import main
from divco.train import load_branch, read_branch_metadata, save_checkpoint
from train_helpers import checkpoint_state


def checkpoint_of(tmp_path, name: str, branches: int = 2):
    model = divco.models.create(name, num_classes=7, branches=branches)
    with torch.no_grad():  # non-trivial BN statistics and affine parameters
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.2)
    path = tmp_path / f"{name}.pt"
    save_checkpoint(path, checkpoint_state(model=name, branches=branches, num_classes=7, weights=model.state_dict()))
    return model, path


# one divco standalone (CIFAR family) and one torchvision ResNet; every family: tests/nn/test_fold.py
@pytest.mark.parametrize("name", ["wide_resnet16_2", "resnet18"])
def test_fold_bn_export_computes_the_same_logits(tmp_path, name):
    if name == "resnet18":
        pytest.importorskip("torchvision")
    model, path = checkpoint_of(tmp_path, name)
    out = tmp_path / "folded"
    assert main(["export", str(path), "--out", str(out), "--fold-bn"]) == 0
    x = torch.randn(2, 3, 32, 32)
    for index, branch in enumerate(divco.unstack(model)):
        target = out / f"branch{index}.safetensors"
        pairs = json.loads(read_branch_metadata(target)["folded_bn"])
        assert pairs, "nothing was folded"
        loaded = load_branch(target)
        bn_names = {n for n, m in loaded.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
        assert not bn_names & {bn for _, bn in pairs}
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), branch.eval()(x), rtol=1e-4, atol=1e-4)
