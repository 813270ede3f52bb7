"""The capture and cuDNN options: validated by TrainConfig, applied by the engine."""

from __future__ import annotations

import pytest
import torch

from divco.train import TrainConfig
from divco.train import assembly
from divco.train.cudnn import configure_cudnn
from divco.train.distributed import DistributedContext

from train_helpers import tiny_config


@pytest.fixture
def cudnn_flag():
    saved = torch.backends.cudnn.benchmark
    yield
    torch.backends.cudnn.benchmark = saved


@pytest.mark.parametrize("enabled", [True, False])
def test_cudnn_benchmark_follows_the_option_on_cuda(cudnn_flag, enabled):
    torch.backends.cudnn.benchmark = not enabled
    assert configure_cudnn(enabled, torch.device("cuda")) is enabled
    assert torch.backends.cudnn.benchmark is enabled


def test_cudnn_flag_is_left_alone_off_cuda(cudnn_flag):
    torch.backends.cudnn.benchmark = False
    assert configure_cudnn(True, torch.device("cpu")) is None
    assert torch.backends.cudnn.benchmark is False


def test_cudnn_benchmark_is_on_by_default():
    assert TrainConfig(model="wide_resnet16_1", out="x").cudnn_benchmark is True


@pytest.mark.parametrize("enabled", [True, False])
def test_assembly_sets_cudnn_from_the_config(tmp_path, monkeypatch, enabled):
    seen = []
    monkeypatch.setattr(assembly, "configure_cudnn", lambda flag, device: seen.append((flag, device)))
    config = tiny_config(tmp_path, cudnn_benchmark=enabled, capture="compile")
    run = assembly.assemble_run(config, DistributedContext.from_env("cpu"), torch.device("cpu"))
    assert seen == [(enabled, torch.device("cpu"))]
    assert run.step._forward_loss is not run.step.forward_loss  # capture="compile" reached the step


@pytest.mark.parametrize("changes, message", [
    ({"capture": "graphs"}, r"capture must be one of \('none', 'compile', 'compile-step', 'cuda-graph'\), "
                            r"got 'graphs'"),
    ({"capture": "compile-step", "compile": True}, "compile=True .* contradicts capture='compile-step'"),
    ({"cudnn_benchmark": "yes"}, "cudnn_benchmark must be True or False"),
])
def test_bad_capture_options_are_refused(tmp_path, changes, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(tmp_path, **changes)


def test_cuda_graph_on_a_cpu_run_is_refused(tmp_path):
    config = tiny_config(tmp_path, capture="cuda-graph", device="cpu")
    with pytest.raises(ValueError, match="capture='cuda-graph' needs a CUDA device, got cpu"):
        assembly.assemble_run(config, DistributedContext.from_env("cpu"), torch.device("cpu"))
