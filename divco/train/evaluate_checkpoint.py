"""Evaluate a training checkpoint on a test set (what ``divco eval`` runs)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import torch

from ..data import ImageDataset, Normalize, load_dataset
from .checkpoint import BEST_NAME, checkpoint_config, checkpoint_of, load_checkpoint
from .evaluation import EvaluationResult, metrics_from_logits, predict, temperature_scaling
from .checkpoint import model_from_checkpoint
from .member_record import MEMBERS_ENSEMBLE_MODE
from .members import load_members
from .runtime import resolve_device


@dataclass(frozen=True)
class CheckpointOnTestData:
    """A checkpoint's model on its device, next to the test data it is evaluated on."""

    checkpoint: Path
    state: dict
    model: torch.nn.Module  # in eval mode, on ``device``
    dataset: ImageDataset  # test images already subset
    normalize: Normalize  # the training data's statistics
    device: torch.device

    @property
    def amp_dtype(self) -> Optional[torch.dtype]:
        """bfloat16 autocast on a GPU that has it (as training evaluates), none elsewhere."""
        cuda = self.device.type == "cuda"
        return torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else None

    def describe(self) -> dict:
        info = self.state["model_info"]
        return {"checkpoint": str(self.checkpoint), "model": info["name"], "branches": info["branches"],
                "epochs_done": self.state["epochs_done"], "data": self.dataset.describe(),
                "best": self.state.get("best") if self.checkpoint.name == BEST_NAME else None}


def load_checkpoint_on_test_data(checkpoint: Union[str, Path], *, data: Optional[str] = None,
                                 image_size: Optional[int] = None, test_subset: Optional[int] = None,
                                 device: str = "auto", cache_dir=None) -> CheckpointOnTestData:
    """The model of ``checkpoint`` (a file, or a run folder: its best.pt) and its test data.

    By default the test split of the data the checkpoint was trained on (same image
    size and test subset), and, on that data, the run's validation split (the same images,
    :meth:`divco.data.ImageDataset.with_validation`; none on other data).  Inputs are normalised with the training data's statistics,
    as in training, whatever data is tested.  ``divco eval`` and ``divco ensemble-curve``
    both read checkpoints through here.
    """
    checkpoint = checkpoint_of(checkpoint)
    state = load_checkpoint(checkpoint)
    config = state["config"]
    data = data if data is not None else config["data"]
    if image_size is None:
        image_size = config.get("image_size")
    if test_subset is None and data == config["data"]:
        test_subset = config.get("test_subset")
    split = checkpoint_config(state).val_split if data == config["data"] else 0
    dataset = load_dataset(data, image_size=image_size, cache_dir=cache_dir).with_validation(
        split, config["seed"]).subset(test=test_subset)
    info = state["model_info"]
    if dataset.num_classes != info["num_classes"]:
        raise ValueError(f"{data} has {dataset.num_classes} classes but checkpoint {checkpoint} predicts "
                         f"{info['num_classes']}")
    target = resolve_device(device)
    model = model_from_checkpoint(state).to(target).eval()
    trained = state["dataset"]
    return CheckpointOnTestData(checkpoint, state, model, dataset, Normalize(trained["mean"], trained["std"], target),
                                target)


