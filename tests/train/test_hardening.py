"""Diverging runs, the run lock, strict resume, write failures, crafted checkpoints."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from train_helpers import REPO, checkpoint_state, subprocess_env, tiny_config

import divco
from divco.io import WriteError, atomic_write_bytes
from divco.train import TrainStep, export_branches, list_checkpoints, load_checkpoint, read_metrics, save_checkpoint
from divco.train import train as run_training
from divco.train.engine import NONFINITE_STOP
from divco.train.evaluate_checkpoint import evaluate_checkpoint
from divco.train.evaluation import metrics_from_logits
from divco.train.run_lock import LOCK_NAME, RunFolderBusy, RunLock


def small(out, **overrides):
    return tiny_config(out, **{**dict(epochs=3, train_subset=32, test_subset=16), **overrides})


def poison_loss(monkeypatch, *, at_calls):
    """Make the co-training loss NaN at the given (1-based) calls, as a diverging run's would be."""
    original, calls = divco.ops.cotrain_loss, [0]

    def poisoned(*args, **kwargs):
        out = original(*args, **kwargs)
        calls[0] += 1
        return out._replace(loss=out.loss * float("nan")) if calls[0] in at_calls else out

    monkeypatch.setattr(divco.ops, "cotrain_loss", poisoned)


# -- item 1: NaN -----------------------------------------------------------------------------------


def test_nan_outputs_give_nan_metrics_not_an_index_error():
    logits = torch.randn(8, 2, 10)
    logits[:3, 0] = float("nan")
    result = metrics_from_logits(logits, torch.arange(8) % 10)
    assert result.branches[0].ece != result.branches[0].ece  # NaN
    assert result.branches[0].nll != result.branches[0].nll
    assert 0 <= result.branches[1].ece <= 1  # the finite branch keeps finite metrics


def test_a_nan_loss_stops_the_run_after_writing_the_epoch(tmp_path, monkeypatch, capsys):
    poison_loss(monkeypatch, at_calls={4})  # epoch 2, step 2 (2 steps per epoch)
    result = run_training(small(tmp_path / "run", keep_checkpoints=1, progress=True))
    assert result.interrupted == NONFINITE_STOP and result.epochs_done == 2
    records = read_metrics(tmp_path / "run")
    assert [r["epoch"] for r in records] == [1, 2]
    assert records[1]["train_nonfinite_steps"] >= 1 and records[1]["train_first_nonfinite_step"] == 2
    assert records[1]["train_loss"] != records[1]["train_loss"]  # NaN recorded, not hidden
    # the diverged epoch is checkpointed, the last good one is kept (despite keep_checkpoints=1), best.pt is good
    names = [p.name for p in list_checkpoints(tmp_path / "run")]
    assert names == ["checkpoint-e0001-s000000.pt", "checkpoint-e0002-s000000.pt"]
    assert load_checkpoint(tmp_path / "run" / "best.pt")["epochs_done"] == 1
    err = capsys.readouterr().err
    assert f"the loss became NaN at epoch 2 step 2; last good checkpoint: {tmp_path / 'run'}" \
           f"/checkpoint-e0001-s000000.pt" in err
    # eval of the NaN weights works (NaN metrics), and so does a resume (which stops again)
    evaluation, _ = evaluate_checkpoint(result.checkpoint, device="cpu")
    assert evaluation.ensembles["mean_logits"].nll != evaluation.ensembles["mean_logits"].nll
    again = run_training(small(tmp_path / "run", keep_checkpoints=1, resume=True))
    assert again.interrupted == NONFINITE_STOP and again.epochs_done == 3


