"""check_run_options: --print-config refuses what a run refuses, before anything is allocated."""

from __future__ import annotations

import json

import pytest
import torch
from optional_deps import needs_torchvision
from train_helpers import assert_train_refuses_in_one_line

from divco.cli import main
from divco.train import assembly, engine, run_checks
from divco.train.config import TrainConfig

TINY = ["--model", "wide_resnet16_1", "--data", "digits", "--image-size", "8", "--batch-size", "64",
        "--epochs", "2", "--no-progress", "--no-tensorboard"]

REFUSED = [
    (["--backend", "cuda"], "backend='cuda' is not available for tensors on cpu"),
    (["--policy", "randaugment", "--randaugment-ops", "-1"], "RandAugment needs num_ops >= 1, got -1"),
    (["--policy", "randaugment", "--randaugment-magnitude", "99"], "RandAugment magnitude must be an int in [0, 31)"),
    (["--image-size", "100000"], "image_size (--image-size) must be an int in [8, 2048], got 100000"),
    (["--lr", "0.1", "--min-lr", "0.5"], "--min-lr 0.5 is above --lr 0.1"),
    (["--min-lr", "0.5"], "--min-lr 0.5 is above the quick recipe's peak lr 0.05"),
    (["--method", "independent", "--branches", "2", "--cot-weight", "0.3"],
     "--cot-weight 0.3: method 'independent' trains without the co-training term"),
    (["--method", "independent", "--branches", "2", "--cot-warmup-epochs", "3"],
     "--cot-warmup-epochs 3: method 'independent' trains without the co-training term"),
]
if not torch.cuda.is_available():
    REFUSED.append((["--device", "cuda"], "device 'cuda' was requested but CUDA is not available here"))


@pytest.mark.parametrize("arguments, message", [
    pytest.param(a, m, id=" ".join(a), marks=[needs_torchvision] if "randaugment" in a else [])  # the policy's ops
    for a, m in REFUSED])
def test_print_config_refuses_what_a_run_refuses(tmp_path, capsys, monkeypatch, arguments, message):
    """One line, exit status 2, nothing written; the real run stops at the same check, before the data."""
    def no_data(*args, **kwargs):
        raise AssertionError("the run read its data before refusing its options")

    monkeypatch.setattr(assembly, "load_dataset", no_data)
    assert_train_refuses_in_one_line([*TINY, *arguments], message, tmp_path / "run", capsys)


def test_torchrun_refuses_checkpoint_ensembles_before_the_process_group(tmp_path, monkeypatch):
    """A lone rank would wait in init_process_group for ranks that already failed: refuse before it."""
    calls = []
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda *a, **k: calls.append(a))
    for name, value in {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": "29555"}.items():
        monkeypatch.setenv(name, value)
    for method in ("snapshot", "cbnn"):
        config = TrainConfig(model="wide_resnet16_1", out=str(tmp_path / method), method=method, epochs=3,
                             image_size=8, progress=False, tensorboard=False)
        with pytest.raises(ValueError, match=rf"method '{method}' runs on one process .* WORLD_SIZE=2: run it "
                                             rf"without torchrun"):
            engine.train(config)
        with pytest.raises(ValueError, match="WORLD_SIZE=2"):
            run_checks.check_run_options(config, print_config=True)
    assert calls == [] and not any(tmp_path.iterdir())


def test_print_config_resume_needs_an_existing_run_folder(tmp_path, capsys):
    code = main(["train", *TINY, "--out", str(tmp_path / "nowhere"), "--resume", "--print-config"])
    err = capsys.readouterr().err
    assert code == 2 and "--resume: the run folder" in err and "nowhere does not exist" in err, err


def test_print_config_without_the_data_takes_the_recipes_dataset_size(tmp_path, capsys):
    base = ["train", "--model", "wide_resnet28_10", "--branches", "4", "--data", str(tmp_path / "cifar-100-python"),
            "--out", str(tmp_path / "run"), "--print-config"]
    assert main([*base, "--recipe", "cifar100"]) == 0
    run = json.loads(capsys.readouterr().out)
    assert run["recipe"]["name"] == "cifar100" and run["model"]["num_classes"] == 100
    assert run["train_images"] == 50_000 and run["steps_per_epoch"] == 50_000 // 128
    assert run["data"] == {"source": str(tmp_path / "cifar-100-python"), "on_disk": False,
                           "sizes": "50000 training images of cifar100, 100 classes"}
    assert main([*base, "--recipe", "imagenet", "--num-classes", "100"]) == 0
    run = json.loads(capsys.readouterr().out)
    assert run["model"]["num_classes"] == 100 and run["train_images"] == 1_281_167
    assert main(base) == 2  # no recipe: nothing says what the data would be
    assert "pass --recipe cifar10|cifar100|imagenet" in capsys.readouterr().err
    assert main([*base, "--recipe", "cifar100", "--num-classes", "1"]) == 2
    assert "--num-classes must be an int >= 2" in capsys.readouterr().err
    assert main(["train", *TINY, "--out", str(tmp_path / "run"), "--num-classes", "10"]) == 2  # not for a run
    assert "--num-classes is an option of --print-config" in capsys.readouterr().err


@needs_torchvision
def test_departures_of_the_quick_recipe_list_the_explicit_options():
    from divco.train.plan import describe, plan_from_config

    config = TrainConfig(model="wide_resnet16_1", out="x", epochs=3, batch_size=32, lr=0.2, min_lr=1e-3,
                         label_smoothing=0.1)
    departures = describe(plan_from_config(config))["departures"]
    assert departures[0] == "recipe 'quick' is divco's small preset, not the paper's recipe"
    assert {"lr=0.2 set explicitly", "min_lr=0.001 set explicitly", "label_smoothing=0.1 set explicitly"} <= \
        set(departures)
