"""--branch-parallel through the real engine and CLI (torchrun, gloo on the CPU) equals one process.

Two torchrun launches (tests/train/branch_parallel_worker.py runs several commands per launch) and a few
one-process runs in this process, all on the digits at 8x8 through WRN-16-4 divided by S = 2:

- P = 2, G = 2 trains what one process training both branches trains (weights, optimiser state, metrics);
- a one-process checkpoint written in the middle of an epoch resumes branch-parallel, and a branch-parallel
  checkpoint resumes in one process, both ending where the uninterrupted run ends;
- ``--method independent`` at P = 2, G = 2 equals its one-process run;
- P = 4, G = 2 x D = 2 equals a two-process DDP run (the same data shards);
- ``divco eval --branch-parallel`` (torchrun) and ``--devices cpu,cpu`` (one process) equal ``divco eval``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch

from divco.cli import main
from divco.train import engine
from divco.train.checkpoint import load_checkpoint
from divco.train.config import TrainConfig
from divco.train.run_log import read_metrics

from train_helpers import REPO, subprocess_env, tiny_config

pytestmark = pytest.mark.slow

SIZES = dict(branches=2, epochs=2, batch_size=8, train_subset=32, test_subset=16, device="cpu")
#: The same run on the command line.
ARGV = ["--model", "wide_resnet16_4", "--data", "digits", "--image-size", "8", "--crop-padding", "1",
        "--val-split", "0", "--branches", "2", "--epochs", "2", "--batch-size", "8", "--train-subset", "32",
        "--test-subset", "16", "--device", "cpu", "--no-progress", "--no-tensorboard"]
FINAL = "checkpoint-e0002-s000000.pt"
TOLERANCE = 2e-5  # float32: the shard's kernels see S/G branches, the one-process model's S
MEASURED = ("images_per_s", "epoch_time_s", "eval_time_s")


def torchrun(processes: int, jobs: list[dict], folder) -> None:
    spec = folder / f"jobs-{processes}.json"
    spec.write_text(json.dumps(jobs))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               str(REPO / "tests" / "train" / "branch_parallel_worker.py"), str(spec)]
    done = subprocess.run(command, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"stdout:\n{done.stdout[-2000:]}\nstderr:\n{done.stderr[-4000:]}"


def train_job(out, *extra) -> dict:
    return {"argv": ["train", *ARGV, "--out", str(out), *extra], "stdout": None}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every run of this module, trained once."""
    folder = tmp_path_factory.mktemp("branch-parallel")
    one = folder / "one"
    assert main(["train", *ARGV, "--out", str(one)]) == 0
    assert main(["train", *ARGV, "--method", "independent", "--out", str(folder / "independent")]) == 0
    # a one-process run stopped after step 2 of epoch 1, to be resumed branch-parallel
    stopped = engine.train(tiny_config(folder / "to-resume-bp", **SIZES), should_stop=lambda e, s: e == 0 and s == 2)
    assert stopped.interrupted == "stop request" and stopped.checkpoint.name == "checkpoint-e0000-s000002.pt"
    assert not saved_config(one).run_defining_differences(saved_config(folder / "to-resume-bp"))  # the same run
    torchrun(2, [
        train_job(folder / "bp2", "--branch-parallel", "2"),
        train_job(folder / "independent-bp2", "--method", "independent", "--branch-parallel", "2"),
        train_job(folder / "ddp2"),
        train_job(folder / "to-resume-bp", "--branch-parallel", "2", "--resume"),
        {"argv": ["eval", str(one / FINAL), "--device", "cpu", "--branch-parallel", "--json", "--no-temperature"],
         "stdout": str(folder / "eval-bp.json")},
    ], folder)
    torchrun(4, [train_job(folder / "bp4", "--branch-parallel", "2")], folder)
    # the branch-parallel run's epoch-1 checkpoint, resumed in one process
    shutil.copytree(folder / "bp2", folder / "bp2-resumed-in-one")
    (folder / "bp2-resumed-in-one" / FINAL).unlink()
    assert main(["train", *ARGV, "--out", str(folder / "bp2-resumed-in-one"), "--resume"]) == 0
    return folder


