"""The ``divco`` command line: one subcommand per module of ``divco.commands``.

Each command module defines ``HELP`` (one line), ``add_arguments(parser)`` and
``run(args) -> int``, and imports nothing heavy at module level.  Only the command
being run gets its arguments added (which may import torch), so ``divco --help``
imports neither torch, torchvision, the extension nor Triton.
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys
from typing import Optional, Sequence

from . import __version__, commands


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line (the option, what was wrong, where help is), not the whole usage block."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _command_modules() -> dict[str, str]:
    """Command name -> module name: a module ``ensemble_curve`` is the command ``ensemble-curve``."""
    modules = (m.name for m in pkgutil.iter_modules(commands.__path__) if not m.name.startswith("_"))
    return {module.replace("_", "-"): module for module in sorted(modules)}


def _requested_command(argv: Sequence[str], names: list[str]) -> Optional[str]:
    """The subcommand ``argv`` names (its first non-option word), if it is one."""
    first = next((a for a in argv if not a.startswith("-")), None)
    return first if first in names else None


def build_parser(argv: Optional[Sequence[str]] = None) -> argparse.ArgumentParser:
    """The parser; with ``argv``, only the command it names gets its arguments (None: every command)."""
    parser = _Parser(prog="divco", description="Divide and Co-training, run as one branch-batched network.")
    parser.add_argument("--version", action="version", version=f"divco {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    modules = _command_modules()
    names = sorted(modules)
    selected = _requested_command(argv, names) if argv is not None else None
    for name in names:
        module = importlib.import_module(f"divco.commands.{modules[name]}")
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        if argv is None or name == selected:
            module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(argv).parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except (ValueError, FileNotFoundError) as error:  # bad input: a message, not a traceback
        print(f"divco {args.command}: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # a failed write (disk full, file too large, read-only folder): one line
        print(f"divco {args.command}: error: {error}", file=sys.stderr)
        return 1


def entry() -> None:
    """The ``divco`` command (and ``python -m divco``): :func:`main`, then the process exit.

    A process of a torchrun job (WORLD_SIZE > 1) ends with ``os._exit`` once its output is
    flushed. DistributedDataParallel keeps the process group alive after
    destroy_process_group (its gloo/NCCL threads still run), so the interpreter's teardown and
    the C++ static destructors race those threads: rarely, a finished run aborted there
    ("terminate called without an active exception", exit -6) and torchrun failed the job
    after every file was written. Nothing is left to do at that point: every file is closed.
    """
    code = main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
