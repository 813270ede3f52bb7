"""What a benchmark ran on (hardware, software, date) and the card's measured peak."""

from __future__ import annotations

import datetime
import os
import platform
from typing import Optional

import torch

from ..platform_info import cpu_model  # noqa: F401  (re-exported: reports name the CPU)


def _version(module: str) -> Optional[str]:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:  # noqa: BLE001 - not installed, or metadata missing: report as absent
        return None


def _native_extension() -> Optional[str]:
    from ..native import load_extension  # the one loader: checks the build's torch first

    extension, reason = load_extension()
    return "built" if extension is not None else f"absent ({reason})"


def machine_info(device: torch.device) -> dict:
    """Machine and software details recorded with every result file."""
    import divco

    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "triton": _version("triton"),
        "torchvision": _version("torchvision"),
        "torch_uncertainty": _version("torch-uncertainty"),
        "divco": divco.__version__,
        "divco_native_extension": _native_extension(),
        "device": str(device),
        "gpu_name": None,
        "gpu_memory_bytes": None,
        "gpu_capability": None,
        "triton_interpret": os.environ.get("TRITON_INTERPRET"),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu_name"] = props.name
        info["gpu_memory_bytes"] = int(props.total_memory)
        info["gpu_capability"] = f"{props.major}.{props.minor}"
        info["gpu_multiprocessors"] = props.multi_processor_count
        info["cuda_driver"] = _cuda_driver()
    return info


def _cuda_driver() -> Optional[str]:
    try:
        import subprocess

        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=10, check=True,
        )
        return out.stdout.strip() or None
    except Exception:  # noqa: BLE001 - nvidia-smi missing or failing: the driver stays unknown
        return None


def matmul_peak_flops(device: torch.device, size: int = 8192, repeats: int = 10,
                      dtype: torch.dtype = torch.bfloat16) -> dict:
    """The card's dense matrix-multiply rate, measured: a ``size``-cubed product in ``dtype``.

    Random operands (zeros run faster than real data), three untimed warm-ups,
    CUDA events, median over ``repeats`` products.  Used as the denominator of MFU.
    """
    if device.type != "cuda":
        raise ValueError(f"the matmul peak is measured on a CUDA device, got {device}")
    from .measure import median, time_cuda

    def timed_products() -> list[float]:
        a = torch.randn(size, size, device=device, dtype=dtype)
        b = torch.randn(size, size, device=device, dtype=dtype)
        out = torch.empty(size, size, device=device, dtype=dtype)
        return time_cuda(lambda: torch.mm(a, b, out=out), repeats=repeats, warmup=3)

    seconds = median(timed_products())
    flops = 2.0 * size**3
    torch.cuda.empty_cache()  # the operands are gone: give their memory back
    return {"size": size, "dtype": str(dtype).replace("torch.", ""), "seconds": seconds,
            "flops_per_s": flops / seconds}
