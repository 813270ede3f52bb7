"""TrainConfig: JSON round trip, and which differences block a resume."""

from __future__ import annotations

import json

import pytest
from train_helpers import tiny_config

from divco.data import AugmentConfig
from divco.train import TrainConfig


def test_json_round_trip(tmp_path):
    config = tiny_config(tmp_path, augment=AugmentConfig(erase_scale=(0.1, 0.2), policy="autoaugment"),
                         model_kwargs={"dropout": 0.1})
    again = TrainConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config and again.augment.erase_scale == (0.1, 0.2)


def test_resume_compares_only_what_changes_results(tmp_path):
    config = tiny_config(tmp_path, device="cuda:0")
    assert config.run_defining_differences(config.replace(device="cuda:1", progress=True, keep_checkpoints=9,
                                                          resume=True, tensorboard=True, cache_dir=False)) == []


@pytest.mark.parametrize("change", [dict(precision="bf16"), dict(channels_last=True), dict(compile=True),
                                    dict(backend="torch"), dict(execution="per_branch"),
                                    dict(eval_batch_size=7), dict(on_nan="skip-step")])
def test_options_that_change_the_numbers_are_run_defining(tmp_path, change):
    # a resume with another precision (...) used to be accepted and overwrote config.json
    config = tiny_config(tmp_path, device="cuda")
    assert len(config.run_defining_differences(config.replace(**change))) == 1
    differences = config.run_defining_differences(config.replace(seed=5, augment=AugmentConfig(mixup_alpha=0.0)))
    assert any(d.startswith("seed=5") for d in differences) and any(d.startswith("augment=") for d in differences)


def test_unknown_options_and_types():
    with pytest.raises(ValueError, match=r"unknown TrainConfig option\(s\) \['learning_rate'\]"):
        TrainConfig.from_dict({"model": "wide_resnet16_4", "out": "x", "learning_rate": 0.1})
    with pytest.raises(ValueError, match="model_kwargs must be a dict"):
        TrainConfig(model="wide_resnet16_4", out="x", model_kwargs=[1])
    with pytest.raises(ValueError, match="momentum must be < 1"):
        TrainConfig(model="wide_resnet16_4", out="x", momentum=1.0)
    with pytest.raises(ValueError, match="out must be a folder path"):
        TrainConfig(model="wide_resnet16_4", out="")
