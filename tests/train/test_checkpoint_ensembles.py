"""--method snapshot|cbnn: member checkpoints of one run, their weights, stacking, resume.

Tiny real runs on the digits at 8x8 (WRN-16-1, 48 training images, batches of 16: 3 steps an epoch).
"""

from __future__ import annotations

import json
import math
import types

import pytest
import torch
import torch.nn.functional as F
from train_helpers import recording_steps, tiny_config

import divco
from divco.data import AugmentConfig, load_dataset
from divco.ensembles import BoostingState, SnapshotSchedule, loss_weights
from divco.ensembles.boosting import resolve_damping
from divco.train import TrainConfig, load_checkpoint, methods, train
from divco.train.checkpoint import model_from_checkpoint
from divco.train.evaluation import predict
from divco.train.members import MEMBERS_NAME, load_members, member_name
from divco.train.runtime import epoch_order
from divco.train.step import TrainStep

TRAIN_IMAGES = 48


def members_config(out, method, **overrides) -> TrainConfig:
    values = dict(model="wide_resnet16_1", method=method, branches=1, epochs=3, train_subset=TRAIN_IMAGES,
                  augment=AugmentConfig(crop_padding=1, mixup_alpha=0.0), keep_checkpoints=1)
    values.update(overrides)
    return tiny_config(out, **values)


def test_the_methods_and_their_options():
    assert {n for n in methods.names() if methods.method_class(n).checkpoint_ensemble} == {"snapshot", "cbnn", "fge",
                                                                                            "swa"}
    config = members_config("x", "cbnn")
    assert config.checkpoints is None and config.members == 3
    assert members_config("x", "snapshot", checkpoints=2).members == 2


@pytest.mark.parametrize("changes, message", [
    (dict(checkpoints=0), r"checkpoints must be an int >= 1, got 0"),
    (dict(checkpoints=4), r"checkpoints must be <= epochs \(3\).*got 4"),
    (dict(branches=2), r"method 'cbnn' trains one network.*branches must be 1, got 2"),
    (dict(method="cotrain", checkpoints=2, branches=2), r"checkpoints is an option of the methods snapshot, cbnn and fge; "
                                                        r"this run's method is 'cotrain'"),
    (dict(method="snapshot", cbnn_shrinkage=0.5), r"cbnn_shrinkage is an option of the method cbnn"),
    (dict(cbnn_shrinkage=0.0), r"cbnn_shrinkage must be a finite number > 0"),
    (dict(cbnn_errors="hinge"), r"cbnn_errors must be one of \('zero_one', 'probability'\)"),
    (dict(method="snapshot", cbnn_weight_ratio=4.0), r"cbnn_weight_ratio is an option of the method cbnn"),
    (dict(cbnn_weight_ratio=0.5), r"cbnn_weight_ratio must be a finite number >= 1 \(R\), or 0"),
    (dict(cbnn_weight_ratio=math.inf), r"cbnn_weight_ratio must be a finite number >= 1 \(R\), or 0"),
])
def test_bad_options_are_refused(changes, message):
    with pytest.raises(ValueError, match=message):
        members_config("x", changes.pop("method", "cbnn"), **changes)


def test_distributed_runs_are_refused(tmp_path):
    from divco.train.assembly import assemble_run

    processes = types.SimpleNamespace(world_size=2, enabled=True)
    with pytest.raises(ValueError, match=r"method 'snapshot' runs on one process.*this launch has WORLD_SIZE=2"):
        assemble_run(members_config(tmp_path, "snapshot"), processes, torch.device("cpu"))


def weighted_step(backend=None) -> TrainStep:
    model = torch.nn.Linear(1, 1)
    return TrainStep(model, torch.optim.SGD(model.parameters(), lr=0.1), cot_weight=torch.tensor(0.0), branches=1,
                     backend=backend)


