"""Run folders that refuse or recover instead of losing work: resume without checkpoints, an edited
members.json, a deleted or replaced best.pt, a torn metrics.jsonl, warnings under --no-progress."""

from __future__ import annotations

import json
import re

import pytest
import torch
from train_helpers import checkpoint_state, tiny_config

from divco.train import methods, read_metrics, save_checkpoint
from divco.train import train as run_training
from divco.train.checkpoint import BEST_NAME, checkpoint_name, checkpoint_of, load_checkpoint
from divco.train.run_folder import locked_run_folder
from divco.train.members import MEMBERS_FORMAT, MEMBERS_NAME, load_members, member_name
from divco.train.run_lock import LOCK_NAME
from divco.train.run_log import METRICS_NAME, RunLog

#: The methods whose runs hold member checkpoints, in the registry's order.
MEMBER_TAKERS = tuple(name for name in methods.names() if methods.method_class(name).checkpoint_ensemble)


def small(out, **overrides):
    return tiny_config(out, **{**dict(epochs=2, train_subset=32, test_subset=16), **overrides})


def after_epoch(epochs: int):
    """A stop request at the last step (2 of 2) of epoch ``epochs``: the run stops with that epoch done."""
    return lambda epoch, steps: epoch + 1 == epochs and steps == 2


# -- --resume without a checkpoint -------------------------------------------------------------------


def test_resume_of_an_empty_folder_is_refused_and_leaves_nothing(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    with pytest.raises(ValueError, match=rf"^cannot resume {out}: it holds no checkpoint .* the folder is empty; "
                                         r"run without resume=True"):
        run_training(small(out, resume=True))
    assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]  # no new run started in it
    missing = tmp_path / "missing"
    with pytest.raises(ValueError, match="the folder is empty"):
        run_training(small(missing, resume=True))
    assert not missing.exists()  # a failed start leaves no new folder


@pytest.mark.parametrize("text, problem", [
    ("{not json", r"its config\.json is not valid JSON"),
    ('["a list"]', r"its config\.json is not a JSON object"),
    ('{"model": "no_such_net"}', r"its config\.json is not a divco run configuration"),
    (None, r"its config\.json is of a run stopped before its first checkpoint"),
])
def test_resume_of_a_folder_with_only_a_config_is_refused_and_the_file_kept(tmp_path, text, problem):
    out = tmp_path / "run"
    out.mkdir()
    if text is None:
        text = json.dumps(small(out).to_dict())
    (out / "config.json").write_text(text)
    with pytest.raises(ValueError, match=rf"cannot resume {out}: it holds no checkpoint .*{problem}"):
        run_training(small(out, resume=True))
    assert (out / "config.json").read_text() == text


# -- members.json against its checkpoints -------------------------------------------------------------


def members_folder(tmp_path, method):
    """A run folder with two member checkpoints of a ``method`` run and its members.json."""
    config = tiny_config("x", model="wide_resnet16_2", branches=1, method=method, checkpoints=2, epochs=20)
    entries = []
    for index, alpha in enumerate((0.5, 1.5)):
        entry = {"index": index, "file": member_name(index), "epochs_done": 10 * (index + 1), "steps_into_epoch": 0,
                 "iteration": 40 * (index + 1)}
        if method == "cbnn":
            entry.update(alpha=alpha, error=0.2)
        state = checkpoint_state(float(index), config=config.to_dict(), member={**entry, "errors": None})
        save_checkpoint(tmp_path / member_name(index), state)
        entries.append(entry)
    weights = [0.25, 0.75] if method == "cbnn" else [0.5, 0.5]
    record = {"format": MEMBERS_FORMAT, "method": method, "checkpoints": 2, "complete": True,
              "members": [{**e, "weight": w} for e, w in zip(entries, weights)]}
    (tmp_path / MEMBERS_NAME).write_text(json.dumps(record))
    return record


