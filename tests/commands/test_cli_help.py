"""`divco --help` stays light: it imports neither torch, torchvision, the extension nor Triton."""

from __future__ import annotations

import json
import subprocess
import sys

from divco.cli import main

HEAVY = ("torch", "torchvision", "triton", "divco._C", "numpy")

PROBE = """
import json, runpy, sys
sys.argv = ["divco", "--help"]
try:
    runpy.run_module("divco", run_name="__main__", alter_sys=True)
except SystemExit as done:
    code = done.code
print(json.dumps({"code": code, "heavy": sorted(m for m in sys.modules if m.split(".")[0] in %r or m in %r)}))
"""


def test_divco_help_imports_no_heavy_module():
    done = subprocess.run([sys.executable, "-c", PROBE % (HEAVY, HEAVY)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    *help_lines, last = done.stdout.strip().splitlines()
    result = json.loads(last)
    assert result == {"code": 0, "heavy": []}
    help_text = "\n".join(help_lines)
    for command in ("train", "eval", "export", "compare", "bench", "summary", "models", "demo", "ensemble-curve"):
        assert command in help_text


def test_a_command_still_gets_its_arguments(capsys):
    assert main(["models", "--family", "cifar"]) == 0
    assert "wide_resnet16_8" in capsys.readouterr().out


def test_module_names_with_underscores_are_commands_with_dashes(tmp_path, capsys):
    """divco.commands.ensemble_curve is ``divco ensemble-curve`` (and only that spelling)."""
    from divco.cli import build_parser

    args = build_parser(["ensemble-curve", "r", "--out", str(tmp_path)]).parse_args(
        ["ensemble-curve", "r", "--out", str(tmp_path)])
    assert args.command == "ensemble-curve" and args.runs == ["r"]
    assert main(["ensemble-curve", str(tmp_path / "missing"), "--out", str(tmp_path)]) == 2
    assert "ensemble-curve: error:" in capsys.readouterr().err
    try:
        main(["ensemble_curve", "r", "--out", str(tmp_path)])
    except SystemExit as done:
        assert done.code == 2
    else:
        raise AssertionError("the module name is not a command")


ENTRY_PROBE = """
import atexit, os, sys
os.environ["WORLD_SIZE"] = %r
atexit.register(lambda: print("interpreter teardown ran"))
sys.argv = ["divco", "models", "--family", "cifar"]
from divco.cli import entry
entry()
"""


def test_a_torchrun_process_skips_the_interpreter_teardown():
    # under torchrun the process group outlives destroy_process_group (DDP holds it) and its threads
    # race the teardown: a process of a torchrun job ends with os._exit after flushing its output
    for world_size, teardown in (("2", False), ("1", True)):
        done = subprocess.run([sys.executable, "-c", ENTRY_PROBE % world_size], capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == 0, done.stderr
        assert "wide_resnet16_8" in done.stdout  # flushed before the exit
        assert ("interpreter teardown ran" in done.stdout) is teardown