@pytest.mark.parametrize("backend", [b for b in divco.ops.available_backends() if b != "cuda"])
@pytest.mark.parametrize("soft", [False, True])
def test_sample_weighted_loss_is_the_weighted_mean_of_cross_entropies(soft, backend):
    """TrainStep.loss with sample weights (CBNN's one call site: divco.ops.cotrain_loss(sample_weight=))
    against a float64 reference, on every backend."""
    g = torch.Generator().manual_seed(0)
    N, K = 7, 5
    logits = torch.randn(N, 1, K, generator=g, requires_grad=True)
    targets = torch.softmax(torch.randn(N, K, generator=g), -1) if soft else torch.randint(0, K, (N,), generator=g)
    weights = torch.rand(N, generator=g) * 2
    step = weighted_step(backend)
    out = step.loss(logits, targets, weights)
    z = logits.detach().double().requires_grad_()
    rows = F.cross_entropy(z[:, 0], targets.double() if soft else targets, reduction="none")
    expected = (weights.double() * rows).mean()
    assert float(out.loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-5)
    assert float(out.ce[0]) == pytest.approx(float(expected.detach()), rel=1e-5)
    (grad,) = torch.autograd.grad(out.loss, logits)
    (expected_grad,) = torch.autograd.grad(expected, z)
    assert torch.allclose(grad.double(), expected_grad, atol=1e-6)
    labels = targets.argmax(-1) if soft else targets
    hits = int((logits[:, 0].argmax(-1) == labels).sum())
    assert out.correct.tolist() == [hits, hits] and float(out.cot) == 0.0
    # weights of 1 give the unweighted loss
    plain = step.loss(logits, targets, torch.ones(N))
    assert float(plain.loss.detach()) == pytest.approx(float(F.cross_entropy(logits[:, 0], targets).detach()),
                                                       rel=1e-5)
    with pytest.raises(ValueError, match=r"sample_weight"):
        step.loss(logits, targets, torch.ones(6))


def test_snapshot_cycles_members_and_weights(tmp_path, monkeypatch):
    calls = recording_steps(monkeypatch)
    config = members_config(tmp_path / "run", "snapshot", checkpoints=2)
    result = train(config)
    assert result.completed and len(calls) == 9  # 3 epochs of 3 steps
    cycles = SnapshotSchedule(9, 2)  # cycles of ceil(9/2) = 5 iterations: members after iterations 5 and 9
    base = result.info["base_lr"]
    assert [c["lr"] for c in calls] == pytest.approx([base * cycles.factor(t) for t in range(1, 10)])
    assert calls[5]["lr"] == pytest.approx(base)  # the restart
    assert all(c["sample_weight"] is None for c in calls)  # snapshot: an unweighted loss
    record = json.loads((tmp_path / "run" / MEMBERS_NAME).read_text())
    assert record["complete"] and record["method"] == "snapshot"
    assert [(m["iteration"], m["epochs_done"], m["steps_into_epoch"], m["weight"]) for m in record["members"]] == \
        [(5, 1, 2, 0.5), (9, 3, 0, 0.5)]
    # each member holds the weights of its iteration; --keep-checkpoints 1 pruned no member
    for member, iteration in zip(load_members(tmp_path / "run").states, (5, 9)):
        for key, value in calls[iteration - 1]["model"].items():
            assert torch.equal(member["model"][key], value), key
    assert sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*.pt")) == ["checkpoint-e0003-s000000.pt"]


def train_set(config: TrainConfig):
    data = load_dataset(config.data, image_size=config.image_size).subset(config.train_subset, config.test_subset)
    return data.train_images, data.train_labels