def edit_members(tmp_path, change):
    record = json.loads((tmp_path / MEMBERS_NAME).read_text())
    change(record)
    (tmp_path / MEMBERS_NAME).write_text(json.dumps(record))


def test_an_intact_members_record_loads_with_its_weights(tmp_path):
    members_folder(tmp_path, "cbnn")
    assert load_members(tmp_path).weights == pytest.approx([0.25, 0.75])


@pytest.mark.parametrize("method, change, message", [
    # snapshot -> cbnn: the entries have no alpha (a KeyError before)
    ("snapshot", lambda r: r.update(method="cbnn"), r"it says method 'cbnn', but member-01\.pt was trained with "
                                                    r"'snapshot'"),
    # cbnn -> snapshot: equal weights instead of the alphas' (silently, before)
    ("cbnn", lambda r: r.update(method="snapshot"), r"it says method 'snapshot', but member-01\.pt was trained "
                                                    r"with 'cbnn'"),
    ("cbnn", lambda r: r["members"][1].update(alpha=9.0), r"member 2 says alpha 9\.0, its checkpoint member-02\.pt "
                                                          r"1\.5"),
    ("cbnn", lambda r: r["members"][0].pop("alpha"), r"member 1 has no 'alpha' \(its checkpoint: 0\.5\)"),
    ("cbnn", lambda r: r["members"][0].update(weight=0.5), r"member 1 says weight 0\.5, its checkpoints give 0\.25"),
    ("snapshot", lambda r: r.update(method="boost"),
     re.escape(f"'method' must be one of {MEMBER_TAKERS}, got 'boost'")),
    ("snapshot", lambda r: r.update(checkpoints=5), r"it says 'checkpoints' 5, but member-01\.pt belongs to a run of "
                                                    r"2 member checkpoints"),
])
def test_an_edited_members_record_gets_one_clear_error(tmp_path, method, change, message):
    members_folder(tmp_path, method)
    edit_members(tmp_path, change)
    with pytest.raises(ValueError, match=rf"^{tmp_path / MEMBERS_NAME} does not match the member checkpoints it "
                                         rf"lists: {message}"):
        load_members(tmp_path)


# -- best.pt ----------------------------------------------------------------------------------------------


def test_eval_of_a_folder_whose_best_is_gone_or_a_directory_says_what_it_uses(tmp_path, capsys):
    for epoch in (1, 2):
        (tmp_path / checkpoint_name(epoch, 0)).write_bytes(b"x")
    newest = tmp_path / checkpoint_name(2, 0)
    assert checkpoint_of(tmp_path) == newest
    assert capsys.readouterr().err.strip() == (f"divco: warning: {tmp_path} has no {BEST_NAME}: using the newest "
                                               f"checkpoint {newest.name} instead")
    (tmp_path / BEST_NAME).mkdir()
    assert checkpoint_of(tmp_path) == newest
    assert capsys.readouterr().err.strip() == (f"divco: warning: {tmp_path / BEST_NAME} is a directory, not a "
                                               f"checkpoint: using the newest checkpoint {newest.name} instead")
    (tmp_path / BEST_NAME).rmdir()
    (tmp_path / BEST_NAME).write_bytes(b"x")
    assert checkpoint_of(tmp_path) == tmp_path / BEST_NAME and capsys.readouterr().err == ""


def test_resume_recreates_a_deleted_best_and_refuses_a_directory_in_its_place(tmp_path, capsys):
    out = tmp_path / "run"
    run_training(small(out, epochs=3, keep_checkpoints=3), should_stop=after_epoch(2))
    best = load_checkpoint(out / BEST_NAME)["best"]
    (out / BEST_NAME).unlink()
    capsys.readouterr()
    assert run_training(small(out, epochs=3, resume=True, keep_checkpoints=3)).completed
    assert (out / BEST_NAME).is_file()  # recreated from the checkpoint of its epoch (or a better epoch 3)
    assert f"{out / BEST_NAME} was missing: recreated from {checkpoint_name(best['epoch'], 0)}" in \
        capsys.readouterr().err
    (out / BEST_NAME).unlink()
    (out / BEST_NAME).mkdir()
    with pytest.raises(ValueError, match=rf"cannot resume {out}: {out / BEST_NAME} is a directory, where the run "
                                         r"keeps its best checkpoint; move it away"):
        run_training(small(out, epochs=3, resume=True, keep_checkpoints=3))
    assert (out / BEST_NAME).is_dir()


