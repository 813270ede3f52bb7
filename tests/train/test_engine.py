"""train(): end-to-end learning, bit-exact resume, signals, refusals, distributed (gloo)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
import torch
from optional_deps import needs_torchvision
from train_helpers import REPO, subprocess_env, tiny_config

from divco.data import AugmentConfig
from divco.vocabulary import ENSEMBLE_MODES
from divco.train import (
    TIMING_FIELDS,
    TrainConfig,
    list_checkpoints,
    load_checkpoint,
    read_metrics,
    train,
)
from divco.train.evaluate_checkpoint import evaluate_checkpoint


def without_timing(records):
    return [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in records]


def test_end_to_end_training_learns_and_records(tmp_path):
    # 4 epochs of WRN-16-4 x2 on 320 digits: enough to learn
    config = tiny_config(tmp_path / "run", epochs=4, batch_size=32, lr=0.1, train_subset=320, test_subset=200)
    result = train(config)
    out = result.out
    assert result.completed and result.epochs_done == 4
    records = read_metrics(out)
    assert [r["epoch"] for r in records] == [1, 2, 3, 4] and records == result.history
    for r in records:
        assert len(r["test_branch_acc"]) == 2 and r["images_per_s"] > 0 and r["train_images"] == 320
        assert set(r["test_ensembles"]) == set(ENSEMBLE_MODES)  # max_probs (the official max after softmax) too
        assert 0.0 <= r["test_disagreement"] <= 1.0
    # it learns: the loss falls and the ensemble beats chance (10 %) by far
    assert records[-1]["train_loss"] < records[0]["train_loss"]
    assert records[-1]["test_ensemble_acc"] > 0.4
    # the schedule: warm-up then cosine down to the floor at the last step
    assert records[-1]["lr"] == pytest.approx(1e-4)
    # files: the last 3 epoch checkpoints, best.pt, config.json
    assert [p.name for p in list_checkpoints(out)] == [f"checkpoint-e000{e}-s000000.pt" for e in (2, 3, 4)]
    best = load_checkpoint(out / "best.pt")
    assert best["best"]["test_ensemble_acc"] == max(r["test_ensemble_acc"] for r in records)
    stored = json.loads((out / "config.json").read_text())
    resolved = stored.pop("resolved")  # the recipe values used (warm-ups stored)
    assert stored == config.to_dict()
    assert resolved["recipe"] == "quick" and resolved["warmup_epochs"] == result.info["resolved"]["warmup_epochs"]
    assert "acc %" in result.final.table() and "pairwise disagreement" in result.final.table()
    # evaluating the saved checkpoint reproduces the recorded test metrics
    evaluation, description = evaluate_checkpoint(result.checkpoint, device="cpu")
    assert description["epochs_done"] == 4 and evaluation.images == 200
    assert flatten(evaluation.to_dict()) == pytest.approx(flatten(records[-1]), rel=1e-6, abs=1e-9)


def flatten(record: dict) -> dict:
    """Numbers of a test record by path, e.g. "test_ensembles.max.nll" or "test_branch_acc.1"."""
    out = {}

    def visit(prefix, value):
        if isinstance(value, dict):
            for k, v in value.items():
                visit(f"{prefix}.{k}" if prefix else k, v)
        elif isinstance(value, list):
            for i, v in enumerate(value):
                visit(f"{prefix}.{i}", v)
        elif prefix.startswith("test_"):
            out[prefix] = value

    visit("", record)
    return out


def resume_config(out, **overrides):
    # RandAugment, erasing and mixup on: every random stream must resume exactly.
    augment = AugmentConfig(crop_padding=1, policy="randaugment", erase_p=0.5, mixup_alpha=0.2)
    return tiny_config(out, epochs=3, train_subset=48, augment=augment, **overrides)


@needs_torchvision
def test_resume_after_an_epoch_and_mid_epoch_is_bit_exact(tmp_path):
    reference = train(resume_config(tmp_path / "straight"))
    # stop after epoch 1 (3 steps of 16), resume, stop 2 steps into epoch 3, resume to the end
    first = train(resume_config(tmp_path / "stopped"), should_stop=lambda epoch, steps: epoch == 0 and steps == 3)
    assert first.interrupted == "stop request" and first.epochs_done == 1
    second = train(resume_config(tmp_path / "stopped", resume=True),
                   should_stop=lambda epoch, steps: epoch == 2 and steps == 2)
    assert second.interrupted and second.checkpoint.name == "checkpoint-e0002-s000002.pt"
    final = train(resume_config(tmp_path / "stopped", resume=True))
    assert final.completed and final.epochs_done == 3
    assert without_timing(read_metrics(tmp_path / "stopped")) == without_timing(read_metrics(tmp_path / "straight"))
    a, b = load_checkpoint(reference.checkpoint), load_checkpoint(final.checkpoint)
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    momentum_a = [s["momentum_buffer"] for s in a["optimizer"]["state"].values()]
    momentum_b = [s["momentum_buffer"] for s in b["optimizer"]["state"].values()]
    assert all(torch.equal(x, y) for x, y in zip(momentum_a, momentum_b))
    # resuming a finished run does nothing and reports its results
    again = train(resume_config(tmp_path / "stopped", resume=True))
    assert again.completed and again.epochs_done == 3 and again.final.ensemble_acc == final.final.ensemble_acc


def test_resume_refuses_other_options_and_runs_are_never_overwritten(tmp_path):
    run = tmp_path / "run"
    config = tiny_config(run, epochs=3, train_subset=32, keep_checkpoints=2)
    train(config)
    with pytest.raises(ValueError, match=r"branches=4 \(this run: 2\)"):
        train(config.replace(out=str(run), branches=4, resume=True))
    with pytest.raises(ValueError, match=r"already holds a training run; pass resume=True"):
        train(config.replace(out=str(run)))
    # a truncated newest checkpoint: a clear error, and the previous one is still there and loads
    newest = list_checkpoints(run)[-1]
    newest.write_bytes(newest.read_bytes()[:5000])
    with pytest.raises(ValueError, match=r"checkpoint-e0003-s000000\.pt is truncated or corrupt.*"
                                         r"checkpoint-e0002-s000000\.pt is intact"):
        train(config.replace(out=str(run), resume=True))
    assert load_checkpoint(run / "checkpoint-e0002-s000000.pt")["epochs_done"] == 2


@pytest.mark.parametrize("change, message", [
    (dict(lr=-0.1), r"lr must be a finite number > 0"),
    (dict(model="wide_resnet_17_3"), r"unknown model 'wide_resnet_17_3'"),
    (dict(branches=0), r"branches must be an int >= 1"),
    (dict(epochs=0), r"epochs must be an int >= 1"),
    (dict(precision="fp8"), r"precision must be one of"),
    (dict(device="tpu"), r"device must be one of"),
    (dict(cot_kind="mse"), r"cot_kind must be one of"),
    (dict(warmup_epochs=5.0), r"warmup_epochs must be < epochs \(2\)"),
])
def test_bad_options_are_named(tmp_path, change, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(tmp_path, **change)


@pytest.mark.parametrize("change, message", [
    (dict(batch_size=128), r"batch_size 128 exceeds the 64 training images"),
    (dict(precision="fp16", device="cpu"), r"fp16' needs a CUDA device"),
    (dict(sync_bn=True, device="cpu"), r"sync_bn needs a distributed run on CUDA"),
    (dict(data="/no/such/folder"), r"/no/such/folder does not exist"),
])
def test_impossible_runs_fail_before_training(tmp_path, change, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        train(tiny_config(tmp_path / "run", **change))
    assert not list_checkpoints(tmp_path / "run")


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    pytest.importorskip("torchvision", reason="the digits data are resized by torchvision (divco[vision])")
    out = tmp_path / "run"
    command = [sys.executable, "-m", "divco", "train", "--model", "wide_resnet16_4", "--branches", "2",
               "--data", "digits", "--image-size", "8", "--crop-padding", "1", "--train-subset", "64",
               "--test-subset", "32", "--epochs", "50", "--batch-size", "16", "--out", str(out), "--device", "cpu"]
    child = subprocess.Popen(command, cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    try:
        deadline = time.monotonic() + 120
        while not list_checkpoints(out) and time.monotonic() < deadline and child.poll() is None:
            time.sleep(0.2)  # wait for the first epoch's checkpoint: training is under way
        assert list_checkpoints(out), "no checkpoint appeared"
        time.sleep(1.0)  # most likely inside epoch 2 now: the stop then checkpoints that very step
        child.send_signal(signal.SIGTERM)
        stdout, stderr = child.communicate(timeout=120)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == 128 + signal.SIGTERM, stderr
    assert "Traceback" not in stderr and "SIGTERM" in stderr and "--resume" in stderr
    newest = list_checkpoints(out)[-1]
    state = load_checkpoint(newest)
    # the newest checkpoint is where the run stopped: a step of epoch 2 or later, or the end of an
    # epoch when the signal came between its last step and its checkpoint
    assert (state["epochs_done"], state["steps_into_epoch"]) >= (1, 0)
    assert str(newest) in stderr
    # and the run continues from it
    config = TrainConfig.from_dict(state["config"]).replace(resume=True, progress=False)
    resumed = train(config, should_stop=lambda epoch, steps: True)
    assert resumed.interrupted == "stop request"
    latest = load_checkpoint(resumed.checkpoint)
    done = lambda s: s["epochs_done"] * 4 + s["steps_into_epoch"]  # noqa: E731  (4 steps per epoch)
    assert done(latest) == done(state) + 1


@pytest.mark.slow
def test_distributed_gloo_two_processes(tmp_path):
    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "divco",
               "train", "--model", "wide_resnet16_4", "--branches", "2", "--data", "digits", "--image-size", "8",
               "--crop-padding", "1", "--train-subset", "64", "--test-subset", "32", "--epochs", "2",
               "--batch-size", "16", "--out", str(out), "--device", "cpu", "--no-progress"]
    done = subprocess.run(command, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"stdout:\n{done.stdout[-2000:]}\nstderr:\n{done.stderr[-4000:]}"
    records = read_metrics(out)
    assert [r["epoch"] for r in records] == [1, 2]  # rank 0 alone writes the log
    assert all(r["train_images"] == 64 for r in records)  # both shards counted
    state = load_checkpoint(out / "checkpoint-e0002-s000000.pt")
    assert state["world_size"] == 2 and len(state["local_states"]) == 2
    # each process drew its own augmentations
    assert not torch.equal(state["local_states"][0]["augmenter"]["generator"],
                           state["local_states"][1]["augmenter"]["generator"])
    assert done.stdout.count("ensemble mean_logits") == 1  # one table, from rank 0


@pytest.mark.gpu
@pytest.mark.parametrize("compile", [False, True])
def test_cuda_training_bf16_channels_last(tmp_path, compile):
    config = tiny_config(tmp_path / "run", device="cuda", image_size=32, batch_size=32, train_subset=128,
                         branches=4, compile=compile)
    result = train(config)
    assert result.completed and result.info["precision"] == "bfloat16" and result.info["channels_last"]
    assert result.info["execution"] == "auto"  # resolves to batched on CUDA
    for record in result.history:
        assert all(0.0 <= a <= 1.0 for a in record["test_branch_acc"]) and record["train_loss"] > 0
    # the checkpoint loads on the CPU and evaluates there
    evaluation, _ = evaluate_checkpoint(result.checkpoint, device="cpu")
    assert abs(evaluation.ensemble_acc - result.history[-1]["test_ensemble_acc"]) <= 2 / 32  # bf16 vs fp32
