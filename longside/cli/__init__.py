"""The `longside` command line: argument parsing and printing only; the work is done by
the library."""

from longside.cli.main import main

__all__ = ["main"]
