"""The hooks through which a run's checks and its step ask the method (divco.train.methods.base): which
launches and options it refuses, which objective its step minimises; nothing outside the methods
branches on a method's name."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from train_helpers import tiny_config

from divco.train import methods, run_checks
from divco.train.methods import TrainingMethod
from divco.train.objectives import CotrainingObjective, PerBranchObjective
from divco.train.plan import plan_from_config

PACKAGE = Path(__file__).resolve().parents[2] / "divco"


class OneProcessToy(TrainingMethod):
    name = "one-process-toy"
    summary = "a test's single-process method"
    single_process = "its state is a test's"
    refused = []

    @classmethod
    def check_options(cls, config) -> None:
        cls.refused.append(config.seed)
        if config.seed == 13:
            raise ValueError("seed 13: this method refuses it")


@pytest.fixture
def toy(monkeypatch):
    monkeypatch.setitem(methods.METHODS, OneProcessToy.name, OneProcessToy)
    OneProcessToy.refused.clear()
    return OneProcessToy


@pytest.mark.parametrize("name", methods.names())
def test_every_method_runs_on_one_process(name):
    methods.method_class(name).check_launch(1)


def test_single_process_methods_refuse_a_launch_of_several():
    for name in methods.names():
        method = methods.method_class(name)
        if method.single_process:
            with pytest.raises(ValueError, match=rf"method '{name}' runs on one process \({method.single_process}\); "
                                                 rf"this launch has WORLD_SIZE=3: run it without torchrun"):
                method.check_launch(3)
        else:
            method.check_launch(3)
    assert {n for n in methods.names() if methods.method_class(n).single_process} == {"snapshot", "cbnn", "fge",
                                                                                        "swa"}


def test_the_run_checks_ask_the_method_for_launch_and_options(tmp_path, toy, monkeypatch):
    config = tiny_config(tmp_path / "run", method=toy.name, seed=13)
    with pytest.raises(ValueError, match="seed 13: this method refuses it"):
        run_checks.check_run_options(config)
    assert toy.refused == [13]
    run_checks.check_run_options(config.replace(seed=14))
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match=r"method 'one-process-toy' runs on one process \(its state is a test's\)"):
        run_checks.check_run_options(config.replace(seed=14))
    assert toy.refused == [13, 14]  # the launch is refused first, before any option


def test_independent_refuses_the_cotraining_options_and_cotrain_takes_them(tmp_path):
    independent = methods.method_class("independent")
    with pytest.raises(ValueError, match=r"cot_weight=0.3: method 'independent' trains without the co-training"):
        independent.check_options(tiny_config(tmp_path, method="independent", cot_weight=0.3))
    with pytest.raises(ValueError, match=r"cot_weight=0.3, cot_warmup_epochs=2: .* these options; drop them"):
        independent.check_options(tiny_config(tmp_path, method="independent", cot_weight=0.3, cot_warmup_epochs=2))
    independent.check_options(tiny_config(tmp_path, method="independent"))
    methods.method_class("cotrain").check_options(tiny_config(tmp_path, cot_weight=0.3, cot_warmup_epochs=2))


@pytest.mark.parametrize("name, kind", [("cotrain", CotrainingObjective), ("independent", PerBranchObjective),
                                        ("cbnn", CotrainingObjective)])
def test_the_method_chooses_the_objective_of_its_step(tmp_path, name, kind):
    branches = 1 if methods.method_class(name).checkpoint_ensemble else 2
    config = tiny_config(tmp_path, method=name, branches=branches, epochs=4, cot_kind="kl", temperature=2.0,
                         backend="torch")
    plan = plan_from_config(config)
    weight = torch.tensor(0.25)
    objective = plan.method.objective(plan, weight)
    assert type(objective) is kind
    assert (objective.kind, objective.temperature, objective.backend) == ("kl", 2.0, "torch")
    assert objective.scores_ensemble is (kind is CotrainingObjective)
    if kind is CotrainingObjective:
        assert objective.cot_weight is weight  # the run's in-place weight, not a copy


def method_name_comparisons(source: str, names: set[str]) -> list[str]:
    """``x == "cbnn"``, ``x in ("snapshot", ...)``: the comparisons of anything with a method's name."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare):
            if any(isinstance(c, ast.Constant) and c.value in names for c in ast.walk(node)):
                found.append(f"{node.lineno}: {ast.unparse(node)}")
    return found


def test_no_code_outside_the_methods_branches_on_a_method_name():
    names = set(methods.names())
    found = [f"{path.relative_to(PACKAGE)}:{hit}" for path in sorted(PACKAGE.rglob("*.py"))
             if path.relative_to(PACKAGE).parts[:2] != ("train", "methods")
             for hit in method_name_comparisons(path.read_text(), names)]
    assert found == []


def test_the_name_scan_finds_a_branch():
    source = 'def f(config):\n    if config.method == "cbnn":\n        return 1\n    return config.method in ("x", "snapshot")\n'
    assert method_name_comparisons(source, {"cbnn", "snapshot"}) == ["2: config.method == 'cbnn'",
                                                                    "4: config.method in ('x', 'snapshot')"]