@pytest.mark.parametrize("error_kind, shrinkage, weight_ratio", [("zero_one", None, None), ("probability", 0.5, 0)])
def test_cbnn_rounds_equal_boosting_replayed_by_hand(tmp_path, monkeypatch, error_kind, shrinkage, weight_ratio):
    calls = recording_steps(monkeypatch)
    config = members_config(tmp_path / "run", "cbnn", cbnn_errors=error_kind, cbnn_shrinkage=shrinkage,
                            cbnn_weight_ratio=weight_ratio)
    result = train(config)
    assert result.completed
    members = load_members(tmp_path / "run")
    images, labels = train_set(config)
    shrinkage, max_weight_ratio = resolve_damping(shrinkage, weight_ratio)  # None: --method cbnn's default
    replay = BoostingState(TRAIN_IMAGES, 10, 3, 3, shrinkage=shrinkage, max_weight_ratio=max_weight_ratio,
                           error_kind=error_kind)
    loss_weights_of_epoch = [replay.loss_weights()]
    for j, state in enumerate(members.states):
        errors = state["member"]["errors"]
        # the recorded errors are the member's (eval mode) on the un-augmented training set
        logits = predict(model_from_checkpoint(state), images, _normalize(state))
        if error_kind == "zero_one":
            assert torch.equal(errors, logits[:, 0].argmax(-1) != labels)
        else:
            expected = 1 - torch.softmax(logits[:, 0].double(), -1).gather(1, labels[:, None]).squeeze(1)
            assert torch.allclose(errors, expected, atol=1e-6)
        round_ = replay.record(errors)
        assert members.record["members"][j]["alpha"] == round_.alpha
        assert members.record["members"][j]["error"] == round_.error
        loss_weights_of_epoch.append(replay.loss_weights())
    assert members.weights == pytest.approx(replay.ensemble_weights())
    final = load_checkpoint(result.checkpoint)["checkpoint_ensemble"]["boosting"]
    assert torch.equal(final["weights"], replay.weights)
    # the loss of epoch e weighs each image by the weights of the last round before it (epoch 1: all 1)
    for step, call in enumerate(calls):
        epoch, i = divmod(step, 3)
        index = epoch_order(TRAIN_IMAGES, config.seed, epoch)[16 * i: 16 * (i + 1)]
        expected = loss_weights_of_epoch[epoch][index].float()
        assert torch.equal(call["sample_weight"], expected), step
    assert not torch.equal(calls[3]["sample_weight"], torch.ones(16))  # the first round re-weighted


def _normalize(state):
    from divco.data import Normalize

    return Normalize(state["dataset"]["mean"], state["dataset"]["std"], torch.device("cpu"))


def test_stacked_members_equal_the_members_one_by_one(tmp_path):
    config = members_config(tmp_path / "run", "cbnn", epochs=2, checkpoints=2)
    train(config)
    members = load_members(tmp_path / "run")
    stacked = members.stacked()
    assert stacked.branches == 2
    images, _ = train_set(config)
    normalize = _normalize(members.states[0])
    together = predict(stacked, images[:20], normalize)  # [20, 2, K]: one forward pass
    for j, model in enumerate(members.models()):
        alone = predict(model, images[:20], normalize)[:, 0]
        assert torch.allclose(together[:, j], alone, atol=1e-5), j


@pytest.mark.slow
@pytest.mark.parametrize("method, stop_at", [("snapshot", (1, 2)), ("cbnn", (1, 2))])
def test_resume_keeps_members_weights_and_cycle_position(tmp_path, method, stop_at):
    """Interrupted mid-epoch after a member (snapshot: after its mid-epoch member; cbnn: after its first
    boosting round) and resumed: the same members, bit for bit, and the same weights."""
    changes = dict(checkpoints=2) if method == "snapshot" else {}
    reference = train(members_config(tmp_path / "straight", method, **changes))
    stopped = train(members_config(tmp_path / "stopped", method, **changes),
                    should_stop=lambda epoch, steps: (epoch, steps) == stop_at)
    assert stopped.interrupted
    assert len(json.loads((tmp_path / "stopped" / MEMBERS_NAME).read_text())["members"]) == 1
    final = train(members_config(tmp_path / "stopped", method, resume=True, **changes))
    assert final.completed
    a = json.loads((tmp_path / "straight" / MEMBERS_NAME).read_text())
    b = json.loads((tmp_path / "stopped" / MEMBERS_NAME).read_text())
    assert a == b
    for entry in a["members"]:
        x = load_checkpoint(tmp_path / "straight" / entry["file"])
        y = load_checkpoint(tmp_path / "stopped" / entry["file"])
        for key, value in x["model"].items():
            assert torch.equal(value, y["model"][key]), (entry["file"], key)
    x, y = load_checkpoint(reference.checkpoint), load_checkpoint(final.checkpoint)
    if method == "cbnn":
        assert torch.equal(x["checkpoint_ensemble"]["boosting"]["weights"],
                           y["checkpoint_ensemble"]["boosting"]["weights"])
    assert x["schedule"] == y["schedule"]


