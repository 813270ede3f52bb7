"""Standalone branches out of a training checkpoint, as safetensors files, and back.

    paths = divco.train.export_branches("runs/wrn/best.pt", "exported/")   # every branch
    model = divco.train.load_branch("exported/branch0.safetensors")        # an ordinary nn.Module

Branch ``i`` of a divided network is an ordinary model: a divco model with
``branches=1`` for the CIFAR family, a torchvision ResNet for the ImageNet family
(what :func:`divco.unstack` returns).  Its state dict is written with safetensors (no
pickle) together with the metadata needed to rebuild it: the registered model name,
the number of branches it was divided into, ``num_classes``, the builder's keyword
arguments and the branch's ``spec``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

from .. import __version__, models
from ..io import atomic_write_bytes
from ..models.base import BranchBatchedNetwork
from ..nn.fold import apply_fold_structure, fold_batchnorm
from ..stacking import unstack
from .checkpoint import checkpoint_of, load_checkpoint, model_from_checkpoint
from .member_record import MEMBERS_ENSEMBLE_MODE
from .members import is_members_run, load_members

EXPORT_FORMAT = "divco-branch"


def spec_json(model: nn.Module) -> str:
    """One branch's architecture as JSON (the frozen ``spec`` dataclass), for checkpoints and exports."""
    spec = getattr(model, "spec", None)
    if spec is None or not dataclasses.is_dataclass(spec):
        return "{}"
    return json.dumps(dataclasses.asdict(spec), sort_keys=True)


def _metadata(model: BranchBatchedNetwork, info: dict, index: int, standalone: nn.Module) -> dict[str, str]:
    return {
        "format": EXPORT_FORMAT,
        "divco_version": __version__,
        "model_name": info["name"],
        "branches": str(model.branches),
        "branch": str(index),
        "num_classes": str(model.num_classes),
        "model_kwargs": json.dumps(info.get("model_kwargs", {}), sort_keys=True),
        "spec": spec_json(model),
        "standalone_class": f"{type(standalone).__module__}.{type(standalone).__qualname__}",
    }


def export_branches(checkpoint: Union[str, Path], out: Optional[Union[str, Path]] = None, *,
                    branch: Optional[int] = None, fold_bn: bool = False) -> list[Path]:
    """Write branch ``branch`` (or every branch) of ``checkpoint`` as safetensors; return the paths.

    ``checkpoint`` is a file or a run folder (its best.pt, else its newest checkpoint).
    With ``branch``, ``out`` is the file (default: ``<checkpoint stem>-branch<i>.safetensors``
    beside the checkpoint); without, ``out`` is a folder (default:
    ``<checkpoint stem>-branches/``) receiving ``branch<i>.safetensors`` for every i.
    ``fold_bn``: fold every BatchNorm that follows a convolution into it (eval-mode
    inference weights, divco.nn.fold); the folded pairs go into the metadata, so
    :func:`load_branch` rebuilds the folded structure.
    """
    from safetensors.torch import save


    if is_members_run(checkpoint):
        return export_members(checkpoint, out, member=branch, fold_bn=fold_bn)
    checkpoint = checkpoint_of(checkpoint)
    state = load_checkpoint(checkpoint)
    model = model_from_checkpoint(state)
    S = model.branches
    if branch is not None and (not isinstance(branch, int) or isinstance(branch, bool) or not 0 <= branch < S):
        raise ValueError(f"branch must be an int in [0, {S}) for this {S}-branch checkpoint, got {branch!r}")
    indices = [branch] if branch is not None else list(range(S))
    if branch is not None:
        default = checkpoint.with_name(f"{checkpoint.stem}-branch{branch}.safetensors")
        targets = [Path(out) if out is not None else default]
    else:
        folder = Path(out) if out is not None else checkpoint.with_name(f"{checkpoint.stem}-branches")
        targets = [folder / f"branch{i}.safetensors" for i in indices]
    standalones = unstack(model)
    written = []
    for index, target in zip(indices, targets):
        standalone = standalones[index]
        metadata = _metadata(model, state["model_info"], index, standalone)
        if fold_bn:
            metadata["folded_bn"] = json.dumps(fold_batchnorm(standalone.eval(), torch.randn(2, 3, 32, 32)))
        tensors = {k: v.contiguous() for k, v in standalone.state_dict().items()}
        atomic_write_bytes(target, save(tensors, metadata=metadata))
        written.append(target)
    return written


