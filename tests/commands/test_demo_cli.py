"""divco demo: a divided network's summary and one forward pass."""

from __future__ import annotations

from divco.cli import main


def test_demo_prints_the_summary_and_the_logits_shape(capsys):
    assert main(["demo", "--model", "wide_resnet16_2", "--branches", "2", "--batch-size", "3"]) == 0
    out = capsys.readouterr().out
    assert "wide_resnet16_2" in out and "forward of 3 images x 2 views -> logits (3, 2, 10)" in out
