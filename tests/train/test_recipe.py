"""The paper's recipe: lr schedule, weight decay table and division, no decay on BN/bias, cot warm-up."""

from __future__ import annotations

import math

import pytest
import torch
from optional_deps import needs_torchvision

import divco
from divco.train import recipe, schedules
from divco.train.plan import describe, plan_from_config


def official_lr(T: int, *, init_lr: float, iters: int, epochs: int, slow_epochs: int, slow_lr=5e-3, end_lr=1e-4):
    """The official lr_scheduler in "cos" mode, written out literally."""
    slow_iters = slow_epochs * iters
    total = (epochs - slow_epochs) * iters
    if slow_iters > 0 and T <= slow_iters:
        lr = min(T / slow_iters * (init_lr - slow_lr) + slow_lr, init_lr)
    else:
        lr = 0.5 * init_lr * (1 + math.cos((T - slow_iters) / total * math.pi))
    return max(lr, end_lr)


def test_schedule_matches_the_official_scheduler():
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    iters, epochs = 7, 300
    schedule = schedules.WarmupCosineSchedule(optimizer, base_lr=0.1, total_steps=epochs * iters,
                                           warmup_steps=20 * iters, warmup_start_lr=5e-3, min_lr=1e-4)
    for T in list(range(0, 200)) + list(range(2000, epochs * iters)):
        assert schedule.lr(T) == pytest.approx(official_lr(T, init_lr=0.1, iters=iters, epochs=epochs,
                                                           slow_epochs=20), abs=1e-15), T
    assert optimizer.param_groups[0]["lr"] == pytest.approx(5e-3)
    for _ in range(20 * iters):
        schedule.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1)
    state = schedule.state_dict()
    fresh = schedules.WarmupCosineSchedule(optimizer, base_lr=0.1, total_steps=epochs * iters, warmup_steps=20 * iters,
                                        warmup_start_lr=5e-3, min_lr=1e-4)
    fresh.load_state_dict(state)
    assert fresh.current_lr() == schedule.current_lr() == optimizer.param_groups[0]["lr"]




def test_weight_decay_table_and_division():
    # the official parser_params.py values
    assert recipe.default_weight_decay("wide_resnet28_10") == 5e-4
    assert recipe.default_weight_decay("resnext29_16x64d") == 5e-4
    assert recipe.default_weight_decay("wide_resnet16_8") == 1e-4
    assert recipe.default_weight_decay("resnet110") == 1e-4
    assert recipe.divided_weight_decay(5e-4, 1) == pytest.approx(5e-4)
    assert recipe.divided_weight_decay(5e-4, 4) == pytest.approx(5e-4 * math.exp(-0.75))


def test_quick_preset_exempts_norms_and_biases():
    model = divco.models.create("se_resnet110", branches=2)  # SE convolutions have biases
    groups = recipe.parameter_groups(model, 1e-4, exempt_all_norms=True)
    decay = {id(p) for p in groups[0]["params"]}
    no_decay = {id(p) for p in groups[1]["params"]}
    assert groups[0]["weight_decay"] == 1e-4 and groups[1]["weight_decay"] == 0.0
    for name, p in model.named_parameters():
        module = model.get_submodule(name.rsplit(".", 1)[0])
        is_norm = isinstance(module, torch.nn.BatchNorm2d)
        expected = no_decay if (is_norm or name.endswith("bias")) else decay
        assert id(p) in expected, name
    assert len(decay) + len(no_decay) == len(list(model.parameters()))
    # SyncBatchNorm is a norm too
    synced = torch.nn.SyncBatchNorm.convert_sync_batchnorm(divco.models.create("wide_resnet16_4", branches=2))
    groups = recipe.parameter_groups(synced, 1e-4, exempt_all_norms=True)
    assert all(p.dim() > 1 for p in groups[0]["params"])


def test_cot_weight_warmup_is_the_official_per_epoch_rule():
    values = [schedules.cot_weight_for_epoch(e, 0.5, 40) for e in range(45)]
    assert values[0] == 0.005 and values[1] == pytest.approx(0.0125)  # floor, then 0.5 * e / 40
    assert values[20] == pytest.approx(0.25) and values[39] == pytest.approx(0.5 * 39 / 40)
    assert values[40:] == [0.5] * 5
    assert schedules.cot_weight_for_epoch(0, 0.5, 0) == 0.5
    assert schedules.cot_weight_for_epoch(0, 0.0, 10) == 0.0  # no co-training stays none


# -- the official recipe per dataset and architecture ------------------------------------

import json  # noqa: E402
from pathlib import Path  # noqa: E402

from divco.train import TrainConfig  # noqa: E402


def cifar_folder(tmp_path: Path, name: str) -> str:
    """A folder with the official CIFAR layout's directory (identification reads names only)."""
    (tmp_path / name).mkdir(parents=True, exist_ok=True)
    return str(tmp_path)


def imagenet_folder(tmp_path: Path) -> str:
    root = tmp_path / "imagenet"
    for split in ("train", "test"):
        (root / split).mkdir(parents=True)
    for i in range(1000):
        (root / "train" / f"n{i:08d}").mkdir()
    return str(root)