def evaluate_checkpoint(checkpoint: Union[str, Path], *, data: Optional[str] = None, image_size: Optional[int] = None,
                        test_subset: Optional[int] = None, batch_size: int = 256, device: str = "auto",
                        cache_dir=None, temperature: bool = False, devices: Optional[Sequence[str]] = None,
                        branch_parallel: bool = False) -> tuple[EvaluationResult, dict]:
    """Test metrics of ``checkpoint`` (see :func:`load_checkpoint_on_test_data`) and a description.

    With ``temperature``, the description also holds ``temperature_scaling``: post-hoc temperature
    scaling of every branch and ensemble mode, fitted on the run's validation split and reported on
    the test images, or, for a run without one (or on other data), fitted on a held-out half of the
    test images and reported on the other half (:func:`divco.train.evaluation.temperature_scaling`).

    The branches may run spread out, with the same result: ``devices`` (one process, the branches
    split into ``len(devices)`` shards, one per device; ``device`` is then the first) or
    ``branch_parallel`` (under torchrun: S/WORLD_SIZE branches per process, their logits all-gathered;
    every process gets the result).
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if devices and branch_parallel:
        raise ValueError("--devices and --branch-parallel are two ways to spread the branches: choose one")
    loaded = load_checkpoint_on_test_data(checkpoint, data=data, image_size=image_size, test_subset=test_subset,
                                          device=devices[0] if devices else device, cache_dir=cache_dir)
    dataset, target = loaded.dataset, loaded.device
    model = _spread(loaded.model, devices, branch_parallel)
    logits = predict(model, dataset.test_images.to(target), loaded.normalize, batch_size=batch_size,
                     amp_dtype=loaded.amp_dtype, channels_last=target.type == "cuda")
    labels = dataset.test_labels.to(logits.device)
    description = loaded.describe()
    if temperature and dataset.has_validation:
        fit_logits = predict(model, dataset.val_images.to(target), loaded.normalize, batch_size=batch_size,
                             amp_dtype=loaded.amp_dtype, channels_last=target.type == "cuda")
        description["temperature_scaling"] = temperature_scaling(logits, labels, fit_logits=fit_logits,
                                                                 fit_labels=dataset.val_labels)
    elif temperature:
        description["temperature_scaling"] = temperature_scaling(logits, labels)
    return metrics_from_logits(logits, labels), description


def _spread(model: torch.nn.Module, devices: Optional[Sequence[str]], branch_parallel: bool) -> torch.nn.Module:
    """The model with its branches over ``devices`` or over the processes of this torchrun launch (or as is)."""
    if devices:
        from .branch_parallel.inference import MultiDeviceBranches

        return MultiDeviceBranches(model, devices).eval()
    if branch_parallel:
        import torch.distributed as dist

        from .branch_parallel.inference import spread_over_processes
        from .branch_parallel.mesh import build_mesh

        world_size = dist.get_world_size() if dist.is_initialized() else 1
        if world_size == 1:
            raise ValueError("--branch-parallel evaluates the branches on the processes of a torchrun launch "
                             "(WORLD_SIZE > 1); in one process, spread them over devices with --devices")
        return spread_over_processes(model, build_mesh(model.branches, world_size)).eval()
    return model




def _scores_dict(scores) -> dict:
    values = asdict(scores)
    values["accuracy"] = values.pop("acc")
    return values


def evaluate_members(folder: Union[str, Path], *, data: Optional[str] = None, image_size: Optional[int] = None,
                     test_subset: Optional[int] = None, batch_size: int = 256, device: str = "auto",
                     cache_dir=None) -> dict:
    """Every member of a snapshot/cbnn run and their weighted ensemble on test data (``divco eval RUN_DIR``).

    The members are stacked into one M-branch model (one forward pass for all of them); the ensemble is
    the weighted mean of the members' probabilities with the run's weights (members.json: equal for
    snapshot, the normalised alphas for cbnn). Returns one JSON-ready dict: ``members`` (one entry per
    member: its metrics, ``weight``, file, epoch, and ``alpha``/``error`` for cbnn), ``ensemble``,
    ``disagreement`` (mean over member pairs) and ``disagreement_matrix``.
    """
    from ..ensembles.combine import ensemble_probabilities
    from .evaluation import Scores, _scores

    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    members = load_members(folder)
    first = Path(folder) / members.record["members"][0]["file"]
    loaded = load_checkpoint_on_test_data(first, data=data, image_size=image_size, test_subset=test_subset,
                                          device=device, cache_dir=cache_dir)
    target = loaded.device
    model = members.stacked().to(target)
    logits = predict(model, loaded.dataset.test_images.to(target), loaded.normalize, batch_size=batch_size,
                     amp_dtype=loaded.amp_dtype, channels_last=target.type == "cuda")  # [N, M, K]
    labels = loaded.dataset.test_labels.to(logits.device)
    per_member = metrics_from_logits(logits, labels)
    probs = ensemble_probabilities(logits.to(torch.float64), MEMBERS_ENSEMBLE_MODE, members.weights)
    ensemble = Scores(*_scores(probs, labels).cpu().tolist())
    info = members.states[0]["model_info"]
    entries = []
    for entry, weight, scores in zip(members.record["members"], members.weights, per_member.branches):
        extra = {k: entry[k] for k in ("alpha", "error") if k in entry}
        entries.append({"file": entry["file"], "epochs_done": entry["epochs_done"],
                        "steps_into_epoch": entry["steps_into_epoch"], "weight": weight, **extra,
                        **_scores_dict(scores)})
    return {
        "run": str(folder), "method": members.method, "model": info["name"], "data": loaded.dataset.describe(),
        "images": per_member.images, "checkpoints": members.record["checkpoints"],
        "complete": bool(members.record.get("complete")), "members": entries,
        "ensemble": {"mode": MEMBERS_ENSEMBLE_MODE, "weights": list(members.weights), **_scores_dict(ensemble)},
        "disagreement": per_member.mean_disagreement, "disagreement_matrix": per_member.disagreement,
    }


def members_table(report: dict) -> str:
    """``divco eval RUN_DIR`` of a snapshot/cbnn run as text."""
    taken = len(report["members"])
    unfinished = "" if report["complete"] else f" (of {report['checkpoints']}: the run is not finished)"
    lines = [f"{report['run']}: {report['method']} ensemble of {taken} member(s){unfinished} of {report['model']} "
             f"on {report['data']}",
             f"{'test images: ' + str(report['images']):<22}  {'weight':>6}  {'acc %':>7}  {'NLL':>7}  {'ECE %':>6}  "
             f"{'aECE %':>6}  {'Brier':>6}  {'AURC %':>6}"]
    rows = [(f"member {j + 1} (epoch {m['epochs_done']})", m) for j, m in enumerate(report["members"])]
    rows.append((f"ensemble ({report['ensemble']['mode']})", {**report["ensemble"], "weight": 1.0}))
    for name, s in rows:
        lines.append(f"{name:<22}  {s['weight']:6.3f}  {100 * s['accuracy']:7.2f}  {s['nll']:7.4f}  "
                     f"{100 * s['ece']:6.2f}  {100 * s['adaptive_ece']:6.2f}  {s['brier']:6.4f}  "
                     f"{100 * s['aurc']:6.2f}")
    if report["disagreement"] is not None:
        lines.append(f"pairwise disagreement of the members: {100 * report['disagreement']:.2f} % (mean over pairs)")
    return "\n".join(lines)