def test_skip_step_leaves_weights_and_momentum_untouched_and_counts_the_step(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = divco.models.create("wide_resnet16_2", num_classes=10, branches=2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)
    step = TrainStep(model, optimizer, cot_weight=torch.tensor(0.5), on_nonfinite="skip-step")
    images, targets = torch.randn(4, 2, 3, 8, 8), torch.arange(4)
    step(images, targets)  # a good step: momentum buffers exist
    before = {k: v.clone() for k, v in model.state_dict().items()}
    momentum = [optimizer.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    poison_loss(monkeypatch, at_calls={1})
    step(images, targets)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # BatchNorm statistics too
    assert all(torch.equal(m, optimizer.state[p]["momentum_buffer"]) for m, p in zip(momentum, model.parameters()))
    step(images, targets)  # applied again
    read = step.metrics.read()
    assert read["train_nonfinite_steps"] == 1 and read["train_first_nonfinite_step"] == 2
    assert read["train_loss"] == read["train_loss"] and read["train_images"] == 12


def test_skip_step_on_the_first_step_matches_a_run_without_that_step():
    def trained(skip_first):
        torch.manual_seed(0)
        model = divco.models.create("wide_resnet16_2", num_classes=10, branches=2)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
        step = TrainStep(model, optimizer, cot_weight=torch.tensor(0.5), on_nonfinite="skip-step")
        images, targets = torch.randn(4, 2, 3, 8, 8), torch.arange(4)
        if skip_first:
            step(images * float("nan"), targets)
        step(images, targets)
        return [t.detach().clone() for t in model.state_dict().values()]

    skipped, plain = trained(True), trained(False)
    assert all(torch.equal(a, b) for a, b in zip(skipped, plain))


# -- item 2: the lock --------------------------------------------------------------------------------


def test_a_second_process_on_a_live_run_is_refused(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from divco.train.run_lock import RunLock; "
                               f"RunLock({str(out)!r}).acquire(); print('locked', flush=True); time.sleep(60)"],
                              cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunFolderBusy, match=rf"{out} is in use by another training process \(pid {holder.pid}"):
            run_training(small(out))
        with pytest.raises(RunFolderBusy):
            run_training(small(out, resume=True))
    finally:
        holder.kill()
        holder.wait()
    # the holder died without unlocking: its lock is stale and taken over, with a message
    messages = []
    with RunLock(out, announce=messages.append):
        assert messages and f"stale lock of process {holder.pid}" in messages[0]
    with RunLock(out, announce=messages.append):  # a cleanly released lock: no message
        assert len(messages) == 1


# -- item 3: strict resume ---------------------------------------------------------------------------


def test_resume_with_another_precision_is_refused(tmp_path):
    run_training(small(tmp_path / "run", epochs=2), should_stop=lambda epoch, steps: True)
    config_before = (tmp_path / "run" / "config.json").read_text()
    with pytest.raises(ValueError, match=r"precision='bf16' \(this run: 'auto'\)"):
        run_training(small(tmp_path / "run", epochs=2, resume=True, precision="bf16"))
    assert (tmp_path / "run" / "config.json").read_text() == config_before


# -- item 4: write failures --------------------------------------------------------------------------


def test_a_file_size_limit_ends_with_one_line_and_leaves_the_run_intact(tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "divco", "train", "--model", "wide_resnet16_4", "--branches", "2",
               "--image-size", "8", "--crop-padding", "1", "--train-subset", "32", "--test-subset", "16",
               "--epochs", "2", "--batch-size", "16", "--out", str(out), "--device", "cpu", "--no-progress",
               "--val-split", "0"]  # as small() trains
    run_training(small(out, epochs=2), should_stop=lambda epoch, steps: epoch == 1)  # epoch 1 done
    good = {p.name: p.read_bytes() for p in list_checkpoints(out)}
    limit = "import resource; resource.setrlimit(resource.RLIMIT_FSIZE, (1_000_000, 1_000_000))"
    done = subprocess.run([sys.executable, "-c", f"{limit}; import sys; from divco.cli import main; "
                           f"sys.exit(main({command[3:] + ['--resume']!r}))"],
                          cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert lines[0].startswith("divco train: error: cannot write checkpoint-e0002-s000000.pt in the folder "
                               f"{out}: File too large"), lines
    assert {p.name: p.read_bytes() for p in list_checkpoints(out)} == good
    assert not [p for p in os.listdir(out) if p.endswith(".tmp")]


def test_write_errors_name_the_file_and_remove_the_temporary(tmp_path, monkeypatch):
    import errno

    def full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    target = tmp_path / "folder" / "file.bin"
    atomic_write_bytes(target, b"old")
    monkeypatch.setattr(os, "fsync", lambda fd: full(fd, b""))
    with pytest.raises(WriteError, match=rf"^cannot write file.bin in the folder {tmp_path / 'folder'}: "
                                         r"No space left on device$"):
        atomic_write_bytes(target, b"new")
    monkeypatch.undo()
    assert target.read_bytes() == b"old" and os.listdir(target.parent) == ["file.bin"]


def test_leftover_temporaries_are_removed_at_the_next_start(tmp_path, capsys):
    out = tmp_path / "run"
    run_training(small(out, epochs=2), should_stop=lambda epoch, steps: True)
    checkpoint = list_checkpoints(out)[-1]
    leftover = out / f".{checkpoint.name}.abc123.tmp"
    os.link(checkpoint, leftover)  # a killed process's hard link, which kept a pruned checkpoint alive
    run_training(small(out, epochs=2, resume=True, progress=True))
    assert not leftover.exists() and "removed .checkpoint-" in capsys.readouterr().err


# -- item 6: checkpoints are validated once ---------------------------------------------------------


CRAFTED = {
    "no weights": lambda s: s.pop("model"),
    "no model_info": lambda s: s.pop("model_info"),
    "no local_states": lambda s: s.pop("local_states"),
    "huge branches": lambda s: s["model_info"].update(branches=100_000),
    "weights of another model": lambda s: s["model_info"].update(name="wide_resnet16_4"),
    "model_kwargs not a dict": lambda s: s["model_info"].update(model_kwargs=[1]),
    "negative epochs_done": lambda s: s.update(epochs_done=-1),
    "epochs_done beyond the run": lambda s: s.update(epochs_done=10**9),
    "string steps": lambda s: s.update(steps_into_epoch="3"),
    "zero std": lambda s: s["dataset"].update(std=[0.0, 0.2, 0.2]),
}


@pytest.mark.parametrize("case", list(CRAFTED))
def test_crafted_checkpoints_get_one_clear_error(tmp_path, case):
    state = checkpoint_state()
    CRAFTED[case](state)
    path = tmp_path / "crafted.pt"
    save_checkpoint(path, state)
    for use in (load_checkpoint, export_branches, lambda p: evaluate_checkpoint(p, device="cpu")):
        with pytest.raises(ValueError, match=r"crafted\.pt is not a divco checkpoint: "):
            use(path)


def test_resume_checks_the_position_against_the_run(tmp_path):
    out = tmp_path / "run"
    run_training(small(out, epochs=2), should_stop=lambda epoch, steps: True)
    newest = list_checkpoints(out)[-1]
    state = load_checkpoint(newest)
    state["steps_into_epoch"] = 10**6
    save_checkpoint(newest, state)
    with pytest.raises(ValueError, match="not a divco checkpoint of this run: it says 0 epoch"):
        run_training(small(out, epochs=2, resume=True))


# -- item 8: small ones -----------------------------------------------------------------------------


def test_model_kwargs_of_the_wrong_type_and_out_naming_a_file(tmp_path):
    with pytest.raises(ValueError, match=r"model_kwargs=.* does not fit wide_resnet16_4"):
        run_training(small(tmp_path / "a", model_kwargs={"dropout": "high"}))
    assert not (tmp_path / "a").exists()  # a failed start leaves no empty run folder
    (tmp_path / "file").write_text("mine")
    with pytest.raises(ValueError, match=rf"out must be a folder, got the file {tmp_path / 'file'}"):
        run_training(small(tmp_path / "file"))
    assert (tmp_path / "file").read_text() == "mine"


def test_eval_and_export_accept_a_run_folder_and_exports_respect_the_umask(tmp_path):
    out = tmp_path / "run"
    run_training(small(out, epochs=1))
    evaluation, description = evaluate_checkpoint(out, device="cpu")
    assert description["checkpoint"] == str(out / "best.pt") and evaluation.images == 16
    previous = os.umask(0o022)
    try:
        paths = export_branches(out, tmp_path / "exported")
    finally:
        os.umask(previous)
    assert [p.stat().st_mode & 0o777 for p in paths] == [0o644, 0o644]
    assert (out / LOCK_NAME).exists() and json.loads((out / "config.json").read_text())["epochs"] == 1


def test_a_run_stopped_by_a_nan_loss_exits_non_zero():
    from divco.commands._train_options import exit_code

    assert exit_code(NONFINITE_STOP) == 1 and exit_code(None) == 0


def test_a_run_folder_that_cannot_be_created_gets_one_line(tmp_path):
    # a read-only parent behaves alike; root ignores permissions, so a file in the path stands in for it
    (tmp_path / "file").write_text("")
    with pytest.raises(WriteError, match=rf"^cannot write in the run folder {tmp_path / 'file' / 'run'}: "
                                         r"Not a directory$"):
        run_training(small(tmp_path / "file" / "run"))
