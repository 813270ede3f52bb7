"""The options of divco train / compare are generated from TrainConfig."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Optional

import pytest

from divco import vocabulary
from divco.commands._train_options import add_config_options, add_train_options, config_from_args, \
    train_config_from_args
from divco.data import AugmentConfig
from divco.train import TrainConfig


def parser(**kwargs) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    add_train_options(p, **kwargs)
    return p


def flags(p: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {flag: action for action in p._actions for flag in action.option_strings}


def test_every_field_has_an_option_and_the_defaults_are_the_configs():
    options = flags(parser())
    commanded = {"out", "resume"}  # each command adds its own
    for f in dataclasses.fields(TrainConfig):
        if f.name == "augment":
            for sub in dataclasses.fields(AugmentConfig):
                assert "--" + sub.name.replace("_", "-") in options, sub.name
        elif f.name not in commanded:
            assert "--" + f.name.replace("_", "-") in options, f.name
    args = parser().parse_args(["--model", "wide_resnet16_4"])
    assert train_config_from_args(args, out="o") == TrainConfig(model="wide_resnet16_4", out="o")


def test_every_option_reaches_the_config():
    argv = ["--model", "resnet18", "--branches", "3", "--lr", "0.3", "--no-nesterov", "--cot-kind", "kl",
            "--backend", "torch", "--policy", "randaugment", "--erase-scale", "0.1", "0.2", "--same-view",
            "--no-flip", "--no-cache", "--model-kwargs", '{"dropout": 0.1}', "--precision", "bf16",
            "--channels-last", "--compile", "--execution", "per_branch", "--on-nan", "skip-step", "--no-progress"]
    config = train_config_from_args(parser().parse_args(argv), out="o")
    assert (config.branches, config.lr, config.nesterov, config.cot_kind, config.backend) == (3, 0.3, False, "kl",
                                                                                              "torch")
    assert config.augment == AugmentConfig(policy="randaugment", erase_scale=(0.1, 0.2), same_view=True, flip=False)
    assert config.cache_dir is False and config.model_kwargs == {"dropout": 0.1} and config.precision == "bf16"
    assert config.channels_last and config.compile and config.execution == "per_branch"
    assert config.on_nan == "skip-step" and config.progress is False
    assert train_config_from_args(parser().parse_args(["--model", "x", "--cache-dir", "c"]), out="o",
                                  model="resnet18").cache_dir == "c"


def test_choices_come_from_the_vocabulary():
    options = flags(parser())
    assert tuple(options["--precision"].choices) == vocabulary.PRECISIONS
    assert tuple(options["--cot-kind"].choices) == vocabulary.COTRAIN_KINDS
    assert tuple(options["--execution"].choices) == vocabulary.EXECUTION_MODES
    assert tuple(options["--backend"].choices) == vocabulary.BACKENDS


def test_compare_takes_several_branches():
    assert parser(several_branches=True).parse_args(["--model", "x"]).branches == [1, 4]
    assert parser(several_branches=True).parse_args(["--model", "x", "--branches", "1", "2"]).branches == [1, 2]


@dataclasses.dataclass
class _Plain:
    """Fields without metadata, as a later field of TrainConfig might be."""

    name: str
    steps: Optional[int] = None
    rate: float = 0.5
    shuffle: bool = True
    window: tuple = (1, 2)
    extra: dict = dataclasses.field(default_factory=dict)


def test_fields_without_metadata_get_sensible_options():
    p = argparse.ArgumentParser()
    add_config_options(p, _Plain)
    with pytest.raises(SystemExit):
        p.parse_args([])  # name has no default: required
    args = p.parse_args(["--name", "a", "--steps", "7", "--rate", "0.25", "--no-shuffle", "--window", "3", "4",
                         "--extra", '{"k": 1}'])
    assert config_from_args(args, _Plain) == _Plain("a", 7, 0.25, False, (3, 4), {"k": 1})
    assert config_from_args(p.parse_args(["--name", "b"]), _Plain) == _Plain("b")


def test_train_messages_spell_options_as_the_command_line_does_within_its_block():
    from divco.commands._train_options import cli_spelling
    from divco.train.runtime import option, option_spelling

    assert (option("batch_size", 8), option("resume", True), option("out")) == ("batch_size=8", "resume=True", "out")
    with option_spelling(cli_spelling):
        assert (option("batch_size", 8), option("resume", True), option("out")) == ("--batch-size 8", "--resume",
                                                                                     "--out")
    assert option("batch_size", 8) == "batch_size=8"  # restored after the block
