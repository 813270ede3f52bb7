"""BranchConv2d impl="auto": measured once per layer and input where the device can be timed, else the static rule."""

from __future__ import annotations

import pytest
import torch

from divco.nn import BranchConv2d, set_conv_impl
from divco.nn import conv as conv_module
from divco.nn.conv import clear_measured_conv_impls, default_conv_impl, measured_conv_impls


@pytest.fixture(autouse=True)
def _fresh_choices():
    clear_measured_conv_impls()
    yield
    clear_measured_conv_impls()


class FakeTimer:
    """Says ``times[impl]`` seconds for a call of ``impl`` (told apart by what the call runs); counts calls."""

    def __init__(self, times: dict) -> None:
        self.times, self.calls = times, []

    def __call__(self, run) -> float:
        impl = run.impl
        run()  # the timed call runs (forward and backward) without touching the layer
        self.calls.append(impl)
        return self.times[impl]


def layer(S=3, cin=4, cout=6, **kw):
    return BranchConv2d(cin, cout, 3, padding=1, branches=S, **kw)


@pytest.mark.parametrize("fastest", ["grouped", "split"])
def test_auto_takes_the_faster_implementation_and_measures_once(fastest):
    timer = FakeTimer({"grouped": 2.0 if fastest == "split" else 1.0, "split": 1.0 if fastest == "split" else 2.0})
    conv = layer()
    x = torch.randn(2, 12, 5, 5)
    assert conv.choose_impl(x, timer) == fastest
    assert sorted(timer.calls) == ["grouped", "split"]
    assert conv.choose_impl(x, timer) == fastest and len(timer.calls) == 2  # cached: no second measurement
    twin = layer()  # another layer of the same shape: the same key, no measurement
    assert twin.choose_impl(x, timer) == fastest and len(timer.calls) == 2
    assert list(measured_conv_impls().values()) == [fastest]


def test_auto_measures_each_shape_and_grad_mode_apart():
    timer = FakeTimer({"grouped": 1.0, "split": 3.0})
    conv = layer()
    conv.choose_impl(torch.randn(2, 12, 5, 5), timer)
    conv.choose_impl(torch.randn(4, 12, 5, 5), timer)  # another batch size
    with torch.no_grad():
        conv.choose_impl(torch.randn(2, 12, 5, 5), timer)  # inference: forward only
    layer(cout=8).choose_impl(torch.randn(2, 12, 5, 5), timer)  # another layer shape
    assert len(measured_conv_impls()) == 4 and len(timer.calls) == 8


def test_a_tie_keeps_the_grouped_convolution():
    assert layer().choose_impl(torch.randn(2, 12, 5, 5), FakeTimer({"grouped": 1.0, "split": 1.0})) == "grouped"


def test_timing_leaves_the_layer_and_its_gradients_alone():
    conv = layer()
    before = conv.weight.detach().clone()
    x = torch.randn(2, 12, 5, 5, requires_grad=True)
    conv.choose_impl(x, FakeTimer({"grouped": 1.0, "split": 2.0}))
    assert conv.weight.grad is None and x.grad is None
    assert torch.equal(conv.weight, before)


def test_cpu_forward_follows_the_static_rule_without_measuring(monkeypatch):
    def no_timing(*args, **kwargs):
        raise AssertionError("a CPU forward must not time the convolutions")

    monkeypatch.setattr(conv_module, "cuda_event_timer", no_timing)
    conv = set_conv_impl(layer(), "auto")
    x = torch.randn(2, 12, 5, 5)
    assert conv.choose_impl(x) == default_conv_impl(x) == "split"  # NCHW on a CPU: dense convolutions
    channels_last = x.to(memory_format=torch.channels_last)
    assert conv.choose_impl(channels_last) == "grouped"
    reference = set_conv_impl(layer(), "grouped")
    reference.load_state_dict(conv.state_dict())
    torch.testing.assert_close(conv(x), reference(x))
    assert measured_conv_impls() == {}


def test_forward_uses_the_measured_choice(monkeypatch):
    """A measured choice (here injected as if CUDA had measured it) is what forward runs: every later step."""
    conv = layer()
    x = torch.randn(2, 12, 5, 5)
    conv.choose_impl(x, FakeTimer({"grouped": 1.0, "split": 2.0}))  # NCHW on a CPU: the rule says split
    ran = []
    original = BranchConv2d._all_branches
    monkeypatch.setattr(BranchConv2d, "_all_branches", lambda self, x, impl, w, b: ran.append(impl) or
                        original(self, x, impl, w, b))
    conv(x)
    conv(x)
    assert ran == ["grouped", "grouped"]
