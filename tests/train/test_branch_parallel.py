"""Branch-parallel pieces that need no process group: checks, shards, state slicing, multi-device inference."""

from __future__ import annotations

import pytest
import torch

import divco
from divco.stacking import stack, unstack
from divco.train.branch_parallel import (
    BranchParallelMesh,
    BranchParallelModel,
    MultiDeviceBranches,
    check_branch_parallel,
    create_branch_shard,
    data_shard,
    own_views,
    shard_optimizer_state,
    shard_state_dict,
)
from divco.train.branch_parallel.loop import LoopConfig, make_optimizer

NAME, S, K = "wide_resnet16_1", 4, 5


def mesh(G: int, rank: int, world_size: int | None = None) -> BranchParallelMesh:
    return BranchParallelMesh(S, G, world_size or G, rank)


@pytest.mark.parametrize("arguments, expected", [
    ((4, 3, 3), "must divide the 4 branches"),
    ((4, 2, 3), "must divide the 3 processes"),
    ((4, 0, 2), "branch_groups must be a positive int"),
])
def test_check_rejects_meshes_that_do_not_divide(arguments, expected):
    with pytest.raises(ValueError, match=expected) as error:
        check_branch_parallel(*arguments)
    assert "\n" not in str(error.value)


def test_check_rejects_a_global_batch_that_does_not_split_into_the_data_shards():
    with pytest.raises(ValueError, match="batch_size 6 is the global batch and must be divisible by the 4 data-parallel"):
        check_branch_parallel(4, 2, 8, batch_size=6)


def test_check_accepts_a_dividing_mesh():
    check_branch_parallel(4, 2, 4, batch_size=8)
    check_branch_parallel(4, 4, 4, batch_size=8)


def test_mesh_places_branch_shards_fastest():
    m = BranchParallelMesh(8, 2, 6, 5)
    assert (m.branch_shard, m.data_rank, m.data_parallel) == (1, 2, 3)
    assert list(m.own_branches) == [4, 5, 6, 7]
    assert m.gather_ranks == [4, 5] and m.data_ranks == [1, 3, 5]
    assert not m.holds_checkpoint_state and BranchParallelMesh(8, 2, 6, 1).holds_checkpoint_state


@pytest.mark.parametrize("G", [2, 4])
def test_shard_equals_the_slice_of_the_one_process_model(G):
    torch.manual_seed(3)
    full = divco.models.create(NAME, num_classes=K, branches=S)
    after_full = torch.random.get_rng_state()
    branches = unstack(full)
    shards = []
    for g in range(G):
        shard = create_branch_shard(NAME, mesh(G, g), num_classes=K, seed=3)
        assert torch.equal(torch.random.get_rng_state(), after_full)  # the one-process run's RNG continues
        assert shard.branches == S // G and shard.spec == full.spec  # S's widths, not S/G's
        own = branches[g * S // G:(g + 1) * S // G]
        expected = stack(own).state_dict()
        state = shard.state_dict()
        assert state.keys() == expected.keys()
        assert all(torch.equal(state[k], expected[k]) for k in state)
        shards.append(state)
    full_state = full.state_dict()
    for key, value in full_state.items():
        joined = value if value.dim() == 0 else torch.cat([s[key] for s in shards])
        assert torch.equal(joined, value), key


def test_shard_forward_gives_its_branches_logits():
    torch.manual_seed(0)
    full = divco.models.create(NAME, num_classes=K, branches=S).eval()
    shard = create_branch_shard(NAME, mesh(2, 1), num_classes=K, seed=0).eval()
    images = torch.randn(2, S, 3, 8, 8)
    assert torch.allclose(shard(own_views(images, mesh(2, 1))), full(images)[:, 2:], atol=1e-6)


def test_optimizer_state_slices_and_concatenates_back():
    config = LoopConfig()
    torch.manual_seed(0)
    full = divco.models.create(NAME, num_classes=K, branches=S)
    optimizer = make_optimizer(full, config)
    full(torch.randn(4, S, 3, 8, 8)).sum().backward()
    optimizer.step()
    full_state = optimizer.state_dict()
    parts = []
    for g in range(2):
        shard = create_branch_shard(NAME, mesh(2, g), num_classes=K, seed=0)
        shard_optimizer = make_optimizer(shard, config)
        shard_optimizer.load_state_dict(shard_optimizer_state(full_state, shard_optimizer, mesh(2, g)))
        parts.append(shard_optimizer.state_dict())
    for index, entry in full_state["state"].items():
        joined = torch.cat([p["state"][index]["momentum_buffer"] for p in parts])
        assert torch.equal(joined, entry["momentum_buffer"])


def test_shard_state_rejects_state_not_stacked_over_the_branches():
    with pytest.raises(ValueError, match="is not stacked over the 4 branches"):
        shard_state_dict({"w": torch.zeros(6, 2)}, 4, 2, 0)


def test_data_shard_and_views_pick_this_process_part():
    m = BranchParallelMesh(S, 2, 4, 3)  # branch shard 1 of data shard 1
    images = torch.arange(8 * S).reshape(8, S, 1, 1, 1).float()
    picked = own_views(data_shard(images, m), m)
    assert torch.equal(picked, images[4:, 2:])
    with pytest.raises(ValueError, match="does not split into 2 data shards"):
        data_shard(torch.zeros(5), m)
    with pytest.raises(ValueError, match=r"expects \[B, 4, C, H, W\]"):
        own_views(torch.zeros(2, 3, 3, 8, 8), m)


def test_model_rejects_a_shard_of_the_wrong_size():
    torch.manual_seed(0)
    wrong = divco.models.create(NAME, num_classes=K, branches=S)
    with pytest.raises(ValueError, match="the shard has 4 branches; this mesh gives each process 2"):
        BranchParallelModel(wrong, mesh(2, 0))


@pytest.mark.parametrize("mode", ["mean_logits", "mean_probs", "geo_mean", "max", "vote"])
def test_multi_device_ensemble_equals_the_one_process_ensemble(mode):
    torch.manual_seed(0)
    model = divco.models.create(NAME, num_classes=K, branches=S).eval()
    images = torch.randn(3, 3, 8, 8)
    split = MultiDeviceBranches(model, ["cpu", "cpu"])
    with torch.no_grad():
        expected_logits = model(images)
        assert torch.allclose(split(images), expected_logits, atol=1e-6)
        expected = divco.ops.ensemble(expected_logits, mode)
    assert torch.allclose(split.ensemble(images, mode=mode), expected, atol=1e-6)


def test_multi_device_rejects_devices_that_do_not_divide_the_branches():
    torch.manual_seed(0)
    model = divco.models.create(NAME, num_classes=K, branches=S)
    with pytest.raises(ValueError, match="must divide the 4 branches"):
        MultiDeviceBranches(model, ["cpu"] * 3)
