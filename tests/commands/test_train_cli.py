"""The command-line contract: divco train / eval / export / compare (what scripts rely on)."""

from __future__ import annotations

import json

import pytest

from divco.cli import main
from divco.train import load_branch, load_checkpoint, read_metrics

TINY = ["--model", "wide_resnet16_4", "--data", "digits", "--image-size", "8", "--crop-padding", "1",
        "--train-subset", "32", "--test-subset", "32", "--batch-size", "16", "--device", "cpu", "--no-tensorboard",
        "--val-split", "0"]  # the numbers below were pinned without a validation split (tests/train/test_validation.py)


@pytest.fixture
def cache(tmp_path):
    return ["--cache-dir", str(tmp_path / "cache")]


def test_train_eval_export(tmp_path, capsys, cache):
    out = tmp_path / "run"
    code = main(["train", *TINY, *cache, "--branches", "2", "--epochs", "2", "--seed", "3", "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "ensemble mean_logits" in captured.out and "branch 1" in captured.out
    records = read_metrics(out)
    assert len(records) == 2
    for record in records:
        for field in ("epoch", "train_loss", "test_ensemble_acc", "test_branch_acc", "images_per_s",
                      "test_brier", "test_adaptive_ece", "test_aurc", "test_branch_aurc"):
            assert field in record
        assert len(record["test_branch_acc"]) == 2
    assert load_checkpoint(out / "best.pt")["config"]["seed"] == 3

    # eval prints the same numbers as the run's last record
    checkpoint = out / "checkpoint-e0002-s000000.pt"
    assert main(["eval", str(checkpoint), "--json", "--device", "cpu", *cache]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["test_ensemble_acc"] == pytest.approx(records[-1]["test_ensemble_acc"])
    assert result["test_branch_acc"] == pytest.approx(records[-1]["test_branch_acc"])
    for field in ("test_brier", "test_adaptive_ece", "test_aurc"):
        assert result[field] == pytest.approx(records[-1][field])
    scaling = result["temperature_scaling"]  # fitted on 16 of the 32 test images, reported on the others
    assert (scaling["fit_images"], scaling["eval_images"]) == (16, 16) and len(scaling["branches"]) == 2
    assert "max_probs" in scaling["ensembles"] and "max_probs" in result["test_ensembles"]
    assert main(["eval", str(checkpoint), "--device", "cpu", *cache]) == 0
    table = capsys.readouterr().out
    assert "ensemble max_probs" in table and "pairwise disagreement" in table and "AURC %" in table
    assert "temperature scaling: T fitted on 16 test images, metrics on the other 16 (seed 0)" in table
    assert main(["eval", str(checkpoint), "--device", "cpu", "--no-temperature", "--json", *cache]) == 0
    assert "temperature_scaling" not in json.loads(capsys.readouterr().out)

    # export one branch, then all
    target = tmp_path / "b1.safetensors"
    assert main(["export", str(checkpoint), "--branch", "1", "--out", str(target)]) == 0
    assert capsys.readouterr().out.strip() == str(target)
    assert load_branch(target).branches == 1
    assert main(["export", str(checkpoint), "--out", str(tmp_path / "all")]) == 0
    assert sorted(p.name for p in (tmp_path / "all").iterdir()) == ["branch0.safetensors", "branch1.safetensors"]

    # resume with the same command: the run is complete, nothing changes
    assert main(["train", *TINY, *cache, "--branches", "2", "--epochs", "2", "--seed", "3", "--out", str(out),
                 "--resume"]) == 0
    assert read_metrics(out) == records


@pytest.mark.parametrize("arguments, message", [
    (["--model", "wide_resnet99_9"], "unknown model 'wide_resnet99_9'"),
    (["--lr", "-1"], "lr must be a finite number > 0"),
    (["--data", "/definitely/not/here"], "/definitely/not/here does not exist"),
    (["--batch-size", "0"], "batch_size must be an int >= 1"),
])
def test_bad_arguments_give_a_message_and_status_2(tmp_path, capsys, cache, arguments, message):
    argv = ["train", *TINY, *cache, "--epochs", "1", "--out", str(tmp_path / "run"), *arguments]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("divco train: error:") and message in err and "Traceback" not in err


def test_resume_with_other_branches_is_refused(tmp_path, capsys, cache):
    out = tmp_path / "run"
    assert main(["train", *TINY, *cache, "--branches", "2", "--epochs", "1", "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["train", *TINY, *cache, "--branches", "4", "--epochs", "1", "--out", str(out), "--resume"]) == 2
    assert "branches=4 (this run: 2)" in capsys.readouterr().err


def test_compare_prints_the_s1_versus_s2_table(tmp_path, capsys, cache):
    out = tmp_path / "cmp"
    argv = ["compare", *TINY, *cache, "--branches", "1", "2", "--epochs", "1", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    table = capsys.readouterr().out
    rows = [line for line in table.splitlines() if line.startswith("| 1 |") or line.startswith("| 2 |")]
    assert len(rows) == 2 and "ensemble acc %" in table
    assert (out / "compare.md").read_text().strip() == table.strip()
    saved = json.loads((out / "compare.json").read_text())
    assert [r["branches"] for r in saved] == [1, 2] and saved[0]["test_disagreement"] is None
    # running it again reuses the finished runs
    assert main(argv + ["--json"]) == 0
    assert json.loads(capsys.readouterr().out)[1]["test_ensemble_acc"] == saved[1]["test_ensemble_acc"]
    assert load_checkpoint(out / "S2" / "best.pt")["model_info"]["branches"] == 2


def test_usage_errors_are_one_line(tmp_path, capsys):
    # `--branches abc` printed the whole usage block
    with pytest.raises(SystemExit) as exit:
        main(["train", *TINY, "--branches", "abc", "--out", str(tmp_path / "run")])
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == ["divco train: error: argument --branches: invalid int value: 'abc' "
                                        "(see divco train --help)"]
    assert not (tmp_path / "run").exists()


def test_errors_speak_command_line_options(tmp_path, capsys, cache):
    out = tmp_path / "run"
    assert main(["train", *TINY, *cache, "--epochs", "1", "--out", str(out), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["train", *TINY, *cache, "--epochs", "1", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "pass --resume to continue it, or choose another --out" in err and "resume=True" not in err
    assert main(["train", *TINY, *cache, "--epochs", "1", "--out", str(tmp_path / "b"),
                 "--model-kwargs", '{"dropout": "high"}']) == 2
    err = capsys.readouterr().err
    assert err.startswith("divco train: error: --model-kwargs {\"dropout\": \"high\"} does not fit") and \
        len(err.strip().splitlines()) == 1
    assert not (tmp_path / "b").exists()  # a failed start leaves no empty run folder
    # eval of a run folder: its best checkpoint
    assert main(["eval", str(out), "--device", "cpu", *cache]) == 0
    assert capsys.readouterr().out.startswith(f"{out / 'best.pt'}: wide_resnet16_4 x1 after 1 epoch(s)")