def run_of(tmp_path, data, **overrides) -> dict:
    config = TrainConfig(**{"model": "wide_resnet28_10", "out": str(tmp_path / "run"), "data": data, **overrides})
    return describe(plan_from_config(config))


def test_official_rule_decays_bn_scales_and_exempts_only_biases():
    """Item 1: the official optimiser exempts names containing "norm" or "bias"; divco's BN are bn*."""
    model = divco.models.create("se_resnet110", branches=2)
    groups = recipe.parameter_groups(model, 1e-4, with_names=True)
    assert groups[1]["names"] and all(n.endswith("bias") for n in groups[1]["names"])
    assert "bn1.weight" in groups[0]["names"] and "layer1.0.bn3.weight" in groups[0]["names"]
    for name, _ in model.named_parameters():
        assert (name in groups[1]["names"]) == ("norm" in name or "bias" in name)


@pytest.mark.parametrize("model, lr, warmup", [("resnext29_16x64d", 0.05, 30), ("se_resnet164", 0.1, 30),
                                               ("wide_resnet28_10", 0.1, 20), ("pyramidnet272", 0.1, 20)])
def test_per_architecture_lr_exceptions(tmp_path, model, lr, warmup):
    """Item 4 (parser_params.py, 300 epochs)."""
    config = TrainConfig(model=model, out=str(tmp_path), data=cifar_folder(tmp_path, "cifar-100-python"))
    resolved = recipe.resolve(config, "cifar100")
    assert (resolved.lr, resolved.warmup_epochs, resolved.cot_warmup_epochs) == (lr, warmup, 40)


def test_imagenet_recipe(tmp_path):
    """Item 5: wd 5e-5 for ResNet-50, 5-epoch warm-up, floor 1e-5, label smoothing 0.1, co-training warm-up 60."""
    run = run_of(tmp_path, imagenet_folder(tmp_path), model="resnet50_d", branches=2, epochs=120, batch_size=256)
    assert run["recipe"]["name"] == "imagenet" and run["recipe"]["official"]
    assert run["optimizer"]["base_weight_decay"] == 5e-5 and run["optimizer"]["groups"][0]["weight_decay"] == 5e-5
    assert run["lr_schedule"]["warmup_epochs"] == 5 and run["lr_schedule"]["floor"] == 1e-5
    assert run["lr_schedule"]["peak"] == 0.1 and run["steps_per_epoch"] == 1_281_167 // 256
    assert run["label_smoothing"] == 0.1 and run["cotrain"]["warmup_epochs"] == 60
    assert run["augmentation"]["config"]["crop"] == "resized"
    assert run["augmentation"]["config"]["policy"] == "autoaugment_imagenet"
    assert run["augmentation"]["config"]["erase_scale"] == [0.05, 0.12]
    assert run["departures"] == []
    wide = recipe.resolve(TrainConfig(model="wide_resnet50_2_d", out="x", branches=2, epochs=120), "imagenet")
    assert wide.base_weight_decay == 1e-4 and wide.weight_decay == pytest.approx(1e-4 * math.exp(-0.5))


@pytest.mark.parametrize("layout, dataset, policy, scale", [
    ("cifar-10-batches-py", "cifar10", "autoaugment", [0.125, 0.2]),
    ("cifar-100-python", "cifar100", "autoaugment", [0.0625, 0.1]),
])
def test_cifar_augmentation_follows_the_dataset(tmp_path, layout, dataset, policy, scale):
    """Item 6: AutoAugment on CIFAR-10 always and CIFAR-100 (released script); erasing scale per dataset."""
    run = run_of(tmp_path, cifar_folder(tmp_path, layout), branches=4)
    assert run["recipe"]["name"] == dataset
    assert run["augmentation"]["config"]["policy"] == policy and run["augmentation"]["config"]["erase_scale"] == scale
    assert run["augmentation"]["pipeline_per_branch"][0] == "random_crop(padding=4)"
    explicit = run_of(tmp_path, cifar_folder(tmp_path, layout), augment={"policy": "none"})
    assert explicit["augmentation"]["config"]["policy"] == "none"
    assert "augment.policy='none' set explicitly" in explicit["departures"]


