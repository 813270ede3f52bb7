"""Subcommands of the ``divco`` CLI (see divco/cli.py)."""