def read_branch_metadata(path: Union[str, Path]) -> dict[str, str]:
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"exported branch {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
    except Exception as error:
        raise ValueError(f"{path} is not a readable safetensors file ({error})") from None
    if metadata.get("format") != EXPORT_FORMAT:
        raise ValueError(f"{path} is not a divco exported branch (metadata format {metadata.get('format')!r})")
    return metadata


def load_branch(path: Union[str, Path], *, device: Union[str, torch.device] = "cpu") -> nn.Module:
    """Rebuild an exported branch as an ordinary model (eval mode) with its trained weights."""
    from safetensors.torch import load_file

    metadata = read_branch_metadata(path)
    kwargs = json.loads(metadata["model_kwargs"])
    divided = models.create(metadata["model_name"], num_classes=int(metadata["num_classes"]),
                            branches=int(metadata["branches"]), **kwargs)
    spec = spec_json(divided)
    if spec != metadata["spec"]:
        raise ValueError(
            f"{path} was exported from a {metadata['model_name']} branch with spec {metadata['spec']}, but this "
            f"divco builds {spec}: the model definition changed since the export"
        )
    model = divided.standalone_model()
    apply_fold_structure(model, [tuple(pair) for pair in json.loads(metadata.get("folded_bn", "[]"))])
    model.load_state_dict(load_file(str(path), device="cpu"), strict=True)
    return model.to(device).eval()


#: The file beside a checkpoint ensemble's exported members: how to combine them.
ENSEMBLE_JSON = "ensemble.json"


def export_members(folder: Union[str, Path], out: Optional[Union[str, Path]] = None, *,
                   member: Optional[int] = None, fold_bn: bool = False) -> list[Path]:
    """Export the stacked members of a snapshot/cbnn run: branch j of the stacked model = member j.

    Without ``member``: every member as ``branch<j>.safetensors`` in ``out`` (default
    ``RUN_DIR/members-branches/``) and ``ensemble.json`` (method, mode and the members' weights);
    with it, that member's file ``out`` (default ``RUN_DIR/member-<j+1>-branch.safetensors``).
    Each file loads with :func:`load_branch` as an ordinary model (a member is a whole network).
    """
    from safetensors.torch import save


    folder = Path(folder)
    members = load_members(folder)
    stacked = members.stacked()  # the ensemble as one model; its branches are what is exported
    M = stacked.branches
    if member is not None and (not isinstance(member, int) or isinstance(member, bool) or not 0 <= member < M):
        raise ValueError(f"branch must be an int in [0, {M}) for this run of {M} member(s), got {member!r}")
    indices = [member] if member is not None else list(range(M))
    if member is not None:
        targets = [Path(out) if out is not None else folder / f"member-{member + 1:02d}-branch.safetensors"]
    else:
        target_folder = Path(out) if out is not None else folder / "members-branches"
        targets = [target_folder / f"branch{j}.safetensors" for j in indices]
    standalones = unstack(stacked)
    written = []
    for index, target in zip(indices, targets):
        standalone, state = standalones[index], members.states[index]
        # each member is a whole network (divided into 1 branch): its metadata says so
        metadata = _metadata(models.create(state["model_info"]["name"], num_classes=stacked.num_classes, branches=1,
                                           **state["model_info"].get("model_kwargs", {})),
                             state["model_info"], 0, standalone)
        metadata.update(member=str(index), member_weight=repr(members.weights[index]), method=members.method)
        if fold_bn:
            metadata["folded_bn"] = json.dumps(fold_batchnorm(standalone.eval(), torch.randn(2, 3, 32, 32)))
        tensors = {k: v.contiguous() for k, v in standalone.state_dict().items()}
        atomic_write_bytes(target, save(tensors, metadata=metadata))
        written.append(target)
    if member is None:
        description = {"method": members.method, "mode": MEMBERS_ENSEMBLE_MODE, "weights": list(members.weights),
                       "files": [t.name for t in targets]}
        atomic_write_bytes(targets[0].parent / ENSEMBLE_JSON, (json.dumps(description, indent=2) + "\n").encode())
    return written
