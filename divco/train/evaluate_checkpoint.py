"""Evaluate a training checkpoint on a test set (what ``divco eval`` runs)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import torch

from ..data import Normalize, load_dataset
from .checkpoint import checkpoint_of, load_checkpoint
from .evaluation import EvaluationResult, evaluate
from .export import model_from_checkpoint
from .runtime import resolve_device


def evaluate_checkpoint(checkpoint: Union[str, Path], *, data: Optional[str] = None, image_size: Optional[int] = None,
                        test_subset: Optional[int] = None, batch_size: int = 256, device: str = "auto",
                        cache_dir=None) -> tuple[EvaluationResult, dict]:
    """Test metrics of ``checkpoint`` (a file, or a run folder: its best.pt) and a description.

    By default the test split of the data the checkpoint was trained on (same image
    size and test subset).  Inputs are normalised with the training data's statistics,
    as in training, whatever data is tested.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    checkpoint = checkpoint_of(checkpoint)
    state = load_checkpoint(checkpoint)
    config = state["config"]
    data = data if data is not None else config["data"]
    if image_size is None:
        image_size = config.get("image_size")
    if test_subset is None and data == config["data"]:
        test_subset = config.get("test_subset")
    dataset = load_dataset(data, image_size=image_size, cache_dir=cache_dir).subset(test=test_subset)
    info = state["model_info"]
    if dataset.num_classes != info["num_classes"]:
        raise ValueError(f"{data} has {dataset.num_classes} classes but checkpoint {checkpoint} predicts "
                         f"{info['num_classes']}")
    target = resolve_device(device)
    model = model_from_checkpoint(state).to(target)
    trained = state["dataset"]
    normalize = Normalize(trained["mean"], trained["std"], target)
    amp_dtype = torch.bfloat16 if target.type == "cuda" and torch.cuda.is_bf16_supported() else None
    result = evaluate(model, dataset.test_images.to(target), dataset.test_labels.to(target), normalize,
                      batch_size=batch_size, amp_dtype=amp_dtype, channels_last=target.type == "cuda")
    description = {"checkpoint": str(checkpoint), "model": info["name"], "branches": info["branches"],
                   "epochs_done": state["epochs_done"], "data": dataset.describe()}
    return result, description
