"""divco ensemble-curve: the command around divco.ensembles.curve, with a stand-in loader and a real run."""

import argparse
import json

import pytest
import torch

from divco.commands import ensemble_curve
from divco.ensembles.curve import RunMembers


def parse(argv):
    parser = argparse.ArgumentParser()
    ensemble_curve.add_arguments(parser)
    return parser.parse_args(argv)


def fake_loader(calls):
    def load(run_dir, args):
        calls.append(run_dir)
        S = 1 if run_dir.endswith("single") else 4
        g = torch.Generator().manual_seed(len(run_dir))
        return RunMembers(f"net-{S}", torch.randn(S, 50, 10, generator=g, dtype=torch.float64),
                          torch.randint(0, 10, (50,), generator=g), 1e6 * (4 if S == 1 else 1), run_dir)
    return load


def test_command_writes_the_curve_of_every_run(tmp_path, capsys):
    calls = []
    args = parse(["runs/a", "runs/single", "--out", str(tmp_path / "curve"), "--mode", "mean_probs"])
    assert ensemble_curve.run(args, load_run=fake_loader(calls)) == 0
    assert calls == ["runs/a", "runs/single"]
    curve = json.loads((tmp_path / "curve" / "curve.json").read_text())
    assert curve["mode"] == "mean_probs" and [len(c["points"]) for c in curve["curves"]] == [4, 1]
    out = capsys.readouterr().out
    assert "| net-4 | 4 | 4.00 M |" in out and "wrote" in out


def test_command_rejects_a_bad_subset_count(tmp_path):
    with pytest.raises(ValueError, match="--max-subsets"):
        ensemble_curve.run(parse(["r", "--out", str(tmp_path), "--max-subsets", "0"]), load_run=fake_loader([]))


def test_missing_run_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="best.pt"):
        ensemble_curve.load_run_members(tmp_path / "nothing", parse([str(tmp_path), "--out", str(tmp_path)]))
    with pytest.raises(FileNotFoundError, match="best.pt"):
        ensemble_curve.load_run_members(tmp_path, parse([str(tmp_path), "--out", str(tmp_path)]))


def test_loader_reads_checkpoints_through_the_eval_loader(tmp_path, monkeypatch):
    """ensemble-curve and divco eval share one checkpoint reader (same data, subset, normalisation)."""
    import divco.train.evaluate_checkpoint as reader

    seen = {}

    def refuse(path, **kw):
        seen.update(kw, path=path)
        raise ValueError("stop here")

    monkeypatch.setattr(reader, "load_checkpoint_on_test_data", refuse)
    (tmp_path / "best.pt").write_bytes(b"")
    with pytest.raises(ValueError, match="stop here"):
        ensemble_curve.load_run_members(str(tmp_path), parse([str(tmp_path), "--out", "o", "--test-subset", "7"]))
    assert seen["test_subset"] == 7 and str(seen["path"]) == str(tmp_path)


@pytest.mark.slow
def test_real_run_members_match_the_trained_model(tmp_path):
    from divco.data import AugmentConfig
    from divco.train import TrainConfig, train

    config = TrainConfig(model="wide_resnet16_4", data="digits", image_size=8, progress=False, tensorboard=False,
                         augment=AugmentConfig(crop_padding=1), branches=2, epochs=1, batch_size=16,
                         train_subset=32, test_subset=16, out=str(tmp_path / "run"))
    train(config)
    args = parse([str(tmp_path / "run"), "--out", str(tmp_path / "curve"), "--device", "cpu"])
    members = ensemble_curve.load_run_members(str(tmp_path / "run"), args)
    assert members.label == "wide_resnet16_4 (S=2)" and members.logits.shape == (2, 16, 10)
    from divco import models, summary
    macs = summary(models.create("wide_resnet16_4", num_classes=10, branches=2), (3, 8, 8)).macs_per_branch
    assert members.member_flops == 2.0 * macs

    from divco.train.evaluate_checkpoint import evaluate_checkpoint
    result, _ = evaluate_checkpoint(tmp_path / "run" / "best.pt", device="cpu")
    accuracy = [float((members.logits[s].argmax(-1) == members.labels).double().mean()) for s in range(2)]
    assert accuracy == pytest.approx([b.acc for b in result.branches])
    assert ensemble_curve.run(args) == 0
    assert (tmp_path / "curve" / "curve.md").is_file()


def test_a_label_says_when_the_members_keep_the_full_width():
    info = {"name": "wide_resnet16_2", "branches": 4, "model_kwargs": {}}
    assert ensemble_curve.run_label(info) == "wide_resnet16_2 (S=4)"  # divided: four WRN-16-1
    assert ensemble_curve.run_label({**info, "model_kwargs": {"divide": False}}) == "wide_resnet16_2 (S=4, undivided)"
    assert ensemble_curve.run_label({"name": "resnet110", "branches": 1}) == "resnet110 (S=1)"  # older checkpoints


@pytest.mark.slow
def test_a_checkpoint_ensemble_run_gives_its_members(tmp_path):
    """A cbnn run folder (members.json + member-*.pt): the curve's members are its M member checkpoints,
    each with the test logits of its own model, not best.pt's one network."""
    from divco.data import AugmentConfig
    from divco.train import TrainConfig, train
    from divco.train.checkpoint import load_checkpoint
    from divco.train.evaluate_checkpoint import evaluate_members, load_checkpoint_on_test_data
    from divco.train.evaluation import predict
    from divco.train.export import model_from_checkpoint

    run = tmp_path / "cbnn"
    config = TrainConfig(model="wide_resnet16_1", data="digits", image_size=8, progress=False, tensorboard=False,
                         augment=AugmentConfig(crop_padding=1), method="cbnn", checkpoints=2, epochs=2,
                         batch_size=16, train_subset=32, test_subset=16, out=str(run))
    train(config)
    args = parse([str(run), "--out", str(tmp_path / "curve"), "--device", "cpu", "--mode", "mean_probs"])
    members = ensemble_curve.load_run_members(str(run), args)
    assert members.label == "wide_resnet16_1 (cbnn, M=2)" and members.logits.shape == (2, 16, 10)
    loaded = ensemble_curve.load_run_members(str(run / "best.pt"), args)  # one checkpoint: one member
    data = load_checkpoint_on_test_data(run / "member-01.pt", device="cpu")
    for j in range(2):
        model = model_from_checkpoint(load_checkpoint(run / f"member-0{j + 1}.pt")).eval()
        own = predict(model, data.dataset.test_images, data.normalize, batch_size=256)[:, 0]
        torch.testing.assert_close(members.logits[j], own.to(torch.float64), rtol=1e-4, atol=1e-4)
    assert loaded.logits.shape[0] == 1
    # the command end to end: n = 1, 2; the 2-member point is the equal-weight mean of both members
    assert ensemble_curve.run(args) == 0
    curve = json.loads((tmp_path / "curve" / "curve.json").read_text())
    (points,) = [c["points"] for c in curve["curves"]]
    assert [p["n"] for p in points] == [1, 2]
    accuracies = [m["accuracy"] for m in evaluate_members(run, device="cpu")["members"]]
    assert points[0]["accuracy"] == pytest.approx(sum(accuracies) / 2)
