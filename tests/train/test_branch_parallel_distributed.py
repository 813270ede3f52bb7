"""Branch-parallel training in gloo processes equals one process training all S branches.

One spawn per world size: P = 2 (G = 2: training, resume from a one-process checkpoint, the
logits' gradient, the ensemble) and P = 4 (G = 4, and G = 2 with data parallel 2, in one
world).  Each result is compared with :func:`train_one_process` on the same batches.
"""

from __future__ import annotations

import pytest
import torch

import divco
from divco.train.branch_parallel.loop import LoopConfig, run_checks, spawn, train_one_process

CONFIG = LoopConfig(steps=2)
MODES = ("mean_logits", "geo_mean", "vote")
ATOL = 2e-5


def assert_same_training(bp: dict, ref: dict, *, metrics: bool = True) -> None:
    assert bp["model"].keys() == ref["model"].keys()
    for key, value in ref["model"].items():
        assert bp["model"][key].shape == value.shape, key
        torch.testing.assert_close(bp["model"][key], value, atol=ATOL, rtol=1e-5, msg=key)
    assert bp["optimizer"]["state"].keys() == ref["optimizer"]["state"].keys()
    for index, entry in ref["optimizer"]["state"].items():
        torch.testing.assert_close(bp["optimizer"]["state"][index]["momentum_buffer"], entry["momentum_buffer"],
                                   atol=ATOL, rtol=1e-5)
    for name, value in (ref["metrics"] if metrics else {}).items():
        got = bp["metrics"][name]
        if isinstance(value, list):
            assert got == pytest.approx(value, abs=1e-5), name
        elif isinstance(value, float):
            assert got == pytest.approx(value, abs=1e-5), name
        else:
            assert got == value, name


@pytest.fixture(scope="module")
def reference() -> dict:
    return train_one_process(CONFIG)


@pytest.mark.slow
def test_two_processes_train_resume_and_predict_as_one(reference):
    halfway = train_one_process(LoopConfig(steps=1))
    results = spawn(run_checks, 2, CONFIG, (2,), halfway, 1, MODES)[2]
    assert_same_training(results["train"], reference)
    assert results["train"]["bytes"] == {"all_gather": CONFIG.steps * (CONFIG.batch_size * 2 * 5 * 4)}
    # resumed from a one-process checkpoint after step 0, branch-parallel for step 1
    assert_same_training(results["resumed"], reference, metrics=False)  # its metrics are step 1's alone
    # and the other way round: the branch-parallel checkpoint resumes in one process
    bp_halfway = spawn(run_checks, 2, LoopConfig(steps=1), (2,))[2]["train"]
    resumed_here = train_one_process(CONFIG, start=bp_halfway, first_step=1)
    torch.testing.assert_close(resumed_here["model"], reference["model"], atol=ATOL, rtol=1e-5)

    gradient = results["gradient"]
    assert gradient["logits_equal"]
    torch.testing.assert_close(gradient["gathered"], gradient["one_process"], atol=1e-7, rtol=1e-6)
    # torch.distributed.nn's all_gather sums the group's (identical) gradients: G times too large
    torch.testing.assert_close(gradient["summing_all_gather"], 2 * gradient["one_process"], atol=1e-7, rtol=1e-6)

    model = divco.models.create(CONFIG.model, num_classes=CONFIG.num_classes, branches=CONFIG.branches)
    model.load_state_dict(reference["model"])
    model.eval()
    images = torch.randn(CONFIG.batch_size, 3, CONFIG.image_size, CONFIG.image_size,
                         generator=torch.Generator().manual_seed(CONFIG.seed + 23))
    with torch.no_grad():
        logits = model(images)
    for mode in MODES:
        torch.testing.assert_close(results["ensemble"][mode], divco.ops.ensemble(logits, mode), atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_four_processes_with_four_branch_groups_and_with_data_parallel_two(reference):
    results = spawn(run_checks, 4, CONFIG, (4, 2))
    assert_same_training(results[4]["train"], reference)
    torch.testing.assert_close(results[4]["gradient"]["gathered"], results[4]["gradient"]["one_process"],
                               atol=1e-7, rtol=1e-6)
    data_parallel = train_one_process(CONFIG, data_parallel=2)
    assert_same_training(results[2]["train"], data_parallel)
    # each process hands over its logits per step, and DDP all-reduces its two branches' gradients
    params = sum(p.numel() for p in divco.models.create(CONFIG.model, num_classes=CONFIG.num_classes,
                                                        branches=CONFIG.branches).parameters())
    assert results[2]["train"]["bytes"] == {"all_gather": CONFIG.steps * (CONFIG.batch_size // 2) * 2 * 5 * 4,
                                            "all_reduce": CONFIG.steps * params // 2 * 4}
    assert results[4]["train"]["bytes"] == {"all_gather": CONFIG.steps * CONFIG.batch_size * 1 * 5 * 4}
