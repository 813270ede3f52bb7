"""The scalar math shared by the CPU and CUDA kernels (csrc/divco/cotrain_math.h), called
through divco._C._testing: the CPU's vectorisable exp/log, and the online softmax (tile
statistics merged in order) that the CUDA kernels run over tiles of K."""

import math

import numpy as np
import pytest
import torch

INF = math.inf
NAN = math.nan


def ulp_distance(actual: np.ndarray, expected: np.ndarray) -> np.ndarray:
    """Distance in float32 units in the last place (exact reference rounded to float32)."""
    a = actual.astype(np.float32).view(np.int32).astype(np.int64)
    e = expected.astype(np.float32).view(np.int32).astype(np.int64)
    return np.abs(a - e)


def test_exp_is_within_two_ulp_over_the_normal_range(native):
    x = np.concatenate([np.linspace(-87.3, 88.3, 20001), np.linspace(-1, 1, 2001)]).astype(np.float32)
    got = np.array(native._testing.exp_f32(x.tolist()), dtype=np.float32)
    assert ulp_distance(got, np.exp(x.astype(np.float64))).max() <= 2


def test_exp_special_values(native):
    got = native._testing.exp_f32([0.0, -INF, INF, NAN, -88.0, -200.0, 89.0, 1000.0])
    assert got[0] == 1.0
    assert got[1] == 0.0
    assert got[2] == INF
    assert math.isnan(got[3])
    assert got[4] == 0.0 and got[5] == 0.0  # below the smallest normal result: flushed to 0
    assert got[6] == INF and got[7] == INF


def test_log_is_within_two_ulp_including_subnormals(native):
    x = np.concatenate(
        [np.geomspace(1e-45, 3e38, 20001), np.linspace(0.5, 2.0, 2001), [1.0, 2.0, 0.70710677, 0.70710683]]
    ).astype(np.float32)
    x = x[x > 0]
    got = np.array(native._testing.log_f32(x.tolist()), dtype=np.float32)
    assert ulp_distance(got, np.log(x.astype(np.float64))).max() <= 2


def test_log_special_values(native):
    got = native._testing.log_f32([1.0, 0.0, -0.0, -1.0, INF, -INF, NAN])
    assert got[0] == 0.0
    assert got[1] == -INF and got[2] == -INF
    assert math.isnan(got[3]) and math.isnan(got[5]) and math.isnan(got[6])
    assert got[4] == INF


@pytest.mark.parametrize("tile", [1, 3, 32, 1000])
@pytest.mark.parametrize("scale", [1.0, 0.25, 3.0])
def test_online_logsumexp_matches_torch(native, tile, scale):
    generator = torch.Generator().manual_seed(tile)
    values = (torch.randn(517, generator=generator) * 20).float()
    values[::7] = -INF  # masked entries contribute nothing
    expected = torch.logsumexp(values.double() * scale, 0).item()
    got = native._testing.online_logsumexp(values.tolist(), scale, tile)
    assert got == pytest.approx(expected, rel=2e-6, abs=2e-6)


def test_online_logsumexp_edge_cases(native):
    lse = native._testing.online_logsumexp
    assert lse([-INF, -INF], 1.0, 1) == -INF  # all masked: log 0
    assert math.isnan(lse([1.0, NAN, 2.0], 1.0, 2))  # NaN in, NaN out, in any tile
    assert math.isnan(lse([NAN, 1.0, 2.0], 1.0, 1))
    assert lse([1e4, 1e4], 1.0, 1) == pytest.approx(1e4 + math.log(2))  # no overflow
    with pytest.raises(ValueError, match="tile"):
        lse([1.0], 1.0, 0)
