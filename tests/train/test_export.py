"""Exported branches equal unstacked branches: divco S=1 models and torchvision ResNets."""

from __future__ import annotations

import pytest
import torch
from train_helpers import checkpoint_state, tiny_config

import divco
from divco.train import export_branches, load_branch, read_branch_metadata, save_checkpoint, train
from divco.train.checkpoint import model_from_checkpoint


def assert_same_model(a: torch.nn.Module, b: torch.nn.Module, x: torch.Tensor) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key
    with torch.no_grad():
        torch.testing.assert_close(a.eval()(x), b.eval()(x), rtol=0, atol=0)


def test_export_of_a_trained_checkpoint_round_trips(tmp_path):
    result = train(tiny_config(tmp_path / "run", epochs=1, train_subset=32, test_subset=16))
    trained = model_from_checkpoint(result.checkpoint)
    branches = divco.unstack(trained)
    x = torch.randn(4, 3, 8, 8)

    paths = export_branches(result.checkpoint)
    assert [p.name for p in paths] == ["branch0.safetensors", "branch1.safetensors"]
    assert paths[0].parent.name == f"{result.checkpoint.stem}-branches"
    for index, path in enumerate(paths):
        loaded = load_branch(path)
        assert type(loaded) is type(branches[index]) and loaded.branches == 1
        assert_same_model(loaded, branches[index], x)
        metadata = read_branch_metadata(path)
        assert metadata["model_name"] == "wide_resnet16_4" and metadata["branch"] == str(index)
        assert metadata["branches"] == "2" and metadata["num_classes"] == "10"
    # one branch, to a chosen file; the output of the stacked model's branch 1 is the standalone's
    (single,) = export_branches(result.checkpoint, tmp_path / "b1.safetensors", branch=1)
    with torch.no_grad():
        torch.testing.assert_close(load_branch(single)(x)[:, 0], trained(x)[:, 1], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"branch must be an int in \[0, 2\)"):
        export_branches(result.checkpoint, branch=2)


def test_export_of_an_imagenet_family_checkpoint_gives_torchvision_resnets(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    model = divco.models.create("resnet18", num_classes=7, branches=2)
    with torch.no_grad():  # non-trivial BN statistics, so that buffers are checked too
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, checkpoint_state(model="resnet18", branches=2, num_classes=7, weights=model.state_dict()))
    exported = export_branches(path, tmp_path / "out")
    x = torch.randn(2, 3, 32, 32)
    for index, branch in enumerate(divco.unstack(model)):
        loaded = load_branch(exported[index])
        assert isinstance(loaded, torchvision.models.ResNet)
        assert_same_model(loaded, branch, x)


def test_load_branch_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.safetensors"):
        load_branch(tmp_path / "nothing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    with pytest.raises(ValueError, match="junk.safetensors is not a readable safetensors"):
        load_branch(tmp_path / "junk.safetensors")
    from safetensors.torch import save_file

    save_file({"w": torch.ones(1)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="not a divco exported branch"):
        load_branch(tmp_path / "plain.safetensors")
