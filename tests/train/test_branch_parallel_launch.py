"""What a --branch-parallel launch refuses (one line, before any data, model or process group), and its plan."""

from __future__ import annotations

import json

import pytest
import torch
from train_helpers import assert_train_refuses_in_one_line

from divco.cli import main
from divco.train import assembly, methods
from divco.train.branch_parallel.launch import check_branch_parallel_launch, check_processes_agree
from divco.train.config import OPERATIONAL_FIELDS, TrainConfig
from divco.train.distributed import DistributedContext

TINY = ["--model", "wide_resnet16_1", "--data", "digits", "--image-size", "8", "--batch-size", "16",
        "--epochs", "2", "--no-progress", "--no-tensorboard"]

REFUSED = [
    (["--branches", "4", "--branch-parallel", "3"], "3", "--branch-parallel 3 must divide the 4 branches"),
    (["--branches", "4", "--branch-parallel", "2"], "3", "--branch-parallel 2 must divide the 3 processes"),
    (["--branches", "4", "--branch-parallel", "2", "--batch-size", "6"], "8",
     "batch_size 6 is the global batch and must be divisible by the 4 data-parallel shards"),
    (["--branches", "1", "--method", "snapshot", "--checkpoints", "2", "--branch-parallel", "2"], "2",
     "method 'snapshot' does not run branch-parallel (it trains one network"),
    (["--branches", "1", "--method", "cbnn", "--checkpoints", "2", "--branch-parallel", "2"], "2",
     "method 'cbnn' does not run branch-parallel"),
    (["--branches", "2", "--branch-parallel", "2", "--sync-bn"], "2", "--sync-bn is not done branch-parallel"),
    (["--branches", "2", "--branch-parallel", "2", "--on-nan", "skip-step"], "2",
     "--on-nan skip-step is not done branch-parallel"),
    (["--branches", "2", "--branch-parallel", "2", "--capture", "compile-step"], "2",
     "--capture compile-step is not done branch-parallel"),
    (["--branches", "2", "--branch-parallel", "2", "--compile"], "2", "--capture compile is not done branch-parallel"),
    (["--branches", "2", "--branch-parallel", "2"], "1", "--branch-parallel 2 must divide the 1 processes"),
]


@pytest.mark.parametrize("arguments, world_size, message", REFUSED, ids=[" ".join(a) for a, _, _ in REFUSED])
def test_a_launch_that_cannot_run_branch_parallel_is_refused_in_one_line(tmp_path, capsys, monkeypatch, arguments,
                                                                         world_size, message):
    """Exit status 2, one line, nothing written, no data read, no process group joined (--print-config too)."""
    def refused(*args, **kwargs):
        raise AssertionError("the launch went on past its refusal")

    monkeypatch.setattr(assembly, "load_dataset", refused)
    monkeypatch.setattr(torch.distributed, "init_process_group", refused)
    monkeypatch.setenv("WORLD_SIZE", world_size)
    monkeypatch.setenv("RANK", "0")
    assert_train_refuses_in_one_line([*TINY, *arguments], message, tmp_path / "run", capsys)


def test_fp16_with_its_grad_scaler_is_refused():
    config = TrainConfig(model="wide_resnet16_1", out="unused", branches=2, branch_parallel=2, precision="fp16")
    with pytest.raises(ValueError, match="GradScaler, whose overflow skips would differ between the branch shards"):
        check_branch_parallel_launch(config, 2, torch.device("cuda"))


def test_the_methods_say_whether_they_run_branch_parallel():
    runs = {name for name, cls in methods.METHODS.items() if not cls.branch_parallel_refusal}
    assert {"cotrain", "independent"} <= runs and not {"snapshot", "cbnn"} & runs

    class Unchecked(methods.TrainingMethod):  # a new method refuses until it says it runs there
        name = "unchecked"

    assert Unchecked.branch_parallel_refusal


def test_supported_launches_pass_and_branch_parallel_is_operational():
    for method in ("cotrain", "independent"):
        config = TrainConfig(model="wide_resnet16_1", out="unused", branches=4, branch_parallel=2, batch_size=8,
                             method=method, cot_weight=0.5 if method == "cotrain" else 0.5)
        check_branch_parallel_launch(config, 4, torch.device("cpu"))
    assert "branch_parallel" in OPERATIONAL_FIELDS  # a run may resume in another layout
    one = TrainConfig(model="wide_resnet16_1", out="unused", branches=2)
    assert one.run_defining_differences(one.replace(branch_parallel=2)) == []
    with pytest.raises(ValueError, match="branch_parallel must be an int >= 1, got 0"):
        one.replace(branch_parallel=0)


class _Processes(DistributedContext):
    """A rank of a two-process launch whose ranks hold the given option dicts."""

    def __init__(self, rank: int, configs: list[dict]) -> None:
        super().__init__(rank=rank, world_size=len(configs))
        self.configs = configs

    def gather_objects(self, obj):
        return self.configs


def test_processes_launched_with_different_options_are_refused_on_every_rank():
    a = TrainConfig(model="wide_resnet16_1", out="run", branches=2, branch_parallel=2)
    b = a.replace(branch_parallel=1)
    for rank, config in enumerate((a, b)):
        with pytest.raises(ValueError, match=r"run different options: branch_parallel=\d on rank \d, \d on rank"):
            check_processes_agree(config, _Processes(rank, [a.to_dict(), b.to_dict()]))
    check_processes_agree(a, _Processes(0, [a.to_dict(), a.to_dict()]))


def test_print_config_shows_the_mesh(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    base = ["train", *TINY, "--branches", "4", "--out", str(tmp_path / "run"), "--print-config"]
    assert main([*base, "--branch-parallel", "2"]) == 0
    plan = json.loads(capsys.readouterr().out)["branch_parallel"]
    assert (plan["branch_groups"], plan["data_parallel"], plan["processes"]) == (2, 1, 2)
    assert "smallest launch" in plan["processes_from"]
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert main([*base, "--branch-parallel", "2"]) == 0
    printed = json.loads(capsys.readouterr().out)
    plan = printed["branch_parallel"]
    assert (plan["branch_groups"], plan["data_parallel"], plan["processes"], plan["batch_per_data_shard"]) == \
        (2, 2, 4, 8)
    assert [(r["branches"], r["data_shard"]) for r in plan["ranks"]] == \
        [([0, 1], 0), ([2, 3], 0), ([0, 1], 1), ([2, 3], 1)]
    monkeypatch.delenv("WORLD_SIZE")
    assert main(base) == 0
    assert "branch_parallel" not in json.loads(capsys.readouterr().out)
