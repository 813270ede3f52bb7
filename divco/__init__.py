"""divco: Divide and Co-training, run as one branch-batched network.

    import divco
    model = divco.models.create("wide_resnet16_8", num_classes=100, branches=4)
    logits = model(images)                   # [N, 4, 100]
    print(divco.summary(model, (3, 32, 32)))
    print(divco.build_info())                # torch, the native extension's build (or why not loaded)

The subpackages and functions below are imported on first use (PEP 562), so that
``import divco`` - and ``divco --help`` - do not load torch, the extension or Triton.
"""

from __future__ import annotations

import importlib
import sys
import types

__version__ = "0.1.0"

#: public name -> (module, attribute or None for the module itself)
_LAZY = {
    "models": ("divco.models", None),
    "nn": ("divco.nn", None),
    "ops": ("divco.ops", None),
    "stack": ("divco.stacking", "stack"),
    "unstack": ("divco.stacking", "unstack"),
    "branch_state_dict": ("divco.stacking", "branch_state_dict"),
    "summary": ("divco.summary", "summary"),
    "ModelSummary": ("divco.summary", "ModelSummary"),
    "build_info": ("divco.native", "build_info"),
}

__all__ = ["models", "nn", "ops", "stack", "unstack", "branch_state_dict", "summary", "ModelSummary", "build_info",
           "__version__"]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'divco' has no attribute {name!r}")
    module_name, attribute = _LAZY[name]
    module = importlib.import_module(module_name)
    value = module if attribute is None else getattr(module, attribute)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


class _Package(types.ModuleType):
    """``divco.summary`` is the function even after the submodule divco.summary is imported
    (the import system would set the attribute to the module)."""

    @property
    def summary(self):
        value = self.__dict__.get("_summary_function")
        if value is None:
            value = self.__dict__["_summary_function"] = importlib.import_module("divco.summary").summary
        return value

    @summary.setter
    def summary(self, value) -> None:
        if not isinstance(value, types.ModuleType):
            self.__dict__["_summary_function"] = value


sys.modules[__name__].__class__ = _Package