def test_member_files_are_checked_when_loaded(tmp_path):
    config = members_config(tmp_path / "run", "snapshot", epochs=2, checkpoints=2)
    train(config)
    record_path = tmp_path / "run" / MEMBERS_NAME
    record = json.loads(record_path.read_text())
    (tmp_path / "run" / member_name(1)).write_bytes(b"truncated")
    with pytest.raises(ValueError, match=r"member-02.pt is truncated or corrupt"):
        load_members(tmp_path / "run")
    record["members"][0]["file"] = "elsewhere.pt"
    record_path.write_text(json.dumps(record))
    with pytest.raises(ValueError, match=r"member 0 must be the file member-01.pt"):
        load_members(tmp_path / "run")
    with pytest.raises(FileNotFoundError, match=r"holds no members.json"):
        load_members(tmp_path)
    assert loss_weights(torch.full((4,), 0.25)).tolist() == [1.0] * 4


def test_cbnn_members_without_a_positive_alpha_have_no_weights():
    from divco.train.members import ensemble_weights

    assert ensemble_weights([{"alpha": 0.5}, {"alpha": 1.5}]) == [0.25, 0.75]
    assert ensemble_weights([{}, {}, {}]) == [1 / 3] * 3
    with pytest.raises(ValueError, match=r"every cbnn member so far has alpha 0"):
        ensemble_weights([{"alpha": 0.0}, {"alpha": 0.0}])


def test_cbnn_default_restarts_the_schedule_and_weights_members_on_the_validation_split(tmp_path, monkeypatch):
    from divco.ensembles.cyclic import RestartSchedule
    from divco.ensembles.heldout import heldout_weights, true_class_probabilities

    calls = recording_steps(monkeypatch)
    config = members_config(tmp_path / "run", "cbnn", val_split=16)
    result = train(config)
    assert result.completed
    base = result.info["base_lr"]
    rates = RestartSchedule((3, 6, 9), base, warmup=0, warmup_start_lr=config.warmup_start_lr, min_lr=1e-4)
    assert calls[3]["lr"] == pytest.approx(base) and calls[6]["lr"] == pytest.approx(base)  # restarts at members
    assert [c["lr"] for c in calls[3:9]] == pytest.approx([rates.lr(s) for s in range(3, 9)])
    members = load_members(tmp_path / "run")
    data = load_dataset(config.data, image_size=config.image_size).with_validation(16, config.seed) \
        .subset(config.train_subset, config.test_subset)
    q = torch.stack([true_class_probabilities(predict(model_from_checkpoint(state), data.val_images,
                                                      _normalize(state))[:, 0], data.val_labels)
                     for state in members.states], 1)
    assert members.weights == pytest.approx(heldout_weights(q), abs=1e-6)
    assert [len(m["validation_weights"]) for m in members.record["members"]] == [1, 2, 3]


def test_cbnn_validation_weights_need_a_validation_split():
    with pytest.raises(ValueError, match=r"cbnn_member_weights 'validation' .* holds none out"):
        members_config("x", "cbnn", cbnn_member_weights="validation")  # the tests' runs have val_split=0
    assert members_config("x", "cbnn", cbnn_member_weights="alpha").cbnn_member_weights == "alpha"
