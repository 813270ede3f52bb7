"""The `divco summary` and `divco models` commands (through divco.cli.main)."""

from __future__ import annotations

import json

import pytest

import divco
from divco.cli import main


def test_summary_json(capsys):
    assert main(["summary", "--model", "resnet18", "--branches", "2", "--num-classes", "10",
                 "--input-size", "3", "64", "64", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    model = divco.models.create("resnet18", num_classes=10, branches=2)
    assert result["name"] == "resnet18" and result["branches"] == 2 and result["input_size"] == [3, 64, 64]
    assert result["params_total"] == sum(p.numel() for p in model.parameters())
    assert result["params_per_branch"] * 2 == result["params_total"]
    assert result["macs_total"] == divco.summary(model, (3, 64, 64)).macs_total


def test_summary_table_uses_the_family_input_size(capsys):
    assert main(["summary", "--model", "wide_resnet16_4", "--branches", "4"]) == 0
    out = capsys.readouterr().out
    assert "wide_resnet16_4" in out and "3x32x32" in out and "params total" in out and "MACs / branch" in out


@pytest.mark.parametrize("argv, message", [
    (["summary", "--model", "resnet5"], "unknown model 'resnet5'; closest: "),
    (["summary", "--model", "resnet18", "--branches", "0"], "branches must be a positive int, got 0"),
    (["summary", "--model", "resnet18", "--num-classes", "-1"], "num_classes must be a positive int, got -1"),
])
def test_summary_errors_are_messages_not_tracebacks(capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("divco summary: error: ") and message in err


def test_models_lists_each_family(capsys):
    assert main(["models", "--family", "imagenet"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == divco.models.list("imagenet")
    assert all(line.split()[1] == "imagenet" for line in lines)
    assert main(["models"]) == 0
    names = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert names == divco.models.list() and "pyramidnet272" in names and "wide_resnet101_2" in names


def test_summary_shows_the_class_count(capsys):
    assert main(["summary", "--model", "resnet18", "--num-classes", "37", "--input-size", "3", "32", "32"]) == 0
    assert "classes          37" in capsys.readouterr().out.splitlines()
    assert main(["summary", "--model", "wide_resnet16_1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["num_classes"] == 10  # the family's default
