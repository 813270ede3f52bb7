"""divco.benchmark.batch_norm.host_cost: the host-cost measurement of the fused BN+add+ReLU
(one record per level and implementation, ratios against eager from the same run)."""

import pytest

from divco.benchmark import batch_norm as bn_bench
from divco.ops.batch_norm import native_available


@pytest.mark.skipif(not native_available()[0], reason="divco._C without the batch_norm op")
def test_host_cost_records():
    records = bn_bench.host_cost(calls=2, repeats=2)
    assert {(r["level"], r["impl"]) for r in records} == {(lv, i) for lv in ("op", "module") for i in ("fused", "eager")}
    for r in records:
        assert r["us_per_step"] > 0 and r["median_us_per_step"] >= r["us_per_step"]
        if r["impl"] == "eager":
            assert r["ratio_vs_eager"] == 1.0