def saved_config(run) -> TrainConfig:
    values = json.loads((run / "config.json").read_text())
    values.pop("resolved")
    return TrainConfig.from_dict(values)


def weights_difference(a, b) -> float:
    """The largest difference of the model weights and the optimiser's momentum of two checkpoints
    (printed: ``pytest -s`` shows the numbers docs/BRANCH_PARALLEL.md quotes)."""
    first, second = load_checkpoint(a), load_checkpoint(b)
    assert first["model"].keys() == second["model"].keys()
    worst = max((first["model"][k].double() - second["model"][k].double()).abs().max().item() for k in first["model"])
    for index, entry in first["optimizer"]["state"].items():
        for name, value in entry.items():
            if isinstance(value, torch.Tensor):
                other = second["optimizer"]["state"][index][name]
                worst = max(worst, (value.double() - other.double()).abs().max().item())
    print(f"\n{a.parent.name} vs {b.parent.name}: largest weight/momentum difference {worst:.3g}")
    return worst


def assert_same_records(folder_a, folder_b) -> None:
    a, b = read_metrics(folder_a), read_metrics(folder_b)
    assert [r["epoch"] for r in a] == [r["epoch"] for r in b] == [1, 2]
    for first, second in zip(a, b):
        for key in first:
            if key in MEASURED:
                continue
            x, y = first[key], second[key]
            if isinstance(x, float):
                assert y == pytest.approx(x, rel=TOLERANCE, abs=TOLERANCE), key
            elif isinstance(x, list) and x and isinstance(x[0], float):
                assert y == pytest.approx(x, rel=TOLERANCE, abs=TOLERANCE), key
            elif not isinstance(x, (dict, list)):
                assert x == y, key


def test_two_branch_shards_train_what_one_process_trains(runs):
    assert weights_difference(runs / "one" / FINAL, runs / "bp2" / FINAL) <= TOLERANCE
    assert_same_records(runs / "one", runs / "bp2")
    state = load_checkpoint(runs / "bp2" / FINAL)  # the one-process format, with the layout that wrote it
    assert state["branch_parallel"] == 2 and state["world_size"] == 2 and state["model_info"]["branches"] == 2


def test_a_one_process_checkpoint_resumes_branch_parallel_mid_epoch(runs):
    assert weights_difference(runs / "one" / FINAL, runs / "to-resume-bp" / FINAL) <= TOLERANCE
    assert_same_records(runs / "one", runs / "to-resume-bp")


def test_a_branch_parallel_checkpoint_resumes_in_one_process(runs):
    assert weights_difference(runs / "one" / FINAL, runs / "bp2-resumed-in-one" / FINAL) <= TOLERANCE
    assert_same_records(runs / "one", runs / "bp2-resumed-in-one")


def test_independent_networks_train_branch_parallel(runs):
    assert weights_difference(runs / "independent" / FINAL, runs / "independent-bp2" / FINAL) <= TOLERANCE
    assert_same_records(runs / "independent", runs / "independent-bp2")


def test_two_branch_groups_of_two_data_shards_equal_two_process_ddp(runs):
    assert weights_difference(runs / "ddp2" / FINAL, runs / "bp4" / FINAL) <= TOLERANCE
    assert_same_records(runs / "ddp2", runs / "bp4")
    assert all(r["train_images"] == 32 for r in read_metrics(runs / "bp4"))  # each image counted once


def test_branch_parallel_and_multi_device_evaluation_equal_one_process(runs, capsys):
    checkpoint = str(runs / "one" / FINAL)
    reports = []
    for extra in ([], ["--devices", "cpu,cpu"]):
        assert main(["eval", checkpoint, "--device", "cpu", "--json", "--no-temperature", *extra]) == 0
        reports.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1]))
    reports.append(json.loads((runs / "eval-bp.json").read_text().strip().splitlines()[-1]))
    plain, *spread = reports
    for other in spread:
        assert other["test_branch_acc"] == plain["test_branch_acc"]
        assert other["test_nll"] == pytest.approx(plain["test_nll"], abs=1e-6)
        for mode, value in plain["test_ensembles"].items():
            assert other["test_ensembles"][mode] == pytest.approx(value, abs=1e-6), mode
