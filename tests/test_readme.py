"""The README's code blocks run as written: every python block in a fresh interpreter, every bash
block parses, and every `divco` command it shows is a real command with the options it shows."""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from optional_deps import needs_torchvision

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
PYTHON_BLOCKS = re.findall(r"```python\n(.*?)```", README, flags=re.S)
BASH_BLOCKS = re.findall(r"```bash\n(.*?)```", README, flags=re.S)


def block_id(block: str) -> str:
    return block.strip().splitlines()[0][:60]


def run_python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
               OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


def test_the_readme_has_code_blocks():
    assert len(PYTHON_BLOCKS) >= 5 and len(BASH_BLOCKS) >= 4


@pytest.mark.parametrize("block", [
    pytest.param(b, id=block_id(b), marks=[needs_torchvision] if "torchvision" in b or "digits" in b else [])
    for b in PYTHON_BLOCKS])
def test_python_blocks_run_as_written(block, tmp_path):
    result = run_python(block, tmp_path)
    assert result.returncode == 0, f"README block failed:\n{block}\n--- stderr ---\n{result.stderr[-3000:]}"


def test_a_failing_block_is_reported(tmp_path):
    """The runner above can fail: an undefined name in a block is a non-zero exit."""
    assert run_python("print(undefined_name)", tmp_path).returncode != 0


@pytest.mark.parametrize("block", BASH_BLOCKS, ids=[block_id(b) for b in BASH_BLOCKS])
def test_bash_blocks_parse(block):
    subprocess.run(["bash", "-n"], input=block, text=True, check=True)


def divco_command_lines():
    """Each `divco <command> ...` line of the README's bash blocks, without comments and placeholders."""
    lines = []
    for block in BASH_BLOCKS:
        for line in block.splitlines():
            for part in line.split("#", 1)[0].split("&&"):
                part = part.strip()
                if part.startswith("divco "):
                    lines.append(part)
    return lines


def options_by_command():
    """{command: the --options the README shows with it}."""
    shown: dict[str, set[str]] = {}
    for line in divco_command_lines():
        words = shlex.split(line.replace("|", " "))
        shown.setdefault(words[1], set()).update(w.strip("[]") for w in words[2:] if w.strip("[]").startswith("--"))
    return shown


@pytest.mark.parametrize("command, options", sorted(options_by_command().items()))
def test_divco_commands_and_options_exist(command, options):
    """The command exists and every --option shown with it is one of its options."""
    help_text = subprocess.run([sys.executable, "-m", "divco", command, "--help"], capture_output=True,
                               text=True, cwd=ROOT, timeout=300)
    assert help_text.returncode == 0, help_text.stderr
    missing = sorted(o for o in options if o not in help_text.stdout)
    assert not missing, f"not options of divco {command}: {missing}"
