"""The ensemble-size curve: subsets, hand-computed accuracies, agreement with the ensemble reference, files."""

import json
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from divco.ensembles.combine import WEIGHTED_ENSEMBLE_MODES, ensemble_prediction
from divco.ensembles.curve import (RunMembers, curve_table, ensemble_curve, member_subsets, size_accuracies,
                                   write_curve)


def onehot_logits(predictions, K=2):
    """Member logits [S, N, K] whose top-1s are ``predictions`` [S][N]."""
    return 5.0 * torch.nn.functional.one_hot(torch.tensor(predictions), K).to(torch.float64)


def test_all_subsets_when_few():
    subsets, exhaustive = member_subsets(4, 2)
    assert exhaustive and subsets == [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]
    assert member_subsets(8, 4, max_subsets=70) == (member_subsets(8, 4, max_subsets=70)[0], True)  # C(8,4) = 70


def test_fixed_seed_sample_when_many():
    subsets, exhaustive = member_subsets(10, 5)  # C(10, 5) = 252 > 64
    assert not exhaustive and len(subsets) == 64 == len(set(subsets))
    assert all(len(s) == 5 and list(s) == sorted(s) and max(s) < 10 for s in subsets)
    assert member_subsets(10, 5) == (subsets, False)
    assert member_subsets(10, 5, seed=1)[0] != subsets


@pytest.mark.parametrize("members, size, max_subsets", [(3, 0, 64), (3, 4, 64), (3, 2, 0)])
def test_subsets_reject_bad_sizes(members, size, max_subsets):
    with pytest.raises(ValueError, match="size|max_subsets"):
        member_subsets(members, size, max_subsets)


def test_vote_accuracies_by_hand():
    # two test images of class 0; member top-1s: m0 -> (0, 1), m1 -> (1, 0), m2 -> (0, 0)
    logits, labels = onehot_logits([[0, 1], [1, 0], [0, 0]]), torch.tensor([0, 0])
    points = size_accuracies(logits, labels, mode="vote")
    assert [p["n"] for p in points] == [1, 2, 3]
    assert points[0]["accuracy"] == pytest.approx(2 / 3)
    assert (points[0]["accuracy_min"], points[0]["accuracy_max"], points[0]["subsets"]) == (0.5, 1.0, 3)
    assert points[1]["accuracy"] == 1.0  # every pair ties 1:1 on one image -> class 0 (lowest index)
    assert points[2] == {"n": 3, "accuracy": 1.0, "accuracy_min": 1.0, "accuracy_max": 1.0, "subsets": 1,
                         "all_subsets": True}


def test_geometric_mean_differs_from_mean_of_probabilities_by_hand():
    # one image of class 1; members (0.9, 0.1), (0.9, 0.1), (0.001, 0.999):
    # mean of probabilities (0.6003, 0.3997) -> 0;
    # geometric (0.81 * 0.001)^(1/3) = 0.093 < (0.01 * 0.999)^(1/3) = 0.215 -> 1
    probs = torch.tensor([[[0.9, 0.1]], [[0.9, 0.1]], [[0.001, 0.999]]], dtype=torch.float64)
    logits, labels = probs.log(), torch.tensor([1])
    assert size_accuracies(logits, labels, mode="geo_mean")[2]["accuracy"] == 1.0
    assert size_accuracies(logits, labels, mode="mean_probs")[2]["accuracy"] == 0.0
    assert size_accuracies(logits, labels, mode="vote")[2]["accuracy"] == 0.0  # majority says 0
    assert size_accuracies(logits, labels)[0]["accuracy"] == pytest.approx(1 / 3)  # geo_mean is the default


@settings(max_examples=10, deadline=None)
@given(S=st.integers(1, 5), N=st.integers(1, 20), K=st.integers(2, 6), seed=st.integers(0, 2**31 - 1),
       mode=st.sampled_from(WEIGHTED_ENSEMBLE_MODES))
def test_agrees_with_the_ensemble_reference(S, N, K, seed, mode):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(S, N, K, generator=g, dtype=torch.float64)
    labels = torch.randint(0, K, (N,), generator=g)
    for point in size_accuracies(logits, labels, mode=mode):
        subsets, _ = member_subsets(S, point["n"])
        expected = [float((ensemble_prediction(logits[list(s)].transpose(0, 1), mode) == labels).double().mean())
                    for s in subsets]
        assert point["accuracy"] == pytest.approx(sum(expected) / len(expected), abs=1e-12)


def run_members(label="wrn", S=3, source="a", flops=1.5e6):
    g = torch.Generator().manual_seed(len(source))
    return RunMembers(label, torch.randn(S, 30, 4, generator=g, dtype=torch.float64),
                      torch.randint(0, 4, (30,), generator=g), flops, source)


def test_curve_costs_n_members_and_names_every_run():
    curve = ensemble_curve([run_members(), run_members(source="bb"), run_members("wide", S=1, flops=4e6)])
    assert [c["label"] for c in curve["curves"]] == ["wrn [a]", "wrn [bb]", "wide"]
    assert [p["flops"] for p in curve["curves"][0]["points"]] == [1.5e6, 3e6, 4.5e6]
    assert curve["curves"][2]["members"] == 1 and len(curve["curves"][2]["points"]) == 1
    assert "| wide | 1 | 4.00 M |" in curve_table(curve)


@pytest.mark.parametrize("kwargs, match", [
    (dict(logits=torch.randn(3, 4)), r"\[S, N, K\]"),
    (dict(labels=torch.zeros(29, dtype=torch.long)), r"labels must be integer class indices \[30\]"),
    (dict(member_flops=0), "member_flops"),
])
def test_run_members_reject_bad_input(kwargs, match):
    values = dict(label="x", logits=torch.randn(3, 30, 4), labels=torch.zeros(30, dtype=torch.long), member_flops=1.0)
    with pytest.raises(ValueError, match=match):
        RunMembers(**{**values, **kwargs})


def test_write_curve(tmp_path):
    pytest.importorskip("matplotlib")
    curve = ensemble_curve([run_members(), run_members("wide", S=2, source="c", flops=3e6)])
    written = write_curve(curve, tmp_path / "out")
    assert json.loads(written["curve.json"].read_text()) == curve
    assert written["curve.md"].read_text() == curve_table(curve)
    assert written["curve.png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["curve.json", "curve.md", "curve.png"]


def test_without_matplotlib_the_png_is_not_drawn(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    written = write_curve(ensemble_curve([run_members()]), tmp_path)
    assert written["curve.png"] is None and not (tmp_path / "curve.png").exists()
    assert written["curve.json"].is_file() and written["curve.md"].is_file()
