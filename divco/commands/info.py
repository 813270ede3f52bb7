"""divco info: the versions, the native extension's build and the backends usable here."""

from __future__ import annotations

import json

HELP = "print divco's and torch's versions, the native extension's build and the backends available per device"


def add_arguments(parser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON instead of lines")


def run(args) -> int:
    import torch

    from ..native import build_info
    from ..ops.backends import available_backends

    info = build_info()
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    info["backends"] = {device: available_backends(device) for device in devices}  # the first is the default
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    native = info.pop("native")
    for key, value in info.items():
        shown = ", ".join(f"{d}: {' '.join(b)}" for d, b in value.items()) if key == "backends" else value
        print(f"{key:<22} {shown}")
    print(f"{'native extension':<22} {'loaded' if native.pop('loaded') else 'not loaded: ' + native.pop('reason')}")
    for key, value in native.items():
        print(f"  {key:<20} {' '.join(map(str, value)) if isinstance(value, list) else value}")
    return 0