def test_image_folders_are_identified_by_their_classes_or_need_a_recipe(tmp_path):
    from divco.data.sources import identify_classes, identify_dataset

    assert identify_classes(["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                             "truck"]) == "cifar10"
    assert identify_dataset(imagenet_folder(tmp_path)) == "imagenet"
    other = tmp_path / "flowers"
    for split in ("train", "test"):
        (other / split / "rose").mkdir(parents=True)
    with pytest.raises(ValueError, match="pass --recipe cifar10|cifar100|imagenet"):
        run_of(tmp_path, str(other))


def test_lr_is_official_at_any_batch_and_linear_scaling_is_an_option(tmp_path):
    """Item 9: lr 0.1 at any batch size; the official linear rule scales lr AND momentum."""
    data = cifar_folder(tmp_path, "cifar-100-python")
    assert run_of(tmp_path, data, batch_size=512)["optimizer"]["lr"] == 0.1
    linear = run_of(tmp_path, data, batch_size=512, lr_scaling="linear")["optimizer"]
    assert linear["lr"] == pytest.approx(0.4) and linear["momentum"] == pytest.approx(0.9 ** 4)
    only_lr = run_of(tmp_path, data, batch_size=512, lr_scaling="linear_lr_only")["optimizer"]
    assert only_lr["lr"] == pytest.approx(0.4) and only_lr["momentum"] == 0.9


@pytest.mark.parametrize("epochs, lr_warmup, cot_warmup", [(300, 20, 40), (1800, 60, 80), (30, 2, 4), (150, 10, 20)])
def test_warmups_are_the_official_counts_at_official_lengths(tmp_path, epochs, lr_warmup, cot_warmup):
    """Item 10: 300-epoch runs use 20 and 40; other lengths scale (the value used is reported)."""
    run = run_of(tmp_path, cifar_folder(tmp_path, "cifar-100-python"), branches=2, epochs=epochs)
    assert run["lr_schedule"]["warmup_epochs"] == lr_warmup and run["cotrain"]["warmup_epochs"] == cot_warmup
    assert run["lr_schedule"]["warmup_steps"] == lr_warmup * (50_000 // 128)


def test_weight_decay_division_where_the_paper_applies_it(tmp_path):
    data = cifar_folder(tmp_path, "cifar-100-python")
    assert run_of(tmp_path, data, branches=4)["optimizer"]["groups"][0]["weight_decay"] == 5e-4
    wrn40 = run_of(tmp_path, data, model="wide_resnet40_10", branches=4, epochs=1800)["optimizer"]
    assert wrn40["groups"][0]["weight_decay"] == pytest.approx(5e-4 * math.exp(-0.75))
    forced = run_of(tmp_path, data, branches=4, divide_weight_decay=True)["optimizer"]["groups"][0]
    assert forced["weight_decay"] == pytest.approx(5e-4 * math.exp(-0.75))
    cifar10 = run_of(tmp_path, cifar_folder(tmp_path, "cifar-10-batches-py"), branches=4)["optimizer"]["groups"][0]
    assert cifar10["weight_decay"] == pytest.approx(5e-4 * math.exp(-0.75))  # Table III divides


def test_bn_exemption_is_an_option(tmp_path):
    run = run_of(tmp_path, cifar_folder(tmp_path, "cifar-100-python"), exempt_norm_weight_decay=True)
    assert "bn1.weight" in run["optimizer"]["groups"][1]["names"]
    assert "exempt_norm_weight_decay=True set explicitly" in run["departures"]


@needs_torchvision
def test_digits_use_the_quick_preset_with_the_previous_defaults(tmp_path):
    run = run_of(tmp_path, "digits", model="wide_resnet16_2", branches=4, epochs=15, batch_size=32)
    assert run["recipe"] == {"name": "quick", "official": False, "identified_dataset": "digits",
                             "chosen": "identified from --data"}
    assert run["optimizer"]["lr"] == pytest.approx(0.025) and run["lr_schedule"]["warmup_epochs"] == 1.0
    assert run["cotrain"]["warmup_epochs"] == 2 and run["augmentation"]["config"]["policy"] == "none"
    assert run["optimizer"]["groups"][0]["weight_decay"] == pytest.approx(1e-4 * math.exp(-0.75))
    assert "bn1.weight" in run["optimizer"]["groups"][1]["names"]
    json.dumps(run)  # JSON-ready


@needs_torchvision
def test_print_config_keys_are_stable():
    """docs/TRAINING.md lists these keys; changing them is an API change."""
    readme = (Path(divco.__file__).parent.parent / "docs" / "TRAINING.md").read_text()
    keys = ["recipe", "model", "epochs", "batch_size", "train_images", "steps_per_epoch", "optimizer", "lr_schedule",
            "cotrain", "augmentation", "mixup", "label_smoothing", "precision", "execution", "departures"]
    run = describe(plan_from_config(TrainConfig(model="wide_resnet16_2", out="x", epochs=3, batch_size=32)))
    assert list(run) == keys
    for key in keys:
        assert f"`{key}`" in readme, key


@needs_torchvision
def test_cli_print_config_prints_the_resolved_run_and_trains_nothing(tmp_path):
    import subprocess
    import sys

    out = tmp_path / "run"
    command = [sys.executable, "-m", "divco", "train", "--model", "wide_resnet28_10", "--branches", "4", "--data",
               cifar_folder(tmp_path, "cifar-100-python"), "--out", str(out), "--print-config"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    run = json.loads(done.stdout)
    assert run["recipe"]["name"] == "cifar100" and run["optimizer"]["lr"] == 0.1
    assert run["lr_schedule"]["warmup_epochs"] == 20 and run["cotrain"]["warmup_epochs"] == 40
    assert not out.exists()  # nothing trained, no run folder
    quick = subprocess.run(command[:9] + ["digits", "--out", str(out), "--print-config", "--lr-scaling", "linear",
                                          "--batch-size", "256"], capture_output=True, text=True, timeout=120)
    assert json.loads(quick.stdout)["optimizer"]["momentum"] == pytest.approx(0.81)
