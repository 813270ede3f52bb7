"""The ensembles' and calibration metrics' results on a CUDA device equal the CPU's (float64)."""

import pytest
import torch

from divco import calibration
from divco.ensembles.boosting import BoostingState, checkpoint_errors
from divco.ensembles.combine import WEIGHTED_ENSEMBLE_MODES, weighted_ensemble
from divco.ensembles.curve import size_accuracies


@pytest.mark.gpu
def test_cuda_matches_cpu():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 3, 10, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 10, (64,), generator=g)
    weights = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    for mode in WEIGHTED_ENSEMBLE_MODES:
        torch.testing.assert_close(weighted_ensemble(logits.cuda(), mode, weights.cuda()).cpu(),
                                   weighted_ensemble(logits, mode, weights))
    probs = torch.softmax(logits[:, 0], -1)
    cpu = calibration.calibration_metrics(probs, labels)
    cuda = calibration.calibration_metrics(probs.cuda(), labels.cuda())
    for name in cpu:
        torch.testing.assert_close(cuda[name].cpu(), cpu[name])
    assert calibration.fit_temperature(3 * logits[:, 0].cuda(), labels.cuda()) == pytest.approx(
        calibration.fit_temperature(3 * logits[:, 0], labels), rel=1e-6)
    assert size_accuracies(logits.transpose(0, 1).cuda(), labels.cuda()) == size_accuracies(logits.transpose(0, 1),
                                                                                          labels)
    on_cpu, on_cuda = BoostingState(64, 10, 2, 2), BoostingState(64, 10, 2, 2)
    on_cpu.record(checkpoint_errors(logits[:, 0], labels))
    on_cuda.record(checkpoint_errors(logits[:, 0].cuda(), labels.cuda()))
    assert on_cuda.alphas == on_cpu.alphas and torch.equal(on_cuda.weights, on_cpu.weights)
