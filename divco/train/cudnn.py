"""cuDNN's algorithm choice for a training run (TrainConfig.cudnn_benchmark)."""

from __future__ import annotations

from typing import Optional

import torch


def configure_cudnn(benchmark: bool, device: torch.device) -> Optional[bool]:
    """On a CUDA device set ``torch.backends.cudnn.benchmark`` (cuDNN times its convolution algorithms
    for each new input shape once, then keeps the fastest: training sees one shape per layer, so this
    costs only the first steps); on other devices change nothing.  Returns the flag set, or None.

    A pure function of the option and the device (no GPU needed to call it), so the engine's choice is
    testable anywhere.
    """
    if torch.device(device).type != "cuda":
        return None
    torch.backends.cudnn.benchmark = bool(benchmark)
    return torch.backends.cudnn.benchmark
