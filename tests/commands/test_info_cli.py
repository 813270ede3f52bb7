"""divco.build_info() and `divco info` in a fresh interpreter (importing divco._C alone fails: libc10.so)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


def _fresh(*arguments: str) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "DIVCO_BACKEND")}
    return subprocess.run([sys.executable, *arguments], capture_output=True, text=True, timeout=180, env=environment)


def test_build_info_works_in_a_fresh_interpreter():
    done = _fresh("-c", "import json, divco; print(json.dumps(divco.build_info()))")
    assert done.returncode == 0, done.stderr
    info = json.loads(done.stdout)
    assert info["divco_version"] and info["torch_version"]
    native = info["native"]
    if native["loaded"]:  # the extension's own record: the torch it was built against, its kernels
        assert native["torch_version"] == info["torch_version"] and "cotrain_loss_native" in native["cpu_kernels"]
    else:
        assert native["reason"]


@pytest.mark.parametrize("json_output", [False, True])
def test_divco_info_command(json_output):
    done = _fresh("-m", "divco", "info", *(["--json"] if json_output else []))
    assert done.returncode == 0, done.stderr
    if json_output:
        info = json.loads(done.stdout)
        assert "torch" in info["backends"]["cpu"] and "loaded" in info["native"]
    else:
        assert done.stdout.startswith("divco_version") and "native extension" in done.stdout
        assert "backends               cpu: " in done.stdout
