"""divco.benchmark.batch_norm: the fused BatchNorm block's rows of `divco bench`."""

import pytest
import torch

from divco.benchmark import batch_norm as bn_bench

TINY = (bn_bench.BlockCase("bn_add_relu", "tiny", 2, 8, 4, "nchw"),
        bn_bench.BlockCase("bn_relu", "tiny", 2, 8, 4, "channels_last"))


def test_every_block_step_computes_the_eager_gradients():
    for case in TINY:
        eager = bn_bench.make_block_step("eager", case.block, case.shape, bn_bench.FORMATS[case.layout], "cpu")()
        fused = bn_bench.make_block_step("fused", case.block, case.shape, bn_bench.FORMATS[case.layout], "cpu")()
        assert len(eager) == len(fused) == (4 if case.block == "bn_add_relu" else 3)
        for a, b in zip(eager, fused):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_run_gives_one_record_per_case_and_implementation():
    records = bn_bench.run("cpu", TINY, repeats=2, warmup=1, compiled=False)
    assert [(r["block"], r["impl"]) for r in records] == [
        ("bn_add_relu", "fused"), ("bn_add_relu", "eager"), ("bn_relu", "fused"), ("bn_relu", "eager")]
    for r in records:
        assert r["op"] == "batch_norm" and r["median_ms"] > 0 and len(r["times_s"]) == 2
        assert r["speedup_vs_eager"] == pytest.approx(
            [e for e in records if e["block"] == r["block"] and e["impl"] == "eager"][0]["median_ms"] / r["median_ms"])


def test_the_issue_shapes_are_the_default_cases():
    shapes = {(c.model, c.shape, c.layout) for c in bn_bench.CASES}
    assert ("wide_resnet16_8_s4", (64, 256, 32, 32), "channels_last") in shapes
    assert ("resnet110_s2", (64, 24, 32, 32), "nchw") in shapes
    assert {c.block for c in bn_bench.CASES} == set(bn_bench.BLOCKS)