def test_a_pruned_best_epoch_is_recreated_from_the_best_kept_one(tmp_path, capsys):
    out = tmp_path / "run"
    run_training(small(out, epochs=4, keep_checkpoints=1), should_stop=after_epoch(3))
    for path in out.glob("checkpoint-*.pt"):
        state = torch.load(path, weights_only=True)
    (out / BEST_NAME).unlink()
    # pretend the best epoch was 1 (pruned): only epoch 3's checkpoint is kept
    state["best"] = {"epoch": 1, "selected_on": "test_ensemble_acc", "test_ensemble_acc": 2.0}
    save_checkpoint(out / checkpoint_name(3, 0), state)
    capsys.readouterr()
    run_training(small(out, epochs=4, resume=True, keep_checkpoints=1))
    err = capsys.readouterr().err
    assert f"{out / BEST_NAME} was missing and the checkpoint of its epoch 1 is pruned: recreated from the best " \
           f"kept epoch, 3" in err
    assert load_checkpoint(out / BEST_NAME)["epochs_done"] >= 3


# -- metrics.jsonl cut short -------------------------------------------------------------------------------


def test_a_torn_last_metrics_line_is_dropped_with_a_warning_and_rewritten(tmp_path, capsys):
    path = tmp_path / METRICS_NAME
    path.write_text('{"epoch": 1}\n{"epoch": 2}\n{"epoch": 3, "train_lo')  # killed mid-append
    assert read_metrics(tmp_path) == [{"epoch": 1}, {"epoch": 2}]
    assert f"divco: warning: {path} line 3 was cut short by an interrupted write" in capsys.readouterr().err
    log = RunLog(tmp_path, tensorboard=False, epochs_done=2)  # what a resume does
    assert path.read_text() == '{"epoch": 1}\n{"epoch": 2}\n'
    log.append({"epoch": 3})
    assert read_metrics(tmp_path) == [{"epoch": 1}, {"epoch": 2}, {"epoch": 3}]
    path.write_text('{"epoch": 1}\n{"epoch": 2, "train_lo\n{"epoch": 3}\n')  # damage inside: still an error
    with pytest.raises(ValueError, match=r"metrics\.jsonl line 2 is not JSON"):
        read_metrics(tmp_path)


def test_a_run_killed_mid_append_resumes(tmp_path, capsys):
    out = tmp_path / "run"
    run_training(small(out, epochs=2), should_stop=after_epoch(1))
    with open(out / METRICS_NAME, "a") as f:
        f.write('{"epoch": 2, "train_loss": 0.')
    result = run_training(small(out, epochs=2, resume=True))
    assert result.completed and [r["epoch"] for r in read_metrics(out)] == [1, 2]
    assert "was cut short by an interrupted write" in capsys.readouterr().err


# -- warnings are not progress ---------------------------------------------------------------------------


def test_stale_lock_and_leftover_warnings_are_printed_without_progress(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK_NAME).write_text(json.dumps({"pid": 99999999, "host": "elsewhere"}))  # a dead holder's record
    (out / ".config.json.abc123.tmp").write_text("half")
    with locked_run_folder(out, verbose=False):
        pass
    err = capsys.readouterr().err
    assert "divco: warning: taking over the stale lock of process 99999999 on elsewhere" in err
    assert "divco: warning: removed .config.json.abc123.tmp, left by an interrupted write" in err
