"""divco train --method snapshot|cbnn, then divco eval RUN_DIR (members + weighted ensemble) and divco export."""

from __future__ import annotations

import json

import pytest
import torch

from divco.cli import main
from divco.data import Normalize, load_dataset
from divco.ensembles import ensemble_probabilities
from divco.train import load_branch
from divco.train.evaluation import predict
from divco.train.members import load_members

TINY = ["--model", "wide_resnet16_1", "--data", "digits", "--image-size", "8", "--crop-padding", "1",
        "--train-subset", "32", "--test-subset", "32", "--batch-size", "16", "--device", "cpu", "--no-tensorboard",
        "--no-progress"]


def test_cbnn_train_eval_json_and_export(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *TINY, "--method", "cbnn", "--epochs", "2", "--checkpoints", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "cbnn ensemble of 2 member(s)" in printed and "ensemble (mean_probs)" in printed

    assert main(["eval", str(out), "--json", "--device", "cpu"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["method"] == "cbnn" and report["complete"] and report["images"] == 32
    assert [m["file"] for m in report["members"]] == ["member-01.pt", "member-02.pt"]
    for member in report["members"]:
        assert {"accuracy", "weight", "nll", "ece", "alpha", "error", "epochs_done"} <= set(member)
    assert sum(m["weight"] for m in report["members"]) == pytest.approx(1.0)
    assert {"accuracy", "nll", "ece", "weights", "mode"} <= set(report["ensemble"])
    assert len(report["disagreement_matrix"]) == 2

    # the ensemble is the alpha-weighted mean of the members' probabilities, member by member
    members = load_members(out)
    data = load_dataset("digits", image_size=8).subset(test=32)
    normalize = Normalize(members.states[0]["dataset"]["mean"], members.states[0]["dataset"]["std"],
                          torch.device("cpu"))
    logits = torch.cat([predict(m, data.test_images, normalize) for m in members.models()], dim=1)
    alphas = [m["alpha"] for m in report["members"]]
    probs = ensemble_probabilities(logits.double(), "mean_probs", alphas)
    accuracy = float((probs.argmax(-1) == data.test_labels).double().mean())
    assert report["ensemble"]["accuracy"] == pytest.approx(accuracy)
    for j, member in enumerate(report["members"]):
        assert member["accuracy"] == pytest.approx(float((logits[:, j].argmax(-1) == data.test_labels).double().mean()))

    # the text form
    assert main(["eval", str(out), "--device", "cpu"]) == 0
    assert "member 2 (epoch 2)" in capsys.readouterr().out

    # export: the stacked members, one ordinary model each, and how to combine them
    assert main(["export", str(out)]) == 0
    capsys.readouterr()
    folder = out / "members-branches"
    combine = json.loads((folder / "ensemble.json").read_text())
    assert combine["weights"] == pytest.approx([m["weight"] for m in report["members"]])
    assert combine["files"] == ["branch0.safetensors", "branch1.safetensors"]
    for j, model in enumerate(members.models()):
        exported = load_branch(folder / f"branch{j}.safetensors")
        x = normalize(data.test_images[:4])
        assert torch.allclose(exported(x).reshape(4, -1), model(x)[:, 0], atol=1e-5)


@pytest.mark.parametrize("arguments, message", [
    (["--method", "snapshot", "--branches", "2"], "branches must be 1, got 2"),
    (["--method", "cbnn", "--checkpoints", "0"], "checkpoints must be an int >= 1, got 0"),
    (["--method", "cbnn", "--epochs", "2"], "checkpoints must be <= epochs (2): each member needs at least one "
                                            "epoch of its own; got 3"),
    (["--method", "cotrain", "--checkpoints", "2"], "checkpoints is an option of the methods snapshot, cbnn and fge"),
])
def test_bad_checkpoint_ensemble_options_are_usage_errors(tmp_path, capsys, arguments, message):
    code = main(["train", *TINY, "--epochs", "3", "--out", str(tmp_path / "run"), *arguments])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("divco train: error:") and message in err, err
    assert not (tmp_path / "run").exists()


def test_print_config_shows_the_member_plan(tmp_path, capsys):
    base = ["train", *TINY, "--epochs", "4", "--out", str(tmp_path / "run"), "--print-config"]
    assert main([*base, "--method", "snapshot", "--checkpoints", "2"]) == 0
    run = json.loads(capsys.readouterr().out)
    assert run["lr_schedule"]["cycles"] == 2 and run["lr_schedule"]["total_steps"] == 8  # 2 steps/epoch
    assert run["checkpoint_ensemble"]["member_iterations"] == [4, 8]
    assert main([*base, "--method", "cbnn", "--cbnn-errors", "probability"]) == 0
    run = json.loads(capsys.readouterr().out)
    assert run["checkpoint_ensemble"]["member_epochs"] == [1, 2, 4]
    assert run["checkpoint_ensemble"]["errors"] == "probability"
    assert run["checkpoint_ensemble"]["max_weight_ratio"] == 4.0  # the damped default
    assert main([*base, "--method", "cbnn", "--cbnn-weight-ratio", "0"]) == 0  # plain SAMME
    assert json.loads(capsys.readouterr().out)["checkpoint_ensemble"]["max_weight_ratio"] is None
    assert not (tmp_path / "run").exists()
